"""Bad input gets a clear error before any model work; odd-but-valid input is converted."""

import io
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import lime_fast
from lime_fast import EditConfig, LimeWarning
from lime_fast.inputs import check_instruction, grid_shape, load_image, load_mask, working_size

NO_MODEL = "/nonexistent/model/folder"  # loading it would fail: errors below must come first


def _edit(image=None, instruction="make the car red", **kw):
    image = np.zeros((64, 64, 3), np.uint8) if image is None else image
    return lime_fast.edit(image, instruction, model=NO_MODEL, progress=False, **kw)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        _edit(tmp_path / "nope.png")
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ValueError, match="cannot read"):
        _edit(bad)
    truncated = tmp_path / "truncated.jpg"
    buf = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, "JPEG")
    truncated.write_bytes(buf.getvalue()[:100])
    with pytest.raises(ValueError, match="cannot read"):
        _edit(truncated)


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((0, 64, 3), np.uint8), "empty"),
        (np.zeros((64,), np.uint8), "shape"),
        (np.zeros((64, 64, 5), np.uint8), "shape"),
        (np.zeros((2, 64, 64, 3), np.uint8), "shape"),
        (np.array([["a"]], dtype=object), "numeric"),
        (np.full((8, 8, 3), 2.0, np.float32), r"\[0, 1\]"),
        (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    ],
)
def test_arrays_that_are_not_images(arr, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _edit(arr)


def test_wrong_image_type():
    with pytest.raises(TypeError, match="PIL.Image"):
        _edit(12345)


def test_zero_size_pil_image():
    with pytest.raises(ValueError, match="empty"):
        load_image(PIL.Image.new("RGB", (0, 10)))


def test_modes_are_converted(tmp_path):
    gray = PIL.Image.new("L", (20, 10), 128)
    assert load_image(gray).mode == "RGB" and load_image(gray).getpixel((0, 0)) == (128, 128, 128)
    rgba = PIL.Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent -> white
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    i16 = PIL.Image.fromarray(np.full((10, 20), 65535, np.uint16))
    assert load_image(i16).getpixel((0, 0)) == (255, 255, 255)
    arr16 = np.full((10, 20, 3), 257 * 100, np.uint16)
    assert load_image(arr16).getpixel((0, 0)) == (100, 100, 100)
    cmyk = PIL.Image.new("CMYK", (20, 10), (0, 255, 255, 0))
    assert load_image(cmyk).getpixel((0, 0)) == (255, 0, 0)
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path)
    assert load_image(path).mode == "RGB"
    chw = torch.rand(3, 10, 20)
    assert load_image(chw).size == (20, 10)
    assert load_image(np.random.rand(10, 20)).size == (20, 10)
    assert load_image(np.zeros((10, 20), bool)).mode == "RGB"


def test_very_large_images():
    with pytest.raises(ValueError, match="maximum side"):
        load_image(PIL.Image.new("L", (20000, 8)))
    with pytest.warns(LimeWarning, match="max_side"):
        assert working_size(4000, 3000, 64, 1024) == (1024, 768)


def test_working_size_and_grid():
    assert working_size(512, 512, 64, 1024) == (512, 512)
    assert working_size(500, 330, 64, 1024) == (512, 320)
    assert working_size(10, 10, 64, 1024) == (64, 64)
    assert grid_shape(512, 512, 128) == (128, 128)
    assert grid_shape(512, 768, 128) == (85, 128)
    assert grid_shape(768, 512, 128) == (128, 85)


@pytest.mark.parametrize("instruction, exc", [("", ValueError), ("   ", ValueError), (None, TypeError), (42, TypeError), (["a"], TypeError)])
def test_bad_instructions(instruction, exc):
    with pytest.raises(exc, match="instruction"):
        _edit(instruction=instruction)


def test_mask_types_and_values():
    m = np.zeros((6, 8), bool)
    m[2:4, 3:6] = True
    for mask in (m, torch.from_numpy(m), PIL.Image.fromarray(m.astype(np.uint8) * 255), m.astype(np.float32),
                 m.astype(np.uint8) * 255, m[None], m[..., None]):
        assert np.array_equal(load_mask(mask), m)
    for bad, exc, match in [
        ("not a file.png", FileNotFoundError, "no such file"),
        (3.5, TypeError, "mask"),
        ([[1, 0]], TypeError, "mask"),
        (np.zeros((4, 4, 3)), ValueError, "single-channel"),
        (np.zeros((0, 4)), ValueError, "empty"),
        (np.array([[np.nan]]), ValueError, "NaN"),
        (np.array([["x"]]), TypeError, "dtype"),
    ]:
        with pytest.raises(exc, match=match):
            _edit(mask=bad)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.5), TypeError, "steps"),
        (dict(capture_step=30), ValueError, "capture_step"),
        (dict(steps=10, capture_step=12), ValueError, "capture_step"),
        (dict(reg_steps=(0, 30)), ValueError, "reg_steps"),
        (dict(reg_steps=(5, 2)), ValueError, "reg_steps"),
        (dict(text_guidance=-1.0), ValueError, "negative"),
        (dict(image_guidance=-0.5), ValueError, "negative"),
        (dict(loc_text_guidance=float("nan")), TypeError, "finite"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(segment_backend="gpu"), ValueError, "segment_backend"),
        (dict(no_such_field=1), TypeError, "no_such_field"),
    ],
)
def test_bad_config(kw, exc, match):
    with pytest.raises(exc, match=match):
        _edit(**kw)


