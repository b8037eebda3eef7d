import os

# Tests never touch the network, and Triton kernels run in the interpreter when there is no GPU.
# Both must be set before huggingface_hub / triton are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests use the kernel's default block shapes: autotuning every test shape on a GPU cost the device
# check its time limit (H200, 2026-11-27). Every candidate shape has its own correctness test.
os.environ.setdefault("LIME_FAST_AUTOTUNE", "0")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_global_generators(request):
    """Every test starts from the same global random state (torch, numpy's legacy one, random), seeded
    from its own name: a draw a test forgot to seed is still the same on every run, in any order, and
    under any PYTHONHASHSEED (CRC32, not hash())."""
    import zlib

    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture(scope="session")
def clip_tok(tmp_path_factory):
    """The real CLIP tokenizer, built offline from open_clip_torch's BPE file."""
    from lime_fast.clip_bpe import clip_tokenizer

    return clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, clip_tok):
    """A tiny random InstructPix2Pix checkpoint (8 heads), saved as a diffusers folder (safetensors)."""
    from lime_fast.testing.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("models") / "tiny8", heads=8, tokenizer=clip_tok)


@pytest.fixture(scope="session")
def tiny_dir_heads(tmp_path_factory, clip_tok):
    """Another tiny checkpoint, with 2 heads in the first block and 4 elsewhere."""
    from lime_fast.testing.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-2-4", heads=(2, 4, 4, 4), seed=1, tokenizer=clip_tok)


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory, clip_tok):
    """A tiny random SDXL InstructPix2Pix checkpoint (two text encoders, added conditions, Euler), saved."""
    from lime_fast.testing.tiny import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", tokenizer=clip_tok)


@pytest.fixture(scope="session")
def engine(tiny_dir):
    from lime_fast import LimeEngine

    return LimeEngine.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def shapes():
    from lime_fast.demo import shapes_image

    return shapes_image(128)


# Small, fast settings for engine tests: 6 steps, capture at 2, regularize steps 0..4, 32-cell grid.
FAST = dict(steps=6, capture_step=2, reg_steps=(0, 4), grid_size=32, top_k=8)


@pytest.fixture
def fast():
    return dict(FAST)
