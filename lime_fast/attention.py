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

Within a pass the text embeddings do not change, so the controller computes every cross-attention
module's key and value projections once, in ``begin_pass`` (``cache_kv``; inside a whole-pass CUDA
graph they are recorded once at its start), and the processors reuse them at every step: the same
projections, not an approximation. Modules whose projections diffusers fused
(``Attention.fuse_projections``: ``to_qkv`` for self-attention, ``to_kv`` for cross-attention) are run
through the fused layer.

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


def level_rois(roi_grid: torch.Tensor, grids: list[tuple[int, int]], levels) -> dict[int, torch.Tensor]:
    """roi_grid [B, gh, gw] bool -> {level: [B, h_l * w_l] bool}: the RoI resized (nearest) to each of
    ``levels``' grids (``grids[level]`` = (h_l, w_l)). The one resize the engine and the training script's
    LIME samples share; device ops only (it runs inside whole-pass CUDA graphs)."""
    rois = {}
    for level in levels:
        h, w = grids[level]
        m = F.interpolate(roi_grid[:, None].float(), size=(h, w), mode="nearest")[:, 0] > 0.5
        rois[level] = m.reshape(m.shape[0], h * w)
    return rois


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


@dataclass
class PassState:
    """Everything a denoising pass reads, in one object, and the one writer of each field.

    ``AttentionController.begin_pass`` builds it and writes every field once, except these three:
      step, capturing, penalizing: ``at_step``, which ``run_pass`` calls before each UNet evaluation;
      capture: the attention processors append the capture step's features and maps to it;
      deep: ``StepCache`` stores the deep blocks' output of the pass's last full step there.
    The processors, ``StepCache`` and the graph runner find it as ``controller.state`` (None outside a
    pass: every processor is then plain attention). A whole-pass CUDA graph records what one pass reads.

    plan: the immutable ``PassPlan`` (``lime_fast.sampling``). roi: {level: [3B, N_l] bool} at the
    plan's regularized levels ({} for plain plans). keep: [3B, T] bool or None. kv: {module name: (K, V)
    [3B, H, T, D]}, the cross-attention keys and values projected once from the pass's context ({}:
    projected at every step). capture: the ``Capture`` the capture step fills. deep: see above.
    step: the evaluation running (-1 before the first); capturing / penalizing: derived from plan and
    step, so that under torch.compile the processors guard on two bools (a handful of graphs per shape)
    instead of the step number (one graph per step, and eager fallback past dynamo's recompile limit).
    """

    plan: object
    roi: dict = field(default_factory=dict)
    keep: torch.Tensor | None = None
    kv: dict = field(default_factory=dict)
    capture: Capture = field(default_factory=Capture)
    deep: torch.Tensor | None = None
    step: int = -1
    capturing: bool = False
    penalizing: bool = False

    def at_step(self, i: int) -> "PassState":
        """Before UNet evaluation ``i`` of the pass (the writer of step, capturing, penalizing)."""
        self.step = i
        self.capturing = self.plan.capturing(i)
        self.penalizing = self.plan.regularized(i)
        return self


