"""The reference release's attention compute pattern, for benchmarks only (not part of the package).

``bench_edit.py`` runs a whole edit with it (``LimeEngine(..., attention=release_attention)``) to
estimate the release's cost on the same hardware; ``bench_attention.py`` times it per call.
"""

from __future__ import annotations

import torch

from lime_fast.kernels.reference import silenced_mask


def release_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    roi: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    scale: float | None = None,
    capture: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference release's compute pattern, for benchmarks (docs/lime.md): fp32
    ``baddbmm`` / ``softmax`` / ``bmm`` over [B*H, N, T] with an additive fp32 mask materialized in
    every call (-inf where the penalty applies, built even when it is all zero). Same contract and
    results as ``regularized_attention_ref`` (fp32)."""
    B, H, N, D = q.shape
    T = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qf, kf, vf = (t.float().reshape(B * H, -1, D) for t in (q, k, v))
    bias = torch.zeros(B, N, T, device=q.device, dtype=torch.float32)
    if roi is not None and keep is not None:
        bias = bias.masked_fill(silenced_mask(roi, keep), float("-inf"))
    bias = bias[:, None].expand(B, H, N, T).reshape(B * H, N, T)
    probs = torch.baddbmm(bias, qf, kf.transpose(1, 2), beta=1.0, alpha=scale).softmax(dim=-1)
    out = torch.bmm(probs, vf).to(q.dtype).view(B, H, N, D)
    captured = probs.view(B, H, N, T)[capture].mean(dim=1) if capture is not None else None
    return out, captured
