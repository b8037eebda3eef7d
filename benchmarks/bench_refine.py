"""What correcting the region costs: ``EditResult.refine`` against the full automatic edit it redoes.

    OMP_NUM_THREADS=1 pytest benchmarks/bench_refine.py --benchmark-only

The shipped shapes model (``lime_fast.get_engine("shapes-ip2p")``: its own settings, 64 x 64 pictures;
on CUDA in fp16 with CUDA graphs) edits one held-out shapes picture. Rows (pytest-benchmark medians):
  auto        ``engine.edit`` with the automatic RoI: encode, localization pass, k-means, edit pass, decode.
  refine      ``result.refine(add=...)`` of that edit: the edit pass and decode only (a segment added).
  refine_mask ``result.refine(mask=M)``: a painted region instead.
  mask_edit   ``engine.edit(..., mask=M)``: what a user would otherwise re-run (encode + edit pass + decode).
The report prints each row's time and its ratio to ``auto``, and the bytes a result keeps for refining.
"""

import numpy as np
import pytest
import torch

import lime_fast
from lime_fast.demo import SHAPES_CONFIG
from lime_fast.testing.shapes import make_sample
from _common import pedantic

CUDA = torch.cuda.is_available()
TIMES: dict[str, float] = {}
NOTES: list[str] = []


@pytest.fixture(scope="module")
def setup():
    engine = lime_fast.get_engine("shapes-ip2p", device="cuda" if CUDA else "cpu")
    sample = make_sample(1_600_123, 64)
    first = engine.edit(sample.source, sample.instruction, progress=False, **SHAPES_CONFIG)
    outside = next(int(i) for i in np.unique(first.segments) if not first.roi_grid[first.segments == i].any())
    NOTES.append(f"one result keeps {first.refine_bytes / 1024:.0f} KiB for refine ({engine.dtype}, 64 x 64, "
                 f"{SHAPES_CONFIG.get('steps', engine.default_config.steps)} steps); {first.unet_evals} UNet evaluations "
                 f"for the edit, {first.refine(add=outside).unet_evals} for a refinement")
    return engine, sample, first, outside


def _row(benchmark, name, fn):
    TIMES[name], _ = pedantic(benchmark, fn, rounds=5)


def test_auto(benchmark, setup):
    engine, sample, _, _ = setup
    _row(benchmark, "auto", lambda: engine.edit(sample.source, sample.instruction, progress=False, **SHAPES_CONFIG))


def test_refine(benchmark, setup):
    _, _, first, outside = setup
    _row(benchmark, "refine", lambda: first.refine(add=outside))


def test_refine_mask(benchmark, setup):
    _, sample, first, _ = setup
    _row(benchmark, "refine_mask", lambda: first.refine(mask=sample.mask))


def test_mask_edit(benchmark, setup):
    engine, sample, _, _ = setup
    _row(benchmark, "mask_edit", lambda: engine.edit(sample.source, sample.instruction, mask=sample.mask, progress=False,
                                                     **SHAPES_CONFIG))


@pytest.fixture(scope="module", autouse=True)
def report(ratios):
    yield
    where = torch.cuda.get_device_name() if CUDA else f"CPU, {torch.get_num_threads()} thread(s)"
    auto = TIMES.get("auto")
    lines = [f"bench_refine ({where}, shapes-ip2p, 64 x 64; x = automatic edit time / row time):"]
    for name, label in (("auto", "automatic edit"), ("refine", "refine (segment added)"),
                        ("refine_mask", "refine (painted mask)"), ("mask_edit", "edit with that mask")):
        if name in TIMES:
            ratio = f" {auto / TIMES[name]:6.2f}x" if auto else ""
            lines.append(f"  {label:<24} {TIMES[name] * 1000:8.1f} ms{ratio}")
    lines += [f"  {n}" for n in NOTES]
    ratios.extend(lines)