class AttentionController:
    """What all ``LimeAttnProcessor``s of one UNet share: the cross-attention backend, whether K/V are
    cached per pass, the cross-attention modules, and the running pass's ``PassState`` (``state``).

    The engine brackets each denoising pass with ``begin_pass(plan, roi_grid, keep, context)`` (which
    returns the pass's state) and ``end_pass()``; outside a pass (``state`` None, e.g. under
    ``accelerate(pipe)``) every processor is plain attention.

    backend: "eager" runs cross-attention with SDPA (a boolean mask when regularizing) and with the
    eager reference when maps are captured; "triton" runs the fused kernel (``lime_fast.kernels.regularized_attention``)
    for every cross-attention call; a callable with ``regularized_attention_ref``'s signature
    (``fn(q, k, v, roi=, keep=, scale=, capture=) -> (out, probs)``) runs instead of both, e.g. the
    reference release's pattern that ``benchmarks/release.py`` times.
    cache_kv: project cross-attention K/V once per pass (begin_pass's context); False: at every step.
    """

    def __init__(self, backend="eager", cache_kv: bool = True):
        self.backend = backend
        self._kernel = self._op = None
        if backend == "triton":  # imported once here, not per call (the hot path runs ~30x per step)
            from .kernels.regularized_attention import regularized_attention, regularized_attention_launch

            # The launcher directly (no custom-op dispatch: ~60 us less per eager call on an H200);
            # the registered op only while torch.compile traces.
            self._kernel, self._op = regularized_attention_launch, regularized_attention
        self.cache_kv = cache_kv
        self.cross_modules: dict[str, object] = {}  # name -> cross-attention module (``install`` fills it)
        self.state: PassState | None = None  # the running pass (begin_pass / end_pass write it)

    # --- per pass ----------------------------------------------------------------------
    def begin_pass(self, plan, roi_grid: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                   context: torch.Tensor | None = None) -> PassState:
        """Start a pass and return its state: roi_grid [B, gh, gw] bool on the output grid and keep [B, T]
        bool (both or neither, regularizing plans only); context: the pass's encoder hidden states
        [3B, T, C], from which (with ``cache_kv``) every cross-attention module's K/V is projected here,
        once, and reused at every step of the pass.

        The RoI is resized (nearest) to each regularized level's grid and repeated over the three
        guidance branches here, with device ops only (inside a whole-pass CUDA graph they read the
        graph's input buffers). An element whose RoI is empty gets no penalty (an all-False row is plain
        attention), and one whose keep row is all False neither (see ``silenced_mask``)."""
        kv = {}
        if context is not None and self.cache_kv:
            kv = {name: _heads(attn, *_project_kv(attn, context), context.shape[0]) for name, attn in self.cross_modules.items()}
        roi, kept = {}, None
        if plan.regularizes and roi_grid is not None and keep is not None:
            kept = keep.bool().repeat(3, 1)
            roi = {level: m.repeat(3, 1) for level, m in level_rois(roi_grid, plan.grids, plan.reg_levels).items()}
        self.state = PassState(plan, roi=roi, keep=kept, kv=kv)
        return self.state

    def end_pass(self) -> None:
        self.state = None

    # --- the cross-attention seam ------------------------------------------------------
    def attend(self, q, k, v, roi, keep, scale, capture):
        """Cross-attention: q [3B, H, N, D], k/v [3B, H, T, D]; roi [3B, N] / keep [3B, T] bool or None;
        capture: long [B] batch indices whose head-mean probabilities to return. -> (out, probs|None)."""
        if callable(self.backend):
            return self.backend(q, k, v, roi=roi, keep=keep, scale=scale, capture=capture)
        if self._kernel is not None:
            if torch.compiler.is_compiling():
                return self._op(q, k, v, roi=roi, keep=keep, scale=scale, capture=capture)
            return self._kernel(q, k, v, roi=roi, keep=keep, scale=scale, capture=capture)
        if capture is None:
            if roi is None:
                return F.scaled_dot_product_attention(q, k, v, scale=scale), None
            return regularized_attention_sdpa(q, k, v, roi, keep, scale), None
        return regularized_attention_ref(q, k, v, roi=roi, keep=keep, scale=scale, capture=capture)


