"""CUDA-graph runner, static attention state, accelerate(pipe) and the compile option.

On the CPU the runner's static-buffer path is exercised with ``emulate=True`` (the eager forward on
the static buffers stands in for the replay); the real capture runs in benchmarks/device_check.py.
"""

import threading

import numpy as np
import PIL.Image
import pytest
import torch

import lime_fast
from lime_fast import LimeEngine
from lime_fast.attention import AttentionController
from lime_fast.graphs import GraphedUNet, graphed_forward

MICRO = dict(steps=4, capture_step=1, reg_steps=(0, 2), grid_size=16, top_k=4)


def _image(seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _emulated(tiny_dir) -> LimeEngine:
    eng = LimeEngine.from_pretrained(tiny_dir, device="cpu")
    assert not eng.use_cuda_graphs  # default off on the CPU
    eng.graphs.enabled = eng.graphs.emulate = True
    eng.kmeans_graphs.enabled = eng.kmeans_graphs.emulate = True
    return eng


def test_emulated_graphs_match_eager_edit(tiny_dir):
    img = _image()
    eager = LimeEngine.from_pretrained(tiny_dir, device="cpu")
    graphed = _emulated(tiny_dir)
    for mask in (None, np.pad(np.ones((32, 40), bool), ((8, 24), (16, 8)))):
        a = eager.edit(img, "make the red circle blue", mask=mask, progress=False, **MICRO)
        b = graphed.edit(img, "make the red circle blue", mask=mask, progress=False, **MICRO)
        # the same pass function on the graph's static buffers: the same bits
        np.testing.assert_array_equal(a.roi_grid, b.roi_grid)
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    st = graphed.graphs.stats
    # One graph per pass plan: the localization pass, and the regularized edit pass (both RoIs share it).
    assert graphed.graphs.num_graphs == 2, list(graphed.graphs._graphs)
    kinds = sorted(p.kind for p in graphed.graphs._graphs)
    assert kinds == ["edit", "localize"]
    # Replays: the automatic edit's two passes, the masked edit's edit pass: whole passes, not UNet calls.
    assert st.eager_calls == 0 and st.replays == 3 and graphed.unet_evals == MICRO["capture_step"] + 1 + 2 * MICRO["steps"]
    # the automatic edit's k-means: one graph of Lloyd iterations (one per replay on the CPU: it stops
    # as soon as it converges there), replayed until converged
    km = graphed.kmeans_graphs
    assert km.num_graphs == 1 and km.stats.eager_calls == 0 and km.stats.replays >= 1


def test_plan_keys_the_graphs_and_drives_the_controller():
    from lime_fast.sampling import PassPlan

    loc = PassPlan("localize", 2, (8, 8), 4, 30, (5.5, 1.5), capture_step=10, feature_levels=(1, 2, 3))
    edit = PassPlan("edit", 2, (8, 8), 4, 30, (2.0, 1.5), reg_levels=(0, 1), reg_range=(0, 26))
    plain = PassPlan("edit", 2, (8, 8), 4, 30, (2.0, 1.5))
    assert (loc.n_evals, loc.n_noise, edit.n_evals, edit.n_noise) == (11, 10, 30, 30)
    assert loc.capturing(10) and not loc.capturing(9) and not loc.regularizes
    assert edit.regularized(0) and edit.regularized(26) and not edit.regularized(27) and not plain.regularized(0)
    assert len({loc, edit, plain, PassPlan("edit", 2, (8, 8), 4, 30, (2.0, 1.5))}) == 3  # equal plans, one key
    assert edit.level_of(64) == 0 and edit.level_of(16) == 1 and edit.level_of(4) == 2
    with pytest.raises(ValueError, match="capture_step"):
        PassPlan("localize", 2, (8, 8), 4, 30, (5.5, 1.5))
    ctl = AttentionController("eager")
    roi = torch.zeros(2, 8, 8, dtype=torch.bool)
    roi[0, :4] = True
    keep = torch.tensor([[True, False, True], [True, True, False]])
    st = ctl.begin_pass(edit, roi_grid=roi, keep=keep)
    # the RoI at every regularized level, repeated over the three guidance branches
    assert set(st.roi) == {0, 1} and st.roi[0].shape == (6, 64) and st.roi[1].shape == (6, 16)
    assert int(st.roi[0].sum()) == 3 * 32 and int(st.roi[1].sum()) == 3 * 8 and st.keep.shape == (6, 3)
    assert ctl.state is st
    ctl.end_pass()
    assert ctl.state is None
    st = ctl.begin_pass(plain, roi_grid=roi, keep=keep)  # a plain plan ignores masks
    assert not st.roi and st.keep is None


def test_shared_engine_is_thread_safe(tiny_dir):
    eng = _emulated(tiny_dir)
    imgs = [_image(s) for s in range(4)]
    want = [np.asarray(eng.edit(im, "make the red circle blue", progress=False, **MICRO).image) for im in imgs]
    got = [None] * len(imgs)

    def work(i):
        got[i] = np.asarray(eng.edit(imgs[i], "make the red circle blue", progress=False, **MICRO).image)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(imgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


def _pipe(tiny_dir):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, img):
    return pipe("make the red circle blue", image=img, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="np").images


@pytest.mark.parametrize("emulate", [False, True])
def test_accelerate_is_a_drop_in(tiny_dir, emulate):
    img = _image()
    want = _run(_pipe(tiny_dir), img)
    pipe = _pipe(tiny_dir)
    assert lime_fast.accelerate(pipe) is pipe
    runner = graphed_forward(pipe.unet)
    assert isinstance(runner, GraphedUNet)
    assert lime_fast.accelerate(pipe) is pipe and graphed_forward(pipe.unet) is runner  # idempotent
    runner.emulate = emulate
    got = _run(pipe, img)
    np.testing.assert_array_equal(got, want)  # same computation, same bits on the CPU
    if emulate:
        assert runner.stats.replays == 3 and runner.num_graphs == 1
    else:
        assert runner.stats.eager_calls == 3  # no CUDA: eager fallback
    # A LimeEngine on the accelerated pipe takes the plain forward, not the graphed one.
    eng = LimeEngine.from_pipe(pipe)
    assert eng._unet is runner.forward


def test_compile_option_traces_the_unet(tiny_dir):
    img = _image()
    want = LimeEngine.from_pretrained(tiny_dir, device="cpu").edit(img, "make it blue", progress=False, **MICRO)
    eng = LimeEngine.from_pretrained(tiny_dir, device="cpu", compile="eager")  # dynamo tracing, no codegen
    got = eng.edit(img, "make it blue", progress=False, **MICRO)
    diff = np.abs(np.asarray(want.image).astype(int) - np.asarray(got.image).astype(int))
    assert diff.max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA-graph capture needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graphs_match_eager_on_the_device(tiny_dir, dtype):
    img = _image()
    mk = lambda graphs: LimeEngine.from_pretrained(tiny_dir, device="cuda", torch_dtype=dtype, use_cuda_graphs=graphs)  # noqa: E731
    eager, graphed = mk(False), mk(True)
    for mask in (None, np.pad(np.ones((32, 40), bool), ((8, 24), (16, 8)))):
        a = eager.edit(img, "make the red circle blue", mask=mask, progress=False, **MICRO)
        b = graphed.edit(img, "make the red circle blue", mask=mask, progress=False, **MICRO)
        diff = np.abs(np.asarray(a.image).astype(int) - np.asarray(b.image).astype(int))
        assert diff.max() <= 2, diff.max()
    st = graphed.graphs.stats
    assert st.captures == 2 and not st.failed and st.eager_calls == 0
    # accelerate(pipe) on the device: the same images as the untouched pipeline, to fp16 rounding.
    pipe = _pipe(tiny_dir).to("cuda", dtype)
    want = _run(pipe, img)
    lime_fast.accelerate(pipe)
    got = _run(pipe, img)
    assert graphed_forward(pipe.unet).stats.captures == 1
    assert np.abs(got - want).max() <= 4 / 255


def test_compile_raises_dynamos_recompile_limit_only_during_its_calls():
    import torch._dynamo

    from lime_fast.graphs import RECOMPILE_LIMIT, compiled

    before = torch._dynamo.config.recompile_limit
    seen = []

    def f(x):
        seen.append(torch._dynamo.config.recompile_limit)  # read while dynamo traces the call
        return x + 1

    fn = compiled(f, "eager")
    assert torch._dynamo.config.recompile_limit == before
    assert torch.equal(fn(torch.ones(2)), torch.full((2,), 2.0))
    assert seen and seen[0] == max(before, RECOMPILE_LIMIT) and torch._dynamo.config.recompile_limit == before
