"""End-to-end behaviour of LimeEngine on tiny random checkpoints loaded through from_pretrained."""

import re
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from lime_fast import EditConfig, LimeEngine, LimeWarning, ModelLoadError
from lime_fast.attention import AttentionController


@pytest.fixture
def unet_calls(engine):
    """UNet evaluations, counted by a forward pre-hook on the UNet: the engine calls the module, so user
    hooks (and PEFT / offloading hooks) run."""
    calls = []
    handle = engine.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize("model", ["tiny_dir", "tiny_dir_heads"])
def test_full_edit_runs_on_both_head_layouts(request, model, shapes, fast):
    engine = LimeEngine.from_pretrained(request.getfixturevalue(model), device="cpu")
    heads = {p.heads for p in engine.unet.modules() if hasattr(p, "heads") and hasattr(p, "to_q")}
    assert heads == ({8} if model == "tiny_dir" else {2, 4})
    r = engine.edit(shapes, "make the red circle blue", progress=False, **fast)
    assert r.image.size == shapes.size and r.image.mode == "RGB"
    assert r.roi_mask.shape == (128, 128) and r.roi_mask.dtype == bool
    assert r.roi_grid.shape == (32, 32) and r.segments.shape == (32, 32) and r.heatmap.shape == (32, 32)
    assert r.roi_grid.any()
    # the RoI is exactly the union of segments it touches
    inside = np.unique(r.segments[r.roi_grid])
    assert np.array_equal(r.roi_grid, np.isin(r.segments, inside))
    assert r.tokens == ["red", "circle", "blue"] and r.silenced == ["the"]
    assert set(r.timings) >= {"encode", "localize", "segment", "edit", "decode", "total"}
    assert 0.0 <= r.heatmap.min() and r.heatmap.max() <= 1.0


def test_unet_evaluation_counts(engine, shapes, fast, unet_calls):
    calls = unet_calls
    cfg = EditConfig(**fast)
    enc = engine.encode(engine.preprocess([shapes]), ["make the red circle blue"])
    engine.localization_pass(enc, cfg, progress=False)
    assert len(calls) == cfg.capture + 1
    calls.clear()
    r = engine.edit(shapes, "make the red circle blue", progress=False, **fast)
    assert len(calls) == r.unet_evals == cfg.capture + 1 + cfg.steps
    calls.clear()
    engine.edit(shapes, "make the red circle blue", mask=np.ones((8, 8), bool), progress=False, **fast)
    assert len(calls) == cfg.steps  # a user mask skips stage 1


def test_should_stop_stops_an_edit_between_steps(engine, shapes, fast, unet_calls):
    """A caller's should_stop is asked after encoding, after every eager UNet step and between stages:
    the edit stops at the first True with EditCancelled without running the remaining steps; a
    should_stop that never says True changes nothing."""
    from lime_fast import EditCancelled

    def stop_at(n):
        asked = []

        def should_stop():
            asked.append(1)
            return len(asked) >= n
        return should_stop, asked

    cfg = EditConfig(**fast)
    should_stop, asked = stop_at(3)  # after encoding, after step 0, after step 1: stop
    with pytest.raises(EditCancelled):
        engine.edit(shapes, "make the red circle blue", progress=False, should_stop=should_stop, **fast)
    assert len(unet_calls) == 2 < cfg.capture + 1 + cfg.steps
    unet_calls.clear()
    should_stop, asked = stop_at(1)
    with pytest.raises(EditCancelled):
        engine.edit(shapes, "make the red circle blue", progress=False, should_stop=should_stop, **fast)
    assert len(unet_calls) == 0 and len(asked) == 1
    plain = engine.edit(shapes, "make the red circle blue", progress=False, **fast)
    watched = engine.edit(shapes, "make the red circle blue", progress=False, should_stop=lambda: False, **fast)
    assert np.array_equal(np.asarray(plain.image), np.asarray(watched.image))