def _project_kv(attn, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A cross-attention module's key and value projections of the encoder states [B, T, C]."""
    if attn.norm_cross:
        states = attn.norm_encoder_hidden_states(states)
    if getattr(attn, "fused_projections", False) and getattr(attn, "to_kv", None) is not None:
        return attn.to_kv(states).chunk(2, dim=-1)
    return attn.to_k(states), attn.to_v(states)


def _heads(attn, key: torch.Tensor, value: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, H * D] key and value -> [B, H, T, D] (and the module's key norm, if any)."""
    head_dim = key.shape[-1] // attn.heads
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return key, value


def _query_heads(attn, query: torch.Tensor, batch: int, head_dim: int) -> torch.Tensor:
    """[B, N, H * D] query -> [B, H, N, D] (and the module's query norm, if any)."""
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    return attn.norm_q(query) if attn.norm_q is not None else query


def project_cross(attn, hidden_states: torch.Tensor, states: torch.Tensor):
    """A cross-attention module's query, key and value, [B, H, N or T, D] in diffusers' layout with its
    norms applied, from hidden states [B, N, C] and encoder states [B, T, C']: what the engine's processor
    computes on a step without cached K/V, and what the training script's grounding processor uses."""
    batch = hidden_states.shape[0]
    key, value = _heads(attn, *_project_kv(attn, states), batch)
    return _query_heads(attn, attn.to_q(hidden_states), batch, key.shape[-1]), key, value


class LimeAttnProcessor:
    """diffusers attention processor: SDPA self-attention, cross-attention steered by the running pass's
    ``PassState`` (``controller.state``), which it reads and, at the capture step, appends captures to.

    name: the module's name in the UNet (``install`` gives each module its own processor), the key of its
    per-pass cached K/V in ``PassState.kv``; None: never cached."""

    def __init__(self, controller: AttentionController, name: str | None = None):
        self.ctl = controller
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        # Long on purpose: it follows diffusers' AttnProcessor2_0 step by step, so that with no pass running
        # it computes exactly what diffusers does (tests compare them bit for bit), and it runs ~30 times per
        # UNet evaluation, where each extra Python call is eager-mode launch time.
        ctl = self.ctl
        st = ctl.state
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

        cached = st.kv.get(self.name) if st is not None and is_cross and self.name is not None else None
        if not is_cross and getattr(attn, "fused_projections", False) and getattr(attn, "to_qkv", None) is not None:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            key, value = _heads(attn, key, value, batch)
        else:
            query = attn.to_q(hidden_states)
            if cached is not None:  # this pass's K/V, projected once in begin_pass
                key, value = cached
            elif is_cross:
                key, value = _heads(attn, *_project_kv(attn, encoder_hidden_states), batch)
            else:
                key, value = _heads(attn, attn.to_k(hidden_states), attn.to_v(hidden_states), batch)
        head_dim = key.shape[-1]
        query = _query_heads(attn, query, batch, head_dim)

        plan = st.plan if st is not None else None
        level = plan.level_of(n_queries) if plan is not None else -1
        capturing = st is not None and st.capturing and level in plan.feature_levels
        if is_cross and attention_mask is None:
            penalize = st is not None and st.penalizing and level in st.roi
            n_edits = batch // 3
            out, probs = ctl.attend(
                query,
                key,
                value,
                st.roi[level] if penalize else None,
                st.keep if penalize else None,
                None,  # 1/sqrt(D): diffusers' AttnProcessor2_0 ignores attn.scale too
                torch.arange(n_edits, device=query.device) if capturing else None,
            )
            if probs is not None:  # [B, N, T] -> [B, T, h, w]
                h, w = plan.grids[level]
                st.capture.maps.append(probs.transpose(1, 2).reshape(n_edits, -1, h, w))
                st.capture.map_levels.append(level)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if capturing:  # image-only branch, [B, N, C] -> [B, C, h, w]
            n_edits = batch // 3
            h, w = plan.grids[level]
            feats = hidden_states[n_edits : 2 * n_edits]
            st.capture.features.append(feats.transpose(1, 2).reshape(n_edits, -1, h, w))
            st.capture.feature_levels.append(level)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def pick_backend(attention, device: torch.device):
    """"auto" -> "triton" on CUDA when triton and the kernel import, else "eager"; "eager", "triton" and
    callables (custom cross-attention functions) pass through."""
    if callable(attention):
        return attention
    if attention not in ("auto", "eager", "triton"):
        raise ValueError(f"attention must be 'auto', 'eager', 'triton' or a callable, got {attention!r}")
    if attention != "auto":
        return attention
    if torch.device(device).type == "cuda":
        try:
            from .kernels import regularized_attention  # noqa: F401

            return "triton"
        except ImportError:
            return "eager"
    return "eager"


def install(unet, controller: AttentionController) -> None:
    """Give every attention module of ``unet`` its own processor steered by ``controller``, and tell the
    controller which modules are cross-attention (their K/V can be projected once per pass: only when
    the UNet feeds the encoder states to them unchanged, i.e. has no ``encoder_hid_proj``)."""
    from diffusers.models.attention_processor import Attention

    unet.set_attn_processor({key: LimeAttnProcessor(controller, key.removesuffix(".processor"))
                             for key in unet.attn_processors})
    direct = getattr(unet, "encoder_hid_proj", None) is None
    controller.cross_modules = {name: m for name, m in unet.named_modules()
                                if direct and isinstance(m, Attention) and m.is_cross_attention}
