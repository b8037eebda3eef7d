"""Batch jobs (lime_fast.batch, `lime-fast batch`): manifest checks, outputs, resume after a kill, Ray."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from lime_fast import EditConfig, batch
from lime_fast.cli import main
from lime_fast.demo import shapes_image

# Cheaper than conftest's FAST: the tests here are about the runner, not the edit.
ROW_CFG = dict(steps=3, capture_step=1, reg_steps=(0, 2), grid_size=16, top_k=4)
INSTRUCTIONS = ["make the red circle blue", "turn the square green", "make the triangle yellow", "add snow"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """64 x 64 pictures img0..img7 (and a 128 x 64 one), a mask and a corrupt PNG."""
    d = tmp_path_factory.mktemp("inputs")
    for i in range(8):
        shapes_image(64, seed=i).save(d / f"img{i}.png")
    shapes_image(128, seed=9).resize((128, 64)).save(d / "wide.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 8:40] = 255
    PIL.Image.fromarray(mask).save(d / "mask.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature, then garbage
    return d


def write_manifest(path: Path, rows, raw_lines=()) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def good_rows(inputs, n, **cfg):
    cfg = {**ROW_CFG, **cfg}
    return [{"id": f"r{i}", "image": str(inputs / f"img{i}.png"), "instruction": INSTRUCTIONS[i % 4], **cfg}
            for i in range(n)]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / batch.RESULTS).read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------


def test_manifest_bad_rows_are_recorded_with_their_line(tmp_path, inputs, tiny_dir, capsys):
    shutil.copy(inputs / "img0.png", tmp_path / "rel.png")
    rows = [
        {"id": "good", "image": "rel.png", "instruction": "make the red circle blue", **ROW_CFG},  # relative path
        {"id": 7, "image": str(inputs / "img1.png"), "instruction": "turn the square green", "mask": str(inputs / "mask.png"),
         "seed": 7, **ROW_CFG},  # an int id, a user mask, a per-row seed
        {"id": "missing", "image": str(tmp_path / "nope.png"), "instruction": "make it red"},
        {"id": "corrupt", "image": str(inputs / "corrupt.png"), "instruction": "make it red"},
        {"id": "badvalue", "image": str(inputs / "img2.png"), "instruction": "make it red", "steps": 0},
        {"id": "unknown", "image": str(inputs / "img2.png"), "instruction": "make it red", "colour": "red"},
        {"id": "GOOD", "image": str(inputs / "img2.png"), "instruction": "duplicate, up to case"},
        {"id": "../escape", "image": str(inputs / "img2.png"), "instruction": "make it red"},
        {"id": "nomask", "image": str(inputs / "img2.png"), "instruction": "make it red", "mask": "nope-mask.png"},
        {"id": "noinstr", "image": str(inputs / "img2.png"), "instruction": "   "},
    ]
    m = write_manifest(tmp_path / "m.jsonl", rows, raw_lines=["", "# a comment", "{not json"])
    out = tmp_path / "out"
    summary = batch.run(m, out, model=str(tiny_dir), save_roi=True, progress=True)
    assert (summary.done, summary.skipped, summary.failed, summary.rows) == (2, 0, 9, 11)
    assert summary.seconds > 0 and summary.edits_per_second > 0
    err = capsys.readouterr().err
    assert "done=2" in err and "failed=9" in err and "edits/s" in err  # the progress bar's postfix

    state = batch.read_results(out)
    assert {k: v["status"] for k, v in state.items()} == {
        "good": "done", "7": "done", "missing": "failed", "corrupt": "failed", "badvalue": "failed",
        "unknown": "failed", "nomask": "failed", "noinstr": "failed",
    }
    by_line = {r["line"]: r for r in records(out)}
    assert "no such file" in by_line[3]["error"]
    assert "cannot read" in by_line[4]["error"]
    assert "steps must be >= 1" in by_line[5]["error"]
    assert "'colour'" in by_line[6]["error"]
    assert by_line[7]["id"] is None and "duplicate id 'GOOD'" in by_line[7]["error"] and "line 1" in by_line[7]["error"]
    assert by_line[8]["id"] is None and "path separators" in by_line[8]["error"]
    assert "mask" in by_line[9]["error"] and "no such file" in by_line[9]["error"]
    assert "instruction is empty" in by_line[10]["error"]
    assert by_line[13]["id"] is None and "not valid JSON" in by_line[13]["error"]

    good, seven = state["good"], state["7"]
    assert good["image"] == "images/good.png" and good["roi"] == "roi/good.png" and good["line"] == 1
    assert good["tokens"] == ["red", "circle", "blue"] and 0 < good["roi_area"] <= 1
    assert {"encode", "edit", "decode", "total", "write"} <= set(good["timings"])
    assert seven["config"]["seed"] == 7 and seven["config"]["steps"] == 3
    assert seven["roi_area"] == pytest.approx((32 * 32) / (64 * 64))  # the user mask is the RoI
    for rid in ("good", "7"):
        assert PIL.Image.open(out / "images" / f"{rid}.png").size == (64, 64)
        assert PIL.Image.open(out / "roi" / f"{rid}.png").size == (64, 64)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["7.png", "good.png"]


def test_strict_refuses_to_start_before_loading_or_writing(tmp_path, inputs, capsys):
    rows = good_rows(inputs, 1) + [{"id": "x", "image": str(tmp_path / "nope.png"), "instruction": "make it red"},
                                   {"id": "y", "image": str(inputs / "img1.png"), "instruction": "x", "top_k": -1}]
    m = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    # a hub id that cannot load: strict must refuse before trying
    with pytest.raises(batch.ManifestError) as info:
        batch.run(m, out, model="nobody/no-such-model", strict=True, progress=False)
    assert [p.line for p in info.value.problems] == [2, 3]
    assert not out.exists()
    rc = main(["batch", str(m), "--out", str(out), "--model", "nobody/no-such-model", "--strict", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "line 2 (id x)" in err and "line 3 (id y)" in err and "top_k" in err and "Traceback" not in err
    assert not out.exists()


def test_rerun_skips_done_rows_and_retries_failed_only_when_asked(tmp_path, inputs, tiny_dir):
    late = tmp_path / "late.png"
    rows = good_rows(inputs, 2) + [{"id": "late", "image": str(late), "instruction": "make it red", **ROW_CFG}]
    m = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    s1 = batch.run(m, out, model=str(tiny_dir), progress=False)
    assert (s1.done, s1.skipped, s1.failed) == (2, 0, 1)
    first = (out / batch.RESULTS).read_bytes()
    r0 = pixels(out / "images" / "r0.png")
    mtime = (out / "images" / "r0.png").stat().st_mtime_ns

    s2 = batch.run(m, out, model=str(tiny_dir), progress=False)  # nothing to do
    assert (s2.done, s2.skipped, s2.failed) == (0, 3, 0)
    assert (out / batch.RESULTS).read_bytes() == first
    assert (out / "images" / "r0.png").stat().st_mtime_ns == mtime

    shutil.copy(inputs / "img5.png", late)  # the missing input appears
    s3 = batch.run(m, out, model=str(tiny_dir), progress=False)
    assert (s3.done, s3.skipped, s3.failed) == (0, 3, 0)  # failed rows wait for retry_failed
    s4 = batch.run(m, out, model=str(tiny_dir), progress=False, retry_failed=True)
    assert (s4.done, s4.skipped, s4.failed) == (1, 2, 0)
    assert {k: v["status"] for k, v in batch.read_results(out).items()} == {"r0": "done", "r1": "done", "late": "done"}

    (out / "images" / "r0.png").unlink()  # a done row whose image is gone is done again, identically
    s5 = batch.run(m, out, model=str(tiny_dir), progress=False)
    assert (s5.done, s5.skipped) == (1, 2)
    assert np.array_equal(pixels(out / "images" / "r0.png"), r0)
    assert [r["id"] for r in records(out)] == ["late", "r0", "r1", "late", "r0"]  # bad rows are recorded first


def test_killed_job_resumes_without_loss_duplication_or_corrupt_files(tmp_path, inputs, tiny_dir):
    n = 8
    m = write_manifest(tmp_path / "m.jsonl", good_rows(inputs, n))
    out, ref = tmp_path / "out", tmp_path / "ref"
    cmd = [sys.executable, "-m", "lime_fast.cli", "batch", str(m), "--out", str(out), "--model", str(tiny_dir),
           "--threads", "1", "--quiet"]
    results = out / batch.RESULTS
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (results.is_file() and b"\n" in results.read_bytes()):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the job wrote no record in 2 minutes"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up handler can run
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    before = records(out)  # every line whole (json.loads would raise on a torn one)
    assert 1 <= len(before) < n, "the job finished before it could be killed: make it longer"
    for p in (out / "images").glob("*.png"):
        pixels(p)  # whatever exists decodes: images appear only by rename

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{n - len(before)} done, {len(before)} skipped, 0 failed" in rerun.stdout
    after = records(out)
    assert after[: len(before)] == before  # appended to, never rewritten
    assert sorted(r["id"] for r in after) == sorted(f"r{i}" for i in range(n))  # each id exactly once
    assert all(r["status"] == "done" for r in after)
    assert temporaries(out) == []
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"r{i}.png" for i in range(n))

    # the same job in one go (in this process) gives the same images
    one_go = batch.run(m, ref, model=str(tiny_dir), threads=1, progress=False)
    assert one_go.done == n
    for i in range(n):
        assert np.array_equal(pixels(out / "images" / f"r{i}.png"), pixels(ref / "images" / f"r{i}.png")), i


def test_atomic_writes_torn_record_and_leftovers(tmp_path, inputs, monkeypatch):
    # a crash inside atomic_save leaves neither a partial final file nor its temporary
    target = tmp_path / "x.png"

    def crash(src, dst):
        raise OSError("killed here")

    with monkeypatch.context() as mp:
        mp.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="killed here"):
            batch.atomic_save(shapes_image(64), target)
    assert not target.exists() and temporaries(tmp_path) == []

    # a torn last record (power loss) is ignored and the next record starts on a line of its own;
    # temporaries a killed job left are removed when the next run starts
    from lime_fast.batch.keys import model_pin
    from lime_fast.models import default_config

    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    shapes_image(64).save(out / "images" / "r0.png")
    m = write_manifest(tmp_path / "m.jsonl", [
        *good_rows(inputs, 1), {"id": "r1", "image": str(tmp_path / "nope.png"), "instruction": "make it red"}])
    rows, _ = batch.read_manifest(m, default_config("nobody/never-loaded"))
    key = batch.row_keys(rows, model_pin("nobody/never-loaded"))["r0"]  # r0 done, and unchanged since
    done = batch.store._record("r0", 1, "done", image="images/r0.png", key=key)
    (out / batch.RESULTS).write_text(json.dumps(done) + "\n" + '{"id": "r1", "line": 2, "sta')
    (out / "images" / ".r1.png.123.deadbeef.tmp").write_bytes(b"half an image")
    summary = batch.run(m, out, model="nobody/never-loaded", progress=False)  # r0 done; r1 fails its check
    assert (summary.done, summary.skipped, summary.failed) == (0, 1, 1)
    lines = (out / batch.RESULTS).read_text().split("\n")
    assert lines[1] == '{"id": "r1", "line": 2, "sta' and json.loads(lines[2])["id"] == "r1" and lines[3] == ""
    assert batch.read_results(out)["r1"]["status"] == "failed"
    assert temporaries(out) == []


def test_batches_group_rows_by_working_size_and_config(tmp_path, inputs, tiny_dir):
    def row(i, size, **cfg):
        r = batch.Row(f"r{i}", i + 1, Path("x.png"), "make it red", None, EditConfig(**cfg))
        r.size = size
        return r

    rows = [row(0, (64, 64)), row(1, (70, 60)), row(2, (128, 64)), row(3, (64, 64), seed=1), row(4, (64, 64)),
            row(5, (128, 64))]
    plan = [[r.id for r in b] for b in batch.plan_batches(rows, 2, multiple=64)]
    assert plan == [["r0", "r1"], ["r2", "r5"], ["r3"], ["r4"]]  # 70 x 60 works at 64 x 64
    assert [[r.id for r in b] for b in batch.plan_batches(rows, 2, multiple=None)] == [
        ["r0", "r4"], ["r2", "r5"], ["r1"], ["r3"]]
    assert [len(b) for b in batch.plan_batches(rows, 1, multiple=64)] == [1] * 6

    manifest_rows = good_rows(inputs, 3) + [
        {"id": "wide", "image": str(inputs / "wide.png"), "instruction": "make it red", **ROW_CFG}]
    m = write_manifest(tmp_path / "m.jsonl", manifest_rows)
    out = tmp_path / "out"
    summary = batch.run(m, out, model=str(tiny_dir), batch_size=2, progress=False)
    assert summary.done == 4
    state = batch.read_results(out)
    assert [state[k]["batch"] for k in ("r0", "r1", "r2", "wide")] == [2, 2, 1, 1]
    assert PIL.Image.open(out / "images" / "wide.png").size == (128, 64)


def test_ray_missing_is_one_line_naming_the_extra(tmp_path, inputs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    m = write_manifest(tmp_path / "m.jsonl", good_rows(inputs, 1))
    with pytest.raises(batch.BatchError, match=r"lime-fast\[ray\]"):
        batch.run(m, tmp_path / "out", ray=True)
    assert main(["batch", str(m), "--out", str(tmp_path / "out"), "--ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'lime-fast[ray]'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")
def test_ray_matches_local(tmp_path, inputs, tiny_dir, monkeypatch):
    try:
        import ray
        import ray.data
    except ImportError:
        pytest.skip("Ray Data is not installed here (pip install 'lime-fast[ray]')")
    for var, value in {"RAY_DISABLE_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        monkeypatch.setenv(var, value)  # nothing may touch the network
    rows = good_rows(inputs, 4, steps=2, capture_step=1, reg_steps=[0, 1])
    rows.append({"id": "missing", "image": str(tmp_path / "nope.png"), "instruction": "make it red"})
    m = write_manifest(tmp_path / "m.jsonl", rows)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    s_local = batch.run(m, local, model=str(tiny_dir), threads=1, save_roi=True, progress=False)
    assert (s_local.done, s_local.failed) == (4, 1)

    # the same resume rule: a row already done in DIR is skipped
    for sub in ("images", "roi"):
        (on_ray / sub).mkdir(parents=True)
        shutil.copy(local / sub / "r0.png", on_ray / sub / "r0.png")
    (on_ray / batch.RESULTS).write_text(json.dumps(batch.read_results(local)["r0"]) + "\n")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rc = main(["batch", str(m), "--out", str(on_ray), "--model", str(tiny_dir), "--save-roi", "--ray",
                   "--workers", "2", "--num-cpus-per-worker", "1", "--quiet"])
    finally:
        ray.shutdown()
    assert rc == 1  # the missing row failed, as it did locally
    a, b = batch.read_results(local), batch.read_results(on_ray)
    assert {k: v["status"] for k, v in a.items()} == {k: v["status"] for k, v in b.items()}
    assert [r["id"] for r in records(on_ray)].count("r0") == 1
    assert len({r["worker"] for r in records(on_ray)[1:] if r["status"] == "done"}) >= 1
    for i in range(4):
        for sub in ("images", "roi"):
            assert np.array_equal(pixels(local / sub / f"r{i}.png"), pixels(on_ray / sub / f"r{i}.png")), (sub, i)
        assert a[f"r{i}"]["tokens"] == b[f"r{i}"]["tokens"] and a[f"r{i}"]["roi_area"] == b[f"r{i}"]["roi_area"]
    assert temporaries(on_ray) == []


def test_two_jobs_started_together_edit_each_row_once(tmp_path, inputs, tiny_dir):
    """Two jobs on an --out folder that does not exist yet: creating it and taking its lock is one safe
    step, and a job that gets the lock late drops what the other recorded meanwhile."""
    m = write_manifest(tmp_path / "m.jsonl", good_rows(inputs, 3))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lime_fast.cli", "batch", str(m), "--out", str(out), "--model", str(tiny_dir),
           "--threads", "1", "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] in (0, 2), outs
    if codes[1] == 2:  # refused while the other held the lock, with one clear line
        assert any("another batch job is writing" in err for _, err in outs), outs
    done = [r["id"] for r in records(out) if r["status"] == "done"]
    assert sorted(done) == ["r0", "r1", "r2"]


def test_summary_says_how_to_retry_failed_rows(tmp_path, inputs, tiny_dir):
    rows = good_rows(inputs, 2)
    rows[1]["image"] = str(tmp_path / "not-yet.png")
    m = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    s1 = batch.run(m, out, model=str(tiny_dir), progress=False)
    assert (s1.done, s1.failed) == (1, 1)
    shutil.copy(inputs / "img1.png", tmp_path / "not-yet.png")  # the user fixes the row ...
    s2 = batch.run(m, out, model=str(tiny_dir), progress=False)  # ... and re-runs: nothing is done
    assert (s2.done, s2.skipped, s2.skipped_failed) == (0, 2, 1)
    assert "--retry-failed" in str(s2) and "1 of the skipped rows failed" in str(s2)
    s3 = batch.run(m, out, model=str(tiny_dir), progress=False, retry_failed=True)
    assert (s3.done, s3.skipped, s3.skipped_failed) == (1, 1, 0) and "--retry-failed" not in str(s3)


def test_row_config_fields_are_checked_by_editconfig(tmp_path, inputs):
    rows = good_rows(inputs, 3)
    rows[0]["colour"] = "red"
    rows[1]["roi_words"] = ["square"]  # not in "turn the square green"? it is: fine
    rows[2]["roi_words"] = ["dog"]  # not in its instruction: a bad row, found before any model loads
    rows[2]["seed"] = 2**70
    m = write_manifest(tmp_path / "m.jsonl", rows)
    good, problems = batch.read_manifest(m)
    assert [r.id for r in good] == ["r1"]
    assert "unknown field(s) 'colour'" in problems[0].error and "EditConfig fields" in problems[0].error
    assert "seed" in problems[1].error
    rows[2].pop("seed")
    good, problems = batch.read_manifest(write_manifest(tmp_path / "m2.jsonl", rows))
    assert "'dog' is not in the instruction" in problems[1].error


def test_shipped_model_by_name_in_a_batch_job(tmp_path):
    """The shipped model's name works in the batch runner too, with its own defaults (20 steps unless a
    row or the job says otherwise)."""
    from lime_fast.testing.shapes import make_sample

    sample = make_sample(5_000_002, 64)
    sample.source.save(tmp_path / "s.png")
    m = write_manifest(tmp_path / "m.jsonl", [{"id": "s", "image": "s.png", "instruction": sample.instruction,
                                               "steps": 2, "capture_step": 0}])
    summary = batch.run(m, tmp_path / "out", model="shapes-ip2p", progress=False)
    assert summary.done == 1
    (rec,) = records(tmp_path / "out")
    assert rec["unet_evals"] == 3 and rec["config"]["grid_size"] == 64  # the model's grid, the row's steps


def test_pending_selects_what_a_run_must_do(tmp_path):
    """The resume rule on its own: never recorded, or done but its image is gone or its key differs from the
    row's key now (or is missing), or failed and retried."""
    from lime_fast.batch import Summary, image_path, pending
    from lime_fast.batch.manifest import Problem

    names = ["new", "done", "done-lost", "failed", "changed", "keyless"]
    rows = [Problem(i + 1, name, "") for i, name in enumerate(names)] + [Problem(9, None, "")]
    (tmp_path / "images").mkdir()
    for name in ("done", "changed", "keyless"):
        image_path(tmp_path, name).write_bytes(b"png")
    keys = {name: f"key-{name}" for name in names}
    by_id = {"done": {"status": "done", "key": "key-done"}, "done-lost": {"status": "done", "key": "key-done-lost"},
             "failed": {"status": "failed"}, "changed": {"status": "done", "key": "key-before"},
             "keyless": {"status": "done"}}  # recorded before resume keys existed: stale-unknown, redone
    records = (by_id, {9: {"status": "failed"}}, None)
    s = Summary()
    assert [r.id for r in pending(rows, records, tmp_path, False, s, keys)] == ["new", "done-lost", "changed", "keyless"]
    assert s.skipped_failed == 2  # the failed row and the failed id-less line
    s = Summary()
    assert [r.line for r in pending(rows, records, tmp_path, True, s, keys)] == [1, 3, 4, 5, 6, 9] and s.skipped_failed == 0
    assert [r.id for r in pending(rows[:2], records, tmp_path, False, Summary())] == ["new", "done"]  # no keys: none match


