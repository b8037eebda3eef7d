"""LIME-safe step caching: reuse the UNet's deep blocks on some steps of the edit pass (DeepCache-style).

Between two nearby denoising steps the UNet's low-resolution (deep) features change little, while the
high-resolution blocks carry the detail. DeepCache (Ma, Fang, Wang; CVPR 2024) runs the whole UNet on
some steps and, on the steps between, only the shallow blocks, feeding the shallow up blocks the deep
output cached from the last full step. lime_fast does the same with two LIME-specific rules:

* the levels LIME regularizes (``EditConfig.reg_levels``, 0 and 1 by default: 64² and 32² at 512²) are
  never cached: every step recomputes them, so every regularized step silences the unrelated tokens
  in fresh cross-attention, exactly as the faithful path does; only levels deeper than the deepest
  regularized level are reused (``PassPlan.cache_level``);
* the localization pass never caches (its plans have ``cache_interval`` 1, so in particular its
  capture step runs the whole UNet).

Schedule (``EditConfig.cache_interval`` = N, in the ``PassPlan``, so whole-pass CUDA graphs key on it):
steps 0, N, 2N, ... run the whole UNet and keep the deep part's output; the others reuse it. N = 1 is
off. With 30 steps and N = 2, 15 of the 30 steps skip the deep blocks.

The runner is generic over the level layout of ``UNet2DConditionModel`` (SD 1.5: attention at levels
0-2 and a plain level 3; SDXL: no attention at level 0 and three levels): it reads each block's level
from the down/up-samplers before it, and it keeps diffusers' residual bookkeeping (every down block's
skip outputs, consumed from the end by the up blocks) on cached steps too, with placeholders for the
deep blocks' outputs, so the shallow up blocks always get the skip tensors they get on a full step.
A full step computes what ``UNet2DConditionModel.forward`` computes, op for op (tested bit-identical on
the CPU). What it does not support (ControlNet / T2I-adapter residuals, GLIGEN, attention masks,
``class_labels``) falls back to the plain UNet call, with every step full.

Memory: one tensor (the deep output, [3B, C, h_l, w_l] at the first cached level's parent grid) per
pass, kept in the attention controller's per-pass cache and dropped at the end of the pass.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .graphs import compiled



@dataclass(frozen=True)
class Layout:
    """The level of every block of a ``UNet2DConditionModel``: level l runs at the latent grid halved l times.

    down: level of each down block (its input); up: level of each up block (its input); deepest: the
    mid block's level."""

    down: tuple[int, ...]
    up: tuple[int, ...]
    deepest: int

    @classmethod
    def of(cls, unet) -> "Layout":
        down, level = [], 0
        for block in unet.down_blocks:
            down.append(level)
            level += int(getattr(block, "downsamplers", None) is not None)
        deepest, up = level, []
        for block in unet.up_blocks:
            up.append(level)
            level -= int(getattr(block, "upsamplers", None) is not None)
        return cls(tuple(down), tuple(up), deepest)

    def deep_blocks(self, cache_level: int) -> int:
        """Blocks skipped on a cached step (down, mid and up blocks at levels >= cache_level)."""
        if cache_level > self.deepest:
            return 0
        return sum(lv >= cache_level for lv in self.down) + 1 + sum(lv >= cache_level for lv in self.up)


PER_STEP_KEPT = 1000


@dataclass
class CacheStats:
    """Counters: UNet evaluations run whole (full) or with the deep blocks reused (cached), and deep-block
    evaluations (down, mid and up blocks at the cached levels, counted on full steps)."""

    full: int = 0
    cached: int = 0
    deep_block_evals: int = 0
    plain: int = 0  # calls passed to the plain UNet (no caching plan, or inputs the runner does not handle)
    # (step, "full" | "cached") of the caching passes, in order: the last PER_STEP_KEPT only (a service runs
    # edits for days; a list that grew forever would hold every step it ever ran)
    per_step: deque = field(default_factory=lambda: deque(maxlen=PER_STEP_KEPT))


def _n_residuals(block) -> int:
    """Skip tensors a down block hands to the up blocks: one per layer, one per downsampler."""
    downsamplers = getattr(block, "downsamplers", None)
    return len(block.resnets) + (len(downsamplers) if downsamplers is not None else 0)


