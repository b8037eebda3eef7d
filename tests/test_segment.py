"""Tests for lime_fast.segment: upsampling, the shared k-means driver, native vs materialized, cuML glue."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lime_fast import segment as seg
from lime_fast.segment import KMeansResult, kmeans, segment, upsample
from lime_fast.testing import clustered_features

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The matrices here are tiny: intra-op threads only add overhead, and on a shared 2-core machine an
    OpenMP team waiting for a descheduled thread makes these tests 10-100x slower. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# SD 1.5 layer layout (ten maps at 1/16 of the image, ten at 1/32, two at 1/64) at reduced size and width.
SD_LIKE = [(8, 8, 8)] * 10 + [(16, 4, 4)] * 10 + [(16, 2, 2)] * 2




def dense_upsampling(h, w, grid):
    """Dense ``U`` ``[gh*gw, h*w]`` built by interpolating the identity basis with F.interpolate."""
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    up = F.interpolate(basis, size=grid, mode="bilinear", align_corners=True)
    return up.reshape(h * w, -1).T


def dense_fused(maps, grid):
    """Reference fused matrix (float64): upsample, concatenate, normalize (F.normalize semantics)."""
    cols = [dense_upsampling(m.shape[1], m.shape[2], grid) @ m.double().reshape(m.shape[0], -1).T for m in maps]
    x = torch.cat(cols, dim=1)
    return x, F.normalize(x, dim=1)


def assert_same_clustering(a: KMeansResult, b: KMeansResult, *, cent_atol=1e-4):
    if not torch.equal(a.labels, b.labels):  # a floating-point tie may flip a pixel
        flipped = int((a.labels != b.labels).sum())
        assert flipped <= max(1, a.labels.numel() // 200), f"{flipped} pixels differ"
        assert a.inertia == pytest.approx(b.inertia, rel=1e-5)
        return
    assert a.inertia == pytest.approx(b.inertia, rel=1e-5)
    assert a.n_iter == b.n_iter
    torch.testing.assert_close(a.centroids, b.centroids, atol=cent_atol, rtol=0)


# ----------------------------------------------------------------------------------------------------
# upsampling and the native pieces against dense interpolation matrices
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 4, 6), (2, 3, 7, 5)])
@pytest.mark.parametrize("grid", [(16, 12), (4, 6), (1, 9)])
def test_upsample_matches_interpolate(shape, grid):
    x = torch.randn(shape).half()
    out = upsample(x, grid)
    assert out.dtype == torch.float32 and out.shape == (*shape[:-2], *grid)
    x4 = x.float() if x.dim() == 4 else x.float()[None]
    ref = F.interpolate(x4, size=grid, mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, ref if x.dim() == 4 else ref[0])


def test_upsample_same_size_is_a_copy_and_validates():
    x = torch.randn(3, 4, 5)
    out = upsample(x, (4, 5))
    torch.testing.assert_close(out, x)
    out += 1
    assert not torch.equal(out, x)  # never aliases the input
    with pytest.raises(ValueError):
        upsample(torch.randn(4, 5), (8, 8))
    with pytest.raises(ValueError):
        upsample(x, (0, 8))


@pytest.mark.parametrize("n_in,n_out", [(8, 32), (4, 32), (2, 32), (5, 24), (3, 40), (1, 7), (6, 1), (7, 7), (9, 4)])
def test_interp_matrix_matches_interpolate(n_in, n_out):
    i0, t = seg._interp_1d(n_in, n_out)
    mat = seg._interp_matrix(i0, t, max(n_in, 2))[:, :n_in]
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in)
    ref = F.interpolate(basis, size=n_out, mode="linear", align_corners=True)[:, 0, :].T
    torch.testing.assert_close(mat, ref, atol=1e-12, rtol=0)
    assert int(i0.max()) <= max(n_in - 2, 0) and float(t.min()) >= 0 and float(t.max()) <= 1


@pytest.mark.parametrize("concat", [False, True])
@pytest.mark.parametrize("grid", [(32, 32), (24, 40)])
def test_native_pieces_match_dense_matrices(grid, concat):
    layout = [(6, 8, 8), (5, 8, 8), (7, 4, 5), (3, 2, 2), (4, 1, 3), (2, 8, 8)]
    maps = clustered_features(grid, layout, seed=3)
    maps[5] = maps[5].half()  # a layer that needs a conversion joins a concatenated block
    space = seg._NativeSpace(maps, grid, concat=concat)
    widths = [c for c, _, _ in layout]
    x, y = dense_fused(maps, grid)
    p = grid[0] * grid[1]
    n_blocks = sum(len(blocks) for blocks, _, _ in space.groups)
    assert n_blocks == (4 if concat else 6)  # sizes 8x8, 4x5, 2x2, 1x3; or per layer where possible
    if not concat:  # fp32 contiguous layers are used in place
        assert space.groups[0][0][0][1].data_ptr() == maps[0].data_ptr()

    # pixel norms from neighbour Gram entries only
    norms = torch.linalg.vector_norm(x, dim=1)
    torch.testing.assert_close((1 / space.inv).double(), norms, rtol=1e-5, atol=0)
    torch.testing.assert_close(space.sqnorms.double(), torch.ones(p, dtype=torch.float64), rtol=1e-5, atol=0)
    for blocks, _, _ in space.groups:  # each group's quadratic form alone
        idx = [i for ids, _ in blocks for i in ids]
        h, w = maps[idx[0]].shape[1:]
        r0, ty = seg._interp_1d(h, grid[0])
        c0, tx = seg._interp_1d(w, grid[1])
        got = seg._upsampled_sqnorms([xb for _, xb in blocks], r0, ty, c0, tx).reshape(-1)
        u = dense_upsampling(h, w, grid)
        ref = sum(((u @ maps[i].double().reshape(maps[i].shape[0], -1).T) ** 2).sum(1) for i in idx)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)

    # adjoint: combine(weights) == weights @ Y  (centroid = weighted mean of normalized upsampled pixels)
    wts = torch.rand(3, p, generator=torch.Generator().manual_seed(1))
    got = space.layer_order(space.combine(wts)).double()
    torch.testing.assert_close(got, wts.double() @ y, rtol=1e-4, atol=1e-4)

    # dot products with arbitrary centre vectors: dots(c) == c @ Y^T
    c = torch.randn(4, y.shape[1], generator=torch.Generator().manual_seed(2))
    offsets = np.cumsum([0] + widths)
    per_layer = [c[:, offsets[i] : offsets[i + 1]] for i in range(len(widths))]
    c_blocks = torch.cat([per_layer[i] for blocks, _, _ in space.groups for ids, _ in blocks for i in ids], 1)
    torch.testing.assert_close(space.dots(c_blocks).double(), c.double() @ y.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(space.layer_order(c_blocks), c)

    # points(idx) are the normalized upsampled pixels themselves
    idx = torch.tensor([0, p - 1, 77])
    got = space.layer_order(space.points(idx)).double()
    torch.testing.assert_close(got, y[idx], rtol=1e-5, atol=1e-5)

    # variance used by the tol rule
    dense = seg._DenseSpace(y.float())
    assert seg._tolerance(space, 1.0) == pytest.approx(float(y.var(0, unbiased=False).mean()), rel=1e-4)
    assert seg._tolerance(dense, 1.0) == pytest.approx(float(y.var(0, unbiased=False).mean()), rel=1e-4)


def test_materialize_matches_dense_reference():
    grid = (12, 20)
    maps = clustered_features(grid, [(4, 3, 5), (6, 6, 10), (2, 1, 1)], seed=5)
    _, y = dense_fused(maps, grid)
    torch.testing.assert_close(seg._materialize(maps, grid).double(), y, rtol=1e-5, atol=1e-6)
    rm = seg._materialize(maps, grid, row_major=True)
    assert rm.is_contiguous()
    torch.testing.assert_close(rm.double(), y, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# native vs materialized
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid,layout,k,n_init,seed",
    [
        ((32, 32), SD_LIKE, 8, 1, 42),  # SD 1.5 layout, reduced
        ((24, 40), [(8, 6, 10)] * 4 + [(16, 3, 5)] * 4 + [(16, 2, 3)] * 2, 8, 1, 42),  # non-square
        ((32, 32), SD_LIKE, 5, 3, 7),
        ((20, 20), [(6, 5, 5), (6, 20, 20), (4, 1, 1)], 4, 2, 0),  # includes an un-upsampled and a 1x1 map
    ],
)
def test_native_matches_materialized(grid, layout, k, n_init, seed):
    maps = clustered_features(grid, layout, seed=seed)
    a = seg._segment(maps, grid, k=k, seed=seed, n_init=n_init, backend="native")
    b = seg._segment(maps, grid, k=k, seed=seed, n_init=n_init, backend="materialized")
    assert a.labels.dtype == torch.long and a.centroids.shape == (k, sum(c for c, _, _ in layout))
    assert_same_clustering(a, b)
    lab = segment(maps, grid, k=k, seed=seed, n_init=n_init)  # default backend is native
    assert lab.shape == grid and lab.dtype == torch.long
    assert torch.equal(lab.reshape(-1), a.labels)


def test_native_matches_materialized_with_zero_pixels_and_low_precision():
    grid = (16, 24)
    maps = clustered_features(grid, [(8, 8, 12), (8, 4, 6), (8, 2, 3)], seed=11)
    for m in maps:  # a block with all-zero native pixels -> exactly zero upsampled pixels at its interior
        m[:, : m.shape[1] // 2, : m.shape[2] // 2] = 0
    space = seg._NativeSpace(maps, grid)
    assert int((space.sqnorms == 0).sum()) > 0  # zero pixels stay zero (normalized to 0, not NaN)
    a = seg._segment(maps, grid, k=6, backend="native")
    b = seg._segment(maps, grid, k=6, backend="materialized")
    assert_same_clustering(a, b)
    for dt in (torch.float16, torch.bfloat16):
        low = [m.to(dt) for m in maps]
        ref = seg._segment([m.float() for m in low], grid, k=6)
        got = seg._segment(low, grid, k=6)
        assert torch.equal(got.labels, ref.labels)


def test_seeded_runs_repeat_exactly():
    grid = (24, 40)
    maps = clustered_features(grid, SD_LIKE, seed=4, noise=0.8)
    for backend in ("native", "materialized"):
        first = seg._segment(maps, grid, k=8, seed=123, backend=backend)
        again = seg._segment(maps, grid, k=8, seed=123, backend=backend)
        assert torch.equal(first.labels, again.labels)
        assert torch.equal(first.centroids, again.centroids)
        assert first.inertia == again.inertia and first.n_iter == again.n_iter


def test_segment_validation():
    maps = clustered_features((8, 8), [(4, 4, 4)])
    with pytest.raises(ValueError, match="backend"):
        segment(maps, (8, 8), backend="gpu")
    with pytest.raises(ValueError, match="C, h, w"):
        segment([torch.randn(1, 4, 4, 4)], (8, 8))
    with pytest.raises(ValueError, match="at least one"):
        segment([], (8, 8))
    with pytest.raises(ValueError, match="k must be"):
        segment(maps, (4, 4), k=17)
    with pytest.raises(ValueError, match="grid"):
        segment(maps, (8,))


# ----------------------------------------------------------------------------------------------------
# the k-means driver
# ----------------------------------------------------------------------------------------------------


def blobs(n_per=60, centers=((0, 0, 0), (8, 0, 0), (0, 8, 0), (0, 0, 8), (8, 8, 8)), seed=0, offset=100.0):
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(centers, dtype=torch.float32) + offset
    truth = torch.arange(len(centers)).repeat_interleave(n_per)
    x = c[truth] + 0.5 * torch.randn(len(truth), c.shape[1], generator=g)
    perm = torch.randperm(len(truth), generator=g)
    return x[perm], truth[perm], c


def test_kmeans_recovers_blobs():
    x, truth, c = blobs()
    res = kmeans(x, k=5, seed=0)
    assert res.labels.shape == truth.shape and res.centroids.shape == (5, 3) and res.centroids.dtype == torch.float32
    # same partition up to a relabelling
    pairs = set(zip(res.labels.tolist(), truth.tolist()))
    assert len(pairs) == 5
    order = torch.cdist(res.centroids, c).argmin(1)
    assert sorted(order.tolist()) == list(range(5))
    torch.testing.assert_close(res.centroids, c[order], atol=0.2, rtol=0)
    ref = sum(float(((x[res.labels == j] - res.centroids[j]) ** 2).sum()) for j in range(5))
    assert res.inertia == pytest.approx(ref, rel=1e-4)


def test_kmeans_n_init_keeps_lowest_inertia_and_is_deterministic():
    x, _, _ = blobs(n_per=30, seed=1)
    single = kmeans(x, k=9, seed=0, n_init=1)  # the first of the n_init runs draws the same numbers
    best = kmeans(x, k=9, seed=0, n_init=4)
    assert best.inertia <= single.inertia
    again = kmeans(x, k=9, seed=0, n_init=4)
    assert torch.equal(best.labels, again.labels) and best.inertia == again.inertia


def test_kmeans_plus_plus_picks_one_point_per_blob():
    x, truth, _ = blobs(seed=2, offset=0.0)
    space = seg._DenseSpace(x)
    first, uniforms = seg._draws(torch.Generator().manual_seed(0), space.n, 5, 1, space.device)
    init = seg._kmeans_pp(space, 5, first[0], uniforms[0])
    chosen = torch.cdist(init, x).argmin(1)
    assert torch.cdist(init, x).min(1).values.max() < 1e-5  # centres are data points
    assert sorted(truth[chosen].tolist()) == list(range(5))


def test_empty_cluster_moves_farthest_point():
    # Four points on a line and a centre far from all of them: cluster 2 is empty after the first
    # assignment, so the point farthest from its centre (x=10, distance 25 to centre 5) is moved into it.
    x = torch.tensor([[0.0], [1.0], [9.0], [10.0]])
    space = seg._DenseSpace(x)
    init = torch.tensor([[0.5], [5.0], [100.0]])
    zero = torch.zeros((), dtype=torch.float64)
    labels, dist, cents, n_iter, done = seg._lloyd_single(space, init, 3, 300, zero)
    assert bool(done)
    assert labels.tolist() == [0, 0, 1, 2]
    torch.testing.assert_close(cents, torch.tensor([[0.5], [9.0], [10.0]]))
    assert float(dist.sum()) == pytest.approx(0.5)
    # deterministic: two clusters empty at once take the farthest points in ascending cluster order
    init = torch.tensor([[4.5], [100.0], [200.0]])
    labels, _, cents, _, _ = seg._lloyd_single(space, init, 3, 1, zero)
    # all at centre 0 (4.5); distances 20.25, 12.25, 20.25, 30.25 -> x=10 -> cluster 1, x=0 -> cluster 2, {1, 9} stay
    torch.testing.assert_close(cents, torch.tensor([[5.0], [10.0], [0.0]]))


def test_empty_cluster_relocation_native_matches_materialized():
    # Same initial centres in both spaces, one of them far from every pixel (-y_p of some pixel, at distance 2):
    # after the first assignment it is empty and both spaces relocate the same farthest pixel into it.
    grid = (16, 20)
    maps = clustered_features(grid, [(8, 8, 10), (8, 4, 5), (8, 2, 3)], seed=8)
    native = seg._NativeSpace(maps, grid)
    dense = seg._DenseSpace(seg._materialize(maps, grid))
    init = dense.points(torch.tensor([3, 100, 250, 311])).clone()
    init[3] = -init[3]
    a = seg._lloyd_single(dense, init, 4, 300, seg._tolerance(dense, 1e-4))
    b = seg._lloyd_single(native, init[:, native.perm], 4, 300, seg._tolerance(native, 1e-4))
    first = seg._assign(dense, init)[0]
    assert int((first == 3).sum()) == 0  # the relocation path was taken
    assert torch.equal(a[0], b[0]) and a[3] == b[3]
    torch.testing.assert_close(native.layer_order(b[2]), a[2], atol=1e-5, rtol=0)
    assert int((a[0] == 3).sum()) > 0


@pytest.mark.parametrize("tol", [0.0, 1e-4, 1e-2, 0.5])
def test_lloyd_matches_sklearn_from_same_init(tol):
    sk = pytest.importorskip("sklearn.cluster")
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(150, 5, generator=g) + 3 * i for i in range(4)]) + 0.3 * torch.randn(600, 5, generator=g)
    init = x[torch.tensor([0, 1, 2, 3, 4, 5])].clone()
    space = seg._DenseSpace(x - x.mean(0))
    labels, dist, out, n_iter, _ = seg._lloyd_single(space, init - x.mean(0), 6, 300, seg._tolerance(space, tol))
    ref = sk.KMeans(n_clusters=6, init=init.double().numpy(), n_init=1, max_iter=300, tol=tol, algorithm="lloyd")
    ref.fit(x.double().numpy())
    assert n_iter == ref.n_iter_
    assert labels.tolist() == ref.labels_.tolist()
    np.testing.assert_allclose((out + x.mean(0)).numpy(), ref.cluster_centers_, atol=1e-4)
    assert float(dist.double().sum()) == pytest.approx(ref.inertia_, rel=1e-4)


def test_kmeans_inertia_close_to_sklearn_on_segment_matrix():
    sk = pytest.importorskip("sklearn.cluster")
    grid = (32, 32)
    maps = clustered_features(grid, SD_LIKE, seed=9)
    ours = seg._segment(maps, grid, k=5, n_init=3, seed=0)
    y = seg._materialize(maps, grid, row_major=True).double().numpy()
    ref = sk.KMeans(n_clusters=5, n_init=3, random_state=0, algorithm="lloyd").fit(y)
    assert ours.inertia <= ref.inertia_ * (1 + 1e-3)  # same optimum (or better) on clusterable data


def test_kmeans_validation():
    with pytest.raises(ValueError):
        kmeans(torch.randn(10), k=2)
    with pytest.raises(ValueError):
        kmeans(torch.randn(3, 2), k=4)
    with pytest.raises(ValueError):
        kmeans(torch.randn(10, 2), k=2, n_init=0)


# ----------------------------------------------------------------------------------------------------
# cuML glue
# ----------------------------------------------------------------------------------------------------


class _FakeCuKMeans:
    """Stand-in for cuml.cluster.KMeans: keyword-only constructor, fit(X) sets labels_ etc."""

    instances: list = []

    def __init__(self, *, n_clusters=8, max_iter=300, tol=1e-4, verbose=False, random_state=None,
                 init="scalable-k-means++", n_init="auto", oversampling_factor=2.0, max_samples_per_batch=32768,
                 output_type=None):
        self.params = dict(n_clusters=n_clusters, max_iter=max_iter, tol=tol, random_state=random_state,
                           init=init, n_init=n_init, output_type=output_type)
        _FakeCuKMeans.instances.append(self)

    def fit(self, X):
        self.X = X
        arr = np.asarray(X)  # the glue passes host arrays on CPU (CUDA tensors on GPU)
        res = kmeans(torch.from_numpy(np.ascontiguousarray(arr)), self.params["n_clusters"], seed=self.params["random_state"])
        self.labels_ = res.labels.numpy().astype(np.int32)  # cuML returns int32 labels
        self.cluster_centers_ = res.centroids.numpy()
        self.inertia_ = res.inertia
        self.n_iter_ = res.n_iter
        return self


@pytest.fixture
def fake_cuml(monkeypatch):
    pkg = types.ModuleType("cuml")
    cluster = types.ModuleType("cuml.cluster")
    cluster.KMeans = _FakeCuKMeans
    pkg.cluster = cluster
    monkeypatch.setitem(sys.modules, "cuml", pkg)
    monkeypatch.setitem(sys.modules, "cuml.cluster", cluster)
    _FakeCuKMeans.instances = []
    return _FakeCuKMeans


def test_cuml_glue(fake_cuml):
    grid = (16, 20)
    maps = clustered_features(grid, [(8, 8, 10), (8, 4, 5), (8, 2, 3)], seed=2)
    lab = segment(maps, grid, k=5, seed=7, n_init=2, max_iter=50, tol=1e-3, backend="cuml")
    (model,) = fake_cuml.instances
    assert model.params == dict(n_clusters=5, max_iter=50, tol=1e-3, random_state=7, init="scalable-k-means++",
                                n_init=2, output_type="numpy")
    x = np.asarray(model.X)
    assert x.shape == (320, 24) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(x, seg._materialize(maps, grid).numpy(), rtol=1e-6, atol=1e-7)
    assert lab.shape == grid and lab.dtype == torch.long and lab.device == maps[0].device
    assert torch.equal(lab.reshape(-1), torch.from_numpy(model.labels_.astype(np.int64)))
    res = seg._segment(maps, grid, k=5, seed=7, backend="cuml")
    assert res.centroids.shape == (5, 24) and res.n_iter == fake_cuml.instances[-1].n_iter_


def test_cuml_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuml", None)  # makes `import cuml` raise ImportError
    monkeypatch.delitem(sys.modules, "cuml.cluster", raising=False)
    maps = clustered_features((8, 8), [(4, 4, 4)])
    with pytest.raises(ImportError, match=r"pip install lime-fast\[cuml\]"):
        segment(maps, (8, 8), backend="cuml")


def _cuml_available() -> bool:
    try:
        return importlib.util.find_spec("cuml") is not None and torch.cuda.is_available()
    except (ImportError, ValueError):
        return False


@pytest.mark.skipif(not _cuml_available(), reason="needs RAPIDS cuML and a CUDA GPU (pip install lime-fast[cuml])")
def test_cuml_real():
    grid = (32, 32)
    maps = [m.cuda() for m in clustered_features(grid, SD_LIKE, seed=1, n_regions=4, noise=0.2)]
    lab = segment(maps, grid, k=4, backend="cuml")
    ref = segment(maps, grid, k=4, backend="native")
    assert lab.device == maps[0].device and lab.dtype == torch.long and lab.shape == grid
    # cuML has its own init / RNG: compare partitions up to relabelling (adjusted Rand index)
    adjusted_rand_score = pytest.importorskip("sklearn.metrics").adjusted_rand_score

    assert adjusted_rand_score(lab.reshape(-1).cpu().numpy(), ref.reshape(-1).cpu().numpy()) > 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_native_on_cuda_matches_cpu():
    grid = (32, 32)
    maps = clustered_features(grid, SD_LIKE, seed=6)
    cpu = seg._segment(maps, grid, k=8)
    gpu = seg._segment([m.cuda() for m in maps], grid, k=8)
    assert gpu.labels.device.type == "cuda"
    mat = seg._segment([m.cuda() for m in maps], grid, k=8, backend="materialized")
    assert_same_clustering(gpu, mat)
    assert_same_clustering(
        KMeansResult(gpu.labels.cpu(), gpu.centroids.cpu(), gpu.inertia, gpu.n_iter), cpu, cent_atol=1e-4
    )


@pytest.mark.parametrize("backend", ["native", "materialized"])
@pytest.mark.parametrize("k, n_init, max_iter, tol", [(8, 1, 300, 1e-4), (6, 3, 300, 1e-4), (12, 1, 5, 0.0), (8, 2, 300, 0.0)])
def test_sync_free_lloyd_gives_the_same_clusters(backend, k, n_init, max_iter, tol):
    """The engine's CUDA path never reads the convergence flag (sync=False: every iteration up to
    max_iter runs, frozen once converged); the result equals the early-exit loop's, bit for bit,
    including restarts (n_init > 1), the max_iter cap (5) and empty-cluster relocation (k = 12)."""
    for seed, (grid, layout) in enumerate([((32, 32), [(40, 8, 8), (64, 4, 4), (64, 2, 2)]),
                                           ((17, 23), [(30, 9, 11), (20, 5, 6)])]):
        feats = clustered_features(grid, layout, seed=seed, n_regions=4 + seed, noise=0.3)
        opts = dict(k=k, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol, backend=backend)
        a = seg._segment(feats, grid, **opts)
        b = seg._segment(feats, grid, **opts, sync=False)
        c = seg._segment(feats, grid, **opts, check_every=4)
        assert isinstance(b.n_iter, torch.Tensor) and isinstance(a.n_iter, int)
        assert torch.equal(a.labels, b.labels) and a.n_iter == int(b.n_iter) and a.inertia == float(b.inertia)
        assert a.converged == bool(b.converged) and (a.converged or a.n_iter == max_iter)
        assert torch.equal(a.labels, c.labels) and a.n_iter == c.n_iter


@pytest.mark.parametrize("sync, check_every, max_iter", [(True, 1, 300), (True, 4, 300), (True, 16, 7), (False, 1, 300),
                                                         (False, 1, 21)])
def test_lloyd_chunks_through_loop_graphs(sync, check_every, max_iter):
    """The engine's graphed Lloyd loop (``LoopGraphs``, its static buffers exercised on the CPU with
    ``emulate=True``) gives the eager loop's clusters: the same labels, iteration count and flag,
    including a max_iter that is not a multiple of the chunk (7 with chunks of 16, 21 with 16) and
    two restarts. Features of the same shapes reuse one graph; another grid records another."""
    from lime_fast.graphs import LoopGraphs

    graphs = LoopGraphs(emulate=True)
    grids = [(32, 32), (32, 32), (17, 23)]
    layouts = [[(40, 8, 8), (64, 4, 4)], [(40, 8, 8), (64, 4, 4)], [(30, 9, 11), (20, 5, 6)]]
    for seed, (grid, layout) in enumerate(zip(grids, layouts)):
        feats = clustered_features(grid, layout, seed=seed, n_regions=5, noise=0.4)
        opts = dict(k=8, seed=seed, n_init=2, max_iter=max_iter, tol=0.0, sync=sync, check_every=check_every)
        eager = seg._segment(feats, grid, **opts)
        graphed = seg._segment(feats, grid, **opts, graphs=graphs)
        assert torch.equal(eager.labels, graphed.labels)
        assert int(eager.n_iter) == int(graphed.n_iter) <= max_iter
        assert bool(eager.converged) == bool(graphed.converged)
        # the same operations on static copies of the same values: centres equal up to rounding
        torch.testing.assert_close(graphed.centroids, eager.centroids, atol=1e-6, rtol=1e-5)
    assert graphs.num_graphs == 2 and graphs.stats.eager_calls == 0
    chunk = check_every if sync else min(seg._CHUNK, max_iter)
    if not sync:  # every chunk runs: ceil(max_iter / chunk) replays per restart, 2 restarts, 3 runs
        assert graphs.stats.replays == 3 * 2 * -(-max_iter // chunk)


def test_loop_graphs_copy_in_chain_and_stop():
    """LoopGraphs' own contract, on a counting loop: replays chain through the static state, stop() ends
    the run, the caller's tensors are copied in (never aliased) and a copy comes back; eager chains the
    bodies' states."""
    from lime_fast.graphs import LoopGraphs

    def body(data, st):
        return {"x": st["x"] + data["step"]}

    def run(graphs, start, repeats, stop=None):
        state = {"x": torch.tensor([start])}
        out = graphs.run("count", body, {"step": torch.tensor([2])}, state, "cpu", repeats=repeats, stop=stop)
        return state, out

    graphed = LoopGraphs(emulate=True)
    state, out = run(graphed, 1, 5)
    static = next(iter(graphed._graphs.values())).state
    assert int(out["x"]) == 11 and int(state["x"]) == 1 and out["x"] is not static["x"] and graphed.num_graphs == 1
    state, out = run(graphed, 0, 100, stop=lambda st: int(st["x"]) >= 6)
    assert int(out["x"]) == 6 and graphed.stats.replays == 5 + 3
    # at most max_entries kept, least recently used dropped first
    small = LoopGraphs(emulate=True, max_entries=2)
    for shape in [(1,), (2,), (1,), (3,), (1,)]:
        out = small.run("count", body, {"step": torch.full(shape, 2)}, {"x": torch.zeros(shape, dtype=torch.long)}, "cpu",
                        repeats=3)
        assert out["x"].shape == shape and bool((out["x"] == 6).all())
    assert [k[1][0][0] for k in small._graphs] == [(3,), (1,)]
    state, out = run(LoopGraphs(enabled=False), 1, 5)
    assert int(out["x"]) == 11 and int(state["x"]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sync", [True, False])
def test_lloyd_cuda_graphs_match_eager_on_the_device(sync):
    """Real capture: the Lloyd chunk records as one CUDA graph (no op in it syncs or fails to capture),
    its replays give the eager loop's clusters, and a second image of the same layout replays the same
    graph."""
    from lime_fast.graphs import LoopGraphs

    graphs = LoopGraphs()
    grid = (64, 64)
    for seed in (0, 1):
        feats = [m.cuda() for m in clustered_features(grid, SD_LIKE, seed=seed, n_regions=6, noise=0.4)]
        opts = dict(k=8, seed=seed, max_iter=300, tol=1e-4, sync=sync, check_every=16)
        eager = seg._segment(feats, grid, **opts)
        graphed = seg._segment(feats, grid, **opts, graphs=graphs)
        assert not graphs.stats.failed, graphs.stats.failed
        assert torch.equal(eager.labels, graphed.labels) and int(eager.n_iter) == int(graphed.n_iter)
    assert graphs.stats.captures == 1 and graphs.stats.replays >= 2
