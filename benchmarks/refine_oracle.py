"""How much of LIME's localization gap one click recovers: the automatic edit, the same edit refined once
(and twice) by an oracle that knows the true region, and the edit with the true region as the mask.

    python benchmarks/refine_oracle.py                                  # 200 held-out edits, shipped shapes-ip2p
    python benchmarks/refine_oracle.py --n 100 --threads 1 --out oracle.json --figure docs/refine_oracle.png

Data and protocol: benchmarks/quality.py's held-out edits (``make_sample(seed, 64)`` for seeds from
``quality.FIRST_SEED``, 5,000,000), the model's own settings (``SHAPES_CONFIG``; the seed is
``EditConfig``'s default, the same for every method of an edit). Methods, per edit:

  auto      ``engine.edit(source, instruction)``: the automatic RoI (localization pass, k-means, top-k)
  click1    ``auto.refine(add=[a], remove=[r])`` with the oracle's picks on auto's RoI (``oracle_click``)
  click2    the oracle once more on click1's RoI (the same segment map): a second click
  true      ``engine.edit(source, instruction, mask=true_mask)``: the true region as the RoI

The oracle works in grid cells (``result.segments`` / ``result.roi_grid``); the true mask is brought to
the grid with ``lime_fast.evaluate.metrics.resize_mask`` (PIL nearest: the resize quality.py scores masks
with, and the same as the engine's own ``inputs._mask_to_grid`` for a user mask). See ``oracle_click``
for the rule. When the oracle picks nothing, the click is not run and the result is auto's (a refine to
the same region is auto's image bit for bit, tests/test_refine.py).

Metrics, as quality.py's (``lime_fast.evaluate.metrics``): L1 on [0, 1] RGB against the target inside
the true region and outside it (outside the region the target *is* the input: the mask is exactly the
pixels that differ), and the IoU of the method's RoI at the input's size with the true region. Edits run
one at a time (batch 1); quality.py runs 8 to a UNet batch, which can change the last bit of a pixel, so
auto's means here are close to, not equal to, RESULTS.md's run-9 table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import quality  # the sibling benchmark (the script's folder is on sys.path): its held-out seeds

METHODS = ("auto", "click1", "click2", "true")
N_BOOT = 2000  # bootstrap resamples for the 95% intervals
BOOT_SEED = 0


# --- the oracle, on the grid -------------------------------------------------------------------------


def truth_on_grid(true_mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The true region, bool [H, W] at the input's size -> bool [gh, gw] (nearest, as quality.py resizes)."""
    from lime_fast.evaluate.metrics import resize_mask

    gh, gw = grid
    return resize_mask(true_mask, (gw, gh))


def grid_iou(region: np.ndarray, truth: np.ndarray) -> float:
    from lime_fast.evaluate.metrics import iou

    return iou(region, truth)


def oracle_click(segments: np.ndarray, roi: np.ndarray, truth: np.ndarray) -> tuple[list[int], list[int]]:
    """The oracle's one click on a region: (add, remove), each [] or one segment id.

    segments: int [gh, gw] (the edit's k-means map); roi: bool [gh, gw], the current region; truth: bool
    [gh, gw], the true region on the grid. Candidates, counted in grid cells:

    * a: the segment with the most true-region cells outside the RoI (|s & truth & ~roi|); none if that
      count is 0 (nothing true is missing);
    * r: the segment with the most RoI cells outside the true region (|s & roi & ~truth|); none if 0.

    Ties go to the lower id. The click is the subset of the candidates ({}, {a}, {r}, {a, r}) whose region
    (roi | a, minus r) has the highest grid IoU with ``truth``; among equal IoUs the smaller subset wins, so
    a candidate that would not raise the IoU is dropped. ``a == r`` (a segment both partly missing and
    partly spilling over) is allowed as one of the two only: ``refine`` refuses an id both added and removed.
    """
    def best(counts: dict[int, int]) -> int | None:
        top = max(counts.values(), default=0)
        return min(i for i, c in counts.items() if c == top) if top > 0 else None

    ids = [int(i) for i in np.unique(segments)]
    a = best({i: int((segments == i)[truth & ~roi].sum()) for i in ids})
    r = best({i: int((segments == i)[roi & ~truth].sum()) for i in ids})

    options = [([], [])]  # fewest changes first: a tie keeps the earlier (smaller) one
    if a is not None:
        options.append(([a], []))
    if r is not None:
        options.append(([], [r]))
    if a is not None and r is not None and a != r:
        options.append(([a], [r]))

    def region(add, remove):
        out = roi | np.isin(segments, add)
        return out & ~np.isin(segments, remove)

    scores = [grid_iou(region(*o), truth) for o in options]
    return options[int(np.argmax(scores))]  # argmax: the first of equal maxima


