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
    assert sorted(p.name for p in paths.values()) == sorted(f"x_{n}.png" for n in ("roi", "overlay", "segments", "heatmap", "panel"))
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
