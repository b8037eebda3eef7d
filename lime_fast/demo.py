"""``lime-fast demo``: the whole pipeline, offline, on a small model the package builds.

No weights can be assumed on a fresh machine, so the demo builds (once, into the lime_fast cache) a
tiny random-weight InstructPix2Pix pipeline with the real CLIP tokenizer. Its pictures show every
stage working (tokens, heatmap, segments, RoI, regularized edit); an untrained model cannot show
edit quality, and the demo says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

from .clip_bpe import cache_root

DEMO_INSTRUCTION = "make the red circle blue"
DEMO_MODEL_NAME = "tiny-random-ip2p-v1"


def shapes_image(size: int = 256, seed: int = 0) -> PIL.Image.Image:
    """A synthetic test picture: a red circle, a blue square and a green triangle on a textured floor."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    floor = np.stack([200 + 30 * x, 190 + 20 * y, 160 + 10 * np.sin(12 * x)], -1) + rng.normal(0, 4, (size, size, 3))
    img = PIL.Image.fromarray(np.clip(floor, 0, 255).astype(np.uint8))
    d = PIL.ImageDraw.Draw(img)
    s = size / 256
    d.ellipse([30 * s, 40 * s, 120 * s, 130 * s], fill=(215, 40, 40))
    d.rectangle([150 * s, 30 * s, 225 * s, 105 * s], fill=(40, 70, 200))
    d.polygon([(70 * s, 230 * s), (130 * s, 150 * s), (190 * s, 230 * s)], fill=(40, 160, 70))
    return img


def demo_model(progress: bool = True) -> Path:
    """Path of the demo checkpoint, built on first use under the lime_fast cache."""
    path = cache_root() / DEMO_MODEL_NAME
    if not (path / "model_index.json").is_file():
        from .tiny import save_tiny

        if progress:
            print(f"building the demo model (tiny, random weights) at {path} ...")
        tmp = path.with_name(path.name + ".partial")
        save_tiny(tmp, heads=8, seed=0)
        tmp.rename(path)
    return path


def run_demo(out_dir: str | Path, progress: bool = True):
    """Edit the synthetic picture with the demo model; write input, edited and RoI pictures to out_dir."""
    from . import get_engine

    model = demo_model(progress)
    engine = get_engine(str(model), device="cpu")
    n_params = sum(p.numel() for p in engine.unet.parameters()) / 1e6
    print(
        f"model: {DEMO_MODEL_NAME}, a tiny InstructPix2Pix-layout pipeline with RANDOM weights "
        f"(UNet {n_params:.1f} M parameters, real CLIP tokenizer), built at {model}.\n"
        "It shows every LIME stage running offline; an untrained model cannot show edit quality. "
        "For real edits use --model timbrooks/instruct-pix2pix with `lime-fast edit`."
    )
    image = shapes_image()
    result = engine.edit(image, DEMO_INSTRUCTION, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image.save(out / "input.png")
    result.image.save(out / "edited.png")
    paths = result.save_pictures(out)
    print(f'instruction: "{DEMO_INSTRUCTION}"; content words: {", ".join(result.tokens)}; '
          f"silenced inside the RoI: {', '.join(result.silenced) or '-'}")
    print(f"RoI: {result.roi_mask.mean():.1%} of the image; {result.unet_evals} UNet evaluations; "
          + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
    print(f"wrote {out / 'input.png'}, {out / 'edited.png'}, " + ", ".join(str(p) for p in paths.values()))
    return result