def test_default_config_is_41_evaluations():
    cfg = EditConfig()
    assert (cfg.steps, cfg.capture, cfg.reg_range) == (30, 10, (0, 26))
    assert cfg.capture + 1 + cfg.steps == 41


def test_same_seed_same_result_and_seed_matters(engine, shapes, fast):
    a = engine.edit(shapes, "turn the blue square green", progress=False, seed=3, **fast)
    b = engine.edit(shapes, "turn the blue square green", progress=False, seed=3, **fast)
    c = engine.edit(shapes, "turn the blue square green", progress=False, seed=4, **fast)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.roi_grid, b.roi_grid) and np.array_equal(a.segments, b.segments)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_non_square_image(engine, fast):
    img = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 128, 3), dtype=np.uint8))
    r = engine.edit(img, "make the sky purple", progress=False, **fast)
    assert r.image.size == (128, 64)
    assert r.roi_mask.shape == (64, 128) and r.roi_grid.shape == (16, 32) and r.segments.shape == (16, 32)


def test_odd_size_image_is_resized_and_returned_at_its_size(engine, fast):
    img = PIL.Image.fromarray(np.random.default_rng(2).integers(0, 255, (100, 150, 3), dtype=np.uint8))
    r = engine.edit(img, "make the car red", progress=False, **fast)
    assert r.image.size == (150, 100) and r.roi_mask.shape == (100, 150)


