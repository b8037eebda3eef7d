"""EditResult.refine: a corrected region for the cost of the edit pass, faithful to a full edit.

Bounds asserted: a single edit refined to its own RoI is its image bit for bit; refined to a painted
region M it is bit for bit ``engine.edit(..., mask=M)`` with the same seed. An ``edit_batch`` result is
refined alone (batch 1) from the encoding the batch computed: within 1/255 per pixel of its batched
image and of a single ``engine.edit(..., mask=M)`` here, as ``--batch-size`` notes (batching changes the
last bits).
"""

import gc
import pickle
import warnings

import numpy as np
import PIL.Image
import pytest

import lime_fast
from lime_fast import LimeEngine, LimeWarning, RefineError, RefineUnavailableError

INSTRUCTION = "make the red circle blue"


def px(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


@pytest.fixture(scope="module")
def auto(engine, shapes):
    fast = dict(steps=6, capture_step=2, reg_steps=(0, 4), grid_size=32, top_k=8)  # conftest's FAST
    return engine.edit(shapes, INSTRUCTION, progress=False, **fast)


def test_same_region_gives_the_same_image_bit_for_bit(auto):
    again = auto.refine()
    assert np.array_equal(px(again), px(auto))
    assert np.array_equal(again.roi_grid, auto.roi_grid) and np.array_equal(again.roi_mask, auto.roi_mask)
    # the same region named by its segments: still the same pass
    inside = sorted({int(s) for s in np.unique(auto.segments[auto.roi_grid])})
    named = auto.refine(segments=inside)
    assert np.array_equal(named.roi_grid, auto.roi_grid) and np.array_equal(px(named), px(auto))
    assert named.refinement.segments == tuple(inside)


def test_records_what_it_did_and_skipped(auto, fast):
    r = auto.refine()
    assert r.refinement.skipped == ("encode", "localize", "segment")
    assert set(r.timings) == {"refine", "edit", "decode", "total"}
    assert r.unet_evals == fast["steps"] < auto.unet_evals  # the edit pass only
    assert np.array_equal(r.segments, auto.segments) and np.array_equal(r.heatmap, auto.heatmap)
    assert (r.tokens, r.silenced, r.instruction) == (auto.tokens, auto.silenced, auto.instruction)
    assert auto.refinement is None  # the automatic edit itself


def test_painted_region_equals_an_edit_with_that_mask(engine, shapes, auto, fast):
    mask = np.zeros((128, 128), bool)
    mask[20:70, 30:90] = True
    refined = auto.refine(mask=mask)
    direct = engine.edit(shapes, INSTRUCTION, mask=mask, progress=False, **fast)
    assert np.array_equal(px(refined), px(direct))
    assert np.array_equal(refined.roi_mask, direct.roi_mask) and np.array_equal(refined.roi_grid, direct.roi_grid)
    assert refined.refinement.mask_mode == "replace"
    # a mask file, read with the same convention as engine.edit
    pic = PIL.Image.fromarray(mask.astype(np.uint8) * 255)
    assert np.array_equal(px(auto.refine(mask=pic)), px(direct))


def test_add_and_remove_by_id_and_by_point(auto):
    ids = [int(i) for i in np.unique(auto.segments)]
    outside = next(i for i in ids if not auto.roi_grid[auto.segments == i].any())
    inside = next(i for i in ids if auto.roi_grid[auto.segments == i].all())
    more = auto.refine(add=outside)
    assert np.array_equal(more.roi_grid, auto.roi_grid | (auto.segments == outside))
    assert more.refinement.added == (outside,) and not np.array_equal(px(more), px(auto))
    less = auto.refine(remove=[inside])
    assert np.array_equal(less.roi_grid, auto.roi_grid & (auto.segments != inside))
    # a point means the segment the segment picture shows under that pixel (input pixels, x then y)
    seg_at_input = np.asarray(PIL.Image.fromarray(auto.segments.astype(np.int32), "I").resize((128, 128), PIL.Image.NEAREST))
    ys, xs = np.nonzero(seg_at_input == outside)
    by_point = auto.refine(add=(int(xs[0]), int(ys[0])))
    assert by_point.refinement.added == (outside,) and np.array_equal(px(by_point), px(more))
    mixed = auto.refine(add=[outside, (float(xs[-1]) + 0.4, float(ys[-1]))], remove=[inside])
    assert mixed.refinement.added == (outside,) and mixed.refinement.removed == (inside,)
    # a refined result refines again, from its own region
    back = more.refine(remove=outside)
    assert np.array_equal(back.roi_grid, auto.roi_grid) and np.array_equal(px(back), px(auto))


def test_mask_modes_add_and_cut(auto):
    mask = np.zeros((128, 128), bool)
    mask[:16] = True
    from lime_fast.inputs import _mask_to_grid

    grid = _mask_to_grid(mask, auto.roi_grid.shape)
    assert np.array_equal(auto.refine(mask=mask, mask_mode="add").roi_grid, auto.roi_grid | grid)
    assert np.array_equal(auto.refine(mask=mask, mask_mode="cut").roi_grid, auto.roi_grid & ~grid)
    with pytest.raises(RefineError, match="mask_mode"):
        auto.refine(mask=mask, mask_mode="merge")


@pytest.mark.parametrize("kw, message", [
    (dict(add=99), "no segment 99"),
    (dict(remove=[-1]), "no segment -1"),
    (dict(add=(128, 5)), "outside the 128 x 128"),
    (dict(add=[(5, -1)]), "outside"),
    (dict(add="3"), "expected segment ids"),
    (dict(add=[True]), "neither a segment id"),
    (dict(add=[(1, 2, 3)]), "neither a segment id"),
    (dict(segments=[42]), "no segment 42"),
])
def test_bad_ids_and_points_are_clear_errors(auto, kw, message):
    with pytest.raises(RefineError, match=message):
        auto.refine(**kw)


def test_same_segment_added_and_removed_is_an_error(auto):
    i = int(auto.segments[0, 0])
    with pytest.raises(RefineError, match="both added and removed"):
        auto.refine(add=i, remove=[i])


def test_an_edit_with_a_user_mask_refines_by_mask_only(engine, shapes, fast):
    mask = np.zeros((128, 128), bool)
    mask[10:50, 10:50] = True
    r = engine.edit(shapes, INSTRUCTION, mask=mask, progress=False, **fast)
    with pytest.raises(RefineError, match="no segments"):
        r.refine(add=1)
    assert np.array_equal(px(r.refine()), px(r))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=LimeWarning)
        empty = r.refine(mask=np.zeros((128, 128), bool))  # plain InstructPix2Pix, as an empty mask edit
        plain = engine.edit(shapes, INSTRUCTION, mask=np.zeros((128, 128), bool), progress=False, **fast)
    assert np.array_equal(px(empty), px(plain))


