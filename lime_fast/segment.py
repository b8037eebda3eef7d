"""Feature-map segmentation for LIME: fuse per-layer UNet features on a pixel grid and cluster them.

LIME upsamples every captured feature map to a common grid (bilinear, ``align_corners=True``),
concatenates them along channels, L2-normalizes each pixel's vector and runs k-means on the result.

Backends of :func:`segment`
---------------------------

``"native"`` (default)
    Exact k-means on the fused, normalized matrix *without ever building it*. Bilinear upsampling is
    linear and separable, ``U_l = kron(A_l, B_l)`` with ``A_l`` ``[gh, h_l]`` and ``B_l`` ``[gw, w_l]``
    (two nonzeros per row each), so everything k-means needs is computed from the native maps:

    * pixel norms ``||x_p||^2 = sum_l u_lp^T (X_l X_l^T) u_lp`` use only the Gram entries between the
      (at most four) neighbouring native pixels of ``p``: ``|x|^2`` of each native pixel and the dot
      products with its right, lower, lower-right neighbours and the anti-diagonal pair of each 2x2 cell;
    * a weighted sum of normalized pixels ``sum_p w_p y_p`` (a centroid, or a chosen point during
      k-means++) is, per layer, ``X_l^T U_l^T (w / ||x||)``: the adjoint of the upsampling applied to the
      pixel weights (``A_l^T W B_l``), then a weighted sum of native pixels;
    * dot products of all pixels with ``m`` such vectors are ``sum_l U_l (X_l c_l) / ||x_p||``: native dot
      products, upsampled (``A_l S B_l^T``), summed over layers;
    * squared norms and shifts of centroids come from the centroids themselves (``k x sum C_l``, small);
    * distances are ``||y_p - c||^2 = ||y_p||^2 - 2 y_p.c + ||c||^2`` with ``||y_p||^2 = 1``, or 0 for an
      all-zero pixel (normalized to the zero vector, as ``F.normalize`` does);
    * the tol rule's ``mean_d var(Y[:, d]) = (mean_p ||y_p||^2 - ||mean_p y_p||^2) / D``, the mean being
      one more weighted sum.

    Per Lloyd iteration this reads the native features twice (``~sum_l h_l w_l C_l`` = 10M values at
    512x512, 1/143 of the fused matrix) and does O(k * grid) work for the (up/down)sampling.

    Layers with the same native size share one pair of interpolation matrices. On the CPU, fp32 inputs
    are used in place (no copy at all); on accelerators (and for fp16/bf16 inputs) each size group is
    concatenated once into an fp32 block (~40 MB for SD 1.5 at 512x512, against the 1.4 GB fused
    matrix) so that a pass over the features is a handful of large kernels.

``"materialized"``
    The reference: build the ``[gh*gw, sum C_l]`` fp32 matrix and cluster it.

``"cuml"``
    Materialize on the GPU and hand the matrix to ``cuml.cluster.KMeans`` (``pip install lime-fast[cuml]``).
    cuML uses its own initialisation and random streams, so its labels are not comparable one-to-one
    with the other two backends.

Both torch backends run the same k-means driver (:func:`_lloyd`) that only talks to a "point space"
object: ``dots(c)`` (dot products of every point with ``m`` vectors), ``combine(weights)``
(weighted sums of points) and ``points(idx)``. On the same input they therefore produce the same
clusters up to floating-point ties.

k-means semantics (deliberately close to scikit-learn's ``KMeans(algorithm="lloyd")``)
------------------------------------------------------------------------------------

* Init: greedy k-means++ with ``2 + int(log(k))`` local trials per centre. The first centre is a uniform
  random point; candidates are drawn with probability proportional to the squared distance to the
  closest chosen centre (inverse CDF on the fp64 cumulative sum); the candidate that minimizes the total
  potential wins. All random numbers come from a CPU ``torch.Generator`` seeded with ``seed``, so runs are
  deterministic and the same on CPU and CUDA; ``n_init`` restarts draw successively from that generator.
* Lloyd iterations: assign each point to the nearest centre (ties go to the lowest index), recompute
  centres as means. Stop when the labels did not change ("strict convergence") or when
  ``sum_j ||c_j^new - c_j^old||^2 <= tol * mean_d var(X[:, d])``; at most ``max_iter`` iterations.
  Without strict convergence a final assignment step labels the points with the final centres.
* Empty clusters (deterministic): when an assignment leaves clusters empty, the points farthest from their
  assigned centres (descending distance, ties by lowest point index) are moved, one each, into the empty
  clusters in ascending cluster order before the centres are recomputed (scikit-learn's rule).
* ``inertia`` is the sum of squared distances of the points to their assigned final centres;
  ``n_init > 1`` keeps the run with the lowest inertia (the first one on ties).

Precision and devices: all arithmetic is fp32 (fp64 for the pixel-norm quadratic forms, potentials and
sums), the same plain torch code on CPU and CUDA. If TF32 matmuls are enabled globally
(``torch.backends.cuda.matmul.allow_tf32``), both torch backends inherit the lower precision. No Triton
kernel: the work is a few skinny matmuls per iteration, already at BLAS / cuBLAS speed; on a GPU the
cost is kernel-launch and host-sync latency (one host sync per Lloyd iteration), not arithmetic.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .graphs import LoopGraphs
from .models import to_device

__all__ = ["KMeansResult", "kmeans", "segment", "upsample", "BACKENDS"]

BACKENDS = ("native", "materialized", "cuml")

_EPS = 1e-12  # F.normalize's default: a pixel vector is divided by max(||x||, eps)


# ---------------------------------------------------------------------------------------------------
# Upsampling
# ---------------------------------------------------------------------------------------------------


def upsample(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bilinear (``align_corners=True``) resize of ``maps`` ``[C, h, w]`` or ``[B, C, h, w]`` to ``grid``; fp32."""
    if maps.dim() not in (3, 4):
        raise ValueError(f"upsample expects [C, h, w] or [B, C, h, w] maps, got shape {tuple(maps.shape)}")
    gh, gw = _check_grid(grid)
    x = maps.float()
    batched = x.dim() == 4
    if not batched:
        x = x.unsqueeze(0)
    if tuple(x.shape[-2:]) == (gh, gw):
        out = x.clone() if x.data_ptr() == maps.data_ptr() else x
    else:
        out = F.interpolate(x, size=(gh, gw), mode="bilinear", align_corners=True)
    return out if batched else out.squeeze(0)


