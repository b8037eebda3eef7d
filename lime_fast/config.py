"""EditConfig: every knob of a LIME edit in one documented dataclass.

Defaults are the table of docs/lime.md (the authors' released notebook, and the paper's top-k). ``capture_step`` and ``reg_steps`` default to ``None``, which scales them with ``steps``
(one third and nine tenths of the run): at the default 30 steps they resolve to exactly the spec's
10 and (0, 26), and at other step counts the defaults stay valid instead of raising.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

DEFAULT_MODEL = "timbrooks/instruct-pix2pix"
SEGMENT_BACKENDS = ("native", "materialized", "cuml")
# How a mask file marks its region (lime_fast.inputs.load_mask states the rule); here so the CLI's parser
# can list them without importing numpy and PIL.
MASK_CONVENTIONS = ("auto", "white", "transparent", "opaque")
MAX_STEPS = 1000  # the schedulers' training timesteps: more steps than that repeat timesteps
MAX_SEED = 2**64  # torch.Generator.manual_seed takes 64-bit seeds
# Upper bounds of EditConfig's fields: past them an edit does unbounded work (memory, time) or overflows,
# for nothing a real edit needs (InstructPix2Pix guidance is 1-20; k-means on more than 64 segments or
# 16 restarts localizes no better).
LIMITS = {"text_guidance": 100.0, "image_guidance": 100.0, "loc_text_guidance": 100.0, "loc_image_guidance": 100.0,
          "grid_size": 1024, "clusters": 64, "kmeans_n_init": 16, "kmeans_max_iter": 10_000, "max_side": 4096}


@dataclass
class EditConfig:
    """Parameters of one LIME edit: each field's ``metadata["help"]`` documents it (the one source of the
    CLI's help and of ``field_docs``)."""

    steps: int = field(default=30, metadata={"help": (
        'denoising steps of both passes (Euler-ancestral, as the checkpoint ships), 1..1000.'
    )})
    seed: int = field(default=42, metadata={"help": (
        "seed of the CPU generator that draws the initial noise and each step's noise, 0 <= seed < 2**64; "
        'the same seed gives the same image on every run (and the same noise on CPU and GPU).'
    )})
    text_guidance: float = field(default=2.0, metadata={"help": 'guidance scales of the regularized edit (s_T, s_I).'})
    image_guidance: float = field(default=1.5, metadata={"help": 'guidance scales of the regularized edit (s_T, s_I).'})
    loc_text_guidance: float = field(default=5.5, metadata={"help": 'guidance scales of the localization pass.'})
    loc_image_guidance: float = field(default=1.5, metadata={"help": 'guidance scales of the localization pass.'})
    capture_step: int | None = field(default=None, metadata={"help": (
        'step whose attention is captured for localization; the localization pass stops right after it '
        '(capture_step + 1 UNet evaluations). None: round(steps / 3) (10 of 30).'
    )})
    reg_steps: tuple[int, int] | None = field(default=None, metadata={"help": (
        'inclusive (first, last) steps during which unrelated tokens are silenced inside the RoI. None: '
        '(0, ceil(0.9 * steps) - 1), i.e. (0, 26) of 30.'
    )})
    feature_levels: tuple[int, ...] = field(default=(1, 2, 3), metadata={"help": (
        'UNet levels whose attention outputs and maps localize (level l runs at the latent size / 2**l).'
    )})
    reg_levels: tuple[int, ...] = field(default=(0, 1), metadata={"help": (
        'levels whose cross-attention is regularized.'
    )})
    grid_size: int = field(default=128, metadata={"help": (
        'long side, in cells, of the output grid on which segments and the RoI live (128 at 512 x 512: '
        'one cell per 4 x 4 pixels); the short side keeps the aspect ratio.'
    )})
    clusters: int = field(default=8, metadata={"help": 'k of the k-means segmentation.'})
    kmeans_n_init: int = field(default=1, metadata={"help": (
        'k-means restarts; the run with the lowest inertia is kept.'
    )})
    kmeans_max_iter: int = field(default=300, metadata={"help": (
        'most Lloyd iterations of each k-means run.'
    )})
    kmeans_tol: float = field(default=1e-4, metadata={"help": (
        "k-means convergence tolerance (scikit-learn's rule: relative to the mean per-dimension variance)."
    )})
    kmeans_check_every: int = field(default=16, metadata={"help": (
        "on a GPU, Lloyd iterations between two reads of k-means' on-device convergence flag (one host "
        'sync each; it stops at the first read that finds it converged). 0: never read it: exactly '
        'kmeans_max_iter iterations (those after convergence change nothing) and no host sync between the '
        'two passes. Same segments either way.'
    )})
    segment_backend: str = field(default="native", metadata={"help": (
        '"native" (exact, never builds the pixels x channels matrix), "materialized" (the reference) or '
        '"cuml" (needs the cuml extra and a GPU).'
    )})
    top_k: int = field(default=100, metadata={"help": (
        'number of highest-attention grid cells whose segments form the RoI.'
    )})
    roi_words: tuple[str, ...] | None = field(default=None, metadata={"help": (
        'words of the instruction to localize instead of the automatic content words.'
    )})
    max_side: int = field(default=1024, metadata={"help": (
        'images whose long side exceeds this many pixels are processed at this long side (with a warning) '
        "and the result is resized back to the input's size."
    )})
    cache_interval: int = field(default=1, metadata={"help": (
        'step caching of the edit pass (opt-in, DeepCache-style; ``lime_fast.stepcache``). 1 (default): '
        "off, every step runs the whole UNet. N >= 2: the UNet's deep blocks (the levels below the "
        'deepest of reg_levels: 16 and 8 cells a side at 512 x 512) run on steps 0, N, 2N, ... and the '
        'steps between reuse their output, while the regularized levels run at every step. The '
        'localization pass never caches. Fewer UNet FLOPs, an approximation: docs/faster-modes.md.'
    )})

    def __post_init__(self):
        if isinstance(self.roi_words, str):
            self.roi_words = (self.roi_words,)
        elif self.roi_words is not None:
            self.roi_words = tuple(self.roi_words)
        self.validate()

    # --- resolved values -------------------------------------------------------------------
    @property
    def capture(self) -> int:
        """The capture step after defaults are resolved."""
        return self.capture_step if self.capture_step is not None else min(self.steps - 1, round(self.steps / 3))

    @property
    def reg_range(self) -> tuple[int, int]:
        """Inclusive (first, last) regularized steps after defaults are resolved."""
        if self.reg_steps is not None:
            return tuple(self.reg_steps)
        return (0, max(0, math.ceil(0.9 * self.steps) - 1))

    def replace(self, **changes) -> "EditConfig":
        """A copy with some fields changed (validated); unknown names raise TypeError."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self) if not f.name.startswith("_")}
        if unknown:
            raise TypeError(f"unknown EditConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field."""
        _check_schedule(self)
        _check_localization(self)
        _check_levels_and_words(self)