class StepCache:
    """Callable like ``unet(sample, timestep, encoder_hidden_states, return_dict=..., added_cond_kwargs=...)``
    that, inside a pass whose plan caches (``PassPlan.caches``), runs the whole UNet on full steps and only
    the shallow levels on the others. Outside such a pass it calls ``plain`` (the engine's UNet callable,
    compiled or not), so the faithful path is untouched.

    unet: the ``UNet2DConditionModel`` whose blocks it runs. controller: the engine's
    ``AttentionController``: its running ``PassState`` says what this call is (plan, step), and its
    ``deep`` field, which only this class writes, holds the deep output between steps. plain: the callable for every other call. compile: the engine's
    compile option, applied to the full-step and cached-step functions (lazily, on first use).
    """

    def __init__(self, unet, controller, plain, compile: bool | str = False):
        self.unet, self.ctl, self.plain = unet, controller, plain
        self.compile = compile
        self.layout = Layout.of(unet)
        self.stats = CacheStats()
        # what _forward reproduces of UNet2DConditionModel.forward; anything else: every step full
        self.supported = (getattr(unet, "class_embedding", None) is None
                          and getattr(unet.config, "addition_embed_type", None) != "image_hint"
                          and hasattr(unet, "get_aug_embed") and hasattr(unet, "process_encoder_hidden_states"))
        self._fns: dict[bool, object] = {}

    def _fn(self, full: bool):
        if full not in self._fns:
            fn = self._full if full else self._cached
            self._fns[full] = compiled(fn, self.compile)
        return self._fns[full]

    def __call__(self, sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True,
                 added_cond_kwargs=None, **kwargs):
        st = self.ctl.state
        plan = st.plan if st is not None else None
        extra = args or any(v is not None for v in kwargs.values())
        if (plan is None or not plan.caches or extra or not self.supported
                or self.layout.deep_blocks(plan.cache_level) == 0):
            self.stats.plain += 1
            if added_cond_kwargs is not None:
                kwargs["added_cond_kwargs"] = added_cond_kwargs
            return self.plain(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        step = st.step
        if plan.full_step(step):
            out, deep = self._fn(True)(sample, timestep, encoder_hidden_states, added_cond_kwargs, plan.cache_level)
            st.deep = deep
            self.stats.full += 1
            self.stats.deep_block_evals += self.layout.deep_blocks(plan.cache_level)
            self.stats.per_step.append((step, "full"))
        else:
            deep = st.deep
            if deep is None:
                raise RuntimeError(f"step {step} reuses the deep blocks' output, but no full step of this pass "
                                   "computed it (a caching pass must start at step 0)")
            out = self._fn(False)(sample, timestep, encoder_hidden_states, added_cond_kwargs, plan.cache_level, deep)
            self.stats.cached += 1
            self.stats.per_step.append((step, "cached"))
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    # --- the two step functions (pure: tensors in, tensors out; what torch.compile traces) ---------
    def _full(self, sample, timestep, states, added, cache_level: int):
        """The whole UNet; returns (eps, the deep part's output)."""
        return self._forward(sample, timestep, states, added, cache_level, None)

    def _cached(self, sample, timestep, states, added, cache_level: int, deep):
        """The shallow levels only, the deep part's output taken from ``deep``; returns eps."""
        return self._forward(sample, timestep, states, added, cache_level, deep)[0]

    def _forward(self, sample, timestep, states, added, cache_level: int, deep):
        """``UNet2DConditionModel.forward`` (diffusers 0.3x-0.4x, without ControlNet/adapter/GLIGEN inputs),
        with the blocks at levels >= cache_level replaced by ``deep`` when it is given."""
        unet, lay = self.unet, self.layout
        up_factor = 2 ** unet.num_upsamplers
        forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=states, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        states = unet.process_encoder_hidden_states(encoder_hidden_states=states, added_cond_kwargs=added)

        h = unet.conv_in(sample)
        res: tuple = (h,)
        for block, level in zip(unet.down_blocks, lay.down):
            if deep is not None and level >= cache_level:  # reused: placeholders keep the bookkeeping
                res += (None,) * _n_residuals(block)
                continue
            if getattr(block, "has_cross_attention", False):
                h, r = block(hidden_states=h, temb=emb, encoder_hidden_states=states)
            else:
                h, r = block(hidden_states=h, temb=emb)
            res += r
        if deep is None and unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                h = unet.mid_block(h, emb, encoder_hidden_states=states)
            else:
                h = unet.mid_block(h, emb)
        out_deep, shallow = None, False
        n_up = len(unet.up_blocks)
        for i, (block, level) in enumerate(zip(unet.up_blocks, lay.up)):
            n = len(block.resnets)
            skips, res = res[-n:], res[:-n]
            if level >= cache_level:  # a deep up block: run on full steps, skipped on cached ones
                if deep is not None:
                    continue
            elif not shallow:  # the first shallow up block: the deep part's output is its input
                shallow = True
                if deep is None:
                    out_deep = h
                else:
                    h = deep
            upsample_size = res[-1].shape[2:] if forward_upsample_size and i < n_up - 1 else None
            if getattr(block, "has_cross_attention", False):
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=states,
                          upsample_size=upsample_size)
            else:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips, upsample_size=upsample_size)
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h), out_deep
