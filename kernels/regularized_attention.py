"""Fused RoI-regularized cross-attention: one Triton flash-attention forward kernel.

Computes, like :func:`lime_fast.kernels.reference.regularized_attention_ref`::

    out = softmax(q kᵀ · scale + penalty) v
    penalty[b, n, t] = -inf  where roi[b, n] and not keep[b, t]   (and keep[b] has a True somewhere)

with q [B, H, N, D], k/v [B, H, T, D], roi [B, N] bool, keep [B, T] bool. The penalty is built inside
the kernel from the two small masks; no [B, N, T] bias is ever materialized. Logits, softmax and the
accumulator are fp32; the output has q's dtype.

Optionally (``capture``: [S] batch indices) the kernel also writes the head-averaged fp32
probabilities of the selected batch elements to probs [S, N, T], without ever writing per-head
probabilities to global memory.

Design
------
* Grid ``(cdiv(N, BLOCK_M), B * cdiv(H, HEADS))``: axis 0 walks query blocks so that consecutive
  programs share one (b, h) and its keys/values stay hot in L2. HEADS (heads per program) is 1 by
  default; more (all heads of a query tile in fewer programs) is a launcher option
  (``heads_per_program``) that lost to one head at every SD 1.5 shape on an H200 (RESULTS), so the
  autotuner no longer times it; capture always uses 1.
* Without capture, each program runs one head: an online softmax over key blocks of BLOCK_N (full
  blocks unmasked, one masked tail block only when ``T % BLOCK_N != 0``), or a plain one-shot softmax
  when all keys fit in one block (T <= BLOCK_N, e.g. CLIP's 77 keys in a 128 block).
* Capture needs the final row max/sum before a probability can be written. T is small for text
  cross-attention, so the capture variant holds the whole key range in one block (BLOCK_N =
  next_pow2(T), T <= ``MAX_CAPTURE_T``): every head's probabilities are exact after one pass. The
  head mean is accumulated in registers by one program per (query block, captured element) that
  loops over all H heads: for a captured element, the h == 0 program runs heads 0..H-1 and the other
  H-1 programs of that element exit at once (empty head loop); non-captured elements keep one head
  per program. This is deterministic (no atomics, fixed summation order), needs no zero-filled
  output (no memset launch) and costs nothing on elements that are not captured. The capture list is
  read inside the kernel (no host sync, so it works under CUDA-graph capture); duplicated indices
  are written to each slot, negative indices count from the end like torch indexing, and an
  out-of-range index on the device yields a NaN row rather than garbage.
* Head dims that are not a power of two (40, 80, 160 in SD 1.5) are padded to BLOCK_D =
  next_pow2(D) in registers only, with masked loads/stores (EVEN_HEADDIM constexpr); likewise
  EVEN_M for N % BLOCK_M and EVEN_T for the key tail, so the common case pays no masking cost.
  Or (BLOCK_D2 > 0, an autotuning candidate) the head dim runs as two power-of-two slices, each
  with its own q tile, dots and accumulator: 160 = 128 + 32 computes 160 columns instead of 256
  (``_split_head_dim``). ptxas for sm_90a: at N 256 / D 160 it removes the default's spills (260
  -> 8 bytes per thread); with capture it spills more, so capture keeps one slice.
* All-silenced elements (keep row all False) get no penalty: each program reduces its keep row (T
  bytes) before the main loop and gates its roi row with it. Fully masked key blocks are guarded
  against the ``-inf - (-inf)`` NaN of the online-softmax rescale.
* fp32 inputs use IEEE fp32 dots (not TF32) so fp32 results match the fp32 reference; fp16/bf16
  inputs use tensor-core dots with fp32 accumulation, and P is rounded to the value dtype before
  ``P @ V`` as in FlashAttention.
* Block sizes: on CUDA, timed among ~10 candidates on the first call of each bucketed shape
  (``_tuned_config``; narrow key tails make 32-key blocks pay off at T = 77); defaults in
  ``_pick_config`` are the H200 winners. Measured on one H200 (benchmarks/RESULTS.md, 2026-11-27):
  26.1 us at N 4096 / D 40 vs 18.5 us for SDPA without a mask and 50.5 us for SDPA with the
  equivalent mask: the fused penalty is cheaper than any mask tensor, but the kernel is not yet as
  fast as PyTorch's unmasked flash kernel at these shapes.

Known costs (from those ptxas reports, not from timings): the capture variant at T = 77 spills a
little at D >= 80 (~100-450 bytes/thread); capture with T > 128 holds a [BLOCK_N >= 256, BLOCK_D]
key/value tile in registers and spills heavily (KBs/thread), so it is correct but slow; a second
pass over key blocks with the final (m, l) would fix that if long-T capture ever matters. fp32 is
the correctness path, not a fast path (IEEE dots on FMA units).

Strides: q/k/v/out are addressed through all four strides (diffusers' ``x.view(B, N, H, D)
.transpose(1, 2)`` works without a copy). Only a tensor whose last-dim stride is not 1 is made
contiguous first (a copy), because the kernel's tile loads assume unit stride along D for
vectorization (correctness would not need it, but such layouts never occur in practice).

The op is registered as ``torch.ops.lime_fast.regularized_attention`` (torch.library.custom_op
with a fake implementation) so torch.compile and CUDA graphs treat it as one opaque node.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = [
    "MAX_HEAD_DIM",
    "MAX_CAPTURE_T",
    "regularized_attention",
    "regularized_attention_launch",
    "tuned_configs",
]

MAX_HEAD_DIM = 256
MAX_CAPTURE_T = 1024  # capture holds all keys of a row in registers (see module docstring)

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Device helpers (inlined into the kernel)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, offs_r, offs_c, n_rows, N_COLS: tl.constexpr, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
    """Load a [R, C] tile; masks (zero fill) only along the dimensions that need it."""
    if EVEN_R:
        if EVEN_C:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_c[None, :] < N_COLS, other=0.0)
    else:
        if EVEN_C:
            tile = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < N_COLS), other=0.0)
    return tile


@triton.jit
def _store_tile(ptrs, value, offs_r, offs_c, n_rows, N_COLS: tl.constexpr, EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
    if EVEN_R:
        if EVEN_C:
            tl.store(ptrs, value)
        else:
            tl.store(ptrs, value, mask=offs_c[None, :] < N_COLS)
    else:
        if EVEN_C:
            tl.store(ptrs, value, mask=offs_r[:, None] < n_rows)
        else:
            tl.store(ptrs, value, mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < N_COLS))


@triton.jit
def _masked_logits(
    q, q2, k_base, keep_base, roi_eff, start_n, zero, T, scale_log2,
    stride_kn, stride_kk, stride_en,
    HAS_MASK: tl.constexpr, MASK_T: tl.constexpr, EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """fp32 logits (in log2 units) of one key block, with the RoI penalty and key-range mask applied.

    ``zero`` is 0 at run time (see ``_one_head``); ``q2`` is the second head-dim slice of the
    queries when BLOCK_D2 > 0 (see ``_split_head_dim``), unused otherwise."""
    offs_n = start_n + zero + tl.arange(0, BLOCK_N)
    offs_d = zero + tl.arange(0, BLOCK_D)
    k = _load_tile(
        k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk,
        offs_n, offs_d, T, HEAD_DIM, not MASK_T, EVEN_D or BLOCK_D2 > 0,
    )
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:
        offs_d2 = zero + BLOCK_D + tl.arange(0, BLOCK_D2)
        k2 = _load_tile(
            k_base + offs_n[:, None] * stride_kn + offs_d2[None, :] * stride_kk,
            offs_n, offs_d2, T, HEAD_DIM, not MASK_T, EVEN_D,
        )
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PRECISION)
    s = s * scale_log2
    if MASK_T:
        s = tl.where(offs_n[None, :] < T, s, float("-inf"))
    if HAS_MASK:
        if MASK_T:
            kept = tl.load(keep_base + offs_n * stride_en, mask=offs_n < T, other=1)
        else:
            kept = tl.load(keep_base + offs_n * stride_en)
        s = tl.where(roi_eff[:, None] & (kept == 0)[None, :], float("-inf"), s)
    return s


@triton.jit
def _online_step(
    q, q2, acc, acc2, m_i, l_i, k_base, v_base, keep_base, roi_eff, start_n, T, scale_log2,
    stride_kn, stride_kk, stride_vn, stride_vk, stride_en,
    HAS_MASK: tl.constexpr, MASK_T: tl.constexpr, EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key block of the online softmax: rescale the running (acc, acc2, m, l) and add this block
    (acc2: the second head-dim slice's accumulator when BLOCK_D2 > 0, passed through otherwise)."""
    s = _masked_logits(
        q, q2, k_base, keep_base, roi_eff, start_n, 0, T, scale_log2, stride_kn, stride_kk, stride_en,
        HAS_MASK, MASK_T, EVEN_D, HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, DOT_PRECISION,
    )
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row whose keys so far are all masked has m_new == -inf; exp2(-inf - -inf) would be NaN.
    # Subtracting 0 instead gives alpha = 0 and p = 0 for that row, and l, acc stay 0.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    v = _load_tile(
        v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vk,
        offs_n, offs_d, T, HEAD_DIM, not MASK_T, EVEN_D or BLOCK_D2 > 0,
    )
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        v2 = _load_tile(
            v_base + offs_n[:, None] * stride_vn + offs_d2[None, :] * stride_vk,
            offs_n, offs_d2, T, HEAD_DIM, not MASK_T, EVEN_D,
        )
        acc2 = acc2 * alpha[:, None]
        acc2 = tl.dot(p.to(v2.dtype), v2, acc2, input_precision=DOT_PRECISION)
    return acc, acc2, m_new, l_i


