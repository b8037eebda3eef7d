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

With ``--minutes`` the step counts are fixed after a short timing probe and written to the model card,
together with the exact command (``--vae-steps``/``--unet-steps``) that reproduces the weights.
Outputs in ``--out``: the diffusers folder (safetensors), ``loss.png``, ``loss.json``, ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lime_fast.testing.shapes import make_batch  # noqa: E402

SIZE = 64
SEED_STRIDE = 1_000_003  # stage offsets in the sample-seed counter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (diffusers pipeline + model card)")
    p.add_argument("--minutes", type=float, default=90.0, help="total time budget (both stages)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-frac", type=float, default=0.15, help="share of the budget for the VAE stage")
    p.add_argument("--vae-steps", type=int, default=None, help="fix the VAE steps (overrides the time budget)")
    p.add_argument("--unet-steps", type=int, default=None, help="fix the UNet steps (overrides the time budget)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--width", type=int, default=48, help="UNet width of the first block (then 2x, 2x, 2x)")
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--vae-width", type=int, default=16, help="VAE channels (w, 2w, 2w)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of UNet + text-encoder weights (0: off)")
    p.add_argument("--dropout", type=float, default=0.05, help="InstructPix2Pix conditioning-dropout p")
    p.add_argument("--prediction", choices=("v_prediction", "epsilon"), default="v_prediction",
                   help="UNet target. v: from scratch, epsilon gives almost no gradient towards copying the "
                        "source at high noise (a 40-min epsilon run sampled flat red images; x0 error 1.17 at t=999)")
    p.add_argument("--attn-loss", type=float, default=0.0,
                   help="weight of the grounding loss on the content words' cross-attention (0: off; see grounding_loss)")
    p.add_argument("--pad-drop", type=float, default=0.0,
                   help="share of captioned samples whose cross-attention cannot see the padding after EOS")
    p.add_argument("--init", default=None,
                   help="start from this saved pipeline (its VAE, UNet and text encoder) instead of from scratch; "
                        "use with --vae-steps 0 to keep its VAE")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "float16"), default="float16", help="dtype of the saved weights")
    p.add_argument("--smoke", action="store_true", help="a few steps of each stage at tiny widths (tests)")
    a = p.parse_args(argv)
    if a.smoke:
        a.width, a.text_width, a.text_layers, a.vae_width, a.batch = 16, 32, 1, 16, 4
        a.vae_steps = 3 if a.vae_steps is None else a.vae_steps
        a.unet_steps = 3 if a.unet_steps is None else a.unet_steps
        a.warmup, a.log_every = 1, 1
    return a


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


# --- stage 1: VAE ----------------------------------------------------------------------------------
def vae_loss(vae, x, gen):
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
    rec = vae.decode(z).sample
    kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
    rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
    return rec_loss + 1e-6 * kl, rec_loss


