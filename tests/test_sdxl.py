"""LIME on SDXL InstructPix2Pix: the family adapter, parity with diffusers, and every entry point.

A tiny random SDXL InstructPix2Pix (``lime_fast.testing.tiny.tiny_sdxl_pipeline``: no attention at
level 0, 1 and 2 transformer layers at levels 1 and 2, two text encoders, pooled + time-id added
conditions, SDXL's Euler scheduler) saved as a diffusers folder and loaded back like any checkpoint.
"""

import json

import numpy as np
import PIL.Image
import pytest
import torch

import lime_fast
from lime_fast import EditConfig, LimeEngine, LimeWarning
from lime_fast.attention import AttentionController

FAST = dict(steps=5, capture_step=2, reg_steps=(0, 3), grid_size=32, top_k=8)


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return LimeEngine.from_pretrained(sdxl_dir, device="cpu")


def _diffusers(sdxl_dir):
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    pipe = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_family_is_detected_with_its_levels(sdxl, sdxl_dir):
    from lime_fast import families
    from lime_fast.models import config_multiple, default_config

    assert sdxl.family is families.SDXL and sdxl.multiple == 32  # VAE 8 x three UNet levels (4)
    assert families.Family.attention_levels(sdxl.unet.config) == (1, 2)
    # the same rule as SD 1.5 (features at l >= 1, penalty at l <= 1, among attention levels)
    assert (sdxl.default_config.feature_levels, sdxl.default_config.reg_levels) == ((1, 2), (1,))
    # known without loading anything (the CLI and the batch runner check settings before loading)
    assert default_config(sdxl_dir) == sdxl.default_config and config_multiple(sdxl_dir) == 32
    assert json.loads((sdxl_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLInstructPix2PixPipeline"
    from lime_fast.testing.tiny import shipped_config

    sd15 = shipped_config("unet")  # timbrooks/instruct-pix2pix: its mid block adds level 3
    assert families.Family.attention_levels(sd15) == (0, 1, 2, 3)
    spec = EditConfig()
    assert families.SD15.default_levels(sd15) == dict(feature_levels=spec.feature_levels, reg_levels=spec.reg_levels)
    no_mid = dict(sd15, mid_block_type="UNetMidBlock2D")  # a mid block without attention adds nothing
    assert families.Family.attention_levels(no_mid) == (0, 1, 2)


def test_parity_with_diffusers_sdxl_when_mask_is_empty(sdxl, sdxl_dir, shapes):
    """An all-False mask gives exactly diffusers' SDXL InstructPix2Pix (fp32, same seed, steps, guidance):
    both encoders' penultimate states, pooled + time-id conditions, zeros for the other branches, Euler."""
    steps, seed = 6, 123
    ref = _diffusers(sdxl_dir)("make the red circle blue", image=shapes, num_inference_steps=steps, guidance_scale=2.0,
                               image_guidance_scale=1.5, generator=torch.Generator().manual_seed(seed),
                               height=128, width=128).images[0]
    with pytest.warns(LimeWarning, match="empty"):
        ours = sdxl.edit(shapes, "make the red circle blue", mask=np.zeros((128, 128), bool), steps=steps, seed=seed,
                         progress=False)
    np.testing.assert_array_equal(np.asarray(ours.image), np.asarray(ref))


def test_automatic_edit_counts_and_regularizes_level_one_only(sdxl, shapes, monkeypatch):
    cfg = sdxl.default_config.replace(**FAST)
    calls, steps = [], []
    original = AttentionController.attend

    def spy(self, q, k, v, roi, keep, scale, capture):
        st = self.state
        if st.plan.kind == "edit":
            steps.append(st.step)
            calls.append((st.plan.level_of(q.shape[2]), roi is not None, keep))
        return original(self, q, k, v, roi, keep, scale, capture)

    monkeypatch.setattr(AttentionController, "attend", spy)
    r = sdxl.edit(shapes, "make the red circle blue", progress=False, config=cfg)
    assert r.unet_evals == cfg.capture + 1 + cfg.steps
    assert r.tokens == ["red", "circle", "blue"] and r.segments.shape == (32, 32) and r.roi_grid.any()
    penalized = {(lvl, s) for (lvl, pen, _), s in zip(calls, steps) if pen}
    assert {lvl for lvl, _ in penalized} == {1} and {s for _, s in penalized} == set(range(0, 4))
    # the keep mask is the same for all three branches; token roles come from the first tokenizer
    keep = next(k for (_, pen, k) in calls if pen)
    assert keep.shape == (3, 77) and torch.equal(keep[0], keep[2])


def test_batch_mask_cli_and_batch_runner(sdxl, sdxl_dir, shapes, tmp_path, capsys):
    from lime_fast import batch
    from lime_fast.cli import main

    other = PIL.Image.fromarray(np.asarray(shapes)[:, ::-1].copy())
    mask = np.zeros((128, 128), bool)
    mask[:64] = True
    res = sdxl.edit_batch([shapes, other], ["make the red circle blue", "turn the blue square green"],
                          masks=[None, mask], progress=False, **FAST)
    assert res[0].segments is not None and res[1].segments is None and res[1].roi_grid[:16].all()
    photo = tmp_path / "in.png"
    shapes.save(photo)
    out = tmp_path / "out.png"
    assert main(["edit", str(photo), "make it red", "-o", str(out), "--model", str(sdxl_dir), "--quiet",
                 "--steps", "3", "--capture-step", "1"]) == 0
    assert PIL.Image.open(out).size == (128, 128)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "image": str(photo), "instruction": "make it red", "steps": 3,
                                    "capture_step": 1}) + "\n")
    summary = batch.run(manifest, tmp_path / "job", model=str(sdxl_dir), progress=False)
    assert summary.done == 1 and (tmp_path / "job" / "images" / "a.png").is_file()


