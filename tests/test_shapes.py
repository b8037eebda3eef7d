"""The synthetic shapes data (lime_fast.testing.shapes) and the training script (scripts/train_shapes.py)."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from lime_fast.testing.shapes import (KINDS, PALETTE, PLURAL, SHAPES, ShapesDataset, describe, make_batch, make_sample,
                                      make_session, write_magicbrush)

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
    """The layout of MagicBrush's test release: images/{id}/{id}-input.png, -output{t}.png, -mask{t}.png,
    edit_sessions.json (turn t's input is the previous turn's output) and the caption files."""
    out = write_magicbrush(tmp_path / "mb", range(5, 11))
    sessions = json.loads((out / "edit_sessions.json").read_text())
    assert list(sessions) == [str(i) for i in range(5, 11)]
    for key, turns in sessions.items():
        s = make_sample(int(key))
        (t,) = turns
        assert t["input"] == f"{key}-input.png" and t["output"] == f"{key}-output1.png" and t["mask"] == f"{key}-mask1.png"
        assert t["instruction"] == s.instruction and t["kind"] == s.kind
        folder = out / "images" / key
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(folder / t["input"])), np.asarray(s.source))
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(folder / t["output"])), np.asarray(s.target))
        m = np.asarray(PIL.Image.open(folder / t["mask"]))
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
        np.testing.assert_array_equal(m == 255, s.mask)
        assert sorted(p.name for p in folder.iterdir()) == sorted([t["input"], t["output"], t["mask"]])
    assert json.loads((out / "edit_turns.json").read_text()) == [t for v in sessions.values() for t in v]
    glob_desc = json.loads((out / "global_descriptions.json").read_text())
    local = json.loads((out / "local_descriptions.json").read_text())
    assert set(glob_desc["5"]) == {"5-input.png", "5-output1.png"} and set(local["5"]) == {"5-output1.png"}
    assert make_sample(5).target_color in local["5"]["5-output1.png"]


def test_sessions_chain_exact_edits(tmp_path):
    """Multi-turn sessions: each turn edits the previous target; targets and masks stay exact."""
    for seed in (0, 3, 5_000_001):
        turns = make_session(seed, 3)
        assert len(turns) == 3 and turns[0].instruction == make_sample(seed).instruction
        for prev, cur in zip(turns, turns[1:]):
            np.testing.assert_array_equal(np.asarray(cur.source), np.asarray(prev.target))
        for s in turns:
            src, tgt = np.asarray(s.source).astype(int), np.asarray(s.target).astype(int)
            assert s.mask.any() and (src[~s.mask] == tgt[~s.mask]).all() and (src[s.mask] != tgt[s.mask]).any(-1).all()
            assert s.target_color in s.instruction.lower()
    out = write_magicbrush(tmp_path / "mb", [0], turns=3)
    (t1, t2, t3) = json.loads((out / "edit_sessions.json").read_text())["0"]
    assert (t2["input"], t3["input"]) == ("0-output1.png", "0-output2.png")
    last = np.asarray(PIL.Image.open(out / "images" / "0" / "0-output3.png"))
    np.testing.assert_array_equal(last, np.asarray(make_session(0, 3)[2].target))
    assert "background" in describe(make_session(0, 3)[1])


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


def _train(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train_shapes.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_zero_training_steps_still_write_the_card_and_its_plot(tmp_path):
    proc = _train("--out", tmp_path / "zero", "--smoke", "--vae-steps", 0, "--unet-steps", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("README.md", "loss.png", "loss.json", "model_index.json"):
        assert (tmp_path / "zero" / name).is_file(), name


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory):
    """One smoke training run (a few steps at tiny widths), shared by the tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("train") / "shapes-smoke"
    proc = _train("--out", out, "--smoke", "--seed", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_smoke_training_gives_a_loadable_checkpoint(smoke_checkpoint):
    out = smoke_checkpoint
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


def _train_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_shapes", ROOT / "scripts" / "train_shapes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_grounding_loss_on_known_maps():
    import torch

    gl = _train_module().grounding_loss
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[:, :32] = True  # top half: cells 0, 1 of a 2 x 2 grid
    maps = torch.zeros(2, 4, 3)
    maps[0, :2, 1] = 0.5  # sample 0, token 1: all of its attention inside
    maps[1, :, 1] = 0.25  # sample 1, token 1: uniform, half inside
    maps[:, :, 0] = maps[:, :, 2] = 0.25  # tokens 0 and 2 are not content words
    content = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    loss, mass = gl([maps], mask, content)
    assert loss.item() == pytest.approx((0.0 + 0.25) / 2) and mass.item() == pytest.approx(0.75)
    loss, mass = gl([maps], mask, content * torch.tensor([[1.0], [0.0]]))  # only sample 0 counts
    assert loss.item() == pytest.approx(0.0) and mass.item() == pytest.approx(1.0)
    # differentiable, and the gradient pushes sample 1's attention into the region
    maps = maps.clone().requires_grad_(True)
    gl([maps], mask, content)[0].backward()
    assert maps.grad[1, 2:, 1].min() > maps.grad[1, :2, 1].max()


def test_sink_loss_on_known_maps():
    import torch

    sl = _train_module().sink_loss
    maps = torch.zeros(2, 4, 3)
    maps[0, :, 0] = 0.9  # sample 0: BOS above the share everywhere
    maps[1, :2, 0], maps[1, 2:, 0] = 0.5, 0.7  # sample 1: 0.2 and 0 short of 0.7
    maps[..., 1] = 1 - maps[..., 0]
    loss, share = sl([maps, maps], 0.7)
    assert loss.item() == pytest.approx(2 * 0.2**2 / 8) and share.item() == pytest.approx((4 * 0.9 + 2 * 0.5 + 2 * 0.7) / 8)
    maps = maps.clone().requires_grad_(True)
    sl([maps], 0.7)[0].backward()
    # only the short pixels' BOS gets a gradient, and it asks for more BOS
    assert maps.grad[1, :2, 0].max() < 0 and maps.grad[0].abs().max() == 0 and maps.grad[1, 2:].abs().max() == 0


def test_grounding_processor_is_plain_attention_until_padding_is_dropped():
    from types import SimpleNamespace

    import torch

    from lime_fast.clip_bpe import clip_tokenizer

    mod = _train_module()
    a = SimpleNamespace(seed=0, width=16, vae_width=16, text_width=32, text_layers=1)
    tok = clip_tokenizer()
    _, unet, te = mod.build_models(a, tok)
    ids = tok(["make the circle red", "turn the background blue"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(2, 8, 16, 16)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        emb = te(ids)[0]
        ref = unet(x, t, encoder_hidden_states=emb).sample
        state = {"maps": []}
        unet.set_attn_processor({k: mod.GroundingAttn(state) if k.endswith("attn2.processor") else v
                                 for k, v in unet.attn_processors.items()})
        eos = (ids == tok.eos_token_id).int().argmax(1)
        state.update(keep=torch.arange(77)[None] <= eos[:, None], all=torch.arange(2), pad_drop=torch.tensor([False, False]))
        out = unet(x, t, encoder_hidden_states=emb).sample
        n_cross = sum(k.endswith("attn2.processor") for k in unet.attn_processors)
        assert len(state["maps"]) == n_cross and n_cross >= 6
        for m in state["maps"]:
            assert m.shape[0] == 2 and m.shape[2] == 77
            torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]))
        state["maps"].clear()
        state["pad_drop"] = torch.tensor([True, False])
        dropped = unet(x, t, encoder_hidden_states=emb).sample
        assert all(float(m[0, :, eos[0] + 1 :].abs().max()) == 0.0 for m in state["maps"])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dropped[0], ref[0], atol=1e-4)
    torch.testing.assert_close(dropped[1], ref[1], rtol=1e-4, atol=1e-5)


