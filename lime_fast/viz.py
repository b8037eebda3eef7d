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


def _label_cell(cells: np.ndarray) -> np.ndarray:
    """(row, col) of the cell of ``cells`` [N, 2] nearest their centroid: a segment's number is drawn on the
    segment itself even when the segment is not convex (its centroid may lie outside it)."""
    centre = cells.mean(0)
    return cells[np.argmin(((cells - centre) ** 2).sum(1))]


def segment_id_image(labels: np.ndarray, size: tuple[int, int] | None = None, roi: np.ndarray | None = None,
                     min_side: int = 384) -> PIL.Image.Image:
    """The segment map with each segment's id written on it, and a legend below, for choosing segments by id
    (``EditResult.refine``, ``lime-fast edit --session DIR --add 3``).

    labels: int [gh, gw]; size: (W, H) of the input (the map is drawn at that shape, enlarged so its long
    side is at least ``min_side`` pixels, nearest, so the numbers are readable on a small input); roi: bool
    [gh, gw] or None, for the legend's share of each segment inside the RoI. Numbers use PIL's default
    font, black on a white box at the segment's cell nearest its centroid; the legend lists id, colour,
    share of the image and share in the RoI."""
    gh, gw = labels.shape
    w, h = size if size is not None else (gw, gh)
    scale = max(1.0, min_side / max(w, h))
    w, h = round(w * scale), round(h * scale)
    ids = [int(i) for i in np.unique(labels)]
    row_h, pad = 16, 6
    out = PIL.Image.new("RGB", (w, h + pad + row_h * len(ids) + pad), (255, 255, 255))
    out.paste(segment_image(labels, (w, h)), (0, 0))
    draw = PIL.ImageDraw.Draw(out)
    for i in ids:
        r, c = _label_cell(np.argwhere(labels == i))
        x, y = (c + 0.5) * w / gw, (r + 0.5) * h / gh
        box = draw.textbbox((x, y), str(i), anchor="mm")
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(255, 255, 255), outline=(0, 0, 0))
        draw.text((x, y), str(i), fill=(0, 0, 0), anchor="mm")
    for k, i in enumerate(ids):
        y = h + pad + k * row_h
        draw.rectangle((pad, y + 2, pad + 12, y + 12), fill=tuple(int(v) for v in PALETTE[i % len(PALETTE)]), outline=(0, 0, 0))
        cells = labels == i
        text = f"segment {i}: {cells.mean():.0%} of the image"
        if roi is not None:
            text += f", {roi[cells].mean():.0%} in the RoI"
        draw.text((pad + 18, y + 1), text, fill=(0, 0, 0))
    return out
