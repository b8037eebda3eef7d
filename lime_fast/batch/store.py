"""The result store of a batch job: ``DIR/images``, ``DIR/roi``, ``DIR/results.jsonl`` and the job lock.

Atomic image writes, whole-line appends and the lock are described in the ``lime_fast.batch``
docstring. Also used by ``lime-fast eval`` (the same resumable store).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from ..config import EditConfig
from ..errors import BatchError
from ..io import atomic_save  # noqa: F401  (re-exported: the store's image writes)
from .manifest import CONFIG_FIELDS, Problem, Row

RESULTS = "results.jsonl"
IMAGES = "images"
ROIS = "roi"
LOCK = ".lock"
RECORD_KEYS = (
    "id", "line", "status", "image", "roi", "input", "instruction", "tokens", "silenced", "roi_area",
    "fallback", "unet_evals", "batch", "timings", "config", "error", "worker", "finished_at", "key",
)


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

