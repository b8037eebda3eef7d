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

from .config import MASK_CONVENTIONS
from .errors import InputWarning, LimeWarning, MaskError

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


# --- masks ---------------------------------------------------------------------------------------

MASK_FULL_SHARE = 0.9  # a region over this share of the image warns: nearly nothing is left unedited
_PAINT_SHARE = 0.95  # "one colour": this share of the opaque pixels within _PAINT_TOLERANCE of their median
_PAINT_TOLERANCE = 32  # per channel, of 255
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def check_mask_convention(convention) -> str:
    """``convention`` itself when it is one of ``MASK_CONVENTIONS``, else ``MaskError`` naming them."""
    if not isinstance(convention, str) or convention not in MASK_CONVENTIONS:
        raise MaskError(f"mask_convention must be one of {', '.join(MASK_CONVENTIONS)}; got {convention!r}")
    return convention


def load_mask(mask, what: str = "mask", convention: str = "auto") -> np.ndarray:
    """Any supported mask input -> bool numpy array [H, W] (True = region to edit).

    The one mask reader of lime_fast: ``lime_fast.edit``, ``LimeEngine.edit``, ``lime-fast edit``,
    batch manifests, ``lime-fast eval`` and the HTTP service all read masks here.

    **Files and PIL images** (any mode: 1, L, P, RGB, 16-bit, and with transparency LA, P, RGBA).
    ``convention`` (``mask_convention=`` / ``--mask-convention``) says how to read them:

    * ``"white"``: grayscale >= 128 is the region (white = edit: white-on-black masks, white paint);
      a pixel with alpha < 128 is never in it, whatever colour it hides.
    * ``"transparent"``: alpha < 128 is the region (DALL-E 2's editor and MagicBrush: the edit region
      is erased from an opaque picture). The mask must have an alpha channel.
    * ``"opaque"``: alpha >= 128 is the region (paint of any colour on a transparent canvas). The
      mask must have an alpha channel.
    * ``"auto"`` (default): a mask without a transparent pixel (no alpha channel, or alpha >= 128
      everywhere) reads as ``"white"``. With transparent pixels it reads as ``"transparent"``, except
      paint on a blank canvas: opaque pixels of one colour on at most half of the image, whose
      transparent pixels hide one colour (black, white or the paint's own), read as ``"opaque"``.
      Where both readings are plausible it warns (``InputWarning``) which one it used: dark paint
      (or a black backing around a hole larger than the rest?), one light colour over more than half
      of the image (a backing with a hole, or a large painted region?), and on a blank canvas a
      picture over less than half (a hole, or a cut-out?). A mask with an alpha channel but no
      transparent pixel whose grayscale covers more than ``MASK_FULL_SHARE`` of the image warns too
      (a transparency mask whose hole was lost reads so). Pictures that are themselves flat colours
      (synthetic shapes) can fool ``auto``: name the convention when it is known.

    16-bit and float pictures are scaled as for images (65535 -> 255).

    **Arrays** (numpy or torch, [H, W], [1, H, W] or [H, W, 1]): bool, integers (> 127 for uint8, else
    > 0) or floats (>= 0.5). Arrays have no convention: ``convention`` is checked but changes nothing.

    Raises ``MaskError`` for an unknown convention (or an alpha convention on a mask without alpha),
    ``FileNotFoundError`` / ``TypeError`` / ``ValueError`` for an unusable input.
    """
    check_mask_convention(convention)
    if isinstance(mask, (str, os.PathLike)):  # the file's own mode: the same rule as a PIL mask below
        img = _open(mask, what)
        return _mask_from_picture(img, f"{what} {mask}", convention)
    if isinstance(mask, PIL.Image.Image):
        return _mask_from_picture(_upright(mask), what, convention)
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


def _mask_from_picture(img: PIL.Image.Image, what: str, convention: str) -> np.ndarray:
    """A picture mask -> bool [H, W] by ``convention`` (the rule is ``load_mask``'s docstring)."""
    if img.width == 0 or img.height == 0:
        raise ValueError(f"{what}: the mask is empty ({img.width} x {img.height})")
    has_alpha = img.mode in _ALPHA_MODES or "transparency" in img.info
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"))
        rgb, alpha = rgba[..., :3], rgba[..., 3]
    else:  # 16-bit and float data: the image rule (65535 -> 255); other modes convert directly
        rgb, alpha = np.asarray(_to_rgb(img, what)), None
    gray = np.asarray(PIL.Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("L"))
    if convention in ("transparent", "opaque") and alpha is None:
        raise MaskError(f"{what}: mask_convention={convention!r} reads the alpha channel, but this {img.mode} mask "
                        "has none; use 'white' (or 'auto') for a mask without transparency")
    if convention == "transparent":
        return alpha < 128
    if convention == "opaque":
        return alpha >= 128
    visible = np.ones(gray.shape, bool) if alpha is None else alpha >= 128
    if convention == "white" or visible.all():
        region = (gray >= 128) & visible
        if convention == "auto" and alpha is not None and region.mean() > MASK_FULL_SHARE:
            warnings.warn(
                f"{what}: the mask has an alpha channel but no transparent pixel, so it was read as a grayscale "
                f"picture (white = edit), which covers {region.mean():.0%} of the image; if its region is marked by "
                "transparency, pass mask_convention='transparent' or 'opaque' (--mask-convention)",
                InputWarning, stacklevel=4)
        return region
    return _auto_alpha(rgb, visible, what)


