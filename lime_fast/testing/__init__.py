"""Synthetic inputs shared by the tests and the benchmarks (one place, so both measure the same thing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clustered_features(grid, layout, *, seed=0, n_regions=5, noise=0.4, dtype=torch.float32, device="cpu"):
    """Per-layer maps ``[C, h, w]`` whose pixels follow a few smooth spatial regions, plus noise.

    Each region has a random prototype per layer; a layer is the region one-hot map area-resampled to the
    layer's size (soft borders) times the prototypes, plus Gaussian noise, so k-means is well conditioned.
    """
    g = torch.Generator().manual_seed(seed)
    gh, gw = grid
    cy = torch.rand(n_regions, generator=g) * gh
    cx = torch.rand(n_regions, generator=g) * gw
    yy, xx = torch.meshgrid(torch.arange(gh).float(), torch.arange(gw).float(), indexing="ij")
    region = ((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2).argmin(0)
    onehot = F.one_hot(region, n_regions).permute(2, 0, 1).float()[None]
    maps = []
    for c, h, w in layout:
        proto = torch.randn(n_regions, c, generator=g)
        soft = F.interpolate(onehot, size=(h, w), mode="area")[0]
        m = torch.einsum("nc,nhw->chw", proto, soft) + noise * torch.randn(c, h, w, generator=g)
        maps.append(m.to(device=device, dtype=dtype))
    return maps
