"""Input checking and conversion: images, masks, instructions.

Everything here runs before any model work or file write, and raises an error that names the
problem. Images become RGB ``PIL.Image``; masks become ``bool`` numpy arrays ``[H, W]``.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from .errors import InputWarning, LimeWarning

# Limits, checked on the file's header before anything is decoded: a side over MAX_INPUT_SIDE or more
# than MAX_INPUT_PIXELS pixels is refused (a 144-megapixel photo used to be accepted and decoded into
# 432 MB before the edit shrank it to max_side). Anything over EditConfig.max_side is shrunk for processing.
MAX_INPUT_SIDE = 16384
MAX_INPUT_PIXELS = 64_000_000


def _is_tensor(x) -> bool:
    # torch is imported only if the caller already did (a tensor cannot exist otherwise): checking inputs
    # must not cost the seconds of importing torch (the CLI reports a missing file before any import).
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _from_array(arr: np.ndarray, what: str) -> PIL.Image.Image:
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise TypeError(f"{what}: an image array must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(
            f"{what}: an image array must be [H, W], [H, W, 3|4] or [3|4, H, W], got shape {tuple(arr.shape)}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what}: the image is empty (shape {tuple(arr.shape)})")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError(f"{what}: the image array holds NaN or inf")
        if arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"{what}: float image arrays must lie in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]")
        arr = np.round(arr * 255).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.max(initial=0) > 255):
        # 16-bit data (a uint16 array, a PIL "I;16" image, or wider integers with values over 255):
        # full scale 65535 -> 255, whatever the values, so the same picture converts alike on every path.
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise ValueError(f"{what}: integer image values must lie in [0, 255] or [0, 65535]")
        arr = (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
    else:
        if arr.min(initial=0) < 0:
            raise ValueError(f"{what}: integer image values must be >= 0")
        arr = arr.astype(np.uint8)
    return PIL.Image.fromarray(arr)


def _to_rgb(img: PIL.Image.Image, what: str) -> PIL.Image.Image:
    if img.width == 0 or img.height == 0:
        raise ValueError(f"{what}: the image is empty ({img.width} x {img.height})")
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit: the uint16 array rule
        return _from_array(np.asarray(img).astype(np.uint16), what).convert("RGB")
    if mode == "I":  # 32-bit integers: the integer array rule (values over 255 are 16-bit data)
        return _from_array(np.asarray(img, dtype=np.int64), what).convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        return _from_array(np.clip(arr, 0, 1) if arr.max(initial=0) <= 1 else arr / arr.max(), what).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite transparent pixels on white, as image viewers show them.
        rgba = img.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(image, what: str = "image") -> PIL.Image.Image:
    """Any supported image input -> RGB ``PIL.Image``.

    Accepts a path (str / PathLike), a ``PIL.Image`` of any mode (grayscale, RGBA, 16-bit, CMYK,
    palette: converted), a numpy array ([H, W], [H, W, 3|4] or [3|4, H, W]; uint8, uint16, or float
    in [0, 1]) or a torch tensor of the same layouts. Raises ``FileNotFoundError``, ``TypeError`` or
    ``ValueError`` naming the problem.
    """
    if isinstance(image, (str, os.PathLike)):
        img = _open(image, what)
        what = f"{what} {image}"
    elif isinstance(image, PIL.Image.Image):
        _check_size(image.size, what)
        img = _upright(image)
    elif isinstance(image, np.ndarray):
        img = _from_array(image, what)
    elif _is_tensor(image):
        img = _from_array(image.detach().cpu().numpy(), what)
    else:
        raise TypeError(
            f"{what}: expected a file path, PIL.Image, numpy array or torch tensor, got {type(image).__name__}"
        )
    _check_size(img.size, what)
    return _to_rgb(img, what)


def _open(path, what: str) -> PIL.Image.Image:
    """The picture in a file, upright (EXIF orientation applied), in its own mode; errors name the file.
    Its size is checked from the header before anything is decoded."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what}: {path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file: {path}")
    try:
        with PIL.Image.open(path) as f:
            _check_size(f.size, f"{what} {path}")  # from the header: nothing is decoded yet
            f.load()
            img = _upright(f)
            return f.copy() if img is f else img
    except ValueError as e:
        if "exceeds the maximum" in str(e):
            raise
        raise ValueError(f"{what}: cannot read {path} as an image ({type(e).__name__}: {e})") from None
    except PIL.Image.DecompressionBombError as e:
        raise ValueError(f"{what}: {path} is too large to open safely ({e})") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise ValueError(f"{what}: cannot read {path} as an image ({type(e).__name__}: {e})") from None


