"""The faster modes of issue 14 on the CPU: the per-pass cross-attention K/V cache, fused QKV,
channels-last, torch.compile composing with all of them (dynamo backends), and FP8's refusals."""

import sys

import numpy as np
import PIL.Image
import pytest
import torch

from lime_fast import LimeEngine
from lime_fast.errors import UnsupportedModeError
from lime_fast.graphs import compile_options, compiled
from lime_fast.speedups import check_precision, fp8_modules

FAST = dict(steps=6, capture_step=2, reg_steps=(0, 4), grid_size=16, top_k=4)
INSTRUCTION = "make the red circle blue"


def _image(seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _mask():
    m = np.zeros((64, 64), bool)
    m[8:40, 16:56] = True
    return m


def _unet_call(eng):
    """One three-branch UNet evaluation outside a pass, on fixed random inputs."""
    g = torch.Generator().manual_seed(3)
    x, states = torch.randn(3, 8, 8, 8, generator=g), torch.randn(3, 77, 32, generator=g)
    with torch.no_grad():
        return eng.unet(x, torch.tensor(500.0), states, return_dict=False)[0]


def test_cross_kv_once_per_pass_is_bit_identical(tiny_dir):
    img = _image()
    plain = LimeEngine.from_pretrained(tiny_dir, device="cpu", cache_kv=False)
    cached = LimeEngine.from_pretrained(tiny_dir, device="cpu")  # on by default
    assert cached.controller.cache_kv and not plain.controller.cache_kv
    counts = {}
    for name, eng in (("plain", plain), ("cached", cached)):
        k = next(m for n, m in eng.unet.named_modules() if n.endswith("attn2.to_k"))
        k.register_forward_hook(lambda *a, _n=name: counts.__setitem__(_n, counts.get(_n, 0) + 1))
    for mask in (None, _mask()):
        counts.clear()
        a = plain.edit(img, INSTRUCTION, mask=mask, progress=False, **FAST)
        b = cached.edit(img, INSTRUCTION, mask=mask, progress=False, **FAST)
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
        np.testing.assert_array_equal(a.roi_grid, b.roi_grid)
        if mask is None:
            np.testing.assert_array_equal(a.segments, b.segments)
            np.testing.assert_array_equal(a.heatmap, b.heatmap)
        passes = 1 if mask is not None else 2
        evals = FAST["steps"] + (0 if mask is not None else FAST["capture_step"] + 1)
        assert counts == {"plain": evals, "cached": passes}  # one projection per pass instead of one per step
    assert cached.controller.state is None  # the pass's state (its cached K/V) is dropped at the end of the pass


def test_fused_qkv_and_channels_last(tiny_dir):
    """Fused projections: the same bits on this CPU; channels-last: fp32 rounding on the UNet output and
    the same 8-bit images on the tiny model. Both together with the K/V cache and the emulated graphs."""
    img = _image(1)
    ref = LimeEngine.from_pretrained(tiny_dir, device="cpu", cache_kv=False)
    want_unet = _unet_call(ref)
    want = ref.edit(img, INSTRUCTION, progress=False, **FAST)
    fused = LimeEngine.from_pretrained(tiny_dir, device="cpu", fuse_qkv=True)
    attn = [m for n, m in fused.unet.named_modules() if n.endswith(("attn1", "attn2"))]
    assert attn and all(m.fused_projections for m in attn) and fused.speedups["fused_attention_modules"] == len(attn)
    assert all(hasattr(m, "to_qkv") for m in attn if not m.is_cross_attention)
    torch.testing.assert_close(_unet_call(fused), want_unet, rtol=0, atol=0)
    got = fused.edit(img, INSTRUCTION, progress=False, **FAST)
    np.testing.assert_array_equal(np.asarray(got.image), np.asarray(want.image))

    nhwc = LimeEngine.from_pretrained(tiny_dir, device="cpu", channels_last=True, fuse_qkv=True)
    nhwc.graphs.enabled = nhwc.graphs.emulate = True
    w = nhwc.unet.conv_in.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert nhwc.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_unet_call(nhwc), want_unet, rtol=1e-5, atol=1e-5)  # measured: 1.2e-6
    got = nhwc.edit(img, INSTRUCTION, progress=False, **FAST)
    diff = np.abs(np.asarray(got.image).astype(int) - np.asarray(want.image).astype(int))
    assert diff.max() <= 1
    np.testing.assert_array_equal(got.roi_grid, want.roi_grid)


