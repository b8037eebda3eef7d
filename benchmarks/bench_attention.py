"""Benchmark: the fused RoI-regularized attention kernel (penalty on) against what it replaces.

Run: ``python -m pytest benchmarks/bench_attention.py --benchmark-only`` (add ``-rs`` to see skip
reasons). The side-by-side table is printed in the terminal summary (benchmarks/conftest.py).

GPU (CUDA): SD 1.5 cross-attention at 512x512, fp16, B = 3 guidance branches, H = 8 heads, T = 77
CLIP tokens, (N, D) = (4096, 40), (1024, 80), (256, 160), (64, 160) (the three UNet resolutions and
the mid block), q/k/v in diffusers' layout (``x.view(B, N, H, D).transpose(1, 2)``). Penalty inputs
as the engine builds them: one RoI (a disk of ~30% of the pixels of the sqrt(N) x sqrt(N) grid) and
one keep row (8 of 77 tokens kept: the prompt tokens 1..8; BOS, EOS and padding silenced), repeated
over the 3 branches.

Candidates (all produce out [B, H, N, D] fp16; (b)'s and (c)'s masks are prebuilt, not timed):
    kernel     lime_fast.kernels.regularized_attention.regularized_attention_launch (what the engine
               calls outside torch.compile; the custom op adds dispatch cost in eager mode only),
               penalty on: roi [B, N] and keep [B, T] bool, the penalty built in-kernel; block shapes
               autotuned on the first call (listed under the table)
    split      the kernel with the head dim as two power-of-two slices (160 = 128 + 32, 80 = 64 + 16,
               40 = 32 + 16) at the default block shapes, not autotuned: side by side with the tuned
               kernel (whose candidates include split shapes) it shows what the split alone does
    sdpa       (a) torch SDPA with no mask: what plain InstructPix2Pix pays (diffusers' AttnProcessor2_0)
    sdpa_mask  (b) torch SDPA with the equivalent additive fp16 mask [B, 1, N, T] (0 / -inf): the
               straightforward port (whatever SDPA does with a T = 77 mask per call, e.g. padding
               it for alignment, is part of its time)
    flex       (c) torch.compile(flex_attention) with a score_mod returning -inf where
               roi[b, q] & ~keep[b, kv] (a failure to import / compile / run is recorded, not raised)
    fp32_bmm   (d) the release's pattern, ``benchmarks/release.py``: q, k, v upcast to
               fp32 and reshaped to [B*H, L, D], an fp32 additive mask [B*H, N, T] materialized in
               every call (as the release does), ``baddbmm(mask, q, kᵀ, alpha=scale)``, softmax,
               ``bmm`` with v, cast back to fp16

Timing. pytest-benchmark does not synchronize CUDA, so each timed call enqueues CALLS back-to-back
calls between two CUDA events and synchronizes on the end event; the figure reported is the median
event time / CALLS. To measure DRAM traffic rather than L2 hits (an H100's L2 is 50 MB, the
4096-pixel q is 7.9 MB), the calls cycle through enough independent q/k/v sets to cover 3x the L2.
Two modes per candidate:
    graph   the CALLS calls captured once in a CUDA graph and replayed: device time, no launch cost
    eager   the CALLS calls issued from Python: includes launch / dispatch overhead (what an eager
            UNet pays when the GPU waits on the CPU)
The kernel's output is checked against the fp32 reference before it is timed (the kernel author's
check, with the head-mean capture); the masked baselines are checked once too and flagged WRONG if
they disagree.

GB/s: bytes = q, k, v read + out written (+ roi and keep, negligible) per call / time per call, the
same useful-byte count for every candidate. The copy bandwidth is measured once per session: a 1 GiB
device-to-device ``copy_`` (read + write bytes / time), best of 5 trials of 10 copies.

Targets (issue), judged on each line's own times: kernel <= sdpa (no mask) on every shape; flex time
/ kernel time >= 1.5; kernel >= 70% of the copy bandwidth on the 4096-pixel shape.

CPU (no CUDA): the GPU shapes are skipped; instead the reference and the Triton interpreter run one
tiny shape (B=1, H=2, N=64, D=40, T=77, fp32) to show the bench works: interpreter, not a speed figure.
"""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
from lime_fast.kernels.reference import regularized_attention_ref, silenced_mask
from release import release_attention

