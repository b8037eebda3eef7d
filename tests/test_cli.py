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
    assert "shapes-ip2p" in text and "L1 to the target" in text and "InstructPix2Pix:" in text and "IoU" in text
    for name in ("input", "target", "ip2p", "edited", "roi", "overlay", "segments", "heatmap", "panel"):
        assert (out / f"{name}.png").is_file(), name
    # the plain InstructPix2Pix edit is a different picture from lime_fast's (its RoI is not empty here)
    assert not np.array_equal(np.asarray(PIL.Image.open(out / "ip2p.png")), np.asarray(PIL.Image.open(out / "edited.png")))
    assert PIL.Image.open(out / "panel.png").width > 6 * PIL.Image.open(out / "panel.png").height  # seven pictures
    assert main(["demo", "--out", str(out), "--quiet"]) == 2  # refuses to overwrite
    lime_fast._ENGINES.clear()


def _edit_args(photo, out, *extra, model="/nonexistent/model"):
    return ["edit", str(photo), "make it red", "-o", str(out), "--model", model, "--quiet", *extra]


def test_output_problems_are_found_before_any_model_work(tmp_path, photo, capsys):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert main(_edit_args(photo, folder, "--force")) == 2
    assert "is a folder" in capsys.readouterr().err
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert main(_edit_args(photo, tmp_path / "o.png", "--save-roi", str(afile))) == 2  # --save-roi names a file
    assert "is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
    assert main(_edit_args(photo, afile / "o.png")) == 2  # a parent that is a file
    assert "not a folder" in capsys.readouterr().err


def test_read_only_output_folder(tmp_path, photo, capsys):
    """A folder the process cannot write into is refused before any model work. As root, permission
    bits do not stop writes, so a read-only folder of the system (sysfs) stands in when needed."""
    import os
    import tempfile
    from pathlib import Path

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root
            ro = Path("/sys")
            try:
                tempfile.TemporaryFile(dir=ro).close()
                pytest.skip("no read-only folder to test with on this machine")
            except OSError:
                pass
        assert main(_edit_args(photo, ro / "out.png")) == 2
        err = capsys.readouterr().err
        assert "not writable" in err and "Traceback" not in err
    finally:
        (tmp_path / "ro").chmod(0o755)


