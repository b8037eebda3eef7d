"""``lime-fast`` command line: ``edit`` one image, ``batch`` a JSONL manifest, or run the offline ``demo``.

    lime-fast edit photo.jpg "make her outfit black" -o edited.png --save-roi roi/
    lime-fast edit photo.jpg "make her outfit black" -o edited.png --save-session s/
    lime-fast edit photo.jpg "make her outfit black" -o fixed.png --session s/ --add 3,5 --drop 2
    lime-fast batch edits.jsonl --out results/ [--ray --workers 4]
    lime-fast demo --out lime_fast_demo
    lime-fast eval MagicBrush/test --out eval/ --clip CLIP_DIR --dino DINO_DIR   (lime_fast.evaluate)

Every ``EditConfig`` field is a flag (``--top-k 50``, ``--reg-steps 0 20``, ``--roi-words collar``),
generated from the dataclass and its docstring; a flag not given keeps the model's own default.
Arguments, input files and output locations are all checked before torch or any model is imported,
and nothing is written until the edit is done.
"""

from __future__ import annotations

from .errors import LimeError
import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

from .config import DEFAULT_MODEL, MASK_CONVENTIONS, EditConfig, field_docs

PICTURES = ("roi", "overlay", "segments", "segment_ids", "heatmap", "panel")
_LOCALIZED = ("segments", "segment_ids", "heatmap")  # pictures of the localization: none with a user mask


class UsageError(LimeError):
    pass


