"""lime_fast.serve.batcher with a fake engine (lime_fast.testing.fakes): how edits group into batches,
the window, the bounds (jobs and bytes), cancelling, failures, shutdown (drain, abandon), stopping a
batch whose callers all left, and each job's warnings."""

import threading
import time

import numpy as np
import pytest

from lime_fast.config import EditConfig
from lime_fast.serve.batcher import Batcher, QueueFull, ShuttingDown
from lime_fast.testing.fakes import FakeEngine, WarningEngine, hold, picture, wait_until


@pytest.fixture
def fake():
    return FakeEngine()


def test_batcher_groups_by_working_size_and_config(fake):
    b = Batcher([fake], max_batch=8, window_s=0.0).start()
    try:
        hold(b, fake)
        cfg, other = fake.default_config, fake.default_config.replace(text_guidance=2.5)
        jobs = [b.submit(picture((64, 64)), "a1", None, cfg),
                b.submit(picture((96, 96)), "b1", None, cfg),           # another working size (96 -> 96)
                b.submit(picture((65, 63)), "a2", None, cfg),           # rounds to 64 x 64: same batch as a1
                b.submit(picture((64, 64)), "c1", None, other),         # another config
                b.submit(picture((64, 64)), "a3", None, cfg.replace(seed=7))]  # another seed: same batch, own seed
        fake.gate.set()
        results = [j.future.result(10) for j in jobs]
    finally:
        b.stop()
    assert fake.calls == [["blocker"], ["a1", "a2", "a3"], ["b1"], ["c1"]]  # oldest key first, each key together
    assert fake.seeds[1] == [cfg.seed, cfg.seed, 7]  # edit_batch gets one seed per edit
    assert [r.instruction for r in results] == ["a1", "b1", "a2", "c1", "a3"]
    assert [j.batch_size for j in jobs] == [3, 1, 3, 1, 3]


def test_batcher_window_collects_close_arrivals_only(fake):
    b = Batcher([fake], max_batch=8, window_s=0.5).start()
    try:
        first = b.submit(picture(), "w1", None, fake.default_config)
        time.sleep(0.05)
        second = b.submit(picture(), "w2", None, fake.default_config)
        first.future.result(10), second.future.result(10)
        assert first.started - first.submitted >= 0.45  # a batch short of max_batch waits out the window
        late = b.submit(picture(), "w3", None, fake.default_config)
        late.future.result(10)
    finally:
        b.stop()
    assert fake.calls == [["w1", "w2"], ["w3"]]


def test_batcher_max_batch_and_no_batching(fake):
    b = Batcher([fake], max_batch=4, window_s=0.0).start()
    try:
        hold(b, fake)
        jobs = [b.submit(picture(), f"j{i}", None, fake.default_config) for i in range(10)]
        fake.gate.set()
        [j.future.result(10) for j in jobs]
    finally:
        b.stop()
    assert [len(c) for c in fake.calls] == [1, 4, 4, 2]
    assert sum(fake.calls[1:], []) == [f"j{i}" for i in range(10)]  # each once, in order

    single = FakeEngine()
    b = Batcher([single], max_batch=1, window_s=0.05).start()
    try:
        jobs = [b.submit(picture(), f"s{i}", None, single.default_config) for i in range(3)]
        [j.future.result(10) for j in jobs]
    finally:
        b.stop()
    assert single.calls == [["s0"], ["s1"], ["s2"]]


def test_batcher_queue_full(fake):
    b = Batcher([fake], max_batch=2, window_s=0.0, max_queue=3).start()
    try:
        hold(b, fake)  # running: not counted in the queue
        queued = [b.submit(picture(), f"q{i}", None, fake.default_config) for i in range(3)]
        with pytest.raises(QueueFull) as e:
            b.submit(picture(), "one too many", None, fake.default_config)
        assert e.value.retry_after >= 1 and b.depth == 3
        fake.gate.set()
        [j.future.result(10) for j in queued]
        b.submit(picture(), "room again", None, fake.default_config).future.result(10)
    finally:
        b.stop()


