"""One mask reader for every entry point: the same mask files, read with each ``mask_convention`` by the
API (``load_mask``, ``EditInputs.build`` as ``lime_fast.edit`` and ``LimeEngine.edit_batch`` call it), the
CLI's argument path, batch manifests (checking and the runner), ``lime-fast eval``'s dataset reader and
the service's upload decoding, must give the same bool array (or the same refusal)."""

import io
import json
import warnings

import numpy as np
import PIL.Image
import pytest

from lime_fast.config import MASK_CONVENTIONS, EditConfig
from lime_fast.errors import MaskError
from lime_fast.inputs import EditInputs, load_mask

SIZE = 32


def _region() -> np.ndarray:
    """The edit region of every mask below: a block, a quarter of the picture."""
    r = np.zeros((SIZE, SIZE), bool)
    r[4:20, 8:24] = True
    return r


def _masks() -> dict:
    """name -> (PIL mask, {convention: expected bool array, or MaskError}). Seeded."""
    rng = np.random.default_rng(7)
    r = _region()
    white = np.where(r, 255, 0).astype(np.uint8)
    photo = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)  # a picture, not paint
    dalle = np.dstack([photo, np.where(r, 0, 255).astype(np.uint8)])  # transparent = edit
    paint = np.zeros((SIZE, SIZE, 4), np.uint8)  # white paint on a transparent (black) canvas
    paint[r] = (255, 255, 255, 255)
    palette = PIL.Image.fromarray(r.astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 255, 255])
    palette.info["transparency"] = 0  # index 0 transparent: white paint (index 1) on nothing
    la = np.dstack([np.full((SIZE, SIZE), 255, np.uint8), white])  # alpha-only white mask
    alpha_opaque = np.dstack([np.dstack([white] * 3), np.full((SIZE, SIZE), 255, np.uint8)])
    gray16 = np.where(r, 65535, 1000).astype(np.uint16)
    no_alpha = {"auto": r, "white": r, "transparent": MaskError, "opaque": MaskError}
    return {
        "L": (PIL.Image.fromarray(white, "L"), no_alpha),
        "1": (PIL.Image.fromarray(white, "L").convert("1"), no_alpha),
        "RGB": (PIL.Image.fromarray(np.dstack([white] * 3), "RGB"), no_alpha),
        "P": (PIL.Image.fromarray(white, "L").convert("P"), no_alpha),
        "I;16": (PIL.Image.fromarray(gray16), no_alpha),
        "P+transparency": (palette, {"auto": r, "white": r, "transparent": ~r, "opaque": r}),
        "LA paint": (PIL.Image.fromarray(la, "LA"), {"auto": r, "white": r, "transparent": ~r, "opaque": r}),
        "RGBA DALL-E": (PIL.Image.fromarray(dalle, "RGBA"),
                        {"auto": r, "white": (np.asarray(PIL.Image.fromarray(photo).convert("L")) >= 128) & ~r,
                         "transparent": r, "opaque": ~r}),
        "RGBA paint": (PIL.Image.fromarray(paint, "RGBA"), {"auto": r, "white": r, "transparent": ~r, "opaque": r}),
        "RGBA opaque alpha": (PIL.Image.fromarray(alpha_opaque, "RGBA"),
                              {"auto": r, "white": r, "transparent": np.zeros_like(r), "opaque": np.ones_like(r)}),
    }


