"""Which tokens carry an edit inside the region: LIME's regularized edit with the true region as the RoI
under LIME's keep rule and under stricter ones, against plain sampling, at the same guidance.

    python benchmarks/keep_variants.py            # 24 tuning edits (seeds 6,000,000+), shipped shapes-ip2p
    python benchmarks/keep_variants.py --n 48 --model DIR

Rules (``keep`` = the key positions a query inside the RoI may attend to):
  plain         no RoI: plain InstructPix2Pix sampling (the ablation)
  lime          lime_fast.tokens' rule: BOS, stop words and padding silenced; words and EOS kept
  no_eos        the same, and EOS silenced too
  content_only  only the content words kept

If the content words carried the instruction (as LIME assumes of SD), silencing more would leave the
edit as strong or stronger; if the sentence summary in EOS and the padding carries it, the edit weakens.
A diagnosis tool, not a product setting: the variants swap ``lime_fast.engine.keep_mask`` for the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

FIRST_SEED = 6_000_000
RULES = ("plain", "lime", "no_eos", "content_only")


def keep_rule(name: str, base):
    """A replacement for ``keep_mask`` that applies rule ``name`` on top of ``base``'s result."""
    def keep(roles):
        k = base(roles).clone()
        for i, r in enumerate(roles):
            if name == "no_eos":
                k[i, len(r.input_ids) - 1] = False
            elif name == "content_only":
                k[i, :] = False
                k[i, r.content] = True
        return k
    return keep


def run(model, n: int = 24, first_seed: int = FIRST_SEED) -> dict:
    """{rule: (mean L1 inside the true region, mean L1 outside)} over ``n`` edits."""
    import warnings

    import lime_fast.engine as engine_mod
    from lime_fast import LimeEngine
    from lime_fast.demo import SHAPES_CONFIG
    from lime_fast.evaluate.metrics import pixel_metrics
    from lime_fast.testing.shapes import make_sample

    eng = LimeEngine.from_pretrained(model, device="cpu")
    samples = [make_sample(s, 64) for s in range(first_seed, first_seed + n)]
    base, out = engine_mod.keep_mask, {}
    try:
        for rule in RULES:
            engine_mod.keep_mask = base if rule in ("plain", "lime") else keep_rule(rule, base)
            vals = []
            for s in samples:
                mask = np.zeros_like(s.mask) if rule == "plain" else s.mask
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the empty mask's "plain InstructPix2Pix" warning
                    res = eng.edit(s.source, s.instruction, mask=mask, progress=False, **SHAPES_CONFIG)
                m = pixel_metrics(res.image, s.target, s.mask)
                vals.append((m["l1_in"], m["l1_out"]))
            out[rule] = tuple(np.mean(vals, 0))
    finally:
        engine_mod.keep_mask = base
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="diffusers folder (default: the shipped shapes model)")
    ap.add_argument("--n", type=int, default=24)
    args = ap.parse_args(argv)
    from lime_fast.demo import shapes_model

    res = run(args.model or str(shapes_model()), args.n)
    print(f"{args.n} edits (seeds {FIRST_SEED:,}+), true region as the RoI, L1 to the target:\n")
    print("| rule | inside | outside |\n|---|---|---|")
    for rule, (i, o) in res.items():
        print(f"| {rule} | {i:.4f} | {o:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
