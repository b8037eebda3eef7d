"""``lime-fast eval``: the MagicBrush evaluation from the command line (see ``lime_fast.evaluate``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import add_config_args, add_mask_convention_arg, config_overrides
from ..config import DEFAULT_MODEL
from .run import METHODS, SETTINGS

DESCRIPTION = """\
Edit every turn of an editing benchmark with each method and score the outputs as MagicBrush's
official evaluation does (L1, L2, CLIP-I, CLIP-T, DINO; single-turn: every turn from its ground-truth
input; multi-turn: each turn from the previous output, final turn vs final target). DATA is
MagicBrush's test folder (edit_sessions.json, images/), MagicBrush parquet file(s) from Hugging Face
(osunlp/MagicBrush), or a JSONL manifest (batch rows plus "target", optional "caption", "session",
"turn"). Outputs go to DIR/<method>/images (resumable: re-run the same command after a kill), reports
to DIR/samples.csv, summary.md, summary.json and grid.png. CLIP and DINO metrics need local model
folders (--clip, --dino); without them only the pixel metrics are computed."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="MagicBrush-style evaluation: L1, L2, CLIP-I, CLIP-T, DINO (resumable)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="MagicBrush test folder, parquet file(s)/folder, or JSONL manifest with targets")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (edits, records, reports)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local diffusers folder or shipped model name (default {DEFAULT_MODEL})")
    p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                   help="ip2p (plain InstructPix2Pix), lime (automatic RoI), lime-mask (the dataset's masks); each may "
                   "take EditConfig overrides: ip2p:text_guidance=7.5 (default: all three)")
    p.add_argument("--turns", nargs="+", default=list(SETTINGS), choices=SETTINGS, help="settings to run (default both)")
    p.add_argument("--clip", metavar="PATH", help="local folder of CLIP ViT-B/32 (openai/clip-vit-base-patch32) for CLIP-I and CLIP-T")
    p.add_argument("--dino", metavar="PATH", help="local folder of DINO ViT-S/16 (facebook/dino-vits16) for DINO")
    p.add_argument("--captions", metavar="FILE", help="caption file for CLIP-T (default: the data's local_descriptions.json)")
    p.add_argument("--split", help="parquet: only files named SPLIT-*.parquet (e.g. dev)")
    add_mask_convention_arg(p, what="; the dataset's masks (MagicBrush's: transparent = edit, which auto finds); "
                            "default auto")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N sessions")
    p.add_argument("--batch-size", type=int, default=1, help="edits per UNet batch (>1 for GPU throughput; may change the last bit)")
    p.add_argument("--retry-failed", action="store_true", help="redo the edits recorded as failed")
    p.add_argument("--paper", choices=("auto", "yes", "no"), default="auto",
                   help="show the LIME paper's MagicBrush numbers beside ours (auto: MagicBrush data, all of it, a model "
                   "that is not a shipped one, and both --clip and --dino)")
    p.add_argument("--grid-rows", type=int, default=4, help="worst and best edits each in grid.png (default 4)")
    p.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_args(p)
    return p


def run(args) -> int:
    from ..cli import UsageError
    from ..errors import BatchError
    from ..models import shipped
    from . import datasets, report
    from .run import evaluate, parse_method

    if args.batch_size < 1 or (args.limit is not None and args.limit < 1) or (args.threads is not None and args.threads < 1):
        raise UsageError("--batch-size, --limit and --threads must be >= 1")
    try:
        methods = [parse_method(m) for m in args.methods]
        cfg = config_overrides(args)
        from .run import base_config

        from .run import check_methods

        check_methods(base_config(args.model, cfg), methods)  # bad fields or values fail here, before any work
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"the output folder {out} exists and is not a folder")
        data = datasets.load(args.data, out, split=args.split, captions=args.captions, progress=not args.quiet,
                             mask_convention=args.mask_convention)
        if args.limit:
            data.sessions = data.sessions[: args.limit]
        for line in data.problems[:10]:
            print(f"left out: {line}", file=sys.stderr)
        if len(data.problems) > 10:
            print(f"... and {len(data.problems) - 10} more left out", file=sys.stderr)
        import torch

        ev = evaluate(data, out, model=args.model, methods=methods, settings=args.turns, config=cfg,
                      batch_size=args.batch_size, retry_failed=args.retry_failed, clip=args.clip, dino=args.dino,
                      device=args.device, torch_dtype=getattr(torch, args.dtype) if args.dtype else None,
                      threads=args.threads, progress=not args.quiet)
    except BatchError as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        print(f"lime-fast: interrupted; finished edits are recorded in {args.out}: re-run the same command to do the rest",
              file=sys.stderr)
        return 130
    paper = args.paper == "yes" or (
        args.paper == "auto" and data.layout in ("magicbrush", "huggingface") and not args.limit
        and shipped(args.model) is None and args.clip is not None and args.dino is not None)
    paths = report.write(ev, paper=paper, grid_rows=args.grid_rows)
    print(report.markdown(ev, paper))
    print("reports: " + ", ".join(str(p) for p in paths.values()))
    return 0 if ev.failed == 0 else 1