@pytest.mark.parametrize("device, message", [("tpu9", "unknown device"), ("cuda", "CUDA is not available")])
def test_bad_device_is_one_clear_error(tmp_path, photo, tiny_dir, device, message, capsys):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(_edit_args(photo, tmp_path / "o.png", "--device", device, model=str(tiny_dir)))
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_ctrl_c_during_an_edit_writes_nothing(tmp_path, photo, tiny_dir, monkeypatch, capsys):
    from lime_fast.engine import LimeEngine

    def interrupted(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(LimeEngine, "edit", interrupted)
    out, roi = tmp_path / "o.png", tmp_path / "roi"
    assert main(_edit_args(photo, out, "--save-roi", str(roi), model=str(tiny_dir))) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and err.count("\n") == 1
    assert not out.exists() and not roi.exists()


def test_outputs_are_written_all_or_nothing(tmp_path, monkeypatch):
    from lime_fast import io

    good = PIL.Image.new("RGB", (4, 4))

    class Broken:
        def save(self, f, format=None):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.save_all({tmp_path / "a.png": good, tmp_path / "b.png": Broken()})
    assert list(tmp_path.iterdir()) == []  # neither the finished first file nor any temporary


def test_errors_come_before_importing_torch(tmp_path):
    """A typo or a missing file is reported without importing torch or diffusers (seconds each)."""
    import subprocess
    import sys

    code = ("import sys; from lime_fast.cli import main; "
            f"rc = main(['edit', {str(tmp_path / 'missing.png')!r}, 'make it red', '-o', {str(tmp_path / 'o.png')!r}]); "
            "print(rc, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["2", "False", "False"], out.stderr
    assert "no such file" in out.stderr


def test_strict_refuses_a_stretched_mask(tmp_path, photo, capsys):
    mask = tmp_path / "wide.png"
    PIL.Image.new("L", (64, 16), 255).save(mask)
    rc = main(_edit_args(photo, tmp_path / "o.png", "--mask", str(mask), "--strict"))
    err = capsys.readouterr().err
    assert rc == 2 and "stretched" in err and "error:" in err  # refused before the (missing) model


def test_every_config_field_is_a_flag(tmp_path, photo, tiny_dir, monkeypatch):
    """The CLI's flags are generated from EditConfig: all fields, parsed to their types, and only the
    flags given override the model's defaults."""
    import dataclasses

    from lime_fast.cli import _parser, config_overrides, model_config

    args = _parser().parse_args(["edit", "a.png", "x", "-o", "o.png", "--reg-steps", "0", "5", "--feature-levels", "0", "1",
                                 "--roi-words", "red", "car", "--kmeans-tol", "0.01", "--capture-step", "3"])
    over = config_overrides(args)
    assert over == dict(reg_steps=(0, 5), feature_levels=(0, 1), roi_words=("red", "car"), kmeans_tol=0.01, capture_step=3)
    help_text = _parser()._subparsers._group_actions[0].choices["edit"].format_help()
    for f in dataclasses.fields(lime_fast.EditConfig):
        assert "--" + f.name.replace("_", "-") in help_text, f.name
    assert model_config("shapes-ip2p", {}).steps == 20 and model_config("shapes-ip2p", {"steps": 7}).steps == 7
    assert model_config(str(tiny_dir), {}) == lime_fast.EditConfig()


def test_shipped_model_shrinks_large_pictures_to_its_size_and_warns_past_it(tmp_path, capsys):
    big = tmp_path / "big.png"
    PIL.Image.new("RGB", (256, 256), (200, 180, 160)).save(big)
    rc = main(["edit", str(big), "make the background blue", "-o", str(tmp_path / "o.png"), "--model", "shapes-ip2p",
               "--quiet", "--steps", "2", "--capture-step", "0"])
    err = capsys.readouterr().err  # the model's own max_side is what it was trained at: shrunk, not garbled
    assert rc == 0 and "long side at 64 pixels" in err and "trained on" not in err
    assert PIL.Image.open(tmp_path / "o.png").size == (256, 256)
    rc = main(["edit", str(big), "make the background blue", "-o", str(tmp_path / "o1.png"), "--model", "shapes-ip2p",
               "--quiet", "--steps", "2", "--capture-step", "0", "--max-side", "256"])
    assert rc == 0 and "trained on 64 x 64" in capsys.readouterr().err
    rc = main(["edit", str(big), "make the background blue", "-o", str(tmp_path / "o2.png"), "--model", "shapes-ip2p",
               "--max-side", "256", "--strict"])
    assert rc == 2 and not (tmp_path / "o2.png").exists()


@pytest.mark.parametrize("mask", ["full", "empty", "soft"])
@pytest.mark.parametrize("then", [False, True])
def test_a_user_mask_with_save_roi_writes_what_the_edit_produces(tmp_path, photo, tiny_dir, mask, then, capsys):
    """With --mask the first turn has no localization: --save-roi writes its roi, overlay and panel (no
    segments or heatmap, so nothing is promised that cannot be written); a --then turn localizes."""
    m = {"full": np.full((32, 32), 255, np.uint8), "empty": np.zeros((32, 32), np.uint8),
         "soft": np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))}[mask]
    PIL.Image.fromarray(m).save(tmp_path / "m.png")
    out, roi_dir = tmp_path / "out.png", tmp_path / "roi"
    argv = ["edit", str(photo), "make the red circle blue", "-o", str(out), "--model", str(tiny_dir), "--mask",
            str(tmp_path / "m.png"), "--save-roi", str(roi_dir), *FAST_ARGS] + (["--then", "turn it green"] if then else [])
    assert main(argv) == 0, capsys.readouterr().err
    first = roi_dir / "turn1" if then else roi_dir
    assert sorted(p.name for p in first.iterdir()) == ["overlay.png", "panel.png", "roi.png"]
    if then:
        assert sorted(p.name for p in (roi_dir / "turn2").iterdir()) == [f"{n}.png" for n in sorted(("roi", "overlay", "segments", "segment_ids", "heatmap", "panel"))]
        assert (tmp_path / "out.turn1.png").is_file()
    assert out.is_file()


@pytest.mark.parametrize("case", ["output is the save-roi roi.png", "output is the input", "output is the mask"])
def test_outputs_that_collide_are_refused_before_any_work(tmp_path, photo, case, capsys, monkeypatch):
    import lime_fast.api

    monkeypatch.setattr(lime_fast.api, "get_engine", lambda *a, **k: pytest.fail("the model must not load"))
    mask = tmp_path / "m.png"
    PIL.Image.fromarray(np.full((32, 32), 255, np.uint8)).save(mask)
    out = {"output is the save-roi roi.png": tmp_path / "roi" / "roi.png", "output is the input": photo,
           "output is the mask": mask}[case]
    before = {p: p.read_bytes() for p in (photo, mask)}
    argv = ["edit", str(photo), "make it red", "-o", str(out), "--mask", str(mask), "--save-roi", str(tmp_path / "roi"),
            "--force", "--model", "shapes-ip2p", *FAST_ARGS]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert ("two outputs" in err) if case.endswith("roi.png") else ("is the input" in err)
    assert all(p.read_bytes() == b for p, b in before.items()) and not (tmp_path / "roi").exists()


# --- segment ids and sessions (lime_fast/session.py) -----------------------------------------------


def _session_edit(photo, out, model, *extra):
    return ["edit", str(photo), "make the red circle blue", "-o", str(out), "--model", str(model), *FAST_ARGS, *extra]


