"""Stage-1 localization, batched: the instruction's attention heatmap and the RoI it selects among segments.

Everything here is device work for all edits of a batch at once, with no host synchronization (no
``.item()``, no ``unique()``, no boolean indexing), so the engine can queue the edit pass right behind it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .segment import upsample


def heatmaps(maps: Sequence[torch.Tensor], grid: tuple[int, int], content: torch.Tensor) -> torch.Tensor:
    """Localization heatmaps of a batch of edits on the output grid.

    Args:
        maps: per cross-attention layer, head-averaged probabilities [B, T, h_l, w_l] (layers may differ in size).
        grid: (gh, gw) output grid.
        content: [B, T] bool, the content tokens of each edit (an edit with none gets an all-zero map).

    Returns:
        [B, gh, gw] fp32: per edit, the mean over layers of the bilinearly upsampled (align_corners=True)
        maps, averaged over its content tokens. Upsampling is linear, so the token and layer sums are
        taken at native resolution first and each distinct layer size is upsampled once.
    """
    weights = content.float()
    count = weights.sum(1).clamp_min(1.0)[:, None, None, None]
    by_size: dict[tuple[int, int], torch.Tensor] = {}
    for m in maps:
        tok = torch.einsum("bt,bthw->bhw", weights, m.float())[:, None] / count  # [B, 1, h, w]
        key = tuple(tok.shape[-2:])
        by_size[key] = by_size[key] + tok if key in by_size else tok
    total = sum(upsample(s, grid) for s in by_size.values())
    return total[:, 0] / len(maps)


def roi_from_segments(segments: torch.Tensor, heat: torch.Tensor, top_k: int, clusters: int) -> torch.Tensor:
    """RoI = union of the segments containing at least one of the ``top_k`` hottest grid cells, per edit.

    segments: [B, gh, gw] long labels in [0, clusters); heat: [B, gh, gw]. Returns [B, gh, gw] bool.
    """
    flat = segments.flatten(1)
    top = torch.topk(heat.flatten(1), min(top_k, flat.shape[1]), dim=1).indices
    chosen = torch.zeros(flat.shape[0], clusters, dtype=torch.bool, device=flat.device)
    chosen.scatter_(1, flat.gather(1, top), True)
    return chosen.gather(1, flat).view_as(segments)


def normalized(heat: torch.Tensor) -> torch.Tensor:
    """Each [gh, gw] map of a [B, gh, gw] batch min-max scaled to [0, 1] (a flat map becomes zeros)."""
    flat = heat.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    span = hi - lo
    return torch.where(span > 0, (heat - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(heat))