# --- EditConfig as flags -------------------------------------------------------------------------
# argparse options per annotation of an EditConfig field (the annotations are strings: PEP 563).
_KINDS = {
    "int": dict(type=int, metavar="N"),
    "int | None": dict(type=int, metavar="N"),
    "float": dict(type=float, metavar="X"),
    "str": dict(),
    "tuple[int, int] | None": dict(type=int, nargs=2, metavar=("FIRST", "LAST")),
    "tuple[int, ...]": dict(type=int, nargs="*", metavar="LEVEL"),
    "tuple[str, ...] | None": dict(nargs="+", metavar="WORD"),
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One flag per ``EditConfig`` field (``--field-name``), help from its docstring; unset flags are absent
    from the parsed namespace, so the model's defaults apply."""
    group = parser.add_argument_group("edit settings (EditConfig fields; default: the model's own)")
    docs = field_docs()
    for f in dataclasses.fields(EditConfig):
        kind = dict(_KINDS[f.type])
        if f.name == "segment_backend":
            from .config import SEGMENT_BACKENDS

            kind["choices"] = SEGMENT_BACKENDS
        group.add_argument("--" + f.name.replace("_", "-"), dest=f"config.{f.name}", default=argparse.SUPPRESS,
                           help=docs[f.name].replace("%", "%%"), **kind)


def config_overrides(args: argparse.Namespace) -> dict:
    """The ``EditConfig`` fields given on the command line (lists as tuples)."""
    return {k.removeprefix("config."): tuple(v) if isinstance(v, list) else v
            for k, v in vars(args).items() if k.startswith("config.")}


def add_mask_convention_arg(parser: argparse.ArgumentParser, default: str | None = "auto", what: str = "") -> None:
    """``--mask-convention``: how mask files mark their region (``lime_fast.inputs.load_mask``'s rule)."""
    parser.add_argument(
        "--mask-convention", choices=MASK_CONVENTIONS, default=default,
        help="how a mask file marks the region to edit: white (grayscale >= 128), transparent (alpha < 128: DALL-E 2, "
             "MagicBrush), opaque (alpha >= 128: paint on a transparent canvas) or auto (no transparency: white; "
             f"else transparent, unless it is paint of one colour on a blank canvas; warns when unsure){what}")


def model_config(model, overrides: dict) -> EditConfig:
    """The model's default ``EditConfig`` (a shipped model's own, a family's levels, else the spec's) with
    ``overrides`` applied and validated; no model is loaded."""
    from .models import default_config

    return default_config(model).replace(**overrides)


# --- the parser ----------------------------------------------------------------------------------


_MODEL_HELP = (f"hub id, local diffusers folder, or a shipped model's name (shapes-ip2p: offline, 64 x 64 "
               f"pictures); default {DEFAULT_MODEL}")


def _parser() -> argparse.ArgumentParser:
    from .evaluate.cli import add_parser as add_eval_parser
    from .serve import cli as serve_cli

    p = argparse.ArgumentParser(prog="lime-fast", description="Localized image editing (LIME) for InstructPix2Pix models.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_edit_parser(sub)
    _add_batch_parser(sub)
    add_eval_parser(sub)
    _add_demo_parser(sub)
    serve_cli.add_parser(sub)
    return p


def _add_edit_parser(sub) -> None:
    e = sub.add_parser("edit", help="edit one image")
    e.add_argument("image", help="input image file")
    e.add_argument("instruction", help='the edit, e.g. "make her outfit black"')
    e.add_argument("-o", "--output", required=True, help="output image file (.png, .jpg, ...)")
    e.add_argument("--then", action="append", metavar="INSTRUCTION",
                   help="another turn, applied to the previous turn's output (repeatable); turn k's image is "
                   "written next to the output as NAME.turnk.EXT, the last turn's to the output")
    e.add_argument("--mask", help="mask image of the region to edit (white = edit; see --mask-convention); skips "
                   "localization (first turn only)")
    add_mask_convention_arg(e, what="; default auto")
    e.add_argument("--model", default=None, help=_MODEL_HELP + " (with --session: the session's)")
    e.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    e.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="default float16 on CUDA, float32 on CPU")
    e.add_argument("--save-roi", metavar="DIR", help="write the RoI mask, overlay, segment map (also with each "
                   "segment's id: segment_ids.png), heatmap and a panel as PNGs")
    s = e.add_argument_group("correcting the region without localizing again (lime_fast/session.py)")
    s.add_argument("--save-session", metavar="DIR", help="also write this edit's localization (segments, heatmap, "
                   "RoI, settings, model pin) and DIR/segment_ids.png, to re-run it later with --session DIR")
    s.add_argument("--session", metavar="DIR", help="re-run the edit saved in DIR (same image, instruction, model and "
                   "settings) with the region corrected by --add / --drop / --segments / --mask; skips the "
                   "localization pass and k-means")
    s.add_argument("--add", action="append", metavar="IDS", help="segment ids to add to the RoI, e.g. 3,5 (repeatable)")
    s.add_argument("--drop", action="append", metavar="IDS", help="segment ids to remove from the RoI, e.g. 2")
    s.add_argument("--segments", metavar="IDS", help="the region is exactly these segments (then --add / --drop)")
    s.add_argument("--mask-mode", choices=("replace", "add", "cut"), help="with --session: how --mask changes the "
                   "region: replace it (default), add to it, or cut from it (after --add / --drop)")
    e.add_argument("--force", action="store_true", help="overwrite existing output files")
    e.add_argument("--strict", action="store_true",
                   help="refuse inputs that would otherwise be adjusted with a warning (a mask of another aspect "
                        "ratio, an image larger than a shipped model was trained on)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_args(e)


def _add_batch_parser(sub) -> None:
    b = sub.add_parser("batch", help="edit every row of a JSONL manifest into a folder (resumable; --ray for Ray)",
                       description="Edit every row of a JSONL manifest ({id, image, instruction[, mask][, EditConfig "
                       "fields]} per line) into DIR/images/{id}.png, recording each row in DIR/results.jsonl. "
                       "Re-running skips rows already done. Exit status 1 when rows failed in this run.")
    b.add_argument("manifest", help="JSONL file, one edit per line")
    b.add_argument("--out", required=True, metavar="DIR", help="output folder (images/, roi/, results.jsonl)")
    b.add_argument("--model", default=DEFAULT_MODEL, help=_MODEL_HELP)
    b.add_argument("--batch-size", type=int, default=1,
                   help="rows per UNet batch (same size and config); >1 is for GPU throughput and may change the last bit")
    b.add_argument("--save-roi", action="store_true", help="also write each RoI mask to DIR/roi/{id}.png")
    b.add_argument("--strict", action="store_true", help="refuse to start if any row is bad (default: record it as failed)")
    b.add_argument("--retry-failed", action="store_true", help="run again the rows recorded as failed")
    add_mask_convention_arg(b, what="; the rows' masks, unless a row has its own mask_convention; default auto")
    b.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    b.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="default float16 on CUDA, float32 on CPU")
    b.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's; Ray: CPUs per worker)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--ray", action="store_true", help="run on Ray Data (needs: pip install 'lime-fast[ray]')")
    b.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    b.add_argument("--workers", type=int, default=1, help="Ray workers, each loading the model once (default 1)")
    b.add_argument("--num-gpus-per-worker", type=float, help="default 1 when the Ray cluster has GPUs, else 0")
    b.add_argument("--num-cpus-per-worker", type=float, default=1)
    add_config_args(b)


def _add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="a real edit, offline, with the small shapes model that ships with lime_fast (lime_fast beside plain InstructPix2Pix)")
    d.add_argument("--out", default="lime_fast_demo", help="folder for the pictures (default ./lime_fast_demo)")
    d.add_argument("--force", action="store_true", help="overwrite existing pictures")
    d.add_argument("--quiet", action="store_true")


