"""Models by name, and loading helpers shared by the engine, the CLI and the batch runners.

``SHIPPED`` holds the models that ship inside the package and work offline under a short name
everywhere a model is accepted (``lime_fast.edit(..., model="shapes-ip2p")``, ``--model shapes-ip2p``,
the batch runner). A shipped model carries its own ``EditConfig`` defaults (its pictures are small,
so its steps, grid and top-k differ from SD 1.5's); explicit settings override them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError

DATA = Path(__file__).with_name("data")


@dataclass(frozen=True)
class ShippedModel:
    """A model folder inside the package.

    name: what users type. folder: its diffusers checkpoint. config: its ``EditConfig`` defaults.
    image_size: the side (pixels) it was trained at; an edit of a larger image warns that the model
        has not seen such sizes (it garbles them).
    summary: one line for ``--help`` and listings.
    """

    name: str
    folder: Path
    config: dict = field(default_factory=dict)
    image_size: int | None = None
    summary: str = ""


# The shapes model's settings, for its 64 x 64 pictures (16 x 16 latents): fewer steps than SD's 30, a
# 64-cell grid (one cell per pixel), top-k scaled from the spec's 100 of 128 x 128 cells, localization
# from level 0 (the coarser levels are too coarse to separate its 2-4 shapes) and text guidance 3.0
# (the spec's 2.0 was tuned for SD 1.5). Chosen on tuning seeds, not the benchmark's: the measurements
# are in benchmarks/RESULTS.md, "Settings and their measurements".
SHAPES_IP2P = ShippedModel(
    name="shapes-ip2p",
    folder=DATA / "shapes-ip2p",
    config=dict(steps=20, grid_size=64, top_k=50, feature_levels=(0,), text_guidance=3.0, max_side=64),
    image_size=64,
    summary="small InstructPix2Pix trained on synthetic coloured shapes (64 x 64), ships with lime_fast, offline",
)
SHIPPED = {m.name: m for m in (SHAPES_IP2P,)}


def shipped(model) -> ShippedModel | None:
    """The shipped model ``model`` names (by name, or by the path of its folder), else None."""
    if isinstance(model, str) and model in SHIPPED:
        return SHIPPED[model]
    if isinstance(model, (str, os.PathLike)):
        try:
            path = Path(model).expanduser().resolve()
        except (OSError, RuntimeError):
            return None
        for m in SHIPPED.values():
            if path == m.folder.resolve():
                return m
    return None


def model_location(model) -> str:
    """What ``from_pretrained`` loads for ``model``: a shipped model's folder, else ``model`` as given."""
    m = shipped(model)
    if m is not None:
        if not (m.folder / "model_index.json").is_file():
            raise ModelLoadError(f"the shipped model '{m.name}' is missing from this install ({m.folder})")
        return str(m.folder)
    return str(model)


def pixel_multiple(vae_config, unet_config) -> int:
    """Side multiple images are brought to: the VAE factor times the UNet's downsampling (64 for SD 1.5,
    so every level's grid is whole). Takes the two components' configs (dicts or config objects)."""
    get = (lambda c, k: c[k]) if isinstance(vae_config, dict) else (lambda c, k: getattr(c, k))
    return 2 ** (len(get(vae_config, "block_out_channels")) - 1) * 2 ** (len(get(unet_config, "down_block_types")) - 1)


def default_config(model):
    """The ``EditConfig`` an edit with ``model`` starts from, without loading it: a shipped model's own
    settings; for a local checkpoint folder of another family, that family's LIME levels
    (``lime_fast.families``); otherwise the spec's defaults."""
    from .config import EditConfig

    info = shipped(model)
    if info is not None:
        return EditConfig(**info.config)
    try:
        from . import families

        folder = Path(str(model)).expanduser()
        family, unet = families.of_folder(folder), families.unet_config_of(folder)
        if family is not None and unet is not None:
            return EditConfig(**family.default_levels(unet))
    except (OSError, ValueError):
        pass
    return EditConfig()