def test_grounding_processor_applies_lime_inside_the_region_at_the_regularized_levels():
    """--lime-share: a LIME sample's pixels inside the true region see only LIME's kept tokens at levels 0-1
    (16 and 8 cells a side here), exactly as the engine's regularized edit; its other pixels and levels,
    and the other samples, are plain attention."""
    from types import SimpleNamespace

    import torch

    from lime_fast.clip_bpe import clip_tokenizer
    from lime_fast.tokens import keep_mask, token_roles

    mod = _train_module()
    a = SimpleNamespace(seed=0, width=16, vae_width=16, text_width=32, text_layers=1)
    tok = clip_tokenizer()
    _, unet, te = mod.build_models(a, tok)
    texts = ["make the circle red", "turn the background blue"]
    ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 8, 16, 16, generator=g), torch.tensor([300, 600])
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[:, 8:40, 20:52] = True  # 32 x 32 pixels: 8 x 8 cells at level 0, 4 x 4 at level 1
    lime_keep = keep_mask([token_roles(tok, s) for s in texts])
    eos = (ids == tok.eos_token_id).int().argmax(1)
    with torch.no_grad():
        emb = te(ids)[0]
        state = {"maps": []}
        unet.set_attn_processor({k: mod.GroundingAttn(state) if k.endswith("attn2.processor") else v
                                 for k, v in unet.attn_processors.items()})
        plain_keep = torch.arange(77)[None] <= eos[:, None]
        state.update(keep=plain_keep, all=torch.arange(2), pad_drop=torch.tensor([False, False]))
        ref = unet(x, t, encoder_hidden_states=emb).sample
        state["maps"].clear()
        lime = torch.tensor([True, False])
        state.update(keep=torch.where(lime[:, None], lime_keep, plain_keep), lime_roi=mod.lime_rois(lime, mask))
        out = unet(x, t, encoder_hidden_states=emb).sample
    silenced = ~lime_keep[0]
    assert silenced[0] and silenced[eos[0] + 1 :].all() and not silenced[eos[0]]  # BOS and padding silenced, EOS kept
    seen = set()
    for m in state["maps"]:
        side = int(round(m.shape[1] ** 0.5))
        seen.add(side)
        src = torch.arange(side) * 64 // side  # the pixel a nearest-neighbour cell samples
        inside = (((src >= 8) & (src < 40))[:, None] & ((src >= 20) & (src < 52))[None]).flatten()
        if side in (16, 8):
            assert float(m[0][inside][:, silenced].abs().max()) == 0.0
            torch.testing.assert_close(m[0][inside].sum(-1), torch.ones(int(inside.sum())))
            assert float(m[0][~inside][:, silenced].sum(-1).min()) > 0
        else:
            assert float(m[0][:, silenced].sum(-1).min()) > 0
        assert float(m[1][:, eos[1] + 1 :].sum(-1).min()) > 0
    assert seen == {16, 8, 4, 2}
    assert not torch.allclose(out[0], ref[0], atol=1e-4)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-4, atol=1e-5)


