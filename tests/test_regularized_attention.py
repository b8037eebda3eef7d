"""The fused RoI-regularized attention kernel against the eager reference.

Without CUDA these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), which is slow per
program, so shapes stay small (B*H*cdiv(N, BLOCK_M) programs). The inputs' seed
is fixed per test (from its name) and printed; LIME_TEST_SEED=<seed> runs other inputs.

Tolerance (FlashAttention's rule): at low precision the kernel's max error against an fp32 reference
must be at most twice eager PyTorch's own max error at that precision, plus a small floor; fp32 and
captured maps (fp32 logits from the same inputs) are checked tightly.
"""

from __future__ import annotations

import os

import pytest
import torch
from lime_fast.kernels.reference import regularized_attention_ref
from lime_fast.kernels.regularized_attention import (
    MAX_HEAD_DIM,
    regularized_attention,
    regularized_attention_launch,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# The interpreter computes bf16 wrongly (numpy has no bf16): bf16 only on a real GPU.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="bf16 needs CUDA: Triton's CPU interpreter computes bf16 wrongly"))]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture(autouse=True)
def _seed(request):
    """A fixed seed per test (from its name; the same on every run, so CI cannot flake); LIME_TEST_SEED=<n>
    overrides it to try other inputs, e.g. in a loop when hunting a rare failure."""
    import zlib

    seed = int(os.environ.get("LIME_TEST_SEED", zlib.crc32(request.node.nodeid.encode()) % 2**31))
    torch.manual_seed(seed)
    print(f"seed={seed} (replay with LIME_TEST_SEED={seed})")
    yield seed


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def assert_within(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, name: str = "out"):
    """Elementwise |a - e| <= atol + rtol |e| (NaN fails); on failure say how many and where."""
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    err = (actual - expected).abs()
    bad = ~(err <= atol + rtol * expected.abs())  # NaN in either -> bad
    if bad.any():
        idx = bad.nonzero()
        lines = [
            f"{name}: {int(bad.sum())} of {bad.numel()} elements mismatch ({100.0 * bad.float().mean():.3f}%), "
            f"atol={atol:.3g} rtol={rtol:.3g}, max err={torch.nan_to_num(err, nan=float('inf')).max():.3g}, "
            f"NaN in actual: {int(actual.isnan().sum())}"
        ]
        for i in idx[:12].tolist():
            lines.append(f"  at {tuple(i)}: got {actual[tuple(i)].item():.6g}, expected {expected[tuple(i)].item():.6g}")
        if len(idx) > 12:
            lines.append(f"  ... {len(idx) - 12} more; mismatching indices per dim: "
                         + ", ".join(f"dim{d}: {sorted(set(idx[:, d].tolist()))[:16]}" for d in range(idx.shape[1])))
        raise AssertionError("\n".join(lines))


def check_out(out, q, k, v, roi=None, keep=None, scale=None):
    """Kernel output vs the fp32 reference, with FlashAttention's 2x-of-PyTorch rule at low precision."""
    ref32, _ = regularized_attention_ref(q.float(), k.float(), v.float(), roi, keep, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any(), f"{int(out.isnan().sum())} NaN in the output (unwritten or NaN math)"
    if q.dtype == torch.float32:
        assert_within(out, ref32, atol=1e-5, rtol=1e-5)
        return
    low, _ = regularized_attention_ref(q, k, v, roi, keep, scale, upcast=False)  # eager, same precision
    torch_err = (low.float() - ref32).abs().max().item()
    bound = 2 * torch_err + FLOOR[q.dtype]
    kernel_err = (out.float() - ref32).abs().max().item()
    print(f"{q.dtype}: kernel max err {kernel_err:.3g}, eager PyTorch max err {torch_err:.3g}")
    assert_within(out, ref32, atol=bound, name=f"out (eager torch err {torch_err:.3g})")


def check_probs(probs, q, k, v, roi, keep, scale, capture):
    _, ref = regularized_attention_ref(q.float(), k.float(), v.float(), roi, keep, scale, capture)
    assert probs.dtype == torch.float32
    # fp32 logits from the very same (upcast) inputs at any input dtype: tight.
    assert_within(probs, ref, atol=1e-5, rtol=1e-4, name="probs")


def make_qkv(B, H, N, T, D, dtype, layout="contiguous"):
    """q [B,H,N,D], k/v [B,H,T,D] in one of several memory layouts (values ~ N(0, 1))."""
    kw = dict(dtype=dtype, device=DEVICE)
    if layout == "contiguous":
        return torch.randn(B, H, N, D, **kw), torch.randn(B, H, T, D, **kw), torch.randn(B, H, T, D, **kw)
    if layout == "diffusers":  # attn.to_q(x).view(B, N, H, D).transpose(1, 2), same for k, v
        q = torch.randn(B, N, H * D, **kw).view(B, N, H, D).transpose(1, 2)
        k = torch.randn(B, T, H * D, **kw).view(B, T, H, D).transpose(1, 2)
        v = torch.randn(B, T, H * D, **kw).view(B, T, H, D).transpose(1, 2)
        return q, k, v
    if layout == "fused_kv":  # k, v as slices of one [B, T, 2, H, D] projection; q a batch slice
        q = torch.randn(B + 1, N, H, D, **kw)[1:].transpose(1, 2)
        kv = torch.randn(B, T, 2, H, D, **kw)
        return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    if layout == "strided_d":  # last-dim stride 2: the launcher copies these
        q = torch.randn(B, H, N, 2 * D, **kw)[..., ::2]
        k = torch.randn(B, H, T, 2 * D, **kw)[..., ::2]
        v = torch.randn(B, H, T, 2 * D, **kw)[..., ::2]
        return q, k, v
    raise ValueError(layout)


def make_masks(N, T, kinds):
    """One (roi [B,N], keep [B,T]) row pair per batch element, by kind."""
    rois, keeps = [], []
    for kind in kinds:
        roi = torch.rand(N) < 0.5
        keep = torch.rand(T) < 0.3
        keep[torch.randint(T, (1,))] = True  # at least one kept token unless a kind says otherwise
        if kind == "empty_roi":
            roi[:] = False
        elif kind == "full_roi":
            roi[:] = True
        elif kind == "silenced":  # keep all False: element gets no penalty (defined behaviour)
            roi[:] = True
            keep[:] = False
        elif kind == "keep_all":
            keep[:] = True
        elif kind == "keep_last":  # only the last token survives: earlier key blocks fully masked
            roi[:] = True
            keep[:] = False
            keep[-1] = True
        else:
            assert kind == "random"
        rois.append(roi)
        keeps.append(keep)
    return torch.stack(rois).to(DEVICE), torch.stack(keeps).to(DEVICE)


def poisoned_out(q):
    """NaN-filled output buffer in diffusers' [B, N, H, D] memory layout, so unwritten elements fail."""
    B, H, N, D = q.shape
    return torch.full((B, N, H, D), float("nan"), dtype=q.dtype, device=q.device).transpose(1, 2)


def run(q, k, v, roi=None, keep=None, scale=None, capture=None, **kw):
    out = poisoned_out(q)
    probs_out = None
    if capture is not None:
        probs_out = torch.full((capture.shape[0], q.shape[2], k.shape[2]), float("nan"), device=q.device)
    o, p = regularized_attention_launch(q, k, v, roi, keep, scale, capture, out=out, probs_out=probs_out, **kw)
    assert o is out
    assert p is probs_out
    return o, p


# ------------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------------

# (N, T, D): N not a multiple of the block, CLIP's T = 77, T = 1, long T, SD 1.5 head dims + 64.
SHAPES = [
    (37, 77, 40),
    (100, 77, 80),
    (37, 77, 160),
    (64, 1, 64),
    (37, 300, 40),
    (100, 1, 80),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H, capture", [(10, False), (20, True)])
def test_sdxl_shapes(H, capture, dtype):
    """SDXL's cross-attention: head dim 64 with 10 heads (level 1) and 20 heads (level 2), 77 tokens (the
    2048-wide concatenated context is projected to H x 64 before the kernel); odd N."""
    B, N, T, D = 3, 45, 77, 64
    q, k, v = make_qkv(B, H, N, T, D, dtype, layout="diffusers")
    roi, keep = make_masks(N, T, ["random", "silenced", "full_roi"])
    cap = torch.tensor([0, 2]) if capture else None
    out, probs = run(q, k, v, roi, keep, capture=cap)
    check_out(out, q, k, v, roi, keep)
    if capture:
        check_probs(probs, q, k, v, roi, keep, None, cap)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,T,D", SHAPES)
def test_matches_reference(N, T, D, dtype):
    B, H = 3, 2
    q, k, v = make_qkv(B, H, N, T, D, dtype, layout="diffusers")
    roi, keep = make_masks(N, T, ["random", "silenced", "full_roi"])
    out, _ = run(q, k, v, roi, keep)
    check_out(out, q, k, v, roi, keep)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_kinds_per_element(dtype):
    """Every element its own mask kind: empty RoI, full RoI, all silenced, keep-all, random."""
    kinds = ["empty_roi", "full_roi", "silenced", "keep_all", "random", "keep_last"]
    N, T, D = 37, 77, 40
    q, k, v = make_qkv(len(kinds), 1, N, T, D, dtype)
    roi, keep = make_masks(N, T, kinds)
    out, _ = run(q, k, v, roi, keep)
    check_out(out, q, k, v, roi, keep)
    # The all-silenced element is plain attention (same per-dtype rule: bf16 rounds at ~4e-3 of |out|).
    check_out(out[2:3], q[2:3], k[2:3], v[2:3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_penalty_off(dtype):
    N, T, D = 37, 77, 80
    q, k, v = make_qkv(2, 2, N, T, D, dtype, layout="fused_kv")
    out, _ = run(q, k, v)
    check_out(out, q, k, v)
    roi, keep = make_masks(N, T, ["full_roi", "full_roi"])
    # Like the reference, the penalty needs both masks: one alone changes nothing.
    out_roi_only, _ = run(q, k, v, roi=roi)
    out_keep_only, _ = run(q, k, v, keep=keep)
    torch.testing.assert_close(out_roi_only, out, rtol=0, atol=0)
    torch.testing.assert_close(out_keep_only, out, rtol=0, atol=0)


@pytest.mark.parametrize("block_n", [16, 64])
def test_fully_masked_key_blocks(block_n):
    """Only the last token is kept: all earlier key blocks are fully masked for RoI rows, which
    exercises the online softmax's -inf - (-inf) guard (every block but the last)."""
    N, T, D = 37, 77, 40
    q, k, v = make_qkv(2, 2, N, T, D, torch.float32)
    roi, keep = make_masks(N, T, ["keep_last", "random"])
    out, _ = run(q, k, v, roi, keep, block_n=block_n)
    check_out(out, q, k, v, roi, keep)
    # With a single kept token the RoI rows copy that token's value exactly.
    torch.testing.assert_close(out[0], v[0, :, -1:].expand(-1, N, -1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "N,T,D,block_m,block_n",
    [
        (64, 128, 64, 32, 64),  # EVEN_M, EVEN_T, EVEN_HEADDIM: the unmasked fast path, online loop
        (64, 64, 32, 64, 64),  # all even, single key block
        (100, 77, 40, 16, 16),  # many query blocks, many key blocks, masked tails
        (37, 77, 24, 32, 128),  # single masked key block, odd head dim
        (37, 77, 40, 32, 32),  # 2 full key blocks + a 16-key tail block narrower than BLOCK_N
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_configs(N, T, D, block_m, block_n, dtype):
    q, k, v = make_qkv(2, 1, N, T, D, dtype)
    roi, keep = make_masks(N, T, ["random", "full_roi"])
    out, _ = run(q, k, v, roi, keep, block_m=block_m, block_n=block_n)
    check_out(out, q, k, v, roi, keep)


@pytest.mark.parametrize("D", [40, 160])
def test_every_autotune_candidate_is_correct(D):
    """Whatever block shape the autotuner picks on a GPU computes the same result."""
    from lime_fast.kernels.regularized_attention import _candidates, _pick_config

    N, T = 37, 77
    q, k, v = make_qkv(2, 3, N, T, D, torch.float16)
    roi, keep = make_masks(N, T, ["random", "keep_last"])
    cands = _candidates(T, D, _pick_config(N, T, D, False, torch.float16))
    assert len(cands) >= 4 and {c["BLOCK_N"] for c in cands} >= {32, 64, 128}
    assert {c.get("HEADS", 1) for c in cands} == {1}  # several heads per program: an option, not timed
    assert {c.get("BLOCK_D2", 0) for c in cands} == {0, 16 if D == 40 else 32}
    for cfg in cands:
        out, _ = run(q, k, v, roi, keep, block_m=cfg["BLOCK_M"], block_n=cfg["BLOCK_N"],
                     heads_per_program=cfg.get("HEADS", 1), split_head_dim="BLOCK_D2" in cfg)
        check_out(out, q, k, v, roi, keep)


@pytest.mark.parametrize("N,T,D", [(37, 77, 40), (20, 77, 80), (33, 77, 160), (19, 50, 72), (17, 300, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_head_dim(N, T, D, dtype):
    """Two head-dim slices (40 = 32 + 16 with 8 masked columns, 80 = 64 + 16, 160 = 128 + 32, 72 =
    64 + 16 masked, 96 = 64 + 32) give the padded kernel's result: one key block and the online
    softmax with a key tail, the penalty with an early all-masked block, capture, and diffusers'
    transposed memory (the output's columns interleave with other heads')."""
    from lime_fast.kernels.regularized_attention import _split_head_dim

    assert _split_head_dim(D) is not None
    q, k, v = make_qkv(2, 3, N, T, D, dtype, layout="diffusers")
    roi, keep = make_masks(N, T, ["random", "keep_last"])
    for block_n in (32, 128):
        out, _ = run(q, k, v, roi, keep, block_n=block_n, split_head_dim=True)
        check_out(out, q, k, v, roi, keep)
    out, _ = run(q, k, v, split_head_dim=True)
    check_out(out, q, k, v)
    if T <= 128:
        capture = torch.tensor([0, -1])
        out, probs = run(q, k, v, roi, keep, capture=capture, split_head_dim=True)
        check_out(out, q, k, v, roi, keep)
        check_probs(probs, q, k, v, roi, keep, None, capture)


def test_split_head_dim_slices():
    """Each slice is a power of two >= 16 (tl.arange, tl.dot), the first is full, the two cover D,
    and a split is offered only where it computes fewer columns than padding D to a power of two."""
    from lime_fast.kernels.regularized_attention import _next_pow2, _split_head_dim

    for D in range(1, MAX_HEAD_DIM + 1):
        split = _split_head_dim(D)
        if split is None:
            continue
        d1, d2 = split
        assert d1 < D <= d1 + d2 < _next_pow2(D), D
        assert all(x >= 16 and x & (x - 1) == 0 for x in split), D
    assert [_split_head_dim(D) for D in (40, 64, 80, 128, 160)] == [(32, 16), None, (64, 16), None, (128, 32)]


@pytest.mark.parametrize("heads", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_several_heads_per_program(heads, dtype):
    """Heads grouped per program, including groups that do not divide H (5 heads in groups of 2 or 3)
    and a group larger than H, in diffusers' transposed [B, N, H, D] memory, with and without the
    penalty; capture ignores the grouping."""
    N, T, D, H = 37, 77, 40, 5
    q, k, v = make_qkv(2, H, N, T, D, dtype, layout="diffusers")
    roi, keep = make_masks(N, T, ["random", "keep_last"])
    out, _ = run(q, k, v, roi, keep, heads_per_program=heads)
    check_out(out, q, k, v, roi, keep)
    out, _ = run(q, k, v, heads_per_program=heads)
    check_out(out, q, k, v, None, None)
    capture = torch.tensor([1])
    out, probs = run(q, k, v, roi, keep, capture=capture, heads_per_program=heads)
    check_out(out, q, k, v, roi, keep)
    check_probs(probs, q, k, v, roi, keep, None, capture)
    with pytest.raises(ValueError, match="heads_per_program"):
        run(q, k, v, heads_per_program=0)


def test_autotuner_picks_the_fastest_and_caches(monkeypatch):
    import triton.testing

    from lime_fast.kernels import regularized_attention as ra

    monkeypatch.setattr(ra, "_autotune_on", lambda: True)
    monkeypatch.setattr(ra, "_TUNED", {})
    heuristic = ra._pick_config(4096, 77, 40, False, torch.float16)
    cands = ra._candidates(77, 40, heuristic)
    fastest = cands[3]
    timed = []

    def fake_bench(fn, **kw):
        timed.append(1)
        return 1.0 if len(timed) == 4 else 2.0  # the fourth candidate is fastest

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    launched = []
    pick = ra._tuned_config(24, 4096, 77, 40, torch.float16, False, heuristic, launched.append)
    assert pick == fastest and len(timed) == len(cands)
    # Cached per bucketed key: a nearby size reuses it without timing again; fp32 and capture are not tuned.
    assert ra._tuned_config(24, 4000, 77, 40, torch.float16, False, heuristic, launched.append) == fastest
    assert len(timed) == len(cands)
    assert ra._tuned_config(24, 4096, 77, 40, torch.float32, False, heuristic, launched.append) == heuristic
    assert ra._tuned_config(24, 4096, 77, 40, torch.float16, True, heuristic, launched.append) == heuristic
    assert list(ra.tuned_configs().values()) == [fastest]


@pytest.mark.parametrize("layout", ["diffusers", "fused_kv", "strided_d", "contiguous"])
def test_layouts_and_output_strides(layout):
    N, T, D = 37, 77, 40
    q, k, v = make_qkv(2, 2, N, T, D, torch.float16, layout=layout)
    roi, keep = make_masks(N, T, ["random", "random"])
    out, _ = run(q, k, v, roi, keep)
    check_out(out, q, k, v, roi, keep)
    # Allocated output: q's strides when q is dense (diffusers' transpose back is then free).
    out2, _ = regularized_attention_launch(q, k, v, roi, keep)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    if layout in ("diffusers", "contiguous"):
        assert out2.stride() == q.stride()


def test_custom_scale_and_uint8_masks():
    N, T, D = 37, 77, 40
    q, k, v = make_qkv(2, 2, N, T, D, torch.float32)
    roi, keep = make_masks(N, T, ["random", "keep_last"])
    out, _ = run(q, k, v, roi.to(torch.uint8), keep.to(torch.uint8), scale=0.37)
    check_out(out, q, k, v, roi, keep, scale=0.37)


def test_masks_broadcast_over_batch():
    """Masks may be stride-0 views (one RoI shared by every element)."""
    N, T, D = 37, 77, 40
    q, k, v = make_qkv(3, 1, N, T, D, torch.float32)
    roi, keep = make_masks(N, T, ["random"])
    roi, keep = roi.expand(3, N), keep.expand(3, T)
    out, _ = run(q, k, v, roi, keep)
    check_out(out, q, k, v, roi, keep)


# ------------------------------------------------------------------------------------------------
# fused map capture
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "N,T,D,capture",
    [
        (37, 77, 40, [1, 0]),
        (100, 77, 80, [2]),
        (37, 1, 160, [0, 2]),
        (37, 300, 40, [-1, 1, 1]),  # negative and duplicate indices, long key range
    ],
)
def test_capture(N, T, D, capture, dtype):
    B, H = 3, 3
    q, k, v = make_qkv(B, H, N, T, D, dtype, layout="diffusers")
    roi, keep = make_masks(N, T, ["random", "silenced", "keep_last"])
    cap = torch.tensor(capture, dtype=torch.long, device=DEVICE)
    out, probs = run(q, k, v, roi, keep, capture=cap)
    check_out(out, q, k, v, roi, keep)  # captured elements' outputs are still right
    check_probs(probs, q, k, v, roi, keep, None, cap)
    assert_within(probs.sum(-1), torch.ones(probs.shape[:2], device=probs.device), atol=1e-5, name="probs row sums")


def test_capture_without_masks_and_empty():
    N, T, D = 37, 77, 40
    q, k, v = make_qkv(2, 2, N, T, D, torch.float32)
    cap = torch.tensor([1], device=DEVICE)
    out, probs = run(q, k, v, scale=0.2, capture=cap)
    check_out(out, q, k, v, scale=0.2)
    check_probs(probs, q, k, v, None, None, 0.2, cap)
    # Empty capture list: [0, N, T] maps, like the reference.
    _, p0 = regularized_attention_launch(q, k, v, capture=torch.empty(0, dtype=torch.long, device=DEVICE))
    assert p0.shape == (0, N, T)
    # No query pixels: nothing to launch, empty results.
    o, p = regularized_attention_launch(q[:, :, :0], k, v, capture=cap)
    assert o.shape == (2, 2, 0, D) and p.shape == (1, 0, T)


def test_capture_bad_indices():
    N, T, D = 20, 77, 40
    q, k, v = make_qkv(2, 2, N, T, D, torch.float32)
    if not CUDA:  # host-side indices are checked (free on the CPU)
        with pytest.raises(IndexError, match="capture indices"):
            regularized_attention_launch(q, k, v, capture=torch.tensor([0, 2]))
    # Device-side indices are never synced to the host: the kernel writes NaN rows instead.
    cap = torch.tensor([0, 5, -3, 1], device=DEVICE)
    _, probs = regularized_attention_launch(q, k, v, capture=cap, check_capture_values=False)
    assert probs[1].isnan().all() and probs[2].isnan().all()
    check_probs(probs[[0, 3]], q, k, v, None, None, None, cap[[0, 3]])


# ------------------------------------------------------------------------------------------------
# API, validation, custom op
# ------------------------------------------------------------------------------------------------


def test_public_api_matches_launcher():
    N, T, D = 37, 77, 40
    q, k, v = make_qkv(2, 2, N, T, D, torch.float16, layout="diffusers")
    roi, keep = make_masks(N, T, ["random", "full_roi"])
    out, probs = regularized_attention(q, k, v, roi, keep)
    assert probs is None
    ref, _ = regularized_attention_launch(q, k, v, roi, keep)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    cap = torch.tensor([1], device=DEVICE)
    out, probs = regularized_attention(q, k, v, roi, keep, capture=cap)
    check_probs(probs, q, k, v, roi, keep, None, cap)


def _bad(**over):
    B, H, N, T, D = 2, 2, 8, 5, 16
    args = dict(
        q=torch.randn(B, H, N, D, device=DEVICE),
        k=torch.randn(B, H, T, D, device=DEVICE),
        v=torch.randn(B, H, T, D, device=DEVICE),
        roi=torch.ones(B, N, dtype=torch.bool, device=DEVICE),
        keep=torch.ones(B, T, dtype=torch.bool, device=DEVICE),
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(q=torch.randn(2, 2, 8, 16, dtype=torch.float64)), TypeError, "float16, bfloat16 or float32"),
        (dict(k=torch.randn(2, 2, 5, 16, dtype=torch.float16)), TypeError, "dtypes must match"),
        (dict(q=torch.randn(2, 8, 16)), ValueError, "4-D"),
        (dict(k=torch.randn(2, 3, 5, 16)), ValueError, "k must be"),
        (dict(v=torch.randn(2, 2, 6, 16)), ValueError, "v shape"),
        (dict(q=torch.randn(2, 2, 8, 300), k=torch.randn(2, 2, 5, 300), v=torch.randn(2, 2, 5, 300)),
         ValueError, "head dim"),
        (dict(k=torch.randn(2, 2, 0, 16), v=torch.randn(2, 2, 0, 16)), ValueError, "T >= 1"),
        (dict(roi=torch.ones(2, 9, dtype=torch.bool)), ValueError, r"roi must have shape \[B, N\]"),
        (dict(keep=torch.ones(3, 5, dtype=torch.bool)), ValueError, r"keep must have shape \[B, T\]"),
        (dict(keep=torch.ones(2, 5)), TypeError, "keep must be bool"),
        (dict(capture=torch.tensor([0.0])), TypeError, "capture must be an int64"),
        (dict(capture=torch.tensor([[0]])), ValueError, "capture must be 1-D"),
    ],
)
def test_validation(over, exc, match):
    args = _bad(**{key: (val.to(DEVICE) if isinstance(val, torch.Tensor) else val) for key, val in over.items()})
    with pytest.raises(exc, match=match):
        regularized_attention_launch(**args)
    assert MAX_HEAD_DIM == 256


@pytest.mark.skipif(CUDA, reason="the device error only exists without CUDA")
def test_cpu_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA"):
        regularized_attention_launch(**_bad())


def test_custom_op_opcheck():
    N, T, D = 20, 77, 40
    q, k, v = make_qkv(2, 2, N, T, D, torch.float32, layout="diffusers")
    roi, keep = make_masks(N, T, ["random", "silenced"])
    op = torch.ops.lime_fast.regularized_attention.default
    torch.library.opcheck(op, (q, k, v, roi, keep, None, torch.tensor([1, 0], device=DEVICE)))
    torch.library.opcheck(op, (q, k, v, None, None, 0.3, None))


def test_torch_compile_traces_through_fake_impl():
    N, T, D = 20, 77, 40
    q, k, v = make_qkv(2, 2, N, T, D, torch.float32, layout="diffusers")
    roi, keep = make_masks(N, T, ["random", "full_roi"])
    cap = torch.tensor([1], device=DEVICE)

    def f(q, k, v, roi, keep, cap):
        out, probs = regularized_attention(q, k, v, roi, keep, capture=cap)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1) * 2, probs

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out, probs = compiled(q, k, v, roi, keep, cap)
    ref_out, ref_probs = f(q, k, v, roi, keep, cap)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=0)


def test_fake_impl_on_meta_tensors():
    """Shape inference needs no kernel and no GPU: meta tensors go through the fake implementation."""
    B, H, N, T, D = 3, 8, 4096, 77, 40
    q = torch.empty(B, N, H * D, dtype=torch.float16, device="meta").view(B, N, H, D).transpose(1, 2)
    k = torch.empty(B, H, T, D, dtype=torch.float16, device="meta")
    roi = torch.empty(B, N, dtype=torch.bool, device="meta")
    keep = torch.empty(B, T, dtype=torch.bool, device="meta")
    cap = torch.empty(2, dtype=torch.long, device="meta")
    out, probs = torch.ops.lime_fast.regularized_attention(q, k, k, roi, keep, None, cap)
    assert out.shape == q.shape and out.stride() == q.stride() and out.dtype == torch.float16
    assert probs.shape == (2, N, T) and probs.dtype == torch.float32
    with pytest.raises(ValueError, match="head dim"):
        big = torch.empty(B, H, N, 512, device="meta")
        torch.ops.lime_fast.regularized_attention(big, big[:, :, :T], big[:, :, :T], None, None, None, None)


def test_kernel_compiles_for_hopper_without_a_gpu(tmp_path):
    """The interpreter never compiles the kernel; this does, for sm_90a, through ptxas (every
    variant at SD 1.5's deepest shape: penalty on/off, capture on/off, 2 and 4 heads per program, the
    split head dim with and without capture).
    A source change that only compiles in the interpreter fails here, on a CPU machine."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "codegen.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "kernel_codegen.py"), "--shapes", "64:160",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and all(0 < r["registers"] <= 255 and r["spill_bytes"] >= 0 for r in rows)
    digests = {(r["mask"], r["capture"], r["heads"], r["split"]): r["digest"] for r in rows}
    assert len(set(digests.values())) == 8  # every variant is its own program


def test_ir_digest_ignores_names_locations_and_layout_numbers(monkeypatch):
    """The digest scripts/kernel_codegen.py prints to check that a refactor kept the generated code."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "kernel_codegen.py"
    spec = importlib.util.spec_from_file_location("kernel_codegen", path)
    codegen = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "kernel_codegen", codegen)  # (its dataclass looks itself up there)
    spec.loader.exec_module(codegen)
    a = ('#blocked1 = #ttg.blocked<{order = [1, 0]}>\n'
         '%x_1 = arith.addi %a, %b : tensor<64xi32, #blocked1> loc(#loc3)\n#loc3 = loc("k.py":10:2)')
    b = ('#blocked2 = #ttg.blocked<{order = [1, 0]}>\n'
         '%y = arith.addi %c, %d : tensor<64xi32, #blocked2> loc(#loc7)\n#loc7 = loc("k.py":12:2)')
    assert codegen.ir_digest(a) == codegen.ir_digest(b)
    assert codegen.ir_digest(a) != codegen.ir_digest(a.replace("addi", "muli"))