# --- one edit ------------------------------------------------------------------------------------------


def scores(result, sample) -> dict:
    """quality.py's per-edit metrics of one result: L1 inside / outside the true region against the target,
    and the IoU of the result's RoI (at the input's size) with the true region, both at the target's size."""
    from lime_fast.evaluate import metrics

    pix = metrics.pixel_metrics(result.image, sample.target, sample.mask)
    size = sample.target.size
    roi_iou = metrics.iou(metrics.resize_mask(result.roi_mask, size), metrics.resize_mask(sample.mask, size))
    return {"l1_in": pix["l1_in"], "l1_out": pix["l1_out"], "iou": roi_iou}


def study_edit(engine, sample, cfg: dict, clicks: int = 2) -> tuple[dict, dict]:
    """Every method on one sample: (row for the JSON, pictures for the figure).

    row: kind, instruction, one dict of ``scores`` per method, and per click its ``add`` / ``remove`` ids
    and whether it was run (``ran``: False when the oracle picked nothing, so the previous result stands).
    pictures: method -> (output image, RoI bool at the input's size)."""
    row = {"kind": sample.kind, "instruction": sample.instruction}
    pics = {}
    auto = engine.edit(sample.source, sample.instruction, progress=False, **cfg)
    truth = truth_on_grid(sample.mask, auto.roi_grid.shape)
    current, results = auto, {"auto": auto}
    for k in range(1, clicks + 1):
        add, remove = oracle_click(current.segments, current.roi_grid, truth)
        ran = bool(add or remove)
        if ran:
            current = current.refine(add=add, remove=remove)
        row[f"click{k}"] = {"add": add, "remove": remove, "ran": ran,
                            "grid_iou": grid_iou(current.roi_grid, truth)}
        results[f"click{k}"] = current
    results["true"] = engine.edit(sample.source, sample.instruction, mask=sample.mask, progress=False, **cfg)
    row["grid"] = list(auto.roi_grid.shape)
    row["grid_iou_auto"] = grid_iou(auto.roi_grid, truth)
    for name, res in results.items():
        row[name] = {**row.get(name, {}), **scores(res, sample)}
        pics[name] = (res.image, res.roi_mask)
    for res in results.values():
        res.release()  # the refine cache (127 KiB each) is not needed once the clicks are done
    return row, pics


