"""`lime-fast eval` (lime_fast.evaluate): the metrics against hand-computed values and MagicBrush's official
rules (evaluation/image_eval.py of OSU-NLP-Group/MagicBrush), the three data layouts, the runner end to end
(single- and multi-turn, the tiny random model and the shipped shapes model), and resume after a kill."""

import csv
import shutil
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

from lime_fast import LimeEngine, edit_turns, evaluate
from lime_fast.cli import main
from lime_fast.evaluate import metrics as M
from lime_fast.testing.shapes import make_session, write_magicbrush

CFG = dict(steps=3, capture_step=1, reg_steps=(0, 2), grid_size=16, top_k=4)
CFG_ARGS = ["--steps", "3", "--top-k", "4", "--capture-step", "1", "--reg-steps", "0", "2", "--grid-size", "16"]


def rgb(arr) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.asarray(arr, np.uint8), "RGB")


def pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


# --- metrics ---------------------------------------------------------------------------------------


def test_pixel_metrics_by_hand():
    tgt = np.zeros((2, 2, 3), np.uint8)
    gen = tgt.copy()
    gen[0] = 255  # top row wrong by 1.0 in every channel
    gen[1, 0] = 51  # one pixel wrong by 0.2
    m = M.pixel_metrics(rgb(gen), rgb(tgt), np.array([[True, True], [False, False]]))
    assert m["l1"] == pytest.approx((1 + 1 + 0.2 + 0) / 4)
    assert m["l2"] == pytest.approx((1 + 1 + 0.04 + 0) / 4)
    assert m["l1_in"] == pytest.approx(1.0) and m["l1_out"] == pytest.approx(0.1)
    assert math.isnan(M.pixel_metrics(rgb(gen), rgb(tgt), np.zeros((2, 2), bool))["l1_in"])
    assert M.iou(np.array([1, 1, 0], bool), np.array([0, 1, 1], bool)) == pytest.approx(1 / 3)
    assert M.iou(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_pixel_metrics_resize_the_output_to_the_target_bicubic():
    """image_eval.py's eval_distance: gen_img.resize(gt_img.size) (PIL's default filter, bicubic for RGB)."""
    rng = np.random.default_rng(0)
    gen, tgt = rgb(rng.integers(0, 256, (12, 16, 3))), rgb(rng.integers(0, 256, (6, 8, 3)))
    assert np.array_equal(np.asarray(gen.resize(tgt.size)), np.asarray(gen.resize(tgt.size, PIL.Image.BICUBIC)))
    ref = np.abs(np.asarray(gen.resize(tgt.size, PIL.Image.BICUBIC), np.float64) - np.asarray(tgt, np.float64)) / 255
    m = M.pixel_metrics(gen, tgt)
    assert m["l1"] == pytest.approx(ref.mean(), abs=1e-12) and m["l2"] == pytest.approx((ref**2).mean(), abs=1e-12)
    nearest = np.abs(np.asarray(gen.resize(tgt.size, PIL.Image.NEAREST), np.float64) - np.asarray(tgt, np.float64)) / 255
    assert abs(nearest.mean() - m["l1"]) > 1e-4  # the filter matters: the rule is checked, not assumed


def test_cosine_matches_scipy_and_hand_values():
    from scipy.spatial import distance

    assert M.cosine([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1 / math.sqrt(2))
    assert M.cosine([1.0, 2.0], [-2.0, -4.0]) == pytest.approx(-1.0)
    u, v = np.random.default_rng(1).normal(size=(2, 512))
    assert M.cosine(u, v) == pytest.approx(1 - distance.cosine(u, v), abs=1e-12)


def test_preprocessing_follows_torchvision_rules():
    """Resize(int): short side to size, long side int(size * long / short); CenterCrop: round((h - s) / 2)."""
    img = rgb(np.random.default_rng(2).integers(0, 256, (200, 301, 3)))  # W 301 x H 200
    assert M.resize_short(img, 224).size == (int(224 * 301 / 200), 224) == (337, 224)
    assert M.resize_short(img.transpose(PIL.Image.TRANSPOSE), 256).size == (256, int(256 * 301 / 200))
    wide = rgb(np.arange(5 * 8 * 3).reshape(5, 8, 3) % 256)
    crop = M.center_crop(wide, 3)  # left = round(2.5) = 2 (Python rounds halves to even), top = round(1.0) = 1
    assert np.array_equal(np.asarray(crop), np.asarray(wide)[1:4, 2:5])
    flat = rgb(np.full((224, 224, 3), (255, 0, 51)))
    x = M.clip_pixels(flat)
    assert x.shape == (3, 224, 224)
    for c, v in enumerate((1.0, 0.0, 0.2)):
        assert x[c, 0, 0] == pytest.approx((v - M.CLIP_MEAN[c]) / M.CLIP_STD[c], abs=1e-6)
    d = M.dino_pixels(rgb(np.full((100, 150, 3), 255)))
    assert d.shape == (3, 224, 224) and d[2, 5, 5] == pytest.approx((1 - 0.406) / 0.225, abs=1e-5)


def test_masks_transparent_means_edit_else_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:2, :2, 3] = 0  # DALL-E 2's editor: the erased (transparent) pixels are the ones to edit
    PIL.Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    expect = np.zeros((4, 4), bool)
    expect[:2, :2] = True
    assert np.array_equal(evaluate.read_mask(tmp_path / "a.png"), expect)
    PIL.Image.fromarray(expect.astype(np.uint8) * 255, "L").save(tmp_path / "l.png")
    assert np.array_equal(evaluate.read_mask(tmp_path / "l.png"), expect)


@pytest.fixture(scope="module")
def embedders(tmp_path_factory, clip_tok):
    """Tiny random CLIP (ViT-B/32's layout, real tokenizer) and DINO (ViT, 16-pixel patches) folders."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    d = tmp_path_factory.mktemp("embedders")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    clip = CLIPModel(CLIPConfig(text_config=dict(vocab_size=clip_tok.vocab_size, max_position_embeddings=77, **small),
                                vision_config=dict(image_size=224, patch_size=32, **small), projection_dim=16))
    clip.save_pretrained(d / "clip")
    clip_tok.save_pretrained(d / "clip")
    ViTModel(ViTConfig(image_size=224, patch_size=16, **small), add_pooling_layer=False).save_pretrained(d / "dino")
    return d / "clip", d / "dino"


def test_clip_and_dino_embeddings_through_the_loaders(embedders):
    from transformers import CLIPModel, ViTModel

    clip, dino = M.Clip(embedders[0]), M.Dino(embedders[1])
    rng = np.random.default_rng(3)
    a, b = rgb(rng.integers(0, 256, (224, 224, 3))), rgb(rng.integers(0, 256, (224, 224, 3)))
    caption = "a red circle on a blue background"
    # CLIP-I and CLIP-T against the model's own forward (normalized embeddings, logits = scale * cosine)
    ref = CLIPModel.from_pretrained(embedders[0]).eval()
    x = torch.from_numpy(np.stack([(np.asarray(im) / 255.0 - M.CLIP_MEAN) / M.CLIP_STD for im in (a, b)])).permute(0, 3, 1, 2)
    ids = clip.tokenizer([caption], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=x.float())
    ea, eb = clip.images([a, b])
    assert M.cosine(ea, eb) == pytest.approx(float(out.image_embeds[0] @ out.image_embeds[1]), abs=1e-5)
    t = clip.texts([caption])[0]
    assert M.cosine(ea, t) == pytest.approx(float(out.logits_per_image[0, 0] / ref.logit_scale.detach().exp()), abs=1e-5)
    assert M.cosine(ea, clip.images([a])[0]) == pytest.approx(1.0)
    # DINO: the class token after the final layer norm
    vit = ViTModel.from_pretrained(embedders[1], add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = vit(pixel_values=torch.from_numpy(np.stack([M.dino_pixels(a)])), output_hidden_states=True).hidden_states[-1]
        cls = vit.layernorm(hidden)[0, 0].double().numpy()
    assert np.allclose(dino.images([a])[0], cls, atol=1e-5)
    with pytest.raises(M.EmbeddingError, match="config.json"):
        M.Dino(embedders[1].parent)


# --- data layouts --------------------------------------------------------------------------------------


def write_fixture(root):
    """MagicBrush's test layout, by hand: session 101 (one turn), session 202 (two turns; its turn-2 target is
    stored at 96 x 96 to exercise the resize rule), RGBA masks transparent where edited (DALL-E 2's
    convention), captions for all outputs but 202's second."""
    sessions, caps = {}, {}
    for sid, seed, n in (("101", 5_000_003, 1), ("202", 5_000_004, 2)):
        turns = make_session(seed, n)
        folder = root / "images" / sid
        folder.mkdir(parents=True)
        turns[0].source.save(folder / f"{sid}-input.png")
        sessions[sid], caps[sid] = [], {}
        for t, s in enumerate(turns, start=1):
            target = s.target if (sid, t) != ("202", 2) else s.target.resize((96, 96), PIL.Image.NEAREST)
            target.save(folder / f"{sid}-output{t}.png")
            rgba = np.dstack([np.asarray(s.source), np.where(s.mask, 0, 255).astype(np.uint8)])
            PIL.Image.fromarray(rgba, "RGBA").save(folder / f"{sid}-mask{t}.png")
            sessions[sid].append({"input": f"{sid}-input.png" if t == 1 else f"{sid}-output{t - 1}.png",
                                  "mask": f"{sid}-mask{t}.png", "instruction": s.instruction, "output": f"{sid}-output{t}.png"})
            if (sid, t) != ("202", 2):
                caps[sid][f"{sid}-output{t}.png"] = f"{s.target_color} {s.subject}"
    (root / "edit_sessions.json").write_text(json.dumps(sessions))
    (root / "local_descriptions.json").write_text(json.dumps(caps))
    return root