def test_release_pickle_and_memory(engine, shapes, fast):
    r = engine.edit(shapes, INSTRUCTION, progress=False, **fast)
    # fp32 on the CPU, 128 x 128 -> 16 x 16 latents of 4 channels, 6 ancestral steps, 77 x 32 embeddings
    latent = 4 * 16 * 16 * 4
    assert r.refine_bytes == latent * (2 + fast["steps"]) + 2 * 77 * 32 * 4 + 2 * 77
    copy = pickle.loads(pickle.dumps(r))
    assert np.array_equal(px(copy), px(r)) and np.array_equal(copy.segments, r.segments) and copy.refine_bytes == 0
    with pytest.raises(RefineUnavailableError, match="pickled"):
        copy.refine()
    kept = r.refine(add=int(r.segments[0, 0]))
    r.release()
    assert r.refine_bytes == 0 and r.pictures()["segment_ids"].size[0] >= 384
    with pytest.raises(RefineUnavailableError, match="release"):
        r.refine()
    assert kept.refine_bytes > 0 and kept.refine().image is not None  # the refined result keeps its own


def test_unloaded_engine_is_a_clear_error(tiny_dir, shapes, fast):
    eng = LimeEngine.from_pretrained(tiny_dir, device="cpu")
    r = eng.edit(shapes, INSTRUCTION, progress=False, **fast)
    del eng
    gc.collect()
    with pytest.raises(RefineUnavailableError, match="unloaded"):
        r.refine()


