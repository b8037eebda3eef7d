#!/usr/bin/env python
"""Train a small InstructPix2Pix-layout diffusers pipeline on the synthetic shapes data, on the CPU.

    python scripts/train_shapes.py --out models/shapes-ip2p --minutes 90 --seed 0

Stage 1 trains a small AutoencoderKL (factor 4: 64x64 images -> 4x16x16 latents) for ``--vae-frac`` of
the time budget and freezes it; its scaling_factor is then measured as 1 / std of the latents. Stage 2
trains the UNet (SD 1.5 layout: 3 CrossAttnDown + Down, attention mid block, Up + 3 CrossAttnUp, so all
of LIME's levels exist; 8 input channels) and a small CLIP text encoder over the real CLIP tokenizer
jointly, with the InstructPix2Pix objective and conditioning dropout (5% text only, 5% both, 5% image
only), so both guidance scales work. Every step draws fresh samples (seeds from a counter).

Grounding fine-tune (how the shipped model was made, see its card): ``--init DIR --vae-steps 0`` starts
from a saved pipeline, ``--attn-loss W`` adds a token-level grounding loss that pulls the content words'
cross-attention into the true edit region, and ``--pad-drop P`` hides the padding after EOS from the
cross-attention of a share P of the samples. Without them LIME's automatic RoI barely overlaps the
region (IoU 0.07 over 200 held-out edits; 0.29 after the fine-tune).

Continuing (how the shipped model's third run was made): ``--init DIR --vae-decoder-only`` fine-tunes
only the VAE's decoder (the encoder, latents and scaling_factor stay those the UNet learned), and
``--first-batch N`` starts the data after the batches an earlier run drew.

BOS sink (tried, not shipped: benchmarks/RESULTS.md): ``--sink W --sink-share S`` pushes every pixel's
cross-attention on BOS up to at least S, as in Stable Diffusion, where BOS is the no-op LIME silences.

Training under LIME (``--lime-share P``): a share P of the samples is trained the way LIME's regularized
edit samples them: at levels 0-1, for timesteps 100-999, the pixels inside the true edit region attend
only to the tokens LIME keeps (BOS, stop words and padding silenced; ``GroundingAttn``).

With ``--minutes`` the step counts are fixed after a short timing probe and written to the model card,
together with the exact command (``--vae-steps``/``--unet-steps``) that reproduces the weights.
Outputs in ``--out``: the diffusers folder (safetensors), ``loss.png``, ``loss.json``, ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from lime_fast.config import EditConfig  # noqa: E402
from lime_fast.testing.shapes import make_batch  # noqa: E402

SIZE = 64
SEED_STRIDE = 1_000_003  # stage offsets in the sample-seed counter


def parse_args(argv=None):
    """The command line -> argparse.Namespace (``--smoke`` already applied to the sizes and steps)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # the groups add their flags in the order --help lists them
    _add_budget_args(p)
    _add_optimizer_args(p)
    _add_model_args(p)
    _add_attention_args(p)
    _add_continue_args(p)
    _add_machine_args(p)
    _add_mode_args(p)
    a = p.parse_args(argv)
    _check_args(p, a)
    if a.smoke:
        _apply_smoke(a)
    return a


def _add_budget_args(p):
    """Where to write, the seed and how long each stage trains (minutes or fixed step counts)."""
    p.add_argument("--out", required=True, help="output folder (diffusers pipeline + model card)")
    p.add_argument("--minutes", type=float, default=90.0, help="total time budget (both stages)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-frac", type=float, default=0.15, help="share of the budget for the VAE stage")
    p.add_argument("--vae-steps", type=int, default=None, help="fix the VAE steps (overrides the time budget)")
    p.add_argument("--unet-steps", type=int, default=None, help="fix the UNet steps (overrides the time budget)")


def _add_optimizer_args(p):
    """Batch size, learning rates (stage 2, stage 1) and warmup steps."""
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)


def _add_model_args(p):
    """The models' widths and depths, the EMA and the InstructPix2Pix objective."""
    p.add_argument("--width", type=int, default=48, help="UNet width of the first block (then 2x, 2x, 2x)")
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--vae-width", type=int, default=16, help="VAE channels (w, 2w, 2w)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of UNet + text-encoder weights (0: off)")
    p.add_argument("--dropout", type=float, default=0.05, help="InstructPix2Pix conditioning-dropout p")
    p.add_argument("--prediction", choices=("v_prediction", "epsilon"), default="v_prediction",
                   help="UNet target. v: from scratch, epsilon gives almost no gradient towards copying the "
                        "source at high noise (a 40-min epsilon run sampled flat red images; x0 error 1.17 at t=999)")


def _add_attention_args(p):
    """The cross-attention losses and silencing: grounding, padding drop, LIME's regularization, BOS sink."""
    p.add_argument("--attn-loss", type=float, default=0.0,
                   help="weight of the grounding loss on the content words' cross-attention (0: off; see grounding_loss)")
    p.add_argument("--pad-drop", type=float, default=0.0,
                   help="share of captioned samples whose cross-attention cannot see the padding after EOS")
    p.add_argument("--lime-share", type=float, default=0.0,
                   help="share of the samples trained under LIME's regularization inside the true region (0: off; "
                        "see GroundingAttn): the keep rule silences BOS, stop words and padding there at levels 0-1")
    p.add_argument("--sink", type=float, default=0.0,
                   help="weight of the BOS-sink loss (0: off; see sink_loss): teaches the UNet to park attention on BOS")
    p.add_argument("--sink-share", type=float, default=0.7,
                   help="the BOS share of each pixel's cross-attention below which sink_loss penalises")


def _add_continue_args(p):
    """Starting from a saved pipeline and continuing its data."""
    p.add_argument("--init", default=None,
                   help="start from this saved pipeline (its VAE, UNet and text encoder) instead of from scratch; "
                        "use with --vae-steps 0 to keep its VAE")
    p.add_argument("--vae-decoder-only", action="store_true",
                   help="with --init: stage 1 trains only the VAE's decoder, so the encoder, the latents and the "
                        "scaling_factor stay those the starting UNet was trained on")
    p.add_argument("--first-batch", type=int, default=0,
                   help="start each stage's data at this batch (with --init: continue on samples the starting "
                        "run never drew)")


def _add_machine_args(p):
    """Logging, threads, saved dtype, device, autocast and data workers."""
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "float16"), default="float16", help="dtype of the saved weights")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--amp", choices=("auto", "none", "bf16"), default="auto",
                   help="autocast for the forward passes: auto = bf16 on CUDA, none on the CPU (fp32 master weights)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes that draw and tokenize the batches (a 64x64 sample takes ~1 ms: at batch 256 "
                        "the data would take longer than an H200's step without them)")


