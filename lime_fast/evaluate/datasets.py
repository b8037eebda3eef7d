"""Evaluation data: MagicBrush's test release, the Hugging Face parquet layout and JSONL manifests, read
into one form: ``Session`` objects, each a list of ``Turn`` s with input, instruction, target, mask and
caption.

**MagicBrush's test release** (the zip linked from the README of OSU-NLP-Group/MagicBrush; the layout
its ``edit_cli_single_multi_turn.py`` and ``evaluation/image_eval.py`` read)::

    test/
      edit_sessions.json        {"139306": [{"input": "139306-input.png", "mask": "139306-mask1.png",
                                             "instruction": "...", "output": "139306-output1.png"}, ...]}
      images/139306/139306-input.png, 139306-output1.png, 139306-mask1.png, 139306-output2.png, ...
      local_descriptions.json   {"139306": {"139306-output1.png": "caption of that target", ...}}
      global_descriptions.json  the same shape, whole-picture captions

Turn t's ``input`` is the source picture for t = 1 and the previous turn's *ground-truth* output after
(the "independent" single-turn setting); the multi-turn setting instead feeds each turn the previous
turn's *generated* output (``lime_fast.evaluate.run``). CLIP-T compares a picture with the caption of
its target, looked up as ``captions[img_id][target file name]`` (``image_eval.py``, ``eval_clip_t``);
the default caption file is ``local_descriptions.json`` (MagicBrush's README calls it
``local_captions.json``; either name is found).

**Hugging Face** ``osunlp/MagicBrush`` (train and dev splits, parquet files ``data/{split}-*.parquet``,
columns ``img_id``, ``turn_index``, ``source_img``, ``mask_img``, ``instruction``, ``target_img``; each
image a struct of PNG ``bytes`` and ``path``): converted once into the layout above, in the
evaluation's folder (``DIR/dataset``), so both are read by one reader. It has no captions. The
conversion is written into a hidden folder beside it and renamed into place when whole; a picture that
cannot be read stops it with an error naming the parquet file, row, ``img_id`` and turn, and leaves
nothing behind. ``DIR/dataset/source.json`` records the parquet files (path, size, modification time):
when they change, the data is converted again.

**JSONL manifests** in the batch runner's format (``lime_fast.batch``: ``id``, ``image``,
``instruction``, optional ``mask`` and ``EditConfig`` fields) plus ``target`` (required), and
optionally ``caption``, ``session`` and ``turn``: rows sharing a ``session`` are its turns 1..n (each
row's ``image`` is that turn's single-turn input); a row without ``session`` is a one-turn session
named by its id.

**Masks** are read by ``lime_fast.inputs.load_mask``, the reader of every entry point, with the
dataset's ``mask_convention`` (``lime-fast eval --mask-convention``; a manifest row may carry its own).
MagicBrush's masks were drawn in DALL-E 2's editor, whose masks mark the region to edit as transparent:
under the default ``auto`` a mask with transparent pixels reads that way (alpha < 128 = edit region)
unless it is paint of one colour on a blank canvas, and a mask without transparency reads as grayscale
(>= 128 = edit region: white = edit). No MagicBrush mask could be inspected where this was written:
check the ``mask_area`` column of the per-sample CSV on a first run (MagicBrush's edits are local:
areas well under one half), or pass ``--mask-convention transparent``.
"""

from __future__ import annotations

from ..errors import LimeError
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image

SESSIONS = "edit_sessions.json"
CAPTION_FILES = ("local_descriptions.json", "local_captions.json")


class DatasetError(LimeError, ValueError):
    """The data cannot be read as any supported layout; the message says what was expected."""


@dataclass
class Turn:
    """One edit of a session.

    index: 1-based turn number. input: the picture this turn edits in the single-turn setting (the
    source for turn 1, the previous turn's target after). instruction: the edit. target: the ground
    truth after this turn. mask: the edit region (file; see ``read_mask``) or None. caption: the
    target's caption for CLIP-T, or None. target_name: the target's file name (the caption key).
    overrides: ``EditConfig`` fields of this turn alone (manifests). meta: any other fields (e.g. the
    shapes data's ``kind``). mask_convention: how the mask file marks its region (``load_mask``).
    """

    index: int
    input: Path
    instruction: str
    target: Path
    mask: Path | None = None
    caption: str | None = None
    target_name: str = ""
    overrides: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    mask_convention: str = "auto"