def _one_colour(pixels: np.ndarray) -> np.ndarray | None:
    """The colour (median RGB) that ``_PAINT_SHARE`` of ``pixels`` [N, 3] lie within ``_PAINT_TOLERANCE`` of,
    or None when they are not one colour (or there are none)."""
    if len(pixels) == 0:
        return None
    pixels = pixels.astype(np.int16)
    colour = np.median(pixels, axis=0)
    near = np.abs(pixels - colour).max(axis=1) <= _PAINT_TOLERANCE
    return colour if near.mean() >= _PAINT_SHARE else None


def _auto_alpha(rgb: np.ndarray, opaque: np.ndarray, what: str) -> np.ndarray:
    """``auto`` for a mask with transparent pixels (the rule is ``load_mask``'s docstring): paint (opaque
    pixels of one colour over a blank canvas) on at most half of the image -> the opaque pixels;
    anything else -> the transparent ones. Warns where the other reading is plausible too."""
    share = float(opaque.mean())
    paint, hidden = _one_colour(rgb[opaque]), _one_colour(rgb[~opaque])
    # A blank canvas hides one colour: black, white (what editors store under erased pixels) or the
    # paint's own (alpha-only masks). Anything else under the transparent pixels is a picture with a hole.
    blank = hidden is not None and any(
        np.abs(hidden - c).max() <= _PAINT_TOLERANCE for c in ((0, 0, 0), (255, 255, 255), *(() if paint is None else (paint,))))
    if not blank:
        return ~opaque
    how = "pass mask_convention='transparent' or 'opaque' (--mask-convention) to choose"
    dark = paint is not None and paint.max() < 128
    if paint is not None and share <= 0.5:
        if dark:
            warnings.warn(
                f"{what}: dark opaque pixels of one colour on {share:.0%} of a transparent canvas were read as "
                f"paint marking the region (opaque = edit); if they are a backing around a transparent hole "
                f"(DALL-E 2 / MagicBrush), {how}", InputWarning, stacklevel=5)
        return opaque.copy()
    if paint is not None and not dark:
        warnings.warn(
            f"{what}: opaque pixels of one colour over {share:.0%} of the image were read as a backing with a "
            f"transparent hole: the transparent {1 - share:.0%} is the region (DALL-E 2 / MagicBrush); if the "
            f"colour is paint marking the region, {how}", InputWarning, stacklevel=5)
    elif paint is None and share < 0.5:
        warnings.warn(
            f"{what}: the transparent {1 - share:.0%} of the mask was read as the region (DALL-E 2 / MagicBrush: "
            f"transparent = edit) because its opaque pixels are not paint of one colour; if they mark the region "
            f"(a cut-out), {how}", InputWarning, stacklevel=5)
    return ~opaque


def check_instruction(instruction) -> str:
    """The instruction, stripped; TypeError/ValueError if it is not a non-empty string."""
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a string, got {type(instruction).__name__}")
    text = instruction.strip()
    if not text:
        raise ValueError("instruction is empty: say what to change, e.g. 'make her outfit black'")
    return text


def working_size(width: int, height: int, multiple: int, max_side: int, *, warn: bool = True) -> tuple[int, int]:
    """(width, height) at which the UNet runs: long side at most ``max_side``, each side a multiple
    of ``multiple`` (the VAE factor times the UNet's downsampling, 64 for SD 1.5), nearest multiple,
    at least one multiple. Warns (``LimeWarning``) when it shrinks the image, unless ``warn`` is False."""
    scale = min(1.0, max_side / max(width, height))
    if scale < 1.0 and warn:
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
    def build(cls, images, instructions, masks=None, *, multiple: int, cfg, trained_size: int | None = None,
              mask_convention: str = "auto") -> EditInputs:
        """Check and load a batch (raises naming the first problem; warns ``InputWarning`` on adjustments).

        images / instructions: equal-length sequences; masks: None or one entry (or None) per image, read
        by ``load_mask`` with ``mask_convention``. All edits are brought to the first image's working
        size. ``trained_size``: the side the model was trained at, if known; larger working sizes warn."""
        check_mask_convention(mask_convention)
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
        user = [None if m is None else load_mask(m, convention=mask_convention) for m in masks]
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
        The one place that warns about a mask's coverage (once per edit, whatever read it): empty on the
        grid (plain InstructPix2Pix) or over ``MASK_FULL_SHARE`` of the image."""
        grids = []
        for m in self.masks:
            g = None if m is None else _mask_to_grid(m, self.grid)
            if g is not None and not g.any():
                warnings.warn("the mask is empty: nothing is regularized, the edit is plain InstructPix2Pix", LimeWarning, stacklevel=4)
            elif g is not None and (g.all() or m.mean() > MASK_FULL_SHARE):
                warnings.warn(
                    f"the mask covers {max(m.mean(), g.mean()):.0%} of the image: unrelated tokens are silenced (nearly) "
                    "everywhere; if the mask marks its region another way, pass mask_convention= (--mask-convention: "
                    f"{', '.join(MASK_CONVENTIONS)})", LimeWarning, stacklevel=4)
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
