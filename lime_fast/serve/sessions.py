"""Sessions: edits the service keeps so a client can correct their region (``POST /v1/refine``).

A JSON answer of ``POST /v1/edit`` (and of ``/v1/refine``, so refinements chain) carries a ``session``
id; the server keeps that edit's ``EditResult``, whose refine cache holds its encoding and noise on
the engine's device (``EditResult.refine_bytes``; ``lime_fast/refine.py`` says what). The store is
bounded three ways, each from ``ServeConfig``:

* count: at most ``max_sessions`` (``--sessions``; 0 keeps none and answers ``session: null``);
* bytes: the sum of ``refine_bytes`` of the kept results at most ``max_bytes`` (``--session-mb``). A
  chain of refinements shares the first edit's tensors, and the sum counts them once per result:
  an over-estimate, so the device memory held is at most the bound. A result larger than the whole
  bound is not kept (its answer has ``session: null``);
* time: a session unused for ``ttl_s`` seconds (``--session-ttl``) expires.

Under pressure the least recently used session goes first. An evicted or expired result is
``release()``-d, which drops its own reference to the tensors (a refinement made from it keeps its own
until it goes too).

A session belongs to who made it (``owner_key``): with a server token, a hash of the bearer token the
request carried; without one, the client's address. Another owner asking for it gets the same
``SessionNotFound`` as for an id that never existed or has expired, so an id reveals nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import LimeError


class SessionNotFound(LimeError, KeyError):
    """No session with this id for this client: never made, expired, evicted, or someone else's."""

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0]) if self.args else "session not found"


def owner_key(token: str | None, credentials: str | None, client: str | None) -> str:
    """Who a session belongs to. token: the server's token (None: the server has none); credentials: the
    bearer token the request carried (already checked against ``token``); client: its address. With a
    token the owner is a SHA-256 of the credentials (the store never keeps the token itself); without
    one it is the client's address."""
    if token is not None:
        return "token:" + hashlib.sha256((credentials or "").encode()).hexdigest()
    return "addr:" + (client or "?")


@dataclass
class Session:
    """One kept edit: its result, the engine that made it (a refinement must run there: its tensors live
    on that engine's device), owner (``owner_key``), bytes (``refine_bytes`` when added) and
    ``last_used`` (the store's clock, seconds)."""

    result: object
    engine: object
    owner: str
    nbytes: int
    last_used: float


class SessionStore:
    """Kept edits by session id, bounded as the module's docstring says; safe to use from several threads.

    max_sessions: most sessions (0: keep none); max_bytes: most bytes of refine caches, summed;
    ttl_s: seconds a session lives after its last use; clock: seconds (``time.monotonic``; tests
    pass a fake)."""

    def __init__(self, max_sessions: int = 16, max_bytes: int = 256 * 2**20, ttl_s: float = 600.0,
                 clock=time.monotonic):
        if max_sessions < 0 or max_bytes < 0 or not ttl_s > 0:
            raise ValueError(f"need max_sessions >= 0, max_bytes >= 0 and ttl_s > 0; got {max_sessions}, "
                             f"{max_bytes}, {ttl_s}")
        self.max_sessions, self.max_bytes, self.ttl_s, self.clock = max_sessions, max_bytes, ttl_s, clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def nbytes(self) -> int:
        """Bytes of the kept results' refine caches (as counted when each was added)."""
        return sum(s.nbytes for s in self._sessions.values())

    def add(self, result, owner: str, engine=None) -> str | None:
        """Keep ``result`` (made on ``engine``) for ``owner``; its new session id (22 URL-safe characters, 128 random bits), or
        None when it is not kept: sessions are off, it cannot be refined (``refine_bytes`` 0), or it alone
        is larger than ``max_bytes``. Makes room by evicting the least recently used sessions."""
        nbytes = int(getattr(result, "refine_bytes", 0) or 0)
        if self.max_sessions == 0 or nbytes == 0 or nbytes > self.max_bytes:
            return None
        sid = secrets.token_urlsafe(16)
        with self._lock:
            gone = self._expired(self.clock())
            while self._sessions and (len(self._sessions) >= self.max_sessions
                                      or self.nbytes + nbytes > self.max_bytes):
                gone.append(self._sessions.popitem(last=False)[1])
            self._sessions[sid] = Session(result, engine, owner, nbytes, self.clock())
        _release(gone)
        return sid

    def get(self, sid: str, owner: str) -> Session:
        """The ``Session`` kept under ``sid`` for ``owner`` (it counts as used now);
        ``SessionNotFound`` when there is none for this owner."""
        with self._lock:
            gone = self._expired(self.clock())
            s = self._sessions.get(sid) if isinstance(sid, str) else None
            mine = s is not None and hmac.compare_digest(s.owner.encode(), owner.encode())
            if mine:
                s.last_used = self.clock()
                self._sessions.move_to_end(sid)
        _release(gone)
        if not mine:
            raise SessionNotFound("no such session: it expired (sessions last "
                                  f"{self.ttl_s:g} s after their last use), was evicted to make room for newer "
                                  "ones, or was never made for you; run the edit again (format=json) for a new one")
        return s

    def sweep(self) -> int:
        """Drop the expired sessions now (``add`` and ``get`` also do); how many were dropped."""
        with self._lock:
            gone = self._expired(self.clock())
        _release(gone)
        return len(gone)

    def clear(self) -> None:
        """Drop every session (the app's shutdown)."""
        with self._lock:
            gone, self._sessions = list(self._sessions.values()), OrderedDict()
        _release(gone)

    def _expired(self, now: float) -> list[Session]:
        """Remove and return the sessions unused for ``ttl_s`` (the caller holds the lock)."""
        old = [sid for sid, s in self._sessions.items() if now - s.last_used >= self.ttl_s]
        return [self._sessions.pop(sid) for sid in old]


def _release(sessions: list[Session]) -> None:
    # outside the lock: release() is cheap, but nothing foreign runs under the store's lock
    for s in sessions:
        s.result.release()
