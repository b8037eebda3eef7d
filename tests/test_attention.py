"""The attention processor: idle it is diffusers' SDPA processor; levels follow the latent size."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from lime_fast.attention import AttentionController, Capture, LimeAttnProcessor, level_grids


def test_level_grids_any_aspect_ratio():
    assert level_grids((64, 64), 4) == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert level_grids((64, 96), 4) == [(64, 96), (32, 48), (16, 24), (8, 12)]
    assert level_grids((9, 5), 3) == [(9, 5), (5, 3), (3, 2)]  # ceil, as a stride-2 conv
    ctl = AttentionController()
    ctl.set_latent_size((8, 16))
    assert [ctl.level_of(n) for n in (128, 32, 8, 2)] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="no level"):
        ctl.level_of(77)


@pytest.mark.parametrize("heads, dim_head, cross", [(8, 5, True), (3, 40, True), (2, 16, False)])
def test_idle_processor_matches_diffusers(heads, dim_head, cross):
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
    ctl.set_latent_size((8, 8))  # level 1 = 4x4 = 16 queries
    x, ctx = torch.randn(3 * B, 16, 32), torch.randn(3 * B, 77, 16)
    ctl.capture = Capture()
    with torch.no_grad():
        out = LimeAttnProcessor(ctl)(attn, x, ctx)
    (feat,), (maps,) = ctl.capture.features, ctl.capture.maps
    assert feat.shape == (B, 32, 4, 4) and maps.shape == (B, 77, 4, 4)
    assert torch.allclose(feat, out[B : 2 * B].transpose(1, 2).reshape(B, 32, 4, 4))
    q = attn.to_q(x).view(3 * B, 16, heads, dim_head).transpose(1, 2)
    k = attn.to_k(ctx).view(3 * B, 77, heads, dim_head).transpose(1, 2)
    probs = ((q @ k.transpose(-1, -2)) * dim_head**-0.5).softmax(-1)[:B].mean(1)  # [B, 16, 77]
    torch.testing.assert_close(maps, probs.transpose(1, 2).reshape(B, 77, 4, 4), rtol=1e-5, atol=1e-6)

    ctl.capture = None
    roi_grid = torch.zeros(B, 8, 8, dtype=torch.bool)
    roi_grid[0, :4, :4] = True
    keep = torch.zeros(B, 77, dtype=torch.bool)
    keep[:, 1:4] = True
    ctl.reg_levels = (1,)
    ctl.set_regularization(roi_grid, keep)
    assert ctl.roi[1].shape == (3 * B, 16) and ctl.roi[1][0].reshape(4, 4)[:2, :2].all() and not ctl.roi[1][1].any()
    ctl.regularize = True
    seen = []
    orig = ctl.attend
    ctl.attend = lambda *a: (seen.append(a), orig(*a))[1]
    with torch.no_grad():
        LimeAttnProcessor(ctl)(attn, x, ctx)
    roi, kp = seen[0][3], seen[0][4]
    assert torch.equal(roi, ctl.roi[1]) and torch.equal(kp, keep.repeat(3, 1))


@pytest.mark.parametrize("n, t, d", [(37, 77, 40), (64, 1, 8), (100, 77, 80)])
def test_cpu_sdpa_penalty_matches_reference(n, t, d):
    """The engine's CPU regularization path (SDPA + boolean mask) against the eager reference,
    including an element whose tokens are all silenced (no penalty, never NaN) and an empty RoI."""
    from lime_fast.kernels.reference import regularized_attention_ref, regularized_attention_sdpa

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
