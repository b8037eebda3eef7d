"""LimeEngine: an InstructPix2Pix checkpoint plus LIME's two passes.

A full automatic edit of B images reads like the algorithm (``_edit_locked``):

1. ``encode``: VAE latents of the images (posterior mode) and text embeddings, once, shared by both passes.
2. ``localization_pass``: steps 0..capture_step with the localization guidance, capturing attention
   outputs and maps at the capture step, then stopping (capture_step + 1 UNet evaluations).
3. ``segment``: k-means on the fused, L2-normalized features (``lime_fast.segment``).
4. ``localize``: heatmap of the content tokens, top-k cells, RoI = union of their segments.
5. ``edit_pass``: the full edit with unrelated tokens silenced inside the RoI (steps UNet evaluations).
6. ``decode``: VAE decode.

Each pass is one ``PassPlan`` run by ``lime_fast.sampling.run_pass``; on CUDA a whole pass is one CUDA
graph (``lime_fast.graphs.PassGraphs``). Between the host-side preparation (checks, tokenization,
random numbers, masks) and the one copy of the results to the host at the end, an edit queues device
work only: no host-device synchronization inside or between the stages (on the CPU the same code
runs eagerly, and is what the tests compare the graphs with).
"""

from __future__ import annotations

import copy
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from . import families
from .attention import AttentionController, Capture, install, pick_backend
from .config import DEFAULT_MODEL, EditConfig, EngineOptions
from .errors import ConfigError, EditCancelled, LimeWarning, ModelLoadError, NonFiniteLatentsError
from .graphs import LoopGraphs, PassGraphs, compiled, graphed_forward
from .inputs import EditInputs
from .localize import heatmaps, normalized, roi_from_segments
from .refine import RefineCache
from .models import load_error, local_checkpoint, model_location, pixel_multiple, resolve_device, shipped, to_device
from .results import EditResult
from .sampling import PassPlan, draw_noise, is_ancestral, make_scheduler, run_pass, stepper_of
from .segment import _segment
from .speedups import apply as apply_speedups
from .speedups import check_precision
from .stepcache import StepCache
from .tokens import TokenRoles, keep_mask, token_roles


@dataclass
class Encoded:
    """Stage-0 results, shared by both passes.

    image_latents: [B, c, h, w] VAE posterior mode (unscaled, as InstructPix2Pix conditions on it).
    text_embeds: [B, T, C] instruction embeddings; empty_embeds: [1, T, C] the embedding of the two
    branches without the instruction ("" for SD 1.5, zeros for SDXL).
    roles: per edit, its tokens' roles (content / unrelated).
    keep: [B, T] bool on the device, tokens visible inside the RoI; content: [B, T] bool, content tokens.
    """

    image_latents: torch.Tensor
    text_embeds: torch.Tensor
    empty_embeds: torch.Tensor
    roles: list[TokenRoles]
    keep: torch.Tensor | None = None
    content: torch.Tensor | None = None
    pooled: torch.Tensor | None = None  # SDXL: [B, P] pooled text projection; empty_pooled [1, P]
    empty_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None  # SDXL: [1, 6] micro-conditioning (original size, crop, target size)

    @property
    def batch(self) -> int:
        return self.image_latents.shape[0]

    def branch_embeds(self) -> torch.Tensor:
        """[3B, T, C]: text+image, image-only and unconditional branches."""
        empty = self.empty_embeds.expand(self.batch, -1, -1)
        return torch.cat([self.text_embeds, empty, empty])

    def branch_image_latents(self) -> torch.Tensor:
        """[3B, c, h, w]: the image latents for the first two branches, zeros for the unconditional one."""
        lat = self.image_latents
        return torch.cat([lat, lat, torch.zeros_like(lat)])

    def branch_added(self) -> dict[str, torch.Tensor]:
        """The UNet's added conditions per branch (SDXL: ``added_text_embeds`` [3B, P], ``added_time_ids``
        [3B, 6]; nothing for SD 1.5), named as ``run_pass`` takes them."""
        if self.pooled is None:
            return {}
        empty = self.empty_pooled.expand(self.batch, -1)
        return {"added_text_embeds": torch.cat([self.pooled, empty, empty]),
                "added_time_ids": self.time_ids.repeat(3 * self.batch, 1)}

    def one(self, b: int) -> Encoded:
        """Edit b alone (batch 1), in tensors of its own (a slice would keep the whole batch's memory alive)."""
        if self.batch == 1:
            return self
        pick = lambda t: None if t is None else t[b : b + 1].clone()  # noqa: E731
        return Encoded(pick(self.image_latents), pick(self.text_embeds), self.empty_embeds, [self.roles[b]],
                       pick(self.keep), pick(self.content), pick(self.pooled), self.empty_pooled, self.time_ids)

    def select(self, idx: Sequence[int], idx_device: torch.Tensor) -> Encoded:
        """The edits ``idx`` of this batch (``idx_device``: the same indices as a device tensor)."""
        if list(idx) == list(range(self.batch)):
            return self
        pick = lambda t: None if t is None else t.index_select(0, idx_device)  # noqa: E731
        return Encoded(pick(self.image_latents), pick(self.text_embeds), self.empty_embeds,
                       [self.roles[b] for b in idx], pick(self.keep), pick(self.content), pick(self.pooled),
                       self.empty_pooled, self.time_ids)