def _add_mode_args(p):
    """Compact checkpoints and assembling them (device runs), and the smoke mode (tests)."""
    p.add_argument("--compact", action="store_true",
                   help="write a compact checkpoint to --out (fp16 safetensors per model, state.json, train.log: at "
                        "most 8 files of <= 15 MiB, what a device call can bring back) instead of the pipeline; "
                        "turn it into the pipeline and model card with --assemble")
    p.add_argument("--ckpt-minutes", type=float, default=0.0,
                   help="with --compact: also write the checkpoint every this many minutes of stage 2 (a run cut "
                        "off by its time limit still leaves one)")
    p.add_argument("--assemble", default=None, metavar="CKPT",
                   help="no training: build the diffusers pipeline, loss curves and model card in --out from a "
                        "compact checkpoint folder")
    p.add_argument("--smoke", action="store_true", help="a few steps of each stage at tiny widths (tests)")


def _check_args(p, a):
    """Exit through ``p.error`` on flags that do not go together."""
    if a.ckpt_minutes and not a.compact:
        p.error("--ckpt-minutes needs --compact")
    if a.vae_decoder_only and not a.init:
        p.error("--vae-decoder-only needs --init (a trained encoder to keep)")
    if not (0 <= a.pad_drop and 0 <= a.lime_share and a.pad_drop + a.lime_share <= 1):
        p.error(f"--pad-drop {a.pad_drop} and --lime-share {a.lime_share}: shares of disjoint sets of samples, "
                "each at least 0 and together at most 1")


def _apply_smoke(a):
    """--smoke: tiny widths and batch, 3 steps per stage unless fixed, warmup and logging every step."""
    a.width, a.text_width, a.text_layers, a.vae_width, a.batch = 16, 32, 1, 16, 4
    a.vae_steps = 3 if a.vae_steps is None else a.vae_steps
    a.unet_steps = 3 if a.unet_steps is None else a.unet_steps
    a.warmup, a.log_every = 1, 1


# --- models ---------------------------------------------------------------------------------------
def build_models(a, tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(a.seed)
    w, vw = a.width, a.vae_width
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(vw, 2 * vw, 2 * vw),  # 3 blocks: factor 4
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=8,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(w, 2 * w, 2 * w, 2 * w),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=a.text_width,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=a.text_width,
            intermediate_size=4 * a.text_width,
            num_hidden_layers=a.text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=a.text_width,
        )
    )
    return vae, unet, text_encoder


def load_models(path):
    """VAE, UNet and text encoder of a saved pipeline, in fp32 (for --init)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    kw = dict(torch_dtype=torch.float32)
    return (AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
            UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw))


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _steps_for(seconds: float, sec_per_step: float) -> int:
    return max(1, int(seconds / max(sec_per_step, 1e-6)))


def _probe_total(curve: Curve, start: float, probe: int, budget_s: float, log, tag: str) -> int:
    """The stage's step count from the speed of its first ``probe`` steps (started at ``start``, time.time()
    seconds) and the ``budget_s`` seconds it has in all; logged as "[tag] s/step -> steps"."""
    curve.flush()  # waits for the device: the probe's time is real
    spent = time.time() - start
    total = max(probe + 1, probe + _steps_for(budget_s - spent, spent / probe))
    log(f"[{tag}] {spent / probe:.2f} s/step -> {total} steps")
    return total


def _set_lr(opt, lr: float) -> None:
    """Set every parameter group's learning rate of ``opt`` to ``lr``."""
    for g in opt.param_groups:
        g["lr"] = lr


# --- where and how: device, autocast, data -------------------------------------------------------
def device_and_amp(a) -> tuple[torch.device, bool]:
    """(device, bf16 autocast?) from --device / --amp; the device as the package resolves it."""
    from lime_fast.models import resolve_device

    try:
        device = resolve_device(None if a.device == "auto" else a.device)
    except ValueError as e:
        raise SystemExit(f"--device: {e}") from None
    amp = device.type == "cuda" if a.amp == "auto" else a.amp == "bf16"
    return device, amp


class Batches(torch.utils.data.Dataset):
    """Item i is the i-th training batch: ``make_batch`` of seeds ``base + i * batch`` onwards, plus, with a
    tokenizer, the padded token ids ``ids`` [B, 77] and, with ``content``, LIME's content positions
    [B, 77] (1.0 where a content word is) and its keep mask ``lime_keep`` [B, 77] bool (``keep_mask``).
    Drawn where the loader runs it (``--workers`` processes)."""

    def __init__(self, base: int, batch: int, tokenizer=None, content: bool = False):
        self.base, self.batch, self.tokenizer, self.content = base, batch, tokenizer, content

    def __len__(self) -> int:
        return 10**12  # endless: the training loop decides when to stop

    def __getitem__(self, i: int) -> dict:
        start = self.base + i * self.batch
        b = make_batch(range(start, start + self.batch), SIZE)
        tok = self.tokenizer
        if tok is not None:
            b["ids"] = tok(b["instruction"], padding="max_length", max_length=tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
            if self.content:
                from lime_fast.tokens import keep_mask, token_roles

                roles = [token_roles(tok, text) for text in b["instruction"]]
                c = torch.zeros(b["ids"].shape)
                for j, r in enumerate(roles):
                    c[j, r.content] = 1.0
                b["content"] = c
                b["lime_keep"] = keep_mask(roles)
        return b


def batches(a, data: Batches, device: torch.device):
    """The batches of ``data`` in order, on ``device``; drawn ahead by ``a.workers`` processes if any."""
    if a.workers > 0:
        source = torch.utils.data.DataLoader(data, batch_size=None, num_workers=a.workers, prefetch_factor=4,
                                             pin_memory=device.type == "cuda")
    else:
        source = (data[i] for i in range(len(data)))
    for b in source:
        yield {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}


class Curve(list):
    """Per-step loss values. Steps add device tensors; ``flush`` turns them into floats (one host sync per
    log line rather than per step, which on a GPU would stall the queue every step)."""

    def __init__(self):
        super().__init__()
        self.pending = []

    def add(self, value: torch.Tensor):
        self.pending.append(value.detach().float())

    def flush(self) -> "Curve":
        if self.pending:
            self.extend(torch.stack(self.pending).tolist())
            self.pending.clear()
        return self

    def recent(self, n: int) -> float:
        return float(np.mean(self.flush()[-n:]))


# --- stage 1: VAE ----------------------------------------------------------------------------------
def vae_loss(vae, x, gen, decoder_only: bool = False):
    with torch.set_grad_enabled(torch.is_grad_enabled() and not decoder_only):
        post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=x.device)
    rec = vae.decode(z).sample.float()
    kl = 0.5 * (post.mean.float().pow(2) + post.var.float() - 1.0 - post.logvar.float()).mean()
    if decoder_only:  # the posterior is fixed: the KL term has no gradient left
        kl = kl.detach()
    rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
    return rec_loss + 1e-6 * kl, rec_loss


