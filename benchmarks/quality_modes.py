"""Fidelity of the faster modes on the shipped shapes model's quality benchmark (the CPU part of issue 14).

    python benchmarks/quality_modes.py --n 200 --out quality_modes      # ~40 min on this 2-core CPU
    python benchmarks/quality_modes.py --n 32 --intervals 2             # a quick look

The same held-out edits as ``benchmarks/quality.py`` (seeds from 5,000,000, MagicBrush's layout, the
shapes model's ``SHAPES_CONFIG``, batches of 8), through ``lime-fast eval``, for:

  faithful engine (``cache_kv=False``: every fast mode off)
      lime, lime-mask                              the reference
      lime:cache_interval=N, lime-mask:cache_interval=N   step caching (``--intervals``, default 2 3)
  exact-math engine (the K/V cache, fused QKV and channels-last together)
      lime, lime-mask

For every mode it reports the metrics (L1 inside / outside the true region, IoU of the automatic RoI),
their difference from the faithful method, and the bar of issue 14: a mode may not be worse than the
faithful path by more than the block-to-block spread, here the range (max - min) of the faithful
method's mean over blocks of 16 consecutive edits. And the images themselves: how many are
bit-identical to the faithful ones, max / mean pixel difference (0-1), PSNR.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

BLOCK = 16
WORSE_IF_HIGHER = {"l1_in": True, "l1_out": True, "roi_iou": False}


def _blocks(samples: list[dict], metric: str) -> list[float]:
    xs = [x[metric] for x in sorted(samples, key=lambda x: x["id"]) if x[metric] is not None]
    return [float(np.mean(xs[i : i + BLOCK])) for i in range(0, len(xs) - BLOCK + 1, BLOCK)]


def _image_diff(out_a: Path, out_b: Path, samples_a: list[dict], samples_b: list[dict]) -> dict:
    from lime_fast.evaluate import metrics as M

    by_id = {x["id"]: x for x in samples_b if x["image"]}
    same, maxes, means, mses = 0, [], [], []
    for x in samples_a:
        y = by_id.get(x["id"])
        if not x["image"] or y is None:
            continue
        a, b = M.load_rgb(out_a / x["image"]), M.load_rgb(out_b / y["image"])
        d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / 255
        same += int(d.max() == 0)
        maxes.append(d.max())
        means.append(d.mean())
        mses.append((d**2).mean())
    mse = float(np.mean(mses)) if mses else 0.0
    return {"n": len(maxes), "identical": same, "max_diff": float(max(maxes, default=0.0)),
            "mean_diff": float(np.mean(means)) if means else 0.0,
            "psnr_db": math.inf if mse == 0 else 10 * math.log10(1 / mse)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="held-out edits (default 200)")
    ap.add_argument("--first-seed", type=int, default=5_000_000)
    ap.add_argument("--intervals", type=int, nargs="*", default=[2, 3], help="cache_interval values (default 2 3)")
    ap.add_argument("--mask-intervals", type=int, nargs="*", default=None,
                    help="cache_interval values for lime-mask (default: --intervals)")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact-math engine (K/V cache, fused QKV, channels-last)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="quality_modes")
    args = ap.parse_args(argv)

    from lime_fast import LimeEngine, evaluate
    from lime_fast.demo import SHAPES_CONFIG, shapes_model
    from lime_fast.testing.shapes import write_magicbrush

    out = Path(args.out)
    data_dir = out / "data"
    if not (data_dir / "edit_sessions.json").is_file():
        write_magicbrush(data_dir, range(args.first_seed, args.first_seed + args.n))
    data = evaluate.load(data_dir, out)
    model = str(shapes_model())
    mask_intervals = args.intervals if args.mask_intervals is None else args.mask_intervals
    cached = [f"lime:cache_interval={n}" for n in args.intervals] + [f"lime-mask:cache_interval={n}" for n in mask_intervals]
    runs = {"faithful": ({"cache_kv": False}, ["lime", "lime-mask"] + cached)}
    if not args.no_exact:
        runs["exact"] = ({"fuse_qkv": True, "channels_last": True}, ["lime", "lime-mask"])
    evs, t0 = {}, time.perf_counter()
    for name, (opts, methods) in runs.items():
        engine = LimeEngine.from_pretrained(model, device="cpu", **opts)
        evs[name] = evaluate.evaluate(data, out / name, model=engine, methods=methods, settings=("single",),
                                      config=dict(SHAPES_CONFIG), batch_size=args.batch, progress=True)
    secs = time.perf_counter() - t0

    ref = evs["faithful"]
    lines = [f"Fidelity of the faster modes, shapes-ip2p, {args.n} held-out edits (seeds {args.first_seed}..), "
             f"SHAPES_CONFIG, batches of {args.batch}, {secs:.0f} s:", "",
             "| mode | method | L1 inside | L1 outside | RoI IoU | worse than faithful by (in / out / IoU) | bar: faithful's "
             "block spread (in / out / IoU) | within the bar | identical images | max / mean pixel diff | PSNR |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def samples(ev, spec):
        return [x for x in ev.samples if x["method"] == spec and x["status"] == "done"]

    for run, ev in evs.items():
        for spec in runs[run][1]:
            base = spec.split(":")[0]
            xs, ys = samples(ev, spec), samples(ref, base)
            means = {k: float(np.mean([x[k] for x in xs if x[k] is not None])) if any(x[k] is not None for x in xs) else None
                     for k in WORSE_IF_HIGHER}
            refm = {k: float(np.mean([y[k] for y in ys if y[k] is not None])) if any(y[k] is not None for y in ys) else None
                    for k in WORSE_IF_HIGHER}
            worse, bar, ok = {}, {}, True
            for k, higher in WORSE_IF_HIGHER.items():
                if means[k] is None:
                    continue
                worse[k] = (means[k] - refm[k]) if higher else (refm[k] - means[k])
                b = _blocks(ys, k)
                bar[k] = (max(b) - min(b)) if len(b) > 1 else float("nan")
                ok &= worse[k] <= bar[k] if not math.isnan(bar[k]) else True
            img = _image_diff(out / run, out / "faithful", xs, ys)
            fmt = lambda d: " / ".join(f"{d[k]:+.4f}" if k in d else "-" for k in WORSE_IF_HIGHER)  # noqa: E731
            fmt_bar = lambda d: " / ".join(f"{d[k]:.4f}" if k in d else "-" for k in WORSE_IF_HIGHER)  # noqa: E731
            reference = run == "faithful" and ":" not in spec
            lines.append(
                f"| {run} | {spec} | {means['l1_in']:.4f} | {means['l1_out']:.4f} | "
                + (f"{means['roi_iou']:.3f}" if means["roi_iou"] is not None else "-")
                + (" | (reference) | | | | | |" if reference else
                   f" | {fmt(worse)} | {fmt_bar(bar)} | {'yes' if ok else 'NO'} | {img['identical']}/{img['n']} | "
                   f"{img['max_diff']:.4f} / {img['mean_diff']:.5f} | "
                   + ("identical" if math.isinf(img['psnr_db']) else f"{img['psnr_db']:.1f} dB") + " |"))
    text = "\n".join(lines)
    print(text)
    (out / "fidelity.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
