"""Checking what a client sends: uploaded pictures and EditConfig form fields.

Everything here raises ``BadRequest`` (status + a message that names the problem and what to do),
which the app answers as JSON. Pictures are decoded from the uploaded bytes only (no client string
is ever used as a path), their type is read from the content (the first bytes), never from the file
name or the declared content type, and their size is read from the header and checked before any
pixel is decoded, so a small file that declares a huge picture (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import types
import typing

import numpy as np
import PIL.Image

from ..config import MASK_CONVENTIONS, EditConfig
from ..inputs import check_instruction, load_image, load_mask

# Formats decoded. PIL can open ~40 formats (some through external programs: EPS runs Ghostscript);
# a service accepts the common web ones only.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_INSTRUCTION_CHARS = 1000  # CLIP reads 77 tokens; this only bounds what we tokenize and log
FIELD_TYPES = typing.get_type_hints(EditConfig)
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(EditConfig))


class BadRequest(Exception):
    """A request the service refuses: HTTP ``status`` and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def decode_image(data: bytes, what: str, max_pixels: int) -> PIL.Image.Image:
    """Uploaded bytes -> RGB PIL image (any mode converted, as ``lime_fast.inputs.load_image`` does).

    415 when the content is not a picture in ``FORMATS``; 413 when the header declares more than
    ``max_pixels`` pixels (checked before decoding); 400 when the file is damaged.
    """
    img = _decode(data, what, max_pixels)
    try:
        return load_image(img, what)
    except (TypeError, ValueError) as e:
        raise BadRequest(400, str(e)) from None


def _decode(data: bytes, what: str, max_pixels: int) -> PIL.Image.Image:
    """Uploaded bytes -> the PIL picture in its own mode (transparency kept), checked as ``decode_image`` says."""
    if not data:
        raise BadRequest(400, f"{what}: the uploaded file is empty")
    try:
        img = PIL.Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except PIL.Image.DecompressionBombError as e:
        raise BadRequest(413, f"{what}: the picture is far too large ({e})") from None
    except PIL.UnidentifiedImageError:
        raise BadRequest(415, f"{what}: the file is not a picture this server reads (accepted: {', '.join(FORMATS)})") from None
    except Exception as e:  # a damaged header
        raise BadRequest(400, f"{what}: cannot read the picture's header ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise BadRequest(413, f"{what}: the picture is {w} x {h} = {w * h:,} pixels; this server accepts at most "
                              f"{max_pixels:,} (--max-pixels): send a smaller picture")
    if w == 0 or h == 0:
        raise BadRequest(400, f"{what}: the picture is empty ({w} x {h})")
    try:
        img.load()  # decodes the first frame of an animation
    except Exception as e:  # truncated or corrupt data; PIL raises many types
        raise BadRequest(400, f"{what}: the picture's data is damaged ({type(e).__name__}: {e})") from None
    return img


def decode_mask(data: bytes, image_size: tuple[int, int], max_pixels: int, convention: str = "auto") -> np.ndarray:
    """Uploaded mask bytes -> bool [H, W] by ``lime_fast.inputs.load_mask`` with ``convention`` (the
    ``mask_convention`` form field; default auto: white = edit, or transparency as that rule says); it
    must have the picture's size."""
    try:
        mask = load_mask(_decode(data, "mask", max_pixels), "mask", convention)
    except (TypeError, ValueError) as e:
        raise BadRequest(400, str(e)) from None
    if mask.shape != image_size[::-1]:
        raise BadRequest(400, f"mask: the mask is {mask.shape[1]} x {mask.shape[0]} but the image is {image_size[0]} x "
                              f"{image_size[1]}: upload a mask of the image's size (white = edit here)")
    return mask


def mask_convention_field(fields: dict[str, list[str]]) -> str:
    """Takes the ``mask_convention`` form field out of ``fields`` (the rest are EditConfig fields): its
    value, default auto; 400 for a repeated or unknown value."""
    values = fields.pop("mask_convention", ["auto"])
    if len(values) > 1:
        raise BadRequest(400, f"mask_convention was given {len(values)} times; give it once")
    value = values[0].strip()
    if value not in MASK_CONVENTIONS:
        raise BadRequest(400, f"mask_convention must be one of {', '.join(MASK_CONVENTIONS)}; got {value!r}")
    return value


def check_text(instruction: str) -> str:
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise BadRequest(400, f"instruction: {len(instruction)} characters is too long (at most {MAX_INSTRUCTION_CHARS}; "
                              "the model reads the first 77 tokens)")
    try:
        return check_instruction(instruction)
    except (TypeError, ValueError) as e:
        raise BadRequest(400, str(e)) from None


def _scalar(name: str, kind: type, text: str):
    text = text.strip()
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise BadRequest(400, f"{name} must be an integer, got {text!r}") from None
    if kind is float:
        try:
            v = float(text)
        except ValueError:
            raise BadRequest(400, f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(v):
            raise BadRequest(400, f"{name} must be a finite number, got {text!r}")
        return v
    return text


def _items(name: str, text: str) -> list[str]:
    """'1,2' / '1 2' / '[1, 2]' / '["collar", "dog"]' -> the items as strings."""
    text = text.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            raise BadRequest(400, f"{name}: {text!r} is not a JSON list; send e.g. 0,1 or [0, 1]") from None
        if not isinstance(items, list) or any(isinstance(x, (list, dict)) for x in items):
            raise BadRequest(400, f"{name}: expected a flat list, got {text!r}")
        return [str(x) for x in items]
    sep = "," if "," in text else None
    return [s for s in (p.strip() for p in text.split(sep)) if s]


def parse_field(name: str, values: list[str]):
    """One EditConfig field from its form value(s), by the dataclass's type: int, float, str,
    ``X | None`` ('none', 'null' or empty = None) and tuples (comma- or space-separated, a JSON list,
    or the field repeated)."""
    hint = FIELD_TYPES[name]
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    inner = next(a for a in args if a is not type(None)) if optional else hint
    if optional and len(values) == 1 and values[0].strip().lower() in ("", "none", "null"):
        return None
    if typing.get_origin(inner) is tuple:
        targs = typing.get_args(inner)
        items = [x for v in values for x in _items(name, v)]
        fixed = Ellipsis not in targs
        if fixed and len(items) != len(targs):
            raise BadRequest(400, f"{name} takes {len(targs)} values, got {len(items)}: {', '.join(values)!r}")
        return tuple(_scalar(name, targs[0], x) for x in items)
    if len(values) > 1:
        raise BadRequest(400, f"{name} was given {len(values)} times; give it once")
    return _scalar(name, inner, values[0])


def parse_config(base: EditConfig, fields: dict[str, list[str]], limits: dict[str, int]) -> EditConfig:
    """``base`` with the request's EditConfig fields applied, checked by ``EditConfig.validate`` and
    against the server's ``limits`` (field -> largest value allowed; for level tuples, the largest level)."""
    changes = {name: parse_field(name, values) for name, values in fields.items()}
    try:
        cfg = base.replace(**changes)
    except (TypeError, ValueError) as e:
        raise BadRequest(400, str(e)) from None
    for name, top in limits.items():
        v = getattr(cfg, name)
        worst = max(v) if isinstance(v, tuple) and v else v
        if isinstance(worst, int) and worst > top:
            hint = " (--max-steps)" if name == "steps" else ""
            raise BadRequest(400, f"{name}={v} is over this server's limit of {top}{hint}")
    return cfg
