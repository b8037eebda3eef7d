"""The one-call API: ``lime_fast.edit`` and the engine cache behind it."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch

from .config import DEFAULT_MODEL, EngineOptions
from .engine import LimeEngine
from .results import EditResult

ENGINE_CACHE_SIZE = int(os.environ.get("LIME_FAST_ENGINE_CACHE", "2"))
"""Engines loaded by name that ``get_engine`` keeps (least recently used dropped first). A service that
edits with several models keeps at most this many loaded; set LIME_FAST_ENGINE_CACHE (or this attribute)."""

_ENGINES: OrderedDict[tuple, LimeEngine] = OrderedDict()
_ENGINES_LOCK = threading.Lock()
_PIPE_ENGINES = "_lime_fast_engines"  # the attribute of a held pipeline that keeps its engines


def get_engine(model=DEFAULT_MODEL, *, device=None, torch_dtype=None, options: EngineOptions | None = None,
               **option_fields) -> LimeEngine:
    """The cached ``LimeEngine`` for (model, device, dtype, ``EngineOptions``); loaded on first use.

    ``model`` may also be a ``LimeEngine`` (returned as is) or a loaded InstructPix2Pix pipeline, whose
    engines live on the pipeline object itself: they go when the caller drops the pipeline, and no
    recycled ``id`` can return another pipeline's engine. Engines loaded by name are kept in a
    least-recently-used cache of ``ENGINE_CACHE_SIZE``. options / option_fields: an ``EngineOptions``
    and/or its fields as keywords.
    """
    if isinstance(model, LimeEngine):
        return model
    opts = EngineOptions.of(options, **option_fields)
    if hasattr(model, "unet") and hasattr(model, "vae"):
        with _ENGINES_LOCK:
            held = model.__dict__.setdefault(_PIPE_ENGINES, {})
            if opts not in held:
                held[opts] = LimeEngine.from_pipe(model, opts)
            return held[opts]
    from .models import model_location, resolve_device

    dev = resolve_device(device)
    dtype = torch_dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    key = (model_location(model), str(dev), dtype, opts)
    with _ENGINES_LOCK:
        if key in _ENGINES:
            _ENGINES.move_to_end(key)
            return _ENGINES[key]
    engine = LimeEngine.from_pretrained(model, torch_dtype=dtype, device=dev, options=opts)  # outside the lock: slow
    with _ENGINES_LOCK:
        engine = _ENGINES.setdefault(key, engine)
        _ENGINES.move_to_end(key)
        while len(_ENGINES) > max(0, ENGINE_CACHE_SIZE):
            _ENGINES.popitem(last=False)
        return engine


def edit(
    image,
    instruction: str,
    *,
    mask=None,
    mask_convention: str = "auto",
    model=DEFAULT_MODEL,
    device=None,
    torch_dtype=None,
    options: EngineOptions | None = None,
    progress: bool = True,
    **config,
) -> EditResult:
    """Edit ``image`` as ``instruction`` says, changing only the region the instruction is about.

    Args:
        image: path, PIL image, numpy array [H, W(, 3|4)] or torch tensor; any mode (converted to RGB).
        instruction: the edit, e.g. "make her outfit black" (at most 77 CLIP tokens; longer is truncated).
        mask: optional region to edit (path, PIL, numpy or torch, any size; True/white = inside). Skips
            the automatic localization.
        mask_convention: how a mask file or PIL mask marks its region: "auto" (default), "white",
            "transparent" or "opaque" (``lime_fast.inputs.load_mask`` states the rule). Arrays ignore it.
        model: hub id or local folder of an InstructPix2Pix-family diffusers checkpoint, the name of a
            shipped model ("shapes-ip2p", offline), a loaded pipeline, or a ``LimeEngine``. Loaded
            engines are cached across calls.
        device, torch_dtype: default CUDA + fp16 when available, else CPU + fp32.
        options: how the engine computes (``EngineOptions``: attention backend, CUDA graphs, compile,
            channels-last, fused QKV, precision); its fields may also be passed as keywords
            (``compile=True``). Each distinct options value loads its own engine.
        progress: show a progress bar per pass.
        **config: any ``EditConfig`` field (steps, seed, text_guidance, top_k, roi_words, ...); they
            override the model's defaults (the spec's, or a shipped model's own).

    Returns:
        ``EditResult`` with the edited image at the input's size, the RoI mask, segments, heatmap,
        chosen tokens and per-stage timings.
    """
    from .inputs import EditInputs
    from .models import config_multiple, default_config, shipped

    # validate everything before loading anything
    opts = EngineOptions.take(options, config)
    if isinstance(model, LimeEngine):
        base, multiple, trained = model.default_config, model.multiple, model.trained_size
    else:
        info = shipped(model)
        base = default_config(model)
        multiple, trained = config_multiple(model) or 64, info.image_size if info else None
    cfg = base.replace(**config)
    job = EditInputs.build([image], [instruction], None if mask is None else [mask], multiple=multiple, cfg=cfg,
                           trained_size=trained, mask_convention=mask_convention)
    engine = get_engine(model, device=device, torch_dtype=torch_dtype, options=opts)
    return engine.edit(job.images[0], job.instructions[0], mask=job.masks[0], progress=progress, config=cfg)
