"""Opt-in changes to the UNet (and VAE) that make an evaluation faster: channels-last, fused QKV, FP8.

``LimeEngine(..., channels_last=, fuse_qkv=, precision=)`` and ``lime_fast.accelerate(pipe, ...)`` call
``apply`` once, before the first evaluation; each changes the modules in place. Each option's
fidelity against the faithful path is measured (docs/faster-modes.md; benchmarks/RESULTS.md):

* ``channels_last``: UNet and VAE weights in NHWC memory order, so cuDNN (and inductor) pick their
  tensor-core NHWC convolution kernels without layout transposes. Same math, other kernels: equal to
  float rounding (the CPU's oneDNN gives the same images to within 1/255 on the tiny model).
* ``fuse_qkv``: diffusers' ``Attention.fuse_projections``: one ``to_qkv`` GEMM instead of three in
  every self-attention and one ``to_kv`` in every cross-attention (``LimeAttnProcessor`` runs the fused
  layers). The unfused layers stay (as diffusers keeps them, for ``unfuse``): +112 MB at SD 1.5 fp16.
* ``precision="fp8"`` (Hopper/Ada only, torchao): the UNet's linear layers in float8 (e4m3) with dynamic
  activation scales, per row for a bf16 UNet and per tensor for fp16 (torchao's per-row kernel needs
  bf16). Never the attention penalty path: the cross-attention projections that make the logits LIME
  silences (``to_q``, ``to_k``, ``to_v``, ``to_kv`` of cross-attention), the attention itself, and
  the timestep embedding (3 rows: nothing to gain) stay in the engine's dtype. ``"fp8-conv"`` also
  quantizes the convolutions (per tensor), for the benchmark to decide whether it pays.

FP8 refuses cleanly, with one ``UnsupportedModeError`` naming the reason and what to do, before any
module is changed: on a CPU, on a GPU below compute capability 8.9 (no FP8 tensor cores), and without
torchao (``pip install 'lime-fast[fp8]'``).
"""

from __future__ import annotations

import torch

from .errors import UnsupportedModeError

PRECISIONS = (None, "fp8", "fp8-conv")
FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90): the first GPUs with FP8 tensor cores
# The projections that make the cross-attention logits (the penalty acts on them) stay in the engine's dtype.
_PENALTY_PATH = ("to_q", "to_k", "to_v", "to_kv")


def check_precision(precision, device) -> None:
    """Raise ``UnsupportedModeError`` (or ValueError for an unknown value) unless ``precision`` can run on
    ``device``; checks the device before the library, so the message names the first real obstacle."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision is None:
        return
    device = torch.device(device)
    if device.type != "cuda":
        raise UnsupportedModeError(
            f"precision={precision!r} needs an NVIDIA GPU with FP8 tensor cores (compute capability "
            f">= {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}: Ada or Hopper, e.g. L4, L40S, H100, H200); this "
            f"engine is on {device.type}. Use precision=None (the default).")
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < FP8_MIN_CAPABILITY:
        raise UnsupportedModeError(
            f"precision={precision!r} needs FP8 tensor cores (compute capability >= "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}); {torch.cuda.get_device_name(device)} has "
            f"{cap[0]}.{cap[1]}. Use precision=None (the default), or compile=True for a faster fp16/bf16 UNet.")
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_  # noqa: F401
    except ImportError as e:
        raise UnsupportedModeError(
            f"precision={precision!r} quantizes with torchao, which is not installed ({e}): "
            "pip install 'lime-fast[fp8]' (or pip install torchao), or use precision=None.") from None


def fp8_modules(unet, *, convs: bool = False) -> list[str]:
    """Names of the modules ``quantize_fp8`` converts: every ``nn.Linear`` except the timestep/added
    embeddings, the cross-attention projections that make the logits (the penalty path) and the
    projections a fused module no longer calls; with
    ``convs``, also every ``nn.Conv2d`` whose channel counts are multiples of 16 (FP8 GEMM tiles)."""
    from diffusers.models.attention_processor import Attention

    attn = {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}
    cross = {name for name, m in attn.items() if m.is_cross_attention}
    fused = {name for name, m in attn.items() if getattr(m, "fused_projections", False)}
    picked = []
    for fqn, m in unet.named_modules():
        parent, _, leaf = fqn.rpartition(".")
        if isinstance(m, torch.nn.Linear):
            if fqn.startswith(("time_embedding.", "add_embedding.", "class_embedding.")):
                continue
            if parent in cross and leaf in _PENALTY_PATH:
                continue
            if parent in fused and leaf in ("to_q", "to_k", "to_v"):  # replaced by to_qkv: never called
                continue
            picked.append(fqn)
        elif convs and isinstance(m, torch.nn.Conv2d) and m.in_channels % 16 == 0 and m.out_channels % 16 == 0:
            picked.append(fqn)
    return picked


def quantize_fp8(unet, *, convs: bool = False) -> int:
    """Quantize ``unet`` in place (the modules ``fp8_modules`` names; ``convs``: also convolutions, per tensor).
    Returns the number of modules converted. Call ``check_precision`` first."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    linears = set(fp8_modules(unet))
    granularity = PerRow() if unet.dtype == torch.bfloat16 else PerTensor()
    cfg = Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False)
    quantize_(unet, cfg, filter_fn=lambda m, fqn: fqn in linears)
    n = len(linears)
    if convs:  # torchao quantizes 4-D weights per tensor only
        conv_names = set(fp8_modules(unet, convs=True)) - linears
        conv_cfg = Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(), set_inductor_config=False)
        quantize_(unet, conv_cfg, filter_fn=lambda m, fqn: fqn in conv_names)
        n += len(conv_names)
    return n


def fuse_projections(unet) -> int:
    """Fuse every attention module's projections (diffusers' ``Attention.fuse_projections``); returns how
    many. The processors stay lime_fast's (``UNet2DConditionModel.fuse_qkv_projections`` would swap them)."""
    from diffusers.models.attention_processor import Attention

    n = 0
    for m in unet.modules():
        if isinstance(m, Attention) and not getattr(m, "fused_projections", False):
            m.fuse_projections(fuse=True)
            n += 1
    return n


def apply(unet, vae=None, *, channels_last: bool = False, fuse_qkv: bool = False, precision=None) -> dict:
    """Apply the chosen options in place (FP8 checked first, so a refusal changes nothing). Fusing comes
    before FP8, so the fused layers are the ones quantized. Returns what was done (for reports)."""
    check_precision(precision, unet.device)
    done = {}
    if fuse_qkv:
        done["fused_attention_modules"] = fuse_projections(unet)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        if vae is not None:
            vae.to(memory_format=torch.channels_last)
        done["channels_last"] = True
    if precision is not None:
        done["fp8_modules"] = quantize_fp8(unet, convs=precision == "fp8-conv")
    return done