@dataclass
class Session:
    """An image and its edits. id: names the outputs ({id}_1.png, {id}_inde_2.png, {id}_iter_2.png)."""

    id: str
    turns: list[Turn]


@dataclass
class Dataset:
    """What ``load`` read. layout: "magicbrush" (folder), "huggingface" (converted parquet) or
    "manifest". captions: the caption file used for CLIP-T (None: no captions). problems: sessions
    left out, one line each ("139306: no such file images/139306/139306-output2.png")."""

    layout: str
    root: Path
    sessions: list[Session]
    captions: Path | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def turns(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def read_mask(path, convention: str = "auto") -> np.ndarray:
    """A mask file (or PIL image) -> bool [H, W], True = edit region: ``lime_fast.inputs.load_mask``
    (kept under this name for the evaluation's callers)."""
    from ..inputs import load_mask

    return load_mask(path, "mask", convention)


# ---------------------------------------------------------------------------------------------------
# MagicBrush's folder layout
# ---------------------------------------------------------------------------------------------------


def find_root(path: Path) -> Path | None:
    """The folder holding edit_sessions.json: ``path`` itself or its ``test`` subfolder."""
    for cand in (path, path / "test"):
        if (cand / SESSIONS).is_file():
            return cand
    return None


def _caption_file(root: Path, captions) -> Path | None:
    if captions is not None:
        p = Path(captions)
        if not p.is_absolute() and not p.exists():
            p = root / p
        if not p.is_file():
            raise DatasetError(f"captions: no such file: {p}")
        return p
    return next((root / n for n in CAPTION_FILES if (root / n).is_file()), None)


def _read_captions(path: Path) -> dict:
    """The caption file: a JSON object {img_id: {target file name: caption}}; DatasetError in one line otherwise."""
    try:
        caps = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"captions: cannot read {path} as JSON ({e})") from None
    if not isinstance(caps, dict):
        raise DatasetError(f"captions: {path} holds a JSON {type(caps).__name__}; expected an object "
                           "{img_id: {target file name: caption}} like MagicBrush's local_descriptions.json")
    return caps


def read_magicbrush(path, captions=None) -> Dataset:
    """Read MagicBrush's test layout (see the module docstring) from ``path`` (or ``path/test``).

    captions: caption file for CLIP-T (absolute, or relative to the layout's folder; default
    ``local_descriptions.json`` or ``local_captions.json`` when present). Sessions with a missing file
    or a malformed turn are left out and listed in ``problems``.
    """
    from ..batch.manifest import check_id
    from ..inputs import check_instruction

    root = find_root(Path(path))
    if root is None:
        raise DatasetError(f"{path}: no {SESSIONS} here or in {Path(path) / 'test'} (MagicBrush's test layout)")
    try:
        sessions_json = json.loads((root / SESSIONS).read_text(encoding="utf-8"))
    except ValueError as e:
        raise DatasetError(f"{root / SESSIONS}: not valid JSON ({e})") from None
    if not isinstance(sessions_json, dict):
        raise DatasetError(f"{root / SESSIONS}: expected an object {{img_id: [turn, ...]}}")
    cap_path = _caption_file(root, captions)
    caps = _read_captions(cap_path) if cap_path else {}
    data = Dataset("magicbrush", root, [], cap_path)
    for sid, turns in sessions_json.items():
        try:
            sid = check_id(sid)
            if not isinstance(turns, list) or not turns:
                raise ValueError("expected a non-empty list of turns")
            folder = root / "images" / sid
            out = []
            for t, d in enumerate(turns, start=1):
                if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("input", "instruction", "output")):
                    raise ValueError(f"turn {t}: needs 'input', 'instruction' and 'output' strings")
                files = {k: folder / d[k] for k in ("input", "output", "mask") if isinstance(d.get(k), str)}
                for f in files.values():
                    if not f.is_file():
                        raise ValueError(f"no such file {f.relative_to(root).as_posix()}")
                cap = caps.get(sid, {}).get(d["output"]) if isinstance(caps.get(sid), dict) else None
                meta = {k: v for k, v in d.items() if k not in ("input", "instruction", "output", "mask")}
                out.append(Turn(t, files["input"], check_instruction(d["instruction"]), files["output"], files.get("mask"),
                                cap if isinstance(cap, str) else None, d["output"], meta=meta))
            data.sessions.append(Session(sid, out))
        except (TypeError, ValueError) as e:
            data.problems.append(f"{sid}: {e}")
    return data


