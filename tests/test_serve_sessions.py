"""The service's session store (lime_fast.serve.sessions): its bounds in count, bytes and idle time (a fake
clock), who may use a session, and that what it drops is released. Plain objects stand in for results:
the store reads only ``refine_bytes`` and calls ``release()``."""

import pytest

from lime_fast.errors import LimeError
from lime_fast.serve.sessions import SessionNotFound, SessionStore, owner_key


class Kept:
    """A stand-in result: ``refine_bytes`` until ``release()``."""

    def __init__(self, nbytes: int = 100):
        self.refine_bytes, self.released = nbytes, False

    def release(self):
        self.released, self.refine_bytes = True, 0


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def store(**kw):
    clock = Clock()
    return SessionStore(clock=clock, **kw), clock


def test_ids_are_unguessable_and_a_session_returns_its_result():
    s, _ = store()
    a, b = Kept(), Kept()
    sa, sb = s.add(a, "me", engine="e0"), s.add(b, "me")
    assert sa != sb and len(sa) == 22 and sa.replace("-", "").replace("_", "").isalnum()  # 16 random bytes
    got = s.get(sa, "me")
    assert got.result is a and got.engine == "e0" and s.get(sb, "me").result is b
    assert len(s) == 2 and s.nbytes == 200


def test_count_bound_evicts_the_least_recently_used_and_releases_it():
    s, clock = store(max_sessions=2)
    a, b, c = Kept(), Kept(), Kept()
    sa = s.add(a, "me")
    clock.now += 1
    sb = s.add(b, "me")
    clock.now += 1
    s.get(sa, "me")  # a is used again: b is now the oldest
    s.add(c, "me")
    assert len(s) == 2 and b.released and not a.released and not c.released
    with pytest.raises(SessionNotFound):
        s.get(sb, "me")


def test_byte_bound_evicts_until_the_new_one_fits_and_refuses_one_larger_than_all():
    s, _ = store(max_bytes=250)
    a, b, c = Kept(100), Kept(100), Kept(120)
    s.add(a, "me")
    s.add(b, "me")
    s.add(c, "me")  # 100 + 100 + 120 > 250: the oldest (a) goes
    assert a.released and not b.released and s.nbytes == 220
    huge = Kept(251)
    assert s.add(huge, "me") is None and not huge.released and len(s) == 2  # not kept: the others stay
    assert s.add(Kept(0), "me") is None  # not refinable (no cache): nothing to keep


def test_sessions_off_keep_nothing():
    s, _ = store(max_sessions=0)
    assert s.add(Kept(), "me") is None and len(s) == 0


def test_ttl_counts_from_the_last_use_and_expired_sessions_are_released():
    s, clock = store(ttl_s=60)
    a, b = Kept(), Kept()
    sa, sb = s.add(a, "me"), s.add(b, "me")
    clock.now += 59
    s.get(sa, "me")  # used: its minute starts again
    clock.now += 2  # b is 61 s idle, a 2 s
    with pytest.raises(SessionNotFound):
        s.get(sb, "me")
    assert b.released and s.get(sa, "me").result is a
    clock.now += 60
    assert s.sweep() == 1 and a.released and len(s) == 0


def test_a_session_is_bound_to_its_owner_and_a_stranger_learns_nothing():
    s, _ = store()
    sid = s.add(Kept(), owner_key("tok", "tok", "10.0.0.1"))
    # the same token from another address: the same owner (behind a proxy every address is the proxy's)
    assert s.get(sid, owner_key("tok", "tok", "10.0.0.2")) is not None
    with pytest.raises(SessionNotFound) as foreign:
        s.get(sid, owner_key("tok", "other", "10.0.0.1"))
    with pytest.raises(SessionNotFound) as unknown:
        s.get("no-such-session", owner_key("tok", "tok", "10.0.0.1"))
    assert str(foreign.value) == str(unknown.value)  # the same answer: existence is not revealed
    assert isinstance(foreign.value, LimeError) and "expired" in str(foreign.value)
    # without a server token: bound to the address
    mine = s.add(Kept(), owner_key(None, None, "127.0.0.1"))
    with pytest.raises(SessionNotFound):
        s.get(mine, owner_key(None, None, "127.0.0.2"))
    with pytest.raises(SessionNotFound):
        s.get(None, owner_key(None, None, "127.0.0.1"))


def test_owner_key_never_holds_the_token_itself():
    key = owner_key("s3cret", "s3cret", "1.2.3.4")
    assert "s3cret" not in key and key.startswith("token:") and len(key) == len("token:") + 64
    assert owner_key(None, "ignored", "1.2.3.4") == "addr:1.2.3.4"


def test_clear_releases_everything_and_bad_bounds_are_refused():
    s, _ = store()
    kept = [Kept() for _ in range(3)]
    for k in kept:
        s.add(k, "me")
    s.clear()
    assert len(s) == 0 and all(k.released for k in kept)
    for bad in ({"max_sessions": -1}, {"max_bytes": -1}, {"ttl_s": 0}):
        with pytest.raises(ValueError):
            SessionStore(**bad)
