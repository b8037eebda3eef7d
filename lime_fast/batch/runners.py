"""Running checked rows: ``edit_group`` (one ``edit_batch`` and its writes), batch planning, and the
local and Ray runners that ``lime_fast.batch.run`` drives."""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

from ..errors import BatchError
from .manifest import Row
from .store import _failed, _record, _config_diff, atomic_save, image_path, roi_path

RAY_EXTRA_HINT = "pip install 'lime-fast[ray]'"


def edit_group(engine, rows: list[Row], out_dir: Path, save_roi: bool = False) -> list[dict]:
    """Edit rows (same working size and config) in one ``edit_batch``, write their images atomically,
    return their records. A batch that raises is retried row by row, so one bad row fails alone."""
    try:
        masks = [None if r.mask is None else _row_mask(r) for r in rows]
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
                from .. import viz

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


def _row_mask(row: Row):
    """The row's mask as a bool array, read with the row's own convention (rows of one batch may differ).
    Its reading was reported when the row was checked (``check_files``): its warnings are not repeated."""
    from ..errors import InputWarning
    from ..inputs import load_mask

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        return load_mask(row.mask, convention=row.mask_convention)


def plan_batches(rows: Iterable[Row], batch_size: int, multiple: int | None) -> list[list[Row]]:
    """Group rows into batches of at most batch_size rows sharing a working size and a config, in
    manifest order (a batch is emitted when it fills; partial batches at the end). multiple: the
    model's size multiple (``LimeEngine.multiple``); None groups by exact input size instead."""
    from ..inputs import working_size

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

        from ..models import pixel_multiple

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
        from ..models import quiet_libraries

        quiet_libraries()
        import torch

        from .. import get_engine

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
        raise BatchError(f"ray=True needs Ray Data, which is not installed ({e.name or e}): {RAY_EXTRA_HINT}") from None
    return ray



def _run_local(todo, out, account, bar, *, model, batch_size, save_roi, device, torch_dtype, threads) -> None:
    import torch

    from .. import get_engine

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
    from ..models import model_location

    model_ref = model_location(model)  # a shipped model's name -> its folder
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

