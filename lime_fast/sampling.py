"""One denoising pass: an immutable ``PassPlan`` and the loop that runs it, free of host syncs.

A LIME edit runs two passes over the same three-branch InstructPix2Pix batch
``[text + image x B, image-only x B, unconditional x B]``:

* the localization pass: steps ``0..capture_step`` with the localization guidance, capturing attention
  outputs and maps at the capture step and stopping right after its UNet evaluation;
* the edit pass: all steps with the edit guidance, unrelated tokens silenced inside the RoI at the
  regularized levels during the regularized steps.

``PassPlan`` is everything such a pass depends on besides its input tensors: it keys the whole-pass
CUDA graph cache (``lime_fast.graphs.PassGraphs``) and the attention controller reads it (which step
captures, which steps and levels are regularized). ``run_pass`` is the loop itself: scheduler step,
guidance combination, pre-drawn ancestral noise, per-step penalty switch, capture and the finite checks,
all as device work with no host synchronization, so that one CUDA graph can hold the whole pass.
The same function runs eagerly on the CPU (the tests' twin of the graph).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .attention import level_grids


@dataclass(frozen=True)
class PassPlan:
    """What one denoising pass computes, apart from its input tensors (hashable: the graph-cache key).

    kind: "localize" (stops after the capture step's UNet evaluation) or "edit".
    batch: edits B (the UNet runs 3B: text + image, image-only, unconditional).
    latent_hw: (h, w) of the latent grid; channels: latent channels.
    steps: steps of the schedule (the timesteps are those of a ``steps``-step run).
    guidance: (s_T, s_I) text and image guidance scales.
    capture_step: localize: the step whose attention is captured (the pass stops after it); edit: None.
    feature_levels: UNet levels whose attention outputs and head-averaged maps are captured.
    reg_levels: edit: levels whose cross-attention is regularized; () for a plain InstructPix2Pix pass.
    reg_range: inclusive (first, last) regularized steps.
    dtype: the latents' dtype. stepper: how a step is taken: "ancestral" (Euler-ancestral with its noise
        drawn up front, SD 1.5 checkpoints), "euler" (deterministic Euler, SDXL checkpoints), both device
        arithmetic only; "scheduler" (any other scheduler's own ``step``; such passes are not graphed).
    cache_interval: edit: step caching (``lime_fast.stepcache``): 1 = off, every step runs the whole UNet;
        N >= 2 = the deep blocks (levels >= cache_level) run on steps 0, N, 2N, ... and are reused on the
        others. A localize plan never caches (1).
    cache_level: the first level the step cache reuses (the deepest regularized level + 1).
    """

    kind: str
    batch: int
    latent_hw: tuple[int, int]
    channels: int
    steps: int
    guidance: tuple[float, float]
    capture_step: int | None = None
    feature_levels: tuple[int, ...] = ()
    reg_levels: tuple[int, ...] = ()
    reg_range: tuple[int, int] = (0, -1)
    dtype: torch.dtype = torch.float32
    stepper: str = "ancestral"
    cache_interval: int = 1
    cache_level: int = 0

    def __post_init__(self):
        if self.kind not in ("localize", "edit"):
            raise ValueError(f"kind must be 'localize' or 'edit', got {self.kind!r}")
        if self.stepper not in STEPPERS:
            raise ValueError(f"stepper must be one of {STEPPERS}, got {self.stepper!r}")
        if (self.kind == "localize") != (self.capture_step is not None):
            raise ValueError("a localize plan needs a capture_step; an edit plan has none")
        if self.cache_interval < 1 or (self.kind == "localize" and self.cache_interval != 1):
            raise ValueError(f"cache_interval must be >= 1, and 1 for a localize plan, got {self.cache_interval}")
        # Plain attributes, not functools.cached_property: on Python 3.11 its lock is a graph break for
        # torch.compile (the attention processors read these inside the compiled UNet).
        grids = level_grids(self.latent_hw)
        object.__setattr__(self, "_grids", grids)
        object.__setattr__(self, "_levels", {h * w: lvl for lvl, (h, w) in reversed(list(enumerate(grids)))})

    @property
    def n_evals(self) -> int:
        """UNet evaluations of the pass."""
        return self.capture_step + 1 if self.kind == "localize" else self.steps

    @property
    def ancestral(self) -> bool:
        return self.stepper == "ancestral"

    @property
    def graphable(self) -> bool:
        """Whether the whole pass is device arithmetic (no scheduler code of its own): one CUDA graph."""
        return self.stepper != "scheduler"

    @property
    def n_noise(self) -> int:
        """Ancestral noise draws the pass consumes (one per scheduler step it takes; none without ancestral noise)."""
        if not self.ancestral:
            return 0
        return self.capture_step if self.kind == "localize" else self.steps

    @property
    def regularizes(self) -> bool:
        return bool(self.reg_levels) and self.reg_range[0] <= self.reg_range[1]

    def regularized(self, step: int) -> bool:
        """Whether ``step`` silences unrelated tokens (at ``reg_levels``, inside the RoI)."""
        return self.regularizes and self.reg_range[0] <= step <= self.reg_range[1]

    def capturing(self, step: int) -> bool:
        return step == self.capture_step

    @property
    def caches(self) -> bool:
        """Whether some steps of this pass reuse the deep blocks' output (step caching)."""
        return self.cache_interval > 1

    def full_step(self, step: int) -> bool:
        """Whether ``step`` runs the whole UNet (always, unless the plan caches and step % interval != 0)."""
        return step % self.cache_interval == 0

    @property
    def grids(self) -> list[tuple[int, int]]:
        """(h_l, w_l) of every level l (ceil halving, as a stride-2 convolution)."""
        return self._grids

    def level_of(self, n_queries: int) -> int:
        level = self._levels.get(n_queries)
        if level is None:
            raise RuntimeError(f"{n_queries} query pixels match no level of the latent grid {self.latent_hw}")
        return level


def make_scheduler(base, steps: int, device) -> object:
    """A fresh copy of ``base`` (a diffusers scheduler) set to ``steps`` steps, its step index at 0.

    ``set_begin_index(0)`` spares the first ``scale_model_input`` its timestep lookup (a ``.item()``
    host sync); the index is the same one the lookup finds."""
    sched = base.__class__.from_config(base.config)
    sched.set_timesteps(steps, device=device)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    return sched


STEPPERS = ("ancestral", "euler", "scheduler")


def stepper_of(sched) -> str:
    """How ``run_pass`` steps with ``sched``: "ancestral" when ``euler_ancestral_step`` reproduces its
    ``step`` (noise drawn up front), "euler" when ``euler_step`` does (deterministic), else "scheduler"."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    if sched.config.prediction_type not in ("epsilon", "v_prediction"):
        return "scheduler"
    if type(sched) is EulerAncestralDiscreteScheduler:
        return "ancestral"
    if type(sched) is EulerDiscreteScheduler:
        return "euler"
    return "scheduler"


def is_ancestral(sched) -> bool:
    return stepper_of(sched) == "ancestral"


def draw_noise(generators, shape, count: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial latents [B, c, h, w] and ``count`` steps of ancestral noise [count, B, c, h, w], on the CPU.

    The same numbers, from the same CPU generators in the same order, as diffusers draws them
    (``randn_tensor`` for the initial latents, then one draw per generator in every scheduler step),
    so the results are bit-identical to diffusers' pipeline. Both passes of an edit draw from fresh
    generators with the same seeds, so the localization pass uses the first steps of the edit's noise."""
    one = (1, *shape[1:])
    init = torch.cat([torch.randn(one, generator=g, dtype=dtype) for g in generators])
    steps = [torch.cat([torch.randn(one, generator=g, dtype=dtype) for g in generators]) for _ in range(count)]
    noise = torch.stack(steps) if steps else torch.zeros((0, *shape), dtype=dtype)
    return init, noise


def euler_ancestral_step(sched, eps: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``EulerAncestralDiscreteScheduler.step`` with the noise given (same arithmetic, same order);
    advances the scheduler's step index. The sigmas live on the CPU: scalar math, no device sync."""
    idx = sched.step_index
    sigma = sched.sigmas[idx]
    sample = latents.to(torch.float32)
    if sched.config.prediction_type == "epsilon":
        pred_original_sample = sample - sigma * eps
    else:  # v_prediction
        pred_original_sample = eps * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    sigma_from, sigma_to = sched.sigmas[idx], sched.sigmas[idx + 1]
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    derivative = (sample - pred_original_sample) / sigma
    dt = sigma_down - sigma
    prev_sample = sample + derivative * dt
    prev_sample = prev_sample + noise * sigma_up
    sched._step_index += 1
    return prev_sample.to(eps.dtype)


def euler_step(sched, eps: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """``EulerDiscreteScheduler.step`` at its defaults (s_churn = 0: no noise), the same arithmetic in the
    same order; advances the step index. The sigmas live on the CPU: scalar math, no device sync."""
    idx = sched.step_index
    sample = latents.to(torch.float32)
    sigma = sched.sigmas[idx]
    sigma_hat = sigma * (0.0 + 1)  # gamma = 0, as diffusers computes it
    if sched.config.prediction_type == "epsilon":
        pred_original_sample = sample - sigma_hat * eps
    else:  # v_prediction
        pred_original_sample = eps * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    derivative = (sample - pred_original_sample) / sigma_hat
    dt = sched.sigmas[idx + 1] - sigma_hat
    prev_sample = sample + derivative * dt
    sched._step_index += 1
    return prev_sample.to(eps.dtype)


def run_pass(unet, controller, plan: PassPlan, sched, x: dict, *, generators=None, on_step=None) -> dict:
    """Run one pass; returns ``{"latents", "finite", "features", "maps", "feature_levels", "map_levels"}``.

    unet: callable like ``UNet2DConditionModel.__call__``. controller: the engine's
    ``AttentionController``. sched: from ``make_scheduler``. x: the pass's input tensors:
    ``latents`` [B, c, h, w] (unit-variance initial noise), ``noise`` [n_noise, B, c, h, w] (ancestral
    plans), ``embeds`` [3B, T, C], ``image_latents`` [3B, c, h, w], optional ``roi_grid`` [B, gh, gw] bool
    and ``keep`` [B, T] bool (regularized edit plans), and any ``added_*`` tensors, passed to the UNet as
    ``added_cond_kwargs`` (SDXL). generators: CPU generators for ``sched.step`` (non-ancestral plans).
    on_step(i): called after each step (progress bars; eager runs only).

    Outputs: ``latents`` the final latents of an edit pass (None for localize), ``finite`` [n_evals] bool
    (per step: were the new latents, or at the capture step the guided prediction, all finite), and the
    captured ``features`` ([B, C, h_l, w_l] per attention module) and ``maps`` ([B, T, h_l, w_l] fp32
    per cross-attention module) of a localize pass, with their levels. No host synchronization: the
    caller reads ``finite`` once the work is done.
    """
    s_text, s_image = plan.guidance
    added = {k.removeprefix("added_"): v for k, v in x.items() if k.startswith("added_")}
    extra = {"added_cond_kwargs": added} if added else {}
    step_kwargs = {}
    if plan.stepper == "scheduler" and generators is not None and "generator" in inspect.signature(sched.step).parameters:
        step_kwargs["generator"] = generators
    state = controller.begin_pass(plan, roi_grid=x.get("roi_grid"), keep=x.get("keep"), context=x["embeds"])
    try:
        latents = x["latents"] * sched.init_noise_sigma
        embeds, image_latents = x["embeds"], x["image_latents"]
        finite = []
        for i, t in enumerate(sched.timesteps[: plan.n_evals]):
            state.at_step(i)
            sample = torch.cat([sched.scale_model_input(torch.cat([latents] * 3), t), image_latents], dim=1)
            eps = unet(sample, t, encoder_hidden_states=embeds, return_dict=False, **extra)[0]
            e_text, e_image, e_uncond = eps.chunk(3)
            eps = e_uncond + s_text * (e_text - e_image) + s_image * (e_image - e_uncond)
            if plan.capturing(i):
                finite.append(torch.isfinite(eps).all())
                break
            if plan.stepper == "ancestral":
                latents = euler_ancestral_step(sched, eps, latents, x["noise"][i])
            elif plan.stepper == "euler":
                latents = euler_step(sched, eps, latents)
            else:
                latents = sched.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
            finite.append(torch.isfinite(latents).all())
            if on_step is not None:
                on_step(i)
    finally:
        controller.end_pass()
    capture = state.capture
    return {
        "latents": None if plan.kind == "localize" else latents,
        "finite": torch.stack(finite),
        "features": capture.features,
        "feature_levels": capture.feature_levels,
        "maps": capture.maps,
        "map_levels": capture.map_levels,
    }
