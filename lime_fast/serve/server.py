"""Running the app under uvicorn with the service's process rules.

* **Shutdown.** SIGTERM or Ctrl-C: the listening socket closes, every queued edit is answered at once
  with 503 JSON and ``Retry-After`` (a load balancer retries it elsewhere), running edits get
  ``ServeConfig.grace_s`` seconds to finish (then their callers get 503 too and the edits stop at
  the next UNet step), and the process exits with status 0.
* **Connections.** At most ``max_connections`` open at once, and with the listen backlog kept
  below the process's open-file limit (one more is answered 503 and closed at once, so ``accept``
  never runs out of descriptors);
  a connection whose request line and headers have not arrived within ``header_timeout_s`` is
  closed (a slow or stalled client cannot hold a descriptor for long). The body's own idle timeout
  is the app's (``Guard``).
* **Logs.** A line repeated faster than a few times a second (e.g. an ``accept`` error) is
  rate-limited: the first ones pass, then one line per period says how many were suppressed.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import time

log = logging.getLogger("lime_fast.serve")

DEFAULT_MAX_CONNECTIONS = 1000
_REFUSED_BODY = b'{"error": "too many open connections: try again later"}'
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY))


def connection_cap(requested: int | None, soft_limit: int | None = None) -> tuple[int, int]:
    """(most connections to hold open, listen backlog) under the open-file soft limit ``soft_limit``
    (default: this process's RLIMIT_NOFILE).

    asyncio accepts up to ``backlog`` connections in one burst before any of them can be refused, so
    the descriptors budget is: held connections + one burst + 64 for everything else the process
    opens (model files, logs, the listening socket, the thread pool). The backlog is an eighth of the
    limit (16 to 2048); held connections are ``requested`` (default 1000) or what is left."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = requested or DEFAULT_MAX_CONNECTIONS
    if soft_limit in (None, resource.RLIM_INFINITY) or soft_limit <= 0:
        return cap, 2048
    backlog = max(16, min(2048, soft_limit // 8))
    return max(1, min(cap, soft_limit - backlog - 64)), backlog


class RepeatFilter(logging.Filter):
    """Per distinct message (logger, level, format string): at most ``burst`` records per ``period``
    seconds pass; the first one after a period with suppressed records says how many were dropped."""

    def __init__(self, burst: int = 5, period: float = 10.0, max_keys: int = 1000):
        super().__init__()
        self.burst, self.period, self.max_keys = burst, period, max_keys
        self._seen: dict[tuple, list] = {}  # key -> [window start, count, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.period:
            suppressed = entry[2] if entry else 0
            if len(self._seen) >= self.max_keys:
                self._seen.clear()
            self._seen[key] = [now, 1, 0]
            if suppressed:
                record.msg = f"{record.msg} ({suppressed} similar lines suppressed in the last {self.period:g} s)"
            return True
        entry[1] += 1
        if entry[1] <= self.burst:
            return True
        entry[2] += 1
        return False


def guarded_protocol(max_connections: int, header_timeout_s: float):
    """uvicorn's h11 protocol with the connection cap and the request-head timeout (module docstring)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_REFUSED)
                transport.close()
                return
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _head_timeout(self) -> None:
            # No request head yet (the keep-alive timeout covers later requests on the connection).
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11


def _server_class():
    import uvicorn

    class LimeServer(uvicorn.Server):
        """uvicorn's server with the shutdown of the module docstring."""

        def __init__(self, config, batcher, grace_s: float):
            super().__init__(config)
            self.batcher, self.grace_s = batcher, grace_s
            self._loop = None

        async def startup(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

        def handle_exit(self, sig, frame) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            # uvicorn re-raises a caught signal once it has shut down (the process then dies by it);
            # a drained shutdown is a normal exit instead.
            if sig in (signal.SIGTERM, signal.SIGINT) and sig in self._captured_signals:
                self._captured_signals.remove(sig)
            if first and self._loop is not None:
                self._loop.call_soon_threadsafe(self._drain)  # not in the handler: it may interrupt the loop

        def _drain(self) -> None:
            queued, running = self.batcher.drain(), self.batcher.running
            log.info("shutting down: %d queued edits answered 503; %d running get up to %g s", queued, running,
                     self.grace_s)
            if running:
                self._loop.call_later(self.grace_s, self._grace_over)

        def _grace_over(self) -> None:
            n = self.batcher.abandon_running()
            if n:
                log.warning("grace period over: %d running edits answered 503 and stopped", n)

    return LimeServer


def serve(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info", sockets=None) -> None:
    """Serve ``app`` (from ``create_app``) until SIGTERM or Ctrl-C, as the module docstring says."""
    import uvicorn

    cfg = app.state.config
    cap, backlog = connection_cap(cfg.max_connections)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", backlog=backlog,
                            http=guarded_protocol(cap, cfg.header_timeout_s),
                            # past the grace period the edits are abandoned; this leaves time to answer
                            timeout_graceful_shutdown=cfg.grace_s + 5)
    server = _server_class()(config, app.state.batcher, cfg.grace_s)
    repeat = RepeatFilter()
    loggers = [logging.getLogger(n) for n in ("asyncio", "uvicorn.error", "lime_fast.serve")]
    for lg in loggers:
        lg.addFilter(repeat)
    try:
        server.run(sockets=sockets)
    finally:
        for lg in loggers:
            lg.removeFilter(repeat)
