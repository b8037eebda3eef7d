"""The service's Prometheus metrics, in the text exposition format (version 0.0.4).

A handful of counters and histograms, kept per app (tests run several apps in one process, so no
global registry). Written out by hand: the format is a few lines per metric and needs no library.

    lime_fast_requests_total{outcome}       /v1/edit requests by outcome (OUTCOMES)
    lime_fast_request_seconds               /v1/edit latency, arrival to response (histogram)
    lime_fast_queue_depth                   edits waiting for a batch (gauge)
    lime_fast_running_edits                 edits in the batch now running (gauge)
    lime_fast_batch_size                    edits per edit_batch (histogram)
    lime_fast_batch_seconds                 seconds per edit_batch (histogram)
    lime_fast_unet_evaluations_total        UNet evaluations (a batch's shared evaluations once)
    lime_fast_edits_total                   edits finished by the engine (including ones whose client left)
    lime_fast_refines_total                 refinements finished (POST /v1/refine: the edit pass again)
    lime_fast_refine_seconds                seconds per refinement (histogram)
"""

from __future__ import annotations

import threading

OUTCOMES = ("ok", "bad_request", "unauthorized", "too_large", "unsupported_media", "queue_full", "timeout",
            "disconnected", "error")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def outcome_of(status: int) -> str:
    """The ``outcome`` label for an HTTP status of /v1/edit."""
    return {200: "ok", 401: "unauthorized", 413: "too_large", 415: "unsupported_media", 503: "queue_full",
            504: "timeout", 499: "disconnected"}.get(status, "bad_request" if 400 <= status < 500 else "error")


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Counters and histograms of one app; ``render(queue_depth, running)`` gives the /metrics text."""

    def __init__(self):
        self._lock = threading.Lock()  # the worker threads and the event loop both record
        self.requests = {o: 0 for o in OUTCOMES}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.batch_seconds = Histogram(LATENCY_BUCKETS)
        self.unet_evals = 0
        self.edits = 0
        self.refines = 0
        self.refine_seconds = Histogram(LATENCY_BUCKETS)

    def observe_request(self, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[outcome_of(status)] += 1
            self.latency.observe(seconds)

    def observe_batch(self, size: int, seconds: float, unet_evals: int) -> None:
        with self._lock:
            self.batch_size.observe(size)
            self.batch_seconds.observe(seconds)
            self.unet_evals += int(unet_evals)
            self.edits += size

    def observe_refine(self, seconds: float, unet_evals: int) -> None:
        with self._lock:
            self.refine_seconds.observe(seconds)
            self.unet_evals += int(unet_evals)
            self.refines += 1

    def render(self, queue_depth: int, running: int) -> str:
        with self._lock:
            lines = [
                "# HELP lime_fast_requests_total /v1/edit requests by outcome.",
                "# TYPE lime_fast_requests_total counter",
                *(f'lime_fast_requests_total{{outcome="{o}"}} {n}' for o, n in self.requests.items()),
                "# HELP lime_fast_request_seconds /v1/edit latency from arrival to response, seconds.",
                "# TYPE lime_fast_request_seconds histogram",
                *self.latency.lines("lime_fast_request_seconds"),
                "# HELP lime_fast_queue_depth Edits waiting for a batch.",
                "# TYPE lime_fast_queue_depth gauge",
                f"lime_fast_queue_depth {queue_depth}",
                "# HELP lime_fast_running_edits Edits in the batches now running.",
                "# TYPE lime_fast_running_edits gauge",
                f"lime_fast_running_edits {running}",
                "# HELP lime_fast_batch_size Edits per edit_batch call.",
                "# TYPE lime_fast_batch_size histogram",
                *self.batch_size.lines("lime_fast_batch_size"),
                "# HELP lime_fast_batch_seconds Seconds per edit_batch call.",
                "# TYPE lime_fast_batch_seconds histogram",
                *self.batch_seconds.lines("lime_fast_batch_seconds"),
                "# HELP lime_fast_unet_evaluations_total UNet evaluations (one per step per batch).",
                "# TYPE lime_fast_unet_evaluations_total counter",
                f"lime_fast_unet_evaluations_total {self.unet_evals}",
                "# HELP lime_fast_edits_total Edits the engine finished.",
                "# TYPE lime_fast_edits_total counter",
                f"lime_fast_edits_total {self.edits}",
                "# HELP lime_fast_refines_total Refinements (POST /v1/refine) the engine finished.",
                "# TYPE lime_fast_refines_total counter",
                f"lime_fast_refines_total {self.refines}",
                "# HELP lime_fast_refine_seconds Seconds per refinement (the edit pass and the decode).",
                "# TYPE lime_fast_refine_seconds histogram",
                *self.refine_seconds.lines("lime_fast_refine_seconds"),
            ]
        return "\n".join(lines) + "\n"
