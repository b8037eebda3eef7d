"""Batch jobs: every row of a JSONL manifest edited, on one machine or on Ray, resumable.

    lime-fast batch edits.jsonl --out results/                     # one machine
    lime-fast batch edits.jsonl --out results/ --ray --workers 4   # the same job on Ray Data

    from lime_fast import batch
    summary = batch.run("edits.jsonl", "results/", model="timbrooks/instruct-pix2pix")

**Manifest.** One JSON object per line: ``id`` (string, or an int; used as a file name, so no path
separators, no leading dot, no control characters, unique even ignoring letter case), ``image``
(path; relative paths are relative to the manifest's folder), ``instruction``, optional ``mask``
(path, white = edit here) and, optionally, any ``EditConfig`` field as a per-row override (``"seed": 7``,
``"steps": 20``, ``"roi_words": ["collar"]``), applied on top of the job's config. Blank lines and
lines starting with ``#`` are ignored. Every row is checked before any model loads: its fields, that
its image (and mask) exist and decode, and that its config is valid. A bad row is reported with its
line number; with ``strict=True`` (``--strict``) the job refuses to start, otherwise the row is recorded
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

**Resume.** Re-running the same job skips the rows whose latest record is ``done`` and whose image
exists (they are not re-read or re-checked), and the rows whose latest record is ``failed`` unless
``retry_failed=True`` (``--retry-failed``). Rows are identified by their id: to redo a done row,
delete its image (or give it a new id).

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
import dataclasses
import json
import math
import os
import re
import socket
import time
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .config import DEFAULT_MODEL, EditConfig

RESULTS = "results.jsonl"
IMAGES = "images"
ROIS = "roi"
LOCK = ".lock"
ROW_KEYS = ("id", "image", "instruction", "mask")
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(EditConfig))
RECORD_KEYS = (
    "id", "line", "status", "image", "roi", "input", "instruction", "tokens", "silenced", "roi_area",
    "fallback", "unet_evals", "batch", "timings", "config", "error", "worker", "finished_at",
)
RAY_EXTRA_HINT = "pip install 'lime-fast[ray]'"
_MAX_ID_BYTES = 200  # + ".png" and the temporary-file decoration stays under the usual 255-byte name limit
_BAD_ID_CHARS = re.compile(r'[\x00-\x1f\x7f/\\<>:"|?*]')


class BatchError(Exception):
    """The job cannot start: a bad manifest under ``strict``, Ray missing, DIR in use, ..."""


class ManifestError(BatchError):
    """``strict`` and the manifest has bad rows; ``problems`` lists them (nothing was run or written)."""

    def __init__(self, problems: list[Problem], manifest):
        self.problems = problems
        lines = "\n".join(str(p) for p in problems[:50])
        more = f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{manifest}: {len(problems)} bad row(s), nothing was run (--strict):\n{lines}{more}")


@dataclass
class Problem:
    """A manifest row that cannot be edited: its line (1-based), its id when it has a usable one, why."""

    line: int
    id: str | None
    error: str

    def __str__(self) -> str:
        return f"line {self.line}" + (f" (id {self.id})" if self.id is not None else "") + f": {self.error}"


@dataclass
class Row:
    """One checked manifest row. image/mask are absolute paths; config is the resolved ``EditConfig``;
    overrides are the row's own config fields; size is the input's (width, height) once checked."""

    id: str
    line: int
    image: Path
    instruction: str
    mask: Path | None
    config: EditConfig
    overrides: dict = field(default_factory=dict)
    size: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        """JSON-safe form (what Ray ships to the workers)."""
        return {
            "id": self.id, "line": self.line, "image": str(self.image), "instruction": self.instruction,
            "mask": None if self.mask is None else str(self.mask), "config": dataclasses.asdict(self.config),
            "overrides": self.overrides, "size": list(self.size) if self.size else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        return cls(
            id=d["id"], line=d["line"], image=Path(d["image"]), instruction=d["instruction"],
            mask=None if d["mask"] is None else Path(d["mask"]), config=EditConfig(**_tuples(d["config"])),
            overrides=d["overrides"], size=tuple(d["size"]) if d["size"] else None,
        )


@dataclass
class Summary:
    """What one ``run`` did.

    done: rows edited and written in this run; skipped: rows left alone (done before, or failed before
    and not retried); failed: rows recorded as failed in this run (bad rows and failed edits);
    seconds: wall time of the whole run (checking, model loading or Ray start-up, edits);
    edits_per_second: done / seconds. failures: "line N (id X): error" of this run's failed rows.
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

    def __str__(self) -> str:
        return (f"{self.rows} rows: {self.done} done, {self.skipped} skipped, {self.failed} failed in "
                f"{self.seconds:.1f} s ({self.edits_per_second:.2f} edits/s); results: {self.results}")