def _check_grid(grid) -> tuple[int, int]:
    try:
        gh, gw = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair of positive ints (gh, gw), got {grid!r}") from None
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must be a pair of positive ints (gh, gw), got {grid!r}")
    return gh, gw


def _interp_1d(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source index ``i0`` and weight ``t`` of 1-D linear interpolation (align_corners=True), fp64.

    Output ``o`` is ``(1 - t) * in[i0] + t * in[i0 + 1]`` with ``0 <= i0 <= max(n_in - 2, 0)``: at the last
    input sample the pair ``(n_in - 2, n_in - 1)`` with ``t = 1`` is used instead of PyTorch's clamped
    ``(n_in - 1, n_in - 1)`` with ``t = 0`` (the same value), so every output has a right neighbour.
    For ``n_in == 1`` the caller pads the input to two identical samples (``t`` is 0 there).
    """
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = torch.arange(n_out, dtype=torch.float64) * scale
    i0 = src.floor().clamp(0, max(n_in - 2, 0)).long()
    t = src - i0.double()
    return i0, t


def _interp_matrix(i0: torch.Tensor, t: torch.Tensor, n_in: int) -> torch.Tensor:
    """Dense ``[n_out, n_in]`` interpolation matrix (two nonzeros per row), fp64."""
    n_out = i0.numel()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0), 1.0 - t, accumulate=True)
    m.index_put_((rows, i0 + 1), t, accumulate=True)
    return m


_INTERP: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _interp_on(n_in: int, n_out: int, n_cols: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i0, t, matrix [n_out, n_cols] fp32) of ``_interp_1d`` on ``device``, built once per shape and device:
    a host-to-device copy waits for the queued GPU work, so later calls must not make one."""
    key = (n_in, n_out, n_cols, str(device))
    hit = _INTERP.get(key)
    if hit is None:
        i0, t = _interp_1d(n_in, n_out)
        m = _interp_matrix(i0, t, n_cols)
        hit = _INTERP[key] = (i0.to(device), t.to(device), m.to(device, torch.float32))
    return hit


# ---------------------------------------------------------------------------------------------------
# Point spaces: what the shared k-means driver needs to know about the points
# ---------------------------------------------------------------------------------------------------
#
# A space has ``n`` points of dimension ``dim``, ``sqnorms`` [n] (their squared norms) and three methods:
#   dots(c [m, dim]) -> [m, n]        dot products of every point with m vectors
#   combine(w [m, n]) -> [m, dim]     weighted sums of the points (centroids: w = one-hot / cluster size)
#   points(idx [m]) -> [m, dim]       the points themselves
# The column order of `dim` is the space's own (the native space orders channels by block).


class _DenseSpace:
    """Points are the rows of a dense matrix ``x`` ``[P, D]`` (row-major, or a transposed view of ``[D, P]``)."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.n, self.dim = x.shape
        self.device = x.device
        self.sqnorms = _row_sqnorms(x)

    def dots(self, c: torch.Tensor) -> torch.Tensor:  # [m, P]
        return c @ self.x.T

    def combine(self, weights: torch.Tensor) -> torch.Tensor:  # weights [m, P] -> [m, D]
        return weights @ self.x

    def points(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[idx]


class _NativeSpace:
    """Normalized, upsampled, concatenated feature maps, represented by the native maps only.

    Layers are grouped by native size (one pair of interpolation matrices per group). Within a group the
    channels live in "blocks" ``[C_b, h, w]`` fp32: on the CPU each fp32 contiguous layer is its own block
    and is used in place (no copy; per-layer matrix products cost the same there); on accelerators, and for
    layers that need a dtype conversion anyway, a group's layers are concatenated into one block so each
    pass over the features is a few large kernels instead of one per layer. A centre is one part
    ``[m, C_b]`` per block; blocks in group order form the columns of the space.
    """

    def __init__(self, features: Sequence[torch.Tensor], grid: tuple[int, int], eps: float = _EPS,
                 concat: bool | None = None):
        gh, gw = grid
        self.grid = grid
        self.n = gh * gw
        self.device = features[0].device
        in_place = self.device.type == "cpu" if concat is None else not concat
        order: dict[tuple[int, int], list[int]] = {}  # native size -> layer indices, first-appearance order
        for i, f in enumerate(features):
            order.setdefault((int(f.shape[-2]), int(f.shape[-1])), []).append(i)
        self.groups = []  # (blocks [(layer indices, x [C, h', w'])], A [gh, h'], B [gw, w'])
        sq = torch.zeros(gh, gw, dtype=torch.float64, device=self.device)
        for (h, w), idx in order.items():
            pad = h == 1 or w == 1  # give every output a right / lower neighbour: duplicate the single row / column
            blocks = []
            rest = []
            for i in idx:
                f = features[i]
                if in_place and not pad and f.dtype == torch.float32 and f.is_contiguous():
                    blocks.append(([i], f))
                else:
                    rest.append(i)
            if rest:
                x = torch.cat([features[i].float().reshape(-1, h, w) for i in rest], dim=0)
                if h == 1:
                    x = torch.cat([x, x], dim=1)
                if w == 1:
                    x = torch.cat([x, x], dim=2)
                blocks.append((rest, x))
            hp, wp = blocks[0][1].shape[1:]
            r0, ty, a = _interp_on(h, gh, hp, self.device)
            c0, tx, b = _interp_on(w, gw, wp, self.device)
            sq += _upsampled_sqnorms([x for _, x in blocks], r0, ty, c0, tx)
            self.groups.append((blocks, a, b))
        widths = [x.shape[0] for blocks, _, _ in self.groups for _, x in blocks]
        self.dim = sum(widths)
        offsets = [0]
        for wb in widths:
            offsets.append(offsets[-1] + wb)
        self.spans = list(zip(offsets[:-1], offsets[1:]))
        # column permutation from the original layer order to the block order
        starts = [0] * len(features)
        for i in range(1, len(features)):
            starts[i] = starts[i - 1] + int(features[i - 1].shape[0])
        self.perm = torch.cat([
            torch.arange(starts[i], starts[i] + int(features[i].shape[0]))
            for blocks, _, _ in self.groups for idx, _ in blocks for i in idx
        ])
        norm = sq.clamp_min(0).sqrt().float().reshape(-1)
        self.inv = 1.0 / norm.clamp_min(eps)
        self.sqnorms = (norm * self.inv).square()

    def dots(self, c: torch.Tensor) -> torch.Tensor:  # [m, P]
        gh, gw = self.grid
        m = c.shape[0]
        out = None
        spans = iter(self.spans)
        for blocks, a, b in self.groups:
            s = None
            for _, x in blocks:
                cb, h, w = x.shape
                lo, hi = next(spans)
                xb = x.view(cb, h * w)
                s = c[:, lo:hi] @ xb if s is None else s.addmm_(c[:, lo:hi], xb)  # native dots [m, h*w]
            s = (s.view(m * h, w) @ b.T).view(m, h, gw)  # upsample columns
            u = torch.matmul(a, s)  # upsample rows: [m, gh, gw]
            out = u if out is None else out.add_(u)
        return out.view(m, self.n) * self.inv

    def combine(self, weights: torch.Tensor) -> torch.Tensor:  # weights [m, P] -> [m, D]
        gh, gw = self.grid
        m = weights.shape[0]
        wx = (weights * self.inv).view(m, gh, gw)
        parts = []
        for blocks, a, b in self.groups:
            h, w = a.shape[1], b.shape[1]
            v = torch.matmul(a.T, wx)  # [m, h, gw]
            v = (v.reshape(m * h, gw) @ b).view(m, h * w)  # adjoint of the upsampling: [m, h*w]
            for _, x in blocks:
                parts.append(v @ x.view(x.shape[0], h * w).T)  # weighted sums of native pixels: [m, C_b]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def points(self, idx: torch.Tensor) -> torch.Tensor:
        w = torch.zeros(idx.numel(), self.n, device=self.device)
        w[torch.arange(idx.numel(), device=self.device), idx] = 1.0
        return self.combine(w)

    def layer_order(self, c: torch.Tensor) -> torch.Tensor:
        """Columns of ``c`` ``[m, D]`` (block order) rearranged into the original layer order."""
        out = torch.empty_like(c)
        out[:, self.perm.to(c.device)] = c
        return out


def _upsampled_sqnorms(blocks, r0, ty, c0, tx) -> torch.Tensor:
    """``||(U x)[p]||^2`` for every grid pixel of one group, from neighbour Gram entries only; fp64 [gh, gw].

    ``blocks``: the group's channel blocks ``[C_b, h, w]`` (``h, w >= 2``); their Gram entries add up.
    Pixel ``(i, j)`` mixes native pixels ``(r, c)``, ``(r, c+1)``, ``(r+1, c)``, ``(r+1, c+1)`` with
    ``r = r0[i]``, ``c = c0[j]`` and weights ``(1-ty)(1-tx)``, ``(1-ty) tx``, ``ty (1-tx)``, ``ty tx``; it needs
    ``|x|^2`` of each native pixel and the dot products with its right, lower and lower-right neighbours and
    of the anti-diagonal pair of each 2x2 cell.
    """
    h, w = blocks[0].shape[1:]
    dev = blocks[0].device
    n = torch.zeros(h, w, device=dev)
    hor = torch.zeros(h, w - 1, device=dev)
    ver = torch.zeros(h - 1, w, device=dev)
    d1 = torch.zeros(h - 1, w - 1, device=dev)
    d2 = torch.zeros(h - 1, w - 1, device=dev)
    # temporaries of at most 1M elements on the CPU (memory is the point there), 16M on accelerators (fewer launches)
    chunk = max(1, (1 << (20 if dev.type == "cpu" else 24)) // (h * w))
    for x in blocks:
        for xc in x.split(chunk, dim=0):
            n += (xc * xc).sum(0)
            hor += (xc[:, :, :-1] * xc[:, :, 1:]).sum(0)
            ver += (xc[:, :-1, :] * xc[:, 1:, :]).sum(0)
            d1 += (xc[:, :-1, :-1] * xc[:, 1:, 1:]).sum(0)
            d2 += (xc[:, :-1, 1:] * xc[:, 1:, :-1]).sum(0)
    n, hor, ver, d1, d2 = (t.double() for t in (n, hor, ver, d1, d2))
    r1, c1 = r0 + 1, c0 + 1

    def at(t, rr, cc):
        return t[rr][:, cc]

    a, b = (1 - ty)[:, None], ty[:, None]
    c, d = (1 - tx)[None, :], tx[None, :]
    w00, w01, w10, w11 = a * c, a * d, b * c, b * d
    sq = w00 * w00 * at(n, r0, c0) + w01 * w01 * at(n, r0, c1) + w10 * w10 * at(n, r1, c0) + w11 * w11 * at(n, r1, c1)
    cross = (
        w00 * w01 * at(hor, r0, c0)
        + w10 * w11 * at(hor, r1, c0)
        + w00 * w10 * at(ver, r0, c0)
        + w01 * w11 * at(ver, r0, c1)
        + w00 * w11 * at(d1, r0, c0)
        + w01 * w10 * at(d2, r0, c0)
    )
    return sq + 2.0 * cross


# ---------------------------------------------------------------------------------------------------
# The shared k-means driver
# ---------------------------------------------------------------------------------------------------


@dataclass
class KMeansResult:
    """``labels`` ``[P]`` long, ``centroids`` ``[k, D]`` fp32, ``inertia`` (sum of squared distances), ``n_iter``.

    From the engine's device path (``sync=False``) ``inertia`` and ``n_iter`` are 0-dim device tensors
    and ``converged`` a 0-dim bool tensor (read them after the work is done); otherwise Python numbers."""

    labels: torch.Tensor
    centroids: torch.Tensor
    inertia: float | torch.Tensor
    n_iter: int | torch.Tensor
    converged: bool | torch.Tensor = True


def _draws(gen: torch.Generator, n: int, k: int, n_init: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every random number k-means++ uses, drawn up front on the CPU and copied to ``device`` at once,
    without waiting for queued GPU work (``to_device``): (first centre index [n_init] long, candidate
    uniforms [n_init, k - 1, trials] fp64), in the order the draws are consumed (per restart: the first
    centre, then each later centre's trials)."""
    trials = 2 + int(math.log(k))
    firsts, unis = [], []
    for _ in range(n_init):
        firsts.append(torch.randint(n, (1,), generator=gen))
        unis.append(torch.stack([torch.rand(trials, generator=gen, dtype=torch.float64) for _ in range(k - 1)])
                    if k > 1 else torch.zeros(0, trials, dtype=torch.float64))
    return to_device(torch.cat(firsts), device), to_device(torch.stack(unis), device)


def _pick(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` for a 0-dim device index without a host sync (plain indexing would call ``.item()``)."""
    return t.index_select(0, idx.view(1))[0]


def _kmeans_pp(space, k: int, first: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Greedy k-means++ (``2 + int(log k)`` local trials) from pre-drawn random numbers; returns the initial
    centres ``[k, D]``. Device work only: the winning candidate stays a device index."""
    n = space.n
    centers = [space.points(first.view(1))]
    closest = (space.sqnorms - 2.0 * space.dots(centers[0])[0] + centers[0].square().sum()).clamp_min_(0)
    pot = closest.double().sum()
    for j in range(1, k):
        r = uniforms[j - 1] * pot
        cand = torch.searchsorted(closest.double().cumsum(0), r).clamp_(max=n - 1)
        c = space.points(cand)
        d = space.sqnorms[None, :] - 2.0 * space.dots(c) + c.square().sum(1)[:, None]
        d = torch.minimum(d.clamp_min_(0), closest[None, :])
        pots = d.double().sum(1)
        best = torch.argmin(pots)
        closest, pot = _pick(d, best), _pick(pots, best)
        centers.append(c.index_select(0, best.view(1)))
    return torch.cat(centers, dim=0)


def _scores(space, c):
    """``||c_j||^2 - 2 y_p . c_j`` ``[k, P]``: the squared distance up to the point's own ``||y_p||^2``."""
    return c.square().sum(1)[:, None] - 2.0 * space.dots(c)


def _assign(space, c):
    """Labels (nearest centre, ties to the lowest index) and squared distance to it."""
    best, labels = _scores(space, c).min(dim=0)
    return labels, (best + space.sqnorms).clamp_min_(0)


def _update(space, onehot, dist, counts):
    """Centres as means of their members, after relocating points into empty clusters (see module doc).

    Without a host sync: the j-th empty cluster (ascending) takes the j-th farthest point (descending
    distance, ties by lowest index); for non-empty clusters the relocation adds zeros."""
    k = counts.shape[0]
    empty = counts == 0
    far = torch.sort(dist, descending=True, stable=True).indices[:k]
    src = far.gather(0, (torch.cumsum(empty.long(), 0) - 1).clamp_min(0))  # [k]: the point cluster j would take
    # moves[j, p] = 1 where empty cluster j takes point p (distinct points, as they are distinct ranks):
    # that point's column becomes moves' column. Dense arithmetic on [k, P] rather than two accumulating
    # index_put_ calls, each a sort of its indices on CUDA: fewer kernels, the same 0 / 1 values.
    moves = torch.zeros_like(onehot).scatter_(1, src[:, None], empty.to(onehot.dtype)[:, None])
    onehot = onehot * (1.0 - moves.sum(0)) + moves
    counts = onehot.sum(1)
    return space.combine(onehot / counts.clamp_min(1)[:, None])


def _tolerance(space, tol: float) -> torch.Tensor:
    """The absolute shift tolerance, ``tol * mean_d var(X[:, d])``, as a 0-dim fp64 device tensor."""
    if tol == 0:
        return torch.zeros((), dtype=torch.float64, device=space.device)
    mean = space.combine(torch.full((1, space.n), 1.0 / space.n, device=space.device))
    var_total = space.sqnorms.double().mean() - mean.double().square().sum()
    return tol * var_total.clamp_min(0) / space.dim


def _lloyd(space, k: int, *, seed: int, n_init: int, max_iter: int, tol: float, sync: bool = True,
           check_every: int = 1, graphs=None):
    """Seeded k-means++ + Lloyd on a point space -> (labels [P], centres [k, D], inertia, n_iter, converged).

    sync: read the on-device convergence flag on the host every ``check_every`` iterations and stop
    early (free on the CPU); ``sync=False`` never reads it: exactly ``max_iter`` iterations run, those after
    convergence change nothing, and the results stay on the device (the engine's path on CUDA).
    graphs: a ``lime_fast.graphs.LoopGraphs`` to run the Lloyd iterations as CUDA-graph replays."""
    if k < 1 or k > space.n:
        raise ValueError(f"k must be in [1, {space.n}] (number of points), got {k}")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be >= 1, got n_init={n_init}, max_iter={max_iter}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    firsts, uniforms = _draws(gen, space.n, k, n_init, space.device)
    tol_abs = _tolerance(space, float(tol))
    best = None
    for r in range(n_init):
        c0 = _kmeans_pp(space, k, firsts[r], uniforms[r])
        labels, dist, centres, n_iter, done = _lloyd_single(space, c0, k, max_iter, tol_abs, sync, check_every, graphs)
        inertia = dist.double().sum()
        if best is None:
            best = (labels, centres, inertia, n_iter, done)
        else:  # keep the lowest inertia (the first on ties), without a host sync
            better = inertia < best[2]
            best = tuple(torch.where(better, new, old) for new, old in zip((labels, centres, inertia, n_iter, done), best))
    labels, centres, inertia, n_iter, done = best
    if sync:
        return labels, centres, float(inertia), int(n_iter), bool(done)
    return labels, centres, inertia, n_iter, done


# Lloyd iterations per graph replay when the host never reads the convergence flag (sync=False).
_CHUNK = 16
_NO_GRAPHS = LoopGraphs(enabled=False)  # the same loop, run eagerly, when the caller passes no graphs


def _lloyd_single(space, c, k: int, max_iter: int, tol_abs: torch.Tensor, sync: bool = True, check_every: int = 1,
                  graphs=None):
    """Lloyd iterations from initial centres ``c`` ``[k, D]`` as device work with an on-device stop flag.

    Iteration ``i`` is: assign -> stop if the centre shift of iteration ``i-1`` was ``<= tol_abs`` (the
    current labels are final) -> recompute centres -> stop if the labels equal those of iteration ``i-1``
    (strict convergence: keep these labels, distances to the new centres) -> next assignment. Once the
    flag is set, or ``max_iter`` iterations ran, every later iteration keeps the state as it is
    (``torch.where``), so running more iterations than needed changes nothing: the host reads the flag
    only every ``check_every`` iterations (``sync``), or never. The iterations run in chunks of that many
    (``_CHUNK`` without sync), each one replay of a CUDA graph when ``graphs`` (a
    ``lime_fast.graphs.LoopGraphs``) replays on this device. Returns (labels [P], squared distance of each
    point to its centre [P], centres [k, D], n_iter, done) with n_iter and done 0-dim device tensors.
    """
    chunk = max(1, check_every) if sync else min(_CHUNK, max_iter)
    data = {"space": _space_tree(space), "cols": torch.arange(space.n, device=space.device), "tol": tol_abs,
            "limit": torch.full((), max_iter, device=space.device)}  # (a fill kernel: no host-to-device copy)

    def body(d, st):
        space_ = _space_from(d["space"])
        for _ in range(chunk):
            st = _lloyd_step(space_, st, k, d["cols"], d["tol"], d["limit"])
        return st

    stop = (lambda st: bool(st["done"])) if sync else None
    runner = graphs if graphs is not None else _NO_GRAPHS
    state = runner.run(("lloyd", k, chunk), body, data, _lloyd_start(space, c), space.device,
                       repeats=-(-max_iter // chunk), stop=stop)
    done = state["done"] | (state["shift"] <= tol_abs) if max_iter > 0 else state["done"]
    return state["labels"], state["dist"], state["c"], state["n_iter"], done


def _lloyd_start(space, c) -> dict:
    """The Lloyd loop's state before its first iteration."""
    labels, dist = _assign(space, c)
    zero = functools.partial(torch.zeros, (), device=space.device)
    return {"c": c, "labels": labels, "labels_old": labels, "dist": dist,
            "shift": zero(dtype=torch.float64), "n_iter": zero(dtype=torch.long), "it": zero(dtype=torch.long),
            "done": zero(dtype=torch.bool)}


def _lloyd_step(space, st: dict, k: int, cols, tol_abs, limit) -> dict:
    """One Lloyd iteration (see ``_lloyd_single``) -> the new state; a no-op once done or past ``limit``."""
    labels, labels_old, c, dist, shift = st["labels"], st["labels_old"], st["c"], st["dist"], st["shift"]
    started = st["it"] > 0
    done = st["done"] | (started & (shift <= tol_abs))
    onehot = torch.zeros(k, space.n, device=space.device)
    onehot[labels, cols] = 1.0
    counts = onehot.sum(1)  # (torch.bincount would synchronise on CUDA)
    new = _update(space, onehot, dist, counts)
    scores = _scores(space, new)
    strict = (labels == labels_old).all() & started
    step = ~done & (st["it"] < limit)  # this iteration counts
    moves = step & ~strict  # labels changed: move on to the new centres' assignment
    best, new_labels = scores.min(dim=0)
    kept_dist = (scores.gather(0, labels[None, :])[0] + space.sqnorms).clamp_min_(0)
    return {
        "c": torch.where(step, new, c),
        "labels": torch.where(moves, new_labels, labels),
        "labels_old": torch.where(moves, labels, labels_old),
        "dist": torch.where(moves, (best + space.sqnorms).clamp_min_(0), torch.where(step, kept_dist, dist)),
        "shift": torch.where(moves, (new - c).double().square().sum(), shift),
        "n_iter": st["n_iter"] + step.long(),
        "it": st["it"] + 1,
        "done": done | (step & strict),
    }


def _space_tree(space) -> dict:
    """A point space as a pytree (its attributes and its class), for ``LoopGraphs``' static copies."""
    return {"type": type(space), **vars(space)}


def _space_from(tree: dict):
    space = object.__new__(tree["type"])
    space.__dict__.update({name: v for name, v in tree.items() if name != "type"})
    return space


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def kmeans(
    x: torch.Tensor,
    k: int = 8,
    *,
    seed: int = 42,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> KMeansResult:
    """k-means of the rows of ``x`` ``[P, D]`` (see the module docstring for the exact semantics).

    The data are centred (their mean subtracted, in fp32) before clustering, like scikit-learn does, which
    only improves the precision of the ``|x|^2 - 2 x.c + |c|^2`` distance expansion; centroids are
    reported in the original coordinates.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects a [P, D] matrix, got shape {tuple(x.shape)}")
    xf = x.float()
    mean = xf.mean(0, keepdim=True)
    space = _DenseSpace(xf - mean)
    labels, cents, inertia, n_iter, done = _lloyd(space, k, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol)
    return KMeansResult(labels=labels, centroids=cents + mean, inertia=inertia, n_iter=n_iter, converged=done)


def _check_features(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    feats = list(features)
    if not feats:
        raise ValueError("segment needs at least one feature map")
    for i, f in enumerate(feats):
        if not isinstance(f, torch.Tensor) or f.dim() != 3:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"feature map {i} must be a [C, h, w] tensor of one image, got {shape}")
        if f.device != feats[0].device:
            raise ValueError(f"feature map {i} is on {f.device}, map 0 on {feats[0].device}: put them on one device")
    return feats


def _row_sqnorms(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norms of the rows of ``x`` ``[P, D]``, reading it in cache-friendly chunks."""
    if x.dim() == 2 and x.stride(0) == 1 and x.stride(1) != 1:  # transposed view of a [D, P] matrix
        out = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for ch in x.T.split(1024, dim=0):
            out += ch.square().sum(0)
        return out
    return torch.cat([ch.square().sum(1) for ch in x.split(4096, dim=0)])


def _materialize(feats: list[torch.Tensor], grid: tuple[int, int], *, row_major: bool = False) -> torch.Tensor:
    """The fused, L2-normalized ``[gh*gw, sum C_l]`` fp32 matrix.

    Stored as ``[D, P]`` and returned as its transposed view unless ``row_major`` (then a C-contiguous
    ``[P, D]`` tensor, what cuML and scikit-learn want). Peak memory: the matrix plus one upsampled layer.
    """
    gh, gw = grid
    p = gh * gw
    d = sum(int(f.shape[0]) for f in feats)
    dev = feats[0].device
    y = torch.empty((p, d) if row_major else (d, p), device=dev)
    sq = torch.zeros(p, device=dev)
    off = 0
    for f in feats:
        c = int(f.shape[0])
        up = upsample(f, grid).reshape(c, p)
        for ch in up.split(1024, dim=0):
            sq += ch.square().sum(0)
        if row_major:
            y[:, off : off + c] = up.T
        else:
            y[off : off + c] = up
        off += c
        del up
    inv = 1.0 / sq.sqrt().clamp_min(_EPS)
    if row_major:
        y.mul_(inv[:, None])
        return y
    y.mul_(inv[None, :])
    return y.T


def _segment(
    features: Sequence[torch.Tensor],
    grid: tuple[int, int],
    *,
    k: int = 8,
    seed: int = 42,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    backend: str = "native",
    sync: bool = True,
    check_every: int = 1,
    graphs=None,
) -> KMeansResult:
    """Like :func:`segment` but returns the full result (flat labels, centroids in layer order).

    graphs: a ``lime_fast.graphs.LoopGraphs`` (the engine's) to replay the native backend's Lloyd
    iterations as CUDA graphs (the materialized backend would need a second copy of its matrix)."""
    feats = _check_features(features)
    grid = _check_grid(grid)
    opts = dict(seed=seed, n_init=n_init, max_iter=max_iter, tol=tol, sync=sync, check_every=check_every)
    if backend == "native":
        space = _NativeSpace(feats, grid)
        labels, cents, inertia, n_iter, done = _lloyd(space, k, **opts, graphs=graphs)
        return KMeansResult(labels, space.layer_order(cents) if sync else cents, inertia, n_iter, done)
    if backend == "materialized":
        space = _DenseSpace(_materialize(feats, grid))
        return KMeansResult(*_lloyd(space, k, **opts))
    if backend == "cuml":
        return _segment_cuml(feats, grid, k=k, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol)
    raise ValueError(f"unknown segmentation backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def segment(
    features: Sequence[torch.Tensor],
    grid: tuple[int, int],
    *,
    k: int = 8,
    seed: int = 42,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    backend: str = "native",
    sync: bool = True,
    check_every: int = 1,
) -> torch.Tensor:
    """Cluster the fused per-pixel features of one image; returns labels ``[gh, gw]`` long on the features' device.

    ``features``: per-layer maps ``[C_l, h_l, w_l]`` (any sizes and dtype, one device). Each map is
    upsampled to ``grid`` (bilinear, align_corners=True), the maps are concatenated along channels, every
    pixel vector is L2-normalized (scaled by ``1 / max(||x||, 1e-12)``) and k-means'd with ``k`` clusters.
    ``backend``: ``"native"`` (exact, never builds the fused matrix), ``"materialized"`` (builds it) or
    ``"cuml"`` (cuML on the GPU). See the module docstring.
    ``sync``/``check_every``: the host reads the on-device convergence flag every ``check_every`` Lloyd
    iterations and stops early; ``sync=False`` never reads it (exactly ``max_iter`` iterations, no host
    sync at all: what the engine runs on CUDA). Both give the same labels when k-means converges within
    ``max_iter``.
    """
    res = _segment(features, grid, k=k, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol, backend=backend,
                   sync=sync, check_every=check_every)
    gh, gw = _check_grid(grid)
    return res.labels.reshape(gh, gw)


# ---------------------------------------------------------------------------------------------------
# cuML
# ---------------------------------------------------------------------------------------------------


def _segment_cuml(feats, grid, *, k, seed, n_init, max_iter, tol) -> KMeansResult:
    try:
        from cuml.cluster import KMeans as CuKMeans  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError(
            "segment(backend='cuml') needs RAPIDS cuML: pip install lime-fast[cuml] "
            f"(or use backend='native'); importing cuml failed: {e}"
        ) from e
    y = _materialize(feats, grid, row_major=True)
    model = CuKMeans(
        n_clusters=k,
        n_init=n_init,
        max_iter=max_iter,
        tol=tol,
        random_state=seed,
        init="scalable-k-means++",
        output_type="numpy",
    )
    model.fit(y if y.is_cuda else y.cpu().numpy())
    import numpy as np

    labels = torch.as_tensor(np.asarray(model.labels_).astype(np.int64)).to(y.device)
    cents = torch.as_tensor(np.asarray(model.cluster_centers_, dtype=np.float32)).to(y.device)
    inertia = float(getattr(model, "inertia_", float("nan")))
    n_iter = int(getattr(model, "n_iter_", 0) or 0)
    return KMeansResult(labels=labels, centroids=cents, inertia=inertia, n_iter=n_iter)
