"""lime_fast.serve.warnings_capture: each thread gets its own LimeWarnings, and the warnings module's hooks
and filters are back as they were once every capture ended."""

import threading
import warnings

from lime_fast.errors import LimeWarning
from lime_fast.serve.warnings_capture import capture_warnings


def test_capture_warnings_is_per_thread_and_puts_the_hooks_back():
    show, filters = warnings.showwarning, list(warnings.filters)
    barrier, got = threading.Barrier(2), {}

    def worker(name):
        with capture_warnings() as caught:
            barrier.wait(10)  # both captures open at once
            for _ in range(2):  # the same message twice (same code line): both reach the client
                warnings.warn(f"from {name}", LimeWarning)
            warnings.warn("not ours", UserWarning)
            barrier.wait(10)
        got[name] = caught

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    with warnings.catch_warnings(record=True) as outer:  # the log still gets everything
        [t.start() for t in threads]
        [t.join(20) for t in threads]
        with capture_warnings() as mine, capture_warnings() as inner:  # nested, on this thread
            warnings.warn("nested", LimeWarning)
    assert got == {"a": ["from a", "from a"], "b": ["from b", "from b"]}
    assert mine == inner == ["nested"]
    assert sum(str(w.message) in ("from a", "from b") for w in outer) == 4
    assert warnings.showwarning is show and warnings.filters == filters