# ---------------------------------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------------------------------


def _tuples(d: dict) -> dict:
    """JSON lists -> tuples (EditConfig's sequence fields are tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def check_id(value) -> str:
    """The row id as a string; ValueError/TypeError if it cannot safely name a file."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"id must be a string, got {type(value).__name__}")
    s = str(value)
    if not s:
        raise ValueError("id is empty")
    if s != s.strip():
        raise ValueError(f"id {s!r} starts or ends with white space")
    if _BAD_ID_CHARS.search(s):
        raise ValueError(f'id {s!r} must be usable as a file name: no path separators, control characters or <>:"|?*')
    if s.startswith(".") or s.endswith("."):
        raise ValueError(f"id {s!r} must not start or end with '.'")
    if len(s.encode("utf-8")) > _MAX_ID_BYTES:
        raise ValueError(f"id is longer than {_MAX_ID_BYTES} bytes")
    return s


def _path_field(d: dict, key: str, base: Path) -> Path | None:
    v = d.get(key)
    if v is None and key == "mask":
        return None
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"'{key}' must be a file path (a non-empty string), got {v!r}")
    p = Path(v).expanduser()
    return p if p.is_absolute() else (base / p)


def read_manifest(manifest: str | os.PathLike, config: EditConfig | None = None) -> tuple[list[Row], list[Problem]]:
    """Parse and check the fields of every row (no image is opened): (good rows, problems), in line order.

    config: the job's config, on which each row's overrides are applied. A duplicate id is a problem of
    the later line (the first line with an id owns it; ids equal but for letter case count as equal).
    """
    from .inputs import check_instruction

    path = Path(manifest)
    if not path.is_file():
        raise FileNotFoundError(f"manifest: no such file: {path}")
    base_cfg = config or EditConfig()
    base = path.resolve().parent
    rows: list[Row] = []
    problems: list[Problem] = []
    seen: dict[str, tuple[int, str]] = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            rid = None
            try:
                try:
                    text = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
                except UnicodeDecodeError as e:
                    raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
                if not text or text.startswith("#"):
                    continue
                try:
                    d = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(d, dict):
                    raise ValueError(f"a row must be a JSON object, got {type(d).__name__}")
                if "id" not in d:
                    raise ValueError("no 'id'")
                rid = check_id(d["id"])
                folded = rid.casefold()
                if folded in seen:
                    first_line, first_id = seen[folded]
                    same = "" if first_id == rid else f" as {first_id!r} (ids must differ in more than letter case)"
                    bad, rid = rid, None  # the id belongs to the first row: this record must not clobber it
                    raise ValueError(f"duplicate id {bad!r}: already used on line {first_line}{same}")
                seen[folded] = (n, rid)
                unknown = sorted(set(d) - set(ROW_KEYS) - set(CONFIG_FIELDS))
                if unknown:
                    raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}: a row has {', '.join(ROW_KEYS)} "
                                     "and EditConfig fields")
                if "instruction" not in d:
                    raise ValueError("no 'instruction'")
                instruction = check_instruction(d["instruction"])
                image = _path_field(d, "image", base)
                mask = _path_field(d, "mask", base)
                overrides = {k: v for k, v in d.items() if k in CONFIG_FIELDS}
                try:
                    cfg = base_cfg.replace(**_tuples(overrides)) if overrides else base_cfg
                except (TypeError, ValueError) as e:
                    raise ValueError(f"bad config field: {e}") from None
                rows.append(Row(rid, n, image, instruction, mask, cfg, overrides))
            except (TypeError, ValueError) as e:
                problems.append(Problem(n, rid, str(e)))
    return rows, problems


def check_files(row: Row) -> None:
    """Open the row's image (and mask) as the engine will; sets ``row.size``. Raises naming the file."""
    from .inputs import load_image, load_mask

    img = load_image(row.image)
    row.size = img.size
    if row.mask is not None:
        load_mask(row.mask)


