"""The faster modes of issue 14 as the benchmarks run them, and their fidelity against the faithful path.

``bench_edit.py::test_mode[NAME]`` runs one mode end to end (``run_mode``) and ``compile_cost.py`` times
a compiled mode's first edit in a cold and a warm process. A mode is engine options (``LimeEngine``
keywords: compile, channels_last, fuse_qkv, precision, cache_kv) plus per-edit ``EditConfig`` overrides
(cache_interval). ``faithful`` turns every fast mode off (fp16 on CUDA, CUDA graphs on): the reference
every other mode's images are compared with.

Fidelity (``fidelity``), on the decoded 8-bit images of the same edit (same image, instruction, seed):
max and mean absolute pixel difference on the 0-1 scale, PSNR in dB (inf: identical), and the IoU of the
automatic RoI with the faithful one.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from _common import sync, timed

INSTRUCTION = "make the red circle blue"
# 30 steps on a GPU (the issue's setting); 10 on the CPU smoke run, whose timings mean nothing anyway
STEPS = 30 if torch.cuda.is_available() else 10


@dataclass(frozen=True)
class Mode:
    name: str
    engine: dict = field(default_factory=dict)  # LimeEngine keyword arguments
    config: dict = field(default_factory=dict)  # EditConfig overrides for every edit
    what: str = ""

    @property
    def compiles(self) -> bool:
        return bool(self.engine.get("compile"))

    @property
    def accelerate_kwargs(self) -> dict | None:
        """``lime_fast.accelerate`` keywords for this mode; None where accelerate(pipe) has no such mode
        (step caching and the K/V cache need lime_fast's own passes)."""
        if self.config:
            return None
        return {k: v for k, v in self.engine.items() if k in ("compile", "channels_last", "fuse_qkv", "precision")}


_FAST = {"compile": True, "channels_last": True, "fuse_qkv": True}
MODES = {m.name: m for m in [
    Mode("faithful", {"cache_kv": False}, {}, "every fast mode off: the reference"),
    Mode("kv_cache", {}, {}, "cross-attention K/V once per pass (the default engine)"),
    Mode("fused_qkv", {"fuse_qkv": True}, {}, "fused QKV / KV projections"),
    Mode("channels_last", {"channels_last": True}, {}, "NHWC UNet and VAE"),
    Mode("stepcache2", {}, {"cache_interval": 2}, "deep blocks every 2nd edit step"),
    Mode("stepcache3", {}, {"cache_interval": 3}, "deep blocks every 3rd edit step"),
    Mode("fp8", {"precision": "fp8"}, {}, "float8 linear layers (torchao), eager kernels"),
    Mode("fp8_conv", {"precision": "fp8-conv"}, {}, "float8 linear layers and convolutions"),
    Mode("compile", {"compile": True}, {}, "inductor, default mode"),
    Mode("compile_max", {"compile": "max-autotune-no-cudagraphs"}, {}, "inductor, max-autotune-no-cudagraphs"),
    Mode("compile_fp8", {"compile": True, "precision": "fp8"}, {}, "inductor + float8 linear layers"),
    Mode("fast", dict(_FAST), {}, "compile + channels-last + fused QKV (+ K/V cache): exact-math modes"),
    Mode("fastest", {**_FAST, "precision": "fp8"}, {"cache_interval": 2}, "fast + fp8 + step caching every 2nd step"),
    Mode("compile_eager", {"compile": "eager"}, {}, "dynamo tracing without code generation (CPU dry run)"),
]}
# What the device check runs, most valuable first (bench_edit.py reads LIME_BENCH_MODES; these are defaults).
GPU_EAGER = "faithful,kv_cache,fused_qkv,channels_last,stepcache2,stepcache3,fp8"
GPU_COMPILED = "faithful,compile,fast,fastest,compile_fp8,compile_max,fp8_conv"
# The device check's CPU smoke run (tiny model): the same machinery, cheap modes.
CPU_EAGER = "faithful,kv_cache,fused_qkv,stepcache2"
CPU_COMPILED = "faithful,compile_eager"


def fidelity(ref, got) -> dict:
    """Pixel max / mean |difference| (0-1), PSNR (dB) and RoI IoU of ``got`` against ``ref`` (EditResults)."""
    a = np.asarray(ref.image, dtype=np.float64) / 255
    b = np.asarray(got.image, dtype=np.float64) / 255
    d = np.abs(a - b)
    mse = float((d**2).mean())
    inter = np.logical_and(ref.roi_grid, got.roi_grid).sum()
    union = np.logical_or(ref.roi_grid, got.roi_grid).sum()
    return {"max_diff": float(d.max()), "mean_diff": float(d.mean()),
            "psnr_db": math.inf if mse == 0 else 10 * math.log10(1 / mse),
            "roi_iou": float(inter / union) if union else 1.0}


def unet_step_inputs(engine, image_hw, steps: int = STEPS):
    """Seeded inputs of one three-branch edit-pass UNet evaluation at ``image_hw`` (pixels): latents x
    [3, 2C, h, w], timestep t, text states [3, 77, D], and the pass's plan, RoI grid [1, 16, 16] and kept
    tokens [1, 77] (penalty on at levels 0-1), on the engine's device and dtype."""
    from lime_fast.sampling import PassPlan

    h, w = (s // engine.vae_scale for s in image_hw)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2 * engine.vae.config.latent_channels, h, w, generator=gen).to(engine.device, engine.dtype)
    states = torch.randn(3, engine.tokenizer.model_max_length, engine.text_encoder.config.hidden_size, generator=gen)
    states = states.to(engine.device, engine.dtype)
    t = torch.tensor(500.0, device=engine.device)
    roi = torch.zeros(1, 16, 16, dtype=torch.bool, device=engine.device)
    roi[:, 4:12, 4:12] = True
    keep = torch.zeros(1, states.shape[1], dtype=torch.bool, device=engine.device)
    keep[:, :4] = True
    plan = PassPlan("edit", 1, (h, w), engine.vae.config.latent_channels, steps, (2.0, 1.5), reg_levels=(0, 1),
                    reg_range=(0, steps - 1), dtype=engine.dtype)
    return x, t, states, plan, roi, keep


def _unet_step(engine, image_hw, rounds: int) -> float:
    """One three-branch UNet evaluation of the edit pass (penalty on), graph-replayed on CUDA: median s."""
    from lime_fast.graphs import GraphedUNet

    x, t, states, plan, roi, keep = unet_step_inputs(engine, image_hw)
    engine.controller.begin_pass(plan, roi_grid=roi, keep=keep, context=states).at_step(0)
    try:
        unet = GraphedUNet(engine.unet, engine._unet, enabled=torch.cuda.is_available())
        with torch.no_grad():
            unet(x, t, states, return_dict=False)  # capture (and compile) outside the timing
            return timed(lambda: unet(x, t, states, return_dict=False)[0], rounds)[0]
    finally:
        engine.controller.end_pass()


def _pipe_call(pipe, image):
    return pipe(INSTRUCTION, image=image, num_inference_steps=STEPS, guidance_scale=2.0, image_guidance_scale=1.5,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def run_mode(mode: Mode, base, image, ref: dict | None, *, batches, rounds: int = 3, time_auto=None) -> dict:
    """Every figure of one mode on its own copy of ``base`` (a pipeline on the device).

    ref: ``run_mode``'s result for ``faithful`` (its results are the fidelity reference), or None for the
    faithful mode itself. time_auto(fn, rounds) -> (median s, last result): how the automatic edit is timed
    (pytest-benchmark's pedantic in bench_edit.py). Returns a dict of seconds, edits/s, GiB, fidelity."""
    from lime_fast import LimeEngine, accelerate

    cuda = torch.cuda.is_available()
    mask = np.zeros((image.height, image.width), bool)
    mask[: image.height // 2, : image.width // 2] = True
    cfg = dict(steps=STEPS, progress=False, **mode.config)
    row: dict = {"mode": mode.name, "what": mode.what}
    pipe = copy.deepcopy(base)
    t0 = time.perf_counter()
    engine = LimeEngine.from_pipe(pipe, **mode.engine)
    row["setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.edit(image, INSTRUCTION, **cfg)  # compiles (compile modes) and records the graphs of both passes
    sync()
    row["first_edit_s"] = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = time_auto or timed
    row["auto_s"], auto = timer(lambda: engine.edit(image, INSTRUCTION, **cfg), rounds)
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    row["compile_s"] = row["first_edit_s"] - row["auto_s"]  # compilation + graph capture + autotuning (+ noise)
    row["edit_pass_per_step_ms"] = 1e3 * auto.timings["edit"] / STEPS
    engine.edit(image, INSTRUCTION, mask=mask, **cfg)
    row["mask_s"], masked = timed(lambda: engine.edit(image, INSTRUCTION, mask=mask, **cfg), rounds)
    row["unet_step_ms"] = 1e3 * _unet_step(engine, (image.height, image.width), 20 if cuda else 3)
    row["edits_per_s"] = {}
    for b in batches:
        images = [image.rotate(90 * (i % 4)) for i in range(b)]
        engine.edit_batch(images, [INSTRUCTION] * b, **cfg)  # new batch size: new graphs (and compiles)
        secs, _ = timed(lambda ims=images: engine.edit_batch(ims, [INSTRUCTION] * len(ims), **cfg), 1)
        row["edits_per_s"][b] = b / secs
    row["results"] = {"auto": auto, "mask": masked}
    engine = None  # free the mode's graphs and copies before the accelerate(pipe) copy
    acc = mode.accelerate_kwargs
    if acc is not None:
        pipe2 = copy.deepcopy(base)
        accelerate(pipe2, **acc)
        _pipe_call(pipe2, image)  # capture (and compile)
        row["accelerate_s"], out = timed(lambda: _pipe_call(pipe2, image), rounds)
        row["results"]["accelerate"] = out
        pipe2 = None
    if ref is not None:
        r = ref["results"]
        row["fidelity"] = {k: fidelity(r[k], row["results"][k]) for k in ("auto", "mask")}
        if "accelerate" in row["results"] and "accelerate" in r:
            d = np.abs(row["results"]["accelerate"].astype(np.float64) - r["accelerate"].astype(np.float64))
            row["fidelity"]["accelerate"] = {"max_diff": float(d.max()), "mean_diff": float(d.mean())}
    pipe = None
    if cuda:
        torch.cuda.empty_cache()
    return row


def _psnr(x: float) -> str:
    return "identical" if math.isinf(x) else f"{x:.1f} dB"


def report(rows: dict, device: str, model: str) -> list[str]:
    """Markdown table lines: speed and fidelity of every mode that ran (``rows``: name -> run_mode's dict)."""
    lines = [f"faster modes ({device}, {model}, {STEPS} steps; fidelity vs faithful on the automatic edit):",
             "| mode | UNet step b3 | edit pass / step | auto edit | mask edit | accelerate | edits/s by batch | "
             "peak | first edit (- steady: compile + capture) | max / mean pixel diff | PSNR | RoI IoU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |")
            continue
        f = r.get("fidelity", {}).get("auto")
        fid = (f"{f['max_diff']:.4f} / {f['mean_diff']:.5f} | {_psnr(f['psnr_db'])} | {f['roi_iou']:.3f}"
               if f else "(reference) | | ")
        eps = ", ".join(f"{b}: {v:.2f}" for b, v in r["edits_per_s"].items())
        acc = f"{r['accelerate_s']:.3f} s" if "accelerate_s" in r else "n/a"
        peak = f"{r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else "n/a"
        lines.append(f"| {name} | {r['unet_step_ms']:.2f} ms | {r['edit_pass_per_step_ms']:.2f} ms | {r['auto_s']:.3f} s | "
                     f"{r['mask_s']:.3f} s | {acc} | {eps} | {peak} | {r['first_edit_s']:.1f} s ({r['compile_s']:+.1f} s) | {fid} |")
    for name, r in rows.items():
        for k in ("mask", "accelerate"):
            f = r.get("fidelity", {}).get(k)
            if f:
                lines.append(f"  {name}: {k} edit max / mean pixel diff vs faithful {f['max_diff']:.4f} / {f['mean_diff']:.5f}")
    return lines
