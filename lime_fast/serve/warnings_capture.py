"""Capturing the ``LimeWarning`` s an edit raises so the service can send them to its client.

``warnings.catch_warnings(record=True)`` cannot do this here: it swaps the warnings module's global
hooks and filters on enter and puts back what it found on exit, so two threads capturing at once
(one batch worker per engine, uploads decoded in the thread pool) lose each other's warnings or
leave the hooks broken, and a lock around it would make the engines of a multi-device server run
one at a time. Instead, while any thread captures, one hook is installed process-wide that sends
each ``LimeWarning`` to the list of the thread that raised it (and every warning on to the hook it
replaced, so the server log still has them); the last capture to end takes the hook out.

The warnings module stays process-global: code that enters its own ``warnings.catch_warnings`` in
another thread while a capture runs can still replace the hook until it exits (the service itself
does not, at request time: ``batch_key`` computes the working size without warning).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import LimeWarning

_lock = threading.Lock()
_logs: dict[int, list[list[str]]] = {}  # thread id -> the lists of its open captures (innermost last)
_installed: dict = {}  # "outer": the showwarning the hook replaced; "filter": ours, while captures are open


def _show(message, category, filename, lineno, file=None, line=None):
    """The process-wide hook while captures are open: a ``LimeWarning`` of a capturing thread goes to
    that thread's open captures; every warning goes on to the hook this one replaced."""
    if issubclass(category, LimeWarning):
        for log in _logs.get(threading.get_ident(), ()):
            log.append(str(message))
    outer = _installed.get("outer")
    if outer is not None:
        outer(message, category, filename, lineno, file, line)


def _install() -> None:
    # "always": the default action shows a message once per code location, so a second client whose
    # picture raises the same warning would not get it. The message pattern ".*" (any) makes the entry
    # ours alone: adding a filter equal to an existing one (lime-fast's CLI adds "always" too) would
    # take that one out, and removing ours later would leave neither.
    warnings.filterwarnings("always", message=".*", category=LimeWarning)
    _installed.update(outer=warnings.showwarning, filter=warnings.filters[0])
    warnings.showwarning = _show


def _uninstall() -> None:
    if warnings.showwarning is _show:
        warnings.showwarning = _installed["outer"]
    try:  # only our own filter: filters others added since stay
        warnings.filters.remove(_installed.pop("filter"))
    except ValueError:  # someone restored an older filter list meanwhile
        pass
    # "outer" stays: a thread that fetched the hook just before it came out still passes its warning on


@contextmanager
def capture_warnings() -> Iterator[list[str]]:
    """``with capture_warnings() as caught:`` -> ``caught`` gets the text of every ``LimeWarning`` this
    thread raises inside the block (each time, in order); other threads' warnings are not in it.
    Thread-safe; may be nested (an inner capture's warnings are in the outer one too)."""
    caught: list[str] = []
    ident = threading.get_ident()
    with _lock:
        if not _logs:
            _install()
        elif warnings.showwarning is not _show:  # a catch_warnings elsewhere put back an older hook
            _installed["outer"], warnings.showwarning = warnings.showwarning, _show
        _logs.setdefault(ident, []).append(caught)
    try:
        yield caught
    finally:
        with _lock:
            mine = _logs[ident]
            mine.remove(caught)
            if not mine:
                del _logs[ident]
            if not _logs:
                _uninstall()


def call_capturing(fn, *args, **kwargs) -> tuple:
    """``(fn(*args, **kwargs), [its LimeWarnings' text])``: for work the thread pool runs."""
    with capture_warnings() as caught:
        value = fn(*args, **kwargs)
    return value, caught