@triton.jit
def _one_head(
    q_base, k_base, v_base, o_base, keep_base, roi_eff, offs_m, zero, N, T, scale_log2,
    stride_qm, stride_qk, stride_kn, stride_kk, stride_vn, stride_vk, stride_om, stride_ok, stride_en,
    HAS_MASK: tl.constexpr, SINGLE_BLOCK: tl.constexpr, EVEN_M: tl.constexpr, EVEN_T: tl.constexpr,
    EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_N_TAIL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Attention of one (b, h) for BLOCK_M queries; stores the output tile.

    The head dim is one slice of BLOCK_D columns (masked to HEAD_DIM unless EVEN_D), or, when
    BLOCK_D2 > 0, two: BLOCK_D full columns and BLOCK_D2 more (masked unless EVEN_D), each with its
    own q tile, dots and accumulator (``_split_head_dim``: 160 = 128 + 32 instead of padding to 256).

    Returns the normalized fp32 probabilities [BLOCK_M, BLOCK_N] when SINGLE_BLOCK (all keys in one
    block), else a dummy scalar.

    ``zero`` is 0 at run time. The capture variant calls this inside a run-time loop over heads and
    passes ``h // H`` (0 since h < H, but opaque to the compiler): adding it to the tile index
    vectors keeps the compiler from hoisting every head-invariant [BLOCK, BLOCK] index/mask tile
    out of the head loop and keeping them all live across heads. Measured with ptxas 13.4 for
    sm_90a (compiled ahead of time, no GPU; fp16, T = 77, BLOCK 64x128, 8 warps): spill stores per
    thread 1652 -> 12 bytes at D = 40 and 3412 -> 444 at D = 80. The non-capture path passes the
    literal 0, which folds away.
    """
    offs_d = zero + tl.arange(0, BLOCK_D)
    offs_m = offs_m + zero
    q = _load_tile(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk, offs_m, offs_d, N, HEAD_DIM, EVEN_M,
        EVEN_D or BLOCK_D2 > 0,
    )
    q2 = q  # (a stand-in when the head dim is one slice; never read then)
    if BLOCK_D2 > 0:
        offs_d2 = zero + BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d2[None, :] * stride_qk, offs_m, offs_d2, N,
                        HEAD_DIM, EVEN_M, EVEN_D)
    if SINGLE_BLOCK:
        # All T keys in one block: plain softmax, probabilities are final immediately.
        s = _masked_logits(
            q, q2, k_base, keep_base, roi_eff, 0, zero, T, scale_log2, stride_kn, stride_kk, stride_en,
            HAS_MASK, not EVEN_T, EVEN_D, HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, DOT_PRECISION,
        )
        m = tl.max(s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)  # unreachable by construction; never NaN anyway
        p = tl.exp2(s - m[:, None])
        l = tl.sum(p, 1)
        l = tl.where(l == 0.0, 1.0, l)
        p = p * (1.0 / l)[:, None]
        offs_n = zero + tl.arange(0, BLOCK_N)
        v = _load_tile(
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vk,
            offs_n, offs_d, T, HEAD_DIM, EVEN_T, EVEN_D or BLOCK_D2 > 0,
        )
        acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc2 = acc
        if BLOCK_D2 > 0:
            v2 = _load_tile(
                v_base + offs_n[:, None] * stride_vn + offs_d2[None, :] * stride_vk,
                offs_n, offs_d2, T, HEAD_DIM, EVEN_T, EVEN_D,
            )
            acc2 = tl.dot(p.to(v2.dtype), v2, input_precision=DOT_PRECISION)
        result = p
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc2 = acc  # a stand-in (passed through the loop unchanged) unless split
        if BLOCK_D2 > 0:
            acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
        t_full = (T // BLOCK_N) * BLOCK_N
        for start_n in range(0, t_full, BLOCK_N):
            acc, acc2, m_i, l_i = _online_step(
                q, q2, acc, acc2, m_i, l_i, k_base, v_base, keep_base, roi_eff, start_n, T, scale_log2,
                stride_kn, stride_kk, stride_vn, stride_vk, stride_en,
                HAS_MASK, False, EVEN_D, HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_D2, DOT_PRECISION,
            )
        if not EVEN_T:
            # The tail block is only as wide as the remainder needs (T = 77 with 64-key blocks: a
            # 16-key tail, 80 keys computed instead of 128).
            acc, acc2, m_i, l_i = _online_step(
                q, q2, acc, acc2, m_i, l_i, k_base, v_base, keep_base, roi_eff, t_full, T, scale_log2,
                stride_kn, stride_kk, stride_vn, stride_vk, stride_en,
                HAS_MASK, True, EVEN_D, HEAD_DIM, BLOCK_N_TAIL, BLOCK_D, BLOCK_D2, DOT_PRECISION,
            )
        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # unreachable by construction; never NaN anyway
        acc = acc * (1.0 / l_i)[:, None]
        if BLOCK_D2 > 0:
            acc2 = acc2 * (1.0 / l_i)[:, None]
        result = 0.0
    _store_tile(
        o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_ok,
        acc.to(o_base.dtype.element_ty), offs_m, offs_d, N, HEAD_DIM, EVEN_M, EVEN_D or BLOCK_D2 > 0,
    )
    if BLOCK_D2 > 0:
        _store_tile(
            o_base + offs_m[:, None] * stride_om + offs_d2[None, :] * stride_ok,
            acc2.to(o_base.dtype.element_ty), offs_m, offs_d2, N, HEAD_DIM, EVEN_M, EVEN_D,
        )
    return result


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _effective_roi(ROI, keep_base, off_b64, offs_m, N, T, stride_rz, stride_rm, stride_en,
                   HAS_MASK: tl.constexpr, EVEN_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """roi[b, rows] and any(keep[b, :]): the rows that get the penalty (an all-silenced element gets none)."""
    if HAS_MASK:
        n_kept = 0
        for start_t in range(0, T, BLOCK_N):
            offs_t = start_t + tl.arange(0, BLOCK_N)
            kept = tl.load(keep_base + offs_t * stride_en, mask=offs_t < T, other=0)
            n_kept += tl.sum((kept != 0).to(tl.int32), 0)
        if EVEN_M:
            roi = tl.load(ROI + off_b64 * stride_rz + offs_m * stride_rm)
        else:
            roi = tl.load(ROI + off_b64 * stride_rz + offs_m * stride_rm, mask=offs_m < N, other=0)
        # (tl.where rather than `&` with a scalar: the interpreter turns bool & 0-d bool into int32)
        roi_eff = tl.where(n_kept > 0, roi != 0, False)
    else:
        roi_eff = offs_m < 0  # unused placeholder (all False)
    return roi_eff


@triton.jit
def _is_captured(CAPTURE, off_b, B, S, stride_cs):
    """Whether element ``off_b`` is in the capture list (read on the device: no host sync)."""
    hits = 0
    for i in range(0, S):
        c = tl.load(CAPTURE + i * stride_cs)
        c = tl.where(c < 0, c + B, c)
        hits += (c == off_b).to(tl.int32)
    return hits > 0


@triton.jit
def _store_probs(PROBS, CAPTURE, probs_mean, off_b, off_h, pid_bh, offs_m, B, N, T, S,
                 stride_cs, stride_ps, stride_pm, stride_pn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write element ``off_b``'s head-mean probabilities to every capture slot that names it."""
    offs_t = tl.arange(0, BLOCK_N)
    tile_mask = (offs_m[:, None] < N) & (offs_t[None, :] < T)
    p_offs = offs_m[:, None] * stride_pm + offs_t[None, :] * stride_pn
    for i in range(0, S):
        c = tl.load(CAPTURE + i * stride_cs)
        valid = (c >= -B) & (c < B)
        c = tl.where(c < 0, c + B, c)
        ptrs = PROBS + i * stride_ps + p_offs
        tl.store(ptrs, probs_mean, mask=tl.where((c == off_b) & (off_h == 0), tile_mask, False))
        # An out-of-range index (only possible for a device-side capture list, which the
        # launcher cannot check without a host sync) gets a NaN row instead of garbage.
        tl.store(ptrs, tl.full([BLOCK_M, BLOCK_N], float("nan"), tl.float32),
                 mask=tl.where((~valid) & (pid_bh == 0), tile_mask, False))


@triton.jit
def _regularized_attention_fwd(
    Q, K, V, OUT, ROI, KEEP, CAPTURE, PROBS,
    scale_log2,
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_oz, stride_oh, stride_om, stride_ok,
    stride_rz, stride_rm,
    stride_ez, stride_en,
    stride_cs,
    stride_ps, stride_pm, stride_pn,
    B, H, N, T, S,
    HAS_MASK: tl.constexpr,
    CAPTURE_ON: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_T: tl.constexpr,
    EVEN_HEADDIM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_N_TAIL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEADS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)  # (b, group of HEADS heads); HEADS == 1 with capture
    n_groups = (H + HEADS - 1) // HEADS
    off_b = pid_bh // n_groups
    off_h = (pid_bh % n_groups) * HEADS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    off_b64 = off_b.to(tl.int64)
    keep_base = KEEP + off_b64 * stride_ez
    roi_eff = _effective_roi(ROI, keep_base, off_b64, offs_m, N, T, stride_rz, stride_rm, stride_en,
                             HAS_MASK, EVEN_M, BLOCK_N)
    if HEADS == 1 and not CAPTURE_ON:
        # The default: one head per program, the literal 0 as _one_head's `zero` (it folds away).
        off_h64 = off_h.to(tl.int64)
        _one_head(
            Q + off_b64 * stride_qz + off_h64 * stride_qh,
            K + off_b64 * stride_kz + off_h64 * stride_kh,
            V + off_b64 * stride_vz + off_h64 * stride_vh,
            OUT + off_b64 * stride_oz + off_h64 * stride_oh,
            keep_base, roi_eff, offs_m, 0, N, T, scale_log2,
            stride_qm, stride_qk, stride_kn, stride_kk, stride_vn, stride_vk, stride_om, stride_ok, stride_en,
            HAS_MASK, SINGLE_BLOCK, EVEN_M, EVEN_T, EVEN_HEADDIM, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_N_TAIL, BLOCK_D,
            BLOCK_D2, DOT_PRECISION,
        )
    else:
        if CAPTURE_ON:
            # A captured element's h == 0 program runs all heads (head mean in registers) and its
            # other programs have nothing to do; an element not captured keeps one head per program.
            captured = _is_captured(CAPTURE, off_b, B, S, stride_cs)
            h_lo = tl.where(captured, tl.where(off_h == 0, 0, H), off_h)
            h_hi = tl.where(captured, H, off_h + 1)
            probs_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        else:
            # Several heads of one query block per program (a launcher option, not the default):
            # fewer programs, the RoI row and keep reduction shared, and in diffusers'
            # [B, N, H, D] memory the heads' rows of a query lie side by side, so later heads find
            # them in cache.
            h_lo = off_h
            h_hi = tl.minimum(off_h + HEADS, H)
        for h in range(h_lo, h_hi):
            h64 = off_b64 * 0 + h  # int64 offsets (h is a plain int in the interpreter)
            p = _one_head(
                Q + off_b64 * stride_qz + h64 * stride_qh,
                K + off_b64 * stride_kz + h64 * stride_kh,
                V + off_b64 * stride_vz + h64 * stride_vh,
                OUT + off_b64 * stride_oz + h64 * stride_oh,
                keep_base, roi_eff, offs_m, h // H, N, T, scale_log2,
                stride_qm, stride_qk, stride_kn, stride_kk, stride_vn, stride_vk, stride_om, stride_ok, stride_en,
                HAS_MASK, SINGLE_BLOCK, EVEN_M, EVEN_T, EVEN_HEADDIM, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_N_TAIL,
                BLOCK_D, BLOCK_D2, DOT_PRECISION,
            )
            if CAPTURE_ON:
                probs_sum += p
        if CAPTURE_ON:
            _store_probs(PROBS, CAPTURE, probs_sum / H, off_b, off_h, pid_bh, offs_m, B, N, T, S,
                         stride_cs, stride_ps, stride_pm, stride_pn, BLOCK_M, BLOCK_N)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_mask(name: str, mask: torch.Tensor, B: int, L: int, L_name: str, device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"regularized_attention: {name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"regularized_attention: {name} must be bool (or uint8 0/1), got {mask.dtype}")
    if mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] != L:
        raise ValueError(f"regularized_attention: {name} must have shape [B, {L_name}] = [{B}, {L}], got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"regularized_attention: {name} is on {mask.device} but q is on {device}")


def _check_inputs(q, k, v, roi, keep, capture, runtime: bool = True) -> None:
    """Validate metadata only (shapes, dtypes, devices): safe on fake tensors, never syncs.

    ``runtime=False`` (the fake implementation) skips the "can this device run Triton" check, so
    tracing with meta tensors works anywhere."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"regularized_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"regularized_attention: {name} must be 4-D [B, H, L, D], got shape {list(t.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"regularized_attention: q dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"regularized_attention: q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"regularized_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if runtime and q.device.type != "cuda" and not (q.device.type == "cpu" and _interpreting()):
        raise ValueError(
            f"regularized_attention: the Triton kernel needs CUDA tensors, got {q.device} "
            "(set TRITON_INTERPRET=1 before importing triton to run it on the CPU, slowly, or use "
            "lime_fast.kernels.reference.regularized_attention_ref)"
        )
    B, H, N, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"regularized_attention: k must be [B, H, T, D] = [{B}, {H}, T, {D}], got {list(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"regularized_attention: v shape {list(v.shape)} must equal k shape {list(k.shape)}")
    T = k.shape[2]
    if T < 1:
        raise ValueError("regularized_attention: need at least one key (T >= 1)")
    if B * H > 65535:
        raise ValueError(f"regularized_attention: B * H = {B * H} exceeds the CUDA grid limit 65535")
    if D < 1 or D > MAX_HEAD_DIM:
        raise ValueError(f"regularized_attention: head dim must be in [1, {MAX_HEAD_DIM}], got {D}")
    if roi is not None:
        _check_mask("roi", roi, B, N, "N", q.device)
    if keep is not None:
        _check_mask("keep", keep, B, T, "T", q.device)
    if capture is not None:
        if not isinstance(capture, torch.Tensor):
            raise TypeError(f"regularized_attention: capture must be a torch.Tensor or None, got {type(capture).__name__}")
        if capture.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"regularized_attention: capture must be an int64 (or int32) tensor, got {capture.dtype}")
        if capture.dim() != 1:
            raise ValueError(f"regularized_attention: capture must be 1-D [S], got shape {list(capture.shape)}")
        if capture.device != q.device and capture.device.type != "cpu":
            raise ValueError(f"regularized_attention: capture is on {capture.device} but q is on {q.device}")
        if T > MAX_CAPTURE_T:
            raise ValueError(
                f"regularized_attention: capture supports T <= {MAX_CAPTURE_T} keys (the whole key row is "
                f"held in registers), got T = {T}"
            )


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _split_head_dim(D: int) -> tuple[int, int] | None:
    """(BLOCK_D, BLOCK_D2) covering D with two power-of-two slices when that computes fewer columns
    than one padded slice, else None: 40 -> 32 + 16 (48 columns, not 64), 80 -> 64 + 16 (80, not 128),
    160 -> 128 + 32 (160, not 256). tl.arange needs power-of-two lengths and tl.dot K >= 16."""
    d1 = max(16, 1 << (int(D).bit_length() - 1))
    if d1 >= D:
        return None
    d2 = max(16, _next_pow2(D - d1))
    return (d1, d2) if d1 + d2 < _next_pow2(D) else None


def _pick_config(
    N: int, T: int, D: int, capture: bool, dtype: torch.dtype, block_m: int | None = None, block_n: int | None = None
) -> dict:
    """Default block sizes and launch options (the autotuner's starting point and the fallback when
    it is off: the interpreter, graph capture, LIME_FAST_AUTOTUNE=0, capture, fp32).

    * BLOCK_D = next_pow2(D) (>= 16: tl.dot's minimum); masked only when D != BLOCK_D.
    * fp16/bf16 without capture: the H200 autotuning winners (see the comment in the code): an
      online softmax over 32-key blocks for D <= 64 and for D > 128 with N > 64, one key block
      for D <= 128 otherwise. Capture and fp32 blocks were chosen from ptxas register/spill reports
      for sm_90a (no spills, enough programs for small N); they are not timed yet.
    * Capture: BLOCK_N = next_pow2(T) (whole key row) and smaller BLOCK_M (64 / 32 / 16 by head dim,
      BLOCK_M * BLOCK_N <= 8192) since the head-mean tile adds a [BLOCK_M, BLOCK_N] fp32 accumulator.
    * fp32 (IEEE dots run on FMA units and need far more registers): 16-row tiles.
    * In the CPU interpreter speed is per program, so the fp16 table is used for every dtype.
    """
    BLOCK_D = max(16, _next_pow2(D))
    T2 = max(16, _next_pow2(T))
    small_fp32 = dtype == torch.float32 and not _interpreting()
    if capture:
        BLOCK_N = T2
        BLOCK_M = 16 if small_fp32 else {16: 64, 32: 64, 64: 64, 128: 32, 256: 16}[BLOCK_D]
        while BLOCK_M > 16 and BLOCK_M * BLOCK_N > 8192:
            BLOCK_M //= 2
        num_warps, num_stages = 8, 1
    elif small_fp32:
        BLOCK_M, BLOCK_N, num_warps, num_stages = 16, min(T2, 32), 4, 2
    else:
        # The H200 autotuning winners at SD 1.5's shapes (fp16, T = 77, B*H = 24; 2026-11-27):
        # D 40 / N 4096: 128 x 32 online, 8 warps (26.1 us; one 128-key block: 37.6 us);
        # D 80 / N 1024: 64 x 128 one block; D 160 / N 256: 32 x 32 online, 4 warps; D 160 / N 64:
        # 32 x 128 one block.
        if BLOCK_D <= 64:
            BLOCK_M, BLOCK_N, num_warps = 128, min(T2, 32), 8
        elif BLOCK_D == 128:
            BLOCK_M, BLOCK_N, num_warps = 64, (T2 if T2 <= 128 else 32), (8 if T2 <= 128 else 4)
        elif N > 64 or T2 > 128:
            BLOCK_M, BLOCK_N, num_warps = 32, min(T2, 32), 4
        else:
            BLOCK_M, BLOCK_N, num_warps = 32, T2, 8
        num_stages = 1 if BLOCK_N >= T else 2
    if block_m is not None:
        BLOCK_M = block_m
    if block_n is not None:
        if capture and block_n < T:
            raise ValueError("regularized_attention: with capture, block_n must cover all T keys")
        BLOCK_N = block_n
    for name, val in (("block_m", BLOCK_M), ("block_n", BLOCK_N)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"regularized_attention: {name} must be a power of two >= 16, got {val}")
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------
# Autotuning (CUDA only)
# ----------------------------------------------------------------------------------------------
# Measured on one H200 (2026-11-27, fp16, B*H = 24, T = 77, CUDA-graph replay): the untuned heuristic
# (one 128-key block, BLOCK_M 128, 8 warps) ran 2x slower than SDPA at N = 4096, D = 40 (37.6 vs
# 18.5 us), so block shapes are now picked by timing a few candidates on the first call of each
# bucketed shape. Tuning runs eagerly (never inside CUDA-graph capture: there the heuristic is used),
# once per process and key; the engine's and accelerate()'s warm-up calls trigger it before capture.
# LIME_FAST_AUTOTUNE=0 turns it off (heuristic only). The capture variant and fp32 are not tuned.

_TUNED: dict[tuple, dict] = {}


def _autotune_on() -> bool:
    return os.environ.get("LIME_FAST_AUTOTUNE", "1") not in ("0", "") and not _interpreting()


def _tune_key(BH: int, N: int, T: int, D: int, dtype: torch.dtype, capture: bool) -> tuple:
    return (_next_pow2(BH), _next_pow2(N), T, D, dtype, capture)


def _candidates(T: int, D: int, heuristic: dict) -> list[dict]:
    """Block shapes worth timing for fp16/bf16 without capture (about 10 per key, each also with two
    head-dim slices where the head dim splits: ~12-24 compilations, and launches of ~25 ms of timing
    each, once per key)."""
    BLOCK_D = max(16, _next_pow2(D))
    T2 = max(16, _next_pow2(T))
    out = [heuristic]
    ms = [m for m in (64, 128) if m * BLOCK_D <= 8192] or [32]
    for bn in ([T2] if T2 <= 128 else []) + [64, 32]:
        if bn > T2:
            continue
        for m in ms:
            for w in (4, 8):
                cfg = dict(BLOCK_M=m, BLOCK_N=bn, BLOCK_D=BLOCK_D, num_warps=w, num_stages=1 if bn >= T else 2)
                if cfg not in out:
                    out.append(cfg)
    # Not timed: 2 and 4 heads per program (they never won at SD 1.5's shapes on an H200, 2026-12-04, and
    # each one is another compilation on a fresh machine). Timed: a split head dim (fewer columns and
    # registers; ptxas's spills at D = 160 vanish, RESULTS; untimed on a GPU yet), each shape above.
    split = _split_head_dim(D)
    return out + ([dict(c, BLOCK_D=split[0], BLOCK_D2=split[1]) for c in out] if split else [])


def _tuned_config(BH: int, N: int, T: int, D: int, dtype: torch.dtype, capture: bool, heuristic: dict, launch) -> dict:
    if capture or dtype == torch.float32 or not _autotune_on():
        return heuristic
    key = _tune_key(BH, N, T, D, dtype, capture)
    hit = _TUNED.get(key)
    if hit is not None:
        return hit
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return heuristic  # cannot time inside graph capture; the key stays untuned
    import triton.testing

    best, best_ms = heuristic, float("inf")
    for cfg in _candidates(T, D, heuristic):
        try:
            ms = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:  # a shape the compiler rejects (e.g. out of shared memory): skip it
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _TUNED[key] = best
    return best


def tuned_configs() -> dict[tuple, dict]:
    """The block shapes autotuning picked in this process: {(B*H, N, T, D bucket, dtype, capture): config}."""
    return dict(_TUNED)



def _empty_out(q: torch.Tensor) -> torch.Tensor:
    # Same strides as q when q is dense (diffusers' transposed view -> [B, N, H, D] memory, so the
    # caller's transpose(1, 2).reshape(B, N, H * D) is free); contiguous otherwise.
    return torch.empty_like(q, memory_format=torch.preserve_format)


def kernel_constexprs(cfg: dict, N: int, T: int, D: int, dtype: torch.dtype, has_mask: bool, capture_on: bool) -> dict:
    """The kernel's compile-time arguments for a block config (``_pick_config``'s dict) and a shape;
    shared by the launcher and ahead-of-time compilation (``scripts/kernel_codegen.py``)."""
    BLOCK_M, BLOCK_N, BLOCK_D = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]
    BLOCK_D2 = cfg.get("BLOCK_D2", 0)
    return dict(
        HAS_MASK=has_mask,
        CAPTURE_ON=capture_on,
        SINGLE_BLOCK=BLOCK_N >= T,
        EVEN_M=N % BLOCK_M == 0,
        EVEN_T=T % BLOCK_N == 0,
        EVEN_HEADDIM=D == BLOCK_D + BLOCK_D2,  # with a split: the second slice is full
        HEAD_DIM=D,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_N_TAIL=min(BLOCK_N, max(16, _next_pow2(T % BLOCK_N))),
        BLOCK_D=BLOCK_D,
        BLOCK_D2=BLOCK_D2,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        HEADS=1 if capture_on else cfg.get("HEADS", 1),
    )


def _capture_buffers(capture, B: int, N: int, T: int, q: torch.Tensor, probs_out, check_values: bool):
    """(S, capture indices on q's device, probs [S, N, T] fp32 or None) for a launch; checks
    CPU-resident indices (free there) and a caller's ``probs_out``."""
    if capture is None:
        return 0, q, None  # q: never dereferenced
    S = capture.shape[0]
    if capture.device.type == "cpu" and check_values and S > 0:
        lo, hi = int(capture.min()), int(capture.max())
        if lo < -B or hi >= B:
            raise IndexError(f"regularized_attention: capture indices must be in [-{B}, {B}), got [{lo}, {hi}]")
    if probs_out is None:
        probs = torch.empty((S, N, T), dtype=torch.float32, device=q.device)
    elif tuple(probs_out.shape) != (S, N, T) or probs_out.dtype != torch.float32 or probs_out.device != q.device:
        raise ValueError(f"regularized_attention: probs_out must be float32 [{S}, {N}, {T}] on {q.device}")
    else:
        probs = probs_out
    return S, capture.to(q.device, non_blocking=True), probs


def regularized_attention_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    roi: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    scale: float | None = None,
    capture: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    probs_out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    heads_per_program: int | None = None,
    split_head_dim: bool | None = None,
    check_capture_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the kernel directly (no custom-op dispatch). Same semantics as the reference.

    Internal keyword arguments (tests, benchmarks):
        out: [B, H, N, D] output buffer in q's dtype (any strides) to write instead of allocating.
        probs_out: [S, N, T] fp32 buffer for the captured maps.
        block_m, block_n: override the heuristic block sizes (powers of two >= 16).
        heads_per_program: heads of one query block per program (>= 1; ignored with capture).
        split_head_dim: True runs the head dim as two power-of-two slices where that computes fewer
            columns (``_split_head_dim``: 40, 80, 160 in SD 1.5), False as one padded slice.
        check_capture_values: validate capture indices when they live on the CPU (free there);
            device-resident indices are never checked on the host (no sync): a bad one gives NaN rows.
    """
    _check_inputs(q, k, v, roi, keep, capture)
    B, H, N, D = q.shape
    T = k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)

    if out is None:
        out = _empty_out(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError("regularized_attention: out must match q's shape, dtype and device")
    # The kernel assumes unit stride along D (vector loads); anything else is copied (rare).
    q, k, v = (t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in (q, k, v))

    has_mask = roi is not None and keep is not None  # the reference's rule: penalty needs both
    if has_mask:
        roi_t = roi.view(torch.uint8) if roi.dtype == torch.bool else roi
        keep_t = keep.view(torch.uint8) if keep.dtype == torch.bool else keep
    else:
        roi_t = keep_t = q  # never dereferenced

    S, capture_t, probs = _capture_buffers(capture, B, N, T, q, probs_out, check_capture_values)
    probs_t = capture_t if probs is None else probs
    capture_on = capture is not None and S > 0

    if out.numel() == 0:
        return out, probs

    def launch(cfg: dict) -> None:
        meta = kernel_constexprs(cfg, N, T, D, q.dtype, has_mask, capture_on)
        grid = (triton.cdiv(N, meta["BLOCK_M"]), B * triton.cdiv(H, meta["HEADS"]))
        _regularized_attention_fwd[grid](
            q, k, v, out, roi_t, keep_t, capture_t, probs_t,
            scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *(roi_t.stride() if has_mask else (0, 0)),
            *(keep_t.stride() if has_mask else (0, 0)),
            capture_t.stride(0) if capture_on else 0,
            *(probs_t.stride() if capture_on else (0, 0, 0)),
            B, H, N, T, S,
            **meta, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    cfg = _pick_config(N, T, D, capture_on, q.dtype, block_m, block_n)
    if heads_per_program is not None:
        if int(heads_per_program) < 1:
            raise ValueError(f"regularized_attention: heads_per_program must be >= 1, got {heads_per_program}")
        cfg["HEADS"] = int(heads_per_program)
    if split_head_dim and (split := _split_head_dim(D)):
        cfg["BLOCK_D"], cfg["BLOCK_D2"] = split
    if block_m is None and block_n is None and heads_per_program is None and split_head_dim is None:
        cfg = _tuned_config(B * H, N, T, D, q.dtype, capture_on, cfg, launch)
    launch(cfg)
    return out, probs


# ----------------------------------------------------------------------------------------------
# torch custom op
# ----------------------------------------------------------------------------------------------
# Schema: (Tensor q, Tensor k, Tensor v, Tensor? roi, Tensor? keep, float? scale, Tensor? capture)
#   -> (Tensor out, Tensor probs). Optional tensor/float inputs are supported by custom_op; an
# Optional output is not, so without capture the op returns an empty [0, N, T] probs tensor and the
# Python wrapper turns that into None. Inference only: no autograd formula is registered.


@torch.library.custom_op("lime_fast::regularized_attention", mutates_args=())
def _regularized_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    roi: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    scale: Optional[float],
    capture: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    out, probs = regularized_attention_launch(q, k, v, roi, keep, scale, capture)
    if probs is None:
        probs = q.new_empty((0, q.shape[2], k.shape[2]), dtype=torch.float32)
    return out, probs


@_regularized_attention_op.register_fake
def _regularized_attention_fake(q, k, v, roi, keep, scale, capture):
    _check_inputs(q, k, v, roi, keep, capture, runtime=False)
    S = capture.shape[0] if capture is not None else 0
    return _empty_out(q), q.new_empty((S, q.shape[2], k.shape[2]), dtype=torch.float32)


def regularized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    roi: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    scale: float | None = None,
    capture: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``softmax(q kᵀ · scale + penalty) v`` with LIME's RoI token penalty, fused in one Triton kernel.

    Same signature and semantics as :func:`lime_fast.kernels.reference.regularized_attention_ref`
    (without ``upcast``: logits and softmax are always fp32).

    Args:
        q: [B, H, N, D] fp16/bf16/fp32 queries, any strides (last-dim stride 1 avoids a copy).
        k, v: [B, H, T, D], same dtype and device as q, any strides.
        roi: [B, N] bool (or uint8), True inside the RoI. keep: [B, T] bool (or uint8), True for tokens
            visible inside the RoI. The penalty applies only when both are given; an element whose
            keep row is all False gets no penalty.
        scale: logit scale, default D ** -0.5.
        capture: optional [S] int64 batch indices (negative allowed); returns their head-averaged
            fp32 probabilities [S, N, T]. Needs T <= MAX_CAPTURE_T.

    Returns:
        (out [B, H, N, D] in q's dtype, with q's strides when q is dense; probs [S, N, T] or None).
    """
    out, probs = torch.ops.lime_fast.regularized_attention(q, k, v, roi, keep, scale, capture)
    return out, (probs if capture is not None else None)