def test_batcher_cancel_queued_job_never_runs_running_batch_unbroken(fake):
    b = Batcher([fake], max_batch=8, window_s=0.05).start()
    try:
        hold(b, fake)
        keep, drop = (b.submit(picture(), n, None, fake.default_config) for n in ("keep", "drop"))
        assert b.cancel(drop) and drop.future.cancelled() and b.depth == 1
        fake.gate.set()
        assert keep.future.result(10).instruction == "keep"
        # now cancel one edit of a batch that is already running: the other still gets its result
        fake.gate.clear()
        x1, x2 = (b.submit(picture(), n, None, fake.default_config) for n in ("x1", "x2"))
        wait_until(lambda: fake.active == 1)
        assert not b.cancel(x1)  # too late to drop: it runs, its result is not used
        fake.gate.set()
        assert x2.future.result(10).instruction == "x2"
    finally:
        b.stop()
    assert fake.calls == [["blocker"], ["keep"], ["x1", "x2"]]


def test_batcher_failing_edit_fails_alone():
    engine = FakeEngine(fail_on="bad")
    b = Batcher([engine], max_batch=8, window_s=0.0).start()
    try:
        hold(b, engine)
        jobs = [b.submit(picture(), n, None, engine.default_config) for n in ("good1", "bad", "good2")]
        engine.gate.set()
        assert jobs[0].future.result(10).instruction == "good1"
        assert jobs[2].future.result(10).instruction == "good2"
        with pytest.raises(ValueError, match="bad"):
            jobs[1].future.result(10)
    finally:
        b.stop()
    assert engine.calls[1:] == [["good1", "bad", "good2"], ["good1"], ["bad"], ["good2"]]


def test_batcher_one_worker_per_engine_never_concurrent_on_one():
    engines = [FakeEngine(delay=0.05), FakeEngine(delay=0.05)]
    b = Batcher(engines, max_batch=2, window_s=0.0).start()
    try:
        jobs = [b.submit(picture(), f"e{i}", None, engines[0].default_config) for i in range(12)]
        assert sorted(j.future.result(10).instruction for j in jobs) == sorted(f"e{i}" for i in range(12))
    finally:
        b.stop()
    assert all(e.max_active == 1 for e in engines) and all(e.calls for e in engines)
    assert sorted(sum(engines[0].calls + engines[1].calls, [])) == sorted(f"e{i}" for i in range(12))


def test_batcher_stop_fails_queued_jobs(fake):
    b = Batcher([fake], max_batch=1, window_s=0.0).start()
    hold(b, fake)
    queued = b.submit(picture(), "q", None, fake.default_config)
    threading.Timer(0.2, fake.gate.set).start()
    b.stop()
    with pytest.raises(Exception, match="shutting down"):
        queued.future.result(1)


def test_attribute_warnings_gives_no_client_another_edit_s_instruction():
    from lime_fast.serve.batcher import Job, attribute_warnings

    cfg = EditConfig()
    mask = np.ones((64, 64), bool)
    jobs = [Job(picture(), "make it red", None, cfg, ()), Job(picture(), "make it blue", mask, cfg, ())]
    messages = ["Instruction 'make it red' has no content word", "the image is 96 x 96; it is processed smaller",
                "Instruction 'make it blue' has no content word", "the mask covers 100% of the image",
                "the image is 96 x 96; it is processed smaller"]
    red, blue = attribute_warnings(messages, jobs)
    assert red == ["Instruction 'make it red' has no content word", "the image is 96 x 96; it is processed smaller"]
    assert blue == ["the image is 96 x 96; it is processed smaller", "Instruction 'make it blue' has no content word",
                    "the mask covers 100% of the image"]
    assert attribute_warnings(messages, jobs[:1]) == [list(dict.fromkeys(messages))]  # alone: all of them, once each