def decoder_params(vae) -> list:
    """The parameters after the latent: the decoder and, where the config has one, post_quant_conv."""
    return [p for m in (vae.decoder, getattr(vae, "post_quant_conv", None)) if m is not None for p in m.parameters()]


def train_vae(a, vae, budget_s, log, device=torch.device("cpu"), amp=False):
    params = decoder_params(vae) if a.vae_decoder_only else list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=a.vae_lr, weight_decay=0.0)
    gen = torch.Generator(device).manual_seed(a.seed + 1)
    total = a.vae_steps
    start = time.time()
    curve, step, probe = Curve(), 0, max(3, min(10, a.warmup, 50))  # probe steps lie in the warmup: lr independent of total
    vae.train()
    data = batches(a, Batches(a.first_batch * a.batch, a.batch), device) if total != 0 else iter(())
    while total is None or step < total:
        if total is None and step == probe:  # fix the step count from the measured speed
            total = _probe_total(curve, start, probe, budget_s, log, "vae")
        _set_lr(opt, lr_at(step, total or 10**9, a.vae_lr, min(a.warmup, 50)))
        b = next(data)
        x = torch.cat([b["source"][: a.batch // 2], b["target"][a.batch // 2 :]])  # both halves of the data
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, rec = vae_loss(vae, x, gen, a.vae_decoder_only)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.add(rec)
        if step % a.log_every == 0 or step == (total or 0) - 1:
            log(f"[vae] step {step:5d} rec {curve.recent(a.log_every):.4f}  {time.time() - start:7.1f}s")
        step += 1
    vae.eval().requires_grad_(False)
    return list(curve.flush()), step, time.time() - start


@torch.no_grad()
def vae_psnr(vae, n: int = 256, seed_base: int = 5_000_000, device=torch.device("cpu")) -> float:
    """Mean reconstruction PSNR (dB, peak = the [0, 1] range) of the VAE over ``n`` held-out pictures
    (sources and targets of the held-out seeds), decoding the posterior mean."""
    vals = []
    for i in range(0, n // 2, 32):
        b = make_batch(range(seed_base + i, seed_base + min(i + 32, n // 2)), SIZE)
        x = torch.cat([b["source"], b["target"]]).to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        mse = ((rec - x) / 2).pow(2).flatten(1).mean(1)
        vals.append(-10 * torch.log10(mse.clamp_min(1e-10)))
    return float(torch.cat(vals).mean())


@torch.no_grad()
def measure_scaling(vae, n: int = 256, seed_base: int = 7 * SEED_STRIDE, device=torch.device("cpu")) -> float:
    zs = []
    for i in range(0, n, 32):
        b = make_batch(range(seed_base + i, seed_base + i + 32), SIZE)
        zs.append(vae.encode(torch.cat([b["source"], b["target"]]).to(device)).latent_dist.sample())
    return float(1.0 / torch.cat(zs).flatten().std())


# --- stage 2: InstructPix2Pix ---------------------------------------------------------------------
class GroundingAttn:
    """Training-time cross-attention processor (diffusers' ``attn2``): attention through the shared eager
    reference, with per-sample token silencing, that keeps each layer's head-averaged probabilities
    [B, N, T] (with their graph) for ``grounding_loss``.

    A query pixel inside a sample's silencing region sees only the tokens of state["keep"] [B, T]:
    state["pad_drop"] [B] bool: every pixel of the sample (keep: BOS..EOS);
    state["lime_roi"] {N: [B, N] bool} (``--lime-share``, ``lime_rois``): at the layers with N query
    pixels, the LIME samples' pixels inside the true region (keep: LIME's keep rule). The two sets of
    samples are disjoint."""

    def __init__(self, state: dict):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        from lime_fast.attention import project_cross
        from lime_fast.kernels.reference import regularized_attention_ref

        assert encoder_hidden_states is not None and hidden_states.ndim == 3 and not attn.residual_connection
        B, N, _ = hidden_states.shape
        q, k, v = project_cross(attn, hidden_states, encoder_hidden_states)
        drop = self.state["pad_drop"]  # [B] bool: this sample cannot see its padding
        roi = drop[:, None].expand(B, N)
        lime_roi = self.state.get("lime_roi", {}).get(N)
        if lime_roi is not None:
            roi = roi | lime_roi
        out, probs = regularized_attention_ref(q, k, v, roi=roi, keep=self.state["keep"], capture=self.state["all"])
        self.state["maps"].append(probs)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(B, N, -1)))
        return out / attn.rescale_output_factor


def grounding_loss(maps, mask, content) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of each content word's cross-attention falls outside the true edit region.

    maps: per cross-attention layer, head-averaged probabilities [B, N_l, T] (N_l = h_l * w_l, square);
    mask: [B, H, W] bool true edit region; content: [B, T] float weights (1 on the content positions
    that LIME's localization averages, 0 elsewhere; all-zero rows are skipped).
    Each word's map is normalised over the pixels; its mass inside the region (the region downsampled
    to the layer's grid by area) is m; the loss is the weighted mean of (1 - m)^2 over words and layers,
    a token-level grounding loss in the spirit of TokenCompose (Wang et al., CVPR 2024).
    Returns (loss, mean m).
    """
    w = content / content.sum().clamp_min(1.0)
    losses, masses = [], []
    for a in maps:
        side = int(round(a.shape[1] ** 0.5))
        region = F.adaptive_avg_pool2d(mask[:, None].float(), (side, side)).flatten(1)  # [B, N]
        m = (a * region[:, :, None]).sum(1) / a.sum(1).clamp_min(1e-12)  # [B, T]
        losses.append(((1 - m) ** 2 * w).sum())
        masses.append((m * w).sum())
    return torch.stack(losses).mean(), torch.stack(masses).mean().detach()


def sink_loss(maps, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """How far each pixel's cross-attention on BOS falls short of ``share``.

    maps: per cross-attention layer, head-averaged probabilities [B, N_l, T] (BOS at position 0). The loss
    is the mean over layers and pixels of relu(share - p_BOS)^2. BOS comes out of CLIP's causal text
    encoder the same for every instruction, so a large BOS share is a no-op the UNet can fall back on, as
    Stable Diffusion's does (about 0.9 of its attention); LIME silences BOS inside the RoI, which
    then hands that share to the instruction's words. Returns (loss, mean p_BOS).
    """
    losses, shares = [], []
    for a in maps:
        bos = a[..., 0]
        losses.append(F.relu(share - bos).pow(2).mean())
        shares.append(bos.mean())
    return torch.stack(losses).mean(), torch.stack(shares).mean().detach()


LIME_LEVELS = EditConfig().reg_levels  # the levels whose cross-attention LIME regularizes (SD 1.5's)
LIME_MIN_T = 100  # LIME regularizes the first nine tenths of the steps: timesteps 999 down to about 100


def lime_rois(lime: torch.Tensor, mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """{N: [B, N] bool}: for each of LIME_LEVELS (N its query pixels), the pixels of the LIME samples
    (lime [B] bool) inside their true edit region (mask [B, SIZE, SIZE] bool), resized as the engine
    resizes the RoI (``lime_fast.attention.level_rois``). Latent grid: SIZE / 4 (the VAE's factor)."""
    from lime_fast.attention import level_grids, level_rois

    grids = level_grids((SIZE // 4, SIZE // 4))
    return {m.shape[1]: lime[:, None] & m for m in level_rois(mask, grids, LIME_LEVELS).values()}


def training_alphas_cumprod() -> torch.Tensor:
    """[1000] cumulative alphas of the training noise (DDPM, scaled_linear 0.00085..0.012, SD's schedule)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear").alphas_cumprod


def install_grounding(unet, state: dict) -> None:
    """Put a ``GroundingAttn(state)`` on every cross-attention (attn2) module, the other processors as they are."""
    procs = dict(unet.attn_processors)
    unet.set_attn_processor({k: GroundingAttn(state) if k.endswith("attn2.processor") else v for k, v in procs.items()})


class Stage2:
    """What stage 2's steps share: the run's arguments ``a``, the models (the VAE frozen), the trained
    parameters (UNet then text encoder) with their optimiser and EMA copies (None: --ema 0), the noise
    generator, the training noise's cumulative alphas ``acp`` [1000], the empty instruction's token ids
    ``empty_ids`` [1, 77], GroundingAttn's ``state`` (installed on the UNet only when ``grounding``: any
    attention flag is on) and the curves."""

    def __init__(self, a, vae, unet, text_encoder, tokenizer, device, amp):
        self.a, self.vae, self.unet, self.text_encoder, self.tokenizer = a, vae, unet, text_encoder, tokenizer
        self.device, self.amp = device, amp
        self.acp = training_alphas_cumprod().to(device)
        self.params = list(unet.parameters()) + list(text_encoder.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=a.lr, weight_decay=1e-2)
        self.ema = [p.detach().clone() for p in self.params] if a.ema > 0 else None
        self.gen = torch.Generator(device).manual_seed(a.seed + 2)
        self.empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                                   return_tensors="pt").input_ids.to(device)
        self.state = {"maps": []}
        self.grounding = a.attn_loss > 0 or a.pad_drop > 0 or a.sink > 0 or a.lime_share > 0
        if self.grounding:
            install_grounding(unet, self.state)
        self.curves = {"unet_eps": Curve(), "grounding": Curve(), "mass_in": Curve(), "bos_share": Curve()}


def _stage2_curves(s: Stage2) -> dict:
    """{"unet_eps", "grounding", "mass_in", "bos_share"} -> per-step floats (the last three empty without
    GroundingAttn)."""
    return {k: list(c.flush()) for k, c in s.curves.items()}


def _noised_latents(s: Stage2, b: dict):
    """(zt, z_src, t, target) of batch b: the noised target latents zt [B, 4, 16, 16] at timesteps t [B],
    the source latents z_src (posterior mode, unscaled as InstructPix2Pix does) and the UNet's target
    (the noise, or v for --prediction v_prediction)."""
    B, gen, device = s.a.batch, s.gen, s.device
    with torch.no_grad():
        post = s.vae.encode(torch.cat([b["target"], b["source"]])).latent_dist
        eps = torch.randn(post.mean[:B].shape, generator=gen, device=device)
        z0 = (post.mean[:B] + post.std[:B] * eps) * s.vae.config.scaling_factor
        z_src = post.mode()[B:]
    noise = torch.randn(z0.shape, generator=gen, device=device)
    t = torch.randint(0, 1000, (B,), generator=gen, device=device)
    ac = s.acp[t].view(B, 1, 1, 1)
    zt = ac.sqrt() * z0 + (1 - ac).sqrt() * noise
    target = noise if s.a.prediction == "epsilon" else ac.sqrt() * noise - (1 - ac).sqrt() * z0
    return zt, z_src, t, target


def _conditioning_dropout(s: Stage2, z_src: torch.Tensor):
    """(drop_text [B, 1, 1] bool, z_src with the dropped images zeroed). InstructPix2Pix's dropout, p each:
    r < p drops the text only, p <= r < 2p both, 2p <= r < 3p the image only."""
    B, p = s.a.batch, s.a.dropout
    r = torch.rand(B, generator=s.gen, device=s.device)
    drop_text = (r < 2 * p).view(B, 1, 1)
    keep_image = ~((r >= p) & (r < 3 * p))
    return drop_text, z_src * keep_image.view(B, 1, 1, 1).float()


def _set_silencing(s: Stage2, b: dict, t: torch.Tensor, drop_text: torch.Tensor) -> torch.Tensor:
    """Fill GroundingAttn's state for batch b (keep rows, --pad-drop and --lime-share samples) and return
    the content weights [B, T] grounding_loss uses (zero for the samples whose text was dropped)."""
    a, B, state, device = s.a, s.a.batch, s.state, s.device
    ids = b["ids"]
    T = ids.shape[1]
    eos = (ids == s.tokenizer.eos_token_id).int().argmax(1)  # first EOS (CLIP pads with EOS)
    state["keep"] = torch.arange(T, device=device)[None] <= eos[:, None]
    u = torch.rand(B, generator=s.gen, device=device)
    state["pad_drop"] = (u < a.pad_drop) & ~drop_text.view(B)
    if a.lime_share > 0:  # every branch, the text-dropped ones too: the engine regularizes all three
        lime = (u >= a.pad_drop) & (u < a.pad_drop + a.lime_share) & (t >= LIME_MIN_T)
        # a LIME sample's keep row matters only where lime_roi silences, so it can replace the padding rule
        state["keep"] = torch.where(lime[:, None], b["lime_keep"], state["keep"])
        state["lime_roi"] = lime_rois(lime, b["mask"])
    state["all"] = torch.arange(B, device=device)
    state["maps"].clear()
    return b["content"] * (~drop_text.view(B, 1)).float()


def _predict(s: Stage2, ids, drop_text, zt, z_src, t) -> torch.Tensor:
    """The UNet's prediction [B, 4, 16, 16] on [zt, z_src], the text of the drop_text samples replaced by
    the empty instruction's."""
    B = s.a.batch
    with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.amp):
        emb = s.text_encoder(torch.cat([ids, s.empty_ids]))[0]
        emb, empty = emb[:B], emb[B:]
        emb = torch.where(drop_text, empty.expand_as(emb), emb)
        return s.unet(torch.cat([zt, z_src], 1), t, encoder_hidden_states=emb).sample


def _add_attention_losses(s: Stage2, loss: torch.Tensor, mask: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """``loss`` plus the weighted grounding and sink losses on the cross-attention maps GroundingAttn kept
    this step (mask [B, 64, 64] bool true edit region, content [B, T]); their values go to the curves."""
    maps = [m.float() for m in s.state["maps"]]
    s.state["maps"].clear()
    g_loss, mass = grounding_loss(maps, mask, content)
    s_loss, bos = sink_loss(maps, s.a.sink_share)
    s.curves["grounding"].add(g_loss)
    s.curves["mass_in"].add(mass)
    s.curves["bos_share"].add(bos)
    if s.a.attn_loss > 0:
        loss = loss + s.a.attn_loss * g_loss
    if s.a.sink > 0:
        loss = loss + s.a.sink * s_loss
    return loss


def _unet_step(s: Stage2, b: dict, step: int) -> None:
    """One optimiser step of stage 2 on batch b (the learning rate already set), then the EMA update."""
    zt, z_src, t, target = _noised_latents(s, b)
    drop_text, z_src = _conditioning_dropout(s, z_src)
    content = _set_silencing(s, b, t, drop_text) if s.grounding else None
    pred = _predict(s, b["ids"], drop_text, zt, z_src, t)
    mse = F.mse_loss(pred.float(), target)
    loss = _add_attention_losses(s, mse, b["mask"], content) if s.grounding else mse
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s.params, 1.0)
    s.opt.step()
    if s.ema is not None:
        d = min(s.a.ema, (1 + step) / (10 + step))  # small at first: the EMA does not hold on to the initial weights
        with torch.no_grad():
            torch._foreach_lerp_(s.ema, [q.detach() for q in s.params], 1 - d)
    s.curves["unet_eps"].add(mse)


def _log_unet(s: Stage2, step: int, start: float, log) -> None:
    """The log line of ``step``: the losses' means over the last --log-every steps, lr, seconds since ``start``."""
    a, c = s.a, s.curves
    extra = (f" grounding {c['grounding'].recent(a.log_every):.4f} mass in {c['mass_in'].recent(a.log_every):.3f}"
             f" BOS {c['bos_share'].recent(a.log_every):.3f}") if s.grounding else ""
    log(f"[unet] step {step:5d} loss {c['unet_eps'].recent(a.log_every):.4f}{extra} lr {s.opt.param_groups[0]['lr']:.2e}"
        f"  {time.time() - start:7.1f}s")


def _stage2_finish(s: Stage2) -> None:
    """The EMA weights into the models, diffusers' attention processors back, both models in eval mode."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if s.ema is not None:
        with torch.no_grad():
            for p_, e in zip(s.params, s.ema):
                p_.copy_(e)
    if s.grounding:
        s.unet.set_attn_processor(AttnProcessor2_0())
    s.unet.eval()
    s.text_encoder.eval()


def train_unet(a, vae, unet, text_encoder, tokenizer, budget_s, log, device=torch.device("cpu"), amp=False, checkpoint=None):
    """Stage 2 -> (curves {"unet_eps", "grounding", "mass_in", "bos_share"}, steps, seconds).
    ``checkpoint(step, total, weights, curves)``, if given, is called every ``--ckpt-minutes`` with the EMA
    weights (the parameters' order)."""
    s = Stage2(a, vae, unet, text_encoder, tokenizer, device, amp)
    total = a.unet_steps
    start = last_ckpt = time.time()
    step, probe = 0, max(3, min(10, a.warmup))
    unet.train()
    text_encoder.train()
    first = SEED_STRIDE + a.first_batch * a.batch  # stage 2's seeds lie SEED_STRIDE after stage 1's
    data = batches(a, Batches(first, a.batch, tokenizer, content=s.grounding), device) if total != 0 else iter(())
    while total is None or step < total:
        if total is None and step == probe:
            total = _probe_total(s.curves["unet_eps"], start, probe, budget_s, log, "unet")
        _set_lr(s.opt, lr_at(step, total or 10**9, a.lr, a.warmup))
        _unet_step(s, next(data), step)
        if step % a.log_every == 0 or step == (total or 0) - 1:
            _log_unet(s, step, start, log)
        step += 1
        if checkpoint is not None and a.ckpt_minutes > 0 and time.time() - last_ckpt > 60 * a.ckpt_minutes:
            checkpoint(step, total, s.ema if s.ema is not None else s.params, _stage2_curves(s))
            last_ckpt = time.time()
    _stage2_finish(s)
    return _stage2_curves(s), step, time.time() - start


# --- outputs --------------------------------------------------------------------------------------
def _smooth(v, k):
    if len(v) < 2 or k <= 1:
        return list(v)
    out, acc = [], float(v[0])
    alpha = 2.0 / (k + 1)
    for x in v:
        acc = alpha * float(x) + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_losses(curves: dict, path: Path, width: int = 900, panel_h: int = 300):
    """Draw each curve (raw in light grey, EMA-smoothed in blue) in its own panel, log-scale y axis."""
    import PIL.Image
    import PIL.ImageDraw

    curves = curves or {"no training steps were run": []}  # (--vae-steps 0 --unet-steps 0): one empty panel
    img = PIL.Image.new("RGB", (width, panel_h * len(curves)), "white")
    d = PIL.ImageDraw.Draw(img)
    L, R, T, Bm = 70, 20, 30, 45
    for k, (name, vals) in enumerate(curves.items()):
        y0 = k * panel_h
        x1, x2, yt, yb = L, width - R, y0 + T, y0 + panel_h - Bm
        d.rectangle([x1, yt, x2, yb], outline="black")
        d.text((x1, y0 + 8), name + "  (log y axis; grey: per step, blue: smoothed)", fill="black")
        d.text(((x1 + x2) // 2 - 15, yb + 25), "step", fill="black")
        vals = [max(float(v), 1e-8) for v in vals]
        if not vals:
            continue
        lo, hi = math.log10(min(vals)), math.log10(max(vals))
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        n = len(vals)

        def xy(i, v):
            x = x1 + (x2 - x1) * (i / max(1, n - 1))
            y = yb - (yb - yt) * ((math.log10(v) - lo) / (hi - lo))
            return x, y

        for j in range(5):  # ticks
            v = 10 ** (lo + (hi - lo) * j / 4)
            _, y = xy(0, v)
            d.line([x1 - 4, y, x1, y], fill="black")
            d.text((4, y - 6), f"{v:.3g}", fill="black")
            i = int(round((n - 1) * j / 4))
            x, _ = xy(i, vals[0])
            d.line([x, yb, x, yb + 4], fill="black")
            d.text((x - 10, yb + 7), str(i), fill="black")
        d.line([xy(i, v) for i, v in enumerate(vals)], fill=(200, 200, 200))
        d.line([xy(i, v) for i, v in enumerate(_smooth(vals, max(2, n // 50)))], fill=(30, 80, 220), width=2)
    img.save(path)


def _reproduce_block(folder: Path) -> str:
    """The command(s) in the "## Reproduce" block of a model card written by this script ('' if none)."""
    card = folder / "README.md"
    if not card.is_file():
        return ""
    text = card.read_text()
    head = text.find("## Reproduce\n```\n")
    if head < 0:
        return ""
    body = text[head + len("## Reproduce\n```\n"):]
    return body[: body.find("```")].strip()


def _card_command(info: dict) -> str:
    """The card's reproduce command: with --init, the starting checkpoint's own command(s) first, numbered."""
    cmd = info["command"]
    if info.get("init"):  # the chain: the starting checkpoint's own command(s) first
        before = _reproduce_block(Path(info["init"]))
        if before.startswith("# 1."):  # already a chain: its last model is this run's starting checkpoint
            k = len(re.findall(r"^# \d+\.", before, flags=re.M))
            head = before.rfind("\n# ")
            last = re.sub(r"--out \S+", f"--out {shlex.quote(str(info['init']))}", before[head:])
            before = before[:head] + last.replace(". this model\n", f". the starting checkpoint ({info['init']})\n", 1)
            cmd = f"{before}\n# {k + 1}. this model\n{cmd}"
        elif before:
            cmd = f"# 1. the starting checkpoint ({info['init']}), as its model card states\n{before}\n# 2. this model\n{cmd}"
    return cmd


def _attention_notes(info: dict) -> str:
    """The card's training bullets on the attention flags (grounding and padding drop, BOS sink, LIME share)."""
    notes = ""
    if info["attn_loss"] > 0 or info["pad_drop"] > 0:
        notes = f"""
- grounding (so that LIME can use the model): weight {info['attn_loss']} on a token-level grounding
  loss, the mean over cross-attention layers and content words (lime_fast.tokens) of (1 - m)^2, m the
  share of the word's head-averaged attention map inside the true edit region (TokenCompose-style);
  final {info['grounding_final']:.4f}, mass inside {info['mass_final']:.3f} (last 100 steps). Padding
  after EOS hidden from the cross-attention of {info['pad_drop']:.0%} of the captioned samples, so
  the words, not the padding, carry the instruction."""
    if info.get("sink", 0) > 0:
        notes += f"""
- BOS sink: weight {info['sink']} on the mean over cross-attention layers and pixels of
  relu({info['sink_share']} - p_BOS)^2 (`sink_loss`), so that BOS, the same for every instruction, is a
  no-op the UNet parks attention on, as Stable Diffusion's does; BOS share at the end {info['bos_final']:.3f}
  (last 100 steps, all pixels, layers and heads)."""
    if info.get("lime_share", 0) > 0:
        notes += f"""
- trained under LIME's regularization on {info['lime_share']:.0%} of the samples (`--lime-share`): at
  levels {', '.join(map(str, LIME_LEVELS))}, for timesteps {LIME_MIN_T}-999, the pixels inside the true edit region attend only to
  the tokens LIME keeps (BOS, stop words and padding silenced), in every conditioning-dropout branch,
  as the engine's regularized edit does; the rest of the samples are trained as before. LIME's
  regularization is therefore something this model has seen, not only a change at sampling time."""
    return notes


def _partial_note(info: dict) -> str:
    """' a checkpoint written at step ...' for a run cut off before its end ('' otherwise)."""
    return (f"\n- **a checkpoint written at step {info['partial']} of the {info['unet_steps']}-step schedule** (the run "
            "was cut off before its end; the reproduce command runs the whole schedule)") if info.get("partial") else ""


def _start_note(info: dict) -> str:
    """'- started from ...' (with --init: what of its VAE was kept; '' otherwise)."""
    kept = " (its VAE kept)" if info["vae_steps"] == 0 else " (its VAE encoder kept)" if info.get("vae_decoder_only") else ""
    return f"\n- started from `{info['init']}`{kept}" if info.get("init") else ""


def _stage1_line(info: dict) -> str:
    """The card's stage 1 bullet (without its '- ')."""
    if not info["vae_steps"]:
        return "stage 1 (VAE): none, the starting checkpoint's VAE is kept"
    loss = " decoder only, the encoder kept, L1 + L2" if info.get("vae_decoder_only") else ", L1 + L2 + 1e-6 KL"
    return (f"stage 1 (VAE{loss}, lr {info['vae_lr']}): {info['vae_steps']} steps, {info['vae_seconds']:.0f} s, "
            f"final reconstruction loss {info['vae_final']:.4f}")


def _stage2_line(info: dict) -> str:
    """The card's stage 2 bullet (without its '- ')."""
    if not info["unet_steps"]:
        return "stage 2 (UNet + text encoder): none, the starting checkpoint's are kept"
    return (f"stage 2 (UNet + text encoder, {info['prediction']} MSE, lr {info['lr']} warmup {info['warmup']} + cosine to "
            f"10%, EMA {info['ema']},\n  conditioning dropout {info['dropout']} text / {info['dropout']} both / "
            f"{info['dropout']} image): {info['unet_steps']} steps,\n  {info['unet_seconds']:.0f} s, final loss "
            f"{info['unet_final']:.4f} (mean of the last 100 steps)")


def _seeds_line(info: dict) -> str:
    """The sample seeds each stage drew: 'VAE stage seeds a..b, UNet stage seeds c..d'."""
    first, n = info.get("first_batch", 0) * info["batch"], info["batch"]
    vae = f"VAE stage seeds {first}..{first + info['vae_steps'] * n - 1}, " if info['vae_steps'] else ""
    unet = (f"UNet stage seeds {SEED_STRIDE + first}..{SEED_STRIDE + first + info['unet_steps'] * n - 1}"
            if info['unet_steps'] else "no UNet stage")
    return vae + unet


def write_card(out: Path, info: dict):
    """Write ``out``/README.md, the model card of a run (``info``: run_info's dict)."""
    cmd = _card_command(info)
    runs = cmd.count("python scripts/train_shapes.py")
    trained = f"in {runs} runs" if runs > 1 else "from scratch"
    where = "on the CPU" if "threads" in info["machine"] else "on a GPU"
    attention = _attention_notes(info)  # formatted even without a stage 2, so an info missing its keys fails as before
    text = f"""# shapes-ip2p: a small InstructPix2Pix-layout model trained on synthetic shapes

Trained {trained} {where} by `scripts/train_shapes.py` on `lime_fast.testing.shapes` data, so that
lime_fast's edit quality can be checked offline. Not a general image editor.

## Data
`lime_fast.testing.shapes.make_sample(seed, size={SIZE})`: {SIZE}x{SIZE} images of 2-4 flat-coloured shapes (circle,
square, triangle, star, diamond) on plain or textured backgrounds; edits recolour one object, recolour all
objects of one shape, or change the background, phrased in many ways. Fresh samples every step:
{_seeds_line(info)}.

## Model
| component | parameters | notes |
|---|---|---|
| AutoencoderKL | {info['params']['vae']:,} | factor 4, 4 latent channels, scaling_factor {info['scaling_factor']:.4f} (1/std of latents) |
| UNet2DConditionModel | {info['params']['unet']:,} | SD 1.5 layout, widths {info['unet_widths']}, in_channels 8, 4 heads |
| CLIPTextModel | {info['params']['text_encoder']:,} | width {info['text_width']}, {info['text_layers']} layers, real CLIP tokenizer (vocab 49408) |

Scheduler: EulerAncestralDiscreteScheduler (timbrooks/instruct-pix2pix config); training noise: DDPM
scaled_linear 0.00085..0.012, 1000 steps. Weights saved as {info['dtype']} safetensors.

## Training
- seed {info['seed']}, batch {info['batch']}, AdamW, threads {info['threads']}
- {_stage1_line(info)}
- {_stage2_line(info)}{_start_note(info)}{attention if info['unet_steps'] else ""}
- total time {info['total_seconds'] / 60:.1f} min on: {info['machine']}{_partial_note(info)}
- VAE reconstruction PSNR (posterior mean, held-out seeds 5,000,000+): {info.get('vae_psnr', float('nan')):.2f} dB

![loss curves](loss.png)

## Reproduce
```
{cmd}
```
"""
    (out / "README.md").write_text(text)


# --- compact checkpoints (what a device call can bring back) --------------------------------------
SHARD_BYTES = 15 * 2**20  # a device call returns files of at most 16 MiB


def save_compact(out: Path, models: dict, state: dict, log=print):
    """Write ``models`` (name -> module, or name -> (module, {param name: tensor}) to override weights, e.g.
    the EMA) as fp16 safetensors shards of at most SHARD_BYTES, plus ``state.json`` (``state`` and each
    model's config). Old shards of the same names are removed first."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    configs = {}
    for name, m in models.items():
        m, override = m if isinstance(m, tuple) else (m, {})
        sd = {k: override.get(k, v).detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous()
              for k, v in m.state_dict().items()}
        for old in out.glob(f"{name}-*.safetensors"):
            old.unlink()
        shard, size, n = {}, 0, 0
        for k, v in sd.items():
            nbytes = v.numel() * v.element_size()
            if shard and size + nbytes > SHARD_BYTES:
                save_file(shard, out / f"{name}-{n}.safetensors")
                shard, size, n = {}, 0, n + 1
            shard[k], size = v, size + nbytes
        save_file(shard, out / f"{name}-{n}.safetensors")
        configs[name] = {"class": type(m).__name__, "config": m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)}
    tmp = out / "state.json.tmp"
    tmp.write_text(json.dumps({**state, "configs": configs}))
    tmp.replace(out / "state.json")
    log(f"checkpoint: {out}")


def load_compact(ckpt: Path):
    """(vae, unet, text_encoder in fp32, state) from a ``save_compact`` folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    state = json.loads((ckpt / "state.json").read_text())
    models = {}
    for name, spec in state["configs"].items():
        cfg = {k: v for k, v in spec["config"].items() if not k.startswith("_")} if name != "text_encoder" else spec["config"]
        if name == "vae":
            m = AutoencoderKL.from_config(cfg)
        elif name == "unet":
            m = UNet2DConditionModel.from_config(cfg)
        else:
            m = CLIPTextModel(CLIPTextConfig(**cfg))
        sd = {}
        for f in sorted(ckpt.glob(f"{name}-*.safetensors"), key=lambda f: int(f.stem.rsplit("-", 1)[1])):
            sd.update(load_file(f))
        m.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
        models[name] = m.eval()
    return models["vae"], models["unet"], models["text_encoder"], state


def write_pipeline(a, out: Path, vae, unet, text_encoder, tokenizer, curves: dict, info: dict):
    """The diffusers pipeline (safetensors, ``a.dtype``), ``loss.json``, ``loss.png`` and the model card."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    from lime_fast.testing.tiny import shipped_config

    sched_cfg = {k: v for k, v in shipped_config("scheduler").items() if k in ("beta_end", "beta_schedule", "beta_start", "num_train_timesteps", "prediction_type", "steps_offset", "timestep_spacing")}
    sched_cfg["prediction_type"] = info["prediction"]
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae.cpu(),
        text_encoder=text_encoder.cpu(),
        tokenizer=tokenizer,
        unet=unet.cpu(),
        scheduler=EulerAncestralDiscreteScheduler(**sched_cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if info["dtype"] == "float16":
        pipe = pipe.to(dtype=torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "loss.json").write_text(json.dumps(curves))
    panels = {f"stage 2: UNet {info['prediction']} MSE": curves["unet_eps"]} if curves["unet_eps"] else {}
    if curves["vae_rec"]:
        panels = {"stage 1: VAE reconstruction loss (L1 + L2)": curves["vae_rec"], **panels}
    if curves["grounding"]:
        panels["stage 2: grounding loss (content words' attention outside the edit region)"] = curves["grounding"]
    if info.get("sink", 0) > 0 and curves.get("bos_share"):
        panels["stage 2: BOS share of the cross-attention (all pixels, layers and heads)"] = curves["bos_share"]
    plot_losses(panels, out / "loss.png")
    write_card(out, info)


def reproduce_command(a, vae_steps: int, unet_steps: int) -> str:
    """The command that reproduces the weights (step counts fixed, device and autocast as run)."""
    reproduce = [
        "python scripts/train_shapes.py",
        f"--out {shlex.quote(str(a.out))}",
        f"--seed {a.seed}",
        f"--vae-steps {vae_steps} --unet-steps {unet_steps}",
        f"--batch {a.batch} --lr {a.lr} --vae-lr {a.vae_lr} --warmup {a.warmup}",
        f"--width {a.width} --text-width {a.text_width} --text-layers {a.text_layers} --vae-width {a.vae_width}",
        f"--ema {a.ema} --dropout {a.dropout} --prediction {a.prediction} --threads {a.threads} --dtype {a.dtype}",
        f"--attn-loss {a.attn_loss} --pad-drop {a.pad_drop}" + (f" --sink {a.sink} --sink-share {a.sink_share}" if a.sink > 0 else "")
        + (f" --lime-share {a.lime_share}" if a.lime_share > 0 else ""),
    ]
    if a.vae_decoder_only or a.first_batch:
        reproduce.append(("--vae-decoder-only " if a.vae_decoder_only else "") + f"--first-batch {a.first_batch}")
    if a.init:
        reproduce.insert(3, f"--init {shlex.quote(str(a.init))}")
    device, amp = device_and_amp(a)
    if device.type != "cpu" or amp or a.workers or a.compact:
        reproduce.append(f"--device {device.type} --amp {'bf16' if amp else 'none'} --workers {a.workers}" + (" --compact" if a.compact else ""))
    return " \\\n  ".join(reproduce)


def machine(a, device: torch.device) -> str:
    import platform

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {a.workers} data workers"
    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {a.threads} threads"


def assemble(a) -> Path:
    """--assemble: the pipeline and model card from a compact checkpoint (no training)."""
    from lime_fast.clip_bpe import clip_tokenizer

    ckpt, out = Path(a.assemble), Path(a.out)
    vae, unet, text_encoder, state = load_compact(ckpt)
    info = state["info"]
    info["command"] += f"\n# then, where the checkpoint came back to:\npython scripts/train_shapes.py --assemble {shlex.quote(info['out'])} --out {shlex.quote(str(out))}"
    if not state.get("complete", True):
        info["partial"] = state["step"]
    write_pipeline(a, out, vae, unet, text_encoder, clip_tokenizer(), state["curves"], info)
    print(f"assembled {out} from {ckpt}")
    return out


class Run:
    """One training run: its arguments, device and bf16 autocast, log function, start (time.time()
    seconds), tokenizer, models (built, or loaded from --init, on ``device``) and their parameter counts,
    and stage 1's results once ``_stage1`` ran (the VAE's curve, steps, seconds and scaling_factor)."""

    def __init__(self, a, device, amp, log):
        from lime_fast.clip_bpe import clip_tokenizer

        self.a, self.device, self.amp, self.log = a, device, amp, log
        self.t0 = time.time()
        self.tokenizer = clip_tokenizer()
        vae, unet, text_encoder = load_models(a.init) if a.init else build_models(a, self.tokenizer)
        self.vae, self.unet, self.text_encoder = vae.to(device), unet.to(device), text_encoder.to(device)
        self.params = {name: n_params(m) for name, m in
                       (("vae", self.vae), ("unet", self.unet), ("text_encoder", self.text_encoder))}
        log(f"parameters: {self.params}; device {device}, bf16 autocast {amp}, {a.workers} data workers")
        self.vae_curve, self.vae_steps, self.vae_s, self.sf = [], 0, 0.0, float("nan")


def _open_log(path: Path):
    """(log, file): ``log(msg)`` prints msg and appends it to ``path`` (flushed, so a cut-off run keeps it)."""
    log_file = open(path, "w")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    return log, log_file


def _stage1(run: Run, budget_s: float) -> None:
    """Stage 1 (the VAE, --vae-frac of ``budget_s`` seconds), then the latents' scaling_factor into the VAE's
    config (kept as loaded when --init's latents stay)."""
    a, vae = run.a, run.vae
    run.vae_curve, run.vae_steps, run.vae_s = train_vae(a, vae, budget_s * a.vae_frac, run.log, run.device, run.amp)
    if a.init and (run.vae_steps == 0 or a.vae_decoder_only):  # the loaded latents: keep their measured scaling factor
        run.sf = float(vae.config.scaling_factor)
    else:
        run.sf = measure_scaling(vae, n=64 if a.smoke else 512, device=run.device)
        vae.register_to_config(scaling_factor=run.sf)
    run.log(f"scaling_factor {run.sf:.4f}")


def run_info(run: Run, unet_steps: int, unet_s: float, curves: dict, psnr: float = float("nan")) -> dict:
    """What the model card and state.json record: the arguments, sizes, step counts, seconds, final losses
    (means of the last 100 steps), machine and the reproduce command."""
    def final(k):  # nan for a curve that is empty, or absent from a checkpoint older than the curve
        return float(np.mean(curves[k][-100:])) if curves.get(k) else float("nan")

    return dict(
        vars(run.a),
        params=run.params,
        vae_steps=run.vae_steps,
        unet_steps=unet_steps,
        vae_seconds=run.vae_s,
        unet_seconds=unet_s,
        total_seconds=time.time() - run.t0,
        scaling_factor=run.sf,
        vae_final=final("vae_rec"),
        vae_psnr=psnr,
        grounding_final=final("grounding"),
        mass_final=final("mass_in"),
        bos_final=final("bos_share"),
        unet_final=final("unet_eps"),
        unet_widths=tuple(run.unet.config.block_out_channels),
        machine=machine(run.a, run.device),
        command=reproduce_command(run.a, run.vae_steps, unet_steps),
    )


def _checkpointer(run: Run, out: Path):
    """With --compact and --ckpt-minutes: train_unet's ``checkpoint(step, total, weights, stage2 curves)``,
    which writes a compact checkpoint marked incomplete to ``out`` (weights: the UNet's then the text
    encoder's parameters, in named_parameters order); otherwise None."""
    a, unet, text_encoder = run.a, run.unet, run.text_encoder
    if not (a.compact and a.ckpt_minutes > 0):
        return None
    names = ([("unet", n) for n, _ in unet.named_parameters()]
             + [("text_encoder", n) for n, _ in text_encoder.named_parameters()])

    def write_checkpoint(step, total, weights, stage2):
        over = {"unet": {}, "text_encoder": {}}
        for (m, n), w in zip(names, weights):
            over[m][n] = w
        curves = {"vae_rec": run.vae_curve, **stage2}
        info = run_info(run, total, time.time() - run.t0 - run.vae_s, curves)
        models = {"vae": run.vae, "unet": (unet, over["unet"]), "text_encoder": (text_encoder, over["text_encoder"])}
        save_compact(out, models, {"complete": False, "step": step, "curves": curves, "info": info}, run.log)

    return write_checkpoint


def _save(run: Run, out: Path, curves: dict, info: dict) -> None:
    """The trained models into ``out``: a compact checkpoint (--compact), else the pipeline and model card."""
    if run.a.compact:
        save_compact(out, {"vae": run.vae, "unet": run.unet, "text_encoder": run.text_encoder},
                     {"complete": True, "step": info["unet_steps"], "curves": curves, "info": info}, run.log)
    else:
        write_pipeline(run.a, out, run.vae, run.unet, run.text_encoder, run.tokenizer, curves, info)


def main(argv=None) -> Path:
    """Train (or with --assemble, assemble) as the command line says -> the output folder."""
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.assemble:
        return assemble(a)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    device, amp = device_and_amp(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log, log_file = _open_log(out / "train.log")
    run = Run(a, device, amp, log)
    budget = a.minutes * 60.0
    _stage1(run, budget)
    checkpoint = _checkpointer(run, out)
    stage2, unet_steps, unet_s = train_unet(a, run.vae, run.unet, run.text_encoder, run.tokenizer,
                                            budget - (time.time() - run.t0), log, device, amp, checkpoint)
    psnr = vae_psnr(run.vae, n=32 if a.smoke else 512, device=device)
    log(f"VAE reconstruction PSNR on held-out pictures: {psnr:.2f} dB")
    curves = {"vae_rec": run.vae_curve, **stage2}
    info = run_info(run, unet_steps, unet_s, curves, psnr)
    _save(run, out, curves, info)
    log(f"saved to {out} in {info['total_seconds']:.0f} s")
    log_file.close()
    return out


if __name__ == "__main__":
    main()
