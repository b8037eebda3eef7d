"""The evaluation runner: edit every turn of a dataset with each method, then score the outputs.

Methods (``parse_method``; each may carry ``EditConfig`` overrides, ``"ip2p:text_guidance=7.5"``):

* ``ip2p``: the base model, plain InstructPix2Pix: a lime_fast edit with an empty RoI, which is
  exactly diffusers' InstructPix2Pix pipeline (tests/test_engine.py,
  ``test_parity_with_diffusers_when_mask_is_empty``);
* ``lime``: lime_fast with its automatic RoI;
* ``lime-mask``: lime_fast with the dataset's mask of each turn as the RoI.

Settings (MagicBrush's, see ``lime_fast.evaluate.metrics``): ``single``: every turn edited from its
ground-truth input, all turns scored; ``multi``: each turn edited from the previous turn's *output*
(``lime_fast.edit_turns``'s chain, through saved PNGs), the final turn scored against the final
target. Turn 1 is the same edit in both and is done once. Outputs are named as MagicBrush's
evaluation expects them: ``{id}_1``, ``{id}_inde_{t}`` (single), ``{id}_iter_{t}`` (multi).

**Store and resume.** Each method's outputs go to ``DIR/{method}/`` in the batch runner's store
(``lime_fast.batch.store``): ``images/{out_id}.png`` and ``roi/{out_id}.png`` written by
``edit_group`` (temporary file + rename), one whole-line record per edit appended to
``results.jsonl``, the whole evaluation under ``DIR/.lock``. Turns run in waves (all turns 1, then
all turns 2, ...) so a multi-turn edit finds its input on disk. A killed evaluation, re-run with the
same command, skips every edit already recorded (failed ones too, unless ``retry_failed``) and
redoes only the rest; an edit killed before its record is simply done again. An edit is reused only
when its record's resume key (``lime_fast.batch.keys``) equals the edit's key now: the bytes of its
input picture (multi-turn: the key of the edit it continues), its instruction, the bytes of the
dataset's mask file (``lime-mask``), the method and its whole config, and the model's pin. Changed data
under the same session ids (other pictures, instructions or masks) is therefore edited again (the
report counts those edits as redone), never scored from old edits; a record without a key (written
before keys existed) is redone. An unreadable picture makes its edit or its pair a failed row, with the
reason; the evaluation goes on. Method settings are checked against the config before anything is
written in DIR. ``DIR/{method}/method.json`` pins the model (a local folder, or an engine loaded from
one, also by a digest of its weight files) and the config a method's outputs were made with: re-running
into the same folder with another model, new weights in the same folder, or other settings is refused
rather than mixing outputs. Metrics are recomputed on every run (they take seconds next to the edits).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image

from ..batch.keys import WEIGHT_SUFFIXES, config_dict, model_identity, model_pin, resume_key, weights_digest  # noqa: F401
from ..config import DEFAULT_MODEL, EditConfig
from ..errors import BatchError
from .datasets import Dataset, Session, Turn, read_mask

SETTINGS = ("single", "multi")
METHODS = {
    # name: (label in reports, where its RoI comes from)
    "ip2p": ("InstructPix2Pix", "empty"),
    "lime": ("lime_fast, automatic RoI", "auto"),
    "lime-mask": ("lime_fast, dataset masks as RoI", "dataset"),
}
METRICS = ("l1", "l2", "clip_i", "dino", "clip_t", "clip_t_oracle", "l1_in", "l1_out", "roi_iou")
_EMPTY_MASK = "empty.png"


class EvalError(BatchError):
    """The evaluation cannot start (bad method, settings that clash with DIR's earlier outputs, ...)."""


@dataclass(frozen=True)
class Method:
    """One way of editing. name: a key of ``METHODS``; overrides: ``EditConfig`` fields for this method
    alone (applied last); spec: as written (``"ip2p:text_guidance=7.5"``)."""

    name: str
    overrides: tuple = ()
    spec: str = ""

    @property
    def roi(self) -> str:
        return METHODS[self.name][1]

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.overrides)
        return METHODS[self.name][0] + (f" ({extra})" if extra else "")

    @property
    def folder(self) -> str:
        """The method's folder under DIR: the spec with ':' -> '@' and ',' -> '+'."""
        return (self.spec or self.name).replace(":", "@").replace(",", "+").replace(" ", "")