def _check_int(cfg: EditConfig, name: str, lo: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")


def _check_scale(cfg: EditConfig, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"{name} must be a finite number, got {v!r}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0 (guidance scales cannot be negative), got {v}")
    if v > LIMITS[name]:
        raise ValueError(f"{name} must be <= {LIMITS[name]:g} (InstructPix2Pix guidance is 1-20), got {v}")


def _check_schedule(cfg: EditConfig) -> None:
    """steps, seed, guidance scales, the capture step and the regularized steps."""
    _check_int(cfg, "steps", 1)
    if cfg.steps > MAX_STEPS:
        raise ValueError(f"steps must be <= {MAX_STEPS} (the scheduler's training timesteps), got {cfg.steps}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise TypeError(f"seed must be an int, got {type(cfg.seed).__name__}")
    if not 0 <= cfg.seed < MAX_SEED:
        raise ValueError(f"seed must satisfy 0 <= seed < 2**64, got {cfg.seed}")
    for name in ("text_guidance", "image_guidance", "loc_text_guidance", "loc_image_guidance"):
        _check_scale(cfg, name)
    if cfg.capture_step is not None:
        _check_int(cfg, "capture_step", 0)
        if cfg.capture_step >= cfg.steps:
            raise ValueError(f"capture_step={cfg.capture_step} is beyond the step count: it must be < steps={cfg.steps}")
    if cfg.reg_steps is not None:
        if len(cfg.reg_steps) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in cfg.reg_steps):
            raise TypeError(f"reg_steps must be a (first, last) pair of ints, got {cfg.reg_steps!r}")
        first, last = cfg.reg_steps
        if not 0 <= first <= last < cfg.steps:
            raise ValueError(f"reg_steps={tuple(cfg.reg_steps)} must satisfy 0 <= first <= last < steps={cfg.steps}")
    _check_int(cfg, "cache_interval", 1)


def _check_localization(cfg: EditConfig) -> None:
    """The grid, k-means, top-k, the working size and the segmentation backend, with their bounds."""
    for name in ("grid_size", "clusters", "kmeans_n_init", "kmeans_max_iter", "top_k"):
        _check_int(cfg, name, 1)
    _check_int(cfg, "max_side", 64)
    for name in ("grid_size", "clusters", "kmeans_n_init", "kmeans_max_iter", "max_side"):
        if getattr(cfg, name) > LIMITS[name]:
            raise ValueError(f"{name} must be <= {LIMITS[name]} (more is unbounded work), got {getattr(cfg, name)}")
    if cfg.top_k > cfg.grid_size**2:
        raise ValueError(f"top_k={cfg.top_k} exceeds the {cfg.grid_size}x{cfg.grid_size} grid's cells")
    _check_int(cfg, "kmeans_check_every", 0)
    if not (isinstance(cfg.kmeans_tol, (int, float)) and cfg.kmeans_tol >= 0):
        raise ValueError(f"kmeans_tol must be >= 0, got {cfg.kmeans_tol!r}")
    if cfg.segment_backend not in SEGMENT_BACKENDS:
        raise ValueError(f"segment_backend must be one of {SEGMENT_BACKENDS}, got {cfg.segment_backend!r}")


def _check_levels_and_words(cfg: EditConfig) -> None:
    for name in ("feature_levels", "reg_levels"):
        levels = getattr(cfg, name)
        if not isinstance(levels, (tuple, list)):
            raise ValueError(f"{name} must be a tuple of levels, e.g. {name}=(1,), got {levels!r}")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in levels):
            raise ValueError(f"{name} must be non-negative ints, got {levels!r}")
    if not cfg.feature_levels:
        raise ValueError("feature_levels must name at least one level")
    if cfg.roi_words is not None and not all(isinstance(w, str) and w.strip() for w in cfg.roi_words):
        raise ValueError(f"roi_words must be non-empty strings, got {cfg.roi_words!r}")


