"""Model families: what differs between InstructPix2Pix models built on SD 1.5 and on SDXL.

A family says how to load a checkpoint (its diffusers pipeline class), how to encode the text of the
three guidance branches (SD 1.5: one CLIP encoder, the "" prompt for the two branches without the
instruction; SDXL: two CLIP encoders' penultimate hidden states concatenated, the second encoder's
pooled projection and the micro-conditioning ``time_ids`` as UNet added conditions, zeros for the
branches without the instruction, exactly as diffusers' pipelines build them), whether the VAE must run
in fp32 (SDXL's VAE overflows in fp16: diffusers' ``force_upcast``), and LIME's levels for it.

LIME's levels, one rule for every family (docs/lime.md, "Levels"): with level l running at the latent
grid halved l times, features and maps come from the levels at half the latent resolution and coarser
(l >= 1), and the penalty applies at the latent resolution and half of it (l <= 1), each among the
levels that have cross-attention. SD 1.5 has attention at levels 0-3: features at (1, 2, 3), penalty
at (0, 1), the release's choice. SDXL has no attention at level 0 and three levels: features at (1, 2)
(64 and 32 cells a side at 1024 x 1024, 48 and 24 at 768), penalty at (1,) only (64 cells at 1024: the
same grid size as SD 1.5's level 0 at 512). Both are EditConfig fields a user can change.

Detection: a pipeline object by its class name; a checkpoint folder by ``model_index.json``'s
``_class_name``; a hub id the same way once its ``model_index.json`` is in the cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    """name: "sd15" or "sdxl". pipeline: the diffusers pipeline class name. two_encoders: SDXL's pair of
    text encoders and added conditions. upcast_vae: the family's diffusers pipeline runs a fp16 VAE whose
    config says ``force_upcast`` in fp32 (SDXL's; SD 1.5's pipelines never upcast, and its VAE configs
    carry diffusers' default ``force_upcast=True`` without meaning it). feature_levels / reg_levels: the
    default levels by the rule above, given the levels with cross-attention (``attention_levels``)."""

    name: str
    pipeline: str
    two_encoders: bool
    upcast_vae: bool

    @staticmethod
    def attention_levels(unet_config) -> tuple[int, ...]:
        """Levels with cross-attention: those whose down block has it, and the last level when the mid
        block has it (SD 1.5's mid block adds level 3; SDXL's sits at level 2, which has it anyway)."""
        get = unet_config.get if isinstance(unet_config, dict) else (lambda k, d=None: getattr(unet_config, k, d))
        down = list(get("down_block_types"))
        levels = {i for i, t in enumerate(down) if "CrossAttn" in t}
        if "CrossAttn" in (get("mid_block_type", None) or "UNetMidBlock2DCrossAttn"):
            levels.add(len(down) - 1)
        return tuple(sorted(levels))

    def default_levels(self, unet_config) -> dict:
        levels = self.attention_levels(unet_config)
        return dict(feature_levels=tuple(lvl for lvl in levels if lvl >= 1), reg_levels=tuple(lvl for lvl in levels if lvl <= 1))

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)


SD15 = Family("sd15", "StableDiffusionInstructPix2PixPipeline", two_encoders=False, upcast_vae=False)
SDXL = Family("sdxl", "StableDiffusionXLInstructPix2PixPipeline", two_encoders=True, upcast_vae=True)
FAMILIES = {f.pipeline: f for f in (SD15, SDXL)}


def of_class_name(name: str | None) -> Family:
    """The family of a pipeline class name (ValueError naming the supported ones otherwise)."""
    if name in FAMILIES:
        return FAMILIES[name]
    raise ValueError(f"{name!r} is not an InstructPix2Pix pipeline lime_fast supports: use a checkpoint of "
                     f"{' or '.join(FAMILIES)}")


def of_pipe(pipe) -> Family:
    return of_class_name(type(pipe).__name__)


def of_folder(folder) -> Family | None:
    """The family a checkpoint folder declares in its model_index.json (None if it has none)."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    name = index.get("_class_name")
    return FAMILIES.get(name) if name in FAMILIES else (SD15 if name is None else of_class_name(name))


def unet_config_of(folder) -> dict | None:
    try:
        return json.loads((Path(folder) / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return None


# --- text encoding -----------------------------------------------------------------------------


@dataclass
class TextEncoding:
    """text [B, T, C] instruction embeddings; empty [1, T, C] the other two branches' embedding; pooled
    [B, P] / empty_pooled [1, P] and time_ids [1, n]: SDXL's added conditions (None for SD 1.5)."""

    text: object
    empty: object
    pooled: object = None
    empty_pooled: object = None
    time_ids: object = None


def _ids(tokenizer, texts, device):
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_text(family: Family, pipe, instructions, size_hw: tuple[int, int], device) -> TextEncoding:
    """The embeddings of B instructions and of the branches without one, as the family's diffusers
    pipeline computes them. size_hw: the working (height, width) in pixels (SDXL's time_ids)."""
    import torch  # (this module is read before torch loads: the CLI checks settings with it)

    if not family.two_encoders:  # SD 1.5: one batch of B instructions plus ""
        ids = _ids(pipe.tokenizer, list(instructions) + [""], device)
        embeds = pipe.text_encoder(ids)[0].to(pipe.text_encoder.dtype)
        return TextEncoding(embeds[:-1], embeds[-1:])
    # SDXL: penultimate hidden states of both encoders, concatenated; the second encoder's pooled projection
    parts, pooled = [], None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = encoder(_ids(tokenizer, instructions, device), output_hidden_states=True)
        if out[0].ndim == 2:
            pooled = out[0]
        parts.append(out.hidden_states[-2])
    text = torch.cat(parts, dim=-1).to(pipe.text_encoder_2.dtype)
    if not pipe.config.force_zeros_for_empty_prompt:
        raise NotImplementedError("SDXL checkpoints with force_zeros_for_empty_prompt=False are not supported yet")
    h, w = size_hw
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=text.dtype, device=device)  # original, crop, target
    return TextEncoding(text, torch.zeros_like(text[:1]), pooled, torch.zeros_like(pooled[:1]), time_ids)
