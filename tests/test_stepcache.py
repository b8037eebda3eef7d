"""LIME-safe step caching (lime_fast.stepcache): the full step is the UNet, the schedule is the plan's,
the regularized levels always run, the localization pass never caches, and the image stays close."""

import numpy as np
import PIL.Image
import pytest
import torch

from lime_fast import EditConfig, LimeEngine
from lime_fast.sampling import PassPlan
from lime_fast.stepcache import CacheStats, Layout, StepCache

FAST = dict(steps=6, capture_step=2, reg_steps=(0, 4), grid_size=16, top_k=4)


def _image(seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _sdxl_like_unet():
    """A tiny UNet with SDXL's layout: no attention at level 0, three levels, text_time added conditions."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8,
    ).eval()


def test_layout_and_full_step_equal_the_unet(engine):
    """The runner's full step computes UNet2DConditionModel.forward op for op (bit-identical), on SD's
    layout at a latent size that needs diffusers' upsample sizes, and on SDXL's layout with added
    conditions; a cached step fed its own step's deep output gives the same bits again."""
    from lime_fast.attention import AttentionController

    assert Layout.of(engine.unet) == Layout((0, 1, 2, 3), (3, 2, 1, 0), 3)
    xl = _sdxl_like_unet()
    assert Layout.of(xl) == Layout((0, 1, 2), (2, 1, 0), 2)
    g = torch.Generator().manual_seed(0)
    cases = [
        (engine.unet, torch.randn(3, 8, 10, 6, generator=g), torch.randn(3, 77, 32, generator=g), None),
        (xl, torch.randn(3, 8, 8, 8, generator=g), torch.randn(3, 77, 24, generator=g),
         {"text_embeds": torch.randn(3, 24, generator=g), "time_ids": torch.randn(3, 6, generator=g)}),
    ]
    for unet, x, states, added in cases:
        runner = StepCache(unet, AttentionController(), unet)
        t = torch.tensor(421.0)
        with torch.no_grad():
            want = unet(x, t, states, added_cond_kwargs=added, return_dict=False)[0]
            for level in (1, 2):
                full, deep = runner._full(x, t, states, added, level)
                torch.testing.assert_close(full, want, rtol=0, atol=0)
                torch.testing.assert_close(runner._cached(x, t, states, added, level, deep), want, rtol=0, atol=0)
    assert Layout.of(engine.unet).deep_blocks(2) == 5 and Layout.of(xl).deep_blocks(2) == 3  # down + mid + up
    assert Layout.of(engine.unet).deep_blocks(4) == 0  # nothing below the deepest level: nothing to cache


def test_plan_and_config_validate_the_schedule():
    plan = PassPlan("edit", 1, (8, 8), 4, 6, (2.0, 1.5), cache_interval=2, cache_level=2)
    assert plan.caches and [plan.full_step(i) for i in range(6)] == [True, False] * 3
    off = PassPlan("edit", 1, (8, 8), 4, 6, (2.0, 1.5))
    assert not off.caches and all(off.full_step(i) for i in range(6))
    assert plan != off  # the schedule keys the whole-pass graphs
    with pytest.raises(ValueError, match="localize"):
        PassPlan("localize", 1, (8, 8), 4, 6, (5.5, 1.5), capture_step=2, cache_interval=2)
    with pytest.raises(ValueError, match="cache_interval"):
        EditConfig(cache_interval=0)
    with pytest.raises(TypeError, match="cache_interval"):
        EditConfig(cache_interval=2.0)


def _level_of_module(name: str, layout: Layout) -> int:
    parts = name.split(".")
    if parts[0] == "mid_block":
        return layout.deepest
    return (layout.down if parts[0] == "down_blocks" else layout.up)[int(parts[1])]


def test_schedule_regularized_levels_and_localization(tiny_dir):
    """With cache_interval=2: every other edit step skips the deep blocks, every cross-attention call at
    the regularized levels still runs at every step, with the penalty on the regularized steps, the
    localization pass runs the whole UNet at every step, and the image stays close (measured)."""
    eng = LimeEngine.from_pretrained(tiny_dir, device="cpu")
    img = _image()
    want = eng.edit(img, "make the red circle blue", progress=False, **FAST)
    assert eng.stepcache.stats.full == 0 and eng.stepcache.stats.cached == 0  # off by default
    eng.stepcache.stats = CacheStats()

    layout = eng.stepcache.layout
    calls: list[tuple[str, int, int]] = []  # (kind of pass, step, level) per cross-attention call
    hooks = []
    for name, m in eng.unet.named_modules():
        if name.endswith("attn2"):
            level = _level_of_module(name, layout)
            hooks.append(m.register_forward_hook(
                lambda mod, a, out, lv=level: calls.append((eng.controller.state.plan.kind, eng.controller.state.step, lv))))
    penalized: list[tuple[int, int]] = []  # (step, query pixels) of cross-attention calls with the penalty on
    attend = eng.controller.attend

    def spy(q, k, v, roi, keep, scale, capture):
        if roi is not None:
            penalized.append((eng.controller.state.step, q.shape[2]))
        return attend(q, k, v, roi, keep, scale, capture)

    eng.controller.attend = spy
    try:
        got = eng.edit(img, "make the red circle blue", progress=False, cache_interval=2, **FAST)
    finally:
        for h in hooks:
            h.remove()
        del eng.controller.attend
    st = eng.stepcache.stats
    steps = FAST["steps"]
    assert list(st.per_step) == [(i, "full" if i % 2 == 0 else "cached") for i in range(steps)]
    assert st.deep_block_evals == 3 * layout.deep_blocks(2)  # 3 full steps of 6, 5 deep blocks each
    # the localization pass: plain UNet calls, every level at every step up to the capture step
    assert st.plain == FAST["capture_step"] + 1
    n_cross = {lv: sum(1 for n, _ in eng.unet.named_modules() if n.endswith("attn2") and _level_of_module(n, layout) == lv)
               for lv in range(4)}
    for step in range(steps):
        edit = [lv for kind, s, lv in calls if kind == "edit" and s == step]
        for lv in (0, 1):  # the regularized levels run at every step
            assert edit.count(lv) == n_cross[lv], (step, lv)
        assert edit.count(2) == (n_cross[2] if step % 2 == 0 else 0), step  # the deep level only on full steps
    for step in range(FAST["capture_step"] + 1):
        loc = [lv for kind, s, lv in calls if kind == "localize" and s == step]
        assert sorted(loc) == sorted(lv for lv, n in n_cross.items() for _ in range(n))
    # the penalty is on at the regularized levels on every regularized step, cached or not
    n_reg = {lv: n_cross[lv] for lv in (0, 1)}
    for step in range(FAST["reg_steps"][0], FAST["reg_steps"][1] + 1):
        assert sum(1 for s, _ in penalized if s == step) == sum(n_reg.values()), step
    assert not any(s > FAST["reg_steps"][1] for s, _ in penalized)
    # the same localization (the RoI comes from the uncached pass), a close image: measured, not assumed
    np.testing.assert_array_equal(want.roi_grid, got.roi_grid)
    diff = np.abs(np.asarray(want.image).astype(int) - np.asarray(got.image).astype(int))
    assert 0 < diff.mean() < 2.0 and diff.max() <= 16, (diff.mean(), diff.max())


def test_caching_runs_in_the_whole_pass_graphs(tiny_dir):
    """Emulated whole-pass graphs: a caching plan is its own graph, and replaying it gives the eager bits."""
    img = _image(1)
    eager = LimeEngine.from_pretrained(tiny_dir, device="cpu")
    graphed = LimeEngine.from_pretrained(tiny_dir, device="cpu")
    graphed.graphs.enabled = graphed.graphs.emulate = True
    mask = np.zeros((64, 64), bool)
    mask[8:40, 16:56] = True
    for n in (1, 3):
        a = eager.edit(img, "make it blue", mask=mask, progress=False, cache_interval=n, **FAST)
        b = graphed.edit(img, "make it blue", mask=mask, progress=False, cache_interval=n, **FAST)
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    plans = list(graphed.graphs._graphs)
    assert sorted(p.cache_interval for p in plans) == [1, 3] and graphed.stepcache.stats.cached == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA-graph capture needs CUDA")
def test_step_caching_on_the_device(tiny_dir):
    """A caching edit pass captured as one CUDA graph equals its eager run, to fp16 rounding."""
    img = _image(2)
    mk = lambda graphs: LimeEngine.from_pretrained(tiny_dir, device="cuda", torch_dtype=torch.float16,  # noqa: E731
                                                  use_cuda_graphs=graphs)
    eager, graphed = mk(False), mk(True)
    for n in (2, 3):
        a = eager.edit(img, "make it blue", progress=False, cache_interval=n, **FAST)
        b = graphed.edit(img, "make it blue", progress=False, cache_interval=n, **FAST)
        diff = np.abs(np.asarray(a.image).astype(int) - np.asarray(b.image).astype(int))
        assert diff.max() <= 2, (n, diff.max())
    st = graphed.graphs.stats
    assert st.captures == 3 and not st.failed  # one localization plan, two caching edit plans


def test_sdxl_caches_only_below_its_regularized_levels(sdxl_dir):
    """SDXL's layout (no attention at level 0, three levels): the K/V cache is exact there too, and step
    caching reuses only level 2 (its regularized levels are 0-1), close to the faithful edit."""
    img = _image(3)
    faithful = LimeEngine.from_pretrained(sdxl_dir, device="cpu", cache_kv=False)
    fast = LimeEngine.from_pretrained(sdxl_dir, device="cpu", fuse_qkv=True)
    assert fast.stepcache.layout == Layout((0, 1, 2), (2, 1, 0), 2)
    want = faithful.edit(img, "make it blue", progress=False, **FAST)
    same = fast.edit(img, "make it blue", progress=False, **FAST)
    np.testing.assert_array_equal(np.asarray(want.image), np.asarray(same.image))
    got = fast.edit(img, "make it blue", progress=False, cache_interval=2, **FAST)
    st = fast.stepcache.stats
    assert st.cached == FAST["steps"] // 2 and st.deep_block_evals == (FAST["steps"] // 2) * 3
    np.testing.assert_array_equal(want.roi_grid, got.roi_grid)
    diff = np.abs(np.asarray(want.image).astype(int) - np.asarray(got.image).astype(int))
    assert diff.mean() < 2.0 and diff.max() <= 16, (diff.mean(), diff.max())