def test_magicbrush_layout_is_read_as_the_official_script_pairs_it(tmp_path):
    root = write_fixture(tmp_path / "test")
    data = evaluate.load(tmp_path, tmp_path / "out")  # the folder holding test/ works too
    assert data.layout == "magicbrush" and [s.id for s in data.sessions] == ["101", "202"] and data.turns == 3
    t1, t2 = data.sessions[1].turns
    assert t2.input == root / "images" / "202" / "202-output1.png"  # single-turn: the ground-truth previous output
    assert t1.caption and t2.caption is None and data.captions.name == "local_descriptions.json"
    assert evaluate.out_id("202", 1, "multi") == "202_1"
    assert (evaluate.out_id("202", 2, "single"), evaluate.out_id("202", 2, "multi")) == ("202_inde_2", "202_iter_2")
    (root / "images" / "101" / "101-output1.png").unlink()
    data = evaluate.load(root, tmp_path / "out")
    assert [s.id for s in data.sessions] == ["202"] and "101-output1.png" in data.problems[0]


def test_hugging_face_parquet_is_converted_to_the_same_sessions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ref = evaluate.load(write_magicbrush(tmp_path / "ref", [7, 8], turns=2), tmp_path)
    rows = []
    for s in ref.sessions:
        for t in s.turns:
            def blob(path):
                return {"bytes": path.read_bytes(), "path": path.name}
            rows.append({"img_id": s.id, "turn_index": t.index, "source_img": blob(t.input), "mask_img": blob(t.mask),
                         "instruction": t.instruction, "target_img": blob(t.target)})
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("img_id", pa.string()), ("turn_index", pa.int32()), ("source_img", img), ("mask_img", img),
                        ("instruction", pa.string()), ("target_img", img)])
    (tmp_path / "hf" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[::-1], schema=schema), tmp_path / "hf" / "data" / "dev-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1], schema=schema), tmp_path / "hf" / "data" / "train-00000-of-00001.parquet")
    data = evaluate.load(tmp_path / "hf", tmp_path / "out", split="dev", progress=False)
    assert data.layout == "huggingface" and (tmp_path / "out" / "dataset" / "edit_sessions.json").is_file()
    assert [s.id for s in data.sessions] == ["7", "8"] and not data.problems
    for a, b in zip(ref.sessions, data.sessions):
        for ta, tb in zip(a.turns, b.turns):
            assert (ta.index, ta.instruction, ta.input.name, ta.target.name) == (tb.index, tb.instruction, tb.input.name, tb.target.name)
            for x, y in ((ta.input, tb.input), (ta.target, tb.target)):
                assert np.array_equal(pixels(x), pixels(y))
            assert np.array_equal(evaluate.read_mask(ta.mask), evaluate.read_mask(tb.mask))
    with pytest.raises(evaluate.DatasetError, match="no parquet"):
        evaluate.load(tmp_path / "hf", tmp_path / "out2", split="test")