def read_results(out_dir: str | os.PathLike) -> dict[str, dict]:
    """The latest record of each id in ``DIR/results.jsonl`` (records of rows with no usable id are left out)."""
    return _read_results(Path(out_dir) / RESULTS)[0]


def _read_results(path: Path) -> tuple[dict[str, dict], dict[int, dict], int]:
    """(latest record per id, latest id-less record per manifest line, unreadable lines)."""
    by_id: dict[str, dict] = {}
    by_line: dict[int, dict] = {}
    bad = 0
    if not path.is_file():
        return by_id, by_line, bad
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict) or rec.get("status") not in ("done", "failed"):
                    raise ValueError
            except ValueError:  # a torn last line (power loss, unsafe network file system): ignore it
                bad += 1
                continue
            if isinstance(rec.get("id"), str):
                by_id[rec["id"]] = rec
            elif isinstance(rec.get("line"), int):
                by_line[rec["line"]] = rec
    return by_id, by_line, bad


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------


def image_path(out_dir: Path, rid: str) -> Path:
    return out_dir / IMAGES / f"{rid}.png"


def roi_path(out_dir: Path, rid: str) -> Path:
    return out_dir / ROIS / f"{rid}.png"


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable across power loss; not possible on every platform (Windows), harmless to skip.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(image, path: Path) -> None:
    """Save a PIL image as PNG at ``path`` through a temporary file in the same folder and a rename:
    ``path`` is either absent, its previous content, or the complete new image, never a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _remove_temporaries(out_dir: Path) -> int:
    """Delete the temporary files a killed job left (only ours: hidden names ending in .tmp; ids never
    start with '.'). Called while holding DIR's lock, so no live job is writing them."""
    n = 0
    for sub in (IMAGES, ROIS):
        folder = out_dir / sub
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    p.unlink()
                    n += 1
    return n