# --- commands ------------------------------------------------------------------------------------


def _dtype(name):
    import torch

    return getattr(torch, name) if name else None


def plan_outputs(outs: list[Path], roi_dirs: list[Path], *, user_mask: bool, inputs=()) -> dict[Path, tuple[int, str]]:
    """Every file ``lime-fast edit`` will write -> (turn, picture name), decided before any model work:
    the edited image of each turn and, with --save-roi, the pictures that turn produces (a turn edited
    with the user's mask, the first one, has no segments or heatmap: there was no localization).
    OutputError when two outputs share a path or an output is one of the inputs."""
    from .io import OutputError

    planned: dict[Path, tuple[int, str]] = {}
    wanted = [(path, (k, "image")) for k, path in enumerate(outs)]
    for k, d in enumerate(roi_dirs):
        names = [n for n in PICTURES if not (user_mask and k == 0 and n in _LOCALIZED)]
        wanted += [(d / f"{n}.png", (k, n)) for n in names]
    sources = {Path(p).expanduser().resolve(): str(p) for p in inputs if isinstance(p, (str, Path))}
    seen: dict[Path, tuple[int, str]] = {}  # resolved output -> what goes there
    for path, what in wanted:
        key = path.expanduser().resolve()
        if key in sources:
            raise OutputError(f"the output '{path}' is the input '{sources[key]}': it would be overwritten; "
                              "write the result elsewhere")
        if key in seen:
            raise OutputError(f"two outputs would be written to '{path}' ({_label(seen[key])} and {_label(what)}); "
                              "give -o and --save-roi different paths")
        seen[key] = planned[path] = what
    return planned


def _label(what: tuple[int, str]) -> str:
    k, name = what
    return f"the edited image of turn {k + 1}" if name == "image" else f"the {name} picture of turn {k + 1}"


def _ids(values, flag: str) -> list[int]:
    """Segment ids of comma-separated flag values ("3,5", repeatable) -> [3, 5]; UsageError naming the flag."""
    ids = []
    for value in values or ():
        for part in str(value).split(","):
            if not part.strip().lstrip("-").isdigit():
                raise UsageError(f"{flag} takes segment ids separated by commas (e.g. 3,5); got {value!r}")
            ids.append(int(part))
    return ids


def _check_session_args(args) -> None:
    """The session flags fit together (before anything is read or loaded)."""
    refining = args.add or args.drop or args.segments is not None or args.mask_mode
    if args.session is None and refining:
        raise UsageError("--add, --drop, --segments and --mask-mode correct a saved edit's region: give --session DIR "
                         "(written by --save-session)")
    if args.session is not None and (args.then or args.save_session):
        raise UsageError("--session re-runs one saved edit: it takes neither --then nor --save-session")
    if args.save_session and (args.then or args.mask):
        raise UsageError("--save-session saves an automatic localization: it takes neither --then nor --mask")
    if args.save_session:
        from .io import OutputError
        from .session import FILES

        existing = [str(Path(args.save_session) / f) for f in FILES if (Path(args.save_session) / f).exists()]
        if existing and not args.force:
            raise OutputError(f"refusing to overwrite {', '.join(existing)} (use --force)")


def _edit(args) -> int:
    """``lime-fast edit``: 1. everything checked and planned (no torch, no model, nothing written); 2. the
    model; 3. the turns, each turn's outputs written as soon as it finishes."""
    from .models import resolve_device

    _check_session_args(args)
    if args.session is not None:
        return _edit_session(args)
    args.model = args.model or DEFAULT_MODEL
    outs, planned, roi_dirs, cfg, job = _plan_edit(args)
    device = resolve_device(args.device)
    from .models import quiet_libraries

    quiet_libraries()
    import lime_fast

    engine = lime_fast.get_engine(args.model, device=device, torch_dtype=_dtype(args.dtype))
    results = _run_turns(args, engine, job, cfg, outs, planned, roi_dirs)
    if isinstance(results, int):  # an exit status: a later turn failed or was interrupted
        return results
    if roi_dirs:
        print("pictures: " + ", ".join(str(p) for p, (_, n) in planned.items() if n != "image"))
    if args.save_session:
        _save_session(args, results[0], engine, cfg)
    return 0