def train_vae(a, vae, budget_s, log):
    opt = torch.optim.AdamW(vae.parameters(), lr=a.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed + 1)
    total = a.vae_steps
    start = time.time()
    curve, step, probe = [], 0, max(3, min(10, a.warmup, 50))  # probe steps lie in the warmup: lr independent of total
    vae.train()
    while total is None or step < total:
        if total is None and step == probe:  # fix the step count from the measured speed
            spent = time.time() - start
            total = max(probe + 1, probe + _steps_for(budget_s - spent, spent / probe))
            log(f"[vae] {spent / probe:.2f} s/step -> {total} steps")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total or 10**9, a.vae_lr, min(a.warmup, 50))
        seeds = range(step * a.batch, (step + 1) * a.batch)
        b = make_batch(seeds, SIZE)
        x = torch.cat([b["source"][: a.batch // 2], b["target"][a.batch // 2 :]])  # both halves of the data
        loss, rec = vae_loss(vae, x, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        curve.append(rec.item())
        if step % a.log_every == 0 or step == (total or 0) - 1:
            log(f"[vae] step {step:5d} rec {np.mean(curve[-a.log_every:]):.4f}  {time.time() - start:7.1f}s")
        step += 1
    vae.eval().requires_grad_(False)
    return curve, step, time.time() - start


@torch.no_grad()
def measure_scaling(vae, n: int = 256, seed_base: int = 7 * SEED_STRIDE) -> float:
    zs = []
    for i in range(0, n, 32):
        b = make_batch(range(seed_base + i, seed_base + i + 32), SIZE)
        zs.append(vae.encode(torch.cat([b["source"], b["target"]])).latent_dist.sample())
    return float(1.0 / torch.cat(zs).flatten().std())


# --- stage 2: InstructPix2Pix ---------------------------------------------------------------------
class GroundingAttn:
    """Training-time cross-attention processor (diffusers' ``attn2``): plain attention through the
    shared eager reference, with an optional padding mask per sample, that keeps each layer's
    head-averaged probabilities [B, N, T] (with their graph) for ``grounding_loss``."""

    def __init__(self, state: dict):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        from lime_fast.kernels.reference import regularized_attention_ref

        assert encoder_hidden_states is not None and hidden_states.ndim == 3 and not attn.residual_connection
        B, N, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states).view(B, N, heads, -1).transpose(1, 2)
        k = attn.to_k(encoder_hidden_states).view(B, -1, heads, q.shape[-1]).transpose(1, 2)
        v = attn.to_v(encoder_hidden_states).view(B, -1, heads, q.shape[-1]).transpose(1, 2)
        drop = self.state["pad_drop"]  # [B] bool: this sample cannot see its padding
        roi = drop[:, None].expand(B, N)
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


def train_unet(a, vae, unet, text_encoder, tokenizer, budget_s, log):
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    acp = noise_sched.alphas_cumprod
    sf = vae.config.scaling_factor
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params] if a.ema > 0 else None
    gen = torch.Generator().manual_seed(a.seed + 2)
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    state = {"maps": []}
    grounding = a.attn_loss > 0 or a.pad_drop > 0
    if grounding:
        from lime_fast.tokens import token_roles

        procs = dict(unet.attn_processors)
        unet.set_attn_processor({k: GroundingAttn(state) if k.endswith("attn2.processor") else v for k, v in procs.items()})
    attn_curve, mass_curve = [], []
    total = a.unet_steps
    start = time.time()
    curve, step, probe = [], 0, max(3, min(10, a.warmup))
    unet.train()
    text_encoder.train()
    while total is None or step < total:
        if total is None and step == probe:
            spent = time.time() - start
            total = max(probe + 1, probe + _steps_for(budget_s - spent, spent / probe))
            log(f"[unet] {spent / probe:.2f} s/step -> {total} steps")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total or 10**9, a.lr, a.warmup)
        base = SEED_STRIDE + step * a.batch
        b = make_batch(range(base, base + a.batch), SIZE)
        B = a.batch
        with torch.no_grad():
            post = vae.encode(torch.cat([b["target"], b["source"]])).latent_dist
            z0 = (post.mean[:B] + post.std[:B] * torch.randn(post.mean[:B].shape, generator=gen)) * sf
            z_src = post.mode()[B:]  # unscaled, as InstructPix2Pix does
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (B,), generator=gen)
        ac = acp[t].view(B, 1, 1, 1)
        zt = ac.sqrt() * z0 + (1 - ac).sqrt() * noise

        ids = tokenizer(b["instruction"], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        emb = text_encoder(torch.cat([ids, empty_ids]))[0]
        emb, empty = emb[:B], emb[B:]
        r = torch.rand(B, generator=gen)
        p = a.dropout
        drop_text = (r < 2 * p).view(B, 1, 1)
        keep_image = ~((r >= p) & (r < 3 * p))
        emb = torch.where(drop_text, empty.expand_as(emb), emb)
        z_src = z_src * keep_image.view(B, 1, 1, 1).float()

        if grounding:
            T = ids.shape[1]
            eos = (ids == tokenizer.eos_token_id).int().argmax(1)  # first EOS (CLIP pads with EOS)
            state["keep"] = torch.arange(T)[None] <= eos[:, None]
            state["pad_drop"] = (torch.rand(B, generator=gen) < a.pad_drop) & ~drop_text.view(B)
            state["all"] = torch.arange(B)
            state["maps"].clear()
            content = torch.zeros(B, T)
            for i, text in enumerate(b["instruction"]):
                if not drop_text[i]:
                    content[i, token_roles(tokenizer, text).content] = 1.0

        pred = unet(torch.cat([zt, z_src], 1), t, encoder_hidden_states=emb).sample
        target = noise if a.prediction == "epsilon" else ac.sqrt() * noise - (1 - ac).sqrt() * z0
        mse = F.mse_loss(pred, target)
        loss = mse
        if grounding:
            g_loss, mass = grounding_loss(state["maps"], b["mask"], content)
            state["maps"].clear()
            attn_curve.append(g_loss.item())
            mass_curve.append(mass.item())
            if a.attn_loss > 0:
                loss = loss + a.attn_loss * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            d = min(a.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [q.detach() for q in params], 1 - d)
        curve.append(mse.item())
        if step % a.log_every == 0 or step == (total or 0) - 1:
            extra = f" grounding {np.mean(attn_curve[-a.log_every:]):.4f} mass in {np.mean(mass_curve[-a.log_every:]):.3f}" if grounding else ""
            log(f"[unet] step {step:5d} loss {np.mean(curve[-a.log_every:]):.4f}{extra} lr {opt.param_groups[0]['lr']:.2e}  {time.time() - start:7.1f}s")
        step += 1
    if ema is not None:
        with torch.no_grad():
            for p_, e in zip(params, ema):
                p_.copy_(e)
    if grounding:
        unet.set_attn_processor(AttnProcessor2_0())
    unet.eval()
    text_encoder.eval()
    return curve, attn_curve, mass_curve, step, time.time() - start


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


def write_card(out: Path, info: dict):
    cmd = info["command"]
    if info.get("init"):  # the chain: the starting checkpoint's own command(s) first
        before = _reproduce_block(Path(info["init"]))
        cmd = (f"# 1. the starting checkpoint ({info['init']}), as its model card states\n{before}\n"
               f"# 2. this model\n{cmd}") if before else cmd
    grounding = ""
    if info["attn_loss"] > 0 or info["pad_drop"] > 0:
        grounding = f"""
- grounding (so that LIME can use the model): weight {info['attn_loss']} on a token-level grounding
  loss, the mean over cross-attention layers and content words (lime_fast.tokens) of (1 - m)^2, m the
  share of the word's head-averaged attention map inside the true edit region (TokenCompose-style);
  final {info['grounding_final']:.4f}, mass inside {info['mass_final']:.3f} (last 100 steps). Padding
  after EOS hidden from the cross-attention of {info['pad_drop']:.0%} of the captioned samples, so
  the words, not the padding, carry the instruction."""
    start = f"\n- stage 2 started from `{info['init']}`" + (" (its VAE kept)" if info["vae_steps"] == 0 else "") if info.get("init") else ""
    text = f"""# shapes-ip2p: a small InstructPix2Pix-layout model trained on synthetic shapes

Trained {"in two runs" if info.get("init") else "from scratch"} on the CPU by `scripts/train_shapes.py` on `lime_fast.testing.shapes` data, so that
lime_fast's edit quality can be checked offline. Not a general image editor.

## Data
`lime_fast.testing.shapes.make_sample(seed, size={SIZE})`: {SIZE}x{SIZE} images of 2-4 flat-coloured shapes (circle,
square, triangle, star, diamond) on plain or textured backgrounds; edits recolour one object, recolour all
objects of one shape, or change the background, phrased in many ways. Fresh samples every step:
{f"VAE stage seeds 0..{info['vae_steps'] * info['batch'] - 1}, " if info['vae_steps'] else ""}UNet stage seeds {SEED_STRIDE}..{SEED_STRIDE + info['unet_steps'] * info['batch'] - 1}.

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
- {f"stage 1 (VAE, L1 + L2 + 1e-6 KL, lr {info['vae_lr']}): {info['vae_steps']} steps, {info['vae_seconds']:.0f} s, final reconstruction loss {info['vae_final']:.4f}" if info['vae_steps'] else "stage 1 (VAE): none, the starting checkpoint's VAE is kept"}
- stage 2 (UNet + text encoder, {info['prediction']} MSE, lr {info['lr']} warmup {info['warmup']} + cosine to 10%, EMA {info['ema']},
  conditioning dropout {info['dropout']} text / {info['dropout']} both / {info['dropout']} image): {info['unet_steps']} steps,
  {info['unet_seconds']:.0f} s, final loss {info['unet_final']:.4f} (mean of the last 100 steps){start}{grounding}
- total time {info['total_seconds'] / 60:.1f} min on: {info['machine']}

![loss curves](loss.png)

## Reproduce
```
{cmd}
```
"""
    (out / "README.md").write_text(text)


def main(argv=None) -> Path:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "train.log", "w")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    from lime_fast.clip_bpe import clip_tokenizer
    from lime_fast.testing.tiny import shipped_config

    t0 = time.time()
    tokenizer = clip_tokenizer()
    vae, unet, text_encoder = load_models(a.init) if a.init else build_models(a, tokenizer)
    params = {"vae": n_params(vae), "unet": n_params(unet), "text_encoder": n_params(text_encoder)}
    log(f"parameters: {params}")
    budget = a.minutes * 60.0
    vae_curve, vae_steps, vae_s = train_vae(a, vae, budget * a.vae_frac, log)
    if a.init and vae_steps == 0:  # keep the loaded VAE and its measured scaling factor
        sf = float(vae.config.scaling_factor)
    else:
        sf = measure_scaling(vae, n=64 if a.smoke else 512)
        vae.register_to_config(scaling_factor=sf)
    log(f"scaling_factor {sf:.4f}")
    unet_curve, attn_curve, mass_curve, unet_steps, unet_s = train_unet(a, vae, unet, text_encoder, tokenizer, budget - (time.time() - t0), log)

    sched_cfg = {k: v for k, v in shipped_config("scheduler").items() if k in ("beta_end", "beta_schedule", "beta_start", "num_train_timesteps", "prediction_type", "steps_offset", "timestep_spacing")}
    sched_cfg["prediction_type"] = a.prediction
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(**sched_cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if a.dtype == "float16":
        pipe = pipe.to(dtype=torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)

    (out / "loss.json").write_text(json.dumps({"vae_rec": vae_curve, "unet_eps": unet_curve, "grounding": attn_curve, "mass_in": mass_curve}))
    panels = {f"stage 2: UNet {a.prediction} MSE": unet_curve}
    if vae_curve:
        panels = {"stage 1: VAE reconstruction loss (L1 + L2)": vae_curve, **panels}
    if attn_curve:
        panels["stage 2: grounding loss (content words' attention outside the edit region)"] = attn_curve
    plot_losses(panels, out / "loss.png")
    reproduce = [
        "python scripts/train_shapes.py",
        f"--out {shlex.quote(str(a.out))}",
        f"--seed {a.seed}",
        f"--vae-steps {vae_steps} --unet-steps {unet_steps}",
        f"--batch {a.batch} --lr {a.lr} --vae-lr {a.vae_lr} --warmup {a.warmup}",
        f"--width {a.width} --text-width {a.text_width} --text-layers {a.text_layers} --vae-width {a.vae_width}",
        f"--ema {a.ema} --dropout {a.dropout} --prediction {a.prediction} --threads {a.threads} --dtype {a.dtype}",
        f"--attn-loss {a.attn_loss} --pad-drop {a.pad_drop}",
    ]
    if a.init:
        reproduce.insert(3, f"--init {shlex.quote(str(a.init))}")
    import platform

    info = dict(
        vars(a),
        params=params,
        vae_steps=vae_steps,
        unet_steps=unet_steps,
        vae_seconds=vae_s,
        unet_seconds=unet_s,
        total_seconds=time.time() - t0,
        scaling_factor=sf,
        vae_final=float(np.mean(vae_curve[-100:])) if vae_curve else float("nan"),
        grounding_final=float(np.mean(attn_curve[-100:])) if attn_curve else float("nan"),
        mass_final=float(np.mean(mass_curve[-100:])) if mass_curve else float("nan"),
        unet_final=float(np.mean(unet_curve[-100:])),
        unet_widths=(a.width, 2 * a.width, 2 * a.width, 2 * a.width),
        machine=f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {a.threads} threads",
        command=" \\\n  ".join(reproduce),
    )
    write_card(out, info)
    log(f"saved to {out} in {info['total_seconds']:.0f} s")
    log_file.close()
    return out


if __name__ == "__main__":
    main()
