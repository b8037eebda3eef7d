"""benchmarks/refine_oracle.py: the oracle picks the segments its rule names (a hand-built map), and the
study runs end to end on two edits with the tiny model."""

import numpy as np
import pytest

import refine_oracle

# A 6 x 6 map of four segments (ids 0-3):
#   0 0 1 1 1 1
#   0 0 1 1 1 1
#   2 2 2 3 3 3
#   2 2 2 3 3 3
#   2 2 2 3 3 3
#   2 2 2 3 3 3
SEGMENTS = np.zeros((6, 6), int)
SEGMENTS[:2, 2:] = 1
SEGMENTS[2:, :3] = 2
SEGMENTS[2:, 3:] = 3


def region(*ids):
    return np.isin(SEGMENTS, ids)


def test_adds_the_segment_holding_most_of_the_missing_truth():
    # truth: segment 3 (12 cells) and two cells of segment 1; the RoI has segment 0 only
    truth = region(3)
    truth[0, 2:4] = True
    roi = region(0)
    # a = 3 (12 missing true cells, against segment 1's 2); r = 0 (4 RoI cells, none true); both raise the IoU
    assert refine_oracle.oracle_click(SEGMENTS, roi, truth) == ([3], [0])


def test_drops_a_candidate_that_would_not_raise_the_iou():
    # truth: segment 2 and two cells of segment 1. RoI: segment 2 (all true) and segment 1 (8 cells,
    # 2 of them true): removing 1 loses 2 true cells and 6 false ones
    truth = region(2)
    truth[0, 2:4] = True
    roi = region(1, 2)
    add, remove = refine_oracle.oracle_click(SEGMENTS, roi, truth)
    # nothing true is missing, so no add; r = 1; IoU with it 14/20 = 0.70, without it 12/14 = 0.857
    assert (add, remove) == ([], [1])
    # a segment that is mostly true: removing it would lower the IoU, so it is dropped
    truth = region(1, 2)
    truth[0, 5] = truth[1, 5] = False  # segment 1 is 6 of 8 true
    assert refine_oracle.oracle_click(SEGMENTS, region(1, 2), truth) == ([], [])


def test_adding_a_mostly_false_segment_is_dropped():
    # truth: segment 0 and one cell of segment 3; the RoI is segment 0: a = 3 would add 1 true, 11 false
    truth = region(0)
    truth[5, 5] = True
    assert refine_oracle.oracle_click(SEGMENTS, region(0), truth) == ([], [])


def test_nothing_to_do_and_ties_go_to_the_lower_id():
    assert refine_oracle.oracle_click(SEGMENTS, region(2), region(2)) == ([], [])
    # segments 2 and 3 both hold 12 missing true cells: the lower id is picked
    assert refine_oracle.oracle_click(SEGMENTS, region(0), region(0, 2, 3)) == ([2], [])


def test_truth_on_the_grid_is_nearest():
    mask = np.zeros((64, 64), bool)
    mask[:32, :32] = True
    grid = refine_oracle.truth_on_grid(mask, (32, 32))
    assert grid.shape == (32, 32) and grid[:16, :16].all() and grid.sum() == 256


def test_study_on_two_edits(engine, fast):
    """Two held-out samples with the tiny model: every method scored, a click that did not run leaves the
    previous result, the summary is consistent."""
    rows, pics = refine_oracle.run(engine, range(5_000_000, 5_000_002), fast, clicks=2, progress=False)
    assert [r["seed"] for r in rows] == [5_000_000, 5_000_001] and len(pics) == 2
    for r, p in zip(rows, pics):
        for m in refine_oracle.METHODS:
            assert 0 <= r[m]["iou"] <= 1 and r[m]["l1_in"] >= 0 and r[m]["l1_out"] >= 0
        assert r["true"]["iou"] == pytest.approx(1.0)  # the true mask has the input's size: it is the RoI
        for k in (1, 2):
            c = r[f"click{k}"]
            assert c["ran"] == bool(c["add"] or c["remove"])
            assert len(c["add"]) <= 1 and len(c["remove"]) <= 1
            if not c["ran"]:  # the previous result stands
                prev = r["auto"] if k == 1 else r["click1"]
                assert c["l1_in"] == prev["l1_in"] and c["iou"] == prev["iou"]
    summary = refine_oracle.summarize(rows)
    assert summary["n"] == 2
    for m in refine_oracle.METHODS:
        d = summary["methods"][m]["l1_in"]
        assert d["lo"] <= d["mean"] <= d["hi"]
        assert d["mean"] == pytest.approx(np.mean([r[m]["l1_in"] for r in rows]))
    assert "| one oracle click |" in refine_oracle.markdown(summary)


def test_a_click_makes_the_region_refine_says(engine, fast):
    """study_edit's click is refine(add, remove) on auto's RoI: its grid IoU is that region's."""
    import warnings

    from lime_fast.refine import refined_region
    from lime_fast.testing.shapes import make_sample

    sample = make_sample(5_000_000, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = engine.edit(sample.source, sample.instruction, progress=False, **fast)
        row, _ = refine_oracle.study_edit(engine, sample, fast, clicks=1)
    truth = refine_oracle.truth_on_grid(sample.mask, auto.roi_grid.shape)
    add, remove = refine_oracle.oracle_click(auto.segments, auto.roi_grid, truth)
    assert (row["click1"]["add"], row["click1"]["remove"]) == (add, remove)
    expect = refined_region(auto.roi_grid, auto.segments, only=None, added=tuple(add), removed=tuple(remove),
                            painted=None, mask_mode="replace")
    assert row["click1"]["grid_iou"] == pytest.approx(refine_oracle.grid_iou(expect, truth))
    assert row["grid_iou_auto"] == pytest.approx(refine_oracle.grid_iou(auto.roi_grid, truth))