def test_results_of_lime_fast_edit_refine_while_the_engine_is_cached(tiny_dir, shapes, fast):
    lime_fast._ENGINES.clear()
    r = lime_fast.edit(shapes, INSTRUCTION, model=tiny_dir, device="cpu", progress=False, **fast)
    assert np.array_equal(px(r.refine()), px(r))
    lime_fast._ENGINES.clear()  # the cache let go of the engine: nothing else keeps it
    gc.collect()
    with pytest.raises(RefineUnavailableError, match="unloaded"):
        r.refine()


def test_keep_for_refine_off(engine, shapes, fast):
    engine.keep_for_refine = False
    try:
        r = engine.edit(shapes, INSTRUCTION, progress=False, **fast)
    finally:
        engine.keep_for_refine = True
    assert r.refine_bytes == 0
    with pytest.raises(RefineUnavailableError, match="keep_for_refine"):
        r.refine()


def test_batch_results_refine_independently(engine, shapes, fast):
    """Each result of a batch refines alone (batch 1) from its own cached encoding: a region change in one
    does not touch the other. Its encoding was computed in the batch, so it matches a single edit's to the
    last bits only: within 1/255 here (asserted), as ``--batch-size`` notes."""
    images = [shapes, shapes.transpose(PIL.Image.FLIP_LEFT_RIGHT)]
    texts = [INSTRUCTION, "make the blue square green"]
    batch = engine.edit_batch(images, texts, seeds=[3, 4], progress=False, **fast)
    for b, r in enumerate(batch):
        assert r.refine_bytes == batch[0].refine_bytes
        assert np.abs(px(r.refine()) - px(r)).max() <= 1
        mask = np.zeros((128, 128), bool)
        mask[40 * b : 40 * b + 60, 20:100] = True
        refined = r.refine(mask=mask)
        direct = engine.edit(images[b], texts[b], mask=mask, seed=[3, 4][b], progress=False, **fast)
        assert np.abs(px(refined) - px(direct)).max() <= 1 and np.array_equal(refined.roi_mask, direct.roi_mask)
    # one edit's refinement is independent of the other's: the same whichever was refined first
    first = batch[1].refine(add=int(batch[1].segments[0, 0]))
    batch[0].refine(add=int(batch[0].segments[-1, -1]))
    assert np.array_equal(px(batch[1].refine(add=int(batch[1].segments[0, 0]))), px(first))


def test_sdxl_refines(sdxl_dir, shapes):
    eng = LimeEngine.from_pretrained(sdxl_dir, device="cpu")
    cfg = dict(steps=5, capture_step=2, reg_steps=(0, 3), grid_size=32, top_k=8)
    r = eng.edit(shapes, INSTRUCTION, progress=False, **cfg)
    assert r.refine_bytes > 0 and np.array_equal(px(r.refine()), px(r))
    mask = np.zeros((128, 128), bool)
    mask[64:, :64] = True
    assert np.array_equal(px(r.refine(mask=mask)), px(eng.edit(shapes, INSTRUCTION, mask=mask, progress=False, **cfg)))
    outside = next(int(i) for i in np.unique(r.segments) if not r.roi_grid[r.segments == i].any())
    assert r.refine(add=outside).roi_grid.sum() > r.roi_grid.sum()


def test_shipped_shapes_model_is_faithful():
    from lime_fast.demo import SHAPES_CONFIG
    from lime_fast.testing.shapes import make_sample

    eng = lime_fast.get_engine("shapes-ip2p", device="cpu")
    sample = make_sample(1_600_123, 64)
    r = eng.edit(sample.source, sample.instruction, progress=False, **SHAPES_CONFIG)
    assert np.array_equal(px(r.refine()), px(r))
    direct = eng.edit(sample.source, sample.instruction, mask=sample.mask, progress=False, **SHAPES_CONFIG)
    assert np.array_equal(px(r.refine(mask=sample.mask)), px(direct))
