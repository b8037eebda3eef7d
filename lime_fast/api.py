"""The one-call API: ``lime_fast.edit`` and the engine cache behind it."""

from __future__ import annotations

import threading

import torch

from .config import DEFAULT_MODEL
from .engine import LimeEngine
from .results import EditResult

_ENGINES: dict[tuple, LimeEngine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(model=DEFAULT_MODEL, *, device=None, torch_dtype=None, attention: str = "auto") -> LimeEngine:
    """The cached ``LimeEngine`` for (model, device, dtype, attention); loaded on first use.

    ``model`` may also be a ``LimeEngine`` (returned as is) or a loaded InstructPix2Pix pipeline.
    """
    if isinstance(model, LimeEngine):
        return model
    if hasattr(model, "unet") and hasattr(model, "vae"):
        key = (id(model), attention)
        with _ENGINES_LOCK:
            if key not in _ENGINES:
                _ENGINES[key] = LimeEngine.from_pipe(model, attention=attention)
            return _ENGINES[key]
    from .models import resolve_device

    dev = resolve_device(device)
    dtype = torch_dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    from .models import model_location

    key = (model_location(model), str(dev), dtype, attention)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = LimeEngine.from_pretrained(model, torch_dtype=dtype, device=dev, attention=attention)
        return _ENGINES[key]


def edit(
    image,
    instruction: str,
    *,
    mask=None,
    model=DEFAULT_MODEL,
    device=None,
    torch_dtype=None,
    progress: bool = True,
    **config,
) -> EditResult:
    """Edit ``image`` as ``instruction`` says, changing only the region the instruction is about.

    Args:
        image: path, PIL image, numpy array [H, W(, 3|4)] or torch tensor; any mode (converted to RGB).
        instruction: the edit, e.g. "make her outfit black" (at most 77 CLIP tokens; longer is truncated).
        mask: optional region to edit (path, PIL, numpy or torch, any size; True/white = inside). Skips
            the automatic localization.
        model: hub id or local folder of an InstructPix2Pix-family diffusers checkpoint, the name of a
            shipped model ("shapes-ip2p", offline), a loaded pipeline, or a ``LimeEngine``. Loaded
            engines are cached across calls.
        device, torch_dtype: default CUDA + fp16 when available, else CPU + fp32.
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
    if isinstance(model, LimeEngine):
        base, multiple, trained = model.default_config, model.multiple, model.trained_size
    else:
        info = shipped(model)
        base = default_config(model)
        multiple, trained = config_multiple(model) or 64, info.image_size if info else None
    cfg = base.replace(**config)
    job = EditInputs.build([image], [instruction], None if mask is None else [mask], multiple=multiple, cfg=cfg,
                           trained_size=trained)
    engine = get_engine(model, device=device, torch_dtype=torch_dtype)
    return engine.edit(job.images[0], job.instructions[0], mask=job.masks[0], progress=progress, config=cfg)
