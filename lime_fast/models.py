"""Model loading helpers shared by the engine, the CLI and the batch runners: checkpoint folders,
the pixel multiple of a model, and quieting the libraries' chatter."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelLoadError


def pixel_multiple(vae_config, unet_config) -> int:
    """Side multiple images are brought to: the VAE factor times the UNet's downsampling (64 for SD 1.5,
    so every level's grid is whole). Takes the two components' configs (dicts or config objects)."""
    get = (lambda c, k: c[k]) if isinstance(vae_config, dict) else (lambda c, k: getattr(c, k))
    return 2 ** (len(get(vae_config, "block_out_channels")) - 1) * 2 ** (len(get(unet_config, "down_block_types")) - 1)


def local_checkpoint(model) -> Path | None:
    """The folder ``model`` names when it names a local path (None for a hub id); raises
    ``ModelLoadError`` when that folder is not a diffusers checkpoint."""
    path = Path(str(model)).expanduser()
    if not (path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1):
        return None
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"'{model}' is not a diffusers checkpoint folder (no model_index.json in {path.resolve()}).")
    return path


def quiet_libraries() -> None:
    # diffusers/transformers chatter (optional-dependency notes, weight-loading bars) would bury our own
    # progress bars and messages; their errors still surface as exceptions.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
