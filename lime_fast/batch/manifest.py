"""Batch manifests: JSONL rows checked into ``Row`` objects (or ``Problem`` records), before any model loads.

See the ``lime_fast.batch`` docstring for the row format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import EditConfig
from ..errors import BatchError

ROW_KEYS = ("id", "image", "instruction", "mask", "mask_convention")
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(EditConfig))
_MAX_ID_BYTES = 200  # + ".png" and the temporary-file decoration stays under the usual 255-byte name limit
_BAD_ID_CHARS = re.compile(r'[\x00-\x1f\x7f/\\<>:"|?*]')


class ManifestError(BatchError):
    """``strict`` and the manifest has bad rows; ``problems`` lists them (nothing was run or written)."""

    def __init__(self, problems: list[Problem], manifest):
        self.problems = problems
        lines = "\n".join(str(p) for p in problems[:50])
        more = f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{manifest}: {len(problems)} bad row(s), nothing was run (strict):\n{lines}{more}")


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
    overrides are the row's own config fields; size is the input's (width, height) once checked;
    mask_convention: how the mask file marks its region (``lime_fast.inputs.load_mask``)."""

    id: str
    line: int
    image: Path
    instruction: str
    mask: Path | None
    config: EditConfig
    overrides: dict = field(default_factory=dict)
    size: tuple[int, int] | None = None
    mask_convention: str = "auto"

    def to_dict(self) -> dict:
        """JSON-safe form (what Ray ships to the workers)."""
        return {
            "id": self.id, "line": self.line, "image": str(self.image), "instruction": self.instruction,
            "mask": None if self.mask is None else str(self.mask), "config": dataclasses.asdict(self.config),
            "overrides": self.overrides, "size": list(self.size) if self.size else None,
            "mask_convention": self.mask_convention,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        return cls(
            id=d["id"], line=d["line"], image=Path(d["image"]), instruction=d["instruction"],
            mask=None if d["mask"] is None else Path(d["mask"]), config=EditConfig(**_tuples(d["config"])),
            overrides=d["overrides"], size=tuple(d["size"]) if d["size"] else None,
            mask_convention=d.get("mask_convention", "auto"),
        )



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


def read_manifest(manifest: str | os.PathLike, config: EditConfig | None = None,
                  mask_convention: str = "auto") -> tuple[list[Row], list[Problem]]:
    """Parse and check the fields of every row (no image is opened): (good rows, problems), in line order.

    config: the job's config, on which each row's overrides are applied. mask_convention: the job's,
    for rows without their own ``mask_convention``. A duplicate id is a problem of the later line (the
    first line with an id owns it; ids equal but for letter case count as equal).
    """
    from ..inputs import check_instruction, check_mask_convention, check_roi_words

    check_mask_convention(mask_convention)

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
                if "instruction" not in d:
                    raise ValueError("no 'instruction'")
                instruction = check_instruction(d["instruction"])
                image = _path_field(d, "image", base)
                mask = _path_field(d, "mask", base)
                convention = check_mask_convention(d.get("mask_convention", mask_convention))
                overrides = {k: v for k, v in d.items() if k not in ROW_KEYS}
                try:  # EditConfig itself says which fields it has and which values it takes
                    cfg = base_cfg.replace(**_tuples(overrides)) if overrides else base_cfg
                except TypeError as e:
                    if "unknown EditConfig field" not in str(e):
                        raise ValueError(f"bad config field: {e}") from None
                    unknown = sorted(set(overrides) - set(CONFIG_FIELDS))
                    raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}: a row has "
                                     f"{', '.join(ROW_KEYS)} and EditConfig fields") from None
                except ValueError as e:
                    raise ValueError(f"bad config field: {e}") from None
                if cfg.roi_words:
                    check_roi_words(instruction, cfg.roi_words)
                rows.append(Row(rid, n, image, instruction, mask, cfg, overrides, mask_convention=convention))
            except (TypeError, ValueError) as e:
                problems.append(Problem(n, rid, str(e)))
    return rows, problems


def check_files(row: Row, strict: bool = False) -> None:
    """Open the row's image (and mask) as the engine will; sets ``row.size``. Raises naming the file;
    with ``strict`` an input the engine would adjust with an ``InputWarning`` (a mask of another aspect
    ratio) raises that warning as an error."""
    import warnings

    from ..errors import InputWarning
    from ..inputs import check_mask_shape, load_image, load_mask

    img = load_image(row.image)
    row.size = img.size
    if row.mask is not None:
        mask = load_mask(row.mask, convention=row.mask_convention)
        with warnings.catch_warnings():
            if strict:
                warnings.simplefilter("error", InputWarning)
            check_mask_shape(mask, img.size)