def _value(text: str):
    try:
        v = json.loads(text)
    except ValueError:
        return text
    return tuple(v) if isinstance(v, list) else v


def parse_method(spec: str) -> Method:
    """``NAME[:field=value,field=value]`` -> Method (values are JSON: 7.5, 50, [0,1], "native")."""
    from ..batch.manifest import check_id

    name, _, rest = spec.strip().partition(":")
    if name not in METHODS:
        raise EvalError(f"unknown method {name!r}: one of {', '.join(METHODS)} (optionally NAME:field=value,...)")
    overrides = {}
    for item in filter(None, (s.strip() for s in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", rest))):
        key, eq, val = item.partition("=")
        if not eq:
            raise EvalError(f"method {spec!r}: '{item}' is not field=value")
        overrides[key.strip()] = _value(val.strip())
    try:
        EditConfig().replace(**overrides)
    except (TypeError, ValueError) as e:
        raise EvalError(f"method {spec!r}: {e}") from None
    m = Method(name, tuple(sorted(overrides.items())), spec.strip())
    try:
        check_id(m.folder)
    except (TypeError, ValueError) as e:
        raise EvalError(f"method {spec!r} cannot name a folder: {e}") from None
    return m


def out_id(session: str, turn: int, setting: str) -> str:
    """MagicBrush's output names: {id}_1 for turn 1, {id}_inde_{t} (single), {id}_iter_{t} (multi)."""
    return f"{session}_1" if turn == 1 else f"{session}_{'inde' if setting == 'single' else 'iter'}_{turn}"


def chained(session: Session) -> bool:
    """Whether the session's turns form a chain the multi-turn setting can follow."""
    return not any(t.meta.get("broken_chain") for t in session.turns)


@dataclass
class Job:
    """One edit to make: method, output id, the turn, and where its input comes from (a dataset file,
    or ``after``: the output id of the same method's previous turn, multi-turn)."""

    method: Method
    id: str
    session: Session
    turn: Turn
    input: Path | None = None
    after: str | None = None


@dataclass
class Evaluation:
    """What ``evaluate`` did and found.

    samples: one dict per (method, setting, scored pair): ids, instruction, status, error and every
    metric (None where not computed). summary: {setting: {method spec: {metric: mean, "n": scored
    pairs, "failed": pairs without an output, "n_clip_t": pairs with a caption}}}. done / skipped /
    failed: edits made, found already recorded, failed in this run. models: the CLIP and DINO folders
    used (None: that metric not computed).
    """

    out_dir: Path
    dataset: Dataset
    methods: list[Method]
    settings: tuple[str, ...]
    model: str
    config: dict
    samples: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    models: dict = field(default_factory=dict)
    redone: int = 0  # of the edits made, those whose earlier edit no longer matched its data (key changed)

    def method(self, spec: str) -> Method:
        return next(m for m in self.methods if m.spec == spec)


# ---------------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------------


def plan(data: Dataset, methods: list[Method], settings) -> list[list[Job]]:
    """The edits, in waves by turn index (wave t holds every method's turn-t edits)."""
    waves: dict[int, list[Job]] = {}
    for m in methods:
        for s in data.sessions:
            seen = set()
            for t in s.turns:
                jobs = []
                if "single" in settings or t.index == 1:
                    jobs.append(Job(m, out_id(s.id, t.index, "single"), s, t, input=t.input))
                if "multi" in settings and t.index > 1 and chained(s):
                    jobs.append(Job(m, out_id(s.id, t.index, "multi"), s, t, after=out_id(s.id, t.index - 1, "multi")))
                for j in jobs:
                    if j.id not in seen:
                        seen.add(j.id)
                        waves.setdefault(t.index, []).append(j)
    return [waves[k] for k in sorted(waves)]


def base_config(model, config) -> EditConfig:
    """The evaluation's config: ``config`` (EditConfig or dict) on top of the model's own defaults."""
    from ..models import shipped

    if hasattr(model, "default_config"):
        base = model.default_config
    else:
        info = shipped(model)
        base = EditConfig(**(info.config if info else {}))
    if isinstance(config, EditConfig):
        return config
    return base.replace(**(config or {}))


def check_methods(cfg: EditConfig, methods: list[Method], data: Dataset | None = None) -> None:
    """EvalError, before anything is written, when a method's overrides (on ``cfg``, and on each turn's own
    fields in ``data``) make an invalid config, e.g. ``lime:capture_step=25`` on a 20-step model."""
    for m in methods:
        try:
            cfg.replace(**dict(m.overrides))
        except (TypeError, ValueError) as e:
            raise EvalError(f"method {m.spec!r}: {e} (with the model's config: steps={cfg.steps}); change the "
                            "method's fields or the --steps") from None
        for s in data.sessions if data is not None else ():
            for t in s.turns:
                try:
                    cfg.replace(**{**t.overrides, **dict(m.overrides)})
                except (TypeError, ValueError) as e:
                    raise EvalError(f"method {m.spec!r} on session {s.id}, turn {t.index}: {e}; change the "
                                    "method's or that row's fields") from None


def _pin(method_dir: Path, pin: tuple[str, str | None], cfg: EditConfig, method: Method) -> None:
    """Write or check DIR/{method}/method.json: the model's ``model_pin`` (its identity and, where it is a
    local folder, its weights' digest) and the config its outputs were made with."""
    want = {"method": method.spec, "model": pin[0], "weights": pin[1],
            "config": config_dict(cfg.replace(**dict(method.overrides)))}
    path = method_dir / "method.json"
    if path.is_file():
        have = json.loads(path.read_text())
        same_model = have.get("model") == want["model"] or "<" in have.get("model", "") + want["model"]
        if same_model and have.get("weights") and want["weights"]:  # pins written before digests had none
            same_model = have["weights"] == want["weights"]
        if not same_model or have.get("config") != want["config"]:
            diff = [k for k in want["config"] if have.get("config", {}).get(k) != want["config"][k]]
            what = "model (or weights)" if not same_model else "config (" + ", ".join(diff) + ")"
            raise EvalError(f"{method_dir} holds outputs made with another {what}: use another --out, or delete "
                            f"{method_dir} to redo this method")
        return
    method_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(want, indent=1))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------------


class _Masks:
    """Dataset masks normalized once to lime_fast's convention (L, white = edit) in DIR/masks/."""

    def __init__(self, out: Path):
        self.dir = out / "masks"
        self.cache: dict[tuple[Path, str], np.ndarray] = {}
        self.written: set[Path] = set()

    def empty(self) -> Path:
        from ..batch.store import atomic_save

        p = self.dir / _EMPTY_MASK
        if not p.is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_save(PIL.Image.new("L", (8, 8), 0), p)
        return p

    def array(self, turn: Turn) -> np.ndarray | None:
        if turn.mask is None:
            return None
        key = (turn.mask, turn.mask_convention)
        if key not in self.cache:
            self.cache[key] = read_mask(turn.mask, turn.mask_convention)
        return self.cache[key]

    def file(self, session: Session, turn: Turn) -> Path | None:
        from ..batch.store import atomic_save
        from ..viz import mask_image

        if turn.mask is None:
            return None
        named = "" if turn.mask_convention == "auto" else f"-{turn.mask_convention}"  # another reading, another file
        p = self.dir / f"{session.id}-mask{turn.index}{named}.png"
        if p not in self.written:  # written once per run: the dataset's mask may have changed since the last
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_save(mask_image(self.array(turn)), p)
            self.written.add(p)
        return p


# ---------------------------------------------------------------------------------------------------
# editing
# ---------------------------------------------------------------------------------------------------


def _edit(data: Dataset, out: Path, methods: list[Method], settings, *, model, cfg: EditConfig, batch_size: int,
          retry_failed: bool, device, torch_dtype, threads, progress: bool, ev: Evaluation) -> None:
    import torch
    from tqdm.auto import tqdm

    from ..batch.runners import edit_group, plan_batches
    from ..batch.store import RESULTS, ResultsWriter, image_path
    from ..errors import LimeWarning

    masks = _Masks(out)
    for tmp in masks.dir.glob(".*.tmp") if masks.dir.is_dir() else ():  # left by a killed run (we hold the lock)
        tmp.unlink(missing_ok=True)
    waves = plan(data, methods, settings)
    pin = model_pin(model)  # the digest reads the weight files: once, not once per method
    state = _method_folders(out, methods, pin, cfg)
    keys = job_keys(waves, pin, cfg)

    def recorded(j: Job) -> bool:
        prev = state[j.method.spec].get(j.id)
        if prev is None:
            return False
        if prev["status"] == "done":
            key = keys[(j.method.spec, j.id)]
            return key is not None and prev.get("key") == key and image_path(out / j.method.folder, j.id).is_file()
        return not retry_failed

    todo_total = sum(1 for w in waves for j in w if not recorded(j))
    ev.skipped = sum(len(w) for w in waves) - todo_total
    ev.redone = _drop_changed([j for w in waves for j in w if not recorded(j)], state, out)
    if todo_total == 0:
        return
    from .. import get_engine

    engine = get_engine(model, device=device, torch_dtype=torch_dtype)
    writers = {m.spec: ResultsWriter(out / m.folder / RESULTS) for m in methods}
    bar = tqdm(total=todo_total, desc="eval edits", unit="edit", disable=not progress, dynamic_ncols=True)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        for wave in waves:
            for m in methods:
                d = out / m.folder
                rows, fail = _wave_rows([j for j in wave if j.method == m and not recorded(j)], m, d, cfg, masks)
                with warnings.catch_warnings():
                    if m.roi == "empty":  # by design: the empty RoI is plain InstructPix2Pix
                        warnings.filterwarnings("ignore", message="the mask is empty", category=LimeWarning)
                    for group in plan_batches(rows, batch_size, engine.multiple):
                        bar.set_postfix_str(f"{m.spec}, turn {group[0].line}", refresh=False)
                        for rec in edit_group(engine, group, d, save_roi=True):
                            _account(rec, writers[m.spec], state[m.spec], ev, bar, keys[(m.spec, rec["id"])])
                for rec in fail:
                    _account(rec, writers[m.spec], state[m.spec], ev, bar, keys[(m.spec, rec["id"])])
    finally:
        torch.set_num_threads(old_threads)
        bar.close()
        for w in writers.values():
            w.close()


def job_keys(waves: list[list[Job]], pin, cfg: EditConfig) -> dict[tuple[str, str], str | None]:
    """Each job's resume key by (method spec, output id): ``keys.resume_key`` of its input picture's bytes
    (multi-turn: the key of the edit it continues, so a redone turn redoes the rest of its chain), its
    instruction, the dataset mask's bytes (``lime-mask``), its whole config, the method and the model's
    pin. None where a file cannot be read (the job runs and fails with the reason)."""
    keys: dict[tuple[str, str], str | None] = {}
    for wave in waves:  # a multi-turn job's previous turn is in an earlier wave
        for j in wave:
            m, t = j.method, j.turn
            after = keys.get((m.spec, j.after)) if j.after is not None else None
            try:
                if j.after is not None and after is None:
                    raise OSError("the previous turn has no key")
                keys[(m.spec, j.id)] = resume_key(
                    pin=pin, instruction=t.instruction, config=cfg.replace(**{**t.overrides, **dict(m.overrides)}),
                    image=j.input if j.after is None else None, after=after,
                    mask=t.mask if m.roi == "dataset" else None, mask_convention=t.mask_convention,
                    extra={"method": m.name, "roi": m.roi})
            except (OSError, TypeError, ValueError):
                keys[(m.spec, j.id)] = None
    return keys


def _drop_changed(jobs: list[Job], state: dict, out: Path) -> int:
    """Delete the outputs of the jobs about to be redone whose done record no longer matches (see
    ``job_keys``), so that a redo that fails leaves no stale picture for a later turn to continue from;
    returns how many."""
    from ..batch.store import image_path, roi_path

    n = 0
    for j in jobs:
        prev = state[j.method.spec].get(j.id)
        d = out / j.method.folder
        if prev is not None and prev["status"] == "done" and image_path(d, j.id).is_file():
            for p in (image_path(d, j.id), roi_path(d, j.id)):
                p.unlink(missing_ok=True)
            n += 1
    return n


def _method_folders(out: Path, methods: list[Method], pin, cfg: EditConfig) -> dict:
    """Each method's folder made ready (pinned to ``model_pin``'s pin and this config, temporaries of a
    killed run removed); returns {method spec: its recorded results by id}."""
    from ..batch.store import RESULTS, _read_results, _remove_temporaries

    state = {}
    for m in methods:
        d = out / m.folder
        _pin(d, pin, cfg, m)
        for sub in ("images", "roi"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        _remove_temporaries(d)
        state[m.spec] = _read_results(d / RESULTS)[0]
    return state


def _wave_rows(jobs: list, m: Method, d: Path, cfg: EditConfig, masks) -> tuple[list, list]:
    """One wave's jobs of method ``m`` as batch rows to edit, and the failure records of those that cannot
    run (a multi-turn chain whose previous turn has no output; a dataset-mask method without a mask)."""
    from ..batch.manifest import Row
    from ..batch.store import _failed, image_path

    rows, fail = [], []
    for j in jobs:
        mcfg = cfg.replace(**{**j.turn.overrides, **dict(m.overrides)})
        src = j.input if j.after is None else image_path(d, j.after)
        row = Row(j.id, j.turn.index, Path(src), j.turn.instruction, None, mcfg)
        if j.after is not None and not src.is_file():
            fail.append(_failed(row, f"turn {j.turn.index - 1} has no output ({j.after} failed), so its "
                                     "multi-turn chain stops here"))
            continue
        try:  # an unreadable picture fails its own edit only (PIL's errors name the file)
            row.mask = {"empty": masks.empty, "auto": lambda: None,
                        "dataset": lambda: masks.file(j.session, j.turn)}[m.roi]()
            with PIL.Image.open(src) as im:
                row.size = im.size
        except (OSError, ValueError) as e:
            fail.append(_failed(row, f"cannot read a picture of this turn: {e}"))
            continue
        if m.roi == "dataset" and row.mask is None:
            fail.append(_failed(row, f"the dataset has no mask for turn {j.turn.index}: {m.spec} needs one"))
        else:
            rows.append(row)
    return rows, fail


def _account(rec: dict, writer, state: dict, ev: Evaluation, bar, key: str | None) -> None:
    """Record one finished edit (with its resume key), count it, show a failure."""
    rec["key"] = key
    writer.append(rec)
    state[rec["id"]] = rec
    if rec["status"] == "done":
        ev.done += 1
    else:
        ev.failed += 1
        bar.write(f"failed: {rec['id']}: {rec['error']}")
    bar.update(1)


# ---------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------


def _pairs(data: Dataset, settings) -> list[tuple[str, Session, list[Turn], str]]:
    """(setting, session, the turns the pair covers, output id) for every scored pair."""
    out = []
    for setting in settings:
        for s in data.sessions:
            if setting == "single":
                out += [(setting, s, [t], out_id(s.id, t.index, "single")) for t in s.turns]
            elif chained(s):
                out.append((setting, s, s.turns, out_id(s.id, len(s.turns), "multi")))
    return out


def _score(ev: Evaluation, clip, dino, progress: bool, chunk: int = 16) -> None:
    """Every (method, scored turn) pair's metrics into ``ev.samples``, and their summary into ``ev.summary``;
    pictures are read ``chunk`` pairs at a time and the targets' and captions' embeddings are computed once."""
    from tqdm.auto import tqdm

    out, masks = ev.out_dir, _Masks(ev.out_dir)
    samples = _samples(ev)
    known: dict[tuple, np.ndarray] = {}  # embeddings of targets and captions, shared by every method
    done = [x for x in samples if x["status"] == "done"]
    bar = tqdm(total=len(done), desc="eval metrics", unit="pair", disable=not progress or not done, dynamic_ncols=True)
    for i in range(0, len(done), chunk):
        part, gens, tgts = _read_pairs(done[i : i + chunk], out, masks, ev)
        for x in part:
            _pixel_scores(x, gens[_key(x)], tgts[x["target"]], masks, ev)
        for kind, model in (("clip", clip), ("dino", dino)):
            if model is not None:
                _embedding_scores(part, kind, model, gens, tgts, known)
        bar.update(min(chunk, len(done) - i))
    bar.close()
    for x in samples:
        x.pop("_turns"), x.pop("_session")
    ev.samples = samples
    ev.summary = summarize(samples, ev.methods, ev.settings)


def _read_pairs(part: list[dict], out: Path, masks, ev: Evaluation) -> tuple[list[dict], dict, dict]:
    """The pictures of a chunk of pairs (generated, target) and their masks read; a pair with a picture
    that cannot be read becomes a failed row with the reason, and is left out of the chunk."""
    from . import metrics as M

    ok, gens, tgts = [], {}, {}
    for x in part:
        try:
            gens[_key(x)] = M.load_rgb(out / x["image"])
            if x["target"] not in tgts:
                tgts[x["target"]] = M.load_rgb(x["target"])
            for t in x["_turns"]:
                masks.array(t)
        except (OSError, ValueError) as e:
            x.update(status="failed", error=f"cannot read a picture of this pair: {e}", image=None)
            continue
        ok.append(x)
    return ok, gens, tgts


def _key(x: dict) -> str:
    return x["method"] + "|" + x["id"]


def _samples(ev: Evaluation) -> list[dict]:
    """One record per (method, scored pair): its identity, status, paths, and empty metric fields."""
    from ..batch.store import RESULTS, _read_results, image_path

    out = ev.out_dir
    results = {m.spec: _read_results(out / m.folder / RESULTS)[0] for m in ev.methods}
    samples = []
    for m in ev.methods:
        for setting, s, turns, oid in _pairs(ev.dataset, ev.settings):
            last = turns[-1]
            rec = results[m.spec].get(oid)
            img = image_path(out / m.folder, oid)
            ok = rec is not None and rec["status"] == "done" and img.is_file()
            samples.append({
                "method": m.spec, "setting": setting, "session": s.id, "turn": last.index, "id": oid,
                "instruction": last.instruction, "kind": last.meta.get("kind"),
                "status": "done" if ok else "failed",
                "error": None if ok else (rec or {}).get("error") or "not edited",
                "image": img.relative_to(out).as_posix() if ok else None,
                "target": str(last.target), "input": str(turns[0].input),
                **dict.fromkeys(METRICS), "mask_area": None, "roi_area": None,
                "_turns": turns, "_session": s,
            })
    return samples


def _pixel_scores(x: dict, gen, tgt, masks, ev: Evaluation) -> None:
    """L1/L2 (inside and outside the edited region, when the dataset has masks), the RoI's area and, for the
    automatic RoI, its IoU with the last turn's mask, into ``x``."""
    from . import metrics as M

    arrs = [masks.array(t) for t in x["_turns"]]
    region = None
    if all(a is not None for a in arrs):  # multi-turn: every pixel some turn was meant to change
        region = np.logical_or.reduce([M.resize_mask(a, tgt.size) for a in arrs])
        x["mask_area"] = float(region.mean())
    x.update(M.pixel_metrics(gen, tgt, region))
    roi_file = ev.out_dir / ev.method(x["method"]).folder / "roi" / f"{x['id']}.png"
    if roi_file.is_file():
        roi = read_mask(roi_file)
        x["roi_area"] = float(roi.mean())
        if arrs[-1] is not None and ev.method(x["method"]).roi == "auto":
            x["roi_iou"] = M.iou(M.resize_mask(roi, tgt.size), M.resize_mask(arrs[-1], tgt.size))


def _embedding_scores(part: list[dict], kind: str, model, gens: dict, tgts: dict, known: dict) -> None:
    """CLIP-I or DINO (and, for CLIP, CLIP-T against the caption) of a chunk of pairs, into each record;
    ``known`` caches the targets' and captions' embeddings across chunks and methods."""
    from . import metrics as M

    new = [p for p in tgts if (kind, p) not in known]
    if new:
        known.update(zip([(kind, p) for p in new], model.images([tgts[p] for p in new])))
    gen_emb = dict(zip([_key(x) for x in part], model.images([gens[_key(x)] for x in part])))
    for x in part:
        x["clip_i" if kind == "clip" else "dino"] = M.cosine(gen_emb[_key(x)], known[(kind, x["target"])])
    if kind != "clip":
        return
    caps = sorted({x["_turns"][-1].caption for x in part} - {None} - {c for k, c in known if k == "text"})
    if caps:
        known.update(zip([("text", c) for c in caps], model.texts(caps)))
    for x in part:
        cap = x["_turns"][-1].caption
        if cap is not None:
            x["clip_t"] = M.cosine(gen_emb[_key(x)], known[("text", cap)])
            x["clip_t_oracle"] = M.cosine(known[("clip", x["target"])], known[("text", cap)])


def summarize(samples: list[dict], methods: list[Method], settings) -> dict:
    """{setting: {method spec: {metric: mean over the pairs that have it, n, failed, n_clip_t}}}."""
    out: dict = {}
    for setting in settings:
        out[setting] = {}
        for m in methods:
            xs = [x for x in samples if x["setting"] == setting and x["method"] == m.spec]
            ok = [x for x in xs if x["status"] == "done"]
            row = {"n": len(ok), "failed": len(xs) - len(ok),
                   "n_clip_t": sum(x["clip_t"] is not None for x in ok)}
            for k in METRICS:
                vals = [x[k] for x in ok if x[k] is not None and not (isinstance(x[k], float) and math.isnan(x[k]))]
                row[k] = float(np.mean(vals)) if vals else None
            out[setting][m.spec] = row
    return out


# ---------------------------------------------------------------------------------------------------


def evaluate(
    data: Dataset,
    out_dir,
    *,
    model=DEFAULT_MODEL,
    methods=("ip2p", "lime", "lime-mask"),
    settings=SETTINGS,
    config: EditConfig | dict | None = None,
    batch_size: int = 1,
    retry_failed: bool = False,
    clip=None,
    dino=None,
    device=None,
    torch_dtype=None,
    threads: int | None = None,
    progress: bool = True,
) -> Evaluation:
    """Edit ``data`` with every method into ``out_dir`` (resumable, see the module docstring) and score it.

    Args:
        data: a ``Dataset`` (``lime_fast.evaluate.load``).
        model: hub id, local folder, shipped model name, or a ``LimeEngine``.
        methods: specs (``"ip2p"``, ``"lime"``, ``"lime-mask"``, each optionally ``:field=value,...``).
        settings: ``"single"`` and/or ``"multi"``.
        config: ``EditConfig`` (or dict of fields over the model's defaults) for every edit; a manifest
            row's own fields and then a method's overrides apply on top.
        batch_size: edits per UNet batch (same turn, method, working size and config). 1 makes every
            output independent of the others; larger batches are for throughput (the last bit of a
            pixel may change, as in ``lime_fast.batch``).
        clip, dino: ``metrics.Clip`` / ``metrics.Dino`` (or local folder paths) for CLIP-I/CLIP-T and
            DINO; None: those metrics are not computed.
        device, torch_dtype, threads: as ``lime_fast.batch.run``.

    Returns an ``Evaluation``. Raises ``EvalError`` before anything is written when it cannot start.
    """
    from ..batch.store import _locked
    from . import metrics as M

    t0 = time.perf_counter()
    specs = [parse_method(m) if isinstance(m, str) else m for m in methods]
    if len({m.folder for m in specs}) != len(specs):
        raise EvalError(f"methods repeat: {', '.join(m.spec for m in specs)}")
    settings = tuple(settings)
    if not settings or set(settings) - set(SETTINGS):
        raise EvalError(f"settings must be some of {', '.join(SETTINGS)}, got {', '.join(settings) or 'none'}")
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    if not data.sessions:
        raise EvalError("the data holds no usable session" + (": " + "; ".join(data.problems[:5]) if data.problems else ""))
    cfg = base_config(model, config)
    check_methods(cfg, specs, data)  # before anything is written in DIR
    if isinstance(model, (str, os.PathLike)):
        from ..models import local_checkpoint, model_location

        local_checkpoint(model_location(model))  # a mistyped folder fails here, before anything is written
    dev = device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    clip = M.Clip(clip, dev) if isinstance(clip, (str, os.PathLike)) else clip
    dino = M.Dino(dino, dev) if isinstance(dino, (str, os.PathLike)) else dino
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    ev = Evaluation(out, data, specs, settings, model_identity(model), config_dict(cfg),
                    models={"clip": getattr(clip, "folder", None), "dino": getattr(dino, "folder", None)})
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_locked(out))
        except BatchError as e:
            raise EvalError(str(e).replace("batch job", "job")) from None
        _edit(data, out, specs, settings, model=model, cfg=cfg, batch_size=batch_size, retry_failed=retry_failed,
              device=device, torch_dtype=torch_dtype, threads=threads, progress=progress, ev=ev)
        _score(ev, clip, dino, progress)
    ev.seconds = time.perf_counter() - t0
    return ev


__all__ = ["Evaluation", "EvalError", "METHODS", "METRICS", "Method", "SETTINGS", "check_methods", "evaluate",
           "job_keys", "out_id", "parse_method", "plan", "summarize"]