def _png(img: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _readers(tmp_path):
    """name -> read(path, convention) -> bool array, one per entry point."""
    from lime_fast.batch import check_files, read_manifest
    from lime_fast.batch.runners import _row_mask
    from lime_fast.cli import _parser
    from lime_fast.evaluate import datasets
    from lime_fast.evaluate.run import _Masks
    from lime_fast.serve.uploads import BadRequest, decode_mask

    image = tmp_path / "image.png"
    PIL.Image.new("RGB", (SIZE, SIZE), (90, 120, 200)).save(image)

    def api(path, c):
        return EditInputs.build([image], ["make it red"], [path], multiple=8, cfg=EditConfig(), mask_convention=c).masks[0]

    def cli(path, c):  # the edit command's arguments, then what _edit does with them
        args = _parser().parse_args(["edit", str(image), "make it red", "-o", str(tmp_path / "o.png"),
                                     "--mask", str(path), "--mask-convention", c])
        return EditInputs.build([args.image], ["make it red"], [args.mask], multiple=8, cfg=EditConfig(),
                                mask_convention=args.mask_convention).masks[0]

    def manifest(path, c, extra):
        m = tmp_path / "rows.jsonl"
        m.write_text(json.dumps({"id": "a", "image": str(image), "instruction": "make it red", "mask": str(path),
                                 "target": str(image), "mask_convention": c, **extra}) + "\n")
        return m

    def batch(path, c):
        m = tmp_path / "batch.jsonl"
        m.write_text(json.dumps({"id": "a", "image": str(image), "instruction": "make it red", "mask": str(path),
                                 "mask_convention": c}) + "\n")
        rows, problems = read_manifest(m)
        if problems:
            raise MaskError(problems[0].error)
        check_files(rows[0])
        return _row_mask(rows[0])

    def evaluation(path, c):
        m = manifest(path, c, {})
        data = datasets.load(m, tmp_path / "ev", mask_convention="auto")
        if data.problems:
            raise MaskError(data.problems[0])
        return _Masks(tmp_path / "ev").array(data.sessions[0].turns[0])

    def evaluation_default(path, c):  # the dataset-level --mask-convention
        m = tmp_path / "ev2.jsonl"
        m.write_text(json.dumps({"id": "a", "image": str(image), "instruction": "make it red", "mask": str(path),
                                 "target": str(image)}) + "\n")
        data = datasets.load(m, tmp_path / "ev2", mask_convention=c)
        return _Masks(tmp_path / "ev2").array(data.sessions[0].turns[0])

    def service(path, c):
        try:
            return decode_mask(path.read_bytes(), (SIZE, SIZE), 10**6, c)
        except BadRequest as e:
            raise MaskError(e.message) from None

    return {"load_mask": lambda p, c: load_mask(p, convention=c), "load_mask PIL": lambda p, c: load_mask(PIL.Image.open(p), convention=c),
            "api": api, "cli": cli, "batch": batch, "eval": evaluation, "eval dataset": evaluation_default, "service": service}


def test_every_entry_point_reads_the_same_masks_alike(tmp_path):
    readers = _readers(tmp_path)
    for name, (img, expected) in _masks().items():
        path = tmp_path / f"{name.replace(' ', '_').replace(';', '')}.png"
        img.save(path)
        for convention in MASK_CONVENTIONS:
            want = expected[convention]
            for reader, read in readers.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the warnings have their own tests
                    if want is MaskError:
                        with pytest.raises(MaskError, match="alpha channel"):
                            read(path, convention)
                        continue
                    got = read(path, convention)
                assert got.dtype == bool and got.shape == (SIZE, SIZE), (name, convention, reader)
                np.testing.assert_array_equal(got, want, err_msg=f"{name} / {convention} / {reader}")


def test_auto_reads_the_common_masks_without_a_warning(tmp_path):
    """White-on-black, DALL-E 2 / MagicBrush and white paint on a transparent canvas are unambiguous."""
    for name, (img, _) in _masks().items():
        if name in ("RGBA opaque alpha",):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_mask(img)


def test_unknown_conventions_are_refused_naming_the_valid_ones(tmp_path):
    from lime_fast.batch import read_manifest
    from lime_fast.cli import _parser
    from lime_fast.evaluate import datasets
    from lime_fast.serve.uploads import BadRequest, mask_convention_field

    img = _masks()["L"][0]
    for bad in ("inverted", "", None, "WHITE"):
        with pytest.raises(MaskError, match="one of auto, white, transparent, opaque"):
            load_mask(img, convention=bad)
        with pytest.raises(MaskError, match="one of auto, white, transparent, opaque"):
            load_mask(np.ones((4, 4), bool), convention=bad)  # checked even where it changes nothing
    with pytest.raises(MaskError, match="mask_convention must be one of"):
        EditInputs.build([np.zeros((8, 8, 3), np.uint8)], ["x"], None, multiple=8, cfg=EditConfig(), mask_convention="x")
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": "a", "image": "i.png", "instruction": "x", "mask_convention": "inverted"}) + "\n")
    rows, problems = read_manifest(m)
    assert not rows and "mask_convention must be one of auto, white, transparent, opaque" in problems[0].error
    with pytest.raises(MaskError):
        datasets.load(m, tmp_path, mask_convention="inverted")
    with pytest.raises(SystemExit):
        _parser().parse_args(["edit", "a.png", "x", "-o", "b.png", "--mask-convention", "inverted"])
    with pytest.raises(BadRequest) as e:
        mask_convention_field({"mask_convention": ["inverted"], "steps": ["2"]})
    assert e.value.status == 400 and "one of auto, white, transparent, opaque" in e.value.message
    fields = {"mask_convention": ["transparent"], "steps": ["2"]}
    assert mask_convention_field(fields) == "transparent" and fields == {"steps": ["2"]}
    assert mask_convention_field({}) == "auto"


def test_arrays_have_no_convention():
    rng = np.random.default_rng(3)
    arr = rng.random((8, 12))
    for mask in (arr, arr >= 0.5, (arr * 255).astype(np.uint8)):
        want = load_mask(mask)
        for convention in MASK_CONVENTIONS:
            np.testing.assert_array_equal(load_mask(mask, convention=convention), want)
