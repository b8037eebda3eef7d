"""Pictures of what LIME decided: RoI overlay, segment map, heatmap, and a side-by-side panel."""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageDraw

# 16 well-separated colours for segment labels (label i -> PALETTE[i % 16]).
PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
        (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
        (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195),
    ],
    dtype=np.uint8,
)
# Anchors of a perceptually ordered dark-blue -> purple -> orange -> yellow map (values 0, .25, .5, .75, 1).
_HEAT_ANCHORS = np.array(
    [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64
)


def _resize(img: PIL.Image.Image, size: tuple[int, int] | None, resample=PIL.Image.NEAREST) -> PIL.Image.Image:
    return img if size is None or img.size == size else img.resize(size, resample)


def mask_image(mask: np.ndarray, size: tuple[int, int] | None = None) -> PIL.Image.Image:
    """bool [H, W] -> black/white 'L' image (white = RoI), optionally resized (nearest) to size=(W, H)."""
    return _resize(PIL.Image.fromarray(mask.astype(np.uint8) * 255, "L"), size)


def segment_image(labels: np.ndarray, size: tuple[int, int] | None = None) -> PIL.Image.Image:
    """int labels [gh, gw] -> RGB image, one palette colour per segment."""
    return _resize(PIL.Image.fromarray(PALETTE[labels.astype(np.int64) % len(PALETTE)], "RGB"), size)


def heatmap_image(heat: np.ndarray, size: tuple[int, int] | None = None) -> PIL.Image.Image:
    """float [gh, gw] -> RGB colour map (min..max of the map stretched to the full colour range)."""
    h = heat.astype(np.float64)
    span = h.max() - h.min()
    h = (h - h.min()) / span if span > 0 else np.zeros_like(h)
    pos = h * (len(_HEAT_ANCHORS) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(_HEAT_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _HEAT_ANCHORS[lo] * (1 - frac) + _HEAT_ANCHORS[lo + 1] * frac
    return _resize(PIL.Image.fromarray(rgb.round().astype(np.uint8), "RGB"), size, PIL.Image.BILINEAR)


def _grow(mask: np.ndarray) -> np.ndarray:
    """bool [H, W] -> the mask plus its 4-neighbours (no wrap-around at the borders)."""
    p = np.pad(mask, 1)
    return mask | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def overlay(image: PIL.Image.Image, mask: np.ndarray, color=(255, 40, 40), alpha: float = 0.45) -> PIL.Image.Image:
    """The image with the RoI tinted and outlined; mask bool [H, W] at any size (resized, nearest).

    The outline is two rings, white on the RoI's edge pixels and black just outside them, so it shows
    on any colour (a red outline vanishes on a red object)."""
    m = np.asarray(mask_image(mask, image.size)) > 127
    base = np.asarray(image.convert("RGB")).astype(np.float64)
    tint = np.array(color, dtype=np.float64)
    out = base.copy()
    out[m] = base[m] * (1 - alpha) + tint * alpha
    out[m & _grow(~m)] = 255.0  # the RoI's own edge (pixels with a neighbour outside it)
    out[_grow(m) & ~m] = 0.0  # the ring just outside
    return PIL.Image.fromarray(out.round().astype(np.uint8), "RGB")


def panel(images: list[tuple[str, PIL.Image.Image]], height: int = 256) -> PIL.Image.Image:
    """Captioned side-by-side strip of (caption, image) pairs, each scaled to ``height`` pixels."""
    tiles = [(c, im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height), PIL.Image.LANCZOS)) for c, im in images]
    pad, caption = 6, 18
    width = sum(t.width for _, t in tiles) + pad * (len(tiles) + 1)
    out = PIL.Image.new("RGB", (width, height + caption + 2 * pad), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(out)
    x = pad
    for c, t in tiles:
        out.paste(t, (x, pad + caption))
        draw.text((x, pad), c, fill=(0, 0, 0))
        x += t.width + pad
    return out
