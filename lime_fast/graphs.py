"""CUDA graphs: whole denoising passes for the engine, single UNet calls for ``accelerate(pipe)``.

``PassGraphs`` holds one CUDA graph per ``PassPlan`` (``lime_fast.sampling``): a whole pass (every
UNet evaluation, the scheduler steps, the guidance combination, the per-step penalty switch, the
capture step's outputs and the finite checks) recorded once and replayed for every later pass with the
same plan. The plan is immutable and the whole loop is unrolled into the graph, so the per-step state
(which step captures, which steps are regularized) is fixed at capture time: no buffer toggling, no
host work between UNet evaluations. A replay copies the pass's input tensors (initial noise, ancestral
noise, embeddings, image latents, RoI and keep masks) into the graph's static buffers, replays, and
returns copies of its outputs, so a caller may keep them while the next pass runs.

Recording: the pass runs ``warmup`` times eagerly on a side stream (this also runs the Triton
kernel's autotuning and fills cuDNN/cuBLAS caches), then once under capture into a memory pool shared
by all of this cache's graphs (replays never overlap: one lock per cache, and every output is copied
before the next replay). A plan whose capture fails runs eagerly from then on (warned once).

``GraphedUNet`` is the per-call variant for ``accelerate(pipe)``, where lime_fast does not own the
sampling loop: one graph per UNet input signature, called exactly like ``unet(...)``.

``LoopGraphs`` graphs a chunk of a loop whose body returns its new state (the segmentation's Lloyd
iterations): recorded once per key and shape, the state copied back into the graph's own buffers, and
replayed until the loop is done. Launch-bound
loops of small kernels are what graphs are for: one Lloyd iteration issues ~85 kernels through ~180
dispatched operators, and each kernel is a few microseconds of device work.

Both fall back to eager code (same results): on the CPU (unless ``emulate``), with autograd on, while
torch.compile traces. ``emulate=True`` runs the same static-buffer path on any device with the eager
code standing in for the replay: how the CPU tests check the buffer and key logic the GPU relies on.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from .errors import LimeWarning


@dataclass
class GraphStats:
    """Counters for tests and reports: captures, replays and eager runs."""

    captures: int = 0
    replays: int = 0
    eager_calls: int = 0
    failed: dict = field(default_factory=dict)


def replays_on(enabled: bool, emulate: bool, device) -> bool:
    """Whether work on ``device`` goes through graphs (or their emulation) rather than eager code."""
    return enabled and (emulate or torch.device(device).type == "cuda")


def _capture(fn, device, pool, warmup: int):
    """Run ``fn()`` ``warmup`` times on a side stream (autotuning, allocator and library caches happen
    there), then record it once into a new CUDA graph in ``pool``: (graph, what the recorded call returned)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def _clone(tree):
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