def test_parity_with_diffusers_when_mask_is_empty(tiny_dir, shapes):
    """An all-False mask gives exactly InstructPix2Pix (fp32, same seed, steps and guidance)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    steps, seed = 8, 123
    ref = pipe(
        "make the red circle blue",
        image=shapes,
        num_inference_steps=steps,
        guidance_scale=2.0,
        image_guidance_scale=1.5,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    engine = LimeEngine.from_pretrained(tiny_dir, device="cpu")
    pre_drawn = []
    draw = engine.draw_noise
    engine.draw_noise = lambda *a: pre_drawn.append(draw(*a)) or pre_drawn[-1]
    with pytest.warns(LimeWarning, match="empty"):
        ours = engine.edit(shapes, "make the red circle blue", mask=np.zeros((128, 128), bool), steps=steps, seed=seed, progress=False)
    # Same operations in the same order (SDPA, guidance, scheduler, VAE): bit-identical on the CPU,
    # with the step noise drawn up front (no per-step copy to the device) rather than by sched.step.
    assert len(pre_drawn) == 1 and pre_drawn[0][1].shape[0] == steps
    np.testing.assert_array_equal(np.asarray(ours.image), np.asarray(ref))


def test_regularization_only_inside_roi_and_only_unrelated_tokens(engine, shapes, fast, monkeypatch):
    """Spy on every cross-attention call of the edit pass: the penalty is applied at levels 0-1 during
    the regularized steps only, to RoI pixels and unrelated tokens only, in all three branches; and
    at the first regularized step, attention changes only there."""
    cfg = EditConfig(**fast)
    roi = np.zeros((32, 32), bool)
    roi[4:20, 8:24] = True
    calls, steps = [], []
    original = AttentionController.attend

    def spy(self, q, k, v, roi_, keep, scale, capture):
        out = original(self, q, k, v, roi_, keep, scale, capture)
        step = self.state.step
        if not steps or steps[-1] != step:
            steps.append(step)
            calls.append(("step", step))
        calls.append((q.shape[2], q, k, roi_, keep))
        return out

    monkeypatch.setattr(AttentionController, "attend", spy)
    r = engine.edit(shapes, "make the red circle blue", mask=roi, progress=False, **fast)
    assert steps == list(range(cfg.steps))
    keep_expected = torch.zeros(77, dtype=torch.bool)
    keep_expected[1:7] = torch.tensor([True, False, True, True, True, True])  # make the red circle blue EOS
    level_n = {16 * 16: 0, 8 * 8: 1, 4 * 4: 2, 2 * 2: 3}
    cur, seen = -1, 0
    for c in calls:
        if c[0] == "step":
            cur = c[1]
            continue
        n, q, k, roi_, keep = c
        level = level_n[n]
        if level in cfg.reg_levels and cfg.reg_range[0] <= cur <= cfg.reg_range[1]:
            assert roi_ is not None and keep is not None
            assert roi_.shape == (3, n) and keep.shape == (3, 77)
            assert torch.equal(keep, keep_expected.repeat(3, 1))  # same tokens in all three branches
            side = int(np.sqrt(n))
            grid_roi = torch.nn.functional.interpolate(torch.from_numpy(roi)[None, None].float(), size=(side, side), mode="nearest")[0, 0] > 0.5
            assert torch.equal(roi_[0].reshape(side, side), grid_roi) and torch.equal(roi_[1], roi_[0]) and torch.equal(roi_[2], roi_[0])
            if cur == 0:  # first regularized step: compare attention with and without the penalty
                logits = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
                plain = logits.softmax(-1)
                reg = logits.masked_fill((roi_[:, None, :, None] & ~keep[:, None, None, :]), float("-inf")).softmax(-1)
                outside = ~roi_[:, None, :].expand_as(plain[..., 0])
                assert torch.equal(plain[outside], reg[outside])  # rows outside the RoI: unchanged
                inside = ~outside
                silenced = ~keep[:, None, None, :].expand_as(plain)
                assert (reg[inside.unsqueeze(-1).expand_as(reg) & silenced] == 0).all()
                kept = plain * keep[:, None, None, :]
                renorm = kept / kept.sum(-1, keepdim=True)
                torch.testing.assert_close(reg[inside], renorm[inside])
                seen += 1
        else:
            assert roi_ is None and keep is None
    # tiny UNet (layers_per_block=1): per level, 1 down + 2 up cross-attention layers; levels 0 and 1
    assert seen == 2 * 3
    assert r.unet_evals == cfg.steps


def test_batch_of_two_edits_matches_single_edits(engine, shapes, fast):
    """What edit_batch guarantees: each edit is the single edit run in one UNet batch (same tokens, seeds
    and settings), equal up to the rounding of batched kernels. The features k-means clusters agree with
    the single edits' within 1e-4 of their largest value (fp32 convolutions batched differently round
    differently); such a difference can flip a k-means assignment at a near-tie (seen on a fresh 2-core
    machine), so segments are not promised equal. With the region fixed, the images agree within 2/255."""
    other = PIL.Image.fromarray(np.asarray(shapes)[:, ::-1].copy())
    images, texts = [shapes, other], ["make the red circle blue", "turn the blue square green"]
    cfg = engine.default_config.replace(**fast)
    batch = engine.localization_pass(engine.encode(engine.preprocess(images), texts), cfg, progress=False)
    for i, (im, text) in enumerate(zip(images, texts)):
        single = engine.localization_pass(engine.encode(engine.preprocess([im]), [text]), cfg, progress=False)
        for got, want in zip(batch.features + batch.maps, single.features + single.maps):
            assert (got[i] - want[0]).abs().max() <= 1e-4 * want.abs().max()
    singles = [engine.edit(im, text, progress=False, **fast) for im, text in zip(images, texts)]
    masks = [s.roi_mask for s in singles]
    fixed = [engine.edit(im, text, mask=m, progress=False, **fast) for im, text, m in zip(images, texts, masks)]
    together = engine.edit_batch(images, texts, masks=masks, progress=False, **fast)
    assert [r.tokens for r in together] == [["red", "circle", "blue"], ["blue", "square", "green"]]
    for s, b in zip(fixed, together):
        assert np.array_equal(s.roi_grid, b.roi_grid)
        diff = np.abs(np.asarray(s.image).astype(int) - np.asarray(b.image).astype(int))
        assert diff.max() <= 2, diff.max()


def test_user_mask_of_another_size(engine, shapes, fast):
    m = np.zeros((40, 40), bool)
    m[:20, :20] = True
    r = engine.edit(shapes, "make the red circle blue", mask=PIL.Image.fromarray(m.astype(np.uint8) * 255), progress=False, **fast)
    assert r.segments is None and r.heatmap is None
    assert r.roi_grid[:16, :16].all() and not r.roi_grid[16:, :].any() and not r.roi_grid[:, 16:].any()
    assert r.roi_mask.shape == (128, 128) and r.roi_mask[:64, :64].all() and not r.roi_mask[64:].any()


def test_full_mask_warns_and_is_finite(engine, shapes, fast):
    with pytest.warns(LimeWarning, match="covers 100% of the image"):
        r = engine.edit(shapes, "make the red circle blue", mask=np.ones((128, 128), bool), progress=False, **fast)
    assert r.roi_mask.all() and np.isfinite(np.asarray(r.image, dtype=float)).all()


def test_instruction_without_content_words_falls_back(engine, shapes, fast):
    with pytest.warns(LimeWarning):
        r = engine.edit(shapes, "make it so", progress=False, **fast)
    assert r.fallback == "non_stop_words" and r.tokens == ["make"]
    with pytest.warns(LimeWarning, match="whole image"):
        r = engine.edit(shapes, "do it!", progress=False, **fast)
    assert r.fallback == "whole_image" and r.roi_mask.all() and r.tokens == []


def test_roi_words_override(engine, shapes, fast):
    r = engine.edit(shapes, "make the red circle blue", roi_words=["circle"], progress=False, **fast)
    assert r.tokens == ["circle"]
    with pytest.raises(ValueError, match="square"):
        engine.edit(shapes, "make the red circle blue", roi_words=["square"], progress=False, **fast)


def test_not_an_instructpix2pix_unet_is_refused(clip_tok):
    from lime_fast.testing.tiny import tiny_pipeline

    pipe = tiny_pipeline(tokenizer=clip_tok)
    from diffusers import UNet2DConditionModel

    cfg = dict(pipe.unet.config)
    cfg["in_channels"] = 4
    pipe.unet = UNet2DConditionModel.from_config(cfg)
    with pytest.raises(ModelLoadError, match="InstructPix2Pix"):
        LimeEngine.from_pipe(pipe)


def test_missing_weights_give_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        LimeEngine.from_pretrained("someone/not-a-cached-model", device="cpu")
    msg = str(e.value)
    assert "someone/not-a-cached-model" in msg and "`hf download someone/not-a-cached-model`" in msg
    assert "huggingface-cli" not in msg  # huggingface_hub no longer ships that command
    assert e.value.__cause__ is None and e.value.__suppress_context__
    with pytest.raises(ModelLoadError, match="model_index.json"):
        LimeEngine.from_pretrained(tmp_path / "empty-folder-that-does-not-exist", device="cpu")


def test_from_pipe_shares_modules(tiny_dir, shapes, fast):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    eng = LimeEngine.from_pipe(pipe)
    assert eng.unet is pipe.unet
    r = eng.edit(shapes, "make the red circle blue", progress=False, **fast)
    assert r.image.size == shapes.size


def test_non_finite_latents_raise_naming_the_step(engine, shapes, fast, monkeypatch):
    from lime_fast import NonFiniteLatentsError

    n = {"i": 0}

    def poisoned(module, args, kwargs, out):  # the second UNet evaluation returns NaN
        n["i"] += 1
        return (out[0] * float("nan"),) if n["i"] == 2 else out

    handle = engine.unet.register_forward_hook(poisoned, with_kwargs=True)
    try:
        with pytest.raises(NonFiniteLatentsError, match="edit: step 1"):
            engine.edit(shapes, "make the red circle blue", mask=np.ones((4, 4), bool), progress=False, **fast)
    finally:
        handle.remove()


def test_user_hooks_on_the_unet_run(engine, shapes, fast):
    """The engine calls the UNet module (not .forward), so forward hooks, PEFT adapters and offloading
    hooks run for every evaluation; a forward hook may even change the output."""
    seen = []
    handle = engine.unet.register_forward_hook(lambda module, args, out: seen.append(out[0].shape))
    try:
        r = engine.edit(shapes, "make the red circle blue", progress=False, **fast)
    finally:
        handle.remove()
    assert len(seen) == r.unet_evals == fast["capture_step"] + 1 + fast["steps"]


def test_attention_takes_a_custom_cross_attention_function(tiny_dir, shapes, fast):
    """attention=<callable> replaces cross-attention (how benchmarks/release.py times the release's
    pattern); with the eager reference itself it gives the eager engine's result."""
    from lime_fast.kernels.reference import regularized_attention_ref

    calls = []

    def ref(q, k, v, roi=None, keep=None, scale=None, capture=None):
        calls.append(roi is not None)
        return regularized_attention_ref(q, k, v, roi=roi, keep=keep, scale=scale, capture=capture)

    mask = np.zeros((128, 128), bool)
    mask[:64] = True
    custom = LimeEngine.from_pretrained(tiny_dir, device="cpu", attention=ref)
    a = custom.edit(shapes, "make the red circle blue", mask=mask, progress=False, **fast)
    b = LimeEngine.from_pretrained(tiny_dir, device="cpu").edit(shapes, "make the red circle blue", mask=mask, progress=False, **fast)
    assert any(calls) and not all(calls)  # penalized and plain calls both went through it
    diff = np.abs(np.asarray(a.image).astype(int) - np.asarray(b.image).astype(int))
    assert diff.max() <= 1


