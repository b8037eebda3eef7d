"""The lime-fast command line: edit, --save-roi, --force, errors, and the offline demo."""

import numpy as np
import PIL.Image
import pytest

import lime_fast
from lime_fast.cli import main


@pytest.fixture
def photo(tmp_path, shapes):
    path = tmp_path / "in.png"
    shapes.save(path)
    return path


FAST_ARGS = ["--steps", "3", "--top-k", "5", "--quiet"]


def test_edit_writes_output_and_pictures(tmp_path, photo, tiny_dir, capsys):
    out, roi_dir = tmp_path / "out.png", tmp_path / "roi"
    rc = main(["edit", str(photo), "make the red circle blue", "-o", str(out), "--model", str(tiny_dir), "--save-roi", str(roi_dir), *FAST_ARGS])
    assert rc == 0
    assert PIL.Image.open(out).size == (128, 128)
    for name in ("roi", "overlay", "segments", "heatmap", "panel"):
        assert (roi_dir / f"{name}.png").is_file(), name
    assert PIL.Image.open(roi_dir / "roi.png").size == (128, 128)
    assert "red, circle, blue" in capsys.readouterr().out


def test_existing_output_needs_force(tmp_path, photo, tiny_dir, capsys):
    out = tmp_path / "out.png"
    out.write_bytes(b"keep me")
    rc = main(["edit", str(photo), "make it red", "-o", str(out), "--model", str(tiny_dir), *FAST_ARGS])
    assert rc == 2 and out.read_bytes() == b"keep me"
    assert "--force" in capsys.readouterr().err
    mask = tmp_path / "m.png"
    PIL.Image.fromarray(np.full((32, 32), 255, np.uint8)).save(mask)
    rc = main(["edit", str(photo), "make it red", "-o", str(out), "--model", str(tiny_dir), "--mask", str(mask), "--force", *FAST_ARGS])
    assert rc == 0 and out.read_bytes() != b"keep me"


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.png", "make it red"], "no such file"),
        (["{photo}", ""], "instruction is empty"),
        (["{photo}", "make it red", "--steps", "0"], "steps"),
        (["{photo}", "make it red", "--mask", "missing-mask.png"], "no such file"),
        (["{photo}", "make it red", "--text-guidance", "-2"], "negative"),
    ],
)
def test_bad_input_fails_before_loading_or_writing(tmp_path, photo, args, message, capsys):
    out = tmp_path / "never.png"
    args = [a.format(photo=photo) for a in args]
    rc = main(["edit", *args[:2], "-o", str(out), "--model", "/nonexistent/model", *args[2:]])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "model" not in err.split("error:")[1].split()[0]
    assert not out.exists()


def test_unknown_output_format(tmp_path, photo, capsys):
    assert main(["edit", str(photo), "make it red", "-o", str(tmp_path / "out.xyz")]) == 2
    assert "extension" in capsys.readouterr().err


def test_missing_model_is_one_clear_line(tmp_path, photo, capsys):
    rc = main(["edit", str(photo), "make it red", "-o", str(tmp_path / "o.png"), "--model", "nobody/no-such-model", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "nobody/no-such-model" in err and "Traceback" not in err


def test_demo_runs_offline_and_says_which_model(tmp_path, capsys):
    lime_fast._ENGINES.clear()
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "shapes-ip2p" in text and "L1 to the target" in text
    for name in ("input", "target", "edited", "roi", "overlay", "segments", "heatmap", "panel"):
        assert (out / f"{name}.png").is_file(), name
    assert main(["demo", "--out", str(out), "--quiet"]) == 2  # refuses to overwrite
    lime_fast._ENGINES.clear()
