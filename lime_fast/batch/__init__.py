"""Batch jobs: every row of a JSONL manifest edited, on one machine or on Ray, resumable.

    lime-fast batch edits.jsonl --out results/                     # one machine
    lime-fast batch edits.jsonl --out results/ --ray --workers 4   # the same job on Ray Data

    from lime_fast import batch
    summary = batch.run("edits.jsonl", "results/", model="timbrooks/instruct-pix2pix")

**Manifest.** One JSON object per line: ``id`` (string, or an int; used as a file name, so no path
separators, no leading dot, no control characters, unique even ignoring letter case), ``image``
(path; relative paths are relative to the manifest's folder), ``instruction``, optional ``mask``
(path, white = edit here; ``mask_convention``, optional, says how the file marks its region: auto,
white, transparent or opaque, as ``lime_fast.inputs.load_mask``; default the job's) and, optionally, any ``EditConfig`` field as a per-row override (``"seed": 7``,
``"steps": 20``, ``"roi_words": ["collar"]``), applied on top of the job's config. Blank lines and
lines starting with ``#`` are ignored. Every row is checked before any model loads: its fields, that
its image (and mask) exist and decode, and that its config is valid. A bad row is reported with its
line number; with ``strict=True`` the job refuses to start, otherwise the row is recorded
as failed and skipped.

**Outputs.** ``DIR/images/{id}.png`` (the edited image, at the input's size), ``DIR/roi/{id}.png``
(with ``save_roi``: the RoI mask, white = edited region) and ``DIR/results.jsonl``: one JSON line per
finished row, with the keys of ``RECORD_KEYS`` (paths are relative to DIR). The latest line of an id
is its state.

**Atomicity.** Each image is written to a hidden temporary file in its final folder
(``.{id}.png.{pid}.{random}.tmp``), fsynced, then renamed over the final name (``os.replace``, atomic on
POSIX and Windows). Its record is appended only after the rename, as ONE ``os.write`` of one whole
line to a file opened with ``O_APPEND``, then fsynced: a killed process cannot split a ``write``
system call, so results.jsonl never holds half a record from a kill, and appending costs O(1) per
row where a rewrite through a temporary file would cost O(rows) (quadratic over a job). A torn last
line can only come from a power loss or an unsafe network file system; it is ignored when the file
is read and the next append starts on a fresh line. Killed between the rename and the append, the
row has an image and no record: it is simply edited again (the rename replaces the image with an
identical one). Temporary files left by a killed job are removed when the next run starts. One job
at a time may write into DIR (an ``flock`` on ``DIR/.lock``; released by the OS when a job dies).

**Resume.** Re-running the same job skips the rows whose latest record is ``done``, whose image exists
and whose resume key (``lime_fast.batch.keys``: the SHA-256 of the input image's bytes, the
instruction, the mask file's bytes, the row's whole effective config with its seed, and the model's pin:
a local folder's resolved path and weights digest, a hub id's name) equals the row's key now; the rows
whose latest record is ``failed`` are skipped unless ``retry_failed=True``. A done row whose key
changed (same id, other image bytes, instruction, mask, config or model) is edited again: its output is
deleted first, then rewritten, its new record supersedes the old one, and the summary says how many
rows were redone this way. A record without a key (a results.jsonl from before keys existed) counts as
changed: its row is redone. Every input of the job is read (hashed) on each run. To redo an unchanged
row, delete its image.

**Determinism.** Results depend only on the row (its seed is part of its config) as long as the
batch composition and the numerics are the same: with the default ``batch_size=1`` a row is edited
alone, so a job run in one go, a job resumed after a kill and the same job on Ray give identical
images. ``batch_size > 1`` edits rows of the same working size and config in one UNet batch (for GPU
throughput); batched and single edits can differ by 1-2/255 per pixel (BLAS rounding), and which rows
share a batch depends on which rows were left to do. On the CPU the torch thread count changes the
last bit too: Ray workers run ``num_cpus_per_worker`` threads; pass the same ``threads`` to both runs to
compare them bit for bit.

**Ray** (``pip install 'lime-fast[ray]'``): ``ray=True`` runs the same rows as a Ray Data
``map_batches`` over ``EditorActor`` (one engine loaded per worker, ``workers`` of them, each with
``num_gpus_per_worker`` GPUs); Ray does the scheduling, retries (a dead worker's batches are redone on
another) and back-pressure. Workers write the images into DIR; the driver alone appends to
results.jsonl. On a multi-node cluster DIR and the input files must be on storage every node sees at
the same path, and lime_fast must be installed on every node.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DEFAULT_MODEL, EditConfig
from ..errors import BatchError
from .keys import model_pin, resume_key
from .manifest import CONFIG_FIELDS, ROW_KEYS, ManifestError, Problem, Row, check_files, check_id, read_manifest
from .runners import RAY_EXTRA_HINT, EditorActor, _import_ray, _run_local, _run_ray, edit_group, plan_batches
from .store import (IMAGES, LOCK, RECORD_KEYS, RESULTS, ROIS, ResultsWriter, _locked, _read_results,
                    _remove_temporaries, atomic_save, image_path, problem_record, read_results, roi_path)

__all__ = [
    "BatchError", "ManifestError", "Problem", "Row", "Summary", "ResultsWriter", "EditorActor", "run", "pending",
    "read_manifest", "read_results", "check_files", "check_id", "edit_group", "plan_batches", "atomic_save",
    "image_path", "roi_path", "problem_record", "row_keys", "RESULTS", "IMAGES", "ROIS", "LOCK", "RECORD_KEYS", "ROW_KEYS",
    "CONFIG_FIELDS", "RAY_EXTRA_HINT",
]


@dataclass
class Summary:
    """What one ``run`` did.

    done: rows edited and written in this run; skipped: rows left alone (done before, or failed before
    and not retried); failed: rows recorded as failed in this run (bad rows and failed edits);
    seconds: wall time of the whole run (checking, model loading or Ray start-up, edits);
    edits_per_second: done / seconds. failures: "line N (id X): error" of this run's failed rows.
    redone: rows run again because they changed since their done record (counted in done / failed).
    """

    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    edits_per_second: float = 0.0
    rows: int = 0
    out_dir: Path | None = None
    results: Path | None = None
    failures: list[str] = field(default_factory=list)
    skipped_failed: int = 0  # of the skipped rows, those that failed before (retry_failed re-runs them)
    redone: int = 0  # of the rows run, those done before whose resume key changed (or was missing)

    def __str__(self) -> str:
        text = (f"{self.rows} rows: {self.done} done, {self.skipped} skipped, {self.failed} failed in "
                f"{self.seconds:.1f} s ({self.edits_per_second:.2f} edits/s); results: {self.results}")
        if self.redone:
            text += (f"\n{self.redone} rows done in an earlier run had changed (image, mask, instruction, config or "
                     "model; or their record had no resume key) and were run again")
        if self.skipped_failed:
            text += (f"\n{self.skipped_failed} of the skipped rows failed in an earlier run and were not retried: "
                     "after fixing them, run again with --retry-failed (retry_failed=True) to edit them")
        return text


class _Progress:
    """tqdm over the rows to edit, with done / failed / edits per second in its postfix."""

    def __init__(self, total: int, enabled: bool, summary: Summary):
        from tqdm.auto import tqdm

        self.summary = summary
        self.bar = tqdm(total=total, desc="batch", unit="edit", disable=not enabled, dynamic_ncols=True)
        self.start()

    def start(self) -> None:
        """Start the edits-per-second clock (local runs: once the model is loaded)."""
        self.t0 = time.perf_counter()
        self.refresh()

    def refresh(self) -> None:
        rate = self.summary.done / max(time.perf_counter() - self.t0, 1e-9)
        postfix = {"done": self.summary.done, "failed": self.summary.failed, "edits/s": f"{rate:.2f}"}
        if self.summary.redone:
            postfix["changed"] = self.summary.redone
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.refresh()

    def write(self, text: str) -> None:
        if not self.bar.disable:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def run(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model=DEFAULT_MODEL,
    config: EditConfig | dict | None = None,
    batch_size: int = 1,
    save_roi: bool = False,
    strict: bool = False,
    retry_failed: bool = False,
    mask_convention: str = "auto",
    device=None,
    torch_dtype=None,
    threads: int | None = None,
    progress: bool = True,
    ray: bool = False,
    ray_address: str | None = None,
    workers: int = 1,
    num_gpus_per_worker: float | None = None,
    num_cpus_per_worker: float = 1,
) -> Summary:
    """Edit every row of ``manifest`` (JSONL, see the module docstring) into ``out_dir``; resumable.

    Args:
        model: hub id or local folder (or, without ``ray``, a ``LimeEngine`` / loaded pipeline).
        config: the job's ``EditConfig`` (or a dict of its fields); rows override fields of it.
        batch_size: rows per UNet batch (same working size and config). 1, the default, makes every
            output independent of what else is in the job; larger batches are for GPU throughput and
            may change the last bit of a pixel.
        save_roi: also write each RoI mask to ``DIR/roi/{id}.png``.
        strict: refuse to start (``ManifestError``) if any row to run is bad; otherwise bad rows are
            recorded as failed and skipped.
        retry_failed: run again the rows whose latest record is ``failed``.
        mask_convention: how the rows' mask files mark their region (``lime_fast.inputs.load_mask``),
            for rows without their own ``mask_convention`` field.
        device, torch_dtype: as ``lime_fast.get_engine`` (default CUDA + fp16 when available).
        threads: torch CPU threads for the edits (here, or in each Ray worker); default unchanged
            (Ray workers: their ``num_cpus_per_worker``).
        progress: show a progress bar (rows done, failed, edits per second).
        ray: run on Ray Data (``pip install 'lime-fast[ray]'``); uses the Ray instance already
            initialized in this process, else connects to ``ray_address`` (or ``RAY_ADDRESS``, or
            starts a local one, shut down at the end).
        workers: Ray actors, each loading the engine once.
        num_gpus_per_worker: GPUs per actor; default 1 when the Ray cluster has GPUs, else 0.
        num_cpus_per_worker: CPUs per actor.

    Returns a ``Summary`` (done, skipped, failed, seconds, edits_per_second). Raises ``BatchError``
    (``ManifestError`` under ``strict``) before anything is written if the job cannot start.
    """
    t0 = time.perf_counter()
    ray_mod = _check_job(model, ray, workers, batch_size)
    config = _job_config(model, config)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise BatchError(f"the output folder {out} exists and is not a folder")
    summary = Summary(out_dir=out, results=out / RESULTS)
    rows, problems = read_manifest(manifest, config, mask_convention)
    summary.rows = len(rows) + len(problems)
    check_outputs_spare_inputs(rows, out, save_roi)
    keys = row_keys(rows, model_pin(model))

    with contextlib.ExitStack() as stack:
        locked = out.is_dir()
        if locked:  # before reading results.jsonl: no other job may be appending to it
            stack.enter_context(_locked(out))
        records = _read_results(out / RESULTS)
        todo, todo_problems = _check_rows(pending(rows, records, out, retry_failed, summary, keys), strict, progress)
        todo_problems = sorted(pending(problems, records, out, retry_failed, summary, keys) + todo_problems,
                               key=lambda p: p.line)
        if strict and todo_problems:
            raise ManifestError(todo_problems, manifest)

        for sub in (IMAGES, ROIS) if save_roi else (IMAGES,):
            (out / sub).mkdir(parents=True, exist_ok=True)
        if not locked:  # DIR was created just now, maybe by a job started at the same time as this one:
            stack.enter_context(_locked(out))  # once locked, drop what that job has recorded meanwhile
            records = _read_results(out / RESULTS)
            todo = pending(todo, records, out, retry_failed, summary, keys)
            todo_problems = pending(todo_problems, records, out, retry_failed, summary, keys)
        summary.skipped = summary.rows - len(todo) - len(todo_problems)
        summary.redone = _drop_changed(todo + todo_problems, records, out)
        _remove_temporaries(out)
        writer = ResultsWriter(out / RESULTS)
        stack.callback(writer.close)
        bar = _Progress(len(todo), progress, summary)
        stack.callback(bar.close)
        _record_problems(todo_problems, writer, summary, bar)
        if todo:
            account = _accountant(writer, summary, bar, keys)
            if ray:
                _run_ray(ray_mod, todo, out, account, model=model, batch_size=batch_size, save_roi=save_roi,
                         device=device, torch_dtype=torch_dtype, threads=threads, ray_address=ray_address,
                         workers=workers, num_gpus=num_gpus_per_worker, num_cpus=num_cpus_per_worker)
            else:
                _run_local(todo, out, account, bar, model=model, batch_size=batch_size, save_roi=save_roi,
                           device=device, torch_dtype=torch_dtype, threads=threads)
    summary.seconds = time.perf_counter() - t0
    summary.edits_per_second = summary.done / summary.seconds if summary.seconds > 0 else 0.0
    return summary


def check_outputs_spare_inputs(rows: list[Row], out: Path, save_roi: bool = False) -> None:
    """BatchError, before anything is written, when any row's output (``DIR/images/{id}.png``, and with
    ``save_roi`` ``DIR/roi/{id}.png``) is the image or mask of any row of the job: the edit would overwrite
    its input."""
    inputs = {}
    for r in rows:
        for p in (r.image, r.mask):
            if isinstance(p, (str, os.PathLike)):
                inputs.setdefault(Path(p).resolve(), r)
    clashes = []
    for r in rows:
        for path in (image_path(out, r.id), roi_path(out, r.id)) if save_roi else (image_path(out, r.id),):
            owner = inputs.get(path.resolve())
            if owner is not None:
                clashes.append(f"line {r.line} (id {r.id}) would write {path}, the input of line {owner.line}")
    if clashes:
        raise BatchError(f"{len(clashes)} output(s) would overwrite the job's own inputs: " + "; ".join(clashes[:5])
                         + (" ..." if len(clashes) > 5 else "") + ". Choose another --out folder.")


def _check_job(model, ray: bool, workers: int, batch_size: int):
    """The job's arguments, checked before any work; returns the ray module when ``ray``."""
    ray_mod = None
    if ray:
        ray_mod = _import_ray()  # fail fast, before any work
        if not isinstance(model, (str, os.PathLike)):
            raise BatchError("with ray, model must be a hub id or a folder path (each worker loads its own engine)")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(model, (str, os.PathLike)):
        from ..models import local_checkpoint, model_location

        local_checkpoint(model_location(model))  # a mistyped folder fails here, before anything is written
    return ray_mod


