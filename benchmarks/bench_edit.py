"""Whole-edit throughput: plain diffusers InstructPix2Pix vs lime_fast (automatic RoI and user mask).

    pytest benchmarks/bench_edit.py --benchmark-only

CPU (default): the tiny random-weight model at 128 x 128, 30 steps, so the figures measure the
machinery's overhead (41 UNet evaluations for an automatic LIME edit vs 30 for a plain one, plus
segmentation), not a real model's cost. On CUDA the same file runs the full-size random-weight
SD 1.5 replica at 512 x 512 in fp16 (LIME_BENCH_FULL=1 forces it on the CPU: very slow).
"""

import os

import numpy as np
import pytest
import torch

from lime_fast import LimeEngine
from lime_fast.demo import shapes_image

CUDA = torch.cuda.is_available()
FULL = CUDA or os.environ.get("LIME_BENCH_FULL") == "1"
STEPS = 30
INSTRUCTION = "make the red circle blue"
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lime_fast.tiny import replica_pipeline, tiny_pipeline

    device = "cuda" if CUDA else "cpu"
    dtype = torch.float16 if CUDA else torch.float32
    pipe = (replica_pipeline() if FULL else tiny_pipeline()).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    size = 512 if FULL else 128
    engine = LimeEngine.from_pipe(pipe)
    return pipe, engine, shapes_image(size)


def _run(benchmark, name, fn):
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)
    TIMES[name] = benchmark.stats.stats.median


def test_diffusers_ip2p(benchmark, setup):
    pipe, engine, image = setup
    # lime_fast's processors are installed on this UNet; idle they are exactly diffusers' SDPA processor.

    def run():
        pipe(INSTRUCTION, image=image, num_inference_steps=STEPS, guidance_scale=2.0, image_guidance_scale=1.5,
             generator=torch.Generator().manual_seed(0))

    _run(benchmark, "diffusers", run)


def test_lime_fast_auto_roi(benchmark, setup):
    _, engine, image = setup
    _run(benchmark, "lime_auto", lambda: engine.edit(image, INSTRUCTION, steps=STEPS, progress=False))


def test_lime_fast_user_mask(benchmark, setup):
    _, engine, image = setup
    mask = np.zeros((image.height, image.width), bool)
    mask[: image.height // 2, : image.width // 2] = True
    _run(benchmark, "lime_mask", lambda: engine.edit(image, INSTRUCTION, mask=mask, steps=STEPS, progress=False))


@pytest.fixture(scope="module", autouse=True)
def report(ratios):
    """After the module's benchmarks: one line of side-by-side ratios (--benchmark-only skips plain tests)."""
    yield
    if len(TIMES) < 3:
        return
    where = torch.cuda.get_device_name() if CUDA else "CPU"
    model = "SD 1.5 replica 512x512 fp16" if FULL else "tiny random model 128x128 fp32"
    ratios.append(f"bench_edit ({where}, {model}, {STEPS} steps, medians of 3): "
                  f"diffusers IP2P {TIMES['diffusers']:.2f} s | lime_fast auto RoI {TIMES['lime_auto']:.2f} s "
                  f"({TIMES['lime_auto'] / TIMES['diffusers']:.2f}x) | lime_fast user mask {TIMES['lime_mask']:.2f} s "
                  f"({TIMES['lime_mask'] / TIMES['diffusers']:.2f}x)")
