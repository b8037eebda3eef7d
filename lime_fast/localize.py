"""Stage-1 localization: the instruction's attention heatmap and the RoI it selects among segments."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .segment import upsample


def heatmap(maps: Sequence[torch.Tensor], grid: tuple[int, int], content: Sequence[int]) -> torch.Tensor:
    """Localization heatmap of one edit on the output grid.

    Args:
        maps: per cross-attention layer, head-averaged probabilities [T, h_l, w_l] (layers may differ in size).
        grid: (gh, gw) output grid.
        content: token positions whose maps are averaged (the content tokens); must be non-empty.

    Returns:
        [gh, gw] fp32: the mean over layers of the bilinearly upsampled (align_corners=True) maps,
        averaged over the content tokens. Upsampling is linear, so the token and layer means are taken
        at native resolution first and each distinct layer size is upsampled once.
    """
    if not content:
        raise ValueError("heatmap needs at least one content token")
    idx = torch.as_tensor(list(content), device=maps[0].device)
    by_size: dict[tuple[int, int], torch.Tensor] = {}
    for m in maps:
        tok = m.float().index_select(0, idx).mean(dim=0, keepdim=True)  # [1, h, w]
        key = tuple(tok.shape[-2:])
        by_size[key] = by_size[key] + tok if key in by_size else tok
    total = sum(upsample(s, grid) for s in by_size.values())
    return total[0] / len(maps)


def roi_from_segments(segments: torch.Tensor, heat: torch.Tensor, top_k: int) -> torch.Tensor:
    """RoI = union of the segments containing at least one of the ``top_k`` hottest grid cells.

    segments: [gh, gw] long labels; heat: [gh, gw]. Returns [gh, gw] bool. Runs on the tensors' device.
    """
    k = min(top_k, heat.numel())
    top = torch.topk(heat.flatten(), k).indices
    chosen = segments.flatten()[top].unique()
    return torch.isin(segments, chosen)
