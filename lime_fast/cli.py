"""``lime-fast`` command line: ``edit`` one image, or run the offline ``demo``.

    lime-fast edit photo.jpg "make her outfit black" -o edited.png --save-roi roi/
    lime-fast demo --out lime_fast_demo

Every input is checked, and existing outputs are refused without --force, before any model loads.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import PIL.Image

from .config import DEFAULT_MODEL, EditConfig

PICTURES = ("roi", "overlay", "segments", "heatmap", "panel")


class UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lime-fast", description="Localized image editing (LIME) for InstructPix2Pix models.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("edit", help="edit one image")
    e.add_argument("image", help="input image file")
    e.add_argument("instruction", help='the edit, e.g. "make her outfit black"')
    e.add_argument("-o", "--output", required=True, help="output image file (.png, .jpg, ...)")
    e.add_argument("--mask", help="mask image of the region to edit (white = edit); skips localization")
    e.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local diffusers folder (default {DEFAULT_MODEL})")
    e.add_argument("--steps", type=int, default=30)
    e.add_argument("--seed", type=int, default=42)
    e.add_argument("--text-guidance", type=float, default=EditConfig.text_guidance)
    e.add_argument("--image-guidance", type=float, default=EditConfig.image_guidance)
    e.add_argument("--top-k", type=int, default=EditConfig.top_k)
    e.add_argument("--roi-words", nargs="+", help="words of the instruction to localize instead of the automatic ones")
    e.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    e.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="default float16 on CUDA, float32 on CPU")
    e.add_argument("--save-roi", metavar="DIR", help="write the RoI mask, overlay, segment map, heatmap and a panel as PNGs")
    e.add_argument("--force", action="store_true", help="overwrite existing output files")
    e.add_argument("--quiet", action="store_true", help="no progress bars")

    d = sub.add_parser("demo", help="run the whole pipeline offline on a small built-in model")
    d.add_argument("--out", default="lime_fast_demo", help="folder for the pictures (default ./lime_fast_demo)")
    d.add_argument("--force", action="store_true", help="overwrite existing pictures")
    d.add_argument("--quiet", action="store_true")
    return p


def _check_outputs(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise UsageError(f"refusing to overwrite {', '.join(existing)} (use --force)")


def _check_image_suffix(path: Path) -> None:
    if path.suffix.lower() not in PIL.Image.registered_extensions():
        raise UsageError(f"cannot tell the image format of '{path}' from its extension (use .png or .jpg)")


def _edit(args) -> int:
    import torch

    import lime_fast
    from .inputs import check_instruction, load_image, load_mask

    out = Path(args.output)
    _check_image_suffix(out)
    planned = [out] + ([Path(args.save_roi) / f"{n}.png" for n in PICTURES] if args.save_roi else [])
    _check_outputs(planned, args.force)
    cfg = EditConfig(
        steps=args.steps,
        seed=args.seed,
        text_guidance=args.text_guidance,
        image_guidance=args.image_guidance,
        top_k=args.top_k,
        roi_words=tuple(args.roi_words) if args.roi_words else None,
    )
    image = load_image(args.image)
    instruction = check_instruction(args.instruction)
    mask = load_mask(args.mask) if args.mask else None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    engine = lime_fast.get_engine(args.model, device=args.device, torch_dtype=dtype)
    result = engine.edit(image, instruction, mask=mask, progress=not args.quiet, config=cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)
    print(f"wrote {out}  (content words: {', '.join(result.tokens) or '-'}; RoI {result.roi_mask.mean():.1%} of the image; "
          f"{result.unet_evals} UNet evaluations, {result.timings['total']:.1f} s)")
    if args.save_roi:
        paths = result.save_pictures(args.save_roi)
        print("pictures: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    out = Path(args.out)
    _check_outputs([out / f"{n}.png" for n in ("input", "edited") + PICTURES], args.force)
    run_demo(out, progress=not args.quiet)
    return 0


def _quiet_libraries() -> None:
    # diffusers/transformers chatter (optional-dependency notes, weight-loading bars) would bury our own
    # progress bars and messages; their errors still surface as exceptions.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from .errors import LimeWarning, ModelLoadError

    show = warnings.showwarning

    def one_line(message, category, *rest, **kw):  # our warnings as 'warning: ...', others unchanged
        if issubclass(category, LimeWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("always", LimeWarning)
        warnings.showwarning = one_line
        try:
            return _edit(args) if args.command == "edit" else _demo(args)
        except (UsageError, ModelLoadError, FileNotFoundError, ValueError, TypeError) as e:
            print(f"lime-fast: error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