def _job_config(model, config) -> EditConfig:
    """The job's EditConfig: ``config`` (or a dict of its fields), else the model's own defaults (a
    shipped model's, a family's levels, or the spec's)."""
    if isinstance(config, dict):
        return EditConfig(**config)
    if config is not None:
        return config
    from ..models import default_config

    return model.default_config if hasattr(model, "default_config") else default_config(model)


def row_keys(rows: list[Row], pin) -> dict[str, str | None]:
    """Each row's resume key (``keys.resume_key``) by id; None where its image or mask cannot be read (the
    row is then checked again, and fails its check with the reason)."""
    out = {}
    for r in rows:
        try:
            out[r.id] = resume_key(pin=pin, instruction=r.instruction, config=r.config, image=r.image, mask=r.mask,
                                   mask_convention=r.mask_convention)
        except OSError:
            out[r.id] = None
    return out


def _fresh(x, prev: dict, out: Path, keys: dict | None) -> bool:
    """Whether a done record still stands for ``x``: its image exists and its key is the row's key now (a
    record without a key, or a problem row, never matches)."""
    if x.id is None or not image_path(out, x.id).is_file():
        return False
    key = (keys or {}).get(x.id)
    return key is not None and prev.get("key") == key


def pending(items: list, records, out: Path, retry_failed: bool, summary: Summary, keys: dict | None = None) -> list:
    """Of ``items`` (rows or problems), those to run: never recorded; recorded done but the image is gone
    or its key differs from ``keys[id]`` (the row changed, or the record predates keys); or recorded failed,
    with ``retry_failed``. Failed ones left alone are counted in ``summary.skipped_failed``. records:
    ``_read_results``'s (by id, by line, ...); keys: ``row_keys``'s."""
    by_id, by_line, _ = records
    left = []
    for x in items:
        prev = by_id.get(x.id) if x.id is not None else by_line.get(x.line)
        if prev is None or (prev["status"] == "done" and not _fresh(x, prev, out, keys)):
            left.append(x)
        elif prev["status"] == "failed":
            if retry_failed:
                left.append(x)
            else:
                summary.skipped_failed += 1
    return left


