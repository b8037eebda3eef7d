"""The one attention processor lime_fast installs in the UNet, and the controller that steers it.

Every attention module of the UNet gets a ``LimeAttnProcessor``. It does what diffusers'
``AttnProcessor2_0`` does (projections, SDPA, output projection) and, when the controller asks:

- capture: stores the module's output (after the output projection, before the residual add) of the
  image-only branch, and the head-averaged cross-attention probabilities of the text + image branch,
  at the feature levels;
- regularize: in cross-attention at the regularized levels, sends the logits of unrelated tokens to
  -inf for query pixels inside the RoI, in all three guidance branches.

Cross-attention goes through one function, ``AttentionController.attend``, which dispatches to the
eager reference (``lime_fast.kernels.reference``) or to a fused kernel: the seam later kernels plug into.
Self-attention always uses PyTorch's SDPA.

Levels: level l runs at the latent grid halved l times (ceil), read from the query count of each call,
so layers are chosen by resolution for any image shape; head counts come from each module.

Batch layout of every UNet call: ``[text+image x B, image-only x B, unconditional x B]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .kernels.reference import regularized_attention_ref, regularized_attention_sdpa


def level_grids(latent_hw: tuple[int, int], n_levels: int = 8) -> list[tuple[int, int]]:
    """[(h_l, w_l)] for l = 0..n_levels-1: each level halves the previous one (ceil, as a stride-2 conv)."""
    h, w = latent_hw
    grids = []
    for _ in range(n_levels):
        grids.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return grids


@dataclass
class Capture:
    """What the localization pass captures, for a batch of B edits.

    features: per attention module at the feature levels, [B, C, h_l, w_l] (image-only branch).
    maps: per cross-attention module at the feature levels, [B, T, h_l, w_l] fp32, head-averaged
        probabilities of the text + image branch.
    feature_levels / map_levels: the level of each entry.
    """

    features: list[torch.Tensor] = field(default_factory=list)
    feature_levels: list[int] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)
    map_levels: list[int] = field(default_factory=list)


class AttentionController:
    """Shared state of all ``LimeAttnProcessor``s of one UNet.

    Per UNet call the engine sets ``capture`` (a ``Capture`` to fill, or None) and ``regularize``
    (bool); per pass it sets the latent size, the RoI masks and the keep mask.

    backend: "eager" runs cross-attention with SDPA (a boolean mask when regularizing) and with the
    eager reference when maps are captured; "triton" runs the fused kernel (``lime_fast.kernels.regularized_attention``)
    for every cross-attention call.
    """

    def __init__(self, backend: str = "eager"):
        self.backend = backend
        self._kernel = None
        if backend == "triton":  # imported once here, not per call (the hot path runs ~30x per step)
            from .kernels.regularized_attention import regularized_attention

            self._kernel = regularized_attention
        self.latent_hw: tuple[int, int] | None = None
        self.feature_levels: tuple[int, ...] = (1, 2, 3)
        self.reg_levels: tuple[int, ...] = (0, 1)
        self.capture: Capture | None = None
        self.regularize = False
        self.roi: dict[int, torch.Tensor] = {}  # level -> [3B, N_l] bool
        self.keep: torch.Tensor | None = None  # [3B, T] bool
        self._levels: dict[int, int] = {}

    # --- per pass ----------------------------------------------------------------------
    def set_latent_size(self, latent_hw: tuple[int, int]) -> None:
        self.latent_hw = tuple(latent_hw)
        self._levels = {h * w: l for l, (h, w) in reversed(list(enumerate(level_grids(latent_hw))))}
        self._grids = level_grids(latent_hw)

    def set_regularization(self, roi_grid: torch.Tensor | None, keep: torch.Tensor | None) -> None:
        """roi_grid: [B, gh, gw] bool RoI on the output grid; keep: [B, T] bool. None clears.

        Elements with an empty RoI simply get no penalty; the masks are resized once per pass (nearest)
        to each regularized level and repeated over the three guidance branches.
        """
        self.roi, self.keep = {}, None
        if roi_grid is None or keep is None or not bool(roi_grid.any()):
            return
        self.keep = keep.bool().repeat(3, 1)
        for level in self.reg_levels:
            h, w = self._grids[level]
            m = F.interpolate(roi_grid[:, None].float(), size=(h, w), mode="nearest")[:, 0] > 0.5
            self.roi[level] = m.reshape(m.shape[0], h * w).repeat(3, 1)

    def level_of(self, n_queries: int) -> int:
        level = self._levels.get(n_queries)
        if level is None:
            raise RuntimeError(f"{n_queries} query pixels match no level of the latent grid {self.latent_hw}")
        return level

    # --- the cross-attention seam ------------------------------------------------------
    def attend(self, q, k, v, roi, keep, scale, capture):
        """Cross-attention: q [3B, H, N, D], k/v [3B, H, T, D]; roi [3B, N] / keep [3B, T] bool or None;
        capture: long [B] batch indices whose head-mean probabilities to return. -> (out, probs|None)."""
        if self._kernel is not None:
            return self._kernel(q, k, v, roi=roi, keep=keep, scale=scale, capture=capture)
        if capture is None:
            if roi is None:
                return F.scaled_dot_product_attention(q, k, v, scale=scale), None
            return regularized_attention_sdpa(q, k, v, roi, keep, scale), None
        return regularized_attention_ref(q, k, v, roi=roi, keep=keep, scale=scale, capture=capture)


class LimeAttnProcessor:
    """diffusers attention processor: SDPA self-attention, controller-steered cross-attention."""

    def __init__(self, controller: AttentionController):
        self.ctl = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        ctl = self.ctl
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b, c, height * width).transpose(1, 2)
        batch, n_queries, _ = hidden_states.shape
        is_cross = encoder_hidden_states is not None
        if attention_mask is not None:
            kv_len = encoder_hidden_states.shape[1] if is_cross else n_queries
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        level = ctl.level_of(n_queries) if ctl.latent_hw is not None else -1
        capturing = ctl.capture is not None and level in ctl.feature_levels
        if is_cross and attention_mask is None:
            penalize = ctl.regularize and level in ctl.roi
            n_edits = batch // 3
            out, probs = ctl.attend(
                query,
                key,
                value,
                ctl.roi[level] if penalize else None,
                ctl.keep if penalize else None,
                None,  # 1/sqrt(D): diffusers' AttnProcessor2_0 ignores attn.scale too
                torch.arange(n_edits, device=query.device) if capturing else None,
            )
            if probs is not None:  # [B, N, T] -> [B, T, h, w]
                h, w = ctl._grids[level]
                ctl.capture.maps.append(probs.transpose(1, 2).reshape(n_edits, -1, h, w))
                ctl.capture.map_levels.append(level)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if capturing:  # image-only branch, [B, N, C] -> [B, C, h, w]
            n_edits = batch // 3
            h, w = ctl._grids[level]
            feats = hidden_states[n_edits : 2 * n_edits]
            ctl.capture.features.append(feats.transpose(1, 2).reshape(n_edits, -1, h, w))
            ctl.capture.feature_levels.append(level)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install(unet, controller: AttentionController) -> None:
    """Give every attention module of ``unet`` a processor steered by ``controller``."""
    unet.set_attn_processor(LimeAttnProcessor(controller))
