"""lime_fast: fast, dependable LIME (localized image editing via attention regularization)
for InstructPix2Pix-family diffusers checkpoints.

    import lime_fast
    result = lime_fast.edit("photo.jpg", "make her outfit black")
    result.image.save("edited.png"); result.overlay().save("roi.png")
    turns = lime_fast.edit_turns("photo.jpg", ["add a hat", "make the hat red"])   # multi-turn
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path

import torch


def _map_source_kernels() -> None:
    """Run from a source checkout with no install (the GPU machine, ``PYTHONPATH=.``): map the
    top-level ``kernels/`` folder to ``lime_fast.kernels``, as setup.py's ``package_dir`` does."""
    if importlib.util.find_spec(f"{__name__}.kernels") is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    spec = importlib.util.spec_from_file_location(
        f"{__name__}.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or not (folder / "__init__.py").is_file():
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_map_source_kernels()

from .config import DEFAULT_MODEL, EditConfig  # noqa: E402
from .engine import EditResult, Encoded, LimeEngine  # noqa: E402
from .errors import LimeWarning, ModelLoadError, NonFiniteLatentsError  # noqa: E402
from .graphs import accelerate  # noqa: E402
from .turns import edit_turns  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MODEL",
    "EditConfig",
    "EditResult",
    "Encoded",
    "LimeEngine",
    "LimeWarning",
    "ModelLoadError",
    "NonFiniteLatentsError",
    "accelerate",
    "edit",
    "edit_turns",
    "get_engine",
]

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
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    from .inputs import check_instruction, load_image, load_mask
    from .models import shipped

    # validate everything before loading anything
    if isinstance(model, LimeEngine):
        base = model.default_config
    else:
        info = shipped(model)
        base = EditConfig(**info.config) if info else EditConfig()
    base.replace(**config)
    load_image(image), check_instruction(instruction)
    if mask is not None:
        load_mask(mask)
    engine = get_engine(model, device=device, torch_dtype=torch_dtype)
    return engine.edit(image, instruction, mask=mask, progress=progress, **config)