def test_compile_options_and_refusals():
    assert compile_options(False) is None and compile_options(True) == {"backend": "inductor", "dynamic": False}
    assert compile_options("max-autotune-no-cudagraphs") == {"backend": "inductor", "mode": "max-autotune-no-cudagraphs",
                                                            "dynamic": False}
    assert compile_options("aot_eager") == {"backend": "aot_eager", "dynamic": False}
    with pytest.raises(TypeError, match="compile"):
        compile_options(3)
    fn = lambda x: x + 1  # noqa: E731
    for mode in ("reduce-overhead", "max-autotune"):  # inductor's own CUDA graphs cannot nest in lime_fast's
        with pytest.raises(ValueError, match="max-autotune-no-cudagraphs"):
            compiled(fn, mode, graphs=True)
    assert compiled(fn, "reduce-overhead", graphs=False) is not fn


def test_compile_composes_with_every_mode(tiny_dir):
    """compile (dynamo's "eager" backend: tracing without code generation, what runs on this CPU) with
    the K/V cache, fused QKV, channels-last, step caching and the emulated whole-pass graphs: the same
    images as the same modes uncompiled, no graph break, and a handful of graphs that a second edit reuses
    (the processors guard on per-step flags, not on the step number)."""
    from torch._dynamo.utils import counters

    img, mask = _image(2), _mask()
    opts = dict(fuse_qkv=True, channels_last=True)
    ref = LimeEngine.from_pretrained(tiny_dir, device="cpu", **opts)
    eng = LimeEngine.from_pretrained(tiny_dir, device="cpu", compile="eager", **opts)
    eng.graphs.enabled = eng.graphs.emulate = True
    counters.clear()
    want = [ref.edit(img, INSTRUCTION, mask=m, progress=False, cache_interval=n, **FAST) for m, n in ((None, 2), (mask, 1))]
    got = [eng.edit(img, INSTRUCTION, mask=m, progress=False, cache_interval=n, **FAST) for m, n in ((None, 2), (mask, 1))]
    graphs = counters["stats"]["unique_graphs"]
    for a, b in zip(want, got):
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
        np.testing.assert_array_equal(a.roi_grid, b.roi_grid)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # UNet: plain, capture step, regularized; step cache: full and cached steps, regularized or not
    assert 3 <= graphs <= 8, graphs
    again = eng.edit(_image(3), "turn the square green", progress=False, cache_interval=2, **FAST)
    assert counters["stats"]["unique_graphs"] == graphs and again.image.size == (64, 64)
    assert eng.stepcache.stats.cached > 0 and eng.graphs.stats.replays == 5  # 2 + 1 + 2 passes, every one replayed


