"""Every combination of the edit command's output-shaping flags (--mask: none, all-True, all-False, soft;
--save-roi; --then; --roi-words) on SD 1.5 and SDXL layouts, and batch rows with and without masks with
and without --save-roi: each run writes exactly the files it planned (and exit 0), none left out, none
extra; a combination that cannot run is refused before the model loads and writes nothing. The
expected files are written out here from the rules, not read from the code that plans them."""

import itertools
import json

import numpy as np
import PIL.Image
import pytest

from lime_fast.cli import main

FAST = ["--steps", "2", "--capture-step", "0", "--top-k", "5", "--quiet"]
LOCALIZED = {"roi", "overlay", "segments", "segment_ids", "heatmap", "panel"}  # a turn that found its own RoI
MASKED = {"roi", "overlay", "panel"}  # a turn with the user's mask: no segments or heatmap exist
MASKS = {"full": np.full((32, 32), 255, np.uint8), "empty": np.zeros((32, 32), np.uint8),
         "soft": np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))}
SD15 = list(itertools.product([None, "full", "empty", "soft"], [False, True], [False, True], [False, True]))
SDXL = [(m, s, t, False) for m, s, t in itertools.product([None, "full"], [False, True], [False, True])]


def expected_files(tmp_path, mask, save_roi, then) -> set:
    files = {"out.png"} | ({"out.turn1.png"} if then else set())
    if save_roi:
        turns = [("roi/turn1", mask), ("roi/turn2", None)] if then else [("roi", mask)]
        for folder, turn_mask in turns:
            files |= {f"{folder}/{name}.png" for name in (MASKED if turn_mask else LOCALIZED)}
    return files


def written(tmp_path) -> set:
    skip = {"in.png", "m.png"}
    return {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file() and p.name not in skip}


def run_edit(tmp_path, model_dir, shapes, mask, save_roi, then, roi_words) -> int:
    shapes.save(tmp_path / "in.png")
    argv = ["edit", str(tmp_path / "in.png"), "make the red circle blue", "-o", str(tmp_path / "out.png"),
            "--model", str(model_dir), *FAST]
    if mask:
        PIL.Image.fromarray(MASKS[mask]).save(tmp_path / "m.png")
        argv += ["--mask", str(tmp_path / "m.png")]
    argv += ["--save-roi", str(tmp_path / "roi")] if save_roi else []
    argv += ["--then", "turn the circle green"] if then else []
    argv += ["--roi-words", "circle"] if roi_words else []
    return main(argv)


@pytest.mark.parametrize("mask, save_roi, then, roi_words", SD15, ids=lambda v: str(v))
def test_edit_flags_on_sd15(tmp_path, tiny_dir, shapes, mask, save_roi, then, roi_words, capsys):
    assert run_edit(tmp_path, tiny_dir, shapes, mask, save_roi, then, roi_words) == 0, capsys.readouterr().err
    assert written(tmp_path) == expected_files(tmp_path, mask, save_roi, then)


@pytest.mark.parametrize("mask, save_roi, then, roi_words", SDXL, ids=lambda v: str(v))
def test_edit_flags_on_sdxl(tmp_path, sdxl_dir, shapes, mask, save_roi, then, roi_words, capsys):
    assert run_edit(tmp_path, sdxl_dir, shapes, mask, save_roi, then, roi_words) == 0, capsys.readouterr().err
    assert written(tmp_path) == expected_files(tmp_path, mask, save_roi, then)


@pytest.mark.parametrize("model", ["tiny_dir", "sdxl_dir"])
@pytest.mark.parametrize("save_roi", [False, True])
def test_batch_rows_with_and_without_masks(request, tmp_path, shapes, model, save_roi, capsys):
    shapes.save(tmp_path / "in.png")
    PIL.Image.fromarray(MASKS["soft"]).save(tmp_path / "m.png")
    rows = [{"id": "auto", "image": "in.png", "instruction": "make the red circle blue"},
            {"id": "masked", "image": "in.png", "instruction": "make the red circle blue", "mask": "m.png"},
            {"id": "empty", "image": "in.png", "instruction": "make it red", "mask": "m.png", "roi_words": ["it"]}]
    (tmp_path / "job.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["batch", str(tmp_path / "job.jsonl"), "--out", str(tmp_path / "out"), "--model",
            str(request.getfixturevalue(model)), "--steps", "2", "--capture-step", "0", "--top-k", "5", "--quiet"]
    assert main(argv + (["--save-roi"] if save_roi else [])) == 0, capsys.readouterr().err
    images = {f"out/images/{r['id']}.png" for r in rows}
    rois = {f"out/roi/{r['id']}.png" for r in rows} if save_roi else set()
    assert {f for f in written(tmp_path) if f.endswith(".png")} - {"in.png", "m.png"} == images | rois


def test_a_roi_word_missing_from_a_later_turn_is_refused_before_loading(tmp_path, tiny_dir, shapes, monkeypatch, capsys):
    import lime_fast

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lime_fast, "get_engine", no_load)
    shapes.save(tmp_path / "in.png")
    argv = ["edit", str(tmp_path / "in.png"), "make the red circle blue", "-o", str(tmp_path / "out.png"), "--model",
            str(tiny_dir), "--save-roi", str(tmp_path / "roi"), "--then", "turn the square green", "--roi-words", "circle",
            *FAST]
    assert main(argv) == 2
    assert "roi word 'circle' is not in the instruction 'turn the square green'" in capsys.readouterr().err
    assert written(tmp_path) == set()