def test_batch_edits_keep_their_own_seeds(engine, shapes, fast):
    """edit_batch(seeds=...): each edit's noise and k-means come from its own seed, so a batched edit is
    the same edit as alone with that seed: the same noise exactly, and the same result up to batched
    BLAS rounding (which may flip a tied k-means pixel, so segments are compared almost everywhere)."""
    other = PIL.Image.fromarray(np.asarray(shapes)[:, ::-1].copy())
    cfg = EditConfig(**fast)
    enc = engine.encode(engine.preprocess([shapes, other]), ["make the red circle blue"] * 2)
    init, steps = engine.draw_noise(enc, cfg, [3, 9])
    for b, seed in enumerate((3, 9)):
        one_init, one_steps = engine.draw_noise(enc.select([b], torch.tensor([b])), cfg, [seed])
        assert torch.equal(init[b : b + 1], one_init) and torch.equal(steps[:, b : b + 1], one_steps)
    alone = [engine.edit(im, "make the red circle blue", seed=s, progress=False, **fast) for im, s in ((shapes, 3), (other, 9))]
    both = engine.edit_batch([shapes, other], ["make the red circle blue"] * 2, seeds=[3, 9], progress=False, **fast)
    swapped = engine.edit_batch([shapes, other], ["make the red circle blue"] * 2, seeds=[9, 3], progress=False, **fast)
    for a, b, c in zip(alone, both, swapped):
        assert (a.segments == b.segments).mean() >= 0.95
        near = np.abs(np.asarray(a.image, float) - np.asarray(b.image, float)).mean()
        far = np.abs(np.asarray(a.image, float) - np.asarray(c.image, float)).mean()
        assert near < 1.0 < far, (near, far)  # its own seed's edit, not the other's
    with pytest.raises(ValueError, match="seed"):
        engine.edit_batch([shapes], ["make it red"], seeds=[2**70], progress=False, **fast)