CUDA = torch.cuda.is_available()
GPU_ONLY = pytest.mark.skipif(
    not CUDA, reason="no CUDA device: the SD 1.5 shapes are timed on a GPU only (the CPU runs the interpreter smoke test)"
)
CPU_ONLY = pytest.mark.skipif(CUDA, reason="CUDA available: the SD 1.5 shapes are timed instead of the interpreter smoke test")

# --- GPU configuration ----------------------------------------------------------------------------
B, H, T = 3, 8, 77
SHAPES = [(4096, 40), (1024, 80), (256, 160), (64, 160)]
IMPLS = ["kernel", "split", "sdpa", "sdpa_mask", "flex", "fp32_bmm"]
LABELS = {"kernel": "kernel", "split": "split (untuned)", "sdpa": "(a) sdpa", "sdpa_mask": "(b) sdpa+mask", "flex": "(c) flex",
          "fp32_bmm": "(d) fp32 bmm"}
MODES = ["graph", "eager"]
ROI_FRACTION = 0.3
KEPT_TOKENS = range(1, 9)  # 8 prompt tokens kept; BOS (0), EOS and padding silenced
MIN_CALLS = 50  # calls per timed call (more when more input sets are needed to defeat the L2)
MAX_SETS = 64
ROUNDS, WARMUP = 30, 3
TARGET_FLEX, TARGET_COPY = 1.5, 0.70

# --- CPU smoke configuration ------------------------------------------------------------------------
CPU_SHAPE = {"B": 1, "H": 2, "N": 64, "D": 40, "T": 77}

# (N, D) -> mode -> impl -> seconds per call, or a str saying why there is no time
_RESULTS: dict[tuple[int, int], dict[str, dict[str, float | str]]] = {}
_FLAGS: dict[tuple[int, int], dict[str, str]] = {}  # baselines that disagree with the reference
_STATE: dict[tuple[int, int], dict] = {}
_CPU_RESULTS: dict[str, float] = {}


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------


def _roi_disk(Bn: int, N: int, device) -> torch.Tensor:
    """A disk of ~ROI_FRACTION of the sqrt(N) x sqrt(N) latent grid, the same for every element."""
    side = math.isqrt(N)
    assert side * side == N, N
    c = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    r2 = ROI_FRACTION / math.pi
    disk = ((xx - 0.45) ** 2 + (yy - 0.55) ** 2) <= r2
    return disk.reshape(1, N).expand(Bn, N).contiguous()


def _keep_row(Bn: int, Tn: int, device) -> torch.Tensor:
    keep = torch.zeros(Bn, Tn, dtype=torch.bool, device=device)
    keep[:, KEPT_TOKENS.start : min(KEPT_TOKENS.stop, Tn)] = True
    return keep


def _qkv(Bn: int, Hn: int, N: int, Tn: int, D: int, device, dtype, gen=None):
    """q [B, H, N, D], k/v [B, H, T, D] in diffusers' layout (x.view(B, L, H, D).transpose(1, 2))."""
    def make(L):
        x = torch.randn(Bn, L, Hn * D, device=device, dtype=dtype, generator=gen)
        return x.view(Bn, L, Hn, D).transpose(1, 2)

    return make(N), make(Tn), make(Tn)


def _io_bytes(Bn: int, Hn: int, N: int, Tn: int, D: int, itemsize: int) -> int:
    return itemsize * (2 * Bn * Hn * N * D + 2 * Bn * Hn * Tn * D) + Bn * N + Bn * Tn


def _l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 50 << 20)


