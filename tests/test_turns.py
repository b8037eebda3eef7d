"""Multi-turn editing: lime_fast.edit_turns and `lime-fast edit ... --then ...`."""

import numpy as np
import PIL.Image
import pytest

import lime_fast
from lime_fast.cli import main

CFG = dict(steps=3, capture_step=1, reg_steps=(0, 2), grid_size=16, top_k=4)


def test_each_turn_edits_the_previous_output(engine, shapes):
    img = shapes.resize((64, 64))
    turns = lime_fast.edit_turns(img, ["make the red circle blue", "turn the square green"], model=engine,
                                 progress=False, **CFG)
    assert len(turns) == 2
    one = engine.edit(img, "make the red circle blue", progress=False, **CFG)
    two = engine.edit(one.image, "turn the square green", progress=False, **CFG)
    assert np.array_equal(np.asarray(turns[0].image), np.asarray(one.image))
    assert np.array_equal(np.asarray(turns[1].input_image), np.asarray(one.image))
    assert np.array_equal(np.asarray(turns[1].image), np.asarray(two.image))
    assert turns[1].tokens == ["square", "green"]
    # a per-turn mask: an empty one makes that turn plain InstructPix2Pix
    with pytest.warns(lime_fast.LimeWarning, match="empty"):
        plain = lime_fast.edit_turns(img, ["make the red circle blue", "turn the square green"], model=engine,
                                     masks=[None, np.zeros((64, 64), bool)], progress=False, **CFG)
    assert np.array_equal(np.asarray(plain[0].image), np.asarray(one.image)) and not plain[1].roi_mask.any()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(instructions="make it red"), TypeError, "list of strings"),
    (dict(instructions=[]), ValueError, "at least one turn"),
    (dict(instructions=["make it red", "  "]), ValueError, "instruction is empty"),
    (dict(instructions=["a", "b"], masks=[None]), ValueError, "1 masks for 2"),
    (dict(instructions=["make it red"], steps=0), ValueError, "steps"),
])
def test_bad_turns_fail_before_loading(shapes, kwargs, error, message):
    with pytest.raises(error, match=message):
        lime_fast.edit_turns(shapes, model="/nonexistent/model", **kwargs)


def test_cli_then_writes_every_turn(tmp_path, tiny_dir, shapes, capsys):
    src = tmp_path / "in.png"
    shapes.resize((64, 64)).save(src)
    out, roi = tmp_path / "out.png", tmp_path / "roi"
    args = ["edit", str(src), "make the red circle blue", "--then", "turn the square green", "-o", str(out),
            "--steps", "3", "--top-k", "4", "--quiet"]
    assert main(args + ["--model", str(tiny_dir), "--save-roi", str(roi)]) == 0
    first = tmp_path / "out.turn1.png"
    assert PIL.Image.open(first).size == PIL.Image.open(out).size == (64, 64)
    assert (roi / "turn1" / "roi.png").is_file() and (roi / "turn2" / "panel.png").is_file()
    text = capsys.readouterr().out
    assert str(first) in text and "square, green" in text
    # an existing intermediate turn is refused before any model work
    out.unlink()
    assert main(args + ["--model", "/nonexistent/model"]) == 2
    assert "out.turn1.png" in capsys.readouterr().err and not out.exists()


def _fail_on_call(monkeypatch, n, error):
    """LimeEngine.edit raises ``error`` on its n-th call (1-based); the others run."""
    from lime_fast.engine import LimeEngine

    real, calls = LimeEngine.edit, []

    def edit(self, *a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(self, *a, **kw)

    monkeypatch.setattr(LimeEngine, "edit", edit)


def test_a_failing_turn_keeps_the_finished_ones(engine, shapes, monkeypatch):
    img = shapes.resize((64, 64))
    seen = []
    _fail_on_call(monkeypatch, 3, ValueError("turn three broke"))
    with pytest.raises(lime_fast.TurnError, match="turn 3 of 4 failed.*turn three broke") as e:
        lime_fast.edit_turns(img, ["make the red circle blue", "turn the square green", "make it red", "make it blue"],
                             model=engine, progress=False, on_turn=lambda t, r: seen.append((t, r)), **CFG)
    assert e.value.turn == 3 and len(e.value.results) == 2 and isinstance(e.value.__cause__, ValueError)
    assert [t for t, _ in seen] == [1, 2] and seen[1][1] is e.value.results[1]
    assert np.array_equal(np.asarray(e.value.results[1].input_image), np.asarray(e.value.results[0].image))


def test_a_failing_first_turn_raises_its_own_error(engine, shapes, monkeypatch):
    _fail_on_call(monkeypatch, 1, ValueError("first broke"))
    with pytest.raises(ValueError, match="first broke"):
        lime_fast.edit_turns(shapes, ["make it red", "make it blue"], model=engine, progress=False, **CFG)


@pytest.mark.parametrize("error, rc, message", [(KeyboardInterrupt(), 130, "interrupted"),
                                                (ValueError("turn three broke"), 2, "turn 3 of 3 failed")])
def test_cli_then_writes_each_turn_as_it_finishes(tmp_path, tiny_dir, shapes, monkeypatch, capsys, error, rc, message):
    """A Ctrl-C or a failure in turn 3 keeps turns 1 and 2 (written when they finished) and says so."""
    src = tmp_path / "in.png"
    shapes.resize((64, 64)).save(src)
    out, roi = tmp_path / "out.png", tmp_path / "roi"
    _fail_on_call(monkeypatch, 3, error)
    assert main(["edit", str(src), "make the red circle blue", "--then", "turn the square green", "--then", "make it red",
                 "-o", str(out), "--steps", "3", "--top-k", "4", "--quiet", "--model", str(tiny_dir),
                 "--save-roi", str(roi)]) == rc
    captured = capsys.readouterr()
    assert message in captured.err and "turns 1-2 of 3 were written" in captured.err
    assert (tmp_path / "out.turn1.png").is_file() and (tmp_path / "out.turn2.png").is_file() and not out.exists()
    assert (roi / "turn2" / "panel.png").is_file() and not (roi / "turn3").exists()
    assert str(tmp_path / "out.turn2.png") in captured.out
