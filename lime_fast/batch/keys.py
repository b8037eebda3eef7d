"""Resume keys: one digest of everything that determines a result, so that a re-run redoes a changed row
instead of reusing its old output.

A row's key covers the bytes of its input image (SHA-256), its instruction, the bytes of its mask file
(if any) and how it is read (``mask_convention``), its whole effective ``EditConfig`` (the seed included) and the model's pin (``model_pin``).
The batch runner and ``lime-fast eval`` store it in each record (``"key"``) and reuse a done result only
when the stored key equals the row's key now; a record without a key (written before keys existed) is
redone.

**The model's pin** is what can be known without loading it: a local folder (or a shipped model, or an
engine loaded from a folder) by its resolved path and a digest of its weight files (``weights_digest``);
a hub id by its name only (its cached revision is unknown until the model has been downloaded, so a
first run would pin nothing and the second would redo everything: pass a local folder to pin the
weights); an engine built from a pipe by its class name. Device, dtype, batch size and thread count are
not part of the key: they change the last bits of a pixel, not what was asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

KEY_VERSION = 1  # bump when what a key covers changes: every older record is then redone
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_WHOLE_FILE = 64 << 20  # files up to 64 MiB are hashed whole (22 MB shapes model: ~40 ms on this CPU)
_EDGE = 16 << 20  # above that, the first and last 16 MiB


def file_digest(path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks; OSError when it cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(model) -> str:
    """The model as a string for pins: a local folder's resolved path (also for a shipped name or an
    engine loaded from a folder), a hub id as given, else ``<ClassName>``."""
    from ..models import model_location

    if isinstance(model, (str, os.PathLike)):
        loc = model_location(model)
    else:
        loc = getattr(model, "source", None)
        if loc is None:
            return f"<{type(model).__name__}>"
    return str(Path(loc).resolve()) if Path(loc).exists() else str(loc)


def weights_digest(model) -> str | None:
    """A digest of the weight files of a local model folder (a path, a shipped name, or a ``LimeEngine``
    loaded from a folder: its ``source``), so that new weights saved into the same folder are not taken
    for the old ones; None for a hub id or an engine built from a pipe. Each weight file counts by its
    relative path, size and content: whole up to 64 MiB, above that its first and last 16 MiB (an SD 1.5
    UNet is 3.4 GB)."""
    from ..models import model_location

    loc = model_location(model) if isinstance(model, (str, os.PathLike)) else getattr(model, "source", None)
    folder = Path(loc) if loc is not None else None
    if folder is None or not folder.is_dir():
        return None
    h = hashlib.sha1()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        size = f.stat().st_size
        h.update(f"{f.relative_to(folder).as_posix()}:{size};".encode())
        with open(f, "rb") as fh:
            if size <= _WHOLE_FILE:
                h.update(fh.read())
            else:
                h.update(fh.read(_EDGE))
                fh.seek(size - _EDGE)
                h.update(fh.read())
    return h.hexdigest()[:16]


def model_pin(model) -> tuple[str, str | None]:
    """(identity, weights digest) of ``model``: computed once per run (the digest reads the weight files)."""
    return model_identity(model), weights_digest(model)


def config_dict(cfg) -> dict:
    """An ``EditConfig`` as plain JSON values (tuples as lists), every field, defaults included."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def resume_key(*, pin, instruction: str, config, image=None, after: str | None = None, mask=None,
               mask_convention: str = "auto", extra: dict | None = None) -> str:
    """The key of one result (hex SHA-256 of a canonical JSON of its parts).

    image: the input file (its bytes are hashed); after: instead of an image, the key of the result this
    one edits (a multi-turn chain: a redone earlier turn changes every later key); mask: the mask file or
    None, read with ``mask_convention`` (another reading is another region); config: the effective ``EditConfig``; pin: ``model_pin``'s; extra: anything else the caller's
    result depends on (``lime-fast eval``: the method). Raises OSError when a file cannot be read.
    """
    parts = {
        "v": KEY_VERSION,
        "image": None if image is None else file_digest(image),
        "after": after,
        "instruction": instruction,
        "mask": None if mask is None else file_digest(mask),
        "mask_convention": None if mask is None else mask_convention,
        "config": config_dict(config),
        "model": list(pin),
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
