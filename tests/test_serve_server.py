"""lime_fast.serve.server: shutdown with a queue (SIGTERM), slow and stalled clients under a lowered
open-file limit, the connection cap, the log-line limiter; and the batcher's drain, abandon and
byte bound, the rate limiter and the body timeout they rely on. The process tests run a real
uvicorn in a subprocess with a fake engine (edits of known duration), bounded in count and time."""

import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'lime-fast[serve]'")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is not installed: pip install httpx")
pytest.importorskip("uvicorn")

from lime_fast.config import EditConfig  # noqa: E402
from lime_fast.serve.app import RateLimiter, ServeConfig  # noqa: E402
from lime_fast.serve.batcher import Batcher, QueueFull, ShuttingDown  # noqa: E402
from lime_fast.serve.server import RepeatFilter, connection_cap  # noqa: E402
from lime_fast.serve.uploads import BadRequest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# A server with a fake engine whose edits take DELAY seconds in 10 'steps' (asking should_stop after each).
SERVER = textwrap.dedent('''
    import sys, time, numpy as np
    from lime_fast.config import EditConfig
    from lime_fast.errors import EditCancelled
    from lime_fast.results import EditResult
    from lime_fast.serve.app import ServeConfig, create_app
    from lime_fast.serve.server import serve

    port, delay, grace, header_timeout = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])

    class SlowEngine:
        multiple = 32
        default_config = EditConfig(steps=4)
        device = "fake"

        def edit_batch(self, images, instructions, masks=None, seeds=None, progress=False, config=None, should_stop=None):
            for _ in range(10):
                time.sleep(delay / 10)
                if should_stop is not None and should_stop():
                    raise EditCancelled("stopped")
            return [EditResult(image=im, roi_mask=np.zeros((im.height, im.width), bool), roi_grid=np.zeros((4, 4), bool),
                               segments=None, heatmap=None, tokens=[s], silenced=[], instruction=s, input_image=im,
                               timings={"total": delay}, unet_evals=1) for im, s in zip(images, instructions)]

    cfg = ServeConfig(max_batch=1, grace_s=grace, header_timeout_s=header_timeout, body_timeout_s=1.0)
    app = create_app(SlowEngine(), cfg)
    serve(app, "127.0.0.1", port, log_level="info")
    print("EXITED CLEANLY", flush=True)
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(size=(32, 32)) -> bytes:
    import io

    buf = io.BytesIO()
    PIL.Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def start_server(tmp_path, delay, grace, header_timeout=10.0, nofile=None):
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    port = free_port()
    limit = None if nofile is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(delay), str(grace), str(header_timeout)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.1)


def post_edit(url, results, i):
    try:
        r = httpx.post(url + "/v1/edit", data={"instruction": f"edit {i}"},
                       files={"image": ("a.png", png(), "image/png")}, timeout=60)
        results[i] = (r.status_code, r.headers.get("content-type", ""), r.headers.get("retry-after"), r.content)
    except httpx.HTTPError as e:
        results[i] = (None, type(e).__name__, None, b"")


@pytest.mark.parametrize("delay, grace, finished", [(1.0, 3.0, 1), (6.0, 0.5, 0)],
                         ids=["running-edit-finishes", "grace-runs-out"])
def test_sigterm_with_a_queue_drains_and_exits_0(tmp_path, delay, grace, finished):
    """12 edits on one worker, SIGTERM while one runs: the queued ones get 503 JSON with Retry-After at
    once, the running one finishes within the grace period (200) or, when it cannot, gets 503 when the
    grace period ends and stops at its next step; the process exits 0 with no unretrieved futures."""
    proc, url = start_server(tmp_path, delay, grace)
    results = {}
    try:
        threads = [threading.Thread(target=post_edit, args=(url, results, i)) for i in range(12)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while True:
            h = httpx.get(url + "/healthz", timeout=5).json()
            if h["running"] == 1 and h["queue_depth"] == 11:
                break
            assert time.monotonic() < deadline, h
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace + 20)
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "server.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "EXITED CLEANLY" in log and "never retrieved" not in log and "Traceback" not in log, log[-3000:]
    assert time.monotonic() - t0 < grace + 10
    codes = sorted(r[0] for r in results.values())
    assert codes == [200] * finished + [503] * (12 - finished), results
    for status, ctype, retry, body in results.values():
        if status == 503:
            assert ctype.startswith("application/json") and retry and "shutting down" in json.loads(body)["error"]


def test_slow_clients_under_a_low_open_file_limit(tmp_path):
    """With 256 descriptors, 300 connections that send half a request head and stall: the server holds
    at most its cap (the rest get 503 and are closed at once), never runs out of descriptors, keeps
    answering meanwhile, and logs a few lines, not thousands."""
    proc, url = start_server(tmp_path, 0.1, 1.0, header_timeout=60.0, nofile=256)
    port, socks = int(url.rsplit(":", 1)[1]), []
    try:
        cap, backlog = connection_cap(None, 256)
        assert (cap, backlog) == (256 - 32 - 64, 32)
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /v1/edit HTTP/1.1\r\nHost: x\r\n")  # no end of headers
            socks.append(s)
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) < 256
        refused = 0
        for s in socks:
            s.settimeout(0.2)
            try:
                refused += s.recv(200).startswith(b"HTTP/1.1 503")
            except socket.timeout:
                pass
        assert refused >= 300 - cap
        assert httpx.get(url + "/healthz", timeout=5).status_code == 503  # refused too: the cap is reached
    finally:
        for s in socks:
            s.close()
    try:
        r = httpx.post(url + "/v1/edit", data={"instruction": "x"}, files={"image": ("a.png", png(), "image/png")},
                       timeout=30)
        assert r.status_code == 200  # the held connections are gone: serving again
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    log = (tmp_path / "server.log").read_text()
    assert proc.returncode == 0
    assert "Too many open files" not in log and len(log) < 20_000, log[-3000:]


def test_a_stalled_request_head_is_closed(tmp_path):
    proc, url = start_server(tmp_path, 0.1, 1.0, header_timeout=1.0)
    port = int(url.rsplit(":", 1)[1])
    try:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
        for s in socks:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        t0 = time.monotonic()
        for s in socks:
            s.settimeout(10)
            assert s.recv(200) == b""  # closed by the server
            s.close()
        assert time.monotonic() - t0 < 5
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_a_stalled_body_gets_408(tmp_path):
    proc, url = start_server(tmp_path, 0.1, 1.0)
    try:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as s:
            s.sendall(b"POST /v1/edit HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 5000\r\n\r\n--b\r\n")  # then nothing: the body stalls
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 408") and b"no part of the request body arrived" in data
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


# --- the pieces, without processes ---------------------------------------------------------------
class StepEngine:
    """Edits of ``steps`` x ``step_s`` seconds that ask should_stop after each step."""

    multiple = 32

    def __init__(self, steps=50, step_s=0.01):
        self.default_config = EditConfig(steps=4)
        self.steps, self.step_s, self.stopped, self.started = steps, step_s, 0, threading.Event()

    def edit_batch(self, images, instructions, masks=None, seeds=None, progress=False, config=None, should_stop=None):
        from lime_fast.errors import EditCancelled

        self.started.set()
        for _ in range(self.steps):
            time.sleep(self.step_s)
            if should_stop():
                self.stopped += 1
                raise EditCancelled("stopped")
        return [object() for _ in images]

    def stop_seen(self, timeout: float) -> bool:
        """Whether a batch stopped early within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.stopped == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.stopped > 0


def picture(size=(32, 32)):
    return PIL.Image.new("RGB", size)


def test_drain_answers_the_queue_and_abandon_stops_the_running_batch():
    engine = StepEngine(steps=500)
    b = Batcher([engine], max_batch=1, window_s=0).start()
    try:
        running = b.submit(picture(), "a", None, EditConfig())
        assert engine.started.wait(10)
        queued = [b.submit(picture(), f"q{i}", None, EditConfig()) for i in range(3)]
        assert b.drain() == 3
        for job in queued:
            assert isinstance(job.future.exception(timeout=1), ShuttingDown)
        with pytest.raises(ShuttingDown):
            b.submit(picture(), "late", None, EditConfig())
        assert not running.future.done()
        assert b.abandon_running() == 1
        assert isinstance(running.future.exception(timeout=1), ShuttingDown)
        assert engine.stop_seen(5), "the abandoned batch did not stop"
    finally:
        b.stop(5)


def test_a_batch_stops_between_steps_once_every_caller_gave_up():
    engine = StepEngine(steps=500)
    b = Batcher([engine], max_batch=2, window_s=0.2).start()
    try:
        jobs = [b.submit(picture(), f"e{i}", None, EditConfig()) for i in range(2)]
        assert engine.started.wait(10)
        b.cancel(jobs[0])
        time.sleep(0.1)
        assert engine.stopped == 0  # one caller still waits: the batch goes on
        b.cancel(jobs[1])
        assert engine.stop_seen(5), "the batch ran on with nobody waiting"
    finally:
        b.stop(5)


def test_the_queue_is_bounded_in_bytes():
    engine = StepEngine(steps=1)
    big = picture((512, 512))  # 768 KiB decoded
    b = Batcher([engine], max_batch=1, max_queue_bytes=2 * 512 * 512 * 3)  # not started: everything stays queued
    b.submit(big, "a", None, EditConfig())
    b.submit(big, "b", None, EditConfig())
    with pytest.raises(QueueFull, match="MiB of pictures waiting"):
        b.submit(big, "c", None, EditConfig())
    lone = Batcher([engine], max_batch=1, max_queue_bytes=10)
    lone.submit(big, "first", None, EditConfig())  # larger than the bound, but alone: taken
    assert lone._pending[0].nbytes == 512 * 512 * 3
    with_mask = Batcher([engine]).submit(big, "m", np.ones((512, 512), bool), EditConfig())
    assert with_mask.nbytes == 512 * 512 * 4


def test_rate_limiter_allows_a_minutes_burst_then_refills():
    now = [0.0]
    rl = RateLimiter(6, clock=lambda: now[0])  # 6 a minute: one every 10 s
    for _ in range(6):
        rl.take("a")
    with pytest.raises(BadRequest) as e:
        rl.take("a")
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "10"
    rl.take("b")  # per client
    now[0] = 10.0
    rl.take("a")
    RateLimiter(None).take("a")  # no limit
    with pytest.raises(ValueError, match="rate_limit"):
        ServeConfig(rate_limit=0)


def test_rate_limiter_forgets_full_buckets_first():
    now = [0.0]
    rl = RateLimiter(60, max_clients=3, clock=lambda: now[0])
    for c in "abc":
        rl.take(c)
    now[0] = 100.0  # all refilled
    rl.take("d")
    assert set(rl._buckets) == {"d"}


def test_repeat_filter_limits_a_repeated_line():
    now = [0.0]
    f = RepeatFilter(burst=3, period=10.0)
    import lime_fast.serve.server as srv

    rec = lambda: logging.LogRecord("asyncio", logging.ERROR, "x", 1, "accept failed", None, None)  # noqa: E731
    orig = srv.time.monotonic
    srv.time.monotonic = lambda: now[0]
    try:
        passed = [f.filter(rec()) for _ in range(1000)]
        assert sum(passed) == 3
        now[0] = 11.0
        r = rec()
        assert f.filter(r) and "997 similar lines suppressed" in r.msg
        other = logging.LogRecord("asyncio", logging.ERROR, "x", 1, "another", None, None)
        assert f.filter(other)
    finally:
        srv.time.monotonic = orig


def test_connection_cap_stays_below_the_open_file_limit():
    assert connection_cap(None, 1024) == (1024 - 128 - 64, 128)
    assert connection_cap(5000, 1_000_000) == (5000, 2048)
    assert connection_cap(None, 1_000_000) == (1000, 2048)
    assert connection_cap(None, 100) == (100 - 16 - 64, 16)
    assert connection_cap(None, 50) == (1, 16)  # too few descriptors to hold any: one at a time
    assert connection_cap(None, resource.RLIM_INFINITY) == (1000, 2048)
    with pytest.raises(ValueError, match="max_connections"):
        ServeConfig(max_connections=0)
