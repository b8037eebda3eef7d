"""Batch-job throughput: the local runner against rows and batch size, and Ray's overhead on the same job.

    python -m pytest benchmarks/bench_batch.py --benchmark-only -s     # -s also shows the table as it goes

CPU (default): the tiny random-weight model (UNet 2.1 M parameters) on 64 x 64 pictures, 6 steps
(capture 2, regularized 0..4, 32-cell grid, top-k 8), fp32. This measures the runner around the
engine (manifest checks, PNG writes with fsync, records, batching), not a real model's cost.
GPU (CUDA): the full-size random-weight SD 1.5 replica, saved once as an fp16 diffusers folder, on
512 x 512 pictures at LIME_BENCH_BATCH_STEPS steps (default 10, to fit the device check's time).

Figures: ``Summary.seconds`` of ``lime_fast.batch.run`` (the whole job: checking every row, editing,
writing) into a fresh DIR each round, after one warm-up job (the engine is cached across jobs, as in
a long-lived process). edits/s = rows / seconds.

Ray: the same job on Ray Data against the local runner, in one run. Ray is started once (its start-up
time is reported apart); each Ray job includes starting its actors and loading one engine per worker,
which is what a real job pays. CPU: local (torch's default threads) vs Ray with 1 worker x 2 CPUs
(2 torch threads, then 1) and 2 workers x 1 CPU (this machine's 2 cores). GPU: local vs Ray with 1
worker x 1 GPU. Skipped with a reason when Ray Data is not installed.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from lime_fast import batch
from lime_fast.demo import shapes_image

CUDA = torch.cuda.is_available()
if CUDA:
    SIZE, ROWS, BATCHES, ROUNDS = 512, [8, 24], [1, 4, 8], 1
    CFG = dict(steps=int(os.environ.get("LIME_BENCH_BATCH_STEPS", "10")))
    RAY_ROWS = 16
else:
    SIZE, ROWS, BATCHES, ROUNDS = 64, [8, 32], [1, 4], 2
    CFG = dict(steps=6, capture_step=2, reg_steps=(0, 4), grid_size=32, top_k=8)
    RAY_ROWS = 16
INSTRUCTIONS = ["make the red circle blue", "turn the square green", "make the triangle yellow", "add snow"]
THROUGHPUT: dict[tuple[int, int], float] = {}  # (rows, batch size) -> edits/s
RAY: dict[str, float] = {}  # name -> seconds


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """(model folder, {rows: manifest}) with max(ROWS) distinct pictures."""
    from lime_fast.testing.tiny import replica_pipeline, save_tiny

    root = tmp_path_factory.mktemp("bench_batch")
    if CUDA:
        model = root / "replica-fp16"
        replica_pipeline().to(torch.float16).save_pretrained(model, safe_serialization=True)
    else:
        model = save_tiny(root / "tiny", heads=8)
    n = max(ROWS + [RAY_ROWS])
    for i in range(n):
        shapes_image(SIZE, seed=i).save(root / f"img{i}.png")
    manifests = {}
    for rows in sorted(set(ROWS + [RAY_ROWS])):
        m = root / f"m{rows}.jsonl"
        with open(m, "w") as f:
            for i in range(rows):
                f.write(json.dumps({"id": f"r{i}", "image": f"img{i}.png", "instruction": INSTRUCTIONS[i % 4]}) + "\n")
        manifests[rows] = m
    batch.run(manifests[min(ROWS)], root / "warmup", model=str(model), config=CFG, progress=False)
    return model, manifests, root


_DIRS = iter(range(10**9))


def _timed_job(benchmark, job, rows, rounds=ROUNDS, **kw):
    """Median Summary.seconds of `rounds` runs of the job, each into a fresh DIR (else all rows are skipped)."""
    model, manifests, root = job
    seconds = []

    def fresh_dir():
        return (manifests[rows], root / f"out{next(_DIRS)}"), {}

    def one(manifest, out):
        s = batch.run(manifest, out, model=str(model), config=CFG, progress=False, **kw)
        assert s.done == rows and s.failed == 0, s
        seconds.append(s.seconds)

    benchmark.pedantic(one, setup=fresh_dir, rounds=rounds, iterations=1)
    return sorted(seconds)[len(seconds) // 2]


@pytest.mark.parametrize("batch_size", BATCHES)
@pytest.mark.parametrize("rows", ROWS)
def test_local_runner(benchmark, job, rows, batch_size):
    seconds = _timed_job(benchmark, job, rows, batch_size=batch_size)
    THROUGHPUT[(rows, batch_size)] = rows / seconds
    print(f"\nlocal runner: {rows} rows, batch size {batch_size}: {seconds:.2f} s, {rows / seconds:.2f} edits/s")


@pytest.fixture(scope="module")
def ray_instance():
    try:
        import ray
        import ray.data
    except ImportError:
        pytest.skip("Ray Data is not installed (pip install 'lime-fast[ray]')")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    RAY["ray.init"] = time.perf_counter() - t
    yield ray
    ray.shutdown()


RAY_SETUPS = {  # name -> run() keyword arguments
    "local": {},
    **({"ray 1 worker x 1 GPU": dict(ray=True, workers=1, num_gpus_per_worker=1, num_cpus_per_worker=1)} if CUDA else {
        "ray 1 worker x 2 CPUs": dict(ray=True, workers=1, num_cpus_per_worker=2),
        # the same with 1 torch thread: on 2 cores a 2-thread worker competes with Ray's own processes
        "ray 1 worker x 2 CPUs, 1 thread": dict(ray=True, workers=1, num_cpus_per_worker=2, threads=1),
        "ray 2 workers x 1 CPU": dict(ray=True, workers=2, num_cpus_per_worker=1),
    }),
}


@pytest.mark.parametrize("name", list(RAY_SETUPS))
def test_ray_overhead(benchmark, job, ray_instance, name):
    # one job per setup: a Ray job starts its actors and loads one engine per worker each time
    RAY[name] = _timed_job(benchmark, job, RAY_ROWS, rounds=1, **RAY_SETUPS[name])
    print(f"\n{name}: {RAY_ROWS} rows in {RAY[name]:.2f} s ({RAY_ROWS / RAY[name]:.2f} edits/s)")


@pytest.fixture(scope="module", autouse=True)
def report(ratios):
    """After the module: edits/s per (rows, batch size), and Ray's time against the local runner."""
    yield
    where = torch.cuda.get_device_name() if CUDA else "CPU"
    model = f"SD 1.5 replica {SIZE}x{SIZE} fp16, {CFG['steps']} steps" if CUDA else f"tiny model {SIZE}x{SIZE} fp32, {CFG['steps']} steps"
    if THROUGHPUT:
        cells = " | ".join(f"{r} rows x batch {b}: {v:.2f}" for (r, b), v in sorted(THROUGHPUT.items()))
        ratios.append(f"bench_batch local runner ({where}, {model}), edits/s: {cells}")
    if "local" in RAY and len(RAY) > 2:
        cells = " | ".join(f"{k} {v:.2f} s ({v / RAY['local']:.2f}x)" for k, v in RAY.items() if k not in ("local", "ray.init"))
        ratios.append(f"bench_batch Ray vs local ({where}, {model}, {RAY_ROWS} rows, batch size 1): local {RAY['local']:.2f} s | "
                      f"{cells} | ray.init (once) {RAY['ray.init']:.2f} s")