def test_other_schedulers_run_through_their_own_step(tiny_dir, shapes):
    """A scheduler lime_fast has no device-side step for (DDIM here) runs through its own ``step``
    (such passes are not graphed): an empty mask still gives exactly diffusers' pipeline."""
    from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline

    from lime_fast.sampling import stepper_of

    def pipe():
        p = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
        p.scheduler = DDIMScheduler.from_config(p.scheduler.config)
        p.set_progress_bar_config(disable=True)
        return p

    ref = pipe()("make the red circle blue", image=shapes, num_inference_steps=5, guidance_scale=2.0, image_guidance_scale=1.5,
                 generator=torch.Generator().manual_seed(4)).images[0]
    eng = LimeEngine.from_pipe(pipe())
    assert stepper_of(eng.scheduler) == "scheduler"
    with pytest.warns(LimeWarning, match="empty"):
        ours = eng.edit(shapes, "make the red circle blue", mask=np.zeros((8, 8), bool), steps=5, seed=4, progress=False)
    np.testing.assert_array_equal(np.asarray(ours.image), np.asarray(ref))
    r = eng.edit(shapes, "make the red circle blue", steps=5, capture_step=1, grid_size=16, top_k=4, progress=False)
    assert r.unet_evals == 2 + 5 and r.roi_grid.any()


