"""lime_fast: fast, dependable LIME (localized image editing via attention regularization)
for InstructPix2Pix-family diffusers checkpoints.

    import lime_fast
    result = lime_fast.edit("photo.jpg", "make her outfit black")
    result.image.save("edited.png"); result.overlay().save("roi.png")
"""

from __future__ import annotations

import importlib

# Light names import at once; torch, diffusers and the engine load on first use of a name that needs
# them, so `lime-fast` answers a typo or a missing file in well under a second.
from .config import DEFAULT_MODEL, EditConfig, EngineOptions  # noqa: E402
from .errors import (  # noqa: E402
    BatchError, ConfigError, EditCancelled, InputWarning, LimeError, LimeWarning, MaskError, ModelLoadError,
    NonFiniteLatentsError, RefineError, RefineUnavailableError, SessionError, TurnError, UnsupportedModeError,
)

_LAZY = {
    "LimeEngine": "engine", "Encoded": "engine", "EditResult": "results", "accelerate": "graphs",
    "edit": "api", "get_engine": "api", "_ENGINES": "api", "edit_turns": "turns",
    "Refinement": "refine",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lime_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    if not name.startswith("_"):
        globals()[name] = value
    return value


__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MODEL",
    "BatchError",
    "ConfigError",
    "EditCancelled",
    "EditConfig",
    "EditResult",
    "Encoded",
    "EngineOptions",
    "InputWarning",
    "LimeEngine",
    "LimeError",
    "LimeWarning",
    "MaskError",
    "ModelLoadError",
    "NonFiniteLatentsError",
    "RefineError",
    "RefineUnavailableError",
    "Refinement",
    "SessionError",
    "TurnError",
    "UnsupportedModeError",
    "accelerate",
    "edit",
    "edit_turns",
    "get_engine",
]
