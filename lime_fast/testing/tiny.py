"""Small random-weight InstructPix2Pix pipelines, built offline from configs.

Used by the tests (saved, then loaded back through ``LimeEngine.from_pretrained`` like any checkpoint)
and by ``replica_pipeline`` for full-size GPU figures. ``tiny_pipeline`` mirrors SD 1.5 (3 CrossAttnDown
+ Down, mid block with attention, Up + 3 CrossAttnUp; VAE factor 8) at a tiny width, so every LIME level
exists; ``tiny_sdxl_pipeline`` mirrors SDXL InstructPix2Pix (Down + 2 CrossAttnDown with 1 and 2
transformer layers, two text encoders, pooled and time-id added conditions, Euler scheduler).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

CONFIG_DIR = "data/configs/instruct-pix2pix"
SDXL_CONFIG_DIR = "data/configs/sdxl-instructpix2pix"


def shipped_config(component: str, folder: str = CONFIG_DIR) -> dict:
    """The real config of one component (unet, vae, text_encoder[_2], scheduler, tokenizer[_2]) of
    timbrooks/instruct-pix2pix (default) or, with ``folder=SDXL_CONFIG_DIR``, of an SDXL InstructPix2Pix."""
    name = "scheduler_config.json" if component == "scheduler" else ("tokenizer_config.json" if component.startswith("tokenizer") else "config.json")
    text = resources.files("lime_fast").joinpath(f"{folder}/{component}/{name}").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def _tiny_vae(**extra):
    """The tiny VAE of both tiny pipelines (factor 8, 4 latent channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=128, **extra)


def _tiny_text_config(tok, width: int):
    """A 2-layer CLIP text tower of ``width`` channels for the tokenizer ``tok``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=width)


def tiny_pipeline(heads: int | tuple[int, ...] = 8, width: int = 32, text_width: int = 32, seed: int = 0, tokenizer=None):
    """A random ~3 M-parameter ``StableDiffusionInstructPix2PixPipeline`` on the CPU, fp32.

    heads: attention heads of the UNet (an int, or one per block); width: channels of the first UNet
    block (then 2x, 2x, 2x); text_width: CLIP text-encoder width. tokenizer: default the real CLIP
    tokenizer (``lime_fast.clip_bpe.clip_tokenizer``).
    """
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..clip_bpe import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=8,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=text_width,
        attention_head_dim=heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=8,
    )
    vae = _tiny_vae()
    tok = tokenizer or clip_tokenizer()
    text_encoder = CLIPTextModel(_tiny_text_config(tok, text_width))
    scheduler = EulerAncestralDiscreteScheduler(**{k: v for k, v in shipped_config("scheduler").items() if k in ("beta_end", "beta_schedule", "beta_start", "num_train_timesteps", "prediction_type", "steps_offset")})
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny(path: str | Path, **kwargs) -> Path:
    """Build ``tiny_pipeline(**kwargs)`` and save it (safetensors) as a diffusers folder at ``path``."""
    path = Path(path)
    tiny_pipeline(**kwargs).save_pretrained(path, safe_serialization=True)
    return path


def replica_pipeline(seed: int = 0, tokenizer=None, device=None):
    """A full-size random-weight replica of timbrooks/instruct-pix2pix (SD 1.5 UNet, VAE, CLIP ViT-L/14
    text tower), built from the configs shipped in ``lime_fast/data/configs``: for GPU timings and
    memory figures with no download. ~1.07 B parameters, fp32 (move it with ``.to``).
    device: where the weights are made and initialized (default the CPU); "cuda" draws the 1.07 B random
    weights on the GPU instead of the host's cores (other weights than the CPU's draw, same layout)."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..clip_bpe import clip_tokenizer

    torch.manual_seed(seed)
    text_cfg = {k: v for k, v in shipped_config("text_encoder").items() if k not in ("architectures", "torch_dtype")}
    tok = tokenizer or clip_tokenizer()
    text_cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device(device or "cpu"):
        vae = AutoencoderKL.from_config(shipped_config("vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        unet = UNet2DConditionModel.from_config(shipped_config("unet"))
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(shipped_config("scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(width: int = 32, text_width: int = 32, seed: int = 0, tokenizer=None):
    """A random tiny ``StableDiffusionXLInstructPix2PixPipeline`` on the CPU, fp32: SDXL's layout (no
    attention at level 0; 1 and 2 transformer layers at levels 1 and 2; heads of 8 channels, so 2 and
    4 heads), two CLIP text encoders (the second with a projection; the second tokenizer pads with "!"),
    the "text_time" added conditions and SDXL's Euler scheduler config.
    tokenizer: default the real CLIP tokenizer (``lime_fast.clip_bpe.clip_tokenizer``)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInstructPix2PixPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ..clip_bpe import clip_tokenizer

    torch.manual_seed(seed)
    tok = tokenizer or clip_tokenizer()
    tok_2 = clip_tokenizer(pad_token="!")
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=8,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=8,
        cross_attention_dim=2 * text_width,  # the two encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_width,
        use_linear_projection=True,
        norm_num_groups=8,
    )
    vae = _tiny_vae(scaling_factor=0.13025, force_upcast=True)
    text_config = _tiny_text_config(tok, text_width)

    keys = ("beta_end", "beta_schedule", "beta_start", "num_train_timesteps", "prediction_type", "steps_offset",
            "timestep_spacing", "interpolation_type", "use_karras_sigmas")
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in shipped_config("scheduler", SDXL_CONFIG_DIR).items() if k in keys})
    pipe = StableDiffusionXLInstructPix2PixPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tok, tokenizer_2=tok_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sdxl(path: str | Path, **kwargs) -> Path:
    """Build ``tiny_sdxl_pipeline(**kwargs)`` and save it (safetensors) as a diffusers folder at ``path``."""
    path = Path(path)
    tiny_sdxl_pipeline(**kwargs).save_pretrained(path, safe_serialization=True)
    return path


def replica_sdxl_pipeline(seed: int = 0, tokenizer=None, device=None):
    """A full-size random-weight replica of an SDXL InstructPix2Pix (e.g. diffusers/sdxl-instructpix2pix-768;
    2.57 B-parameter UNet, two text encoders, the fp32-only SDXL VAE), from the configs shipped in
    ``lime_fast/data/configs/sdxl-instructpix2pix``: for GPU figures at 768 and 1024 with no download.
    device: where the weights are made and initialized, as for ``replica_pipeline``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInstructPix2PixPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..clip_bpe import clip_tokenizer

    torch.manual_seed(seed)
    tok = tokenizer or clip_tokenizer()
    tok_2 = clip_tokenizer(pad_token="!")

    def text(component):
        cfg = {k: v for k, v in shipped_config(component, SDXL_CONFIG_DIR).items() if k not in ("architectures", "torch_dtype")}
        cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        return CLIPTextConfig(**cfg)

    with torch.device(device or "cpu"):
        vae = AutoencoderKL.from_config(shipped_config("vae", SDXL_CONFIG_DIR))
        text_encoder = CLIPTextModel(text("text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(text("text_encoder_2"))
        unet = UNet2DConditionModel.from_config(shipped_config("unet", SDXL_CONFIG_DIR))
    pipe = StableDiffusionXLInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(shipped_config("scheduler", SDXL_CONFIG_DIR)),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