def _check_size(size: tuple[int, int], what: str) -> None:
    w, h = size
    if max(w, h) > MAX_INPUT_SIDE:
        raise ValueError(f"{what}: {w} x {h} exceeds the maximum side of {MAX_INPUT_SIDE} pixels")
    if w * h > MAX_INPUT_PIXELS:
        raise ValueError(f"{what}: {w} x {h} ({w * h / 1e6:.0f} megapixels) exceeds the maximum of "
                         f"{MAX_INPUT_PIXELS / 1e6:.0f} megapixels; downscale it first (the model runs at "
                         "most at EditConfig.max_side pixels anyway)")


def _upright(img: PIL.Image.Image) -> PIL.Image.Image:
    """The image as a viewer shows it: its EXIF orientation applied (tag 274; phone photos store the
    sensor's pixels and a rotation) in a new image without the tag; ``img`` itself when upright."""
    try:
        orientation = img.getexif().get(274, 1)
    except Exception:  # a malformed EXIF block: show the pixels as stored
        orientation = 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        import PIL.ImageOps

        return PIL.ImageOps.exif_transpose(img)
    return img


def load_mask(mask, what: str = "mask") -> np.ndarray:
    """Any supported mask input -> bool numpy array [H, W] (True = region to edit).

    Accepts a path or a ``PIL.Image`` (one rule for both: a picture with transparency marks its opaque
    pixels; otherwise grayscale >= 128 = inside, 16-bit data scaled as for images), a numpy array or
    torch tensor [H, W] (or [1, H, W] / [H, W, 1]) of bool, integers (> 127 for uint8, else > 0) or
    floats (>= 0.5).
    """
    if isinstance(mask, (str, os.PathLike)):  # the file's own mode: the same rule as a PIL mask below
        mask = _open(mask, what)
    if isinstance(mask, PIL.Image.Image):
        if mask.width == 0 or mask.height == 0:
            raise ValueError(f"{what}: the mask is empty ({mask.width} x {mask.height})")
        if mask.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            mask = _to_rgb(mask, what)  # 16-bit and float data: the image rule (65535 -> 255)
        if mask.mode in ("LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
            mask = mask.convert("RGBA")
        if mask.mode == "RGBA":  # with any transparency, the opaque pixels are the region
            mask = mask.getchannel("A") if mask.getextrema()[3][0] < 255 else mask.convert("L")
        return np.asarray(mask.convert("L")) >= 128
    if _is_tensor(mask):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{what}: expected a file path, PIL.Image, numpy array or torch tensor, got {type(mask).__name__}")
    arr = np.squeeze(mask) if mask.ndim == 3 and 1 in (mask.shape[0], mask.shape[-1]) else mask
    if arr.ndim != 2:
        raise ValueError(f"{what}: a mask must be a single-channel [H, W] array, got shape {tuple(mask.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what}: the mask is empty (shape {tuple(arr.shape)})")
    if arr.dtype == np.bool_:
        return arr.copy()
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError(f"{what}: the mask holds NaN or inf")
        return arr >= 0.5
    if arr.dtype.kind in "iu":
        return arr > 127 if arr.dtype == np.uint8 else arr > 0
    raise TypeError(f"{what}: mask arrays must be bool, integer or float, got dtype {arr.dtype}")


def check_instruction(instruction) -> str:
    """The instruction, stripped; TypeError/ValueError if it is not a non-empty string."""
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a string, got {type(instruction).__name__}")
    text = instruction.strip()
    if not text:
        raise ValueError("instruction is empty: say what to change, e.g. 'make her outfit black'")
    return text


def working_size(width: int, height: int, multiple: int, max_side: int) -> tuple[int, int]:
    """(width, height) at which the UNet runs: long side at most ``max_side``, each side a multiple
    of ``multiple`` (the VAE factor times the UNet's downsampling, 64 for SD 1.5), nearest multiple,
    at least one multiple."""
    scale = min(1.0, max_side / max(width, height))
    if scale < 1.0:
        warnings.warn(
            f"the image is {width} x {height}; it is processed with its long side at {max_side} pixels "
            f"(EditConfig.max_side) and the result is resized back",
            LimeWarning,
            stacklevel=3,
        )
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    return w, h


def grid_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(gh, gw) of the output grid: long side ``long_side``, the other side keeping the aspect ratio."""
    if height >= width:
        return long_side, max(1, round(long_side * width / height))
    return max(1, round(long_side * height / width)), long_side


def _mask_to_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """bool [H, W] -> bool [gh, gw] (nearest)."""
    gh, gw = grid
    return np.asarray(PIL.Image.fromarray(mask.astype(np.uint8) * 255, "L").resize((gw, gh), PIL.Image.NEAREST)) > 127


@dataclass
class EditInputs:
    """A checked batch of edits, with everything about its inputs decided on the host before model work.

    images: the inputs as RGB PIL images at their own sizes; instructions: stripped; masks: the user
    masks, bool [H_m, W_m] at their own sizes, or None (automatic RoI); working_size: (w, h) in pixels at
    which the UNet runs (multiples of the model's pixel multiple); grid: (gh, gw) output grid cells.
    """

    images: list[PIL.Image.Image]
    instructions: list[str]
    masks: list[np.ndarray | None]
    working_size: tuple[int, int]
    grid: tuple[int, int]

    @classmethod
    def build(cls, images, instructions, masks=None, *, multiple: int, cfg, trained_size: int | None = None) -> EditInputs:
        """Check and load a batch (raises naming the first problem; warns ``InputWarning`` on adjustments).

        images / instructions: equal-length sequences; masks: None or one entry (or None) per image.
        All edits are brought to the first image's working size. ``trained_size``: the side the model
        was trained at, if known; larger working sizes warn."""
        if isinstance(instructions, str) or isinstance(images, (str, os.PathLike)) or len(images) != len(instructions):
            raise ValueError("edit_batch takes equal-length lists of images and instructions")
        if not images:
            raise ValueError("edit_batch needs at least one image")
        masks = list(masks) if masks is not None else [None] * len(images)
        if len(masks) != len(images):
            raise ValueError(f"got {len(masks)} masks for {len(images)} images")
        loaded = [load_image(im) for im in images]
        texts = [check_instruction(s) for s in instructions]
        if cfg.roi_words:
            for t in texts:
                check_roi_words(t, cfg.roi_words)
        user = [None if m is None else load_mask(m) for m in masks]
        for im, m in zip(loaded, user):
            if m is not None:
                check_mask_shape(m, im.size)
        w, h = working_size(*loaded[0].size, multiple, cfg.max_side)
        if trained_size and max(w, h) > trained_size:
            warnings.warn(
                f"this model was trained on {trained_size} x {trained_size} pictures; at {w} x {h} it garbles the "
                f"image: resize the input to {trained_size} pixels, or use a model made for photos "
                "(e.g. timbrooks/instruct-pix2pix)", InputWarning, stacklevel=3)
        return cls(loaded, texts, user, (w, h), grid_shape(h, w, cfg.grid_size))

    def working_images(self) -> list[PIL.Image.Image]:
        """The inputs at the working size (Lanczos)."""
        return [im if im.size == self.working_size else im.resize(self.working_size, PIL.Image.LANCZOS) for im in self.images]

    def mask_grids(self) -> list[np.ndarray | None]:
        """The user masks on the output grid (nearest), bool [gh, gw], or None for automatic edits.
        Warns when a mask is empty (plain InstructPix2Pix) or covers everything."""
        grids = []
        for m in self.masks:
            g = None if m is None else _mask_to_grid(m, self.grid)
            if g is not None and not g.any():
                warnings.warn("the mask is empty: nothing is regularized, the edit is plain InstructPix2Pix", LimeWarning, stacklevel=4)
            elif g is not None and g.all():
                warnings.warn("the mask covers the whole image: unrelated tokens are silenced everywhere", LimeWarning, stacklevel=4)
            grids.append(g)
        return grids

    def roi_at_input(self, b: int, roi_grid: np.ndarray) -> np.ndarray:
        """Edit b's RoI as bool [H, W] at its input's size: the user mask itself when it has that size,
        else the grid RoI resized (nearest)."""
        im, m = self.images[b], self.masks[b]
        if m is not None and m.shape == (im.height, im.width):
            return m
        return _mask_to_grid(roi_grid, (im.height, im.width))


def check_mask_shape(mask: np.ndarray, image_size: tuple[int, int], what: str = "mask") -> None:
    """Warn (``InputWarning``) when a mask's aspect ratio differs from the image's by more than 1%: it
    would be stretched to fit. (A mask of another size but the same shape is simply resized.)"""
    mh, mw = mask.shape
    w, h = image_size
    if abs((mw / mh) / (w / h) - 1.0) > 0.01:
        warnings.warn(
            f"{what} is {mw} x {mh} but the image is {w} x {h}: a different aspect ratio, so the mask is "
            "stretched to fit. Pass a mask drawn on this image (--strict refuses such a mask).",
            InputWarning, stacklevel=4)


_WORD = re.compile(r"[^\W\d_]+|\d", re.UNICODE)


def words_of(text: str) -> list[str]:
    """Lower-case words of a text as CLIP's tokenizer splits them: runs of letters, single digits."""
    return _WORD.findall(text.lower())


def check_roi_words(instruction: str, roi_words) -> None:
    """ValueError naming the first word of ``roi_words`` that is not in ``instruction`` (checked on the
    words, before any model loads; the engine checks the same on the tokens)."""
    present = set(words_of(instruction))
    for entry in roi_words:
        for word in words_of(entry):
            if word not in present:
                raise ValueError(f"roi word {word!r} is not in the instruction {instruction!r}; its words are: "
                                 f"{', '.join(dict.fromkeys(words_of(instruction)))}")
