"""The engine end to end through the fused Triton kernel (Triton interpreter on the CPU)."""

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("triton")

from lime_fast import EditConfig, LimeEngine  # noqa: E402

MICRO = dict(steps=2, capture_step=0, reg_steps=(0, 1), grid_size=16, top_k=4)


def test_micro_pipeline_through_the_kernel_matches_eager(tiny_dir_heads, monkeypatch):
    img = PIL.Image.fromarray(np.random.default_rng(7).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    eager = LimeEngine.from_pretrained(tiny_dir_heads, device="cpu", attention="eager")
    fused = LimeEngine.from_pretrained(tiny_dir_heads, device="cpu", attention="triton")
    assert fused.controller.backend == "triton" and eager.controller.backend == "eager"
    calls = {"kernel": 0, "penalized": 0, "captured": 0}
    launch = fused.controller._kernel

    def counting(*a, **kw):
        calls["kernel"] += 1
        calls["penalized"] += kw["roi"] is not None
        calls["captured"] += kw["capture"] is not None
        return launch(*a, **kw)

    monkeypatch.setattr(fused.controller, "_kernel", counting)
    fused.edit(img, "make the red circle blue", progress=False, **MICRO)
    # Every cross-attention call of both passes went through the kernel: 1 localization + 2 edit
    # evaluations of 10 modules (1 down + 2 up at each of levels 0-2, and the mid block at level 3).
    n_cross = sum(1 for n, m in fused.unet.named_modules() if n.endswith("attn2"))
    assert n_cross == 10 and calls["kernel"] == 3 * n_cross
    assert calls["penalized"] == 2 * 6  # levels 0-1 (3 modules each), both edit steps regularized
    assert calls["captured"] == n_cross - 3  # the capture step's levels 1-3

    # What the kernel guarantees: the captured features and maps equal eager's to fp32 rounding. (k-means
    # on features that differ in the last bits may flip a tied pixel, so segments are not compared bit
    # for bit: both engines localize under ONE shared segmentation instead.)
    cfg = EditConfig(**MICRO)
    pixels = eager.preprocess([img])
    enc_a = eager.encode(pixels, ["make the red circle blue"])
    enc_b = fused.encode(pixels, ["make the red circle blue"])
    cap_a = eager.localization_pass(enc_a, cfg, progress=False)
    cap_b = fused.localization_pass(enc_b, cfg, progress=False)
    assert cap_a.feature_levels == cap_b.feature_levels and cap_a.map_levels == cap_b.map_levels
    for x, y in zip(cap_a.features + cap_a.maps, cap_b.features + cap_b.maps):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-4)
    segments = eager.segment(cap_a, (16, 16), cfg)
    roi_a, heat_a = eager.localize(cap_a, segments, enc_a.content, cfg)
    roi_b, heat_b = fused.localize(cap_b, segments, enc_b.content, cfg)
    torch.testing.assert_close(heat_b, heat_a, atol=1e-5, rtol=1e-4)
    assert torch.equal(roi_a, roi_b)

    # The regularized edit through the kernel, with one fixed RoI for both engines.
    roi = np.zeros((64, 64), bool)
    roi[8:40, 16:56] = True
    a = eager.edit(img, "make the red circle blue", mask=roi, progress=False, **MICRO)
    b = fused.edit(img, "make the red circle blue", mask=roi, progress=False, **MICRO)
    diff = np.abs(np.asarray(a.image).astype(int) - np.asarray(b.image).astype(int))
    assert diff.max() <= 1, diff.max()
