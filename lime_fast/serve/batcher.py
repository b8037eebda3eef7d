"""Dynamic batching: edits that arrive close together and can share a UNet batch run as one ``edit_batch``.

A request becomes a ``Job`` (an image already decoded and checked, its instruction, mask and resolved
``EditConfig``) with a ``concurrent.futures.Future`` for its result. One worker thread per engine
(one engine per device) loops:

1. wait for the oldest queued job;
2. keep its batch open until ``window_s`` after that job arrived, or until ``max_batch`` queued jobs
   share its key (working size + every EditConfig field but the seed: ``edit_batch`` runs all its
   edits at the first image's working size with one config and a seed per edit), whichever comes first;
3. take up to ``max_batch`` jobs of that key, oldest first (jobs of other keys keep their place), and
   run them as one ``engine.edit_batch``.

While a worker is busy, new jobs queue; when it comes back, the oldest job has already waited longer
than the window, so whatever queued meanwhile with its key goes at once (no extra wait under load).

A refinement (``POST /v1/refine``) is a job of another kind: a call (``submit_call``) bound to the
engine that made the edit it refines, since its cached tensors live on that engine's device. It
waits in the same queue, in arrival order, and only that engine's worker takes it, alone (it never
shares a batch). Why a job kind and not a lock the refine would take in the thread pool (the
engine's own lock already keeps its passes from overlapping, so this is not about memory safety):
queued like an edit, a refine is bounded by the same ``max_queue`` (503), counted in ``depth`` and
Retry-After, dropped when its client leaves before it starts, answered ``ShuttingDown`` by ``drain``,
and its warnings are captured in the worker's thread like an edit's; every pass on an engine runs
in its one worker, in arrival order. A lock would keep a refine outside all of that, hold a
thread-pool thread while it waits, and let it overtake queued edits or wait behind later ones.

Edits never run concurrently on one engine: each engine has exactly one worker. The queue is
bounded in jobs and in bytes of decoded pictures (``QueueFull`` when full; the app answers 503 with
Retry-After). A job whose client gave up (timeout, disconnect) is cancelled: still queued, it is
dropped before it runs; already running, its batch stops between UNet steps once every job in it is
cancelled (``edit_batch``'s ``should_stop``), else it finishes for the others and the cancelled
job's result is discarded. A batch that raises is retried one job at a time, so one failing edit
fails alone. The ``LimeWarning`` s a batch raises are captured in its worker's thread
(``lime_fast.serve.warnings_capture``) and shared out to its jobs (``attribute_warnings``), so each
client learns what was adjusted in its edit.

Shutdown has two steps: ``drain`` (takes no new jobs and answers every queued one with
``ShuttingDown`` at once; running batches go on) and, if they outlive the grace period,
``abandon_running`` (their callers get ``ShuttingDown`` now and the batches stop at the next step).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import PIL.Image

from ..config import EditConfig
from ..errors import EditCancelled, LimeError
from ..inputs import working_size
from .warnings_capture import capture_warnings

log = logging.getLogger("lime_fast.serve")


class QueueFull(LimeError):
    """The queue holds ``max_queue`` jobs; ``retry_after`` is the estimated wait in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(LimeError):
    """The batcher is stopping and takes no new jobs."""


_IDS = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One queued edit.

    image: RGB PIL image (decoded and checked). mask: bool [H, W] or None (automatic RoI).
    config: the resolved EditConfig. key: (working (w, h), EditConfig values): jobs batch together
    only with equal keys. future: resolves to the ``EditResult``.
    submitted / started: ``time.monotonic()`` seconds; batch_size: edits in the batch it ran in.
    warnings: the text of the ``LimeWarning`` s its edit raised (``attribute_warnings``), set before
    the future resolves.
    abandoned: its caller gave up (set by ``Batcher.cancel`` / ``abandon_running``; read by the worker).
    task / engine: a call job (``Batcher.submit_call``: image and config None, instruction a label): the
    function its worker calls with the engine, and the engine whose worker must run it.
    ran_on: the engine that ran it (set when it starts): a refinement of its result must run there.
    """

    image: PIL.Image.Image | None
    instruction: str
    mask: np.ndarray | None
    config: EditConfig | None
    key: tuple
    id: int = field(default_factory=lambda: next(_IDS))
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    batch_size: int = 0
    warnings: list[str] = field(default_factory=list)
    abandoned: bool = False
    task: Callable | None = None
    engine: object | None = None
    ran_on: object | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the queued job holds: the decoded RGB picture and the mask (one byte per pixel). A call
        job's picture is kept elsewhere (the session): only its mask counts."""
        w, h = (0, 0) if self.image is None else self.image.size
        return w * h * 3 + (0 if self.mask is None else self.mask.size)


