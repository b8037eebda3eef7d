"""CUDA-graph replay of a UNet's forward, one graph per input signature.

``GraphedUNet(unet)`` is called exactly like ``unet(sample, timestep, encoder_hidden_states=...)``.
On the first call with a new signature (shapes and dtypes of the three inputs, ``return_dict``, and
the attention controller's state key: capture on/off, which levels carry RoI buffers, latent size)
it runs the forward eagerly ``warmup`` times on a side stream, which also runs the Triton kernel's
autotuning, then captures one CUDA graph into a pool shared by all of this runner's graphs. Every
later call copies the inputs into the graph's static buffers, replays, and returns a copy of the
static output, so a caller may keep its result while the next step runs.

Why a pool may be shared: replays never overlap (one lock per runner) and every output is copied
(or, for the localization capture, cloned into the caller's ``Capture``) before the next replay.

Penalty on/off per step without re-capture: in graph mode the attention controller is *static*: its
RoI masks live in fixed buffers that the graph reads at every regularized level, and switching the
penalty off writes zeros into them (an all-False RoI is exactly plain attention in the kernel), so
one graph serves every step of a pass. The localization pass's capture step is a second graph whose
captured features and maps are graph-owned tensors, cloned out after each replay.

Falls back to the eager forward (same results): on the CPU (unless ``emulate``), with autograd on,
while torch.compile traces, with inputs it does not know (any extra keyword that is not None), and
for a signature whose capture failed (warned once).

Thread safety: one ``threading.Lock`` per runner guards the graph cache and each copy-in / replay /
copy-out, so an engine shared by several threads is safe; calls are serialized.

``emulate=True`` runs the same static-buffer path on any device with the eager forward standing in
for the replay: how the CPU tests check the buffer and key logic that the GPU relies on.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field

import torch

from .errors import LimeWarning


@dataclass
class _Entry:
    graph: "torch.cuda.CUDAGraph | None"
    sample: torch.Tensor
    timestep: torch.Tensor
    states: torch.Tensor
    out: torch.Tensor | None = None
    recorded: object = None  # the Capture filled while recording (graph-owned tensors), or None


@dataclass
class GraphStats:
    """Counters for tests and reports: captures, replays and eager fallbacks."""

    captures: int = 0
    replays: int = 0
    eager_calls: int = 0
    failed: dict = field(default_factory=dict)


class GraphedUNet:
    """Callable stand-in for ``unet(...)`` that replays one CUDA graph per input signature.

    unet: a diffusers ``UNet2DConditionModel``. forward: the callable to capture (default the UNet's
    own forward; pass a ``torch.compile``d one to graph compiled code). controller: the
    ``AttentionController`` whose state is part of each graph's key (None: no LIME state).
    """

    def __init__(self, unet, forward=None, controller=None, *, enabled: bool = True, emulate: bool = False, warmup: int = 2):
        self.unet = unet
        self.forward = forward if forward is not None else unet.forward
        self.controller = controller
        self.enabled = enabled
        self.emulate = emulate
        self.warmup = warmup
        self.stats = GraphStats()
        self._graphs: dict[tuple, _Entry] = {}
        self._pool = None
        self._lock = threading.Lock()

    # --- public ---------------------------------------------------------------------------
    def __call__(self, sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True, **kwargs):
        extra = {k: v for k, v in kwargs.items() if v is not None}
        if not self._graphable(sample, encoder_hidden_states, args, extra):
            self.stats.eager_calls += 1
            return self.forward(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        timestep = self._as_tensor(timestep, sample.device)
        key = self._key(sample, timestep, encoder_hidden_states)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None and key not in self.stats.failed:
                entry = self._record(key, sample, timestep, encoder_hidden_states)
            if entry is None:  # this signature's capture failed: eager
                self.stats.eager_calls += 1
                return self.forward(sample, timestep, encoder_hidden_states, return_dict=return_dict)
            out = self._replay(entry, sample, timestep, encoder_hidden_states)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    def clear(self) -> None:
        """Drop every graph (frees their memory pool once no output references it)."""
        with self._lock:
            self._graphs.clear()
            self._pool = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def replays_on(self, device) -> bool:
        """Whether calls on ``device`` go through graphs (or their emulation) rather than eager."""
        return self.enabled and (self.emulate or torch.device(device).type == "cuda")

    # --- internals ------------------------------------------------------------------------
    def _graphable(self, sample, states, args, extra) -> bool:
        if args or extra or states is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        return self.replays_on(sample.device)

    @staticmethod
    def _as_tensor(timestep, device) -> torch.Tensor:
        if isinstance(timestep, torch.Tensor):
            return timestep
        return torch.tensor(timestep, device=device)

    def _key(self, sample, timestep, states) -> tuple:
        ctl = self.controller.graph_key() if self.controller is not None else None
        return (tuple(sample.shape), sample.dtype, sample.device, tuple(timestep.shape), timestep.dtype,
                tuple(states.shape), states.dtype, ctl)

    def _run(self, entry: _Entry):
        return self.forward(entry.sample, entry.timestep, entry.states, return_dict=False)[0]

    def _record(self, key, sample, timestep, states) -> _Entry | None:
        ctl = self.controller
        caller_capture = ctl.capture if ctl is not None else None
        entry = _Entry(None, sample.clone(), timestep.to(sample.device).clone(), states.clone())
        try:
            if self.emulate:
                self._graphs[key] = entry
                return entry
            from .attention import Capture

            side = torch.cuda.Stream(device=sample.device)
            side.wait_stream(torch.cuda.current_stream(sample.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):  # also runs the kernel's autotuning, before capture
                    if caller_capture is not None:
                        ctl.capture = Capture()
                    self._run(entry)
            torch.cuda.current_stream(sample.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if caller_capture is not None:
                ctl.capture = Capture()
            with torch.cuda.graph(graph, pool=self._pool):
                entry.out = self._run(entry)
            entry.graph = graph
            entry.recorded = ctl.capture if caller_capture is not None else None
            if self._pool is None:
                self._pool = graph.pool()
            self.stats.captures += 1
            self._graphs[key] = entry
            return entry
        except Exception as e:  # an op that cannot be captured: this signature stays eager
            self.stats.failed[key] = f"{type(e).__name__}: {e}"
            warnings.warn(f"CUDA-graph capture failed, running this UNet signature eagerly: {type(e).__name__}: {e}",
                          LimeWarning, stacklevel=3)
            torch.cuda.synchronize(sample.device)
            return None
        finally:
            if ctl is not None:
                ctl.capture = caller_capture

    def _replay(self, entry: _Entry, sample, timestep, states) -> torch.Tensor:
        entry.sample.copy_(sample)
        entry.timestep.copy_(timestep)
        entry.states.copy_(states)
        ctl = self.controller
        if entry.graph is None:  # emulation: the eager forward on the static buffers
            if ctl is not None and ctl.capture is not None:
                from .attention import Capture

                caller, ctl.capture = ctl.capture, Capture()
                try:
                    entry.out = self._run(entry)
                    entry.recorded = ctl.capture
                finally:
                    ctl.capture = caller
            else:
                entry.out = self._run(entry)
        else:
            entry.graph.replay()
        self.stats.replays += 1
        if ctl is not None and ctl.capture is not None and entry.recorded is not None:
            rec, dst = entry.recorded, ctl.capture
            dst.features.extend(t.clone() for t in rec.features)
            dst.feature_levels.extend(rec.feature_levels)
            dst.maps.extend(t.clone() for t in rec.maps)
            dst.map_levels.extend(rec.map_levels)
        return entry.out.clone()


def compiled(forward, compile: bool | str):
    """``forward`` through ``torch.compile`` when asked: True = inductor, a string names the backend."""
    if not compile:
        return forward
    return torch.compile(forward, backend="inductor" if compile is True else compile)


def graphed_forward(unet) -> GraphedUNet | None:
    """The ``GraphedUNet`` that ``lime_fast.accelerate`` installed as ``unet.forward``, if any."""
    fwd = unet.__dict__.get("forward")
    return fwd if isinstance(fwd, GraphedUNet) else None


def accelerate(pipe, *, use_cuda_graphs: bool = True, compile: bool = False, attention: str = "auto"):
    """Make an existing diffusers ``StableDiffusionInstructPix2PixPipeline`` faster, in place; returns it.

    The caller changes nothing else: ``pipe(prompt, image=..., ...)`` keeps its signature and returns
    the same images (to fp16 tolerance on CUDA). Underneath, every cross-attention call runs the fused
    Triton kernel (penalty off: plain attention; self-attention stays on SDPA) and every UNet call
    replays a CUDA graph per input signature (``GraphedUNet`` installed as ``pipe.unet.forward``).
    On the CPU both fall back to eager PyTorch (SDPA), so the pipeline still runs.

    use_cuda_graphs / compile / attention: as for ``LimeEngine``. Calling it twice is a no-op. To undo:
    ``del pipe.unet.forward; pipe.unet.set_attn_processor(AttnProcessor2_0())`` (from
    ``diffusers.models.attention_processor``).
    """
    from .attention import AttentionController, install, pick_backend

    unet = pipe.unet
    if graphed_forward(unet) is not None:
        return pipe
    controller = AttentionController(pick_backend(attention, unet.device))
    install(unet, controller)
    forward = compiled(unet.forward, compile)
    unet.forward = GraphedUNet(unet, forward, controller, enabled=use_cuda_graphs)
    return pipe
