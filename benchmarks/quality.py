"""Edit quality on held-out synthetic shapes: plain InstructPix2Pix vs lime_fast (automatic RoI and true mask),
through ``lime-fast eval`` (one evaluation code path for this benchmark and MagicBrush).

    python benchmarks/quality.py                       # 200 held-out edits with the shipped shapes model
    python benchmarks/quality.py --n 24 --out q/ --grid

is the same as writing the data and running the evaluation on it:

    python -c "from lime_fast.testing.shapes import write_magicbrush as w; w('q/data', range(5_000_000, 5_000_200))"
    lime-fast eval q/data --out q/eval --model shapes-ip2p --turns single --batch-size 8 \\
        --methods ip2p ip2p:text_guidance=7.5 lime lime-mask

Data: ``lime_fast.testing.shapes.make_sample(seed, 64)`` for seeds from ``--first-seed`` (default 5,000,000;
training drew seeds below 1,600,000, so these are held out), written in MagicBrush's test layout
(``write_magicbrush``). Every sample has a source, the exact target of its instruction and the true
edit region (its mask).

Methods, same model, same seed, same sampler (``lime_fast.evaluate.run``):
  ip2p                    plain InstructPix2Pix sampling at lime_fast's edit guidance (the shapes model's
                          config: text 3.0, image 1.5): the ablation, lime_fast with an empty RoI
                          (bit-identical to diffusers' pipeline on the CPU, tests/test_engine.py)
  ip2p:text_guidance=7.5  plain InstructPix2Pix at diffusers' default guidance: what a user of the base
                          model runs, and the baseline LIME is compared with
  lime                    lime_fast with the automatic RoI (the localization pass, k-means, top-k)
  lime-mask               lime_fast with the true edit region as the RoI (an upper bound for localization)

Metrics on [0, 1] RGB, against the target (``lime_fast.evaluate.metrics``): L1 and L2 over the whole
image (MagicBrush's pixel metrics); L1 inside the true region (did the edit happen?); L1 outside it
(what LIME exists to lower); for ``lime``, the IoU of the automatic RoI with the true region. Means
over the samples; edits run 8 to a UNet batch, as this benchmark always has.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

METHODS = ("ip2p", "ip2p:text_guidance=7.5", "lime", "lime-mask")
FIRST_SEED = 5_000_000
DEFAULT_TEXT_GUIDANCE = 7.5  # StableDiffusionInstructPix2PixPipeline's guidance_scale default (diffusers 0.42)
BATCH = 8


def run(out, n: int = 200, first_seed: int = FIRST_SEED, model=None, batch: int = BATCH, progress: bool = True):
    """Write ``n`` held-out samples to ``out/data`` (once) and evaluate them into ``out/eval``.

    model: a diffusers folder or a loaded ``LimeEngine`` (default: the shipped shapes model). Returns the
    ``lime_fast.evaluate.Evaluation`` (single-turn; summary["single"][method] holds the means).
    """
    from lime_fast import evaluate
    from lime_fast.demo import SHAPES_CONFIG
    from lime_fast.testing.shapes import write_magicbrush

    out = Path(out)
    data_dir = out / "data"
    if not (data_dir / "edit_sessions.json").is_file():
        write_magicbrush(data_dir, range(first_seed, first_seed + n))
    data = evaluate.load(data_dir, out)
    if len(data.sessions) != n:
        raise SystemExit(f"{data_dir} holds {len(data.sessions)} samples, not {n}: use another --out")
    return evaluate.evaluate(data, out / "eval", model=model or "shapes-ip2p", methods=METHODS, settings=("single",),
                             config=dict(SHAPES_CONFIG), batch_size=batch, progress=progress)


def unedited_l1_inside(ev) -> float:
    """Mean L1 inside the true region of the inputs themselves (how far an edit has to go)."""
    from lime_fast.evaluate import metrics, read_mask

    return float(np.mean([metrics.pixel_metrics(t.input, t.target, read_mask(t.mask))["l1_in"]
                          for s in ev.dataset.sessions for t in s.turns]))


def autoencoder_floor(engine, ev, batch: int = 32) -> dict:
    """L1 inside / outside the true region of each *target* sent through the model's VAE and back
    (posterior mode): what no sampler can beat, since every edit is decoded by that VAE.

    Returns {"all": {"l1_in", "l1_out"}, kind: {...}} (means over the samples of each kind)."""
    import PIL.Image
    import torch

    from lime_fast.evaluate import metrics, read_mask

    turns = [t for s in ev.dataset.sessions for t in s.turns]
    kinds = [t.meta.get("kind") for t in turns]
    rows = []
    for i in range(0, len(turns), batch):
        chunk = turns[i:i + batch]
        x = engine.preprocess([metrics.load_rgb(t.target) for t in chunk]).to(engine.vae.dtype)
        with torch.no_grad():
            z = engine.vae.encode(x).latent_dist.mode() * engine.vae.config.scaling_factor
        for t, img in zip(chunk, engine.decode(z)):
            pic = PIL.Image.fromarray((img.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
            rows.append(metrics.pixel_metrics(pic, t.target, read_mask(t.mask)))
    out = {"all": {k: float(np.mean([r[k] for r in rows])) for k in ("l1_in", "l1_out")}}
    for kind in sorted({k for k in kinds if k}):
        sel = [r for r, k in zip(rows, kinds) if k == kind]
        out[kind] = {k: float(np.mean([r[k] for r in sel])) for k in ("l1_in", "l1_out")}
    return out


def block_spread(ev, size: int = 16) -> list[dict]:
    """Per-block means over consecutive blocks of ``size`` held-out edits (seed order; a last partial
    block is left out), so a table can show how much a mean moves between subsets of the benchmark.

    One dict per quantity: ``name``, ``mean`` (over every edit), ``lo`` / ``hi`` (the lowest and highest
    block mean), ``below0`` (blocks whose mean is < 0) and ``blocks``. Quantities: the automatic RoI's
    IoU, and lime_fast (``lime``, ``lime-mask``) minus plain sampling at the same guidance (``ip2p``) and
    at 7.5, L1 inside and outside the region (negative: lime_fast is closer to the target).
    """
    rows = {}
    for s in ev.samples:
        if s["setting"] == "single" and s["status"] == "done":
            rows.setdefault(s["method"], {})[s["id"]] = s
    ids = sorted(rows["lime"], key=lambda i: [int(x) for x in i.split("_")])
    n = len(ids) // size * size
    if n == 0:
        raise ValueError(f"fewer than {size} scored edits: no block")

    def values(name):
        if name == "iou":
            return np.array([rows["lime"][i]["roi_iou"] for i in ids[:n]])
        method, base, key = name.split(" ")
        return np.array([rows[method][i][key] - rows[base][i][key] for i in ids[:n]])

    names = ["iou"] + [f"{m} {b} {k}" for m in ("lime", "lime-mask") for b in ("ip2p", "ip2p:text_guidance=7.5")
                       for k in ("l1_in", "l1_out")]
    out = []
    for name in names:
        if name != "iou" and not all(m in rows for m in name.split(" ")[:2]):
            continue
        v = values(name)
        blocks = v.reshape(-1, size).mean(1)
        out.append(dict(name=name, mean=float(v.mean()), lo=float(blocks.min()), hi=float(blocks.max()),
                        below0=int((blocks < 0).sum()), blocks=len(blocks)))
    return out


def spread_markdown(spread: list[dict], size: int = 16) -> str:
    lines = [f"Per block of {size} edits ({spread[0]['blocks']} blocks; differences are lime_fast minus plain sampling, "
             "L1, negative = closer to the target):", "",
             "| quantity | mean | lowest block | highest block | blocks below 0 |", "|---|---|---|---|---|"]
    for r in spread:
        label = "RoI IoU (automatic)" if r["name"] == "iou" else r["name"].replace(" ", " - ", 1).replace(" l1_", ", L1 ")
        below = "" if r["name"] == "iou" else f"{r['below0']} / {r['blocks']}"
        f = ".3f" if r["name"] == "iou" else "+.4f"
        lines.append(f"| {label} | {r['mean']:{f}} | {r['lo']:{f}} | {r['hi']:{f}} | {below} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="diffusers folder (default: the shipped shapes model)")
    ap.add_argument("--n", type=int, default=200, help="held-out samples (default 200)")
    ap.add_argument("--first-seed", type=int, default=FIRST_SEED)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--out", default="quality", help="folder for the data, the edits and the reports (default ./quality)")
    ap.add_argument("--grid", action="store_true", help="also write the worst and best edits to OUT/eval/grid.png")
    args = ap.parse_args(argv)

    from lime_fast import LimeEngine
    from lime_fast.demo import SHAPES_CONFIG, shapes_model
    from lime_fast.evaluate import report

    model = args.model or str(shapes_model())
    engine = LimeEngine.from_pretrained(model, device="cpu")
    t0 = time.perf_counter()
    ev = run(args.out, args.n, args.first_seed, engine, args.batch)
    paths = report.write(ev, grid_rows=4 if args.grid else 0)
    print(report.markdown(ev))
    print(f"(the unedited input: L1 inside the region {unedited_l1_inside(ev):.4f})")
    floor = autoencoder_floor(engine, ev)
    print("(the target through the model's VAE and back, the floor for every method: L1 inside / outside "
          + "; ".join(f"{k} {v['l1_in']:.4f} / {v['l1_out']:.4f}" for k, v in floor.items()) + ")")
    if args.n >= 16:
        print("\n" + spread_markdown(block_spread(ev)))
    print(f"\n({time.perf_counter() - t0:.0f} s on {engine.device}; model {model}; config {SHAPES_CONFIG}; "
          f"batches of {args.batch})")
    print("reports: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
