"""SDXL InstructPix2Pix: diffusers' pipeline vs lime_fast (automatic RoI, user mask, accelerate).

    pytest benchmarks/bench_sdxl.py --benchmark-only

On CUDA: the full-size random-weight SDXL InstructPix2Pix replica (``replica_sdxl_pipeline``: 2.57 B-parameter
UNet, two text encoders, the SDXL VAE kept in fp32 as ``force_upcast`` asks) at 768 x 768 and 1024 x 1024,
fp16, 30 steps, with peak memory. On the CPU: the tiny random SDXL model at 128 x 128, fp32 (a smoke run of
the same code: the figures measure machinery, not a real model's cost).

Rows: diffusers (StableDiffusionXLInstructPix2PixPipeline, untouched), accelerate (the same call after
``lime_fast.accelerate(pipe)``), lime_auto (``engine.edit``, automatic RoI), lime_mask (a user mask).
"""

import os

import numpy as np
import pytest
import torch

import lime_fast
from lime_fast import LimeEngine
from lime_fast.demo import shapes_image
from _common import pedantic, timed
from bench_edit import untouched  # diffusers' own processors for the duration

CUDA = torch.cuda.is_available()
# LIME_BENCH_SDXL_SIZES=1024 picks sizes (a short device call)
SIZES = [int(s) for s in os.environ.get("LIME_BENCH_SDXL_SIZES", "768,1024" if CUDA else "128").split(",")]
STEPS = 30 if CUDA else 6
INSTRUCTION = "make the red circle blue"
TIMES: dict[tuple, float] = {}
PEAK: dict[tuple, float] = {}
NOTES: list[str] = []


@pytest.fixture(scope="module")
def setup():
    from lime_fast.testing.tiny import replica_sdxl_pipeline, tiny_sdxl_pipeline

    pipe = replica_sdxl_pipeline(device="cuda") if CUDA else tiny_sdxl_pipeline()
    pipe = pipe.to("cuda", torch.float16) if CUDA else pipe
    engine = LimeEngine.from_pipe(pipe)  # the SDXL VAE moves to fp32 (force_upcast)
    return pipe, engine


def _run(benchmark, key, fn, rounds=3):
    TIMES[key], peak = pedantic(benchmark, fn, rounds)
    if peak is not None:
        PEAK[key] = peak


def _call(pipe, image, size):
    return pipe(INSTRUCTION, image=image, num_inference_steps=STEPS, guidance_scale=2.0, image_guidance_scale=1.5,
                generator=torch.Generator().manual_seed(0), height=size, width=size, output_type="np").images


@pytest.mark.parametrize("size", SIZES)
def test_diffusers_and_accelerate(benchmark, setup, size):
    pipe, _ = setup
    image = shapes_image(size)
    with untouched(pipe.unet):
        want = _call(pipe, image, size)
        _run(benchmark, ("diffusers", size), lambda: _call(pipe, image, size), rounds=2)
        lime_fast.accelerate(pipe)
        try:
            for _ in range(2):
                got = _call(pipe, image, size)  # warm-up: graphs and autotuning
            TIMES[("accelerate", size)], got = timed(lambda: _call(pipe, image, size))
        finally:
            del pipe.unet.forward
    NOTES.append(f"{size}: max |accelerate - diffusers| {np.abs(got - want).max():.4f} (0-1 scale)")


@pytest.mark.parametrize("size", SIZES)
def test_lime_fast(benchmark, setup, size):
    _, engine = setup
    image = shapes_image(size)
    _run(benchmark, ("lime_auto", size), lambda: engine.edit(image, INSTRUCTION, steps=STEPS, progress=False), rounds=2)
    mask = np.zeros((size, size), bool)
    mask[: size // 2, : size // 2] = True
    start = engine.unet_evals
    engine.edit(image, INSTRUCTION, mask=mask, steps=STEPS, progress=False)  # warm-up (its own pass plan)
    assert engine.unet_evals - start == STEPS
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    TIMES[("lime_mask", size)], _ = timed(lambda: engine.edit(image, INSTRUCTION, mask=mask, steps=STEPS, progress=False))
    if CUDA:
        PEAK[("lime_mask", size)] = torch.cuda.max_memory_allocated() / 2**30


@pytest.fixture(scope="module", autouse=True)
def report(ratios):
    yield
    where = torch.cuda.get_device_name() if CUDA else "CPU"
    model = "SDXL InstructPix2Pix replica, fp16" if CUDA else "tiny random SDXL model, fp32"
    lines = [f"bench_sdxl ({where}, {model}, {STEPS} steps; x = diffusers time / row time):"]
    for size in SIZES:
        d = TIMES.get(("diffusers", size))
        for name, label in (("diffusers", "diffusers SDXL IP2P"), ("accelerate", "accelerate(pipe)"),
                            ("lime_auto", "lime_fast auto RoI"), ("lime_mask", "lime_fast user mask")):
            t = TIMES.get((name, size))
            if t is None:
                continue
            mem = f", peak {PEAK[(name, size)]:.2f} GiB" if (name, size) in PEAK else ""
            ratio = f" {d / t:6.2f}x" if d else ""
            lines.append(f"  {size}x{size} {label:<22} {t:8.3f} s{ratio}{mem}")
    lines += [f"  {n}" for n in NOTES]
    ratios.extend(lines)
