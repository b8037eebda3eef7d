"""Draws docs/mask_conventions.png: the two mask conventions side by side and the region each yields
under mask_convention="auto" (run from the repository root: python scripts/mask_conventions_png.py)."""

import numpy as np
import PIL.Image
import PIL.ImageDraw

from lime_fast.inputs import load_mask

S, PAD, TOP = 96, 8, 18


def checker(alpha: np.ndarray, rgb: np.ndarray) -> PIL.Image.Image:
    """An RGBA mask shown over a gray checkerboard, as editors show transparency."""
    yy, xx = np.mgrid[:S, :S]
    board = np.where(((yy // 8 + xx // 8) % 2)[..., None] == 0, 200, 150).astype(np.float64) * np.ones(3)
    a = alpha[..., None] / 255.0
    return PIL.Image.fromarray((rgb * a + board * (1 - a)).astype(np.uint8))


def main() -> None:
    rng = np.random.default_rng(0)
    region = np.zeros((S, S), bool)
    region[24:64, 30:78] = True
    yy, xx = np.mgrid[:S, :S]
    photo = np.dstack([xx * 2 + 40, yy * 2 + 30, 160 + 0 * xx]).clip(0, 255) + rng.integers(-25, 25, (S, S, 3))
    photo = photo.clip(0, 255).astype(np.uint8)
    dalle = np.dstack([photo, np.where(region, 0, 255).astype(np.uint8)])
    paint = np.zeros((S, S, 4), np.uint8)
    paint[region] = 255
    panels = [("transparent = edit (DALL-E 2)", dalle), ("paint = edit", paint)]
    out = PIL.Image.new("RGB", (2 * (2 * S + 3 * PAD) + PAD, S + TOP + 2 * PAD + 14), "white")
    draw = PIL.ImageDraw.Draw(out)
    for k, (title, rgba) in enumerate(panels):
        x0 = PAD + k * (2 * S + 3 * PAD)
        draw.text((x0, 4), title, fill="black")
        out.paste(checker(rgba[..., 3], rgba[..., :3].astype(np.float64)), (x0, TOP))
        got = load_mask(PIL.Image.fromarray(rgba, "RGBA"))
        out.paste(PIL.Image.fromarray(np.where(got, 255, 40).astype(np.uint8)).convert("RGB"), (x0 + S + PAD, TOP))
        draw.text((x0, TOP + S + 4), "mask file", fill="black")
        draw.text((x0 + S + PAD, TOP + S + 4), "region (auto)", fill="black")
    out.save("docs/mask_conventions.png")


if __name__ == "__main__":
    main()