def batch_key(image: PIL.Image.Image, config: EditConfig, multiple: int) -> tuple:
    """What must match for two edits to share an ``edit_batch``: the working size the engine brings
    the image to (``lime_fast.inputs.working_size``) and every config field but the seed (one config
    per batch; ``edit_batch`` takes one seed per edit)."""
    # warn=False, not catch_warnings: the edit itself warns about shrinking large images, and
    # catch_warnings here (the event loop's thread) would swap the hook the workers capture through
    size = working_size(*image.size, multiple, config.max_side, warn=False)
    return (size, dataclasses.astuple(config.replace(seed=0)))


class Batcher:
    """Queue + one worker thread per engine, forming batches as the module docstring says.

    engines: the engines to run on (one per device; each gets one worker). They must share
        ``multiple`` (the same model). A fake with ``multiple`` and ``edit_batch`` works too (tests).
    max_batch: most edits per ``edit_batch`` (1 = no batching: each request alone, in arrival order).
    window_s: how long a batch stays open for more jobs after its oldest job arrived (seconds).
    max_queue: most jobs waiting (not yet running); ``submit`` raises ``QueueFull`` beyond it.
    max_queue_bytes: most bytes of pictures and masks waiting (``Job.nbytes``); None: unbounded. A job
        larger than the whole bound is still taken when the queue is empty (it is already decoded).
    metrics: optional ``Metrics``; batches are recorded there.
    """

    def __init__(self, engines: Sequence, *, max_batch: int = 8, window_s: float = 0.01, max_queue: int = 256,
                 max_queue_bytes: int | None = None, metrics=None):
        if not engines:
            raise ValueError("Batcher needs at least one engine")
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1 and window_s >= 0, got {max_batch}, {max_queue}, {window_s}")
        multiples = {e.multiple for e in engines}
        if len(multiples) != 1:
            raise ValueError(f"all engines must serve the same model (size multiples {sorted(multiples)})")
        self.engines = list(engines)
        self.multiple = multiples.pop()
        self.max_batch, self.window_s, self.max_queue = max_batch, window_s, max_queue
        self.max_queue_bytes = max_queue_bytes
        self.metrics = metrics
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._running = 0  # edits in batches now running
        self._active: list[Job] = []  # their jobs
        self._threads: list[threading.Thread] = []
        # Exponential moving averages (weight 0.2 on the newest batch) of seconds per edit (a batch's time
        # / its size: Retry-After) and per batch (what one request waits once it runs: the page's
        # progress estimate). None until the first batch.
        self.seconds_per_edit: float | None = None
        self.seconds_per_batch: float | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "Batcher":
        for i, engine in enumerate(self.engines):
            t = threading.Thread(target=self._worker, args=(engine,), name=f"lime-fast-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def drain(self) -> int:
        """Take no new jobs and fail the queued ones with ``ShuttingDown`` now (their callers can answer
        at once); running batches go on. Returns how many queued jobs were failed."""
        with self._cond:
            self._stopping = True
            dropped, self._pending = self._pending, []
            self._cond.notify_all()
        for job in dropped:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the server is shutting down"))
        return len(dropped)

    def abandon_running(self) -> int:
        """Fail the running jobs with ``ShuttingDown`` (the grace period is over) and let their batches
        stop at the next UNet step. Returns how many jobs were running."""
        with self._cond:
            active = list(self._active)
        for job in active:
            job.abandoned = True
            _settle(job, error=ShuttingDown("the server is shutting down; the edit did not finish in the grace period"))
        return len(active)

    def stop(self, timeout: float | None = 30.0) -> None:
        """``drain``, then wait up to ``timeout`` seconds per worker for the running batches."""
        self.drain()
        for t in self._threads:
            t.join(timeout)

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads) and not self._stopping

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet running)."""
        return len(self._pending)

    @property
    def running(self) -> int:
        """Edits in batches now running."""
        return self._running

    # --- the client side ------------------------------------------------------------------------
    def submit(self, image: PIL.Image.Image, instruction: str, mask: np.ndarray | None, config: EditConfig) -> Job:
        """Queue one edit; returns its ``Job`` (``job.future`` resolves to the ``EditResult``)."""
        return self._enqueue(Job(image, instruction, mask, config, batch_key(image, config, self.multiple)))

    def submit_call(self, engine, task: Callable, label: str = "refine", mask: np.ndarray | None = None) -> Job:
        """Queue ``task(engine)`` to run alone on ``engine``'s worker, in arrival order with the edits (a
        refinement: its tensors live on that engine). label: what logs call it; mask: a bool array it
        holds, counted in the queue's bytes. ``job.future`` resolves to what ``task`` returns."""
        if not any(engine is e for e in self.engines):
            raise ValueError("this engine has no worker here: the result was made by another server's engine")
        job = Job(None, label, mask, None, (), task=task, engine=engine)
        job.key = ("call", job.id)  # never equal to another job's: a call runs alone
        return self._enqueue(job)

    def _enqueue(self, job: Job) -> Job:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} edits waiting)", self.retry_after())
            queued = sum(j.nbytes for j in self._pending)
            if self.max_queue_bytes is not None and self._pending and queued + job.nbytes > self.max_queue_bytes:
                raise QueueFull(f"the queue is full ({queued / 2**20:.0f} MiB of pictures waiting)", self.retry_after())
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """The client is gone (timeout, disconnect): drop the job if it has not started. True when
        it was dropped; False when it is running or done (its result is then simply not used)."""
        job.abandoned = True
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
        return job.future.cancel()

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (whole seconds, at least 1): Retry-After."""
        per_edit = self.seconds_per_edit or 1.0
        return max(1, round((len(self._pending) + self._running) * per_edit / len(self.engines)))

    # --- the worker side ------------------------------------------------------------------------
    def _eligible(self, engine) -> list[Job]:
        """The queued jobs ``engine``'s worker may take, oldest first: edits, and calls bound to it."""
        return [j for j in self._pending if j.engine is None or j.engine is engine]

    def _next_batch(self, engine=None) -> list[Job] | None:
        """Block until a batch for ``engine``'s worker is ready (see the module docstring); None when
        stopping. A call job is a batch of its own, taken at once (no window)."""
        with self._cond:
            while True:
                while not self._eligible(engine) and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                first = self._eligible(engine)[0]
                close_at = first.submitted + (0 if first.task is not None else self.window_s)
                while True:
                    same = [j for j in self._eligible(engine) if j.key == first.key]
                    left = close_at - time.monotonic()
                    if len(same) >= self.max_batch or left <= 0 or self._stopping or not same or same[0] is not first:
                        break
                    self._cond.wait(left)
                if self._stopping:
                    return None
                if self._eligible(engine)[:1] != [first]:
                    continue  # the oldest job was cancelled (or taken by another worker): start over
                group = same[: self.max_batch]
                taken = set(map(id, group))
                self._pending = [j for j in self._pending if id(j) not in taken]
                # a job cancelled after we looked is dropped here, never run
                group = [j for j in group if j.future.set_running_or_notify_cancel()]
                if group:
                    self._running += len(group)
                    self._active += group
                    return group

    def _worker(self, engine) -> None:
        while True:
            group = self._next_batch(engine)
            if group is None:
                return
            try:
                self._run(engine, group)
            finally:
                with self._cond:
                    self._running -= len(group)
                    self._active = [j for j in self._active if j not in group]

    def _run(self, engine, group: list[Job]) -> None:
        if group[0].task is not None:
            return self._run_call(engine, group[0])
        t0 = time.monotonic()
        for job in group:
            job.started, job.batch_size, job.ran_on = t0, len(group), engine
        masks = [j.mask for j in group]
        try:
            # the warnings raised in this thread during this batch only (capture_warnings is per thread:
            # other engines' workers run their batches at the same time)
            with capture_warnings() as caught:
                results = engine.edit_batch(
                    [j.image for j in group],
                    [j.instruction for j in group],
                    masks=masks if any(m is not None for m in masks) else None,
                    seeds=[j.config.seed for j in group],
                    progress=False,
                    should_stop=lambda: all(j.abandoned for j in group),
                    config=group[0].config,
                )
        except EditCancelled as e:  # every caller is gone: nobody waits for these
            log.info("a batch of %d stopped early: its callers are gone", len(group))
            for job in group:
                _settle(job, error=e)
            return
        except Exception as e:
            if len(group) > 1:  # find the edit that fails; the others still get their images
                log.warning("a batch of %d failed (%s: %s); retrying its edits one by one", len(group), type(e).__name__, e)
                for job in group:
                    self._run(engine, [job])
                return
            log.error("edit failed: %s: %s", type(e).__name__, e, exc_info=e)
            _settle(group[0], error=e)
            return
        seconds = time.monotonic() - t0
        self.seconds_per_edit = _ema(self.seconds_per_edit, seconds / len(group))
        self.seconds_per_batch = _ema(self.seconds_per_batch, seconds)
        if self.metrics is not None:
            self.metrics.observe_batch(len(group), seconds, getattr(results[0], "unet_evals", 0))
        log.debug("batch of %d at %s in %.2f s", len(group), group[0].key[0], seconds)
        for job, result, mine in zip(group, results, attribute_warnings(caught, group)):
            job.warnings = mine
            _settle(job, result=result)


    def _run_call(self, engine, job: Job) -> None:
        """Run a call job (``submit_call``) and settle its future with what it returns or raises."""
        t0 = job.started = time.monotonic()
        job.batch_size, job.ran_on = 1, engine
        try:
            with capture_warnings() as caught:
                result = job.task(engine)
        except Exception as e:  # the caller turns it into an answer (a RefineError is the client's, a 400)
            log.info("%s failed: %s: %s", job.instruction, type(e).__name__, e)
            _settle(job, error=e)
            return
        if self.metrics is not None:
            self.metrics.observe_refine(time.monotonic() - t0, getattr(result, "unet_evals", 0))
        job.warnings = list(dict.fromkeys(caught))
        _settle(job, result=result)


def attribute_warnings(messages: list[str], group: list[Job]) -> list[list[str]]:
    """Each job's share of its batch's warnings, each message once, in order. A batch of one gets them
    all. In a larger batch a warning about one edit must not reach the others' clients (it may quote
    that edit's instruction): a message that quotes instructions (as ``repr``, the way lime_fast's
    warnings do) goes to the jobs with those instructions, one about "the mask" to the jobs that
    have a mask, and the rest (the working size, k-means, CUDA graphs) concern the whole batch."""
    unique = list(dict.fromkeys(messages))
    if len(group) == 1:
        return [unique]
    shares: list[list[str]] = [[] for _ in group]
    for text in unique:
        quoted = [i for i, j in enumerate(group) if repr(j.instruction) in text]
        if not quoted and text.startswith("the mask"):
            quoted = [i for i, j in enumerate(group) if j.mask is not None]
        for i in quoted or range(len(group)):
            shares[i].append(text)
    return shares


def _settle(job: Job, result=None, error: BaseException | None = None) -> None:
    """Resolve ``job.future`` unless it already is (cancelled, or failed by ``abandon_running``)."""
    try:
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _ema(old: float | None, new: float) -> float:
    return new if old is None else 0.8 * old + 0.2 * new