class ResultsWriter:
    """Appends records to results.jsonl, each as one ``os.write`` of one whole line to an O_APPEND file
    descriptor, then ``fsync``: a record is in the file whole or not at all."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self.fd).st_size
        if size:  # a torn last line (see _read_results): start the next record on a line of its own
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self.fd, b"\n")

    def append(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self.fd, data)
        while written < len(data):  # only on a full disk or the like; a regular file takes it whole
            written += os.write(self.fd, data[written:])
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def _locked(out_dir: Path):
    """Hold an exclusive flock on DIR/.lock for the job (no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BatchError(f"another batch job is writing to {out_dir}: let it finish (or stop it) first") from None
        except OSError:  # a file system without locks (some network mounts): run unlocked
            pass
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# editing
# ---------------------------------------------------------------------------------------------------


def _config_diff(cfg: EditConfig) -> dict:
    """The config fields that differ from EditConfig's defaults (what the record keeps)."""
    default = EditConfig()
    return {f: list(v) if isinstance(v, tuple) else v
            for f in CONFIG_FIELDS if (v := getattr(cfg, f)) != getattr(default, f)}


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _record(row_id, line, status, **kw) -> dict:
    rec = dict.fromkeys(RECORD_KEYS)
    rec.update(id=row_id, line=line, status=status, worker=_worker(), finished_at=_now(), **kw)
    return rec


def _failed(row: Row, error: BaseException | str) -> dict:
    msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return _record(row.id, row.line, "failed", input=str(row.image), instruction=row.instruction,
                   config=_config_diff(row.config), error=msg)


def problem_record(p: Problem) -> dict:
    return _record(p.id, p.line, "failed", error=p.error)


def edit_group(engine, rows: list[Row], out_dir: Path, save_roi: bool = False) -> list[dict]:
    """Edit rows (same working size and config) in one ``edit_batch``, write their images atomically,
    return their records. A batch that raises is retried row by row, so one bad row fails alone."""
    try:
        masks = [None if r.mask is None else str(r.mask) for r in rows]
        results = engine.edit_batch(
            [str(r.image) for r in rows],
            [r.instruction for r in rows],
            masks=masks if any(m is not None for m in masks) else None,
            progress=False,
            config=rows[0].config,
        )
    except Exception as e:
        if len(rows) > 1:
            return [rec for r in rows for rec in edit_group(engine, [r], out_dir, save_roi)]
        return [_failed(rows[0], e)]
    records = []
    for row, res in zip(rows, results):
        try:
            t = time.perf_counter()
            out = image_path(out_dir, row.id)
            atomic_save(res.image, out)
            roi = None
            if save_roi:
                from . import viz

                roi = roi_path(out_dir, row.id)
                atomic_save(viz.mask_image(res.roi_mask), roi)
            timings = {k: round(v, 4) for k, v in res.timings.items()}
            timings["write"] = round(time.perf_counter() - t, 4)
            records.append(_record(
                row.id, row.line, "done",
                image=out.relative_to(out_dir).as_posix(),
                roi=None if roi is None else roi.relative_to(out_dir).as_posix(),
                input=str(row.image), instruction=row.instruction, tokens=list(res.tokens),
                silenced=list(res.silenced), roi_area=round(float(res.roi_mask.mean()), 6),
                fallback=res.fallback, unet_evals=res.unet_evals, batch=len(rows), timings=timings,
                config=_config_diff(row.config),
            ))
        except Exception as e:
            records.append(_failed(row, e))
    return records


def plan_batches(rows: Iterable[Row], batch_size: int, multiple: int | None) -> list[list[Row]]:
    """Group rows into batches of at most batch_size rows sharing a working size and a config, in
    manifest order (a batch is emitted when it fills; partial batches at the end). multiple: the
    model's size multiple (``LimeEngine.multiple``); None groups by exact input size instead."""
    from .inputs import working_size

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = list(rows)
    if batch_size == 1:
        return [[r] for r in rows]
    open_: dict[tuple, list[Row]] = {}
    batches: list[list[Row]] = []
    for r in rows:
        if multiple is None:
            size = r.size
        else:
            with warnings.catch_warnings():  # the edit itself warns about shrinking large images
                warnings.simplefilter("ignore")
                size = working_size(*r.size, multiple, r.config.max_side)
        key = (size, json.dumps(dataclasses.asdict(r.config), sort_keys=True))
        group = open_.setdefault(key, [])
        group.append(r)
        if len(group) == batch_size:
            batches.append(open_.pop(key))
    batches.extend(open_.values())
    return batches


def _model_multiple(model) -> int | None:
    """LimeEngine.multiple from the checkpoint's configs without loading weights (the Ray driver groups
    rows this way); None when the configs cannot be read here."""
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from .engine import pixel_multiple

        vae = AutoencoderKL.load_config(str(model), subfolder="vae")
        return pixel_multiple(vae, UNet2DConditionModel.load_config(str(model), subfolder="unet"))
    except Exception:
        return None


def _dtype_name(torch_dtype) -> str | None:
    return None if torch_dtype is None else str(torch_dtype).removeprefix("torch.")


class EditorActor:
    """Ray Data worker: loads the engine once, then edits the batches it is given.

    Input batches (numpy format) hold a column ``group``: JSON lists of ``Row.to_dict()`` planned by the
    driver (one ``edit_batch`` each); output batches hold a column ``record``: one JSON record per row.
    """

    def __init__(self, model: str, out_dir: str, save_roi: bool = False, device: str | None = None,
                 dtype: str | None = None, threads: int | None = None):
        from .cli import quiet_libraries

        quiet_libraries()
        import torch

        from . import get_engine

        if threads:
            torch.set_num_threads(int(threads))
        self.engine = get_engine(model, device=device, torch_dtype=getattr(torch, dtype) if dtype else None)
        self.out_dir = Path(out_dir)
        self.save_roi = save_roi

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        records = []
        for group in batch["group"]:
            rows = [Row.from_dict(d) for d in json.loads(str(group))]
            records += edit_group(self.engine, rows, self.out_dir, self.save_roi)
        return {"record": np.array([json.dumps(r, ensure_ascii=False) for r in records], dtype=object)}


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise BatchError(f"--ray needs Ray Data, which is not installed ({e.name or e}): {RAY_EXTRA_HINT}") from None
    return ray


# ---------------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------------


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
        self.bar.set_postfix({"done": self.summary.done, "failed": self.summary.failed, "edits/s": f"{rate:.2f}"},
                             refresh=False)
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
    if ray:
        ray_mod = _import_ray()  # fail fast, before any work
        if not isinstance(model, (str, os.PathLike)):
            raise BatchError("with ray, model must be a hub id or a folder path (each worker loads its own engine)")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(model, (str, os.PathLike)):
        from .engine import local_checkpoint

        local_checkpoint(str(model))  # a mistyped folder fails here, before anything is written
    if isinstance(config, dict):
        config = EditConfig(**config)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise BatchError(f"--out {out} exists and is not a folder")
    summary = Summary(out_dir=out, results=out / RESULTS)
    rows, problems = read_manifest(manifest, config)
    summary.rows = len(rows) + len(problems)

    with contextlib.ExitStack() as stack:
        locked = out.is_dir()
        if locked:  # before reading results.jsonl: no other job may be appending to it
            stack.enter_context(_locked(out))
        by_id, by_line, _ = _read_results(out / RESULTS)

        def already(rid: str | None, line: int) -> bool:
            prev = by_id.get(rid) if rid is not None else by_line.get(line)
            if prev is None:
                return False
            if prev["status"] == "done":
                return rid is not None and image_path(out, rid).is_file()
            return not retry_failed

        def pending(items):  # rows and problems alike: drop (and count) the ones already recorded
            left = [x for x in items if not already(x.id, x.line)]
            summary.skipped += len(items) - len(left)
            return left

        todo_problems = pending(problems)
        todo: list[Row] = []
        to_check = pending(rows)
        from tqdm.auto import tqdm

        for r in tqdm(to_check, desc="checking", unit="row", leave=False, disable=not progress or len(to_check) < 100):
            try:
                check_files(r)
                todo.append(r)
            except (OSError, TypeError, ValueError) as e:
                todo_problems.append(Problem(r.line, r.id, str(e)))
        todo_problems.sort(key=lambda p: p.line)
        if strict and todo_problems:
            raise ManifestError(todo_problems, manifest)

        for sub in (IMAGES, ROIS) if save_roi else (IMAGES,):
            (out / sub).mkdir(parents=True, exist_ok=True)
        if not locked:  # DIR was created just now
            stack.enter_context(_locked(out))
        _remove_temporaries(out)
        writer = ResultsWriter(out / RESULTS)
        stack.callback(writer.close)

        bar = _Progress(len(todo), progress, summary)
        stack.callback(bar.close)
        for p in todo_problems:
            writer.append(problem_record(p))
            summary.failed += 1
            summary.failures.append(str(p))
        for line in summary.failures[:20]:
            bar.write(f"bad row: {line}")
        if len(summary.failures) > 20:
            bar.write(f"... and {len(summary.failures) - 20} more bad rows (see {summary.results})")
        bar.refresh()

        def account(rec: dict) -> None:
            writer.append(rec)
            if rec["status"] == "done":
                summary.done += 1
            else:
                summary.failed += 1
                summary.failures.append(str(Problem(rec["line"], rec["id"], rec["error"])))
                bar.write(f"failed: {summary.failures[-1]}")
            bar.update(1)

        if todo:
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


def _run_local(todo, out, account, bar, *, model, batch_size, save_roi, device, torch_dtype, threads) -> None:
    import torch

    from . import get_engine

    engine = get_engine(model, device=device, torch_dtype=torch_dtype)
    bar.start()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        for group in plan_batches(todo, batch_size, engine.multiple):
            for rec in edit_group(engine, group, out, save_roi):
                account(rec)
    finally:
        torch.set_num_threads(old_threads)


def _run_ray(ray, todo, out, account, *, model, batch_size, save_roi, device, torch_dtype, threads, ray_address,
             workers, num_gpus, num_cpus) -> None:
    model_ref = str(model)
    local = Path(model_ref).expanduser()
    if local.exists():  # workers may run elsewhere: give them an absolute path
        model_ref = str(local.resolve())
    multiple = _model_multiple(model_ref) if batch_size > 1 else None
    groups = plan_batches(todo, batch_size, multiple)
    started = False
    if not ray.is_initialized():
        ray.init(address=ray_address)
        started = True
    try:
        if num_gpus is None:
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts rows, done, failed and edits/s
        items = [{"group": json.dumps([r.to_dict() for r in g])} for g in groups]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            EditorActor,
            fn_constructor_kwargs=dict(model=model_ref, out_dir=str(out), save_roi=save_roi, device=device,
                                       dtype=_dtype_name(torch_dtype),
                                       threads=threads or max(1, math.floor(num_cpus))),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=num_gpus,
            num_cpus=num_cpus,
        )
        try:
            for rec in ds.iter_rows():
                account(json.loads(rec["record"]))
        except ray.exceptions.RayActorError as e:  # a worker could not load the model (Ray retries crashes)
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise BatchError(f"a Ray worker failed to start: {lines[-1] if lines else type(e).__name__}") from None
    finally:
        if started:
            ray.shutdown()
