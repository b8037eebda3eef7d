"""LimeEngine: an InstructPix2Pix checkpoint plus LIME's two passes.

A full automatic edit runs, for B images at once:

1. ``encode``: VAE latents of the images (posterior mode) and text embeddings, once, shared by both passes.
2. ``localization_pass``: steps 0..capture_step with the localization guidance, capturing attention
   outputs and maps at the capture step, then stopping (capture_step + 1 UNet evaluations).
3. ``segment``: k-means on the fused, L2-normalized features (``lime_fast.segment``).
4. ``localize``: heatmap of the content tokens, top-k cells, RoI = union of their segments.
5. ``edit_pass``: the full edit with unrelated tokens silenced inside the RoI (steps UNet evaluations).
6. ``decode``: VAE decode.

Every UNet evaluation goes through ``_guided_eps`` (three guidance branches in one batch, guidance
combined), the one place a CUDA graph can capture.
"""

from __future__ import annotations

import inspect
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from . import viz
from .attention import AttentionController, Capture, install, pick_backend
from .config import DEFAULT_MODEL, EditConfig
from .errors import LimeWarning, ModelLoadError, NonFiniteLatentsError
from .models import local_checkpoint, model_location, pixel_multiple, shipped
from .graphs import GraphedUNet, compiled, graphed_forward
from .inputs import check_instruction, grid_shape, load_image, load_mask, working_size
from .localize import heatmap, roi_from_segments
from .segment import segment as segment_features
from .tokens import TokenRoles, keep_mask, token_roles


@dataclass
class Encoded:
    """Stage-0 results, shared by both passes.

    image_latents: [B, c, h, w] VAE posterior mode (unscaled, as InstructPix2Pix conditions on it).
    text_embeds: [B, T, C] instruction embeddings; empty_embeds: [1, T, C] embedding of "".
    roles: per edit, its tokens' roles (content / unrelated).
    """

    image_latents: torch.Tensor
    text_embeds: torch.Tensor
    empty_embeds: torch.Tensor
    roles: list[TokenRoles]

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