def field_docs() -> dict[str, str]:
    """Each ``EditConfig`` field's description (its ``metadata["help"]``): what the CLI's help, the batch
    runner's and the service's field checks read."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(EditConfig)}


@dataclass(frozen=True)
class EngineOptions:
    """How an engine computes its edits: never which tokens LIME silences or where. One frozen value, so
    that it can key the engine cache (``lime_fast.get_engine``) and travel as one argument; the public
    calls (``LimeEngine.from_pretrained``, ``from_pipe``, ``lime_fast.accelerate``, ``lime_fast.edit``)
    take these fields as plain keywords too.

    attention: "auto" (the fused Triton kernel on CUDA when triton imports, else eager), "eager",
        "triton" (forces the kernel, e.g. on the CPU under TRITON_INTERPRET=1), or a callable with the
        signature of ``lime_fast.kernels.reference.regularized_attention_ref`` that replaces
        cross-attention (``benchmarks/release.py`` passes the reference release's pattern this way).
    use_cuda_graphs: run each denoising pass as one CUDA graph, recorded once per ``PassPlan`` and
        replayed after, and the k-means' Lloyd iterations as replays of one graph per layout
        (``lime_fast.graphs``); None: on for CUDA. Ignored on the CPU.
    compile: ``torch.compile`` the UNet's forward (True: inductor, default mode; an inductor mode name
        such as "max-autotune-no-cudagraphs"; another string names a dynamo backend, e.g. "aot_eager";
        ``lime_fast.graphs.compile_options``). The first edit per shape pays the compilation.
    channels_last, fuse_qkv, precision: opt-in faster modes (``lime_fast.speedups``): NHWC weights for the
        UNet and VAE; fused QKV / KV projections; "fp8" (or "fp8-conv") float8 layers on Hopper/Ada with
        torchao, refused with ``UnsupportedModeError`` elsewhere.
    cache_kv: project every cross-attention module's keys and values once per pass instead of at every
        step (the text embeddings do not change within a pass): the same computation, on by default.
    """

    attention: object = "auto"
    use_cuda_graphs: bool | None = None
    compile: bool | str = False
    channels_last: bool = False
    fuse_qkv: bool = False
    precision: str | None = None
    cache_kv: bool = True

    @classmethod
    def of(cls, options: "EngineOptions | None" = None, **fields) -> "EngineOptions":
        """``options`` (default: all defaults) with ``fields`` replaced; TypeError naming an unknown field."""
        base = options if options is not None else cls()
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; options: {', '.join(sorted(names))}")
        return dataclasses.replace(base, **fields) if fields else base

    @classmethod
    def take(cls, options: "EngineOptions | None", kwargs: dict) -> "EngineOptions":
        """``of(options, ...)`` with the engine-option fields popped out of ``kwargs`` (a call's mixed
        keywords: engine options beside EditConfig fields or diffusers' loading arguments)."""
        return cls.of(options, **{k: kwargs.pop(k) for k in list(kwargs) if k in cls.__dataclass_fields__})