def test_config_defaults_follow_the_spec():
    c = EditConfig()
    assert (c.steps, c.seed, c.text_guidance, c.image_guidance) == (30, 42, 2.0, 1.5)
    assert (c.loc_text_guidance, c.loc_image_guidance, c.capture, c.reg_range) == (5.5, 1.5, 10, (0, 26))
    assert (c.grid_size, c.clusters, c.top_k, c.feature_levels, c.reg_levels) == (128, 8, 100, (1, 2, 3), (0, 1))
    assert (c.kmeans_n_init, c.kmeans_max_iter, c.kmeans_tol, c.segment_backend) == (1, 300, 1e-4, "native")
    assert EditConfig(steps=20).reg_range == (0, 17) and EditConfig(steps=20).capture == 7


def test_valid_input_reaches_the_model_loader():
    """With every input valid, the first error is the loader's: validation really ran first."""
    with pytest.raises(lime_fast.ModelLoadError, match="model_index.json"):
        _edit()


def test_long_instruction_is_truncated_with_a_warning(engine, shapes):
    long = "make the " + " ".join(["very"] * 90) + " red circle blue"
    with pytest.warns(LimeWarning, match="tokens were dropped"):
        r = engine.edit(shapes, long, mask=np.ones((4, 4), bool), steps=1, progress=False)
    assert r.image.size == shapes.size


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stores the sensor's pixels plus an orientation tag: the edit must see (and return)
    the picture the user saw. Orientation 6 = rotate 90 degrees clockwise to display."""
    sensor = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high as stored
    sensor[:, :10] = (255, 0, 0)  # a red band on the stored left edge
    img = PIL.Image.fromarray(sensor)
    exif = img.getexif()
    exif[274] = 6
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif, quality=95)
    for source in (path, PIL.Image.open(path)):
        shown = load_image(source)
        assert shown.size == (20, 40)  # upright: 20 wide, 40 high
        top = np.asarray(shown)[:8].reshape(-1, 3).mean(0)
        assert top[0] > 200 and top[1] < 60, top  # the stored left edge is now on top
        assert shown.getexif().get(274, 1) == 1
    mask = np.zeros((20, 40), np.uint8)
    mask[:, :10] = 255
    mpil = PIL.Image.fromarray(mask)
    mexif = mpil.getexif()
    mexif[274] = 6
    mpath = tmp_path / "mask.png"
    mpil.save(mpath, exif=mexif)
    m = load_mask(mpath)
    assert m.shape == (40, 20) and m[:8].all() and not m[12:].any()


def test_sixteen_bit_pictures_convert_alike_on_every_path(tmp_path):
    """One rule for 16-bit data: full scale 65535 -> 255, whatever the values (a dark 16-bit PNG must
    not be read as 8-bit and brightened)."""
    data = np.array([[0, 100, 257, 20000], [40000, 65535, 255, 12]], np.uint16)
    want = np.round(data / 257.0).astype(np.uint8)
    path = tmp_path / "gray16.png"
    PIL.Image.fromarray(data).save(path)
    assert PIL.Image.open(path).mode.startswith("I")
    for source in (path, PIL.Image.open(path), data, PIL.Image.fromarray(data)):
        got = np.asarray(load_image(source))[..., 0]
        np.testing.assert_array_equal(got, want)
    dark = np.full((4, 4), 200, np.uint16)  # all values below 256: still 16-bit data, so nearly black
    assert np.asarray(load_image(PIL.Image.fromarray(dark))).max() == 1 == np.asarray(load_image(dark)).max()


def test_limits_are_checked_before_decoding(tmp_path, monkeypatch):
    import lime_fast.inputs as inputs

    path = tmp_path / "big.png"
    PIL.Image.new("RGB", (300, 200)).save(path)
    monkeypatch.setattr(inputs, "MAX_INPUT_PIXELS", 50_000)
    decoded = []
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    with pytest.raises(ValueError, match="megapixels"):
        load_image(path)
    assert not decoded  # refused from the header alone
    with pytest.raises(ValueError, match="steps must be <= 1000"):
        _edit(steps=100_000)


@pytest.mark.parametrize("seed, exc", [(2**70, ValueError), (-1, ValueError), (2**64, ValueError), (True, TypeError)])
def test_seed_range_is_checked_up_front(seed, exc):
    with pytest.raises(exc, match="seed"):
        _edit(seed=seed)
    EditConfig(seed=2**64 - 1)  # the largest valid seed


def test_a_folder_is_not_an_image(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        _edit(tmp_path)


def test_roi_words_not_in_the_instruction_fail_before_loading():
    with pytest.raises(ValueError, match="'square' is not in the instruction"):
        _edit(instruction="make the red circle blue", roi_words=["square"])
    with pytest.raises(lime_fast.ModelLoadError):  # present words pass the check and reach the loader
        _edit(instruction="make the red circle blue", roi_words=["Red circle"])


def test_mask_of_another_aspect_ratio_warns_or_is_refused():
    from lime_fast.errors import InputWarning
    from lime_fast.inputs import EditInputs

    cfg = EditConfig()
    image = np.zeros((64, 128, 3), np.uint8)
    with pytest.warns(InputWarning, match="stretched"):
        EditInputs.build([image], ["make it red"], [np.ones((64, 64), bool)], multiple=64, cfg=cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same aspect ratio, other size: resized silently
        EditInputs.build([image], ["make it red"], [np.ones((32, 64), bool)], multiple=64, cfg=cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # what --strict does
        with pytest.raises(InputWarning):
            EditInputs.build([image], ["make it red"], [np.ones((64, 64), bool)], multiple=64, cfg=cfg)


def test_masks_read_alike_from_a_file_and_from_pil(tmp_path):
    """One rule for a mask however it is given: paint on a transparent canvas marks its opaque pixels
    (painted strokes), a plain picture its light pixels; 16-bit masks scale like 16-bit images."""
    strokes = np.zeros((16, 24, 4), np.uint8)  # white strokes on a transparent background
    strokes[4:10, 6:18] = 255
    plain = np.zeros((16, 24), np.uint16)
    plain[2:6] = 65535
    for arr, mode, want in ((strokes, "RGBA", strokes[..., 3] > 0), (plain, None, plain > 0)):
        pil = PIL.Image.fromarray(arr, mode) if mode else PIL.Image.fromarray(arr)
        path = tmp_path / f"mask-{arr.dtype}.png"
        pil.save(path)
        np.testing.assert_array_equal(load_mask(path), want)
        np.testing.assert_array_equal(load_mask(PIL.Image.open(path)), want)
        np.testing.assert_array_equal(load_mask(pil), want)


def _rgba(rgb, alpha) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.dstack([np.broadcast_to(np.asarray(rgb, np.uint8), alpha.shape + (3,)), alpha]), "RGBA")


def test_auto_mask_warns_where_both_readings_are_plausible():
    """``auto`` says which reading it used, and how to choose, where the rule had to guess."""
    from lime_fast.errors import InputWarning

    rng = np.random.default_rng(11)
    small = np.zeros((32, 32), bool)
    small[8:16, 8:16] = True  # 1/16 of the picture
    alpha_of = lambda region: np.where(region, 255, 0).astype(np.uint8)  # noqa: E731
    # dark paint on a transparent canvas: read as paint, but a black backing around a hole reads the other way
    with pytest.warns(InputWarning, match="dark opaque pixels.*opaque = edit.*mask_convention="):
        np.testing.assert_array_equal(load_mask(_rgba((0, 0, 0), alpha_of(small))), small)
    # light paint over most of the image: read as a backing with a transparent hole
    with pytest.warns(InputWarning, match="read as a backing with a transparent hole.*mask_convention="):
        np.testing.assert_array_equal(load_mask(_rgba((255, 255, 255), alpha_of(~small))), small)
    # a picture on a small part of a blank canvas (a cut-out?): transparent = edit, said
    photo = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    photo[~small] = 0
    cutout = PIL.Image.fromarray(np.dstack([photo, alpha_of(small)]), "RGBA")
    with pytest.warns(InputWarning, match="a cut-out"):
        np.testing.assert_array_equal(load_mask(cutout), ~small)
    # an alpha channel without a transparent pixel, bright: read as grayscale, said specifically
    with pytest.warns(InputWarning, match="alpha channel but no transparent pixel.*covers 100%.*mask_convention="):
        assert load_mask(_rgba((250, 250, 250), np.full((32, 32), 255, np.uint8))).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit convention is not a guess
        assert load_mask(_rgba((250, 250, 250), np.full((32, 32), 255, np.uint8)), convention="white").all()
        np.testing.assert_array_equal(load_mask(_rgba((0, 0, 0), alpha_of(small)), convention="opaque"), small)


def test_mask_coverage_warns_once_per_edit_whatever_read_it(tmp_path):
    """An empty mask, or one over 90% of the image, warns when the edit runs (once), not when read."""
    from lime_fast.inputs import MASK_FULL_SHARE, EditInputs

    assert MASK_FULL_SHARE == 0.9
    almost = np.ones((64, 64), bool)
    almost[:4] = False  # 94%
    path = tmp_path / "almost.png"
    PIL.Image.fromarray(almost.astype(np.uint8) * 255).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        job = EditInputs.build([np.zeros((64, 64, 3), np.uint8)], ["make it red"], [path], multiple=64, cfg=EditConfig())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        job.mask_grids()
    assert [str(w.message)[:26] for w in seen] == ["the mask covers 94% of the"]
    assert "mask_convention=" in str(seen[0].message)
    job.masks = [np.zeros((64, 64), bool)]
    with pytest.warns(LimeWarning, match="the mask is empty"):
        job.mask_grids()
