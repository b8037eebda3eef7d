"""Edit quality on held-out synthetic shapes: plain InstructPix2Pix vs lime_fast (automatic RoI and true mask).

    python benchmarks/quality.py                       # 200 held-out edits with the shipped shapes model
    python benchmarks/quality.py --n 24 --grid grid.png --json out.json

Data: ``lime_fast.testing.shapes.make_sample(seed, 64)`` for seeds from ``--first-seed`` (default 5,000,000;
training drew seeds below 1,200,000, so these are held out). Every sample has a source, the exact
target of its instruction and the true edit region.

Methods, same model, same seed, same sampler:
  base     plain InstructPix2Pix sampling at lime_fast's edit guidance (the shapes model's config: text
           3.0, image 1.5): the ablation, lime_fast with an all-False RoI (bit-identical to diffusers' pipeline on the CPU,
           tests/test_engine.py)
  default  plain InstructPix2Pix at diffusers' default guidance (text 7.5, image 1.5): what a user of
           the base model runs, and the baseline LIME is compared with
  lime     lime_fast with the automatic RoI (the localization pass, k-means, top-k)
  gt       lime_fast with the true edit region as the RoI (an upper bound for localization)

Metrics on [0, 1] RGB, against the target image (MagicBrush's pixel metrics): L1 (mean absolute
error) and L2 (mean squared error) over the whole image; L1 inside the true region (did the edit
happen?); L1 outside it (what LIME exists to lower); for ``lime``, the IoU of the automatic RoI with
the true region. The table reports means over the samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("base", "default", "lime", "gt")
FIRST_SEED = 5_000_000
DEFAULT_TEXT_GUIDANCE = 7.5  # StableDiffusionInstructPix2PixPipeline's guidance_scale default (diffusers 0.42)
LABELS = {
    "base": "InstructPix2Pix, lime_fast's guidance",
    "default": "InstructPix2Pix, default guidance (7.5)",
    "lime": "lime_fast, automatic RoI",
    "gt": "lime_fast, true region as RoI",
}


def edit_metrics(out: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """out, target: uint8 [H, W, 3]; mask: bool [H, W] true edit region."""
    err = np.abs(out.astype(np.float64) - target.astype(np.float64)) / 255.0
    m = {"l1": float(err.mean()), "l2": float((err**2).mean())}
    m["l1_in"] = float(err[mask].mean()) if mask.any() else float("nan")
    m["l1_out"] = float(err[~mask].mean()) if (~mask).any() else float("nan")
    return m


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def evaluate(engine, seeds, *, size: int = 64, batch: int = 8, progress: bool = True, **config) -> list[dict]:
    """Run the methods (``METHODS``) on ``make_sample(seed, size)`` for each seed; one record per sample.

    config: EditConfig fields (defaults: ``lime_fast.demo.SHAPES_CONFIG``). Samples are edited
    ``batch`` at a time, each method in its own ``edit_batch`` call.
    """
    from lime_fast.demo import SHAPES_CONFIG
    from lime_fast.errors import LimeWarning
    from lime_fast.testing.shapes import make_sample

    cfg = {**SHAPES_CONFIG, **config}
    seeds = list(seeds)
    records, t0 = [], time.perf_counter()
    for start in range(0, len(seeds), batch):
        chunk = [make_sample(s, size) for s in seeds[start : start + batch]]
        srcs, texts = [c.source for c in chunk], [c.instruction for c in chunk]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LimeWarning)  # the all-False masks of "base" warn by design
            none = [np.zeros_like(c.mask) for c in chunk]
            outs = {
                "base": engine.edit_batch(srcs, texts, masks=none, progress=False, **cfg),
                "default": engine.edit_batch(srcs, texts, masks=none, progress=False,
                                             **{**cfg, "text_guidance": DEFAULT_TEXT_GUIDANCE}),
                "lime": engine.edit_batch(srcs, texts, progress=False, **cfg),
                "gt": engine.edit_batch(srcs, texts, masks=[c.mask for c in chunk], progress=False, **cfg),
            }
        for i, c in enumerate(chunk):
            tgt = np.asarray(c.target)
            rec = {"seed": c.meta.get("seed"), "kind": c.kind, "instruction": c.instruction, "area": float(c.mask.mean())}
            for name in METHODS:
                rec[name] = edit_metrics(np.asarray(outs[name][i].image), tgt, c.mask)
            rec["iou"] = iou(outs["lime"][i].roi_mask, c.mask)
            rec["tokens"] = outs["lime"][i].tokens
            rec["_images"] = {name: outs[name][i].image for name in METHODS}
            rec["_roi"] = outs["lime"][i].roi_mask
            rec["_sample"] = c
            records.append(rec)
        if progress:
            done = len(records)
            print(f"  {done}/{len(seeds)} samples, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return records


def summary(records: list[dict]) -> dict[str, dict[str, float]]:
    """Means per method and metric, plus the automatic RoI's IoU."""
    out = {}
    for name in METHODS:
        out[name] = {k: float(np.nanmean([r[name][k] for r in records])) for k in ("l1", "l2", "l1_in", "l1_out")}
    out["lime"]["iou"] = float(np.mean([r["iou"] for r in records]))
    out["gt"]["iou"] = 1.0
    return out