def _plan_edit(args) -> tuple:
    """(turn outputs, planned {path: (turn, picture)}, RoI folders, EditConfig, EditInputs), every output
    location and input checked; raises before torch or the model is imported."""
    from .inputs import EditInputs, check_instruction
    from .io import check_outputs
    from .models import config_multiple, local_checkpoint, model_location, shipped

    out = Path(args.output)
    instructions = [check_instruction(t) for t in [args.instruction, *(args.then or [])]]
    outs = [out.with_name(f"{out.stem}.turn{k}{out.suffix}") for k in range(1, len(instructions))] + [out]
    roi_dirs = []
    if args.save_roi:  # one turn: DIR/roi.png ...; several: DIR/turn1/roi.png, DIR/turn2/roi.png, ...
        roi_dirs = [Path(args.save_roi)] if len(outs) == 1 else [Path(args.save_roi) / f"turn{k}" for k in range(1, len(outs) + 1)]
    planned = plan_outputs(outs, roi_dirs, user_mask=bool(args.mask), inputs=[args.image, args.mask])
    check_outputs(planned, args.force)
    if args.save_session:
        check_outputs([Path(args.save_session) / "segment_ids.png"], force=True)  # the folder is writable
    cfg = model_config(args.model, config_overrides(args))
    info = shipped(args.model)
    with warnings.catch_warnings():
        if args.strict:
            from .errors import InputWarning

            warnings.simplefilter("error", InputWarning)
        job = EditInputs.build([args.image] * len(instructions), instructions,
                               [args.mask] + [None] * (len(instructions) - 1) if args.mask else None,
                               multiple=config_multiple(args.model) or 64, cfg=cfg,
                               trained_size=info.image_size if info else None, mask_convention=args.mask_convention)
    local_checkpoint(model_location(args.model))  # a mistyped folder fails here, before torch loads
    return outs, planned, roi_dirs, cfg, job