class _GraphCache:
    """What both graph runners share: the cache of graphs by key, their memory pool, the lock, counters,
    and recording with warm-up and an eager fallback for a key whose capture fails (warned once)."""

    def __init__(self, *, enabled: bool, emulate: bool, warmup: int):
        self.enabled = enabled
        self.emulate = emulate
        self.warmup = warmup
        self.stats = GraphStats()
        self._graphs: dict = {}
        self._pool = None
        self._lock = threading.Lock()

    def replays_on(self, device) -> bool:
        """Whether work on ``device`` goes through graphs (or their emulation) rather than eager code."""
        return replays_on(self.enabled, self.emulate, device)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph (frees their memory pool once no output references it)."""
        with self._lock:
            self._graphs.clear()
            self._pool = None

    def _record(self, key, entry, run, device, what: str):
        """Record ``run()`` (which fills ``entry``'s outputs from its static inputs) as ``entry.graph`` and
        cache the entry under ``key``; under emulation on a non-CUDA device just cache it. None if the
        capture fails (the key then runs eagerly)."""
        device = torch.device(device)
        if self.emulate and device.type != "cuda":
            self._graphs[key] = entry
            return entry
        try:
            entry.graph, entry.out = _capture(run, device, self._pool, self.warmup)
            if self._pool is None:
                self._pool = entry.graph.pool()
            self.stats.captures += 1
            self._graphs[key] = entry
            return entry
        except Exception as e:  # an op that cannot be captured: this key stays eager
            self.stats.failed[key] = f"{type(e).__name__}: {e}"
            warnings.warn(f"CUDA-graph capture of {what} failed, running it eagerly: {type(e).__name__}: {e}",
                          LimeWarning, stacklevel=4)
            torch.cuda.synchronize(device)
            return None


@dataclass
class _PassEntry:
    graph: "torch.cuda.CUDAGraph | None"
    inputs: dict  # name -> static buffer
    sched: object = None  # the scheduler the graph was recorded with (its timesteps tensor stays alive)
    out: dict | None = None


class PassGraphs(_GraphCache):
    """One CUDA graph per ``PassPlan``: record a whole pass once, replay it for every later pass.

    ``run(plan, fn, inputs, make_sched, device)`` returns what ``fn(inputs, sched)`` returns (a dict of
    tensors and lists of tensors), computed by a replay when graphs are on. ``inputs``: name -> tensor,
    with shapes the plan determines; ``make_sched()``: a fresh scheduler (each recorded run needs one).
    """

    def __init__(self, *, enabled: bool = True, emulate: bool = False, warmup: int = 1):
        super().__init__(enabled=enabled, emulate=emulate, warmup=warmup)

    def run(self, plan, fn, inputs: dict, make_sched, device) -> dict:
        graphable = (self.replays_on(device) and plan.graphable and not torch.is_grad_enabled()
                     and not torch.compiler.is_compiling())
        if not graphable:
            self.stats.eager_calls += 1
            return fn(inputs, make_sched())
        with self._lock:
            entry = self._graphs.get(plan)
            if entry is None and plan not in self.stats.failed:
                new = _PassEntry(None, {k: v.clone() for k, v in inputs.items()})
                # schedulers made outside the capture (set_timesteps copies to the device); the recorded
                # run's must outlive the graph, which reads its timesteps tensor
                scheds = [make_sched() for _ in range(self.warmup + 1)]
                new.sched, runs = scheds[-1], iter(scheds)
                entry = self._record(plan, new, lambda: fn(new.inputs, next(runs)), device, f"a {plan.kind} pass")
            if entry is None:  # this plan's capture failed: eager
                self.stats.eager_calls += 1
                return fn(inputs, make_sched())
            for name, buf in entry.inputs.items():
                buf.copy_(inputs[name])
            if entry.graph is None:  # emulation: the eager pass on the static buffers
                entry.out = fn(entry.inputs, make_sched())
            else:
                entry.graph.replay()
            self.stats.replays += 1
            return _clone(entry.out)


def tree_signature(tree) -> tuple:
    """A hashable description of a pytree: each tensor leaf's shape, dtype and device, other leaves as is."""
    return tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in tree_leaves(tree))


def _copy_into(dst_tree, src_tree) -> None:
    dst, dst_spec = tree_flatten(dst_tree)
    src, src_spec = tree_flatten(src_tree)
    if dst_spec != src_spec:  # (a dict's keys in another order would pair the wrong tensors)
        raise ValueError(f"LoopGraphs: the state's structure changed: {src_spec} vs {dst_spec}")
    for d, t in zip(dst, src):
        if isinstance(d, torch.Tensor):
            d.copy_(t)


def _loop(body, data, state, repeats: int, stop):
    for _ in range(repeats):
        state = body(data, state)
        if stop is not None and stop(state):
            break
    return state


@dataclass
class _LoopEntry:
    graph: "torch.cuda.CUDAGraph | None"
    data: object  # static copies of the loop's inputs (a pytree)
    state: object  # static copies of its state, updated in place by every replay
    out: object = None