def run(engine, seeds, cfg: dict, clicks: int = 2, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """``study_edit`` on ``make_sample(seed, 64)`` for each seed: (rows, pictures), in seed order."""
    from tqdm import tqdm

    from lime_fast import LimeWarning
    from lime_fast.testing.shapes import make_sample

    rows, pics = [], []
    with warnings.catch_warnings():
        # a background's true region covers most of the picture, and an oracle click can empty a region:
        # the user-facing warnings about both say nothing this study needs
        warnings.simplefilter("ignore", LimeWarning)
        for seed in tqdm(list(seeds), desc="oracle", unit="edit", disable=not progress):
            sample = make_sample(seed, 64)
            row, pic = study_edit(engine, sample, cfg, clicks)
            rows.append({"seed": seed, **row})
            pics.append({"sample": sample, **pic})
    return rows, pics


# --- summary -------------------------------------------------------------------------------------------


def _boot_index(n: int, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
    """Bootstrap resamples of edit indices [n_boot, n]: one fixed draw shared by every statistic."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(values: np.ndarray, idx: np.ndarray) -> dict:
    """Mean and percentile-bootstrap 95% interval of per-edit values."""
    boots = values[idx].mean(1)
    return {"mean": float(values.mean()), "lo": float(np.percentile(boots, 2.5)), "hi": float(np.percentile(boots, 97.5))}


def _gap_closed(rows: list[dict], method: str, idx: np.ndarray | None) -> dict:
    """The share of the auto -> true gap in mean L1 inside that ``method`` closes:
    (auto - method) / (auto - true), on means; with ``idx``, its bootstrap 95% interval too."""
    v = {m: np.array([r[m]["l1_in"] for r in rows]) for m in ("auto", method, "true")}

    def share(sel):
        gap = v["auto"][sel].mean(-1) - v["true"][sel].mean(-1)
        return (v["auto"][sel].mean(-1) - v[method][sel].mean(-1)) / gap

    every = np.arange(len(rows))
    out = {"mean": float(share(every))}
    if idx is not None:
        boots = share(idx)
        out.update(lo=float(np.percentile(boots, 2.5)), hi=float(np.percentile(boots, 97.5)))
    return out


def summarize(rows: list[dict], methods=METHODS) -> dict:
    """Means with 95% intervals per method (l1_in, l1_out, iou), paired differences to auto, the gap
    closed, how often each click ran, and the same means per kind (without intervals)."""
    idx = _boot_index(len(rows))
    out = {"n": len(rows), "methods": {}, "minus_auto": {}, "gap_closed": {}, "clicks": {}, "by_kind": {}}
    for m in methods:
        out["methods"][m] = {k: _interval(np.array([r[m][k] for r in rows]), idx) for k in ("l1_in", "l1_out", "iou")}
        if m != "auto":
            out["minus_auto"][m] = {k: _interval(np.array([r[m][k] - r["auto"][k] for r in rows]), idx)
                                    for k in ("l1_in", "l1_out", "iou")}
            out["gap_closed"][m] = _gap_closed(rows, m, idx)
    for c in (m for m in methods if m.startswith("click")):
        out["clicks"][c] = {
            "ran": sum(r[c]["ran"] for r in rows),
            "added": sum(bool(r[c]["add"]) for r in rows),
            "removed": sum(bool(r[c]["remove"]) for r in rows),
            "both": sum(bool(r[c]["add"] and r[c]["remove"]) for r in rows),
        }
    for kind in sorted({r["kind"] for r in rows}):
        sel = [r for r in rows if r["kind"] == kind]
        out["by_kind"][kind] = {"n": len(sel), **{m: {k: float(np.mean([r[m][k] for r in sel]))
                                                      for k in ("l1_in", "l1_out", "iou")} for m in methods}}
        if "click1" in methods:
            out["by_kind"][kind]["gap_closed_click1"] = _gap_closed(sel, "click1", None)["mean"]
    return out


def markdown(summary: dict) -> str:
    """The table of RESULTS.md: means [95% interval] per method, and the gap closed."""
    labels = {"auto": "automatic RoI", "click1": "one oracle click", "click2": "two oracle clicks",
              "true": "true region as the mask"}

    def cell(d, f):
        return f"{d['mean']:{f}} [{d['lo']:{f}}, {d['hi']:{f}}]"

    lines = ["| method | RoI IoU | L1 inside | L1 outside | gap closed (L1 inside) |", "|---|---|---|---|---|"]
    for m, d in summary["methods"].items():
        gap = "0 (by definition)" if m == "auto" else (
            "1 (by definition)" if m == "true" else cell(summary["gap_closed"][m], ".2f"))
        lines.append(f"| {labels.get(m, m)} | {cell(d['iou'], '.3f')} | {cell(d['l1_in'], '.4f')} | "
                     f"{cell(d['l1_out'], '.4f')} | {gap} |")
    return "\n".join(lines)


# --- figure --------------------------------------------------------------------------------------------


def pick_examples(rows: list[dict], k: int = 4) -> list[int]:
    """Indices of ``k`` edits where the first click ran, spread over its gain in L1 inside (auto - click1):
    the largest gain, evenly spaced quantiles, the smallest (the worst). Fewer if fewer clicks ran."""
    ran = [i for i, r in enumerate(rows) if r["click1"]["ran"]]
    if not ran:
        return []
    order = sorted(ran, key=lambda i: rows[i]["auto"]["l1_in"] - rows[i]["click1"]["l1_in"], reverse=True)
    at = np.unique(np.round(np.linspace(0, len(order) - 1, min(k, len(order)))).astype(int))
    return [order[j] for j in at]


def figure(rows: list[dict], pics: list[dict], path, k: int = 4, scale: int = 3) -> Path:
    """Rows of examples (``pick_examples``): input, true region, auto's RoI and result, one click's RoI and
    result, the true-region result, the target; captions give each output's L1 inside the true region."""
    import PIL.Image

    from lime_fast import viz

    def big(im):  # enlarged nearest before drawing, so the RoI outlines stay thin
        return im.resize((im.width * scale, im.height * scale), PIL.Image.NEAREST)

    strips = []
    for i in pick_examples(rows, k):
        r, p, s = rows[i], pics[i], pics[i]["sample"]
        c = r["click1"]
        what = " ".join([f"+{i}" for i in c["add"]] + [f"-{i}" for i in c["remove"]])  # as refine's add / remove
        strip = [
            (f"{r['seed']}: {r['instruction'][:30]}", big(s.source)),
            ("true region", viz.overlay(big(s.source), s.mask)),
            (f"auto RoI (IoU {r['auto']['iou']:.2f})", viz.overlay(big(s.source), p["auto"][1])),
            (f"auto, L1 in {r['auto']['l1_in']:.3f}", big(p["auto"][0])),
            (f"1 click {what} (IoU {c['iou']:.2f})", viz.overlay(big(s.source), p["click1"][1])),
            (f"1 click, L1 in {c['l1_in']:.3f}", big(p["click1"][0])),
            (f"true region, L1 in {r['true']['l1_in']:.3f}", big(p["true"][0])),
            ("target", big(s.target)),
        ]
        strips.append(viz.panel(strip, height=64 * scale))
    if not strips:
        raise ValueError("no edit where the oracle clicked: nothing to draw")
    out = PIL.Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), (255, 255, 255))
    y = 0
    for s in strips:
        out.paste(s, (0, y))
        y += s.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