class _Clock:
    """Seconds per stage without host syncs: CUDA events on the GPU (read once at the end), wall time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []
        self.t0 = time.perf_counter()
        self._mark("start")

    def _mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def __call__(self, name: str) -> None:
        self._mark(name)

    def seconds(self) -> dict[str, float]:
        """Per-stage seconds (call after the work is done) plus 'total' (wall time since creation)."""
        out: dict[str, float] = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            dt = a.elapsed_time(b) / 1000 if self.cuda else b - a
            out[name] = out.get(name, 0.0) + dt
        out["total"] = time.perf_counter() - self.t0
        return out


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Copy several device tensors to the host in ONE transfer (packed as bytes; one sync), as numpy."""
    items = [(k, t.contiguous()) for k, t in tensors.items() if t is not None]
    if not items or items[0][1].device.type == "cpu":
        return {k: t.numpy() for k, t in items}
    packed = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in items]).cpu().numpy()
    out, at = {}, 0
    for k, t in items:
        n = t.numel() * t.element_size()
        dtype = np.dtype(str(t.dtype).removeprefix("torch."))
        out[k] = packed[at : at + n].view(dtype).reshape(tuple(t.shape))
        at += n
    return out


def _stop_if(should_stop) -> None:
    """EditCancelled when the caller's ``should_stop`` says so (None: never)."""
    if should_stop is not None and should_stop():
        raise EditCancelled("the edit was cancelled (should_stop returned True)")