def test_manifest_with_targets_runs_single_and_multi_turn(tmp_path, tiny_dir):
    ref = evaluate.load(write_magicbrush(tmp_path / "d", [3, 4], turns=2), tmp_path)
    s3, s4 = ref.sessions
    rows = [{"id": "a1", "image": str(s3.turns[0].input), "instruction": s3.turns[0].instruction,
             "target": str(s3.turns[0].target), "session": "s3", "turn": 1, "caption": "x"},
            {"id": "a2", "image": str(s3.turns[1].input), "instruction": s3.turns[1].instruction,
             "target": os.path.relpath(s3.turns[1].target, tmp_path), "session": "s3", "turn": 2, "seed": 5},
            {"id": "b1", "image": str(s4.turns[0].input), "instruction": s4.turns[0].instruction,
             "target": str(s4.turns[0].target)},
            {"id": "bad", "image": str(s4.turns[1].input), "instruction": "make it red"},
            {"id": "odd", "image": str(s4.turns[1].input), "instruction": "make it red", "target": str(s4.turns[1].target),
             "colour": "red"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = evaluate.load(tmp_path / "m.jsonl", tmp_path / "out")
    assert [s.id for s in data.sessions] == ["s3", "b1"] and [t.index for t in data.sessions[0].turns] == [1, 2]
    assert data.sessions[0].turns[1].overrides == {"seed": 5} and data.sessions[0].turns[0].caption == "x"
    assert len(data.problems) == 2 and "line 4" in data.problems[1] + data.problems[0] and "'colour'" in " ".join(data.problems)
    ev = evaluate.evaluate(data, tmp_path / "out", model=str(tiny_dir), methods=["ip2p"], config=CFG, progress=False)
    assert ev.done == 4 and ev.summary["single"]["ip2p"]["n"] == 3 and ev.summary["multi"]["ip2p"]["n"] == 2
    assert (tmp_path / "out" / "ip2p" / "images" / "s3_iter_2.png").is_file()


# --- the runner, end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_eval(tmp_path_factory, tiny_dir, embedders):
    """The MagicBrush-layout fixture evaluated with the tiny model, all methods, both settings, CLIP and DINO."""
    d = tmp_path_factory.mktemp("mb")
    root = write_fixture(d / "test")
    data = evaluate.load(root, d / "out")
    ev = evaluate.evaluate(data, d / "out", model=str(tiny_dir), config=CFG, clip=embedders[0], dino=embedders[1],
                           threads=1, progress=False)
    return ev


def test_end_to_end_on_the_magicbrush_fixture(fixture_eval, tiny_dir, embedders):
    ev = fixture_eval
    out = ev.out_dir
    assert (ev.done, ev.skipped, ev.failed) == (12, 0, 0)  # 3 methods x (3 single-turn + 1 multi-turn edits)
    for spec in ("ip2p", "lime", "lime-mask"):
        assert sorted(p.name for p in (out / spec / "images").iterdir()) == ["101_1.png", "202_1.png", "202_inde_2.png", "202_iter_2.png"]
        single = [x for x in ev.samples if x["method"] == spec and x["setting"] == "single"]
        multi = [x for x in ev.samples if x["method"] == spec and x["setting"] == "multi"]
        assert [x["id"] for x in single] == ["101_1", "202_1", "202_inde_2"] and [x["id"] for x in multi] == ["101_1", "202_iter_2"]
        # every pair weighs the same (image_eval.py: sum / len(pairs)); CLIP-T only where a caption exists
        for setting, xs in (("single", single), ("multi", multi)):
            for k in ("l1", "l2", "clip_i", "dino", "l1_in", "l1_out"):
                assert ev.summary[setting][spec][k] == pytest.approx(np.mean([x[k] for x in xs]))
        assert single[2]["clip_t"] is None and ev.summary["single"][spec]["n_clip_t"] == 2
        assert ev.summary["single"][spec]["clip_t"] == pytest.approx(np.mean([x["clip_t"] for x in single[:2]]))
    engine = LimeEngine.from_pretrained(tiny_dir, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s202 = ev.dataset.sessions[1]
        # multi-turn: turn 2 edits our turn-1 output (= lime_fast.edit_turns); single-turn: the ground truth
        chain = edit_turns(s202.turns[0].input, [t.instruction for t in s202.turns], model=engine, progress=False, **CFG)
        assert np.array_equal(pixels(out / "lime" / "images" / "202_iter_2.png"), np.asarray(chain[1].image))
        inde = engine.edit(s202.turns[1].input, s202.turns[1].instruction, progress=False, **CFG)
        assert np.array_equal(pixels(out / "lime" / "images" / "202_inde_2.png"), np.asarray(inde.image))
    finally:
        torch.set_num_threads(threads)
    # lime-mask used the dataset's (transparent = edit) masks; ip2p an empty RoI; lime its own
    x = next(x for x in ev.samples if x["method"] == "lime-mask" and x["id"] == "202_inde_2")
    assert x["roi_area"] == pytest.approx(evaluate.read_mask(s202.turns[1].mask).mean())
    assert all(x["roi_area"] == 0 for x in ev.samples if x["method"] == "ip2p")
    assert all(0 <= x["roi_iou"] <= 1 for x in ev.samples if x["method"] == "lime")
    # the 96 x 96 target: L1 after resizing our 64 x 64 output to it, bicubic
    gen = PIL.Image.open(out / "ip2p" / "images" / "202_inde_2.png").convert("RGB")
    tgt = PIL.Image.open(s202.turns[1].target).convert("RGB")
    ref = np.abs(np.asarray(gen.resize((96, 96), PIL.Image.BICUBIC), float) - np.asarray(tgt, float)).mean() / 255
    assert next(x for x in ev.samples if x["method"] == "ip2p" and x["id"] == "202_inde_2")["l1"] == pytest.approx(ref)
    clip = M.Clip(embedders[0])
    x = next(x for x in ev.samples if x["method"] == "lime" and x["id"] == "101_1")
    e_gen, e_tgt = clip.images([out / x["image"], x["target"]])
    assert x["clip_i"] == pytest.approx(M.cosine(e_gen, e_tgt))
    assert x["clip_t"] == pytest.approx(M.cosine(e_gen, clip.texts([ev.dataset.sessions[0].turns[0].caption])[0]))
    # reports
    paths = evaluate.report.write(ev, paper=True)
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 15 and {r["setting"] for r in rows} == {"single", "multi"}
    md = paths["markdown"].read_text()
    assert "Single-turn" in md and "Multi-turn" in md and "paper: InstructPix2Pix + LIME" in md and "0.058" in md
    js = json.loads(paths["json"].read_text())
    assert js["summary"]["multi"]["lime"]["n"] == 2 and js["paper"]["rows"]["single"]["InstructPix2Pix"][0] == 0.112
    assert PIL.Image.open(paths["grid"]).width > 64 * 5
    assert "paper" not in evaluate.report.markdown(ev, paper=False)


def test_rerun_redoes_nothing_and_other_settings_are_refused(fixture_eval, tiny_dir, capsys):
    ev = fixture_eval
    again = evaluate.evaluate(ev.dataset, ev.out_dir, model=str(tiny_dir), config=CFG, progress=False)
    assert (again.done, again.skipped) == (0, 12)
    assert again.summary["single"]["lime"]["l1"] == ev.summary["single"]["lime"]["l1"]
    assert again.summary["single"]["lime"]["clip_i"] is None  # no CLIP given this time: not computed
    assert "Not computed: CLIP-I and CLIP-T and DINO" in evaluate.report.markdown(again)
    with pytest.raises(evaluate.EvalError, match="another config"):
        evaluate.evaluate(ev.dataset, ev.out_dir, model=str(tiny_dir), config={**CFG, "seed": 1}, progress=False)
    with pytest.raises(evaluate.EvalError, match="unknown method 'lim'"):
        evaluate.evaluate(ev.dataset, ev.out_dir, model=str(tiny_dir), methods=["lim"], progress=False)
    assert main(["eval", str(ev.dataset.root), "--out", str(ev.out_dir), "--methods", "ip2p:guidance=2", "--quiet"]) == 2
    assert "guidance" in capsys.readouterr().err


def test_new_weights_in_the_same_folder_are_refused(tmp_path, tiny_dir):
    """method.json pins a local model by a digest of its weight files, so a folder whose weights were
    replaced (a retrained model saved over the old one) cannot reuse the old folder's edits; an engine
    loaded from the folder pins the same digest as the folder's path."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lime_fast.evaluate.run import EvalError, _pin, base_config, model_pin, parse_method, weights_digest

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    engine = LimeEngine.from_pretrained(model, device="cpu")
    assert engine.source == str(model.resolve())
    digest = weights_digest(model)
    assert digest is not None and weights_digest(engine) == digest and weights_digest(str(model)) == digest
    cfg, method = base_config(str(model), CFG), parse_method("lime")
    _pin(tmp_path / "by_path", model_pin(model), cfg, method)
    _pin(tmp_path / "by_path", model_pin(engine), cfg, method)  # the same weights, as an engine: accepted
    assert json.loads((tmp_path / "by_path" / "method.json").read_text())["weights"] == digest

    vae = next((model / "vae").glob("*.safetensors"))
    weights = load_file(vae)
    name = sorted(k for k in weights if k.startswith("decoder."))[-1]  # a tensor late in the file
    weights[name] = weights[name] + 1e-3
    save_file(weights, vae)
    assert weights_digest(model) != digest
    for m in (model, LimeEngine.from_pretrained(model, device="cpu")):
        with pytest.raises(EvalError, match="another model"):
            _pin(tmp_path / "by_path", model_pin(m), cfg, method)
    # a pin written before digests existed has none: still accepted
    pin = tmp_path / "by_path" / "method.json"
    pin.write_text(json.dumps({k: v for k, v in json.loads(pin.read_text()).items() if k != "weights"}))
    _pin(tmp_path / "by_path", model_pin(model), cfg, method)
    assert weights_digest(LimeEngine.from_pipe(engine.pipe)) is None  # built from a pipe: no folder known


def test_killed_evaluation_resumes_without_redoing_or_losing_edits(tmp_path, tiny_dir, fixture_eval):
    root = write_fixture(tmp_path / "test")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lime_fast.cli", "eval", str(root), "--out", str(out), "--model", str(tiny_dir),
           "--methods", "ip2p", "lime", "--threads", "1", "--quiet", *CFG_ARGS]
    first = out / "ip2p" / "results.jsonl"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (first.is_file() and b"\n" in first.read_bytes()):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the evaluation wrote no record in 2 minutes"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up handler can run
    finally:
        proc.wait(timeout=60)
    records = {m: [json.loads(x) for x in (out / m / "results.jsonl").read_text().splitlines()] if (out / m / "results.jsonl").is_file() else []
               for m in ("ip2p", "lime")}
    before = sum(len(r) for r in records.values())
    assert 1 <= before < 8, "the evaluation finished before it could be killed: make it longer"

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{8 - before} made, {before} already done, 0 failed" in rerun.stdout
    for m in ("ip2p", "lime"):
        after = [json.loads(x) for x in (out / m / "results.jsonl").read_text().splitlines()]
        assert after[: len(records[m])] == records[m]  # appended to, never rewritten
        assert sorted(r["id"] for r in after) == ["101_1", "202_1", "202_inde_2", "202_iter_2"]  # each edit once
        for name in ("101_1", "202_1", "202_inde_2", "202_iter_2"):  # the same images as the run in one go
            assert np.array_equal(pixels(out / m / "images" / f"{name}.png"),
                                  pixels(fixture_eval.out_dir / m / "images" / f"{name}.png")), (m, name)
    assert not [p for p in out.rglob("*.tmp")]
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["single"]["lime"]["l1"] == pytest.approx(fixture_eval.summary["single"]["lime"]["l1"])


def test_shapes_with_the_shipped_model_single_and_multi_turn(tmp_path, capsys):
    data = write_magicbrush(tmp_path / "data", range(5_000_000, 5_000_002), turns=2)
    rc = main(["eval", str(data), "--out", str(tmp_path / "out"), "--model", "shapes-ip2p", "--methods", "ip2p", "lime",
               "--steps", "2", "--capture-step", "0", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    js = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert js["edits"] == {"done": 12, "skipped": 0, "failed": 0, "redone": 0} and "paper" not in js  # a shipped model: no paper rows
    for setting, n in (("single", 4), ("multi", 2)):
        for m in ("ip2p", "lime"):
            r = js["summary"][setting][m]
            assert r["n"] == n and 0 < r["l1"] < 0.5 and r["l2"] < r["l1"] and r["clip_i"] is None
        assert 0 <= js["summary"][setting]["lime"]["roi_iou"] <= 1
    assert "by edit kind" in text and (tmp_path / "out" / "grid.png").is_file()


@pytest.mark.parametrize("content, message", [('["a", "b"]', "holds a JSON list; expected an object"),
                                              ("{not json", "cannot read")])
def test_a_caption_file_of_the_wrong_shape_is_one_line(tmp_path, content, message):
    """--captions holding a JSON list used to end in an AttributeError traceback."""
    write_fixture(tmp_path / "test")
    bad = tmp_path / "caps.json"
    bad.write_text(content)
    with pytest.raises(evaluate.DatasetError, match=message):
        evaluate.load(tmp_path, tmp_path / "out", captions=str(bad))


def test_metric_models_with_missing_weights_are_refused(tmp_path, clip_tok):
    """A --clip folder holding only a CLIP text model used to load a vision tower of random weights (a
    MISSING table from transformers) and report numbers; a DINO checkpoint short of a tensor likewise."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection, ViTConfig, ViTModel

    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=clip_tok.vocab_size, max_position_embeddings=77, **small),
                     vision_config=dict(image_size=224, patch_size=32, **small), projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp_path / "full")
    clip_tok.save_pretrained(tmp_path / "full")
    assert M.Clip(tmp_path / "full").images([rgb(np.zeros((32, 32, 3)))]).shape == (1, 16)  # complete: loads
    # CLIP's config with only the text tower's weights: the vision tower would be random
    shutil.copytree(tmp_path / "full", tmp_path / "text")
    weights = load_file(tmp_path / "full" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k.startswith(("text_model.", "text_projection"))},
              tmp_path / "text" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(M.EmbeddingError, match=r"--clip .*text: .*missing.*vision_model, visual_projection") as e:
        M.Clip(tmp_path / "text")
    assert "\n" not in str(e.value)
    # a folder of a CLIP text model alone (its own config): not a CLIPModel at all
    text_cfg = cfg.text_config
    text_cfg.projection_dim = 16
    CLIPTextModelWithProjection(text_cfg).save_pretrained(tmp_path / "text-only")
    clip_tok.save_pretrained(tmp_path / "text-only")
    with pytest.raises(M.EmbeddingError, match=r"--clip .*text-only: .*clip_text_model.*not a CLIPModel"):
        M.Clip(tmp_path / "text-only")

    ViTModel(ViTConfig(image_size=224, patch_size=16, **small), add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    M.Dino(tmp_path / "dino")
    weights = load_file(tmp_path / "dino" / "model.safetensors")
    gone = next(k for k in sorted(weights) if "encoder.layer.1." in k)
    save_file({k: v for k, v in weights.items() if k != gone}, tmp_path / "dino" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(M.EmbeddingError, match=r"--dino .*dino: 1 weight\(s\) of ViTModel are missing.*layers?\.1\."):
        M.Dino(tmp_path / "dino")  # named as the model names it (transformers may rename checkpoint keys)


def test_changed_data_is_redone_not_scored_stale(tmp_path, tiny_dir):
    """Same session ids, other data: a turn whose input bytes, instruction or mask changed is edited again
    (and the multi-turn edits after it), never scored from its old edit; a record without a resume key
    (an older run) is redone."""
    root = write_fixture(tmp_path / "test")
    out = tmp_path / "out"
    kw = dict(model=str(tiny_dir), methods=["lime-mask"], config=CFG, threads=1, progress=False)
    first = evaluate.evaluate(evaluate.load(root, out), out, **kw)
    assert (first.done, first.skipped, first.redone) == (4, 0, 0)

    shutil.copy(root / "images" / "202" / "202-input.png", root / "images" / "101" / "101-input.png")  # 101: new input bytes
    sessions = json.loads((root / "edit_sessions.json").read_text())
    sessions["202"][0]["instruction"] = "make the square purple"  # 202 turn 1: a new instruction
    (root / "edit_sessions.json").write_text(json.dumps(sessions))
    again = evaluate.evaluate(evaluate.load(root, out), out, **kw)
    # 101_1 (input), 202_1 (instruction) and 202_iter_2 (edits 202_1's new output) are redone; 202_inde_2 is not
    assert (again.done, again.skipped, again.failed, again.redone) == (3, 1, 0, 3)
    assert "3 of them redone" in evaluate.report.markdown(again)
    fresh = evaluate.evaluate(evaluate.load(root, tmp_path / "fresh"), tmp_path / "fresh", **kw)
    for name in ("101_1", "202_1", "202_inde_2", "202_iter_2"):
        assert np.array_equal(pixels(out / "lime-mask" / "images" / f"{name}.png"),
                              pixels(tmp_path / "fresh" / "lime-mask" / "images" / f"{name}.png")), name
    assert again.summary["single"]["lime-mask"]["l1"] == pytest.approx(fresh.summary["single"]["lime-mask"]["l1"])

    mask = np.asarray(PIL.Image.open(root / "images" / "202" / "202-mask2.png")).copy()
    mask[..., 3] = 255 - mask[..., 3]  # turn 2's mask: the other region
    PIL.Image.fromarray(mask, "RGBA").save(root / "images" / "202" / "202-mask2.png")
    third = evaluate.evaluate(evaluate.load(root, out), out, **kw)
    assert (third.done, third.skipped, third.redone) == (2, 2, 2)  # 202_inde_2 and 202_iter_2

    results = out / "lime-mask" / "results.jsonl"
    old = [json.loads(x) for x in results.read_text().splitlines()]
    results.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "key"}) + "\n" for r in old))
    fourth = evaluate.evaluate(evaluate.load(root, out), out, **kw)
    assert (fourth.done, fourth.skipped, fourth.redone) == (4, 0, 4)