def test_smoke_fine_tune_with_grounding_from_a_checkpoint(smoke_checkpoint, tmp_path):
    base, out = smoke_checkpoint, tmp_path / "ft"
    proc = _train("--out", out, "--smoke", "--init", base, "--vae-steps", 0, "--unet-steps", 2, "--attn-loss", 0.1, "--pad-drop", 0.5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = (out / "README.md").read_text()
    assert f"--init {base}" in card and "--attn-loss 0.1 --pad-drop 0.5" in card and "--vae-steps 0 --unet-steps 2" in card
    losses = json.loads((out / "loss.json").read_text())
    assert len(losses["grounding"]) == 2 and losses["vae_rec"] == []
    assert all(0.0 <= m <= 1.0 for m in losses["mass_in"])
    # the VAE is the loaded one, unchanged
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == json.loads((base / "vae" / "config.json").read_text())["scaling_factor"]


def _fine_tune(base, out, *flags) -> tuple[str, dict]:
    """Two smoke UNet steps from ``base`` with ``flags``: (the model card, loss.json)."""
    proc = _train("--out", out, "--smoke", "--init", base, "--vae-steps", 0, "--unet-steps", 2, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (out / "README.md").read_text(), json.loads((out / "loss.json").read_text())


def test_smoke_fine_tune_with_a_bos_sink(smoke_checkpoint, tmp_path):
    card, losses = _fine_tune(smoke_checkpoint, tmp_path / "sink", "--sink", 0.5, "--sink-share", 0.6)
    assert "--sink 0.5 --sink-share 0.6" in card and "BOS sink: weight 0.5" in card and "relu(0.6 - p_BOS)^2" in card
    assert len(losses["bos_share"]) == 2 and all(0.0 < b < 1.0 for b in losses["bos_share"])
    assert " BOS " in (tmp_path / "sink" / "train.log").read_text()


def test_padding_and_lime_shares_must_fit_in_one_batch(capsys):
    mod = _train_module()
    with pytest.raises(SystemExit):
        mod.parse_args(["--out", "x", "--pad-drop", "0.7", "--lime-share", "0.4"])
    assert "together at most 1" in capsys.readouterr().err
    a = mod.parse_args(["--out", "x", "--pad-drop", "0.3", "--lime-share", "0.4"])
    assert (a.pad_drop, a.lime_share) == (0.3, 0.4)


def test_smoke_fine_tune_under_lime(smoke_checkpoint, tmp_path):
    card, losses = _fine_tune(smoke_checkpoint, tmp_path / "lime", "--pad-drop", 0.3, "--lime-share", 0.5)
    assert "--pad-drop 0.3 --lime-share 0.5" in card and "trained under LIME's regularization on 50% of the samples" in card
    assert len(losses["unet_eps"]) == 2 and all(math.isfinite(v) for v in losses["unet_eps"] + losses["grounding"])


def test_decoder_only_continuation_keeps_the_latents_and_chains_the_card(smoke_checkpoint, tmp_path):
    """--vae-decoder-only trains the decoder alone (encoder weights, hence latents and scaling_factor,
    unchanged, so the UNet still fits), and a third run's card lists all three commands in order."""
    import torch
    from safetensors.torch import load_file

    base, mid, out = smoke_checkpoint, tmp_path / "mid", tmp_path / "out"
    proc = _train("--out", mid, "--smoke", "--init", base, "--vae-decoder-only", "--vae-steps", 3, "--unet-steps", 0,
                  "--first-batch", 7)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = (load_file(str(d / "vae" / "diffusion_pytorch_model.safetensors")) for d in (base, mid))
    enc = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and dec and len(enc) + len(dec) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in dec)
    config = [json.loads((d / "vae" / "config.json").read_text())["scaling_factor"] for d in (base, mid)]
    assert config[0] == config[1]
    unets = [load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors")) for d in (base, mid)]
    assert all(torch.equal(unets[0][k], unets[1][k]) for k in unets[0])  # --unet-steps 0: kept as loaded
    assert "stage 2 (UNet + text encoder): none" in (mid / "README.md").read_text()
    assert "VAE stage seeds 28..39, no UNet stage." in (mid / "README.md").read_text()  # batch 4 from batch 7 on
    proc = _train("--out", out, "--smoke", "--init", mid, "--vae-steps", 0, "--unet-steps", 1, "--first-batch", 20)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = (out / "README.md").read_text()
    assert "Trained in 3 runs" in card
    block = card[card.index("## Reproduce"):]
    heads = [line for line in block.splitlines() if line.startswith("# ")]
    assert heads == [f"# 1. the starting checkpoint ({base}), as its model card states",
                     f"# 2. the starting checkpoint ({mid})", "# 3. this model"]
    assert block.count(f"--out {mid}") == 1 and "--vae-decoder-only --first-batch 7" in block
    assert "UNet stage seeds 1000083..1000086" in card  # batch 4 from batch 20 on: fresh samples


def test_compact_checkpoint_assembles_into_the_same_pipeline(smoke_checkpoint, tmp_path):
    """The device path (--compact, data drawn by worker processes, then --assemble where the files come
    back) gives the same weights as writing the pipeline directly, in at most 8 files of <= 15 MiB."""
    import torch
    from safetensors.torch import load_file

    args = ("--smoke", "--init", smoke_checkpoint, "--vae-steps", 0, "--unet-steps", 2, "--attn-loss", 0.1, "--pad-drop", 0.5)
    direct, ckpt, assembled = tmp_path / "direct", tmp_path / "ckpt", tmp_path / "assembled"
    for proc in (_train("--out", direct, *args), _train("--out", ckpt, *args, "--compact", "--workers", 2, "--ckpt-minutes", 1e-6)):
        assert proc.returncode == 0, proc.stderr[-3000:]
    files = [f for f in ckpt.rglob("*") if f.is_file()]
    assert len(files) <= 8 and all(f.stat().st_size <= 15 * 2**20 for f in files) and not (ckpt / "unet").exists()
    proc = _train("--assemble", ckpt, "--out", assembled)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for sub in ("unet", "vae", "text_encoder"):
        a, b = ({k: v for f in sorted((d / sub).glob("*.safetensors")) for k, v in load_file(f).items()} for d in (direct, assembled))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
        ca, cb = ({k: v for k, v in json.loads((d / sub / "config.json").read_text()).items() if not k.startswith("_")}
                  for d in (direct, assembled))
        assert ca == cb, sub
    card = (assembled / "README.md").read_text()
    assert "--compact" in card and f"--assemble {ckpt} --out {assembled}" in card and "PSNR" in card
    assert json.loads((assembled / "loss.json").read_text()) == json.loads((direct / "loss.json").read_text())
    assert (ckpt / "train.log").read_text().count("checkpoint: ") == 3  # after each step, then the final one

    # a run cut off by its time limit leaves a checkpoint that says so; its card says so too
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "complete": False, "step": 1}))
    proc = _train("--assemble", ckpt, "--out", tmp_path / "partial")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a checkpoint written at step 1 of the 2-step schedule" in (tmp_path / "partial" / "README.md").read_text()


def test_bf16_autocast_path_trains(tmp_path):
    """--amp bf16 (what a GPU run uses) runs every stage and the grounding loss; here on the CPU."""
    out = tmp_path / "bf16"
    proc = _train("--out", out, "--smoke", "--amp", "bf16", "--attn-loss", 0.1, "--pad-drop", 0.5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads((out / "loss.json").read_text())
    assert len(losses["unet_eps"]) == 3 and len(losses["grounding"]) == 3
    assert all(np.isfinite(v) for k in ("vae_rec", "unet_eps", "grounding") for v in losses[k])
    assert "--amp bf16" in (out / "README.md").read_text()