@pytest.mark.parametrize("emulate", [False, True])
def test_accelerate_sdxl_pipeline(sdxl_dir, shapes, emulate):
    from lime_fast.graphs import graphed_forward

    def run(pipe):
        return pipe("make it red", image=shapes, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    height=128, width=128, output_type="np").images

    want = run(_diffusers(sdxl_dir))
    pipe = lime_fast.accelerate(_diffusers(sdxl_dir))
    runner = graphed_forward(pipe.unet)
    runner.emulate = emulate
    np.testing.assert_array_equal(run(pipe), want)  # the added conditions go through the graph's buffers
    assert (runner.stats.replays, runner.stats.eager_calls) == ((3, 0) if emulate else (0, 3))


def test_sdxl_vae_runs_in_fp32(sdxl_dir):
    """SDXL's VAE overflows in fp16 (force_upcast): the engine runs its own fp32 copy around a fp16 UNet,
    and the caller's pipeline keeps its fp16 VAE (so diffusers' own call on it still runs)."""
    pipe = _diffusers(sdxl_dir).to(dtype=torch.float16)
    eng = LimeEngine.from_pipe(pipe)
    assert eng.vae.dtype == torch.float32 and eng.dtype == torch.float16
    assert pipe.vae.dtype == torch.float16 and eng.vae is not pipe.vae


def test_sd15_vae_keeps_the_pipelines_dtype(tmp_path):
    """SD 1.5's VAE configs carry diffusers' default force_upcast=True, which its pipelines ignore: the
    engine runs the VAE in the pipeline's dtype and changes nothing in the caller's pipeline."""
    from lime_fast.testing.tiny import tiny_pipeline

    pipe = tiny_pipeline().to(dtype=torch.float16)
    assert pipe.vae.config.force_upcast
    eng = LimeEngine.from_pipe(pipe)
    assert eng.vae is pipe.vae and pipe.vae.dtype == torch.float16