def table(records: list[dict]) -> str:
    s = summary(records)
    lines = [f"{len(records)} held-out edits (lower is better except IoU)", "",
             "| method | L1 | L2 | L1 inside | L1 outside | RoI IoU |", "|---|---|---|---|---|---|"]
    for name in METHODS:
        m = s[name]
        iou_s = f"{m['iou']:.3f}" if name == "lime" else ("(given)" if name == "gt" else "-")
        lines.append(f"| {LABELS[name]} | {m['l1']:.4f} | {m['l2']:.4f} | {m['l1_in']:.4f} | {m['l1_out']:.4f} | {iou_s} |")
    kinds = sorted({r["kind"] for r in records})
    cols = [(m, k) for k in ("l1_in", "l1_out") for m in ("base", "default", "lime")]
    lines += ["", "| kind | n | " + " | ".join(f"{m} {k.replace('l1_', 'L1 ')}" for m, k in cols) + " | IoU |",
              "|---|---|" + "---|" * (len(cols) + 1)]
    for k in kinds:
        rs = [r for r in records if r["kind"] == k]
        cells = [f"{np.nanmean([r[m][key] for r in rs]):.4f}" for m, key in cols]
        lines.append(f"| {k} | {len(rs)} | " + " | ".join(cells) + f" | {np.mean([r['iou'] for r in rs]):.3f} |")
    return "\n".join(lines)


def example_grid(records: list[dict], path: str | Path, rows: int = 6, scale: int = 3) -> Path:
    """A PNG: per row input | target | IP2P at lime_fast's guidance | IP2P at 7.5 | lime_fast | RoI overlay |
    true region. Rows take the edit kinds in turn (first record of each kind, then the second, ...)."""
    import PIL.Image
    import PIL.ImageDraw

    from lime_fast import viz

    by_kind: dict[str, list[dict]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    turns = [group[i] for i in range(len(records)) for group in by_kind.values() if i < len(group)]
    picked = turns[:rows]
    cols = ["input", "target", "IP2P, same guidance", f"IP2P, {DEFAULT_TEXT_GUIDANCE}", "lime_fast", "auto RoI", "true region"]
    tiles = []
    for r in picked:
        c = r["_sample"]
        tiles.append([c.source, c.target, r["_images"]["base"], r["_images"]["default"], r["_images"]["lime"],
                      viz.overlay(c.source, r["_roi"]), viz.mask_image(c.mask)])
    w, h = (tiles[0][0].width * scale, tiles[0][0].height * scale)
    head, text_h = 16, 14
    sheet = PIL.Image.new("RGB", (w * len(cols), head + len(picked) * (h + text_h)), "white")
    d = PIL.ImageDraw.Draw(sheet)
    for j, name in enumerate(cols):
        d.text((j * w + 4, 2), name, fill="black")
    for i, (r, row) in enumerate(zip(picked, tiles)):
        y = head + i * (h + text_h)
        d.text((4, y), f'"{r["instruction"]}"  (IoU {r["iou"]:.2f})', fill="black")
        for j, im in enumerate(row):
            sheet.paste(im.convert("RGB").resize((w, h), PIL.Image.NEAREST), (j * w, y + text_h))
    path = Path(path)
    sheet.save(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="diffusers folder (default: the shipped shapes model)")
    ap.add_argument("--n", type=int, default=200, help="held-out samples (default 200)")
    ap.add_argument("--first-seed", type=int, default=FIRST_SEED)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", help="write per-sample records and the summary here")
    ap.add_argument("--grid", help="write an example grid (PNG) here")
    args = ap.parse_args(argv)

    from lime_fast import LimeEngine
    from lime_fast.demo import shapes_model

    model = args.model or str(shapes_model())
    engine = LimeEngine.from_pretrained(model, device="cpu")
    t0 = time.perf_counter()
    records = evaluate(engine, range(args.first_seed, args.first_seed + args.n), batch=args.batch)
    print(table(records))
    from lime_fast.demo import SHAPES_CONFIG

    print(f"\n({time.perf_counter() - t0:.0f} s on {engine.device}; model {model}; config {SHAPES_CONFIG}, "
          f"default = text guidance {DEFAULT_TEXT_GUIDANCE})")
    if args.json:
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
        Path(args.json).write_text(json.dumps({"summary": summary(records), "records": clean}, indent=1))
    if args.grid:
        print(f"wrote {example_grid(records, args.grid)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