def test_registered_kernel_stays_one_node_under_aot_eager(tiny_dir):
    """With the Triton kernel (interpreter on the CPU), AOT tracing of a regularized UNet evaluation keeps
    every cross-attention call as one opaque ``lime_fast.regularized_attention`` node."""
    from lime_fast.sampling import PassPlan

    eng = LimeEngine.from_pretrained(tiny_dir, device="cpu", attention="triton")
    nodes = []

    def backend(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        def record(g, _):
            nodes.extend(str(n.target) for n in g.graph.nodes if n.op == "call_function")
            return g.forward

        return aot_autograd(fw_compiler=record)(gm, example_inputs)

    unet = torch.compile(eng.unet, backend=backend, dynamic=False)
    plan = PassPlan("edit", 1, (8, 8), 4, 6, (2.0, 1.5), reg_levels=(0, 1), reg_range=(0, 5))
    roi = torch.zeros(1, 8, 8, dtype=torch.bool)
    roi[:, 2:6, 2:6] = True
    keep = torch.zeros(1, 77, dtype=torch.bool)
    keep[:, 1:4] = True
    g = torch.Generator().manual_seed(4)
    x, states = torch.randn(3, 8, 8, 8, generator=g), torch.randn(3, 77, 32, generator=g)
    eng.controller.begin_pass(plan, roi_grid=roi, keep=keep, context=states).at_step(0)
    try:
        with torch.no_grad():
            got = unet(x, torch.tensor(500.0), states, return_dict=False)[0]
            want = eng.unet(x, torch.tensor(500.0), states, return_dict=False)[0]
    finally:
        eng.controller.end_pass()
    n_cross = sum(1 for n, _ in eng.unet.named_modules() if n.endswith("attn2"))
    ops = [n for n in nodes if "regularized_attention" in n]
    assert len(ops) == n_cross and all(n.startswith("lime_fast.regularized_attention") for n in ops), ops
    assert not any("triton" in n for n in nodes)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fp8_refuses_cleanly(tiny_dir, monkeypatch):
    """precision="fp8" refuses, with one UnsupportedModeError that says what to do, before any change:
    on the CPU, on a GPU without FP8 tensor cores, and without torchao; unknown values are a ValueError."""
    with pytest.raises(UnsupportedModeError, match="compute capability >= 8.9.*engine is on cpu"):
        check_precision("fp8", "cpu")
    # before loading: a model that does not exist is never looked at
    with pytest.raises(UnsupportedModeError, match="engine is on cpu"):
        LimeEngine.from_pretrained(tiny_dir / "no-such-model", device="cpu", precision="fp8")
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    with pytest.raises(UnsupportedModeError, match="fp8-conv"):
        LimeEngine.from_pipe(pipe, precision="fp8-conv", fuse_qkv=True, channels_last=True)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before  # nothing was changed
    assert not any(getattr(m, "fused_projections", False) for m in pipe.unet.modules())
    assert pipe.unet.conv_in.weight.is_contiguous()
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("int4", "cpu")
    # a GPU without FP8 (an A100 is 8.0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UnsupportedModeError, match="A100.* has 8.0"):
        check_precision("fp8", "cuda")
    # an FP8 GPU without torchao
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(UnsupportedModeError, match=r"pip install 'lime-fast\[fp8\]'"):
        check_precision("fp8", "cuda")


def test_fp8_keeps_the_penalty_path(engine):
    """The modules FP8 would quantize: linear layers, but never the cross-attention projections that make
    the logits LIME silences, nor the timestep embedding; fused modules' unused projections neither."""
    names = fp8_modules(engine.unet)
    assert names and all(isinstance(engine.unet.get_submodule(n), torch.nn.Linear) for n in names)
    assert not [n for n in names if ".attn2.to_" in n and not n.endswith(("to_out.0",))]
    assert not [n for n in names if n.startswith("time_embedding")]
    for part in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_out.0", "ff.net.2"):
        assert any(n.endswith(part) for n in names), part
    convs = set(fp8_modules(engine.unet, convs=True)) - set(names)
    assert convs and all(isinstance(engine.unet.get_submodule(n), torch.nn.Conv2d) for n in convs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs, inductor and FP8 need a GPU")
def test_fast_modes_on_the_device(tiny_dir):
    """Every mode through real whole-pass CUDA graphs (fp16) against the faithful engine: the exact-math
    modes to fp16 rounding, FP8 and step caching close; FP8 only where the GPU has it."""
    img, mask = _image(), _mask()
    mk = lambda **kw: LimeEngine.from_pretrained(tiny_dir, device="cuda", torch_dtype=torch.float16, **kw)  # noqa: E731
    ref = mk(cache_kv=False)
    want = {m is None: ref.edit(img, INSTRUCTION, mask=m, progress=False, **FAST) for m in (None, mask)}
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    cases = [({}, {}, 2), ({"fuse_qkv": True}, {}, 2), ({"channels_last": True}, {}, 2),
             ({"compile": True, "fuse_qkv": True, "channels_last": True}, {}, 4), ({}, {"cache_interval": 2}, 40)]
    if fp8:
        cases.append(({"precision": "fp8"}, {}, 60))
    for engine_kw, cfg, tol in cases:
        eng = mk(**engine_kw)
        masks = (mask,) if engine_kw.get("compile") else (None, mask)  # compile: one pass plan, two graphs
        for m in masks:
            got = eng.edit(img, INSTRUCTION, mask=m, progress=False, **cfg, **FAST)
            diff = np.abs(np.asarray(got.image).astype(int) - np.asarray(want[m is None].image).astype(int))
            assert diff.max() <= tol, (engine_kw, cfg, diff.max(), diff.mean())
        assert eng.graphs.stats.captures >= 1 and not eng.graphs.stats.failed, (engine_kw, eng.graphs.stats.failed)
    if not fp8:
        with pytest.raises(UnsupportedModeError, match="has"):
            mk(precision="fp8")