@pytest.mark.parametrize("save_roi", [False, True])
def test_a_job_never_writes_over_its_own_inputs(tmp_path, save_roi, capsys):
    """A job whose --out holds its inputs under the names it would write (images/{id}.png, roi/{id}.png) is
    refused before anything is written, through the API and the CLI; the pictures stay as they were."""
    job = tmp_path / "job"
    (job / "images").mkdir(parents=True)
    (job / "roi").mkdir()
    rows = []
    for i in range(2):
        shapes_image(64).save(job / "images" / f"000{i}.png")
        PIL.Image.fromarray(np.full((64, 64), 255, np.uint8)).save(job / "roi" / f"m{i}.png")
        rows.append({"id": f"000{i}", "image": f"images/000{i}.png", "instruction": "make it red"})
    rows.append({"id": "m1", "image": "images/0000.png", "instruction": "make it red", "mask": "roi/m1.png"})
    manifest = write_manifest(job / "edits.jsonl", rows)
    before = {p: p.read_bytes() for p in job.rglob("*.png")}
    with pytest.raises(batch.BatchError, match="would overwrite the job's own inputs") as e:
        batch.run(manifest, job, model="shapes-ip2p", save_roi=save_roi, progress=False)
    assert "line 1 (id 0000)" in str(e.value)
    assert ("id m1) would write " + str(job / "roi" / "m1.png")) in str(e.value) if save_roi else "/roi/" not in str(e.value)
    assert main(["batch", str(manifest), "--out", str(job), "--model", "shapes-ip2p", "--quiet"]) != 0
    assert "overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in job.rglob("*.png")} == before and not (job / "results.jsonl").exists()


