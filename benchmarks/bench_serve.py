"""`lime-fast serve` under load: requests/s and p50/p95 latency at concurrency 1, 8 and 64, with and
without dynamic batching, from a real HTTP client over loopback.

    python benchmarks/bench_serve.py                       # the table, as in benchmarks/RESULTS.md
    python benchmarks/bench_serve.py --max-batch 16 --concurrency 8 64
    python -m pytest benchmarks/bench_serve.py --benchmark-only -s   # the same, in the benchmark suite

The server is the real command (`python -m lime_fast.cli serve`) in its own process, with the shipped
`shapes-ip2p` model and its own settings (64 x 64 pictures, 20 steps), on the CPU unless CUDA is
present. Two servers run one after the other: "batched" (--max-batch, default 16, --batch-window-ms 10)
and "sequential" (--max-batch 1: each request alone, in arrival order). Each gets the same requests:
at concurrency c, c clients each send requests back to back (a closed loop) until N requests are done
(N = 8, 32, 128 for c = 1, 8, 64); every request is a different picture and instruction
(``make_sample``) with the model's default settings, so all of them may share a batch. Latency is
from sending the request to the last byte of the PNG. One warm-up request per server first.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = {1: 8, 8: 32, 64: 128}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lime-fast serve` in a subprocess on a free loopback port; a context manager."""

    def __init__(self, max_batch: int, window_ms: float, device: str | None, threads: int | None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lime_fast.cli", "serve", "--model", "shapes-ip2p", "--port", str(self.port),
               "--max-batch", str(max_batch), "--batch-window-ms", str(window_ms), "--max-queue", "1024",
               "--log-level", "warning"]
        cmd += ["--device", device] if device else []
        cmd += ["--threads", str(threads)] if threads else []
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("LIME_FAST_TOKEN", None)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self):
        import httpx

        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lime-fast serve exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("lime-fast serve did not come up within 180 s")
            time.sleep(0.25)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _bodies(n: int) -> list[tuple[bytes, str]]:
    from lime_fast.testing.shapes import make_sample

    out = []
    for i in range(n):
        s = make_sample(8_000_000 + i, 64)
        buf = io.BytesIO()
        s.source.save(buf, format="PNG")
        out.append((buf.getvalue(), s.instruction))
    return out


async def _load(url: str, bodies, concurrency: int, n: int) -> tuple[float, list[float], list[int]]:
    """Closed loop: `concurrency` clients send `n` requests in all. Returns (wall seconds, latencies,
    the batch size each request ran in)."""
    import httpx

    latencies: list[float] = []
    batches: list[int] = []
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker():
            for i in counter:
                body, instruction = bodies[i % len(bodies)]
                t = time.perf_counter()
                r = await client.post("/v1/edit", data={"instruction": instruction}, files={"image": ("in.png", body, "image/png")})
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"request {i}: {r.status_code} {r.text[:300]}")
                batches.append(int(r.headers["x-lime-batch-size"]))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies, batches


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def measure(concurrencies=(1, 8, 64), max_batch: int = 16, window_ms: float = 10.0, device: str | None = None,
            threads: int | None = None, scale: float = 1.0, progress=print) -> dict:
    """{(mode, concurrency): {"rps", "p50", "p95", "mean_batch", "requests"}} for mode in batched, sequential."""
    bodies = _bodies(max(REQUESTS.values()))
    results = {}
    for mode, mb, win in (("batched", max_batch, window_ms), ("sequential", 1, 0.0)):
        with Server(mb, win, device, threads) as srv:
            asyncio.run(_load(srv.url, bodies, 1, 1))  # warm-up
            for c in concurrencies:
                n = max(c, round(REQUESTS.get(c, 2 * c) * scale))
                wall, lat, batches = asyncio.run(_load(srv.url, bodies, c, n))
                row = {"rps": n / wall, "p50": _pct(lat, 50), "p95": _pct(lat, 95), "mean_batch": sum(batches) / len(batches),
                       "requests": n}
                results[(mode, c)] = row
                progress(f"{mode:10s} concurrency {c:3d}: {n:4d} requests, {row['rps']:.2f} req/s, p50 {row['p50']:.2f} s, "
                         f"p95 {row['p95']:.2f} s, mean batch {row['mean_batch']:.1f}")
    return results


def table(results: dict, concurrencies, max_batch: int, window_ms: float) -> str:
    lines = ["| concurrency | requests | batched req/s | sequential req/s | ratio | batched p50 / p95 (s) | "
             "sequential p50 / p95 (s) | mean batch |", "|---|---|---|---|---|---|---|---|"]
    for c in concurrencies:
        b, s = results[("batched", c)], results[("sequential", c)]
        lines.append(f"| {c} | {b['requests']} | {b['rps']:.2f} | {s['rps']:.2f} | {b['rps'] / s['rps']:.2f}x | "
                     f"{b['p50']:.2f} / {b['p95']:.2f} | {s['p50']:.2f} / {s['p95']:.2f} | {b['mean_batch']:.1f} |")
    lines.append(f"\nbatched: --max-batch {max_batch} --batch-window-ms {window_ms:g}; sequential: --max-batch 1")
    return "\n".join(lines)


def _where(device: str | None) -> str:
    import torch

    if (device or "").startswith("cuda") or (device is None and torch.cuda.is_available()):
        return torch.cuda.get_device_name()
    return f"CPU, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"


def test_serve_throughput(benchmark, ratios):
    """One measurement at concurrency 1, 8, 64 (about 5 minutes on this 2-core CPU)."""
    pytest = __import__("pytest")
    pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'lime-fast[serve]'")
    pytest.importorskip("httpx")
    out = {}
    benchmark.pedantic(lambda: out.update(measure()), rounds=1, iterations=1)
    cells = " | ".join(f"c={c}: {out[('batched', c)]['rps']:.2f} vs {out[('sequential', c)]['rps']:.2f} req/s "
                       f"({out[('batched', c)]['rps'] / out[('sequential', c)]['rps']:.2f}x)" for c in (1, 8, 64))
    ratios.append(f"bench_serve ({_where(None)}, shapes-ip2p 64x64, 20 steps), batched (max 16) vs sequential: {cells}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--window-ms", type=float, default=10.0)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, help="the server's torch CPU threads (default: torch's)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the request counts (8, 32, 128)")
    args = p.parse_args(argv)
    results = measure(args.concurrency, args.max_batch, args.window_ms, args.device, args.threads, args.scale)
    print(f"\n{_where(args.device)}, shapes-ip2p (64 x 64, 20 steps), {time.strftime('%Y-%m-%d')}\n")
    print(table(results, args.concurrency, args.max_batch, args.window_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
