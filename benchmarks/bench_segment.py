"""Segmentation benchmark at the full SD 1.5 / 512x512 feature layout.

    pytest benchmarks/bench_segment.py --benchmark-only

Input: 22 feature maps like LIME captures at 512x512 (ten 640x32x32, ten 1280x16x16, two 1280x8x8; 21,760
channels, ~40 MB fp32), filled with smoothly clustered random features (six spatial regions with soft
borders, one random prototype per region and layer, plus noise), clustered with k=8 on a 128x128 grid:
the fused matrix the materialized path builds is 16,384 x 21,760 fp32 = 1.43 GB.

Backends: ``native`` (default of ``segment``), ``materialized`` (the reference), scikit-learn's
``KMeans(algorithm="lloyd", init="k-means++", n_init=1, max_iter=300, tol=1e-4, copy_x=False)`` on the
materialized row-major matrix (CPU anchor; its time includes building the matrix), and cuML where it
imports (GPU). Everything runs on CUDA when available, else on the CPU. On CUDA two more rows run the
native backend as the engine does (the host reads the convergence flag every 16 iterations): eager
(``engine_eager``) and with the Lloyd iterations as CUDA-graph replays (``engine_graphed``, the
engine's ``LoopGraphs``; its warm-up round records the graph).

Time: wall clock per call (``torch.cuda.synchronize`` around it on CUDA). The native path gets one warm-up
round and 5 timed rounds; the materialized path and scikit-learn take minutes on a small CPU, so they are
timed once (no warm-up).

Peak memory (what each call needs on top of its inputs):
* CUDA: ``torch.cuda.max_memory_allocated()`` during the call minus ``memory_allocated()`` before it
  (cuML allocates through RMM, which torch does not see: its number covers the torch-side matrix only).
* CPU: torch's CPU allocator keeps no statistics and tracemalloc does not see it, so each backend runs in a
  fresh subprocess that builds the features, returns freed heap to the OS (``malloc_trim``), resets the
  kernel's resident-set high-water mark (``/proc/self/clear_refs`` = 5) and reports
  ``VmHWM - VmRSS(before the call)``: the growth of resident memory at the worst moment of the call. It
  counts every allocation that is touched (torch, numpy, MKL/OpenMP buffers) and none of the inputs.
  The probe runs ``max_iter=3``: the peak is reached during setup / the first iteration (every Lloyd
  iteration allocates the same temporaries), and 300 iterations of the materialized path would take
  minutes more.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from _common import sync  # noqa: E402
from lime_fast import segment as seg  # noqa: E402
from lime_fast.testing import clustered_features  # noqa: E402

LAYOUT = [(640, 32, 32)] * 10 + [(1280, 16, 16)] * 10 + [(1280, 8, 8)] * 2
GRID = (128, 128)
K, SEED = 8, 42
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROBE_MAX_ITER = 3
# BENCH_THREADS=n pins torch's intra-op threads (and scikit-learn's OpenMP/BLAS pools) for every backend.
THREADS = int(os.environ["BENCH_THREADS"]) if os.environ.get("BENCH_THREADS") else None
if THREADS:
    torch.set_num_threads(THREADS)


def make_features(device=DEVICE, seed=0, n_regions=6, noise=0.5):
    """Smoothly clustered random features in the SD 1.5 512x512 layout ([C, h, w] per layer)."""
    return clustered_features(GRID, [(c, h, w) for c, h, w in LAYOUT], seed=seed, n_regions=n_regions, noise=noise, device=device)


def have_sklearn():
    try:
        import sklearn.cluster  # noqa: F401
    except ImportError:
        return False
    return True


def have_cuml():
    if not torch.cuda.is_available():
        return False
    try:
        import cuml.cluster  # noqa: F401
    except ImportError:
        return False
    return True


ENGINE_ROWS = {"engine_eager": None, "engine_graphed": None}  # name -> LoopGraphs (made on first use)


def run_backend(name, maps, **kw):
    """Run one backend to completion; returns flat labels (on the CPU)."""
    if name in ENGINE_ROWS:
        from lime_fast.graphs import LoopGraphs

        if name == "engine_graphed" and ENGINE_ROWS[name] is None:
            ENGINE_ROWS[name] = LoopGraphs()
        return seg._segment(maps, GRID, k=K, seed=SEED, check_every=16, graphs=ENGINE_ROWS[name], **kw).labels.cpu()
    if name in ("native", "materialized", "cuml"):
        return seg._segment(maps, GRID, k=K, seed=SEED, backend=name, **kw).labels.cpu()
    if name == "sklearn":
        from sklearn.cluster import KMeans

        from threadpoolctl import threadpool_limits

        y = seg._materialize(maps, GRID, row_major=True).cpu().numpy()
        with threadpool_limits(THREADS):
            model = KMeans(n_clusters=K, init="k-means++", n_init=1, max_iter=kw.get("max_iter", 300), tol=1e-4,
                           random_state=SEED, algorithm="lloyd", copy_x=False).fit(y)
        return torch.from_numpy(model.labels_.astype("int64"))
    raise ValueError(name)


def kernels_per_lloyd_iteration(maps) -> float:
    """CUDA kernels one eager Lloyd iteration launches (torch.profiler): the difference between 24 and 8
    iterations run without early exit (``sync=False``), over 16, so setup and k-means++ cancel out."""
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for iters in (8, 24):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            seg._segment(maps, GRID, k=K, seed=SEED, sync=False, max_iter=iters)
            sync()
        counts.append(sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))
    return (counts[1] - counts[0]) / 16


def adjusted_rand_index(a: torch.Tensor, b: torch.Tensor) -> float:
    """Agreement of two labelings up to relabelling (1 = same partition)."""
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    table = torch.zeros(ka * kb, dtype=torch.float64).index_add_(0, a * kb + b, torch.ones(a.numel(), dtype=torch.float64))
    table = table.view(ka, kb)

    def pairs(t):
        return (t * (t - 1) / 2).sum()

    n = a.numel()
    sum_ij, sum_a, sum_b = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = sum_a * sum_b / (n * (n - 1) / 2)
    return float((sum_ij - expected) / ((sum_a + sum_b) / 2 - expected))


# ----------------------------------------------------------------------------------------------------
# peak-memory probes
# ----------------------------------------------------------------------------------------------------


def _status_kb():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0])
    return out


def _probe_cpu(name):
    """Runs in a fresh subprocess: peak resident growth of one call, in bytes."""
    maps = make_features("cpu")
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb()["VmRSS"]
    run_backend(name, maps, max_iter=PROBE_MAX_ITER)
    peak = _status_kb()["VmHWM"]
    return (peak - before) * 1024


def peak_memory(name, maps):
    if DEVICE == "cuda":
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_backend(name, maps, max_iter=PROBE_MAX_ITER)
        sync()
        return torch.cuda.max_memory_allocated() - base
    proc = subprocess.run([sys.executable, __file__, "--probe", name], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


# ----------------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------------

RESULTS: dict[str, dict] = {}
ROUNDS = {"native": (5, 1), "cuml": (5, 1), "materialized": (1, 0), "sklearn": (1, 0), "engine_eager": (5, 1),
          "engine_graphed": (5, 1)}


@pytest.fixture(scope="module")
def maps():
    return make_features()


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    try:  # benchmarks/conftest.py collects side-by-side ratios for its terminal summary
        sink = request.getfixturevalue("ratios")
    except pytest.FixtureLookupError:
        sink = None
    yield
    if not RESULTS:
        return
    lines = [
        "",
        f"segmentation at 512x512 SD 1.5 layout (grid {GRID[0]}x{GRID[1]}, {sum(c for c, _, _ in LAYOUT)} channels, "
        f"k={K}) on {DEVICE}"
        + (f" ({torch.cuda.get_device_name()})" if DEVICE == "cuda" else f", torch threads {torch.get_num_threads()}, "
           f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"),
        f"{'backend':<14}{'time (s)':>12}{'min (s)':>12}{'peak mem (MB)':>16}   labels vs materialized "
        "(identical / adjusted Rand index)",
    ]
    ref = RESULTS.get("materialized", {}).get("labels")
    for name in ("native", "materialized", "sklearn", "cuml", *ENGINE_ROWS):
        r = RESULTS.get(name)
        if not r:
            continue
        agree = "-"
        if ref is not None and name != "materialized":
            n_diff = int((r["labels"] != ref).sum())
            agree = "identical" if n_diff == 0 else f"{n_diff} pixels differ, ARI {adjusted_rand_index(r['labels'], ref):.4f}"
            if n_diff and name in ("sklearn", "cuml"):
                agree += " (own init / RNG)"
        lines.append(f"{name:<14}{r['mean']:>12.4f}{r['min']:>12.4f}{r['peak'] / 2**20:>16.1f}   {agree}")
    if "native" in RESULTS and "materialized" in RESULTS:
        n, m = RESULTS["native"], RESULTS["materialized"]
        lines.append(f"native / materialized: time {n['mean'] / m['mean']:.4f} ({m['mean'] / n['mean']:.0f}x faster), "
                     f"peak memory {n['peak'] / m['peak']:.4f} ({m['peak'] / n['peak']:.0f}x less)")
    if "native" in RESULTS and "sklearn" in RESULTS:
        n, s = RESULTS["native"], RESULTS["sklearn"]
        lines.append(f"native / sklearn:      time {n['mean'] / s['mean']:.4f}, peak memory {n['peak'] / s['peak']:.4f}")
    if "engine_eager" in RESULTS and "engine_graphed" in RESULTS:
        e, g = RESULTS["engine_eager"], RESULTS["engine_graphed"]
        lines.append(f"engine_graphed / engine_eager: time {g['mean'] / e['mean']:.4f} ({e['mean'] / g['mean']:.2f}x faster), "
                     f"min {g['min'] * 1e3:.1f} vs {e['min'] * 1e3:.1f} ms; one eager Lloyd iteration launches "
                     f"{e['kernels_per_iteration']:.1f} CUDA kernels (torch.profiler)")
    if sink is not None:
        sink.extend(line for line in lines if line.startswith(("native /", "engine_graphed /")))
    text = "\n".join(lines)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(text)
    else:
        print(text)
    out = ROOT / ".benchmarks"
    out.mkdir(exist_ok=True)
    (out / "segment_summary.txt").write_text(text + "\n")


@pytest.mark.parametrize("name", ["native", "engine_eager", "engine_graphed", "materialized", "sklearn", "cuml"])
def test_segment_backend(benchmark, maps, name):
    if name in ENGINE_ROWS and DEVICE != "cuda":
        pytest.skip("the engine's rows compare CUDA-graph replays with eager launches: CUDA only")
    if name == "sklearn" and not have_sklearn():
        pytest.skip("scikit-learn not installed (pip install lime-fast[dev])")
    if name == "cuml" and not have_cuml():
        pytest.skip("cuML not importable or no CUDA GPU (pip install lime-fast[cuml])")
    peak = peak_memory(name, maps)
    times, labels = [], []

    def target():
        sync()
        t0 = time.perf_counter()
        labels.append(run_backend(name, maps))
        sync()
        times.append(time.perf_counter() - t0)

    rounds, warmup = ROUNDS[name]
    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=warmup)
    timed = times[warmup:]
    RESULTS[name] = dict(mean=sum(timed) / len(timed), min=min(timed), peak=peak, labels=labels[-1])
    if name == "engine_eager":
        RESULTS[name]["kernels_per_iteration"] = kernels_per_lloyd_iteration(maps)
    benchmark.extra_info.update(peak_memory_bytes=peak, device=DEVICE)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--probe":
    print(json.dumps({"peak_bytes": _probe_cpu(sys.argv[2])}))