@pytest.mark.parametrize("settings, message", [
    (dict(feature_levels=(7,)), "no attention at level(s) 7"),
    (dict(reg_levels=(0, 9)), "reg_levels=(0, 9): this UNet has no attention at level(s) 9"),
    (dict(segment_backend="cuml"), "needs RAPIDS cuML and a CUDA device"),
])
def test_settings_the_model_cannot_run_are_refused_before_any_work(engine, shapes, fast, settings, message, monkeypatch):
    """Levels the UNet lacks and the cuML backend without a GPU used to fail after the model work had begun
    (a RuntimeError, an IndexError inside the RoI resize, an ImportError after the localization pass)."""
    from lime_fast import ConfigError

    monkeypatch.setattr(type(engine), "encode", lambda *a, **k: pytest.fail("no model work may start"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        engine.edit(shapes, "make the red circle blue", progress=False, **{**fast, **settings})


def test_a_level_field_given_as_a_number_names_the_field():
    with pytest.raises(ValueError, match=r"feature_levels must be a tuple of levels, e\.g\. feature_levels=\(1,\)"):
        EditConfig(feature_levels=3)


@pytest.mark.parametrize("field, at, past", [
    ("text_guidance", 100.0, 1e30), ("loc_image_guidance", 100.0, 1e308), ("grid_size", 1024, 100_000),
    ("clusters", 64, 65), ("kmeans_n_init", 16, 1_000_000), ("kmeans_max_iter", 10_000, 10_001), ("max_side", 4096, 4097),
])
def test_every_bounded_field_accepts_its_bound_and_refuses_past_it(field, at, past):
    """Unbounded settings used to run (grid_size=100000: > 6 GB in 21 s) or overflow (guidance 1e30 turned into
    a NaN error advising float32 while running float32); each now has a documented upper bound."""
    from lime_fast.config import LIMITS

    assert LIMITS[field] == at
    EditConfig(**{field: at})
    with pytest.raises(ValueError, match=f"{field} must be <="):
        EditConfig(**{field: past})
    with pytest.raises(ValueError, match="top_k=17 exceeds"):
        EditConfig(grid_size=4, top_k=17)


def test_decode_applies_a_vaes_latent_statistics(engine):
    """A VAE whose config carries per-channel latent statistics (latents_mean / latents_std) decodes
    latents * std / scaling_factor + mean (the statistics reach the device through ``to_device``);
    without them, latents / scaling_factor."""
    vae = engine.vae
    c = vae.config.latent_channels
    lat = torch.randn(2, c, 8, 8, generator=torch.Generator().manual_seed(3))
    plain = engine.decode(lat)
    expected = (vae.decode(lat / vae.config.scaling_factor, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(plain, expected)
    mean, std = [0.1 * (i + 1) for i in range(c)], [1.0 + 0.5 * i for i in range(c)]
    vae.register_to_config(latents_mean=mean, latents_std=std)
    try:
        shifted = engine.decode(lat)
    finally:
        vae.register_to_config(latents_mean=None, latents_std=None)
    z = lat * torch.tensor(std).view(1, -1, 1, 1) / vae.config.scaling_factor + torch.tensor(mean).view(1, -1, 1, 1)
    expected = (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(shifted, expected)
    assert (shifted - plain).abs().max() > 1e-3  # the statistics changed the picture