def test_batcher_attaches_each_job_its_warnings_with_engines_in_parallel():
    barrier = threading.Barrier(2)  # each engine's first batch waits for the other's: they overlap
    engines = [WarningEngine(barrier), WarningEngine(barrier)]
    b = Batcher(engines, max_batch=2, window_s=0.2).start()
    try:
        jobs = [b.submit(picture(), f"edit {i}", None, engines[0].default_config) for i in range(4)]
        [j.future.result(20) for j in jobs]
    finally:
        b.stop()
    assert sorted(len(e.calls) for e in engines) == [1, 1] and all(len(e.calls[0]) == 2 for e in engines)
    for i, job in enumerate(jobs):
        assert job.warnings == [f"Instruction 'edit {i}' has no content word", "the image is 64 x 64; it is processed smaller"]


def test_drain_answers_the_queue_and_abandon_stops_the_running_batch():
    engine = FakeEngine(delay=5.0, steps=500)
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
    engine = FakeEngine(delay=5.0, steps=500)
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
    engine = FakeEngine()
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


# --- call jobs (POST /v1/refine): bound to one engine, in arrival order with the edits, alone -----------


def test_a_call_waits_for_the_running_batch_then_runs_alone_before_later_edits(fake):
    import warnings

    from lime_fast.errors import LimeWarning

    b = Batcher([fake], max_batch=8, window_s=0.0).start()
    seen = []

    def task(engine):
        seen.append((engine is fake, fake.active))  # nothing else runs on the engine meanwhile
        warnings.warn("the refined region is empty", LimeWarning)
        return "refined"

    try:
        hold(b, fake)
        call = b.submit_call(fake, task)
        later = b.submit(picture(), "after", None, fake.default_config)
        time.sleep(0.1)
        assert not seen and b.depth == 2  # queued behind the held batch, counted in the queue
        fake.gate.set()
        assert call.future.result(10) == "refined" and later.future.result(10).instruction == "after"
    finally:
        b.stop()
    assert seen == [(True, 0)] and call.started <= later.started and call.ran_on is fake
    assert fake.calls == [["blocker"], ["after"]]  # the call never joined a batch
    assert call.warnings == ["the refined region is empty"] and call.batch_size == 1


def test_a_call_runs_only_on_its_engine_s_worker():
    engines = [FakeEngine(), FakeEngine()]
    b = Batcher(engines, max_batch=1, window_s=0.0).start()
    try:
        for e in engines:
            e.gate.clear()
        blocker = b.submit(picture(), "blocker", None, engines[0].default_config)
        wait_until(lambda: engines[0].active + engines[1].active == 1)  # one worker holds it, the other is idle
        busy = engines[0] if engines[0].active else engines[1]
        call = b.submit_call(busy, lambda engine: engine)
        time.sleep(0.1)
        assert not call.future.done() and b.depth == 1  # the idle worker did not take it
        for e in engines:
            e.gate.set()
        assert call.future.result(10) is busy
        blocker.future.result(10)
    finally:
        b.stop()


def test_a_call_s_failure_cancel_and_shutdown_reach_its_caller(fake):
    b = Batcher([fake], max_batch=1, window_s=0.0).start()
    try:
        def boom(engine):
            raise ValueError("segment 9 is not in this edit")

        with pytest.raises(ValueError, match="segment 9"):
            b.submit_call(fake, boom).future.result(10)
        with pytest.raises(ValueError, match="no worker here"):
            b.submit_call(FakeEngine(), lambda e: None)
        hold(b, fake)
        ran = []
        dropped = b.submit_call(fake, ran.append)
        assert b.cancel(dropped) and b.depth == 0
        queued = b.submit_call(fake, ran.append)
        threading.Timer(0.2, fake.gate.set).start()
    finally:
        b.stop()
    with pytest.raises(ShuttingDown):
        queued.future.result(1)
    assert ran == []