def test_an_unreadable_picture_is_a_failed_row(tmp_path, tiny_dir):
    """A corrupt input, or a corrupt target, used to stop the evaluation after the model loaded."""
    root = write_fixture(tmp_path / "test")
    (root / "images" / "101" / "101-input.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "images" / "202" / "202-output2.png").write_bytes(b"not a picture")
    out = tmp_path / "out"
    ev = evaluate.evaluate(evaluate.load(root, out), out, model=str(tiny_dir), methods=["ip2p"], config=CFG,
                           settings=["single"], threads=1, progress=False)
    assert (ev.done, ev.failed) == (2, 1)
    by_id = {x["id"]: x for x in ev.samples}
    assert by_id["101_1"]["status"] == "failed" and "101-input.png" in by_id["101_1"]["error"]
    assert by_id["202_inde_2"]["status"] == "failed" and "202-output2.png" in by_id["202_inde_2"]["error"]
    assert by_id["202_1"]["status"] == "done" and by_id["202_1"]["l1"] is not None
    assert ev.summary["single"]["ip2p"]["n"] == 1 and ev.summary["single"]["ip2p"]["failed"] == 2
    assert "| 1 | 2 |" in evaluate.report.markdown(ev)  # scored, failed


def test_a_bad_picture_in_parquet_names_its_row_and_leaves_no_half_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ref = evaluate.load(write_magicbrush(tmp_path / "ref", [7, 8], turns=1), tmp_path)
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("img_id", pa.string()), ("turn_index", pa.int32()), ("source_img", img), ("mask_img", img),
                        ("instruction", pa.string()), ("target_img", img)])
    rows = [{"img_id": s.id, "turn_index": 1, "source_img": {"bytes": s.turns[0].input.read_bytes(), "path": "x.png"},
             "mask_img": {"bytes": s.turns[0].mask.read_bytes(), "path": "m.png"}, "instruction": s.turns[0].instruction,
             "target_img": {"bytes": s.turns[0].target.read_bytes(), "path": "t.png"}} for s in ref.sessions]
    rows[1]["target_img"]["bytes"] = b"GIF89a, then nothing"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "dev-00000.parquet")
    out = tmp_path / "out"
    with pytest.raises(evaluate.DatasetError, match=r"dev-00000.parquet: row 1 \(img_id 8, turn 1\): target_img"):
        evaluate.load(tmp_path / "dev-00000.parquet", out, progress=False)
    assert not out.exists()  # nothing half-converted, and no --out folder made for it

    rows[1]["target_img"]["bytes"] = ref.sessions[1].turns[0].target.read_bytes()  # fixed: converted, then
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "dev-00000.parquet")
    assert [s.id for s in evaluate.load(tmp_path / "dev-00000.parquet", out, progress=False).sessions] == ["7", "8"]
    rows[0]["instruction"] = "make it purple"  # the parquet changes: converted again, not read stale
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "dev-00000.parquet")
    data = evaluate.load(tmp_path / "dev-00000.parquet", out, progress=False)
    assert data.sessions[0].turns[0].instruction == "make it purple"


def test_method_settings_are_checked_before_the_out_folder_is_touched(tmp_path, capsys):
    """lime:capture_step=25 on the 20-step shapes model used to be refused after DIR and its lock existed."""
    root = write_fixture(tmp_path / "test")
    data = evaluate.load(root, tmp_path / "unused")
    out = tmp_path / "out"
    with pytest.raises(evaluate.EvalError, match=r"lime:capture_step=25.*capture_step=25.*steps=20"):
        evaluate.evaluate(data, out, model="shapes-ip2p", methods=["ip2p", "lime:capture_step=25"], progress=False)
    assert not out.exists()
    assert main(["eval", str(root), "--out", str(out), "--model", "shapes-ip2p", "--methods", "lime:capture_step=25",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "capture_step=25" in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()
