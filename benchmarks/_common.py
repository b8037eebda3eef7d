"""Timing helpers every benchmark shares (one home): synchronize, time a call, time a pytest-benchmark row."""

from __future__ import annotations

import statistics
import time

import torch


def sync() -> None:
    """Wait for queued CUDA work (a no-op without CUDA): device work is asynchronous."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, rounds: int = 1) -> tuple[float, object]:
    """Median seconds of ``rounds`` synchronized calls of ``fn()``, and the last call's result."""
    times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def pedantic(benchmark, fn, rounds: int = 3) -> tuple[float, float | None]:
    """Time ``fn`` as one pytest-benchmark row (one warm-up round, then ``rounds``, each synchronized):
    (median seconds, peak GiB of CUDA memory over the rounds, None without CUDA)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(lambda: (fn(), sync()), rounds=rounds, warmup_rounds=1, iterations=1)
    return benchmark.stats.stats.median, torch.cuda.max_memory_allocated() / 2**30 if cuda else None
