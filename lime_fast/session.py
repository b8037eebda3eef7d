"""Saved ``lime-fast edit`` sessions: an edit's localization on disk, to re-run it with a corrected region.

    lime-fast edit photo.png "make the hat red" -o out.png --save-session s/     # s/segment_ids.png shows the ids
    lime-fast edit photo.png "make the hat red" -o fixed.png --session s/ --add 3,5 --drop 2

A session folder holds ``session.json`` (format version, the model's pin: its identity and weights digest
as ``lime_fast.batch.keys.model_pin`` computes them; dtype; the whole effective ``EditConfig``, seed
included; the instruction; a SHA-256 of the input's RGB pixels), ``localization.npz`` (segments int32
[gh, gw], heatmap float32 [gh, gw], the automatic RoI bool [gh, gw]) and ``segment_ids.png`` (the segment
map with its ids, to choose from). Latents are not saved: a re-run encodes the image and instruction again
and draws the noise from the seed (the same bits on every device), which costs a VAE encode and a text
encode, a small part of an edit next to the localization pass and k-means it skips (docs: README). A
session refuses (``SessionError``) another model (or new weights in its folder), dtype, setting, image or
instruction than its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SessionError

FORMAT = "lime-fast-session"
VERSION = 1
FILES = ("session.json", "localization.npz", "segment_ids.png")


def image_digest(image) -> str:
    """SHA-256 (hex) of an RGB ``PIL.Image``'s size and pixels: the same picture re-saved is the same input."""
    h = hashlib.sha256(f"{image.width}x{image.height};".encode())
    h.update(image.convert("RGB").tobytes())
    return h.hexdigest()


@dataclass
class Session:
    """A read session: model: the model as the first run named it; pin: (identity, weights digest); dtype:
    torch dtype name; config: the effective ``EditConfig``; instruction; image: ``image_digest``;
    segments int [gh, gw], heatmap float32 [gh, gw], roi bool [gh, gw] (the automatic RoI)."""

    model: str
    pin: tuple
    dtype: str
    config: object
    instruction: str
    image: str
    segments: np.ndarray
    heatmap: np.ndarray
    roi: np.ndarray


def write(folder, result, *, model: str, pin, dtype: str, config) -> list[Path]:
    """Write ``result``'s localization (an automatic edit: it has segments) as a session into ``folder``;
    each file through a temporary name and a rename. Returns the paths."""
    from .batch.keys import config_dict
    from .io import atomic_save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": VERSION, "model": str(model), "pin": list(pin), "dtype": dtype,
            "config": config_dict(config), "instruction": result.instruction, "image": image_digest(result.input_image),
            "tokens": result.tokens, "grid": list(result.roi_grid.shape)}
    paths = [folder / name for name in FILES]
    tmp = folder / ".localization.tmp.npz"
    np.savez_compressed(tmp, segments=result.segments.astype(np.int32), heatmap=result.heatmap.astype(np.float32),
                        roi=result.roi_grid.astype(bool))
    os.replace(tmp, paths[1])
    atomic_save(result.pictures()["segment_ids"], paths[2])
    tmp = folder / ".session.tmp.json"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, paths[0])  # last: a folder with session.json is complete
    return paths


def read(folder) -> Session:
    """The session in ``folder``; ``SessionError`` naming what is missing or damaged."""
    from .config import EditConfig

    folder = Path(folder)
    if not (folder / FILES[0]).is_file():
        raise SessionError(f"no session in '{folder}' (no {FILES[0]}); write one with --save-session")
    try:
        meta = json.loads((folder / FILES[0]).read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise SessionError(f"'{folder / FILES[0]}' is not a version-{VERSION} lime-fast session")
        with np.load(folder / FILES[1]) as arrays:
            segments, heatmap, roi = (arrays[k] for k in ("segments", "heatmap", "roi"))
        config = EditConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    except SessionError:
        raise
    except Exception as e:  # a truncated npz, edited JSON, an unknown field: one message
        raise SessionError(f"the session in '{folder}' is damaged ({type(e).__name__}: {e}); write it again") from None
    return Session(meta["model"], tuple(meta["pin"]), meta["dtype"], config, meta["instruction"], meta["image"],
                   segments.astype(np.int64), heatmap, roi.astype(bool))


def check(session: Session, *, pin, overrides: dict, image, instruction: str) -> None:
    """``SessionError`` when this run is not the session's edit: another model pin, a setting given that
    differs from the session's, another input picture or instruction."""
    from .batch.keys import config_dict

    if tuple(pin) != session.pin:
        raise SessionError(f"this session was written with the model {session.pin[0]} (weights {session.pin[1]}); "
                           f"this run's model is {pin[0]} (weights {pin[1]}): use the session's model, or edit anew")
    wanted, have = config_dict(session.config.replace(**overrides)), config_dict(session.config)
    changed = [k for k in have if wanted[k] != have[k]]
    if changed:
        raise SessionError("the session's localization was made with other settings: " + ", ".join(
            f"{k}={have[k]} (this run: {wanted[k]})" for k in changed) + "; drop these flags or edit anew")
    if image_digest(image) != session.image:
        raise SessionError("the input image is not the one this session was written for; edit it anew")
    if instruction != session.instruction:
        raise SessionError(f"this session is for the instruction {session.instruction!r}, not {instruction!r}")


def check_dtype(session: Session, dtype: str) -> None:
    """``SessionError`` when the engine computes in another dtype than the session's localization did."""
    if dtype != session.dtype:
        raise SessionError(f"this session was localized in {session.dtype}; this engine runs {dtype}: pass "
                           f"--dtype {session.dtype.removeprefix('torch.')}")
