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
