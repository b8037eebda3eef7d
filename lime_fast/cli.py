"""``lime-fast`` command line: ``edit`` one image, ``batch`` a JSONL manifest, or run the offline ``demo``.

    lime-fast edit photo.jpg "make her outfit black" -o edited.png --save-roi roi/
    lime-fast batch edits.jsonl --out results/ [--ray --workers 4]
    lime-fast demo --out lime_fast_demo

Every input is checked, and existing outputs are refused without --force, before any model loads.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import PIL.Image

from .config import DEFAULT_MODEL, EditConfig
from .serve import cli as serve_cli

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

    b = sub.add_parser("batch", help="edit every row of a JSONL manifest into a folder (resumable; --ray for Ray)",
                       description="Edit every row of a JSONL manifest ({id, image, instruction[, mask][, EditConfig "
                       "fields]} per line) into DIR/images/{id}.png, recording each row in DIR/results.jsonl. "
                       "Re-running skips rows already done. Exit status 1 when rows failed in this run.")
    b.add_argument("manifest", help="JSONL file, one edit per line")
    b.add_argument("--out", required=True, metavar="DIR", help="output folder (images/, roi/, results.jsonl)")
    b.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local diffusers folder (default {DEFAULT_MODEL})")
    b.add_argument("--steps", type=int, default=30, help="job default; a row's own fields override the job's")
    b.add_argument("--seed", type=int, default=42)
    b.add_argument("--text-guidance", type=float, default=EditConfig.text_guidance)
    b.add_argument("--image-guidance", type=float, default=EditConfig.image_guidance)
    b.add_argument("--top-k", type=int, default=EditConfig.top_k)
    b.add_argument("--batch-size", type=int, default=1,
                   help="rows per UNet batch (same size and config); >1 is for GPU throughput and may change the last bit")
    b.add_argument("--save-roi", action="store_true", help="also write each RoI mask to DIR/roi/{id}.png")
    b.add_argument("--strict", action="store_true", help="refuse to start if any row is bad (default: record it as failed)")
    b.add_argument("--retry-failed", action="store_true", help="run again the rows recorded as failed")
    b.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    b.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="default float16 on CUDA, float32 on CPU")
    b.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's; Ray: CPUs per worker)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--ray", action="store_true", help="run on Ray Data (needs: pip install 'lime-fast[ray]')")
    b.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    b.add_argument("--workers", type=int, default=1, help="Ray workers, each loading the model once (default 1)")
    b.add_argument("--num-gpus-per-worker", type=float, help="default 1 when the Ray cluster has GPUs, else 0")
    b.add_argument("--num-cpus-per-worker", type=float, default=1)

    d = sub.add_parser("demo", help="a real edit, offline, with the small shapes model that ships with lime_fast")
    d.add_argument("--out", default="lime_fast_demo", help="folder for the pictures (default ./lime_fast_demo)")
    d.add_argument("--force", action="store_true", help="overwrite existing pictures")
    d.add_argument("--quiet", action="store_true")
    serve_cli.add_parser(sub)
    return p


def _check_outputs(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise UsageError(f"refusing to overwrite {', '.join(existing)} (use --force)")


def _check_image_suffix(path: Path) -> None:
    if path.suffix.lower() not in PIL.Image.registered_extensions():
        raise UsageError(f"cannot tell the image format of '{path}' from its extension (use .png or .jpg)")


def _config(args) -> EditConfig:
    """The EditConfig the common edit options describe (validated: bad values raise here)."""
    roi_words = getattr(args, "roi_words", None)
    return EditConfig(
        steps=args.steps,
        seed=args.seed,
        text_guidance=args.text_guidance,
        image_guidance=args.image_guidance,
        top_k=args.top_k,
        roi_words=tuple(roi_words) if roi_words else None,
    )


def _edit(args) -> int:
    import torch

    import lime_fast
    from .inputs import check_instruction, load_image, load_mask

    out = Path(args.output)
    _check_image_suffix(out)
    planned = [out] + ([Path(args.save_roi) / f"{n}.png" for n in PICTURES] if args.save_roi else [])
    _check_outputs(planned, args.force)
    cfg = _config(args)
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


def _batch(args) -> int:
    import torch

    from . import batch

    cfg = _config(args)
    if args.batch_size < 1 or args.workers < 1 or (args.threads is not None and args.threads < 1):
        raise UsageError("--batch-size, --workers and --threads must be >= 1")
    if args.ray:
        import logging

        try:
            import ray.data
        except ImportError:
            pass  # batch.run says which extra to install
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # our bar reports progress
    try:
        summary = batch.run(
            args.manifest,
            args.out,
            model=args.model,
            config=cfg,
            batch_size=args.batch_size,
            save_roi=args.save_roi,
            strict=args.strict,
            retry_failed=args.retry_failed,
            device=args.device,
            torch_dtype=getattr(torch, args.dtype) if args.dtype else None,
            threads=args.threads,
            progress=not args.quiet,
            ray=args.ray,
            ray_address=args.ray_address,
            workers=args.workers,
            num_gpus_per_worker=args.num_gpus_per_worker,
            num_cpus_per_worker=args.num_cpus_per_worker,
        )
    except batch.BatchError as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        print(f"lime-fast: interrupted; finished rows are recorded in {Path(args.out) / batch.RESULTS}: "
              "re-run the same command to do the rest", file=sys.stderr)
        return 130
    if args.quiet:  # otherwise they were shown as they happened
        for line in summary.failures[:20]:
            print(f"failed: {line}", file=sys.stderr)
        if len(summary.failures) > 20:
            print(f"... and {len(summary.failures) - 20} more failed rows (see {summary.results})", file=sys.stderr)
    print(summary)
    return 0 if summary.failed == 0 else 1


def _demo(args) -> int:
    from .demo import run_demo

    out = Path(args.out)
    _check_outputs([out / f"{n}.png" for n in ("input", "target", "edited") + PICTURES], args.force)
    run_demo(out, progress=not args.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .models import quiet_libraries

    quiet_libraries()
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
            return {"edit": _edit, "batch": _batch, "demo": _demo, "serve": serve_cli.run}[args.command](args)
        except (UsageError, ModelLoadError, FileNotFoundError, ValueError, TypeError) as e:
            print(f"lime-fast: error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