def _run_turns(args, engine, job, cfg, outs, planned, roi_dirs):
    """The turns' results; each turn's planned outputs are written (all or nothing) as soon as it
    finishes, so a failing later turn or a Ctrl-C keeps every finished one (then: the exit status)."""
    import lime_fast

    from .errors import TurnError
    from .io import save_all

    written = []

    def save_turn(t: int, result) -> None:
        pictures = result.pictures() if roi_dirs else {}
        mine = {path: result.image if name == "image" else pictures[name] for path, (k, name) in planned.items()
                if k == t - 1}
        for path in mine:
            path.parent.mkdir(parents=True, exist_ok=True)
        save_all(mine)
        written.append(t)
        print(f"wrote {outs[t - 1]}  (content words: {', '.join(result.tokens) or '-'}; RoI {result.roi_mask.mean():.1%} "
              f"of the image; {result.unet_evals} UNet evaluations, {result.timings['total']:.1f} s)")

    try:
        return lime_fast.edit_turns(job.images[0], job.instructions, masks=job.masks, model=engine,
                                    progress=not args.quiet, on_turn=save_turn, config=cfg)
    except (TurnError, KeyboardInterrupt) as e:
        if not written:
            raise
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"error: {e}"
        print(f"lime-fast: {what}; turns 1-{written[-1]} of {len(outs)} were written", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 2


def _save_session(args, result, engine, cfg) -> None:
    from .batch.keys import model_pin
    from .session import write

    write(args.save_session, result, model=args.model, pin=model_pin(args.model), dtype=str(engine.dtype), config=cfg)
    print(f"session: {args.save_session} (segment ids: {Path(args.save_session) / 'segment_ids.png'}; correct the "
          f"region with --session {args.save_session} --add IDS --drop IDS)")


def _edit_session(args) -> int:
    """``lime-fast edit IMAGE INSTRUCTION --session DIR [--add ..] [--drop ..] [--segments ..] [--mask ..]``:
    the saved edit re-run with a corrected region: encode + edit pass + decode (``lime_fast.refine``)."""
    import time

    from . import session as sessions
    from .batch.keys import model_pin
    from .inputs import check_instruction, load_image
    from .io import check_outputs, save_all
    from .models import resolve_device

    out = Path(args.output)
    add, drop = _ids(args.add, "--add"), _ids(args.drop, "--drop")
    only = None if args.segments is None else _ids([args.segments], "--segments")
    saved = sessions.read(args.session)
    model = args.model or saved.model
    planned = plan_outputs([out], [Path(args.save_roi)] if args.save_roi else [], user_mask=False,
                           inputs=[args.image, args.mask])
    check_outputs(planned, args.force)
    image = load_image(args.image)
    sessions.check(saved, pin=model_pin(model), overrides=config_overrides(args), image=image,
                   instruction=check_instruction(args.instruction))
    from .models import quiet_libraries

    quiet_libraries()
    import lime_fast
    from .refine import refine

    engine = lime_fast.get_engine(model, device=resolve_device(args.device), torch_dtype=_dtype(args.dtype))
    sessions.check_dtype(saved, str(engine.dtype))
    t0 = time.perf_counter()
    cache, job = engine.prepare_refine(image, saved.instruction, saved.config)
    encode = time.perf_counter() - t0
    if tuple(job.grid) != saved.segments.shape:
        raise sessions.SessionError(f"the session's grid is {saved.segments.shape}, this edit's {job.grid}; edit anew")
    result = refine(cache, base_roi=saved.roi, segments=saved.segments, heatmap=saved.heatmap, input_image=job.images[0],
                    add=add, remove=drop, only=only, mask=args.mask, mask_mode=args.mask_mode or "replace",
                    mask_convention=args.mask_convention, progress=not args.quiet, skipped=("localize", "segment"),
                    extra_timings={"encode": encode, "total": encode})
    pictures = result.pictures() if args.save_roi else {}
    for path in planned:
        path.parent.mkdir(parents=True, exist_ok=True)
    save_all({path: result.image if name == "image" else pictures[name] for path, (_, name) in planned.items()})
    ref = result.refinement
    print(f"wrote {out}  (session {args.session}: localization reused; segments added {list(ref.added) or '-'}, removed "
          f"{list(ref.removed) or '-'}; RoI {result.roi_mask.mean():.1%} of the image; {result.unet_evals} UNet "
          f"evaluations, {result.timings['total']:.1f} s)")
    return 0


def _batch(args) -> int:
    from .errors import BatchError
    from .models import resolve_device

    if args.batch_size < 1 or args.workers < 1 or (args.threads is not None and args.threads < 1):
        raise UsageError("--batch-size, --workers and --threads must be >= 1")
    cfg = model_config(args.model, config_overrides(args))
    device = args.device
    if device is not None and not args.ray:
        device = resolve_device(device)
    from . import batch
    from .models import quiet_libraries

    quiet_libraries()
    if args.ray:
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # our bar reports progress
    try:
        summary = batch.run(
            args.manifest,
            args.out,
            model=args.model,
            config=cfg,
            batch_size=args.batch_size,
            save_roi=args.save_roi,
            strict=args.strict,
            retry_failed=args.retry_failed,
            mask_convention=args.mask_convention,
            device=device,
            torch_dtype=_dtype(args.dtype),
            threads=args.threads,
            progress=not args.quiet,
            ray=args.ray,
            ray_address=args.ray_address,
            workers=args.workers,
            num_gpus_per_worker=args.num_gpus_per_worker,
            num_cpus_per_worker=args.num_cpus_per_worker,
        )
    except BatchError as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        print(f"lime-fast: interrupted; finished rows are recorded in {Path(args.out) / batch.RESULTS}: "
              "re-run the same command to do the rest", file=sys.stderr)
        return 130
    if args.quiet:  # otherwise they were shown as they happened
        for line in summary.failures[:20]:
            print(f"failed: {line}", file=sys.stderr)
        if len(summary.failures) > 20:
            print(f"... and {len(summary.failures) - 20} more failed rows (see {summary.results})", file=sys.stderr)
    print(summary)
    return 0 if summary.failed == 0 else 1


def _demo(args) -> int:
    from .io import check_outputs

    out = Path(args.out)
    check_outputs([out / f"{n}.png" for n in ("input", "target", "edited") + PICTURES], args.force)
    from .demo import run_demo
    from .models import quiet_libraries

    quiet_libraries()
    run_demo(out, progress=not args.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .errors import LimeWarning, ModelLoadError
    from .io import OutputError

    show = warnings.showwarning

    def one_line(message, category, *rest, **kw):  # our warnings as 'warning: ...', others unchanged
        if issubclass(category, LimeWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("always", LimeWarning)
        warnings.showwarning = one_line
        try:
            if args.command == "eval":
                from .evaluate.cli import run as run_eval

                return run_eval(args)
            if args.command == "serve":
                from .serve.cli import run as run_serve

                return run_serve(args)
            return {"edit": _edit, "batch": _batch, "demo": _demo}[args.command](args)
        except KeyboardInterrupt:
            print("lime-fast: interrupted; nothing was written", file=sys.stderr)
            return 130
        except (UsageError, ModelLoadError, OutputError, OSError, ValueError, TypeError, LimeWarning) as e:
            print(f"lime-fast: error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
