"""A fake engine for the service's tests and benchmarks: ``edit_batch`` returns each input picture as its
'edit', in a known time, records what it was given, and asks ``should_stop`` between its 'steps' as the
real engine does between UNet steps. Importable by a test's subprocess (no test module on sys.path)."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import PIL.Image

from ..config import EditConfig
from ..errors import EditCancelled, InputWarning, LimeWarning
from ..results import EditResult


class FakeEngine:
    """The parts of ``LimeEngine`` the batcher and the app use.

    delay: seconds per ``edit_batch``, spent in ``steps`` equal sleeps with a ``should_stop`` check after
        each (``stopped`` counts the batches stopped that way). gate: edits block until it is set (to
        hold a batch 'running'); ``started`` is set when a batch begins. fail_on: an instruction that
        makes the whole batch raise ValueError. calls / seeds: each batch's instructions and seeds.
    """

    multiple = 32
    device = "fake"

    def __init__(self, delay: float = 0.0, fail_on: str | None = None, steps: int = 10):
        self.default_config = EditConfig(steps=4)
        self.delay, self.fail_on, self.steps = delay, fail_on, steps
        self.calls: list[list[str]] = []
        self.seeds: list[list[int] | None] = []
        self.gate, self.started = threading.Event(), threading.Event()
        self.gate.set()
        self.active = self.max_active = self.stopped = 0
        self._lock = threading.Lock()

    def edit_batch(self, images, instructions, masks=None, seeds=None, progress=False, config=None, should_stop=None):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append(list(instructions))
            self.seeds.append(None if seeds is None else list(seeds))
        try:
            self.started.set()
            assert self.gate.wait(30), "test gate never opened"
            self._run_steps(should_stop)
            if self.fail_on in instructions:
                raise ValueError(f"cannot edit {self.fail_on!r}")
            return [EditResult(image=im, roi_mask=np.zeros((im.height, im.width), bool), roi_grid=np.zeros((4, 4), bool),
                               segments=None, heatmap=None, tokens=[s], silenced=[], instruction=s, input_image=im,
                               timings={"total": self.delay}, unet_evals=1) for im, s in zip(images, instructions)]
        finally:
            with self._lock:
                self.active -= 1

    def _run_steps(self, should_stop) -> None:
        for _ in range(self.steps):
            time.sleep(self.delay / self.steps)
            if should_stop is not None and should_stop():
                self.stopped += 1
                raise EditCancelled("stopped")

    def stop_seen(self, timeout: float) -> bool:
        """Whether a batch stopped early (``should_stop``) within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.stopped == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.stopped > 0


class WarningEngine(FakeEngine):
    """A FakeEngine whose edits warn as the real engine's do: one warning per edit quoting its instruction,
    and one about the whole batch. ``barrier``: every edit_batch waits there (two engines' batches overlap)."""

    def __init__(self, barrier=None, **kw):
        super().__init__(**kw)
        self.barrier = barrier

    def edit_batch(self, images, instructions, **kw):
        if self.barrier is not None:
            self.barrier.wait(10)
        for s in instructions:
            warnings.warn(f"Instruction {s!r} has no content word", LimeWarning, stacklevel=2)
        warnings.warn(f"the image is {images[0].width} x {images[0].height}; it is processed smaller", InputWarning, stacklevel=2)
        warnings.warn("a library's own deprecation", DeprecationWarning, stacklevel=2)  # not the client's business
        return super().edit_batch(images, instructions, **kw)


def picture(size=(64, 64), value: int = 0) -> PIL.Image.Image:
    """A plain RGB picture (its red channel ``value``): distinct pictures for distinct requests."""
    return PIL.Image.new("RGB", size, (value, 0, 0))


def wait_until(cond, timeout: float = 10.0) -> None:
    """Poll ``cond()`` every 5 ms; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def hold(batcher, engine: FakeEngine, name: str = "blocker"):
    """Occupy ``batcher``'s worker with one batch that waits on ``engine``'s gate; returns its job."""
    engine.gate.clear()
    job = batcher.submit(picture(), name, None, engine.default_config)
    wait_until(lambda: engine.active == 1)
    return job
