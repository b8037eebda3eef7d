"""The synthetic shapes data (lime_fast.shapes) and the training script (scripts/train_shapes.py)."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from lime_fast.shapes import KINDS, PALETTE, PLURAL, SHAPES, ShapesDataset, make_batch, make_sample, write_magicbrush

ROOT = Path(__file__).resolve().parents[1]
SEEDS = range(100)


@pytest.fixture(scope="module")
def samples():
    return [make_sample(s) for s in SEEDS]


def _arrays(s):
    return np.asarray(s.source), np.asarray(s.target), s.mask


def test_deterministic_from_seed():
    for seed in (0, 7, 12345):
        a, b = make_sample(seed), make_sample(seed)
        for x, y in zip(_arrays(a), _arrays(b)):
            np.testing.assert_array_equal(x, y)
        assert (a.instruction, a.kind, a.target_color, a.meta) == (b.instruction, b.kind, b.target_color, b.meta)
    x, y = make_sample(1), make_sample(2)
    assert not np.array_equal(np.asarray(x.source), np.asarray(y.source))


def test_sizes_and_types(samples):
    s = samples[0]
    assert s.source.mode == s.target.mode == "RGB" and s.source.size == s.target.size == (64, 64)
    assert s.mask.dtype == np.bool_ and s.mask.shape == (64, 64)
    big = make_sample(3, size=96)
    assert big.source.size == (96, 96) and big.mask.shape == (96, 96)


def test_masks_are_exact(samples):
    for s in samples:
        src, tgt, m = (np.asarray(x).astype(int) for x in _arrays(s))
        m = m.astype(bool)
        assert m.any(), s.instruction
        assert (src[~m] == tgt[~m]).all()
        assert (src[m] != tgt[m]).any(-1).all()
        # the edited pixels take the target colour (objects are flat; a background keeps its texture)
        if s.kind != "background":
            assert (tgt[m] == PALETTE[s.target_color]).all()
        else:
            assert m.mean() > 0.3


def test_object_counts_and_overlap(samples):
    counts = [len(s.meta["objects"]) for s in samples]
    assert set(counts) <= {2, 3, 4} and len(set(counts)) == 3
    assert {o["shape"] for s in samples for o in s.meta["objects"]} == set(SHAPES)
    assert len({s.meta["texture"] for s in samples}) >= 4
    # some objects overlap: the union of the objects' pixels in the source is smaller than the sum of their areas
    overlapped = 0
    for s in samples:
        r = [o["radius"] for o in s.meta["objects"]]
        c = np.array([o["center"] for o in s.meta["objects"]])
        d = np.linalg.norm(c[:, None] - c[None], axis=-1)
        overlapped += any(d[i, j] < 0.8 * (r[i] + r[j]) for i in range(len(r)) for j in range(i))
    assert overlapped >= 5


def test_edit_kinds_and_words(samples):
    kinds = {s.kind for s in samples}
    assert kinds == set(KINDS)
    for s in samples:
        text = s.instruction.lower()
        words = text.replace("?", " ").replace(".", " ").split()
        assert s.target_color in words, s.instruction
        objs = s.meta["objects"]
        if s.kind == "background":
            assert "background" in words or "backdrop" in words
            assert s.meta["new_background"] == s.target_color != s.meta["background"]
        elif s.kind == "recolor_kind":
            shape = next(o["shape"] for o in objs if o["new_color"] != o["color"])
            assert shape in words or PLURAL[shape] in words
            edited = [o for o in objs if o["shape"] == shape]
            assert all(o["new_color"] == s.target_color for o in edited)
            assert all(o["new_color"] == o["color"] for o in objs if o["shape"] != shape)
        else:
            changed = [o for o in objs if o["new_color"] != o["color"]]
            assert len(changed) == 1
            o = changed[0]
            assert o["new_color"] == s.target_color != o["color"]
            # the description names the object uniquely
            named_shape = o["shape"] in words
            named_color = o["color"] in words
            assert named_shape or named_color
            matches = [p for p in objs if (not named_shape or p["shape"] == o["shape"]) and (not named_color or p["color"] == o["color"])]
            assert len(matches) == 1, s.instruction
    # several phrasings
    verbs = {s.instruction.lower().split()[0] for s in samples}
    assert len(verbs) >= 6


def test_instruction_content_words_include_target_colour(clip_tok, samples):
    from lime_fast.tokens import token_roles

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warnings: every instruction has content words
        for s in samples:
            roles = token_roles(clip_tok, s.instruction)
            assert s.target_color in roles.content_words, (s.instruction, roles.content_words)
            assert roles.fallback is None
            for w in s.subject.split():
                if w in PALETTE or w in SHAPES or w in PLURAL.values() or w in ("background", "backdrop"):
                    assert w in roles.content_words, (s.instruction, roles.content_words)


def test_write_magicbrush(tmp_path):
    out = write_magicbrush(tmp_path / "mb", range(5, 11))
    lines = [json.loads(x) for x in (out / "instructions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == list(range(5, 11))
    for r in lines:
        assert set(r) >= {"id", "source", "target", "mask", "instruction", "kind"}
        s = make_sample(r["id"])
        assert r["instruction"] == s.instruction and r["kind"] == s.kind
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(out / r["source"])), np.asarray(s.source))
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(out / r["target"])), np.asarray(s.target))
        m = np.asarray(PIL.Image.open(out / r["mask"]))
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
        np.testing.assert_array_equal(m == 255, s.mask)
    assert sorted(p.name for p in (out / "mask").iterdir()) == sorted(f"{i}.png" for i in range(5, 11))


def test_tensors():
    import torch

    b = make_batch([1, 2, 3])
    assert b["source"].shape == b["target"].shape == (3, 3, 64, 64) and b["source"].dtype == torch.float32
    assert b["source"].min() >= -1 and b["source"].max() <= 1
    assert b["mask"].shape == (3, 64, 64) and b["mask"].dtype == torch.bool
    assert len(b["instruction"]) == 3
    ds = ShapesDataset([1, 2, 3])
    assert len(ds) == 3
    item = ds[1]
    assert torch.equal(item["source"], b["source"][1]) and torch.equal(item["mask"], b["mask"][1])
    # masks match the tensors: outside the mask source == target
    assert torch.equal(b["source"].masked_select(~b["mask"][:, None]), b["target"].masked_select(~b["mask"][:, None]))


def test_smoke_training_gives_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "shapes-smoke"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_shapes.py"), "--out", str(out), "--smoke", "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model_index.json", "README.md", "loss.png", "loss.json"):
        assert (out / name).is_file(), name
    assert list((out / "unet").glob("*.safetensors")) and list((out / "vae").glob("*.safetensors"))
    card = (out / "README.md").read_text()
    assert "--vae-steps 3 --unet-steps 3" in card and "python scripts/train_shapes.py" in card
    assert PIL.Image.open(out / "loss.png").size[0] > 100
    vae_cfg = json.loads((out / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] != 0.18215 and len(vae_cfg["block_out_channels"]) == 3

    from lime_fast import LimeEngine

    engine = LimeEngine.from_pretrained(out, device="cpu")
    assert engine.vae_scale == 4
    s = make_sample(11)
    res = engine.edit(s.source, s.instruction, steps=2, capture_step=0, reg_steps=(0, 1), grid_size=16, top_k=4, progress=False)
    assert res.image.size == s.source.size
    assert np.isfinite(np.asarray(res.image, dtype=np.float32)).all()
