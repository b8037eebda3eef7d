"""Writing results safely: output paths checked before any model work, images written atomically.

An image is written to a hidden temporary file in its final folder, fsynced, then renamed over the
final name (``os.replace``, atomic on POSIX and Windows): a reader sees the old file, or the complete
new one, never a partial file. A group of files (``save_all``) is written as temporaries first and
renamed only once every one of them is complete, so a failure or Ctrl-C leaves none of the group.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from pathlib import Path

import PIL.Image

from .errors import LimeError


class OutputError(LimeError, ValueError):
    """An output location cannot be written (exists without --force, is a folder, is read-only, ...)."""


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable across power loss; not possible on every platform (Windows), harmless to skip.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _write(image, tmp: Path, fmt: str | None) -> None:
    with open(tmp, "wb") as f:
        image.save(f, format=fmt)
        f.flush()
        os.fsync(f.fileno())


def image_format(path: Path) -> str:
    """PIL's format name for ``path``'s extension; ``OutputError`` when it names no image format."""
    fmt = PIL.Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"cannot tell the image format of '{path}' from its extension (use .png or .jpg)")
    return fmt


def atomic_save(image, path: Path, fmt: str | None = "PNG") -> None:
    """Save a PIL image at ``path`` (PNG unless ``fmt``; None: from the extension) through a temporary
    file and a rename: ``path`` is absent, its previous content, or the complete new image."""
    save_all({Path(path): image}, fmt=fmt)


def save_all(images: dict, fmt: str | None = None) -> None:
    """Write several images ({path: PIL image}) all or nothing: every one goes to a temporary file
    first (format from its extension unless ``fmt``), and they are renamed into place only when all are
    complete; on any error (or KeyboardInterrupt) the temporaries are removed and no final file changes."""
    tmps: dict[Path, Path] = {}
    try:
        for path, image in images.items():
            path = Path(path)
            tmps[path] = _temporary(path)
            _write(image, tmps[path], fmt or image_format(path))
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for folder in {p.parent for p in tmps}:
        _fsync_dir(folder)


def check_outputs(paths, force: bool = False, *, create: bool = True) -> None:
    """Check, before any model work, that every path in ``paths`` can be written: not an existing file
    unless ``force``, never an existing folder, its parent a folder (or creatable: ``create``), and that
    folder writable (a real probe file, which also catches read-only file systems). Raises
    ``OutputError`` naming the first problem; writes nothing that stays."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if p.is_dir():
            raise OutputError(f"the output '{p}' is a folder; give a file name (e.g. {p / 'edited.png'})")
        image_format(p)
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise OutputError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    seen: set[Path] = set()
    for p in paths:
        folder = p.parent
        if folder in seen:
            continue
        seen.add(folder)
        ancestor = folder
        while not ancestor.exists():  # the folder will be created: probe the nearest existing ancestor
            if ancestor.parent == ancestor:
                break
            ancestor = ancestor.parent
        if ancestor.exists() and not ancestor.is_dir():
            raise OutputError(f"cannot write '{p}': '{ancestor}' is a file, not a folder")
        if ancestor != folder and not create:
            raise OutputError(f"cannot write '{p}': the folder '{folder}' does not exist")
        try:
            with tempfile.TemporaryFile(dir=ancestor):
                pass
        except OSError as e:
            raise OutputError(f"cannot write '{p}': the folder '{ancestor}' is not writable ({e.strerror})") from None
