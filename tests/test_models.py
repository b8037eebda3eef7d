"""Loading errors name their real cause (lime_fast.models.load_error): each cause is made to happen, by
a monkeypatched loader or a damaged copy of a tiny checkpoint, and its message is checked."""

import shutil
from pathlib import Path

import numpy
import pytest

from lime_fast import LimeEngine, ModelLoadError, families, models


class _FailingPipeline:
    """Stands in for the diffusers pipeline class; from_pretrained raises the given error."""

    error: BaseException

    @classmethod
    def from_pretrained(cls, *a, **k):
        raise cls.error


def _load_failing(monkeypatch, folder, error):
    _FailingPipeline.error = error
    monkeypatch.setattr(families.Family, "pipeline_class", lambda self: _FailingPipeline)
    with pytest.raises(ModelLoadError) as e:
        LimeEngine.from_pretrained(folder, device="cpu")
    return str(e.value)


def _wrapped(inner: ImportError) -> RuntimeError:
    """diffusers' lazy import wraps the real ImportError in a RuntimeError."""
    try:
        raise RuntimeError("Failed to import diffusers.pipelines.stable_diffusion because of the following error") from inner
    except RuntimeError as e:
        return e


def test_a_shadowed_module_is_named_with_its_path(monkeypatch, tiny_dir, tmp_path):
    fake = tmp_path / "kernels" / "__init__.py"
    inner = ImportError("cannot import name 'CUDAProperties' from 'kernels'", name="kernels", path=str(fake))
    msg = _load_failing(monkeypatch, tiny_dir, _wrapped(inner))
    assert "installation problem, not the checkpoint" in msg
    assert str(fake) in msg and "shadows" in msg and "corrupt" not in msg


def test_a_missing_package_says_what_to_install(monkeypatch, tiny_dir):
    msg = _load_failing(monkeypatch, tiny_dir, _wrapped(ModuleNotFoundError("No module named 'nopkg_xyz'", name="nopkg_xyz")))
    assert "pip install nopkg_xyz" in msg and "corrupt" not in msg


def test_an_installed_package_of_the_wrong_version_is_named(monkeypatch, tiny_dir):
    inner = ImportError("cannot import name 'new_thing' from 'numpy'", name="numpy", path=numpy.__file__)
    msg = _load_failing(monkeypatch, tiny_dir, _wrapped(inner))
    assert f"numpy {numpy.__version__}" in msg and "do not fit together" in msg and "corrupt" not in msg


def test_versions_outside_the_declared_ranges_are_named(monkeypatch, tiny_dir):
    import importlib.metadata as md

    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "0.20.0" if name == "diffusers" else real(name))
    if not models.version_problems():
        pytest.skip("lime-fast is not installed here (a checkout on PYTHONPATH): no declared ranges to check")
    msg = _load_failing(monkeypatch, tiny_dir, TypeError("__init__() got an unexpected keyword argument 'x'"))
    assert "diffusers 0.20.0 (lime-fast needs diffusers" in msg and "corrupt" not in msg


def test_an_intact_folder_is_not_called_corrupt(monkeypatch, tiny_dir):
    msg = _load_failing(monkeypatch, tiny_dir, ValueError("unexpected scheduler setting"))
    assert "corrupt" not in msg and "present and readable" in msg and "ValueError: unexpected scheduler setting" in msg


@pytest.mark.parametrize("damage, expected", [
    ("garbage unet weights", "unet/diffusion_pytorch_model.safetensors: truncated or not safetensors"),
    ("no vae weights", "vae/: no weight file"),
    ("no text encoder", "text_encoder/: missing"),
    ("bad scheduler config", "scheduler/scheduler_config.json: unreadable"),
])
def test_a_damaged_folder_names_the_damaged_file(tmp_path, tiny_dir, damage, expected):
    broken = Path(shutil.copytree(tiny_dir, tmp_path / "broken"))
    if damage == "garbage unet weights":
        (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    elif damage == "no vae weights":
        for f in (broken / "vae").glob("*.safetensors"):
            f.unlink()
    elif damage == "no text encoder":
        shutil.rmtree(broken / "text_encoder")
    else:
        (broken / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as e:
        LimeEngine.from_pretrained(broken, device="cpu")
    msg = str(e.value)
    assert "incomplete or corrupt" in msg and expected in msg and "download" not in msg


def test_the_tiny_checkpoint_has_no_folder_problems(tiny_dir):
    assert models.folder_problems(Path(tiny_dir)) == []
