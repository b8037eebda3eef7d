"""lime_fast.edit: the one-call API, its engine cache, and EditResult's pictures."""

import numpy as np
import pytest

import lime_fast


def test_edit_caches_engines_and_returns_everything(tiny_dir, shapes, fast, tmp_path, monkeypatch):
    lime_fast._ENGINES.clear()
    loads = []
    original = lime_fast.LimeEngine.from_pretrained.__func__

    def counting(cls, *a, **kw):
        loads.append(a)
        return original(cls, *a, **kw)

    monkeypatch.setattr(lime_fast.LimeEngine, "from_pretrained", classmethod(counting))
    r1 = lime_fast.edit(shapes, "make the red circle blue", model=str(tiny_dir), progress=False, **fast)
    r2 = lime_fast.edit(np.asarray(shapes), "turn the blue square green", model=str(tiny_dir), progress=False, **fast)
    assert len(loads) == 1  # the second call reuses the loaded engine
    assert r1.image.size == r2.image.size == shapes.size
    assert r1.tokens == ["red", "circle", "blue"] and r2.tokens == ["blue", "square", "green"]
    paths = r1.save_pictures(tmp_path, prefix="x_")
    assert sorted(p.name for p in paths.values()) == sorted(f"x_{n}.png" for n in ("roi", "overlay", "segments", "segment_ids", "heatmap", "panel"))
    lime_fast._ENGINES.clear()


def test_edit_accepts_a_loaded_engine(engine, shapes, fast):
    r = lime_fast.edit(shapes, "make the red circle blue", model=engine, progress=False, **fast)
    assert r.unet_evals == fast["capture_step"] + 1 + fast["steps"]


def test_source_checkout_without_install_finds_the_kernels(tmp_path):
    """PYTHONPATH=<checkout> with no pip install (as on the GPU machine): lime_fast.kernels still imports."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(lime_fast.__file__).resolve().parents[1]
    for name in ("lime_fast", "kernels"):
        shutil.copytree(root / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import lime_fast, lime_fast.kernels.reference as r\n"
        "print(lime_fast.__file__); print(r.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "lime_fast" / "__init__.py"), str(tmp_path / "kernels" / "reference.py")]


def test_engine_options_key_the_cache_and_reach_the_engine(tiny_dir, shapes, fast, monkeypatch):
    """Engines loaded by name: one per (model, device, dtype, EngineOptions), least recently used dropped
    beyond ENGINE_CACHE_SIZE; engine options given as plain keywords reach the engine."""
    from lime_fast import api

    lime_fast._ENGINES.clear()
    monkeypatch.setattr(api, "ENGINE_CACHE_SIZE", 1)
    a = lime_fast.get_engine(str(tiny_dir), device="cpu")
    assert lime_fast.get_engine(str(tiny_dir), device="cpu", options=lime_fast.EngineOptions()) is a
    lime_fast.edit(shapes, "make the red circle blue", model=str(tiny_dir), device="cpu", cache_kv=False, progress=False, **fast)
    (b,) = lime_fast._ENGINES.values()  # the default-options engine was dropped: the cache holds one
    assert b is not a and b.options.cache_kv is False and b.controller.cache_kv is False
    with pytest.raises(TypeError, match="unknown engine option"):
        lime_fast.EngineOptions.of(cash_kv=False)
    lime_fast._ENGINES.clear()


def test_a_held_pipelines_engines_live_on_the_pipeline(tiny_dir):
    """No process-wide table keyed by id(pipe): the engines of a pipeline the caller holds are kept on it,
    one per EngineOptions, and go with it."""
    import gc
    import weakref

    from lime_fast import LimeEngine

    pipe = LimeEngine.from_pretrained(tiny_dir, device="cpu").pipe
    first = lime_fast.get_engine(pipe)
    second = lime_fast.get_engine(pipe, cache_kv=False)
    assert lime_fast.get_engine(pipe) is first and second is not first
    # both edit the one UNet: each puts its own attention processors back before editing
    fast = dict(steps=3, capture_step=0, reg_steps=(0, 2), grid_size=32, top_k=8)
    img = np.zeros((64, 64, 3), np.uint8)
    a = first.edit(img, "make the red circle blue", progress=False, **fast)
    assert all(p.ctl is first.controller for p in pipe.unet.attn_processors.values())
    b = second.edit(img, "make the red circle blue", progress=False, **fast)
    assert all(p.ctl is second.controller for p in pipe.unet.attn_processors.values())
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))  # the K/V cache is exact
    assert first.controller.cache_kv and not second.controller.cache_kv
    del second
    gone = weakref.ref(first)
    del pipe, first
    gc.collect()
    assert gone() is None


def test_every_error_the_package_raises_on_purpose_is_a_lime_error():
    for name in ("ModelLoadError", "ConfigError", "NonFiniteLatentsError", "BatchError", "UnsupportedModeError"):
        assert issubclass(getattr(lime_fast, name), lime_fast.LimeError), name
    assert issubclass(lime_fast.ConfigError, ValueError) and issubclass(lime_fast.ModelLoadError, RuntimeError)