def _state(N: int, D: int) -> dict:
    """Inputs of one GPU shape, built once and shared by every candidate and mode."""
    if (N, D) in _STATE:
        return _STATE[(N, D)]
    dev, dt = torch.device("cuda"), torch.float16
    gen = torch.Generator(device=dev).manual_seed(1000 * N + D)
    in_bytes = 2 * (B * H * N * D + 2 * B * H * T * D)
    nsets = max(1, min(MAX_SETS, math.ceil(3 * _l2_bytes() / in_bytes)))
    sets = [_qkv(B, H, N, T, D, dev, dt, gen) for _ in range(nsets)]
    roi, keep = _roi_disk(B, N, dev), _keep_row(B, T, dev)
    silenced = silenced_mask(roi, keep)
    bias16 = torch.zeros(B, 1, N, T, device=dev, dtype=dt).masked_fill_(silenced[:, None], float("-inf"))
    q0, k0, v0 = sets[0]
    ref, _ = regularized_attention_ref(q0.float(), k0.float(), v0.float(), roi, keep)
    st = {
        "sets": sets, "nsets": nsets, "calls": max(MIN_CALLS, nsets), "roi": roi, "keep": keep, "bias16": bias16,
        "roi_eff": roi & keep.any(dim=1)[:, None], "drop": ~keep, "ref": ref,
        "roi_pct": 100.0 * roi.float().mean().item(),
    }
    _STATE[(N, D)] = st
    return st


# ---------------------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------------------


def _sdpa(q, k, v, attn_mask=None):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    for name in ("recompile_limit", "cache_size_limit"):  # one compile per shape; don't hit the limit
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return torch.compile(flex_attention, dynamic=False)


def _make_fn(impl: str, st: dict):
    """-> fn(q, k, v) returning out [B, H, N, D]; one per shape, so both modes share flex's compile."""
    fns = st.setdefault("fns", {})
    if impl not in fns:
        fns[impl] = _new_fn(impl, st)
    return fns[impl]


def _new_fn(impl: str, st: dict):
    from lime_fast.kernels.regularized_attention import regularized_attention_launch

    roi, keep = st["roi"], st["keep"]
    if impl == "kernel":
        # The launcher, as the engine calls it outside torch.compile (no custom-op dispatch).
        return lambda q, k, v: regularized_attention_launch(q, k, v, roi, keep)[0]
    if impl == "split":
        return lambda q, k, v: regularized_attention_launch(q, k, v, roi, keep, split_head_dim=True)[0]
    if impl == "sdpa":
        return lambda q, k, v: _sdpa(q, k, v)
    if impl == "sdpa_mask":
        bias16 = st["bias16"]
        return lambda q, k, v: _sdpa(q, k, v, attn_mask=bias16)
    if impl == "flex":
        flex = _compiled_flex()
        roi_eff, drop = st["roi_eff"], st["drop"]

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(roi_eff[b, q_idx] & drop[b, kv_idx], float("-inf"), score)

        return lambda q, k, v: flex(q, k, v, score_mod=score_mod)
    if impl == "fp32_bmm":
        return lambda q, k, v: release_attention(q, k, v, roi, keep)[0]
    raise ValueError(impl)