def test_changed_rows_are_redone_not_reused(tmp_path, inputs, tiny_dir):
    """Same ids, other content: a row whose image bytes, instruction, mask bytes or config changed is
    edited again (its record superseded, its image overwritten) and counted as redone; an unchanged row
    is skipped. A record written before resume keys existed (no "key") is redone too."""
    for i in range(5):
        shutil.copy(inputs / f"img{i}.png", tmp_path / f"in{i}.png")
    shutil.copy(inputs / "mask.png", tmp_path / "m3.png")
    rows = [{"id": f"r{i}", "image": f"in{i}.png", "instruction": INSTRUCTIONS[i % 4], **ROW_CFG} for i in range(5)]
    rows[3]["mask"] = "m3.png"
    m = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    s1 = batch.run(m, out, model=str(tiny_dir), progress=False)
    assert (s1.done, s1.redone) == (5, 0)
    old = {i: pixels(out / "images" / f"r{i}.png") for i in range(5)}

    shutil.copy(inputs / "img7.png", tmp_path / "in0.png")  # r0: new image bytes at the same path
    rows[1]["instruction"] = "make the triangle yellow"  # r1: another instruction
    rows[2]["seed"] = 11  # r2: another per-row config
    mask = np.zeros((64, 64), np.uint8)
    mask[30:60, 30:60] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "m3.png")  # r3: new mask bytes at the same path
    write_manifest(m, rows)  # r4 unchanged
    s2 = batch.run(m, out, model=str(tiny_dir), progress=False)
    assert (s2.done, s2.skipped, s2.failed, s2.redone) == (4, 1, 0, 4)
    assert "4 rows done in an earlier run had changed" in str(s2)
    state = batch.read_results(out)
    assert state["r3"]["roi_area"] == pytest.approx(30 * 30 / 64**2, abs=1e-6)  # the new mask was used
    ref = tmp_path / "ref"  # each redone row equals a fresh job's output
    assert batch.run(m, ref, model=str(tiny_dir), progress=False).done == 5
    for i in range(5):
        assert np.array_equal(pixels(out / "images" / f"r{i}.png"), pixels(ref / "images" / f"r{i}.png")), i
        assert state[f"r{i}"]["key"] == batch.read_results(ref)[f"r{i}"]["key"]
    assert not any(np.array_equal(old[i], pixels(out / "images" / f"r{i}.png")) for i in range(4))

    s3 = batch.run(m, out, model=str(tiny_dir), progress=False)  # nothing changed since
    assert (s3.done, s3.skipped, s3.redone) == (0, 5, 0)
    lines = records(out)
    for rec in lines:  # an old results.jsonl: records without keys
        rec.pop("key")
    (out / batch.RESULTS).write_text("".join(json.dumps(r) + "\n" for r in lines))
    s4 = batch.run(m, out, model=str(tiny_dir), progress=False)
    assert (s4.done, s4.skipped, s4.redone) == (5, 0, 5)


def test_resume_key_covers_image_mask_instruction_config_and_model(tmp_path, inputs):
    from lime_fast.batch.keys import model_pin, resume_key

    shutil.copy(inputs / "img0.png", tmp_path / "a.png")
    base = dict(pin=("/models/a", "d1"), instruction="make it red", config=EditConfig(), image=tmp_path / "a.png")
    key = resume_key(**base)
    assert resume_key(**base) == key and len(key) == 64
    for change in (dict(pin=("/models/a", "d2")), dict(pin=("/models/b", "d1")), dict(instruction="make it blue"),
                   dict(config=EditConfig(seed=1)), dict(mask=inputs / "mask.png"), dict(image=inputs / "img1.png")):
        assert resume_key(**{**base, **change}) != key, change
    masked = resume_key(**base, mask=inputs / "mask.png")
    assert resume_key(**base, mask=inputs / "mask.png", mask_convention="white") != masked  # another reading
    assert resume_key(**base, mask_convention="white") == key  # no mask: nothing to read
    shutil.copy(inputs / "img1.png", tmp_path / "a.png")  # the same path, other bytes
    assert resume_key(**base) != key
    assert model_pin("nobody/hub-model") == ("nobody/hub-model", None)  # a hub id: its name only