def config_multiple(model) -> int | None:
    """``pixel_multiple`` from a local checkpoint's (or a shipped model's) JSON configs, without importing
    torch or diffusers; None for hub ids or unreadable configs."""
    import json

    try:
        folder = Path(model_location(model)).expanduser()
        vae = json.loads((folder / "vae" / "config.json").read_text())
        unet = json.loads((folder / "unet" / "config.json").read_text())
        return pixel_multiple(vae, unet)
    except (OSError, ValueError, KeyError, TypeError, ModelLoadError):
        return None


def local_checkpoint(model) -> Path | None:
    """The folder ``model`` names when it names a local path (None for a hub id); raises
    ``ModelLoadError`` when that folder is not a diffusers checkpoint."""
    path = Path(str(model)).expanduser()
    if not (path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1):
        return None
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"'{model}' is not a diffusers checkpoint folder (no model_index.json in {path.resolve()}).")
    return path


def folder_problems(folder: Path, use_safetensors: bool = True) -> list[str]:
    """What is actually missing or unreadable in a diffusers checkpoint folder, one line each (empty: every
    component the ``model_index.json`` lists has a readable config and, for weighted components, a weight
    file whose header reads). Checked only after a load failed, to tell a broken folder from other causes."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        return [f"model_index.json: unreadable ({e})"]
    problems = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None or name in ("safety_checker", "feature_extractor"):
            continue
        sub = folder / name
        if not sub.is_dir():
            problems.append(f"{name}/: missing")
            continue
        configs = [c for c in ("config.json", "scheduler_config.json", "tokenizer_config.json", "vocab.json") if (sub / c).is_file()]
        if not configs:
            problems.append(f"{name}/: no config file")
        for c in configs:
            try:
                json.loads((sub / c).read_text())
            except (OSError, ValueError) as e:
                problems.append(f"{name}/{c}: unreadable ({type(e).__name__})")
        if name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            weights = sorted(sub.glob("*.safetensors")) + ([] if use_safetensors else sorted(sub.glob("*.bin")))
            if not weights:
                problems.append(f"{name}/: no weight file ({'*.safetensors' if use_safetensors else '*.safetensors or *.bin'})")
            problems += [f"{name}/{w.name}: {why}" for w in weights if w.suffix == ".safetensors" and (why := _safetensors_problem(w))]
    return problems


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be read (its 8-byte header length, then the JSON header), else None."""
    import json

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"truncated or not safetensors ({size} bytes)"
            json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable ({type(e).__name__})"
    return None