class LimeEngine:
    """An InstructPix2Pix-family pipeline wrapped for LIME edits.

    Build it with ``from_pretrained`` (a local folder or hub id) or ``from_pipe`` (a loaded
    ``StableDiffusionInstructPix2PixPipeline``; its modules are shared, not copied, and its UNet gets
    lime_fast's attention processors, which behave exactly like diffusers' SDPA processor when idle).

    options: an ``EngineOptions`` (``lime_fast.config``: attention backend, CUDA graphs, compile,
    channels-last, fused QKV, precision, the per-pass K/V cache), or its fields as keywords
    (``attention="eager"``, ``compile=True``, ...). With CUDA graphs (the default on CUDA) each denoising
    pass is one CUDA graph, recorded once per ``PassPlan`` and replayed after. Each faster mode's
    measured fidelity: docs/faster-modes.md.
    Step caching of the edit pass is an ``EditConfig`` field (``cache_interval``), per edit.

    One engine may be shared by several threads: edits are serialized by a lock, which also guards
    the CUDA-graph cache.
    """

    def __init__(self, pipe, options: EngineOptions | None = None, *, default_config: EditConfig | None = None,
                 trained_size: int | None = None, **option_fields):
        self.options = opts = EngineOptions.of(options, **option_fields)
        unet, vae = pipe.unet, pipe.vae
        latent_channels = vae.config.latent_channels
        if type(pipe).__name__ not in families.FAMILIES:
            raise ModelLoadError(f"lime_fast edits with InstructPix2Pix pipelines ({', '.join(families.FAMILIES)}); "
                                 f"got {type(pipe).__name__}")
        if unet.config.in_channels != 2 * latent_channels:
            raise ModelLoadError(
                f"this UNet takes {unet.config.in_channels} input channels; an InstructPix2Pix UNet takes "
                f"2 x {latent_channels} (noisy latents + image latents). Is this a plain text-to-image "
                "checkpoint? lime_fast needs an InstructPix2Pix-family model (e.g. timbrooks/instruct-pix2pix)."
            )
        self.pipe = pipe
        self.family = families.of_pipe(pipe)
        if default_config is None:  # the family's LIME levels (SD 1.5: the spec's defaults)
            default_config = EditConfig(**self.family.default_levels(unet.config))
        self.default_config = default_config  # what edit() starts from (a shipped model's own)
        self.source: str | None = None  # the folder or hub id from_pretrained loaded (None: built from a pipe)
        self.trained_size = trained_size  # pixels; larger edits warn (a shipped model never saw them)
        if self.family.upcast_vae and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            # SDXL's VAE overflows in fp16 (diffusers upcasts it around every encode and decode): the engine
            # runs its own fp32 copy (83 M parameters, 0.33 GB) and casts at its boundaries, so the caller's
            # pipeline keeps its fp16 VAE and still runs. A fp16-safe VAE (force_upcast=False) is used as is.
            vae = copy.deepcopy(vae).to(torch.float32)
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, pipe.text_encoder, pipe.tokenizer
        self.scheduler = pipe.scheduler
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.multiple = pixel_multiple(vae.config, unet.config)
        self.speedups = apply_speedups(unet, vae, channels_last=opts.channels_last, fuse_qkv=opts.fuse_qkv,
                                       precision=opts.precision)
        self.controller = AttentionController(pick_backend(opts.attention, unet.device), cache_kv=opts.cache_kv)
        install(unet, self.controller)
        # one attention module, to notice when another engine on the same pipeline installed its processors
        self._probe = next(m for m in unet.modules() if hasattr(m, "processor"))
        self.unet_evals = 0
        self._lock = threading.Lock()  # the controller is per-engine state: one edit at a time
        # The UNet is called as a module, so user hooks, PEFT/LoRA adapters and offloading hooks run (inside
        # a CUDA graph they run once, at capture). After lime_fast.accelerate(pipe) its forward is a
        # per-call graph runner: the engine graphs whole passes itself and takes the plain forward.
        accelerated = graphed_forward(unet)
        self.use_cuda_graphs = (self.device.type == "cuda") if opts.use_cuda_graphs is None else bool(opts.use_cuda_graphs)
        self._unet = compiled(accelerated.forward if accelerated is not None else unet, opts.compile,
                              graphs=self.use_cuda_graphs)
        # What each evaluation of a pass calls: self._unet, except on the steps a caching edit plan
        # runs with the deep blocks reused (lime_fast.stepcache).
        self.stepcache = StepCache(unet, self.controller, self._unet, opts.compile)
        self.graphs = PassGraphs(enabled=self.use_cuda_graphs)
        # The segmentation's Lloyd iterations, kmeans_check_every of them per replay: they are launch-bound
        # (~85 small kernels per iteration; bench_segment's k-means took 68 ms on an H200, RESULTS).
        self.kmeans_graphs = LoopGraphs(enabled=self.use_cuda_graphs)
        # Results keep their edit's latents, embeddings and noise for EditResult.refine (lime_fast/refine.py:
        # ~1.3 MB per result for SD 1.5 at 512 x 512 in fp16); False: results keep nothing and cannot refine.
        self.keep_for_refine = True

    # --- loading --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = DEFAULT_MODEL,
        *,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        use_safetensors: bool = True,
        local_files_only: bool | None = None,
        options: EngineOptions | None = None,
        **kwargs,
    ) -> "LimeEngine":
        """Load an InstructPix2Pix-layout diffusers checkpoint (local folder or hub id).

        torch_dtype: default fp16 on CUDA, fp32 on CPU. device: default CUDA when available. options: an
        ``EngineOptions``, and/or its fields as keywords (attention, use_cuda_graphs, compile,
        channels_last, fuse_qkv, precision, cache_kv); other keywords go to diffusers' ``from_pretrained``.
        Safetensors weights are required unless ``use_safetensors=False``. The safety checker is not
        loaded. A failed load raises one ``ModelLoadError`` naming its cause and what to do.
        """
        opts = EngineOptions.take(options, kwargs)
        device = resolve_device(device)
        check_precision(opts.precision, device)  # before loading anything
        if torch_dtype is None:
            torch_dtype = torch.float16 if device.type == "cuda" else torch.float32
        info = shipped(model)
        path = local_checkpoint(model_location(model))
        try:
            where = str(path) if path is not None else str(model)
            if path is not None:
                family = families.of_folder(path)
            else:  # a hub id: its model_index.json names the pipeline (from the cache, or downloaded)
                from diffusers import DiffusionPipeline

                family = families.of_class_name(
                    DiffusionPipeline.load_config(where, local_files_only=local_files_only).get("_class_name"))
            if family is families.SD15:
                kwargs = dict(safety_checker=None, requires_safety_checker=False, **kwargs)
            with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype to dtype; both work
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = family.pipeline_class().from_pretrained(
                    where,
                    torch_dtype=torch_dtype,
                    use_safetensors=use_safetensors,
                    local_files_only=local_files_only,
                    **kwargs,
                )
        except Exception as e:  # import, filesystem, version and hub errors come in many types: one message each
            raise load_error(e, model, path, use_safetensors) from None
        pipe.set_progress_bar_config(disable=True)
        engine = cls(pipe.to(device), opts, default_config=EditConfig(**info.config) if info else None,
                     trained_size=info.image_size if info else None)
        engine.source = str(path.resolve()) if path is not None else str(model)
        return engine

    @classmethod
    def from_pipe(cls, pipe, options: EngineOptions | None = None, **option_fields) -> "LimeEngine":
        """Wrap an existing ``StableDiffusionInstructPix2PixPipeline`` or ``StableDiffusionXLInstructPix2PixPipeline``
        (modules shared, not copied; an SDXL VAE that needs fp32 runs as the engine's own fp32 copy; the
        options ``channels_last``, ``fuse_qkv``, ``precision`` change the pipe's modules in place).
        options / option_fields: an ``EngineOptions`` and/or its fields as keywords."""
        return cls(pipe, options, **option_fields)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    # --- stage 0: encode ------------------------------------------------------------------
    def preprocess(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """RGB images of one size (multiples of ``self.multiple``) -> [B, 3, H, W] in [-1, 1]."""
        arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)
        return (2.0 * x - 1.0).to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, instructions: Sequence[str], roi_words=None) -> Encoded:
        """pixels [B, 3, H, W] in [-1, 1]; B instructions -> ``Encoded`` (latents, embeddings, token roles)."""
        # token roles from the first tokenizer: SDXL's two tokenizers split text alike (the same CLIP BPE),
        # so position t means the same token in both halves of the concatenated embedding
        roles = [token_roles(self.tokenizer, s, roi_words=roi_words) for s in instructions]
        keep = keep_mask(roles)
        content = torch.zeros_like(keep)
        for b, r in enumerate(roles):
            content[b, r.content] = True
        # every host-to-device copy before the first kernel: a pageable copy waits for queued GPU work
        keep, content = keep.to(self.device), content.to(self.device)
        text = families.encode_text(self.family, self.pipe, instructions, tuple(pixels.shape[-2:]), self.device)
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode().to(self.dtype)
        return Encoded(latents, text.text, text.empty, roles, keep, content, text.pooled, text.empty_pooled, text.time_ids)

    # --- the passes -----------------------------------------------------------------------
    def _plan(self, kind: str, enc: Encoded, cfg: EditConfig, regularized: bool = False) -> PassPlan:
        h, w = enc.image_latents.shape[-2:]
        common = dict(batch=enc.batch, latent_hw=(int(h), int(w)), channels=self.vae.config.latent_channels,
                      steps=cfg.steps, dtype=self.dtype, stepper=stepper_of(self.scheduler))
        if kind == "localize":
            return PassPlan("localize", guidance=(cfg.loc_text_guidance, cfg.loc_image_guidance),
                            capture_step=cfg.capture, feature_levels=tuple(cfg.feature_levels), **common)
        caching = {"cache_interval": cfg.cache_interval, "cache_level": max(cfg.reg_levels, default=0) + 1} \
            if cfg.cache_interval > 1 else {}  # lime_fast.stepcache: the regularized levels always run
        return PassPlan("edit", guidance=(cfg.text_guidance, cfg.image_guidance),
                        reg_levels=tuple(cfg.reg_levels) if regularized else (),
                        reg_range=cfg.reg_range if regularized else (0, -1), **caching, **common)

    def draw_noise(self, enc: Encoded, cfg: EditConfig, seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(initial latents [B, c, h, w], ancestral noise [steps, B, c, h, w]) on the device, from CPU
        generators seeded per edit (default ``cfg.seed``): the same seed gives the same noise on every
        device, and both passes use it (the localization pass its first ``capture`` steps)."""
        seeds = seeds if seeds is not None else [cfg.seed] * enc.batch
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        h, w = enc.image_latents.shape[-2:]
        shape = (enc.batch, self.vae.config.latent_channels, int(h), int(w))
        count = cfg.steps if is_ancestral(self.scheduler) else 0
        init, noise = draw_noise(gens, shape, count, self.dtype)
        return to_device(init, self.device), to_device(noise, self.device)

    def _run(self, plan: PassPlan, enc: Encoded, noise, roi_grid=None, seeds=None, cfg=None, progress=True,
             stop=None) -> dict:
        """One pass (graphed on CUDA); returns run_pass's outputs (``finite`` not yet checked). ``stop``:
        ``edit_batch``'s ``should_stop``, asked after every step of an eager pass."""
        init, steps = noise
        x = {"latents": init, "embeds": enc.branch_embeds(), "image_latents": enc.branch_image_latents(),
             **enc.branch_added()}
        if plan.ancestral:
            x["noise"] = steps[: plan.n_noise]
        if plan.regularizes:
            x["roi_grid"], x["keep"] = roi_grid, enc.keep
        generators = None
        if plan.stepper == "scheduler":  # sched.step may draw its own noise: fresh generators, as diffusers does
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in (seeds or [cfg.seed] * enc.batch)]
            for g in gens:  # skip the initial latents' draws, which draw_noise already made
                torch.randn(init.shape[1:], generator=g, dtype=self.dtype)
            generators = gens
        self.unet_evals += plan.n_evals
        graphed = self.graphs.replays_on(self.device) and plan.graphable
        bar = tqdm(total=plan.n_evals, desc=plan.kind, disable=not progress, leave=False)

        def on_step(i):
            bar.update(1)
            _stop_if(stop)

        try:
            def fn(inputs, sched):
                return run_pass(self.stepcache, self.controller, plan, sched, inputs, generators=generators,
                                on_step=None if graphed else on_step)

            out = self.graphs.run(plan, fn, x, lambda: make_scheduler(self.scheduler, plan.steps, self.device), self.device)
            bar.n = plan.n_evals
            bar.refresh()
        finally:
            bar.close()
        return out

    @staticmethod
    def _check_finite(finite: np.ndarray, what: str, dtype) -> None:
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise NonFiniteLatentsError(
                f"{what}: step {bad} produced NaN/inf latents ({dtype}). In fp16 this is usually an overflow: "
                "retry with torch_dtype=torch.float32 (or bfloat16)."
            )

    # --- stage 1: localization pass -------------------------------------------------------
    @torch.no_grad()
    def localization_pass(self, enc: Encoded, cfg: EditConfig, seeds: Sequence[int] | None = None, progress=True,
                          noise=None) -> Capture:
        """Steps 0..cfg.capture, stopping after the capture step's UNet evaluation.

        Returns a ``Capture``: features [B, C, h_l, w_l] per attention module and head-averaged
        cross-attention maps [B, T, h_l, w_l] per cross-attention module, at cfg.feature_levels.
        noise: ``draw_noise``'s pair (drawn from ``seeds`` when None).
        """
        capture, finite = self._localize_pass(enc, cfg, seeds, progress, noise)
        self._check_finite(finite.cpu().numpy(), "localize", self.dtype)
        return capture

    def _localize_pass(self, enc, cfg, seeds, progress, noise, stop=None) -> tuple[Capture, torch.Tensor]:
        noise = noise if noise is not None else self.draw_noise(enc, cfg, seeds)
        out = self._run(self._plan("localize", enc, cfg), enc, noise, seeds=seeds, cfg=cfg, progress=progress, stop=stop)
        capture = Capture(out["features"], out["feature_levels"], out["maps"], out["map_levels"])
        if not capture.features or not capture.maps:
            raise ConfigError(
                f"no attention layer runs at levels {cfg.feature_levels} of this UNet; "
                "set EditConfig.feature_levels to levels the model has"
            )
        return capture, out["finite"]

    # --- stages 1b/1c: segmentation and localization --------------------------------------
    def segment(self, capture: Capture, grid: tuple[int, int], cfg: EditConfig, *, converged: list | None = None,
                seeds: Sequence[int] | None = None) -> torch.Tensor:
        """k-means segments of each edit's fused features on the output grid -> [B, gh, gw] long.

        On the CPU the Lloyd loop stops as soon as it converges; on a GPU the host reads the on-device
        convergence flag every ``cfg.kmeans_check_every`` iterations (0: never; exactly
        ``cfg.kmeans_max_iter`` iterations, frozen once converged: the same labels with no sync).
        ``converged`` (a list) receives each edit's 0-dim bool flag to read later; ``seeds``: one k-means
        seed per edit (default ``cfg.seed``)."""
        cpu = self.device.type == "cpu"
        sync, check_every = (True, 1) if cpu else (cfg.kmeans_check_every > 0, max(1, cfg.kmeans_check_every))
        batch = capture.features[0].shape[0]
        labels = []
        for b in range(batch):
            seed = cfg.seed if seeds is None else seeds[b]
            res = _segment([f[b] for f in capture.features], grid, k=cfg.clusters, seed=seed, n_init=cfg.kmeans_n_init,
                           max_iter=cfg.kmeans_max_iter, tol=cfg.kmeans_tol, backend=cfg.segment_backend, sync=sync,
                           check_every=check_every, graphs=self.kmeans_graphs)
            labels.append(res.labels.reshape(grid))
            if converged is not None:
                converged.append(torch.as_tensor(res.converged, device=res.labels.device))
        return torch.stack(labels)

    def localize(self, capture: Capture, segments: torch.Tensor, content: torch.Tensor, cfg: EditConfig):
        """RoI and heatmap of every edit, batched on the device: ([B, gh, gw] bool, [B, gh, gw] fp32).

        content: [B, T] bool content tokens (``Encoded.content``). An edit without content tokens (the
        "whole_image" fallback) gets the whole grid as its RoI and an all-zero heatmap."""
        heat = heatmaps(capture.maps, tuple(segments.shape[-2:]), content)
        roi = roi_from_segments(segments, heat, cfg.top_k, cfg.clusters)
        whole = ~content.any(1)[:, None, None]
        return roi | whole, heat

    # --- stage 2: the regularized edit ----------------------------------------------------
    @torch.no_grad()
    def edit_pass(self, enc: Encoded, roi_grid: torch.Tensor | None, cfg: EditConfig, seeds: Sequence[int] | None = None,
                  progress=True, noise=None) -> torch.Tensor:
        """The edit, with unrelated tokens silenced inside roi_grid ([B, gh, gw] bool) at cfg.reg_levels
        during cfg.reg_range, in all three guidance branches. roi_grid None: plain InstructPix2Pix.
        Returns latents [B, c, h, w]."""
        latents, finite = self._edit_pass(enc, roi_grid, cfg, seeds, progress, noise)
        self._check_finite(finite.cpu().numpy(), "edit", self.dtype)
        return latents

    def _edit_pass(self, enc, roi_grid, cfg, seeds, progress, noise, stop=None):
        noise = noise if noise is not None else self.draw_noise(enc, cfg, seeds)
        plan = self._plan("edit", enc, cfg, regularized=roi_grid is not None)
        out = self._run(plan, enc, noise, roi_grid=roi_grid, seeds=seeds, cfg=cfg, progress=progress, stop=stop)
        return out["latents"], out["finite"]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, c, h, w] -> images [B, 3, H, W] fp32 in [0, 1]."""
        cfg = self.vae.config
        latents = latents.to(self.vae.dtype)
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = to_device(torch.tensor(cfg.latents_mean, dtype=latents.dtype).view(1, -1, 1, 1), latents.device)
            std = to_device(torch.tensor(cfg.latents_std, dtype=latents.dtype).view(1, -1, 1, 1), latents.device)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        x = self.vae.decode(latents, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def check_config(self, cfg: EditConfig) -> None:
        """``ConfigError`` naming the field when ``cfg`` asks for what this model or device cannot do: levels
        without attention (features and maps are captured there; the penalty acts on cross-attention), or
        the cuML segmentation without cuML and a GPU. Runs before any work of an edit."""
        have = families.Family.attention_levels(self.unet.config)
        listed = ", ".join(map(str, have))
        for name in ("feature_levels", "reg_levels"):
            bad = [lvl for lvl in getattr(cfg, name) if lvl not in have]
            if bad:
                raise ConfigError(f"{name}={tuple(getattr(cfg, name))}: this UNet has no attention at level(s) "
                                  f"{', '.join(map(str, bad))}; its levels with attention are {listed}")
        if cfg.segment_backend == "cuml":
            import importlib.util

            if self.device.type != "cuda" or importlib.util.find_spec("cuml") is None:
                raise ConfigError("segment_backend='cuml' needs RAPIDS cuML and a CUDA device (pip install "
                                  "'lime-fast[cuml]'); use segment_backend='native', which gives the same segments")

    # --- the whole edit -------------------------------------------------------------------
    def edit(self, image, instruction: str, *, mask=None, mask_convention: str = "auto", progress: bool = True,
             **config) -> EditResult:
        """One LIME edit. ``config`` holds ``EditConfig`` fields (steps, seed, top_k, roi_words, ...) that
        override ``self.default_config`` (the model's own defaults for a shipped model, else the spec's).

        mask: optional user RoI (path, PIL, numpy or torch; any size; True/white = edit here) that skips
        stage 1. An all-False mask gives plain InstructPix2Pix (warning); an all-True mask regularizes
        everywhere (warning). mask_convention: how a mask file or PIL mask marks its region ("auto",
        "white", "transparent", "opaque"; ``lime_fast.inputs.load_mask`` states the rule).
        """
        return self.edit_batch([image], [instruction], masks=None if mask is None else [mask],
                               mask_convention=mask_convention, progress=progress, **config)[0]

    def edit_batch(self, images: Sequence, instructions: Sequence[str], *, masks: Sequence | None = None,
                   mask_convention: str = "auto", seeds: Sequence[int] | None = None, progress: bool = True,
                   should_stop=None,
                   **config) -> list[EditResult]:
        """Several edits in one UNet batch (images are brought to the first image's working size).

        Each edit has its own tokens and RoI; masks, if given, is a list with one entry (or None) per
        image (mask files and PIL masks read with ``mask_convention``, as ``edit``); seeds, if given, one
        seed per edit (default: the config's ``seed`` for all), which draws that edit's noise and seeds
        its k-means, so an edit's result does not depend on the seeds of the others. All edits share the
        other settings. Returns one ``EditResult`` per image.

        should_stop: optional callable asked between stages and after every UNet step of an eager pass
        (a CUDA-graphed pass is one replay: asked before and after it); when it returns True the edit
        stops there with ``EditCancelled`` (a service cancels edits whose clients are gone this way).
        """
        cfg = config.pop("config", None) or self.default_config
        cfg = cfg.replace(**config) if config else cfg
        # everything is checked before any model work
        self.check_config(cfg)
        job = EditInputs.build(images, instructions, masks, multiple=self.multiple, cfg=cfg, trained_size=self.trained_size,
                               mask_convention=mask_convention)
        if seeds is None:
            seeds = [cfg.seed] * len(job.images)
        seeds = [int(cfg.replace(seed=s).seed) for s in seeds]  # validated like the config's own seed
        if len(seeds) != len(job.images):
            raise ValueError(f"got {len(seeds)} seeds for {len(job.images)} images")
        with self._lock:
            return self._edit_locked(job, cfg, progress, seeds, should_stop)

    @torch.no_grad()
    def _edit_locked(self, job: EditInputs, cfg: EditConfig, progress: bool, seeds: list[int],
                     stop=None) -> list[EditResult]:
        self._own_processors()
        clock, evals0 = _Clock(self.device), self.unet_evals
        user_rois = job.mask_grids()  # host: the user masks on the output grid (None where automatic)
        auto = [b for b, m in enumerate(user_rois) if m is None]
        # host-to-device copies first: a pageable copy would wait for the GPU work queued before it
        roi_grid = torch.from_numpy(np.stack([np.zeros(job.grid, bool) if m is None else m for m in user_rois]))
        roi_grid, auto_idx = roi_grid.to(self.device), torch.tensor(auto, dtype=torch.long).to(self.device)
        enc = self.encode(self.preprocess(job.working_images()), job.instructions, roi_words=cfg.roi_words)
        noise = self.draw_noise(enc, cfg, seeds)
        clock("encode")
        _stop_if(stop)
        checks, host = {}, {}
        if auto:
            sub = enc.select(auto, auto_idx)
            sub_noise = (noise[0].index_select(0, auto_idx), noise[1].index_select(1, auto_idx))
            capture, checks["localize"] = self._localize_pass(sub, cfg, [seeds[b] for b in auto], progress, sub_noise, stop)
            clock("localize")
            converged: list[torch.Tensor] = []
            segments = self.segment(capture, job.grid, cfg, converged=converged, seeds=[seeds[b] for b in auto])
            roi, heat = self.localize(capture, segments, sub.content, cfg)
            roi_grid = roi_grid.index_copy(0, auto_idx, roi)
            host.update(segments=segments.to(torch.int32), heat=normalized(heat), converged=torch.stack(converged))
            clock("segment")
            _stop_if(stop)
        regularized = bool(auto) or any(m.any() for m in user_rois if m is not None)
        latents, checks["edit"] = self._edit_pass(enc, roi_grid if regularized else None, cfg, seeds, progress, noise, stop)
        _stop_if(stop)
        clock("edit")
        pixels = self._pixels(latents)
        clock("decode")
        host.update(pixels=pixels, roi=roi_grid, **{f"finite_{k}": v for k, v in checks.items()})
        got = _to_host(host)  # the one device-to-host copy (and sync) of the edit
        for what in checks:
            self._check_finite(got[f"finite_{what}"], what, self.dtype)
        if auto and not got["converged"].all():
            warnings.warn(f"k-means stopped at kmeans_max_iter={cfg.kmeans_max_iter} before converging; the "
                          "segments are those of the last iteration (raise kmeans_max_iter)", LimeWarning, stacklevel=3)
        timings = clock.seconds()
        evals = self.unet_evals - evals0
        caches = self._refine_caches(enc, noise, seeds, cfg, job.working_size)
        results = []
        for b, role in enumerate(enc.roles):
            j = auto.index(b) if b in auto else None
            results.append(EditResult.build(
                job, b, got["pixels"][b], got["roi"][b], role,
                segments=None if j is None else got["segments"][j].astype(np.int64),
                heatmap=None if j is None else got["heat"][j].astype(np.float32),
                timings=timings, unet_evals=evals, cache=caches[b],
            ))
        return results

    # --- refining a finished edit's region (lime_fast/refine.py) ---------------------------
    def _refine_caches(self, enc: Encoded, noise, seeds: list[int], cfg: EditConfig,
                       working_size: tuple[int, int]) -> list[RefineCache | None]:
        """Per edit of a batch, what ``EditResult.refine`` reuses: its ``Encoded`` and noise as batch-1
        tensors of their own on the device, with a weak reference to this engine (a result must not keep a
        model loaded). None each when ``keep_for_refine`` is off."""
        if not self.keep_for_refine:
            return [None] * enc.batch
        me, (init, steps) = weakref.ref(self), noise
        if enc.batch == 1:
            return [RefineCache(me, enc, noise, seeds[0], cfg, working_size)]
        return [RefineCache(me, enc.one(b), (init[b : b + 1].clone(), steps[:, b : b + 1].clone()), seeds[b], cfg,
                            working_size) for b in range(enc.batch)]

    def _own_processors(self) -> None:
        """Put this engine's attention processors back when another engine of the same pipe ran last."""
        if getattr(self._probe.processor, "ctl", None) is not self.controller:
            install(self.unet, self.controller)

    def _pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, c, h, w] -> uint8 pixels [B, H, W, 3] on the device."""
        return (self.decode(latents) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    def refine_pass(self, cache: RefineCache, roi_grid: np.ndarray, progress: bool = True):
        """Stage 2 and the decode of one cached edit with the region ``roi_grid`` (bool [gh, gw]; all False:
        plain InstructPix2Pix, as an empty user mask): (pixels uint8 [h, w, 3] at the working size, seconds
        per stage 'edit', 'decode', UNet evaluations). The same calls, inputs and noise as the edit's own
        pass, so the same region gives the same pixels."""
        with self._lock:
            self._own_processors()
            return self._refine_locked(cache, roi_grid, progress)

    @torch.no_grad()
    def _refine_locked(self, cache: RefineCache, roi_grid: np.ndarray, progress: bool):
        clock, evals0 = _Clock(self.device), self.unet_evals
        roi = torch.from_numpy(roi_grid[None].copy()).to(self.device)
        regularized = bool(roi_grid.any())  # as _edit_locked: an empty region runs the plain plan
        latents, finite = self._edit_pass(cache.enc, roi if regularized else None, cache.cfg, [cache.seed], progress,
                                          cache.noise)
        clock("edit")
        pixels = self._pixels(latents)
        clock("decode")
        got = _to_host({"pixels": pixels, "finite": finite})
        self._check_finite(got["finite"], "edit", self.dtype)
        timings = clock.seconds()
        timings.pop("total")  # lime_fast.refine.refine measures the whole call
        return got["pixels"][0], timings, self.unet_evals - evals0

    def prepare_refine(self, image, instruction: str, cfg: EditConfig) -> tuple[RefineCache, EditInputs]:
        """Stage 0 alone for one edit (encode and draw the noise of ``cfg.seed``): the ``RefineCache`` of an
        edit whose localization was saved elsewhere (``lime-fast edit --session``), and its checked inputs
        (for the grid and the loaded image). Encoding is a VAE encode and a text encode: a small part of an
        edit next to the localization pass and k-means it lets a session skip."""
        self.check_config(cfg)
        job = EditInputs.build([image], [instruction], None, multiple=self.multiple, cfg=cfg,
                               trained_size=self.trained_size)
        with self._lock, torch.no_grad():
            enc = self.encode(self.preprocess(job.working_images()), job.instructions, roi_words=cfg.roi_words)
            noise = self.draw_noise(enc, cfg, [cfg.seed])
        return RefineCache(weakref.ref(self), enc, noise, int(cfg.seed), cfg, job.working_size), job