# ---------------------------------------------------------------------------------------------------
# Hugging Face parquet -> MagicBrush's folder layout
# ---------------------------------------------------------------------------------------------------

PARQUET_COLUMNS = ("img_id", "turn_index", "source_img", "mask_img", "instruction", "target_img")
_PNG = b"\x89PNG\r\n\x1a\n"


def parquet_files(path, split: str | None = None) -> list[Path]:
    """The parquet files ``path`` names: itself, or every ``*.parquet`` under it (those whose name
    starts with ``{split}-`` when a split is given), sorted."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
    if split:
        files = [f for f in files if f.name.startswith(f"{split}-")]
    return files


def _write_bytes(data: bytes, path: Path) -> None:
    """The image bytes as a PNG at ``path``, whole or not at all (temporary file + rename); raises (PIL's
    error) when they are not a readable picture."""
    import io

    if path.exists():
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if data.startswith(_PNG):
                with PIL.Image.open(io.BytesIO(data)) as im:
                    im.verify()  # chunk checksums, without decoding: a corrupt PNG is caught here
                f.write(data)
            else:  # JPEG or other: store as PNG, as the layout's names say
                with PIL.Image.open(io.BytesIO(data)) as im:
                    im.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert_parquet(files: list[Path], out: Path, progress: bool = True) -> Path:
    """Write the rows of MagicBrush parquet ``files`` into MagicBrush's test layout under ``out``.

    Turn t's input is ``{id}-input.png`` (turn 1's ``source_img``) for t = 1, else ``{id}-output{t-1}.png``
    (the previous turn's target) when that turn is present, else its own ``source_img`` as
    ``{id}-source{t}.png``. sessions.json is written last. A picture that cannot be read raises
    ``DatasetError`` naming the file, the row (0-based, in that file), its ``img_id`` and turn, and the
    column (``read_parquet`` converts into a hidden folder and removes it then). Returns ``out``.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError("reading parquet needs pyarrow: pip install 'lime-fast[eval]'") from None
    from tqdm.auto import tqdm

    rows: dict[str, dict[int, dict]] = {}
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    bar = tqdm(total=total, desc="converting parquet", unit="turn", disable=not progress, dynamic_ncols=True)
    for f in files:
        pf = pq.ParquetFile(f)
        missing = [c for c in PARQUET_COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise DatasetError(f"{f}: not MagicBrush's parquet layout (no column {', '.join(missing)}; "
                               f"expected {', '.join(PARQUET_COLUMNS)})")
        index = 0
        for batch in pf.iter_batches(batch_size=16, columns=list(PARQUET_COLUMNS)):
            for r in batch.to_pylist():
                sid, t = str(r["img_id"]), int(r["turn_index"])
                folder = out / "images" / sid
                folder.mkdir(parents=True, exist_ok=True)

                def img(col, name, r=r, sid=sid, t=t, folder=folder, index=index):
                    v = r[col]
                    if v is None or not v.get("bytes"):
                        return None
                    try:
                        _write_bytes(v["bytes"], folder / name)
                    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on bad bytes
                        raise DatasetError(f"{f.name}: row {index} (img_id {sid}, turn {t}): {col} is not a readable "
                                           f"picture ({type(e).__name__}: {e}); fix or drop that row") from None
                    return name

                rows.setdefault(sid, {})[t] = {
                    "source": img("source_img", f"{sid}-input.png" if t == 1 else f"{sid}-source{t}.png"),
                    "mask": img("mask_img", f"{sid}-mask{t}.png"),
                    "instruction": r["instruction"],
                    "output": img("target_img", f"{sid}-output{t}.png"),
                }
                index += 1
                bar.update(1)
    bar.close()
    sessions = {}
    for sid in sorted(rows, key=lambda s: (len(s), s)):
        turns = rows[sid]
        entries = []
        for t in sorted(turns):
            d = turns[t]
            prev = turns.get(t - 1)
            inp = d["source"] if t == 1 or prev is None or prev["output"] is None else prev["output"]
            entries.append({"input": inp, "mask": d["mask"], "instruction": d["instruction"], "output": d["output"],
                            "turn_index": t})
        sessions[sid] = entries
    tmp = out / f".{SESSIONS}.tmp"
    tmp.write_text(json.dumps(sessions, indent=1), encoding="utf-8")
    os.replace(tmp, out / SESSIONS)
    return out


def read_parquet(path, out: Path, split: str | None = None, captions=None, progress: bool = True) -> Dataset:
    """Convert MagicBrush parquet files (``parquet_files(path, split)``) into ``out`` (once) and read them.
    Sessions whose turns are not 1..n in order keep their turns (single-turn works) and are listed in
    ``problems`` for the multi-turn setting."""
    files = parquet_files(path, split)
    if not files:
        raise DatasetError(f"{path}: no parquet files" + (f" of split '{split}'" if split else ""))
    source = _parquet_source(files)
    if not (out / SESSIONS).is_file() or _read_source(out) != source:
        _convert_whole(files, out, source, progress)
    data = read_magicbrush(out, captions)
    data.layout = "huggingface"
    for s in data.sessions:
        got = [t.meta.get("turn_index", t.index) for t in s.turns]
        if got != list(range(1, len(got) + 1)):
            data.problems.append(f"{s.id}: turns {got} are not 1..{len(got)}: its multi-turn chain is left out")
            for t in s.turns:
                t.meta["broken_chain"] = True
    return data


SOURCE = "source.json"


def _parquet_source(files: list[Path]) -> list[list]:
    """What a conversion was made from: each parquet file's resolved path, size and modification time
    (cheap, and any rewrite of a file changes them)."""
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _read_source(folder: Path):
    """The ``source.json`` of a converted folder, or None (none, or unreadable: convert again)."""
    try:
        return json.loads((folder / SOURCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _convert_whole(files: list[Path], out: Path, source: list, progress: bool) -> None:
    """``convert_parquet`` into a hidden folder beside ``out``, renamed over ``out`` once whole: an error
    (or a kill) never leaves a half-converted ``out``; on an error the hidden folder is removed."""
    import shutil

    partial = out.with_name(f".{out.name}.partial")
    made_parent = not out.parent.exists()
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed conversion, maybe of other files
    partial.mkdir(parents=True)
    try:
        convert_parquet(files, partial, progress)
        (partial / SOURCE).write_text(json.dumps(source), encoding="utf-8")
    except Exception:
        shutil.rmtree(partial, ignore_errors=True)
        if made_parent and not any(out.parent.iterdir()):  # the folder was made for this conversion alone
            out.parent.rmdir()
        raise
    if out.exists():  # an older conversion (other parquet files): replaced
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(partial, out)


# ---------------------------------------------------------------------------------------------------
# JSONL manifests with targets
# ---------------------------------------------------------------------------------------------------

EVAL_KEYS = ("target", "caption", "session", "turn")


def read_eval_manifest(path, config=None, mask_convention: str = "auto") -> Dataset:
    """Read a batch-runner manifest whose rows also carry ``target`` (and optionally ``caption``,
    ``session``, ``turn``): see the module docstring. Rows are checked by the batch runner's own
    ``read_manifest`` (same errors, same line numbers; ``mask_convention`` is the default of rows
    without their own); bad rows and malformed sessions are listed in ``problems`` and left out."""
    from ..batch.manifest import check_id, read_manifest

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest: no such file: {path}")
    base = path.resolve().parent
    extras: dict[int, dict] = {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        # read_manifest knows the batch fields only: hand it each line without ours (relative paths
        # made absolute, the line count unchanged so its line numbers stay ours)
        plain = Path(tmp) / path.name
        with open(path, "rb") as src, open(plain, "w", encoding="utf-8") as dst:
            for n, raw in enumerate(src, start=1):
                try:
                    d = json.loads(raw)
                except ValueError:
                    d = None
                if not isinstance(d, dict):
                    dst.write(raw.decode("utf-8", "replace").rstrip("\r\n").replace("\n", " ") + "\n")
                    continue
                extras[n] = {k: d.pop(k) for k in EVAL_KEYS if k in d}
                for k in ("image", "mask"):
                    if isinstance(d.get(k), str) and d[k].strip() and not Path(d[k]).expanduser().is_absolute():
                        d[k] = str(base / d[k])
                dst.write(json.dumps(d, ensure_ascii=False) + "\n")
        rows, bad = read_manifest(plain, config, mask_convention)
    problems += [f"{path.name}: {p}" for p in bad]
    grouped: dict[str, list[tuple[int, Turn]]] = {}
    for r in rows:
        ex = extras.get(r.line, {})
        try:
            target = ex.get("target")
            if not isinstance(target, str) or not target.strip():
                raise ValueError("no 'target' (the ground-truth image after the edit)")
            target = Path(target).expanduser()
            target = target if target.is_absolute() else base / target
            for f in (r.image, target) + ((r.mask,) if r.mask else ()):
                if not f.is_file():
                    raise ValueError(f"no such file: {f}")
            caption = ex.get("caption")
            if caption is not None and not isinstance(caption, str):
                raise ValueError("'caption' must be a string")
            sid = check_id(ex.get("session", r.id))
            turn = ex.get("turn", 1)
            if isinstance(turn, bool) or not isinstance(turn, int) or turn < 1:
                raise ValueError(f"'turn' must be an int >= 1, got {turn!r}")
        except (TypeError, ValueError) as e:
            problems.append(f"{path.name}: line {r.line} (id {r.id}): {e}")
            continue
        grouped.setdefault(sid, []).append(
            (turn, Turn(turn, r.image, r.instruction, target, r.mask, caption, target.name, dict(r.overrides), {"id": r.id},
                        r.mask_convention)))
    data = Dataset("manifest", path, [], None, problems)
    for sid, items in grouped.items():
        items.sort(key=lambda x: x[0])
        if [t for t, _ in items] != list(range(1, len(items) + 1)):
            problems.append(f"{path.name}: session {sid}: turns {[t for t, _ in items]} are not 1..{len(items)}")
            continue
        data.sessions.append(Session(sid, [t for _, t in items]))
    return data


# ---------------------------------------------------------------------------------------------------


def load(path, out_dir: Path, *, split: str | None = None, captions=None, config=None, progress: bool = True,
         mask_convention: str = "auto") -> Dataset:
    """Read ``path`` in whichever supported layout it is: a folder with ``edit_sessions.json`` (or
    ``test/edit_sessions.json``), parquet file(s) or a folder of them, or a ``.jsonl`` manifest.
    out_dir: the evaluation's folder (parquet is converted into ``out_dir/dataset``). mask_convention:
    how the mask files mark their region (``lime_fast.inputs.load_mask``; a manifest row's own wins)."""
    from ..inputs import check_mask_convention

    check_mask_convention(mask_convention)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data: no such file or folder: {p}")
    if p.is_dir() and find_root(p) is not None:
        return _with_convention(read_magicbrush(p, captions), mask_convention)
    if p.suffix == ".parquet" or (p.is_dir() and parquet_files(p)):
        return _with_convention(read_parquet(p, Path(out_dir) / "dataset", split, captions, progress), mask_convention)
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        return read_eval_manifest(p, config, mask_convention)
    raise DatasetError(
        f"{p}: not a supported layout. Give MagicBrush's test folder (with {SESSIONS} and images/), "
        "MagicBrush parquet file(s) from Hugging Face (osunlp/MagicBrush), or a JSONL manifest whose rows "
        "have id, image, instruction and target")


def _with_convention(data: Dataset, convention: str) -> Dataset:
    """``data`` with every turn's masks read by ``convention``."""
    for s in data.sessions:
        for t in s.turns:
            t.mask_convention = convention
    return data