# --- command line --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="diffusers folder (default: the shipped shapes-ip2p)")
    ap.add_argument("--n", type=int, default=200, help="held-out edits (default 200, as quality.py)")
    ap.add_argument("--first-seed", type=int, default=quality.FIRST_SEED)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--clicks", type=int, default=2, choices=(1, 2), help="oracle clicks in a row (default 2)")
    ap.add_argument("--out", default="refine_oracle.json", help="JSON with the summary and every edit's row")
    ap.add_argument("--figure", default=None, help="also draw example rows to this PNG")
    args = ap.parse_args(argv)

    import torch

    import lime_fast
    from lime_fast.demo import SHAPES_CONFIG

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = lime_fast.get_engine(args.model or "shapes-ip2p", device="cpu")
    cfg = dict(SHAPES_CONFIG)
    seeds = range(args.first_seed, args.first_seed + args.n)
    load0, t0 = os.getloadavg(), time.perf_counter()
    rows, pics = run(engine, seeds, cfg, args.clicks)
    seconds = time.perf_counter() - t0
    methods = ("auto", *[f"click{k}" for k in range(1, args.clicks + 1)], "true")
    summary = summarize(rows, methods)
    info = {
        "model": args.model or "shapes-ip2p", "config": cfg, "seeds": [args.first_seed, args.first_seed + args.n - 1],
        "image_size": 64, "grid": rows[0]["grid"] if rows else None,
        "seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "bootstrap": {"resamples": N_BOOT, "seed": BOOT_SEED},
        "clicks": args.clicks,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "summary": summary, "rows": rows}, indent=1) + "\n")
    print(markdown(summary))
    print(f"\n{len(rows)} edits in {seconds:.0f} s; load average {load0[0]:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end; torch threads {torch.get_num_threads()}; wrote {args.out}")
    if args.figure:
        print(f"figure: {figure(rows, pics, args.figure)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