@dataclass
class EditResult:
    """One finished edit.

    image: the edited image (PIL, RGB, at the input's size).
    roi_mask: bool [H, W] at the input's size (True = regularized region).
    roi_grid: bool [gh, gw] on the output grid.
    segments: int [gh, gw] k-means labels (None when a mask was given).
    heatmap: float32 [gh, gw] localization heatmap, min-max normalized to [0, 1] (None with a mask).
    tokens: content words that localized the edit; silenced: words silenced inside the RoI.
    instruction, input_image: what was asked, as given (RGB).
    timings: seconds per stage ('encode', 'localize', 'segment', 'edit', 'decode', 'total').
    unet_evals: UNet evaluations this edit took (batch-shared ones counted once per batch).
    fallback: None, or how the RoI was chosen when the instruction had no content words.
    """

    image: PIL.Image.Image
    roi_mask: np.ndarray
    roi_grid: np.ndarray
    segments: np.ndarray | None
    heatmap: np.ndarray | None
    tokens: list[str]
    silenced: list[str]
    instruction: str
    input_image: PIL.Image.Image
    timings: dict[str, float] = field(default_factory=dict)
    unet_evals: int = 0
    fallback: str | None = None

    def overlay(self) -> PIL.Image.Image:
        """The input with the RoI tinted red and outlined."""
        return viz.overlay(self.input_image, self.roi_mask)

    def pictures(self) -> dict[str, PIL.Image.Image]:
        """Named pictures: roi (mask), overlay, segments and heatmap (when computed), panel."""
        size = self.input_image.size
        pics = {"roi": viz.mask_image(self.roi_mask), "overlay": self.overlay()}
        if self.segments is not None:
            pics["segments"] = viz.segment_image(self.segments, size)
        if self.heatmap is not None:
            pics["heatmap"] = viz.heatmap_image(self.heatmap, size)
        strip = [("input", self.input_image), ("RoI", pics["overlay"])]
        strip += [(name, pics[name]) for name in ("segments", "heatmap") if name in pics]
        strip.append(("edited", self.image))
        pics["panel"] = viz.panel(strip)
        return pics

    def save_pictures(self, out_dir: str | Path, prefix: str = "") -> dict[str, Path]:
        """Write every picture of ``pictures()`` as ``{prefix}{name}.png`` into out_dir; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, pic in self.pictures().items():
            paths[name] = out / f"{prefix}{name}.png"
            pic.save(paths[name])
        return paths


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LimeEngine:
    """An InstructPix2Pix-family pipeline wrapped for LIME edits.

    Build it with ``from_pretrained`` (a local folder or hub id) or ``from_pipe`` (a loaded
    ``StableDiffusionInstructPix2PixPipeline``; its modules are shared, not copied, and its UNet gets
    lime_fast's attention processors, which behave exactly like diffusers' SDPA processor when idle).

    attention: "auto" (the fused Triton kernel on CUDA when triton imports, else eager), "eager",
    "triton" (forces the kernel, e.g. on the CPU under TRITON_INTERPRET=1), or a callable with the
    signature of ``lime_fast.kernels.reference.regularized_attention_ref`` that replaces cross-attention
    (``benchmarks/release.py`` passes the reference release's pattern this way).
    use_cuda_graphs: replay one CUDA graph per (batch, latent size, dtype, pass state) for every UNet
        evaluation (``lime_fast.graphs``); default True on CUDA. Ignored on the CPU (eager there).
    compile: ``torch.compile`` the UNet's forward (True: inductor, default mode; a string names another
        backend; the fused kernel is a registered custom op, so it stays one opaque node). The first edit per shape then pays the
        compilation (minutes for SD 1.5); combined with CUDA graphs, the compiled code is captured.

    One engine may be shared by several threads: edits are serialized by a lock, which also guards
    the CUDA-graph cache.
    """

    def __init__(self, pipe, attention="auto", *, use_cuda_graphs: bool | None = None, compile: bool | str = False,
                 default_config: EditConfig | None = None, trained_size: int | None = None):
        unet, vae = pipe.unet, pipe.vae
        latent_channels = vae.config.latent_channels
        if unet.config.in_channels != 2 * latent_channels:
            raise ModelLoadError(
                f"this UNet takes {unet.config.in_channels} input channels; an InstructPix2Pix UNet takes "
                f"2 x {latent_channels} (noisy latents + image latents). Is this a plain text-to-image "
                "checkpoint? lime_fast needs an InstructPix2Pix-family model (e.g. timbrooks/instruct-pix2pix)."
            )
        self.pipe = pipe
        self.default_config = default_config or EditConfig()  # what edit() starts from (a shipped model's own)
        self.trained_size = trained_size  # pixels; larger edits warn (a shipped model never saw them)
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, pipe.text_encoder, pipe.tokenizer
        self.scheduler = pipe.scheduler
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.multiple = pixel_multiple(vae.config, unet.config)
        self.controller = AttentionController(pick_backend(attention, unet.device))
        install(unet, self.controller)
        self.unet_evals = 0
        self._lock = threading.Lock()  # the controller is per-engine state: one edit at a time
        accelerated = graphed_forward(unet)  # lime_fast.accelerate(pipe) ran on this pipe: use the plain forward
        forward = accelerated.forward if accelerated is not None else unet.forward
        forward = compiled(forward, compile)
        self.use_cuda_graphs = (self.device.type == "cuda") if use_cuda_graphs is None else bool(use_cuda_graphs)
        self.graphs = GraphedUNet(unet, forward, self.controller, enabled=self.use_cuda_graphs)

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
        attention: str = "auto",
        use_cuda_graphs: bool | None = None,
        compile: bool | str = False,
        **kwargs,
    ) -> "LimeEngine":
        """Load an InstructPix2Pix-layout diffusers checkpoint (local folder or hub id).

        torch_dtype: default fp16 on CUDA, fp32 on CPU. device: default CUDA when available.
        Safetensors weights are required unless ``use_safetensors=False``. The safety checker is not
        loaded. Missing weights raise one ``ModelLoadError`` saying what to do.
        """
        from diffusers import StableDiffusionInstructPix2PixPipeline

        device = torch.device(device) if device is not None else _default_device()
        if torch_dtype is None:
            torch_dtype = torch.float16 if device.type == "cuda" else torch.float32
        info = shipped(model)
        path = local_checkpoint(model_location(model))
        try:
            with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype to dtype; both work
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
                    str(path) if path is not None else str(model),
                    torch_dtype=torch_dtype,
                    use_safetensors=use_safetensors,
                    safety_checker=None,
                    requires_safety_checker=False,
                    local_files_only=local_files_only,
                    **kwargs,
                )
        except Exception as e:  # hub / filesystem errors come in many types; one clear message instead
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(
                f"could not load the model '{model}': {reason}\n"
                "If it is a hub id, its weights are not in the local Hugging Face cache and could not be "
                "downloaded (no network?). Download them once where there is network, e.g. "
                f"`huggingface-cli download {model}`, or pass the path of a local diffusers folder. "
                "To try lime_fast offline, run `lime-fast demo`."
            ) from None
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device), attention=attention, use_cuda_graphs=use_cuda_graphs, compile=compile,
                   default_config=EditConfig(**info.config) if info else None,
                   trained_size=info.image_size if info else None)

    @classmethod
    def from_pipe(cls, pipe, attention: str = "auto", *, use_cuda_graphs: bool | None = None, compile: bool | str = False) -> "LimeEngine":
        """Wrap an existing ``StableDiffusionInstructPix2PixPipeline`` (modules shared, not copied)."""
        return cls(pipe, attention=attention, use_cuda_graphs=use_cuda_graphs, compile=compile)

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
        roles = [token_roles(self.tokenizer, s, roi_words=roi_words) for s in instructions]
        ids = self.tokenizer(
            list(instructions) + [""],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        embeds = self.text_encoder(ids)[0].to(self.text_encoder.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return Encoded(latents, embeds[:-1], embeds[-1:], roles)

    # --- the denoising loop ---------------------------------------------------------------
    def _guided_eps(self, sched, latents, t, embeds, image_latents, s_text: float, s_image: float):
        """One UNet evaluation of the three guidance branches, combined: the graph-capturable unit."""
        self.unet_evals += 1
        x = sched.scale_model_input(torch.cat([latents] * 3), t)
        x = torch.cat([x, image_latents], dim=1)
        eps = self.graphs(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
        e_text, e_image, e_uncond = eps.chunk(3)
        return e_uncond + s_text * (e_text - e_image) + s_image * (e_image - e_uncond)

    def _denoise(self, enc: Encoded, steps, guidance, generators, *, stop_after=None, before_step=None, desc="", progress=True):
        """Run Euler-ancestral (the checkpoint's scheduler) from fresh noise.

        Stops after the UNet evaluation of ``stop_after`` (returns None) or returns final latents.
        ``before_step(i)`` sets the attention controller for step i. Latents are checked for NaN/inf
        once at the end (no host sync inside the loop); the error names the first bad step.
        """
        sched = self.scheduler.__class__.from_config(self.scheduler.config)
        sched.set_timesteps(steps, device=self.device)
        from diffusers.utils.torch_utils import randn_tensor

        h, w = enc.image_latents.shape[-2:]
        shape = (enc.batch, self.vae.config.latent_channels, h, w)
        latents = randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)
        latents = latents * sched.init_noise_sigma
        embeds, image_latents = enc.branch_embeds(), enc.branch_image_latents()
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(sched.step).parameters else {}
        n = steps if stop_after is None else stop_after + 1
        noise = self._ancestral_noise(sched, generators, n if stop_after is None else stop_after, shape)
        finite = torch.ones(n, dtype=torch.bool, device=self.device)
        self.controller.set_latent_size((h, w))
        for i, t in enumerate(tqdm(sched.timesteps[:n], desc=desc, disable=not progress, leave=False)):
            if before_step is not None:
                before_step(i)
            eps = self._guided_eps(sched, latents, t, embeds, image_latents, *guidance)
            if i == stop_after:
                finite[i] = torch.isfinite(eps).all()
                break
            if noise is not None:
                latents = _euler_ancestral_step(sched, eps, latents, noise[i])
            else:
                latents = sched.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
            finite[i] = torch.isfinite(latents).all()
        self.controller.capture, self.controller.regularize = None, False
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            raise NonFiniteLatentsError(
                f"{desc or 'denoising'}: step {bad} produced NaN/inf latents ({self.dtype}). In fp16 this is "
                "usually an overflow: retry with torch_dtype=torch.float32 (or bfloat16)."
            )
        return None if stop_after is not None else latents

    def _ancestral_noise(self, sched, generators, count: int, shape) -> torch.Tensor | None:
        """Euler-ancestral's per-step noise for the whole pass, drawn up front: [count, B, c, h, w].

        diffusers' step draws it from the CPU generators inside the loop and copies it to the device
        each step (a pageable copy: a host sync per step). Drawing the same numbers, from the same
        generators in the same order, before the loop makes one copy per pass; the results are
        bit-identical to ``sched.step`` (tests/test_engine.py compares with diffusers' pipeline).
        None for other schedulers (they keep ``sched.step``)."""
        from diffusers import EulerAncestralDiscreteScheduler

        if (type(sched) is not EulerAncestralDiscreteScheduler or not hasattr(sched, "_step_index")
                or sched.config.prediction_type not in ("epsilon", "v_prediction") or count < 1):
            return None
        one = (1, *shape[1:])
        draws = [torch.cat([torch.randn(one, generator=g, dtype=self.dtype) for g in generators]) for _ in range(count)]
        return torch.stack(draws).to(self.device)

    def _graphs_active(self) -> bool:
        return self.graphs.replays_on(self.device)

    def _generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        # CPU generators: the same seed gives the same noise on every device.
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    # --- stage 1: localization pass -------------------------------------------------------
    @torch.no_grad()
    def localization_pass(self, enc: Encoded, cfg: EditConfig, seeds: Sequence[int] | None = None, progress=True) -> Capture:
        """Steps 0..cfg.capture, stopping after the capture step's UNet evaluation.

        Returns a ``Capture``: features [B, C, h_l, w_l] per attention module and head-averaged
        cross-attention maps [B, T, h_l, w_l] per cross-attention module, at cfg.feature_levels.
        """
        ctl, capture = self.controller, Capture()
        ctl.static = self._graphs_active()
        ctl.feature_levels, ctl.regularize = tuple(cfg.feature_levels), False
        ctl.set_regularization(None, None)

        def before_step(i):
            ctl.capture = capture if i == cfg.capture else None

        seeds = seeds if seeds is not None else [cfg.seed] * enc.batch
        self._denoise(
            enc,
            cfg.steps,
            (cfg.loc_text_guidance, cfg.loc_image_guidance),
            self._generators(seeds),
            stop_after=cfg.capture,
            before_step=before_step,
            desc="localize",
            progress=progress,
        )
        if not capture.features or not capture.maps:
            raise RuntimeError(
                f"no attention layer runs at levels {cfg.feature_levels} of this UNet; "
                "set EditConfig.feature_levels to levels the model has"
            )
        return capture

    # --- stages 1b/1c: segmentation and localization --------------------------------------
    def segment(self, capture: Capture, grid: tuple[int, int], cfg: EditConfig) -> torch.Tensor:
        """k-means segments of each edit's fused features on the output grid -> [B, gh, gw] long."""
        batch = capture.features[0].shape[0]
        return torch.stack(
            [
                segment_features(
                    [f[b] for f in capture.features],
                    grid,
                    k=cfg.clusters,
                    seed=cfg.seed,
                    n_init=cfg.kmeans_n_init,
                    max_iter=cfg.kmeans_max_iter,
                    tol=cfg.kmeans_tol,
                    backend=cfg.segment_backend,
                )
                for b in range(batch)
            ]
        )

    def localize(self, capture: Capture, segments: torch.Tensor, roles: Sequence[TokenRoles], top_k: int):
        """RoI and heatmap per edit: ([B, gh, gw] bool, [B, gh, gw] fp32 or NaN-free zeros for whole-image)."""
        grid = tuple(segments.shape[-2:])
        rois, heats = [], []
        for b, role in enumerate(roles):
            if not role.content:  # "whole_image" fallback: nothing to localize
                rois.append(torch.ones(grid, dtype=torch.bool, device=segments.device))
                heats.append(torch.zeros(grid, device=segments.device))
                continue
            heat = heatmap([m[b] for m in capture.maps], grid, role.content)
            rois.append(roi_from_segments(segments[b], heat, top_k))
            heats.append(heat)
        return torch.stack(rois), torch.stack(heats)

    # --- stage 2: the regularized edit ----------------------------------------------------
    @torch.no_grad()
    def edit_pass(self, enc: Encoded, roi_grid: torch.Tensor | None, cfg: EditConfig, seeds: Sequence[int] | None = None, progress=True) -> torch.Tensor:
        """The edit, with unrelated tokens silenced inside roi_grid ([B, gh, gw] bool) at cfg.reg_levels
        during cfg.reg_range, in all three guidance branches. roi_grid None: plain InstructPix2Pix.
        Returns latents [B, c, h, w]."""
        ctl = self.controller
        ctl.static = self._graphs_active()
        ctl.reg_levels = tuple(cfg.reg_levels)
        ctl.capture = None
        ctl.set_latent_size(tuple(enc.image_latents.shape[-2:]))
        if roi_grid is not None:
            ctl.set_regularization(roi_grid.to(self.device), keep_mask(enc.roles).to(self.device))
        else:
            ctl.set_regularization(None, None)
        first, last = cfg.reg_range

        def before_step(i):
            ctl.regularize = first <= i <= last

        seeds = seeds if seeds is not None else [cfg.seed] * enc.batch
        try:
            return self._denoise(
                enc,
                cfg.steps,
                (cfg.text_guidance, cfg.image_guidance),
                self._generators(seeds),
                before_step=before_step,
                desc="edit",
                progress=progress,
            )
        finally:
            ctl.set_regularization(None, None)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, c, h, w] -> images [B, 3, H, W] fp32 in [0, 1]."""
        x = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)

    # --- the whole edit -------------------------------------------------------------------
    def edit(self, image, instruction: str, *, mask=None, progress: bool = True, **config) -> EditResult:
        """One LIME edit. ``config`` holds ``EditConfig`` fields (steps, seed, top_k, roi_words, ...) that
        override ``self.default_config`` (the model's own defaults for a shipped model, else the spec's).

        mask: optional user RoI (path, PIL, numpy or torch; any size; True/white = edit here) that skips
        stage 1. An all-False mask gives plain InstructPix2Pix (warning); an all-True mask regularizes
        everywhere (warning).
        """
        return self.edit_batch([image], [instruction], masks=None if mask is None else [mask], progress=progress, **config)[0]

    def edit_batch(self, images: Sequence, instructions: Sequence[str], *, masks: Sequence | None = None, progress: bool = True, **config) -> list[EditResult]:
        """Several edits in one UNet batch (images are brought to the first image's working size).

        Each edit has its own tokens and RoI; masks, if given, is a list with one entry (or None) per
        image. All edits use the same config. Returns one ``EditResult`` per image.
        """
        cfg = config.pop("config", None) or self.default_config
        cfg = cfg.replace(**config) if config else cfg
        if isinstance(instructions, str) or len(images) != len(instructions):
            raise ValueError("edit_batch takes equal-length lists of images and instructions")
        if not images:
            raise ValueError("edit_batch needs at least one image")
        masks = list(masks) if masks is not None else [None] * len(images)
        if len(masks) != len(images):
            raise ValueError(f"got {len(masks)} masks for {len(images)} images")
        # --- check everything before any model work ---
        inputs = [load_image(im) for im in images]
        texts = [check_instruction(s) for s in instructions]
        user_masks = [None if m is None else load_mask(m) for m in masks]
        with self._lock:
            return self._edit_locked(inputs, texts, user_masks, cfg, progress)

    def _edit_locked(self, inputs, texts, user_masks, cfg: EditConfig, progress: bool) -> list[EditResult]:
        t0 = time.perf_counter()
        times: dict[str, float] = {}

        def tick(name, since):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            times[name] = times.get(name, 0.0) + now - since
            return now

        evals0 = self.unet_evals
        w, h = working_size(*inputs[0].size, self.multiple, cfg.max_side)
        if self.trained_size and max(w, h) > self.trained_size:
            warnings.warn(
                f"this model was trained on {self.trained_size} x {self.trained_size} pictures; at {w} x {h} it "
                f"garbles the image: resize the input to {self.trained_size} pixels, or use a model made for "
                "photos (e.g. timbrooks/instruct-pix2pix)", LimeWarning, stacklevel=3)
        grid = grid_shape(h, w, cfg.grid_size)
        work = [im if im.size == (w, h) else im.resize((w, h), PIL.Image.LANCZOS) for im in inputs]
        t = time.perf_counter()
        enc = self.encode(self.preprocess(work), texts, roi_words=cfg.roi_words)
        t = tick("encode", t)

        auto = [b for b, m in enumerate(user_masks) if m is None]
        rois = [None] * len(inputs)
        segs, heats = [None] * len(inputs), [None] * len(inputs)
        for b, m in enumerate(user_masks):
            if m is not None:
                rois[b] = _mask_to_grid(m, grid)
                if not rois[b].any():
                    warnings.warn("the mask is empty: nothing is regularized, the edit is plain InstructPix2Pix", LimeWarning, stacklevel=3)
                elif rois[b].all():
                    warnings.warn("the mask covers the whole image: unrelated tokens are silenced everywhere", LimeWarning, stacklevel=3)
        if auto:
            sub = Encoded(enc.image_latents[auto], enc.text_embeds[auto], enc.empty_embeds, [enc.roles[b] for b in auto])
            capture = self.localization_pass(sub, cfg, progress=progress)
            t = tick("localize", t)
            seg = self.segment(capture, grid, cfg)
            roi, heat = self.localize(capture, seg, sub.roles, cfg.top_k)
            t = tick("segment", t)
            for j, b in enumerate(auto):
                rois[b], segs[b] = roi[j].cpu().numpy(), seg[j].cpu().numpy()
                hm = heat[j].float().cpu().numpy()
                span = hm.max() - hm.min()
                heats[b] = ((hm - hm.min()) / span if span > 0 else np.zeros_like(hm)).astype(np.float32)
        roi_grid = torch.from_numpy(np.stack(rois)).to(self.device)
        latents = self.edit_pass(enc, roi_grid if roi_grid.any() else None, cfg, progress=progress)
        t = tick("edit", t)
        pixels = self.decode(latents)
        arr = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        t = tick("decode", t)
        times["total"] = t - t0

        results = []
        for b, im in enumerate(inputs):
            out = PIL.Image.fromarray(arr[b])
            if out.size != im.size:
                out = out.resize(im.size, PIL.Image.LANCZOS)
            if user_masks[b] is not None and user_masks[b].shape == (im.height, im.width):
                full = user_masks[b]
            else:
                full = np.asarray(viz.mask_image(rois[b], im.size)) > 127
            role = enc.roles[b]
            results.append(
                EditResult(
                    image=out,
                    roi_mask=full,
                    roi_grid=rois[b],
                    segments=segs[b],
                    heatmap=heats[b],
                    tokens=list(role.content_words),
                    silenced=[role.words[i] or role.tokens[i] for i in range(1, len(role.tokens) - 1) if not role.keep[i]],
                    instruction=role.instruction,
                    input_image=im,
                    timings=dict(times),
                    unet_evals=self.unet_evals - evals0,
                    fallback=role.fallback,
                )
            )
        return results


def _euler_ancestral_step(sched, eps: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
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


def _mask_to_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """bool [H, W] -> bool [gh, gw] (nearest)."""
    gh, gw = grid
    return np.asarray(viz.mask_image(mask, (gw, gh))) > 127
