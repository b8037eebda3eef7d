"""lime_fast.serve.server: shutdown with a queue (SIGTERM), slow and stalled clients under a lowered
open-file limit, a stalled body, the connection cap and the log-line limiter. The process tests run a
real uvicorn in a subprocess with a fake engine (lime_fast.testing.fakes: edits of known duration),
bounded in count and time."""

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

import PIL.Image
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'lime-fast[serve]'")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is not installed: pip install httpx")
pytest.importorskip("uvicorn")

from lime_fast.serve.app import ServeConfig  # noqa: E402
from lime_fast.serve.server import RepeatFilter, connection_cap  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# A server with a fake engine whose edits take DELAY seconds in 10 'steps' (asking should_stop after each).
SERVER = textwrap.dedent('''
    import sys
    from lime_fast.serve.app import ServeConfig, create_app
    from lime_fast.serve.server import serve
    from lime_fast.testing.fakes import FakeEngine

    port, delay, grace, header_timeout = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    cfg = ServeConfig(max_batch=1, grace_s=grace, header_timeout_s=header_timeout, body_timeout_s=1.0)
    serve(create_app(FakeEngine(delay=delay), cfg), "127.0.0.1", port, log_level="info")
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