def _check_rows(rows: list[Row], strict: bool, progress: bool) -> tuple[list[Row], list[Problem]]:
    """Rows whose files exist and decode, and a Problem for each that does not (``check_files``)."""
    from tqdm.auto import tqdm

    from ..errors import InputWarning

    good, bad = [], []
    for r in tqdm(rows, desc="checking", unit="row", leave=False, disable=not progress or len(rows) < 100):
        try:
            check_files(r, strict=strict)
            good.append(r)
        except (OSError, TypeError, ValueError, InputWarning) as e:
            bad.append(Problem(r.line, r.id, str(e)))
    return good, bad


def _record_problems(problems: list[Problem], writer: ResultsWriter, summary: Summary, bar: _Progress) -> None:
    """Each bad row recorded as failed; the first 20 shown."""
    for p in problems:
        writer.append(problem_record(p))
        summary.failed += 1
        summary.failures.append(str(p))
    for line in summary.failures[:20]:
        bar.write(f"bad row: {line}")
    if len(summary.failures) > 20:
        bar.write(f"... and {len(summary.failures) - 20} more bad rows (see {summary.results})")
    bar.refresh()


def _drop_changed(items: list, records, out: Path) -> int:
    """Delete the outputs of the rows about to be redone whose latest record is done with their image still
    there (they changed, see ``pending``), so that a redo that fails leaves no stale picture; returns how
    many. Called while holding DIR's lock."""
    by_id = records[0]
    n = 0
    for x in items:
        prev = by_id.get(x.id) if x.id is not None else None
        if prev is not None and prev["status"] == "done" and image_path(out, x.id).is_file():
            for p in (image_path(out, x.id), roi_path(out, x.id)):
                p.unlink(missing_ok=True)
            n += 1
    return n


def _accountant(writer: ResultsWriter, summary: Summary, bar: _Progress, keys: dict):
    """The callback the runners call with each finished row's record: add the row's resume key, append it,
    count it, show it."""

    def account(rec: dict) -> None:
        rec["key"] = keys.get(rec["id"])
        writer.append(rec)
        if rec["status"] == "done":
            summary.done += 1
        else:
            summary.failed += 1
            summary.failures.append(str(Problem(rec["line"], rec["id"], rec["error"])))
            bar.write(f"failed: {summary.failures[-1]}")
        bar.update(1)

    return account