class LoopGraphs(_GraphCache):
    """One CUDA graph per (key, shapes) for a chunk of a loop: ``body(data, state)`` runs some iterations
    and returns the new state (the same structure); the graph copies it into the static state, so
    replays chain.

    ``run(key, body, data, state, device, repeats=n, stop=f)`` copies ``data`` and ``state`` (pytrees of
    tensors, any other leaves are part of the key) into the key's static buffers, replays up to ``n``
    times, after each replay asks ``stop(static state)`` (a host read: the only sync), and returns a copy
    of the static state. ``key`` names what else the body's code depends on (constants it closes over).
    Eager (graphs off, the CPU without ``emulate``, a tensor that requires grad, a failed capture): the
    bodies chain on the caller's tensors, ``state = body(data, state)``, and the last state is returned.

    Each entry keeps static copies of its data (the k-means' features: ~100 MB for SD 1.5 at 512 x 512),
    so at most ``max_entries`` are kept, the least recently used dropped first: a service that sees many
    picture sizes re-records (one warm-up and one capture) instead of holding a copy per size.
    """

    def __init__(self, *, enabled: bool = True, emulate: bool = False, warmup: int = 1, max_entries: int = 4):
        super().__init__(enabled=enabled, emulate=emulate, warmup=warmup)
        self.max_entries = max_entries

    def run(self, key, body, data, state, device, *, repeats: int, stop=None):
        needs_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves((data, state)))
        if not self.replays_on(device) or needs_grad or torch.compiler.is_compiling():
            self.stats.eager_calls += 1
            return _loop(body, data, state, repeats, stop)
        key = (key, tree_signature(data), tree_signature(state))
        with self._lock:
            entry = self._graphs.pop(key, None)  # (re-inserted below: the dict's order is the LRU order)
            if entry is not None:
                self._graphs[key] = entry
            elif key not in self.stats.failed:
                while len(self._graphs) >= self.max_entries:
                    self._graphs.pop(next(iter(self._graphs)))
                new = _LoopEntry(None, _clone(data), _clone(state))
                entry = self._record(key, new, lambda: _copy_into(new.state, body(new.data, new.state)), device,
                                     f"a loop chunk ({key[0]})")
            if entry is None:  # this key's capture failed: eager
                self.stats.eager_calls += 1
                return _loop(body, data, state, repeats, stop)
            _copy_into(entry.data, data)
            _copy_into(entry.state, state)  # (also undoes the recording's warm-up runs)
            for _ in range(repeats):
                if entry.graph is None:  # emulation: the eager body on the static buffers
                    _copy_into(entry.state, body(entry.data, entry.state))
                else:
                    entry.graph.replay()
                self.stats.replays += 1
                if stop is not None and stop(entry.state):
                    break
            return _clone(entry.state)


@dataclass
class _Entry:
    graph: "torch.cuda.CUDAGraph | None"
    sample: torch.Tensor
    timestep: torch.Tensor
    states: torch.Tensor
    added: dict = field(default_factory=dict)  # SDXL's added conditions (text_embeds, time_ids)
    out: torch.Tensor | None = None


class GraphedUNet(_GraphCache):
    """Callable stand-in for ``unet(...)`` that replays one CUDA graph per input signature
    (``accelerate(pipe)``: diffusers' own sampling loop calls it once per step).

    unet: a diffusers ``UNet2DConditionModel``. forward: the callable to capture (default the UNet's
    own forward; pass a ``torch.compile``d one to graph compiled code).
    Falls back to the eager forward with inputs it does not know (any extra keyword that is not None).
    """

    def __init__(self, unet, forward=None, *, enabled: bool = True, emulate: bool = False, warmup: int = 2):
        super().__init__(enabled=enabled, emulate=emulate, warmup=warmup)
        self.unet = unet
        self.forward = forward if forward is not None else unet.forward

    def __call__(self, sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True, **kwargs):
        extra = {k: v for k, v in kwargs.items() if v is not None}
        added = extra.pop("added_cond_kwargs", None) or {}
        if not self._graphable(sample, encoder_hidden_states, args, extra) or not all(
                isinstance(v, torch.Tensor) for v in added.values()):
            self.stats.eager_calls += 1
            return self.forward(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        timestep = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(timestep, device=sample.device)
        key = (tuple(sample.shape), sample.dtype, sample.device, tuple(timestep.shape), timestep.dtype,
               tuple(encoder_hidden_states.shape), encoder_hidden_states.dtype,
               tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(added.items())))
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None and key not in self.stats.failed:
                new = _Entry(None, sample.clone(), timestep.to(sample.device).clone(), encoder_hidden_states.clone(),
                             {k: v.clone() for k, v in added.items()})
                entry = self._record(key, new, lambda: self._run(new), sample.device, "a UNet signature")
            if entry is None:  # this signature's capture failed: eager
                self.stats.eager_calls += 1
                return self.forward(sample, timestep, encoder_hidden_states, return_dict=return_dict, **kwargs)
            entry.sample.copy_(sample)
            entry.timestep.copy_(timestep)
            entry.states.copy_(encoder_hidden_states)
            for k, v in added.items():
                entry.added[k].copy_(v)
            if entry.graph is None:  # emulation: the eager forward on the static buffers
                entry.out = self._run(entry)
            else:
                entry.graph.replay()
            self.stats.replays += 1
            out = entry.out.clone()
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    def _graphable(self, sample, states, args, extra) -> bool:
        if args or extra or states is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        return self.replays_on(sample.device)

    def _run(self, entry: _Entry):
        extra = {"added_cond_kwargs": entry.added} if entry.added else {}
        return self.forward(entry.sample, entry.timestep, entry.states, return_dict=False, **extra)[0]


INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Modes whose inductor code records CUDA graphs itself ("cudagraph trees"): they cannot be captured inside
# lime_fast's own whole-pass or per-call graphs.
GRAPHING_MODES = ("reduce-overhead", "max-autotune")
RECOMPILE_LIMIT = 64


def compile_options(compile: bool | str) -> dict | None:
    """``torch.compile`` keyword arguments for the engine's ``compile`` option (None: not compiled).

    True: inductor, its default mode. An inductor mode name ("max-autotune-no-cudagraphs": autotuned
    GEMM/conv templates, minutes more compile time; "default") selects inductor with that mode. Any other
    string names a dynamo backend ("eager", "aot_eager": tracing without code generation, what the CPU
    tests run; "inductor"). ``dynamic=False``: one specialized graph per batch and latent size, as the
    CUDA graphs are."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return {"backend": "inductor", "dynamic": False}
    if not isinstance(compile, str):
        raise TypeError(f"compile must be a bool or a string (an inductor mode or a dynamo backend), got {compile!r}")
    if compile in INDUCTOR_MODES:
        return {"backend": "inductor", "mode": compile, "dynamic": False}
    return {"backend": compile, "dynamic": False}


def compiled(forward, compile: bool | str, *, graphs: bool = False):
    """``forward`` through ``torch.compile`` when asked (``compile_options``); else ``forward`` itself.

    graphs: lime_fast will capture the compiled code in its own CUDA graphs, so the inductor modes that
    record their own (``GRAPHING_MODES``) are refused with what to use instead. Raises dynamo's recompile
    limit to ``RECOMPILE_LIMIT`` during calls of the returned function only (restored after each, so the
    process's other compiled code keeps its own limit): a LIME edit needs three graphs per batch and
    latent size (plain, regularized, capture step), and a service sees several batch sizes."""
    opts = compile_options(compile)
    if opts is None:
        return forward
    if graphs and opts.get("mode") in GRAPHING_MODES:
        raise ValueError(f"compile={compile!r} records its own CUDA graphs, which cannot run inside lime_fast's: use "
                         f"compile='max-autotune-no-cudagraphs' (or True), or use_cuda_graphs=False")
    import torch._dynamo

    fn = torch.compile(forward, **opts)

    def call(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)):
            return fn(*args, **kwargs)

    return call


def graphed_forward(unet) -> GraphedUNet | None:
    """The ``GraphedUNet`` that ``lime_fast.accelerate`` installed as ``unet.forward``, if any."""
    fwd = unet.__dict__.get("forward")
    return fwd if isinstance(fwd, GraphedUNet) else None


def accelerate(pipe, options=None, **option_fields):
    """Make an existing diffusers ``StableDiffusionInstructPix2PixPipeline`` (or the SDXL one, or any
    pipeline whose UNet is a ``UNet2DConditionModel``) faster, in place; returns it.

    The caller changes nothing else: ``pipe(prompt, image=..., ...)`` keeps its signature and returns
    the same images (to fp16 tolerance on CUDA). Underneath, every cross-attention call runs the fused
    Triton kernel (penalty off: plain attention; self-attention stays on SDPA) and every UNet call
    replays a CUDA graph per input signature (``GraphedUNet`` installed as ``pipe.unet.forward``).
    On the CPU both fall back to eager PyTorch (SDPA), so the pipeline still runs.

    options / option_fields: an ``EngineOptions`` and/or its fields as keywords (``lime_fast.config``; channels_last,
    fuse_qkv and precision change the pipe's modules in place; cache_kv does not apply to single calls). Calling it twice is a no-op. To undo:
    ``del pipe.unet.forward; pipe.unet.set_attn_processor(AttnProcessor2_0())`` (from
    ``diffusers.models.attention_processor``).
    """
    from .attention import AttentionController, install, pick_backend
    from .config import EngineOptions
    from .speedups import apply

    opts = EngineOptions.of(options, **option_fields)
    unet = pipe.unet
    if graphed_forward(unet) is not None:
        return pipe
    graphs = opts.use_cuda_graphs is not False  # None (the default): graphs wherever CUDA runs
    apply(unet, pipe.vae, channels_last=opts.channels_last, fuse_qkv=opts.fuse_qkv, precision=opts.precision)
    install(unet, AttentionController(pick_backend(opts.attention, unet.device)))
    unet.forward = GraphedUNet(unet, compiled(unet.forward, opts.compile, graphs=graphs), enabled=graphs)
    return pipe
