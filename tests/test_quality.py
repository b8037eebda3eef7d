"""Edit quality of the shipped shapes model on a small fixed held-out subset (benchmarks/quality.py).

Thresholds come from the measured 200-edit benchmark (README, benchmarks/RESULTS.md); see the
constants' comments. The subset is fixed (seeds 5,000,000..), so a change that breaks localization
or the regularized edit shows up here, offline, in about a minute on 2 CPU cores.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from quality import FIRST_SEED, edit_metrics, evaluate, iou, summary  # noqa: E402

N = 16
# Measured on these 16 samples (this CPU, 2026-11-27): inside the true region the unedited source is
# 0.361 from the target (mean L1) and the base model's output 0.168, so an output that keeps less
# than 40% of that gap means the edit broke. lime_fast with the automatic RoI: 0.167 inside (base
# 0.168), 0.148 outside (base 0.147). MARGIN allows 0.01 (~2.5/255 per channel) of drift either way:
# the differences measured over 200 edits were within it (README table).
EDIT_RATIO_MAX = 0.6
MARGIN = 0.01


def test_metrics_on_known_images():
    tgt = np.zeros((4, 4, 3), np.uint8)
    out = tgt.copy()
    out[:2] = 255  # top half wrong by 1.0
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    m = edit_metrics(out, tgt, mask)
    assert m["l1"] == pytest.approx(0.5) and m["l2"] == pytest.approx(0.5)
    assert m["l1_in"] == pytest.approx(1.0) and m["l1_out"] == pytest.approx(0.0)
    assert iou(mask, mask) == 1.0 and iou(mask, ~mask) == 0.0 and iou(mask & False, mask & False) == 1.0


@pytest.fixture(scope="module")
def records():
    from lime_fast import LimeEngine
    from lime_fast.demo import shapes_model

    engine = LimeEngine.from_pretrained(shapes_model(), device="cpu")
    return evaluate(engine, range(FIRST_SEED, FIRST_SEED + N), progress=False)


def test_the_model_edits_inside_the_region(records):
    s = summary(records)
    unedited = np.mean([edit_metrics(np.asarray(r["_sample"].source), np.asarray(r["_sample"].target),
                                     r["_sample"].mask)["l1_in"] for r in records])
    assert s["base"]["l1_in"] <= EDIT_RATIO_MAX * unedited, (s, unedited)
    assert s["lime"]["l1_in"] <= EDIT_RATIO_MAX * unedited, (s, unedited)


def test_automatic_roi_costs_no_quality(records):
    s = summary(records)
    assert s["lime"]["l1_in"] <= s["base"]["l1_in"] + MARGIN, s
    assert s["lime"]["l1_out"] <= s["base"]["l1_out"] + MARGIN, s


# What LIME should do and this small model does not let it do (measured, not forced): its content
# words' cross-attention maps are diffuse, so the automatic RoI overlaps the true region little
# (IoU 0.05 on these samples) and changes outside it are not lower. strict: a better model that
# passes turns these into failures, so the thresholds get revisited.
@pytest.mark.xfail(strict=True, reason="shapes-ip2p's cross-attention does not localize (IoU ~0.05)")
def test_lime_changes_less_outside_the_region(records):
    s = summary(records)
    assert s["lime"]["l1_out"] < s["base"]["l1_out"] - 0.005, s


@pytest.mark.xfail(strict=True, reason="shapes-ip2p's cross-attention does not localize (IoU ~0.05)")
def test_automatic_roi_finds_the_region(records):
    s = summary(records)
    assert s["lime"]["iou"] >= 0.3, s
