"""Input checking and conversion: images, masks, instructions.

Everything here runs before any model work or file write, and raises an error that names the
problem. Images become RGB ``PIL.Image``; masks become ``bool`` numpy arrays ``[H, W]``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .errors import LimeWarning

# PIL refuses files past ~179 MP by default (decompression bombs); we refuse anything with a side over
# MAX_INPUT_SIDE outright and shrink anything over EditConfig.max_side for processing.
MAX_INPUT_SIDE = 16384


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
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise ValueError(f"{what}: integer image values must lie in [0, 255] or [0, 65535]")
        arr = (arr.astype(np.float64) / 257.0).round().astype(np.uint8)  # 16-bit -> 8-bit
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
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return PIL.Image.fromarray(np.clip(arr / top * 255, 0, 255).round().astype(np.uint8)).convert("RGB")
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
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no such file: {path}")
        try:
            with PIL.Image.open(path) as f:
                f.load()
                img = f.copy()
        except PIL.Image.DecompressionBombError as e:
            raise ValueError(f"{what}: {path} is too large to open safely ({e})") from None
        except Exception as e:  # PIL raises many types for corrupt files
            raise ValueError(f"{what}: cannot read {path} as an image ({type(e).__name__}: {e})") from None
        what = f"{what} {path}"
    elif isinstance(image, PIL.Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        img = _from_array(image, what)
    elif isinstance(image, torch.Tensor):
        img = _from_array(image.detach().cpu().numpy(), what)
    else:
        raise TypeError(
            f"{what}: expected a file path, PIL.Image, numpy array or torch tensor, got {type(image).__name__}"
        )
    if max(img.size) > MAX_INPUT_SIDE:
        raise ValueError(f"{what}: {img.width} x {img.height} exceeds the maximum side of {MAX_INPUT_SIDE} pixels")
    return _to_rgb(img, what)


def load_mask(mask, what: str = "mask") -> np.ndarray:
    """Any supported mask input -> bool numpy array [H, W] (True = region to edit).

    Accepts a path, a ``PIL.Image`` (any mode; nonzero after conversion to grayscale = inside,
    threshold 128), a numpy array or torch tensor [H, W] (or [1, H, W] / [H, W, 1]) of bool,
    integers (> 127 for uint8, else > 0) or floats (>= 0.5).
    """
    if isinstance(mask, (str, os.PathLike)):
        mask = load_image(mask, what).convert("L")
    if isinstance(mask, PIL.Image.Image):
        if mask.width == 0 or mask.height == 0:
            raise ValueError(f"{what}: the mask is empty ({mask.width} x {mask.height})")
        if mask.mode == "RGBA":
            mask = mask.getchannel("A") if mask.getextrema()[3][0] < 255 else mask.convert("L")
        return np.asarray(mask.convert("L")) >= 128
    if isinstance(mask, torch.Tensor):
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