def test_save_roi_writes_a_segment_map_with_ids(tmp_path, photo, tiny_dir):
    roi_dir = tmp_path / "roi"
    assert main(_session_edit(photo, tmp_path / "o.png", tiny_dir, "--save-roi", str(roi_dir))) == 0
    ids = PIL.Image.open(roi_dir / "segment_ids.png")
    plain = PIL.Image.open(roi_dir / "segments.png")
    assert ids.width >= 384 and ids.height > ids.width  # enlarged, with a legend below
    assert np.asarray(ids).std() > 0 and plain.size == (128, 128)


def test_session_rerun_with_a_corrected_region(tmp_path, photo, tiny_dir, capsys):
    import lime_fast

    first, sess = tmp_path / "first.png", tmp_path / "sess"
    assert main(_session_edit(photo, first, tiny_dir, "--save-session", str(sess))) == 0
    assert all((sess / f).is_file() for f in ("session.json", "localization.npz", "segment_ids.png"))
    assert "--session" in capsys.readouterr().out
    # the same region again: the first edit's image, bit for bit, without a localization pass
    same = tmp_path / "same.png"
    assert main(_session_edit(photo, same, tiny_dir, "--session", str(sess))) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(same)), np.asarray(PIL.Image.open(first)))
    # the API's refinement of the same edit gives the CLI's corrected image
    seg = np.load(sess / "localization.npz")["segments"]
    roi = np.load(sess / "localization.npz")["roi"]
    add = next(int(i) for i in np.unique(seg) if not roi[seg == i].any())
    fixed, pics = tmp_path / "fixed.png", tmp_path / "pics"
    assert main(_session_edit(photo, fixed, tiny_dir, "--session", str(sess), "--add", str(add), "--save-roi", str(pics))) == 0
    assert f"added [{add}]" in capsys.readouterr().out
    engine = lime_fast.get_engine(str(tiny_dir), device="cpu")
    auto = engine.edit(PIL.Image.open(photo), "make the red circle blue", steps=3, top_k=5, progress=False)
    assert np.array_equal(auto.segments, seg)
    assert np.array_equal(np.asarray(PIL.Image.open(fixed)), np.asarray(auto.refine(add=add).image))
    assert (pics / "segment_ids.png").is_file()
    # exactly some segments; a painted mask replaces the region like --mask on a plain edit
    assert main(_session_edit(photo, tmp_path / "only.png", tiny_dir, "--session", str(sess), "--segments", f"{add}")) == 0
    mask = tmp_path / "m.png"
    PIL.Image.fromarray(np.pad(np.full((40, 40), 255, np.uint8), 44)).save(mask)
    via_session, direct = tmp_path / "ms.png", tmp_path / "md.png"
    assert main(_session_edit(photo, via_session, tiny_dir, "--session", str(sess), "--mask", str(mask))) == 0
    assert main(_session_edit(photo, direct, tiny_dir, "--mask", str(mask))) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(via_session)), np.asarray(PIL.Image.open(direct)))


def test_session_refuses_another_model_setting_image_or_instruction(tmp_path, photo, tiny_dir, tiny_dir_heads, capsys):
    sess = tmp_path / "sess"
    assert main(_session_edit(photo, tmp_path / "a.png", tiny_dir, "--save-session", str(sess))) == 0
    capsys.readouterr()
    other = tmp_path / "other.png"
    PIL.Image.open(photo).transpose(PIL.Image.FLIP_LEFT_RIGHT).save(other)
    cases = [
        (_session_edit(photo, tmp_path / "x.png", tiny_dir_heads, "--session", str(sess)), "written with the model"),
        (_session_edit(photo, tmp_path / "x.png", tiny_dir, "--session", str(sess), "--seed", "7"), "seed=42"),
        (_session_edit(other, tmp_path / "x.png", tiny_dir, "--session", str(sess)), "not the one"),
        (["edit", str(photo), "make it green", "-o", str(tmp_path / "x.png"), "--session", str(sess), *FAST_ARGS],
         "for the instruction"),
        (_session_edit(photo, tmp_path / "x.png", tiny_dir, "--session", str(sess), "--add", "99"), "no segment 99"),
        (_session_edit(photo, tmp_path / "x.png", tiny_dir, "--session", str(sess), "--add", "a"), "segment ids"),
        (_session_edit(photo, tmp_path / "x.png", tiny_dir, "--session", str(tmp_path)), "no session"),
        (_session_edit(photo, tmp_path / "x.png", tiny_dir, "--add", "1"), "give --session"),
        (_session_edit(photo, tmp_path / "x.png", tiny_dir, "--save-session", str(sess)), "refusing to overwrite"),
    ]
    for args, message in cases:
        assert main(args) == 2, message
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x.png").exists()
    (sess / "localization.npz").write_bytes(b"broken")
    assert main(_session_edit(photo, tmp_path / "x.png", tiny_dir, "--session", str(sess))) == 2
    assert "damaged" in capsys.readouterr().err