def _import_error(error: BaseException) -> ImportError | None:
    """The ImportError behind a load failure (diffusers wraps its lazy imports' errors in RuntimeError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ImportError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _site_dirs() -> list[Path]:
    import site
    import sysconfig

    dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")} | set(site.getsitepackages()) | {site.getusersitepackages()}
    return [Path(d).resolve() for d in dirs]


def _import_message(e: ImportError) -> str:
    """One paragraph on a failed import: a module shadowed by a file outside site-packages, a missing
    package, or an installed package that does not provide what the importer needs."""
    import importlib.metadata as md

    top = (e.name or "").split(".")[0]
    dists = md.packages_distributions().get(top, []) if top else []
    where = Path(e.path).resolve() if getattr(e, "path", None) else None
    if where is not None and not any(d in where.parents for d in _site_dirs()):
        owner = f" (the installed distribution {', '.join(dists)})" if dists else ""
        return (f"the module '{top}' was imported from {where}, which is not the installed package{owner}: a file or "
                f"folder named '{top}' in the working directory or on PYTHONPATH shadows it. Rename it, or run from "
                "another folder.")
    if isinstance(e, ModuleNotFoundError) and not dists:
        return (f"the package providing '{e.name}' is not installed and diffusers or transformers needs it here: "
                f"pip install {top} (or reinstall lime-fast to get its dependencies).")
    versions = ", ".join(f"{d} {md.version(d)}" for d in dists) or top
    return (f"the installed {versions} does not provide what diffusers or transformers imports from it "
            "(the versions do not fit together): reinstall the dependencies lime-fast was tested with "
            "(scripts/install.sh in a checkout, or pip install -U lime-fast).")


def version_problems() -> list[str]:
    """Installed versions outside lime-fast's declared requirement ranges (its package metadata), e.g.
    ["diffusers 0.20.0 (lime-fast needs diffusers<1,>=0.30)"]; empty when all fit or when lime-fast runs
    from a checkout that is not installed."""
    import importlib.metadata as md

    try:
        from packaging.requirements import Requirement

        requires = md.requires("lime-fast") or []
    except (ImportError, md.PackageNotFoundError):
        return []
    out = []
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            out.append(f"{req.name} is not installed (lime-fast needs {req})")
            continue
        if not req.specifier.contains(have, prereleases=True):
            out.append(f"{req.name} {have} (lime-fast needs {req})")
    return out


def load_error(error: BaseException, model, folder: Path | None, use_safetensors: bool = True) -> ModelLoadError:
    """The ``ModelLoadError`` for a failed ``from_pretrained``, naming the real cause, checked in this
    order: an import failing inside diffusers or transformers (a shadowed module, a missing optional
    package, mismatched versions); a local folder with a file actually missing or unreadable (checked
    file by file); installed versions outside lime-fast's ranges; a hub model that is not cached."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    what = f"the checkpoint folder '{model}'" if folder is not None else f"the model '{model}'"
    imported = _import_error(error)
    if imported is not None:
        return ModelLoadError(f"could not load {what}: a library failed to import ({imported}).\n"
                              f"This is an installation problem, not the checkpoint: {_import_message(imported)}")
    problems = folder_problems(folder, use_safetensors) if folder is not None else []
    if problems:
        return ModelLoadError(
            f"could not load {what}: {reason}\nThe folder is incomplete or corrupt: " + "; ".join(problems[:6])
            + ". It needs unet/, vae/, text_encoder/, tokenizer/ and scheduler/ with their configs and weights "
            "(safetensors unless use_safetensors=False). Re-copy or re-save it.")
    versions = version_problems()
    if versions:
        return ModelLoadError(f"could not load {what}: {reason}\nInstalled versions lime-fast was not tested with: "
                              + "; ".join(versions) + ". Install versions in range (pip install -U lime-fast).")
    if folder is not None:
        return ModelLoadError(
            f"could not load {what}: {type(error).__name__}: {reason}\nEvery file the folder's model_index.json "
            "lists is present and readable, so this is not a missing file: the folder may hold another model "
            "family's components, or settings diffusers rejects (the message above says which).")
    return ModelLoadError(
        f"could not load {what}: {reason}\n"
        "Its weights are not in the local Hugging Face cache and could not be downloaded (no network?). "
        f"Download them once where there is network with `hf download {model}` (huggingface_hub's "
        "command line), or pass the path of a local diffusers folder. Offline, the shipped model "
        "works everywhere a model is accepted: model='shapes-ip2p' (`lime-fast demo` shows it).")


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


def resolve_device(device=None):
    """``device`` as a ``torch.device`` (default: CUDA when available, else the CPU); ValueError naming
    the problem for a device this PyTorch cannot use (a typo, CUDA on a CPU-only build, a missing GPU)."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"device {device!r}: CUDA is not available here (this PyTorch is {build}, or no GPU "
                             "is visible); use --device cpu, or install a CUDA build of PyTorch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"device {device!r}: lime_fast runs on cpu or cuda")
    return dev


def to_device(t, device):
    """CPU tensor ``t`` on ``device`` without waiting for the GPU: on CUDA through pinned memory and an
    asynchronous copy. A copy from pageable memory first waits for all queued GPU work, so one made behind
    a queued pass (the k-means' random draws, SDXL's latent statistics before the decode) would hold the
    host until that pass ends instead of letting it queue the next stage."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