def _check_correct(q, k, v, roi, keep) -> None:
    """Never time a wrong kernel: compare once against the fp32 reference (output and captured maps)."""
    from lime_fast.kernels.regularized_attention import regularized_attention_launch

    capture = torch.arange(q.shape[0], device=q.device)
    out, probs = regularized_attention_launch(q, k, v, roi, keep, capture=capture)
    ref, ref_probs = regularized_attention_ref(q.float(), k.float(), v.float(), roi, keep, capture=capture)
    low, _ = regularized_attention_ref(q, k, v, roi, keep, upcast=False)
    bound = 2 * (low.float() - ref).abs().max().item() + 1e-4
    err = (out.float() - ref).abs().max().item()
    assert err <= bound, f"kernel max error {err:.3g} > bound {bound:.3g} (2x eager low-precision error + 1e-4)"
    torch.testing.assert_close(probs, ref_probs, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------


@functools.cache
def _copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s: 1 GiB copy_, (read + write) bytes / time, best of 5."""
    n, reps = 1 << 30, 10
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        for _ in range(reps):
            dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * reps / best


class _EventTimer:
    """The timed callable: enqueue the calls between two CUDA events and synchronize on the end event."""

    def __init__(self, enqueue):
        self.enqueue = enqueue
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        self.seconds: list[float] = []

    def __call__(self):
        self.start.record()
        self.enqueue()
        self.end.record()
        self.end.synchronize()
        self.seconds.append(self.start.elapsed_time(self.end) * 1e-3)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:100] if msg else ''}".rstrip(": ")


# ---------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------


def _fmt_target(ok: bool | None, what: str) -> str:
    return f"{what} {'n/a' if ok is None else ('PASS' if ok else 'MISS')}"


def _gpu_lines() -> list[str]:
    bw = _copy_bandwidth()
    st_any = next(iter(_STATE.values()), None)
    lines = [
        (
            f"attention bench on {torch.cuda.get_device_name(0)}, torch {torch.__version__}: fp16, B={B} H={H} "
            f"T={T}, RoI {st_any['roi_pct'] if st_any else 0:.0f}% of pixels (disk), {len(KEPT_TOKENS)}/{T} tokens "
            f"kept; copy bandwidth {bw / 1e9:.0f} GB/s (1 GiB D2D copy_, read+write, best of 5)"
        ),
        (
            "graph = device time (CUDA-graph replay); eager = Python-issued calls (launch overhead included). Per "
            "call, median of rounds; inputs rotate to defeat L2. xR = baseline time / kernel time (>1: kernel faster)."
        ),
        (
            "(a) SDPA no mask; (b) SDPA + additive fp16 [B,1,N,T] mask; (c) compiled flex_attention + score_mod; "
            "(d) release pattern: fp32 baddbmm/softmax/bmm with an fp32 [B*H,N,T] mask materialized per call (benchmarks/release.py)."
        ),
    ]
    for (N, D) in SHAPES:
        if (N, D) not in _RESULTS:
            continue
        nbytes = _io_bytes(B, H, N, T, D, 2)
        for mode in MODES:
            row = _RESULTS[(N, D)].get(mode)
            if not row:
                continue
            kt = row.get("kernel")
            parts = []
            if isinstance(kt, float):
                gbs = nbytes / kt
                parts.append(f"kernel {kt * 1e6:7.1f} us {gbs / 1e9:5.0f} GB/s ({100 * gbs / bw:3.0f}% of copy)")
            else:
                parts.append(f"kernel {kt or 'not run'}")
            for impl in IMPLS[1:]:
                t = row.get(impl)
                flag = _FLAGS.get((N, D), {}).get(impl, "")
                if isinstance(t, float):
                    ratio = f" x{t / kt:.2f}" if isinstance(kt, float) else ""
                    parts.append(f"{LABELS[impl]} {t * 1e6:.1f} us {nbytes / t / 1e9:.0f} GB/s{ratio}{flag}")
                else:
                    parts.append(f"{LABELS[impl]} {t or 'not run'}")
            kt_ok = isinstance(kt, float)
            sd, fl = row.get("sdpa"), row.get("flex")
            t1 = (kt <= sd) if kt_ok and isinstance(sd, float) else None
            t2 = (fl / kt >= TARGET_FLEX) if kt_ok and isinstance(fl, float) else None
            t3 = (nbytes / kt >= TARGET_COPY * bw) if kt_ok and N == 4096 else None
            targets = ", ".join([
                _fmt_target(t1, "<=sdpa"),
                _fmt_target(t2, f">={TARGET_FLEX}x flex"),
                _fmt_target(t3, f">={TARGET_COPY:.0%} copy" + ("" if N == 4096 else " (4096 only)")),
            ])
            lines.append(f"N={N:>4} D={D:>3} {mode:>5}: " + " | ".join(parts) + f" || targets: {targets}")
    from lime_fast.kernels.regularized_attention import tuned_configs

    for key, cfg in tuned_configs().items():
        lines.append(f"autotuned {key[:4]} {str(key[4]).replace('torch.', '')}: BLOCK_M {cfg['BLOCK_M']} BLOCK_N {cfg['BLOCK_N']} "
                     f"warps {cfg['num_warps']} stages {cfg['num_stages']} heads/program {cfg.get('HEADS', 1)} "
                     f"head-dim slices {cfg['BLOCK_D']}" + (f"+{cfg['BLOCK_D2']}" if cfg.get("BLOCK_D2") else ""))
    return lines


def _cpu_lines() -> list[str]:
    s = CPU_SHAPE
    parts = [f"{name} {t * 1e3:.1f} ms" for name, t in _CPU_RESULTS.items()]
    return [
        f"CPU, no CUDA: interpreter, not a speed figure. B={s['B']} H={s['H']} N={s['N']} D={s['D']} T={s['T']} fp32, "
        f"per call: " + ", ".join(parts) + " (kernel output checked against the reference first)",
        "GPU shapes (SD 1.5, fp16; SDPA / flex / fp32-bmm baselines, GB/s, targets) skipped: no CUDA device.",
    ]


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    lines = _gpu_lines() if (CUDA and _RESULTS) else (_cpu_lines() if _CPU_RESULTS else [])
    _STATE.clear()
    if CUDA:
        torch.cuda.empty_cache()
    if not lines:
        return
    try:  # benchmarks/conftest.py prints these in the terminal summary
        request.getfixturevalue("ratios").extend(lines)
        return
    except pytest.FixtureLookupError:
        pass
    # Standalone: teardown output is captured at the fd level; print with capturing suspended.
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
        print("\n" + "\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------------
# GPU benchmarks
# ---------------------------------------------------------------------------------------------------


@GPU_ONLY
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N,D", SHAPES, ids=[f"N{n}-D{d}" for n, d in SHAPES])
def test_attention(benchmark, N, D, impl, mode):
    st = _state(N, D)
    row = _RESULTS.setdefault((N, D), {}).setdefault(mode, {})
    sets, nsets, calls = st["sets"], st["nsets"], st["calls"]
    q0, k0, v0 = sets[0]
    if impl == "kernel" and mode == MODES[0]:
        _check_correct(q0, k0, v0, st["roi"], st["keep"])
    try:
        fn = _make_fn(impl, st)
        out = fn(q0, k0, v0)  # compile / warm up (flex compiles here)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - flex may fail to import, compile or run: record it, don't crash
        row[impl] = f"failed ({_short(e)})"
        pytest.skip(f"{impl} unavailable on this setup: {_short(e)}")
    if impl in ("split", "sdpa_mask", "flex", "fp32_bmm") and mode == MODES[0]:
        err = (out.float() - st["ref"]).abs().max().item()
        if not err <= 1e-2:  # fp16 vs fp32 is ~1e-3 here; a wrong mask is off by O(0.1)
            _FLAGS.setdefault((N, D), {})[impl] = f" WRONG(err {err:.2g})"
    del out

    def enqueue():
        for i in range(calls):
            fn(*sets[i % nsets])

    if mode == "graph":
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                enqueue()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                enqueue()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - recorded in the report
            row[impl] = f"graph capture failed ({_short(e)})"
            pytest.skip(f"{impl}: CUDA-graph capture failed: {_short(e)}")
        timer = _EventTimer(graph.replay)
    else:
        timer = _EventTimer(enqueue)

    benchmark.group = f"N={N} D={D} {mode}"
    benchmark.pedantic(timer, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    secs = sorted(timer.seconds[WARMUP:])
    per_call = secs[len(secs) // 2] / calls
    nbytes = _io_bytes(B, H, N, T, D, 2)
    benchmark.extra_info.update(
        mode=mode, calls_per_round=calls, input_sets=nsets, us_per_call=per_call * 1e6, gbps=nbytes / per_call / 1e9,
        copy_gbps=_copy_bandwidth() / 1e9,
    )
    row[impl] = per_call
    if mode == "graph":
        del graph


# ---------------------------------------------------------------------------------------------------
# CPU smoke run (interpreter, not a speed figure)
# ---------------------------------------------------------------------------------------------------


@CPU_ONLY
@pytest.mark.parametrize("impl", ["reference", "interpreter"])
def test_attention_cpu_interpreter(benchmark, impl):
    s = CPU_SHAPE
    gen = torch.Generator().manual_seed(0)
    q, k, v = _qkv(s["B"], s["H"], s["N"], s["T"], s["D"], "cpu", torch.float32, gen)
    roi, keep = _roi_disk(s["B"], s["N"], "cpu"), _keep_row(s["B"], s["T"], "cpu")
    if impl == "interpreter":
        _check_correct(q, k, v, roi, keep)
        from lime_fast.kernels.regularized_attention import regularized_attention_launch

        def fn():
            return regularized_attention_launch(q, k, v, roi, keep)
    else:
        def fn():
            return regularized_attention_ref(q, k, v, roi, keep)

    benchmark.group = "CPU smoke (interpreter, not a speed figure)"
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    _CPU_RESULTS[impl] = benchmark.stats.stats.median
