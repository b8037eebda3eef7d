"""The attention processor: idle it is diffusers' SDPA processor; levels follow the latent size."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from lime_fast.attention import AttentionController, LimeAttnProcessor, level_grids
from lime_fast.sampling import PassPlan


def test_level_grids_any_aspect_ratio():
    assert level_grids((64, 64), 4) == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert level_grids((64, 96), 4) == [(64, 96), (32, 48), (16, 24), (8, 12)]
    assert level_grids((9, 5), 3) == [(9, 5), (5, 3), (3, 2)]  # ceil, as a stride-2 conv
    plan = PassPlan("edit", 1, (8, 16), 4, 30, (2.0, 1.5))
    assert [plan.level_of(n) for n in (128, 32, 8, 2)] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="no level"):
        plan.level_of(77)


@pytest.mark.parametrize("heads, dim_head, cross", [(8, 5, True), (3, 40, True), (2, 16, False)])
def test_idle_processor_matches_diffusers(heads, dim_head, cross):
    torch.manual_seed(heads)
    dim = heads * dim_head
    attn = Attention(dim, cross_attention_dim=24 if cross else None, heads=heads, dim_head=dim_head).eval()
    x = torch.randn(3, 37, dim)
    ctx = torch.randn(3, 77, 24) if cross else None
    with torch.no_grad():
        ref = AttnProcessor2_0()(attn, x, ctx)
        ctl = AttentionController()
        ours = LimeAttnProcessor(ctl)(attn, x, ctx)
    assert torch.equal(ref, ours)


def test_capture_and_penalty_on_one_module():
    """At a feature level the processor stores the image-only branch's output and the text+image
    branch's head-mean probabilities; at a regularized level the penalty follows roi x ~keep."""
    torch.manual_seed(0)
    heads, dim_head, B = 4, 8, 2
    attn = Attention(32, cross_attention_dim=16, heads=heads, dim_head=dim_head).eval()
    ctl = AttentionController()
    loc = PassPlan("localize", B, (8, 8), 4, 30, (5.5, 1.5), capture_step=3, feature_levels=(1,))  # level 1: 16 queries
    x, ctx = torch.randn(3 * B, 16, 32), torch.randn(3 * B, 77, 16)
    state = ctl.begin_pass(loc)
    capture = state.capture
    state.at_step(2)  # not the capture step: nothing is stored
    with torch.no_grad():
        LimeAttnProcessor(ctl)(attn, x, ctx)
    assert not capture.features and not capture.maps
    state.at_step(3)
    with torch.no_grad():
        out = LimeAttnProcessor(ctl)(attn, x, ctx)
    ctl.end_pass()
    (feat,), (maps,) = capture.features, capture.maps
    assert feat.shape == (B, 32, 4, 4) and maps.shape == (B, 77, 4, 4) and capture.feature_levels == [1]
    assert torch.allclose(feat, out[B : 2 * B].transpose(1, 2).reshape(B, 32, 4, 4))
    q = attn.to_q(x).view(3 * B, 16, heads, dim_head).transpose(1, 2)
    k = attn.to_k(ctx).view(3 * B, 77, heads, dim_head).transpose(1, 2)
    probs = ((q @ k.transpose(-1, -2)) * dim_head**-0.5).softmax(-1)[:B].mean(1)  # [B, 16, 77]
    torch.testing.assert_close(maps, probs.transpose(1, 2).reshape(B, 77, 4, 4), rtol=1e-5, atol=1e-6)

    roi_grid = torch.zeros(B, 8, 8, dtype=torch.bool)
    roi_grid[0, :4, :4] = True
    keep = torch.zeros(B, 77, dtype=torch.bool)
    keep[:, 1:4] = True
    edit = PassPlan("edit", B, (8, 8), 4, 30, (2.0, 1.5), reg_levels=(1,), reg_range=(0, 5))
    state = ctl.begin_pass(edit, roi_grid=roi_grid, keep=keep)
    assert state.roi[1].shape == (3 * B, 16) and state.roi[1][0].reshape(4, 4)[:2, :2].all() and not state.roi[1][1].any()
    seen = []
    orig = ctl.attend
    ctl.attend = lambda *a: (seen.append(a), orig(*a))[1]
    for step in (5, 6):  # the last regularized step, then one after the range
        state.at_step(step)
        with torch.no_grad():
            LimeAttnProcessor(ctl)(attn, x, ctx)
    (roi, kp), (roi_after, kp_after) = (a[3:5] for a in seen)
    assert torch.equal(roi, state.roi[1]) and torch.equal(kp, keep.repeat(3, 1))
    assert roi_after is None and kp_after is None


@pytest.mark.parametrize("n, t, d", [(37, 77, 40), (64, 1, 8), (100, 77, 80)])
def test_cpu_sdpa_penalty_matches_reference(n, t, d):
    """The engine's CPU regularization path (SDPA + boolean mask) against the eager reference,
    including an element whose tokens are all silenced (no penalty, never NaN) and an empty RoI."""
    from lime_fast.kernels.reference import regularized_attention_ref, regularized_attention_sdpa

    torch.manual_seed(n)
    B, H = 4, 3
    q = torch.randn(B, n, H, d).transpose(1, 2)  # diffusers' strided layout
    k, v = torch.randn(B, H, t, d), torch.randn(B, H, t, d)
    roi = torch.rand(B, n) < 0.4
    roi[3] = False
    keep = torch.rand(B, t) < 0.3
    keep[0, 0] = True
    keep[1] = False
    keep[2] = True
    ours = regularized_attention_sdpa(q, k, v, roi, keep)
    ref, _ = regularized_attention_ref(q, k, v, roi, keep)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
