"""One adapted linear layer in one pass: base GEMM + LoRA + IA³.

    y = l_out ⊙ (W (l_in ⊙ x) + b) + ((x Aᵀ) ⊙ s) Bᵀ

``W`` is ``(N, K)`` (``nn.Linear``) or ``(K, N)`` (transformers' ``Conv1D``, ``weight_kn``);
several LoRAs active together are concatenated along the rank ``R`` with one scale per
rank row (``s``); ``l_in``/``l_out`` are IA³ scales on the input/output features. An IA³
that composes with a LoRA on the same module is folded into that LoRA's ``A`` (input
side) or ``B`` (output side) by the caller, so the kernel stays one formula. ``W`` may
also be int8 or float8_e4m3fn codes with one fp32 scale per output channel
(``weight_scale``): the same kernels read the codes at one byte each (half of bf16's
bytes at decode), convert them inside the K-loop and scale the base accumulator in the
epilogue, before the bias (the ``W_SCALED`` constexpr).

DoRA (``col_scale``, a per-output-column scale ``g = m / ‖W + s·B·A‖_row`` computed by
the caller): ``y = l_out ⊙ (g ⊙ W (l_in ⊙ x) + b) + g ⊙ ((x Aᵀ) ⊙ s) Bᵀ``; without IA³
that is ``(W x + s·B·A x) ⊙ g + b``. The epilogue applies ``l_out``, adds the LoRA term,
scales by ``g`` and adds the bias (``l_out ⊙ b``): one more ``(N,)`` vector read per
output tile, under the constexpr ``HAS_COL_SCALE`` (the same kernels).

Two strategies, chosen by shape in :func:`pick_config` (one place), plus a third regime
of the first:

* Decode (``M <= 16`` rows, memory-bound): one kernel streams ``W`` once and, from the
  same ``x`` tiles, accumulates ``h = x Aᵀ``; the epilogue adds bias, ``l_out`` and
  ``(h ⊙ s) Bᵀ`` and writes ``y`` once. Re-reading ``A`` per N-tile costs ``R/BLOCK_N``
  of ``W``'s bytes, served from L2; above padded rank 64 that exceeds ``W`` itself, so
  larger ranks precompute ``h`` as prefill does (fp32, whose FMA products keep both
  operands in registers, fuses only at padded rank 16).
* Batched decode (``16 < M <= 128``, fp16/bf16, padded rank <= 64): the decode kernel
  (shrink fused in the K-loop, one launch) on 32-row tiles; repeating the shrink per
  N-tile costs FLOPs that hide under ``W``'s bytes, where a second launch would cost
  2 µs on a ~7 µs layer (``ci/kernel_report.py``'s roofline model compares both).
  Larger ranks keep the 32-row tiles and precompute ``h`` as prefill does.
* Prefill (``M > 16`` otherwise): a small kernel computes ``h = (x Aᵀ) ⊙ s`` once, in fp32; the
  base GEMM (grouped tile order, as in Triton's matmul tutorial) adds ``h Bᵀ`` in its
  epilogue. Shrinking inside the K-loop would repeat ``R/BLOCK_N`` more FLOPs per tile.
  The shrink kernel's grid is split over row tiles, rank blocks and K where its rows
  alone would leave SMs idle (``shrink_config``).

Why 16: at ``M <= 16`` one ``BLOCK_M = 16`` tile (the smallest ``tl.dot`` allows) holds
every row, so ``W`` is read exactly once; for more rows the prefill kernel's 64/128-row
tiles read ``W`` once per 64/128 rows. Both regimes are memory-bound up to the H200
ridge point (989 TFLOP/s / 4.8 TB/s ≈ 206 rows at bf16), so what decides is bytes:
``W`` read once, ``A``/``B`` once (plus L2 re-reads), ``x`` once more for ``h``.

Ranks 1..256 are padded to a power of two >= 16 inside the kernels (masked loads with
``other=0``), never in the caller's tensors. Every load is masked on M, N, K and R.
Products run on tensor cores in the input dtype with fp32 accumulation; fp32 inputs use
``input_precision="ieee"`` (no silent TF32). The K-step, the bias/``l_out`` epilogue and
the dots are ``triton_helpers.py``'s, shared with ``lora_mixed.py``.

This module imports torch (and triton, when present) only, never tinytune.
"""

from __future__ import annotations

from typing import Optional

import torch

from .lora_mixed_plan import SMS_DEFAULT, programs_wanted  # the device's SM count (132 on a CPU)
from .triton_helpers import add_h_bt, base_k_step, bias_and_l_out, col_scale_and_bias, dequant_scale, mma
from .triton_support import HAS_TRITON, is_interpreted, tl, triton

__all__ = ["torch_lora_linear", "lora_linear", "pick_config", "triton_kernels", "QUANT_DTYPES",
           "check_weight_scale", "device_arch"]

# Decode (fused shrink in the K-loop) up to this many rows: one BLOCK_M=16 tile.
DECODE_MAX_M = 16
# Decode fuses the shrink for padded ranks up to this; above, A's re-reads per N-tile
# (R_PAD/BLOCK_N of W's bytes) would exceed W itself, and one extra launch is cheaper.
DECODE_FUSED_MAX_RANK = 64
MAX_RANK = 256


if HAS_TRITON:

    @triton.jit
    def _lora_shrink_kernel(
        # pointers
        x_ptr,  # (M, K)
        a_ptr,  # (R, K)
        s_ptr,  # (R,) per-rank-row scale
        h_ptr,  # (M, R) fp32 output: (x Aᵀ) ⊙ s
        ws_ptr,  # (SPLIT_K, tiles, BLOCK_M, BLOCK_R) fp32 partial tiles (SPLIT_K > 1)
        cnt_ptr,  # (tiles,) int32 arrivals per (M-tile, rank block), zero at launch
        # sizes
        M,
        K,
        R,
        SPLIT_K,  # K-splits in the grid (its third axis)
        K_CHUNK,  # multiple of BLOCK_K: the K range of one split
        # strides
        stride_xm,
        stride_xk,
        stride_ar,
        stride_ak,
        stride_s,
        stride_hm,
        # meta
        HAS_SCALE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        REDUCE: tl.constexpr,  # SPLIT_K > 1: partial tiles, reduced by the last to arrive
        DOT_FP32: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
    ):
        """``h = (x Aᵀ) ⊙ s`` in fp32, one program per (BLOCK_R ranks, BLOCK_M rows, K-split).

        Computed once per call so the GEMM epilogue can add ``h Bᵀ`` without repeating
        the shrink per N-tile; ``x`` is read once more (``M*K`` bytes, small next to the
        prefill GEMM's ``2*M*N*K`` FLOPs). Where ``cdiv(M, BLOCK_M)`` programs cannot
        fill the GPU (decode at large ranks, prefill up to a few thousand rows), the grid
        also splits the rank (no reduction needed) and then K (serial split-K, as
        ``lora_mixed``'s GEMM: each split stores its fp32 partial tile, the last to
        arrive at the tile's counter sums them in split order, so the result does not
        depend on the arrival order).
        """
        # Rank blocks of one M-tile are neighbours in the grid: they share x in L2.
        pid_r = tl.program_id(0)
        pid_m = tl.program_id(1)
        split_id = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        m_mask = offs_m < M
        r_mask = offs_r < R
        k_lo = split_id * K_CHUNK
        k_hi = tl.minimum(K, k_lo + K_CHUNK)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_lo + offs_k)[None, :] * stride_xk
        a_ptrs = a_ptr + offs_r[None, :] * stride_ar + (k_lo + offs_k)[:, None] * stride_ak  # Aᵀ tile
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(0, tl.cdiv(k_hi - k_lo, BLOCK_K)):
            k_mask = offs_k < k_hi - k_lo - k * BLOCK_K
            xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            h = mma(xt, at, h, DOT_FP32, UPCAST_DOT)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak
        last = True
        if REDUCE:
            tiles = tl.num_programs(0) * tl.num_programs(1)
            tile = pid_m * tl.num_programs(0) + pid_r
            offs_t = tl.arange(0, BLOCK_M)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
            tile_ws = ws_ptr + tile * (BLOCK_M * BLOCK_R) + offs_t
            tl.store(tile_ws + split_id * tiles * (BLOCK_M * BLOCK_R), h)
            # Every thread's partial is stored before one thread's release-atomic
            # publishes the arrival (the CUTLASS semaphore pattern); the last to arrive
            # acquires the others' partials.
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            last = arrived == SPLIT_K - 1
            if last:
                tl.debug_barrier()
                h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for j in range(0, SPLIT_K):
                    # .cg: read the other programs' partials from L2, never a stale L1
                    h += tl.load(tile_ws + j * tiles * (BLOCK_M * BLOCK_R), cache_modifier=".cg")
        if last:
            if HAS_SCALE:
                s = tl.load(s_ptr + offs_r * stride_s, mask=r_mask, other=0.0).to(tl.float32)
                h = h * s[None, :]
            h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :]
            tl.store(h_ptrs, h, mask=m_mask[:, None] & r_mask[None, :])

    @triton.jit
    def _lora_linear_fwd_kernel(
        # pointers
        x_ptr,  # (M, K)
        w_ptr,  # W[n, k] at n * stride_wn + k * stride_wk ((N, K) or Conv1D's (K, N))
        wscale_ptr,  # (N,) per-output-channel scale of an int8/fp8 W, read when W_SCALED
        bias_ptr,  # (N,)
        a_ptr,  # (R, K), read when SHRINK_IN_LOOP
        b_ptr,  # (N, R)
        s_ptr,  # (R,), read when SHRINK_IN_LOOP
        h_ptr,  # (M, R) fp32 (x Aᵀ) ⊙ s, read when not SHRINK_IN_LOOP
        lin_ptr,  # (K,) IA³ on the input
        lout_ptr,  # (N,) IA³ on the output
        col_ptr,  # (N,) DoRA column scale, read when HAS_COL_SCALE
        y_ptr,  # (M, N) output, contiguous
        # sizes
        M,
        N,
        K,
        R,
        # strides
        stride_xm,
        stride_xk,
        stride_wn,
        stride_wk,
        stride_wscale,
        stride_bias,
        stride_ar,
        stride_ak,
        stride_bn,
        stride_br,
        stride_s,
        stride_hm,
        stride_lin,
        stride_lout,
        stride_col,
        stride_ym,
        # meta
        HAS_BIAS: tl.constexpr,
        HAS_LORA: tl.constexpr,
        SHRINK_IN_LOOP: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_L_IN: tl.constexpr,
        HAS_L_OUT: tl.constexpr,
        HAS_COL_SCALE: tl.constexpr,
        W_SCALED: tl.constexpr,
        R_PAD: tl.constexpr,
        R_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        DOT_FP32: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
    ):
        """``y = l_out ⊙ (W (l_in ⊙ x) + b) + ((x Aᵀ) ⊙ s) Bᵀ`` for one (BLOCK_M, BLOCK_N) tile.

        The K-loop streams ``x`` and ``W`` tiles (``l_in`` scales the x tile); with
        ``SHRINK_IN_LOOP`` (decode) the same x tile also feeds ``h += x Aᵀ``. The epilogue
        adds bias, applies ``l_out``, adds ``h Bᵀ`` (``h`` from the loop or from ``h_ptr``,
        in rank chunks of R_BLOCK) and stores once. With ``HAS_COL_SCALE`` (DoRA) the bias
        waits until the LoRA term is in: ``g ⊙ (l_out ⊙ W x + L) + l_out ⊙ b``. Tiles are
        visited in groups of GROUP_M rows of tiles so neighbouring programs share W tiles
        in L2. With ``W_SCALED``, ``W`` holds int8/fp8 codes, converted to the dot's dtype
        inside the K-loop, and the base accumulator is scaled per output channel before
        the bias:
        ``W = codes ⊙ weight_scale[:, None]``.
        """
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # Wᵀ tile
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_LORA and SHRINK_IN_LOOP:
            offs_r = tl.arange(0, R_PAD)
            r_mask = offs_r < R
            a_ptrs = a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
            h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        lin_ptrs = lin_ptr + offs_k * stride_lin  # unused (and removed) without HAS_L_IN

        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_mask = offs_k < K - k * BLOCK_K
            acc, xt = base_k_step(acc, x_ptrs, m_mask, k_mask, w_ptrs, n_mask, lin_ptrs, k_mask,
                                  HAS_L_IN, DOT_FP32, UPCAST_DOT, W_SCALED)
            lin_ptrs += BLOCK_K * stride_lin
            if HAS_LORA and SHRINK_IN_LOOP:
                at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
                h = mma(xt, at, h, DOT_FP32, UPCAST_DOT)
                a_ptrs += BLOCK_K * stride_ak
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        if W_SCALED:
            acc = dequant_scale(acc, wscale_ptr, offs_n, stride_wscale, n_mask)
        acc = bias_and_l_out(acc, bias_ptr, stride_bias, offs_n, n_mask, lout_ptr, 0, 0,
                             stride_lout, n_mask, HAS_BIAS and not HAS_COL_SCALE, HAS_L_OUT)
        if HAS_LORA:
            if SHRINK_IN_LOOP:
                if HAS_SCALE:
                    s = tl.load(s_ptr + offs_r * stride_s, mask=r_mask, other=0.0)
                    h = h * s.to(tl.float32)[None, :]
                b_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
                bt = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                acc = mma(h.to(x_ptr.dtype.element_ty), bt, acc, DOT_FP32, UPCAST_DOT)
            else:
                # Rank chunks keep the epilogue's registers and shared memory bounded at
                # rank 256; R_PAD and R_BLOCK are constexprs, so the loop is unrolled.
                for r0 in tl.static_range(0, R_PAD, R_BLOCK):
                    offs_rc = r0 + tl.arange(0, R_BLOCK)
                    rc_mask = offs_rc < R
                    acc = add_h_bt(acc, h_ptr + offs_m[:, None] * stride_hm, m_mask, offs_rc,
                                   rc_mask, b_ptr, 0, 0, stride_br, offs_n, stride_bn, n_mask,
                                   x_ptr.dtype.element_ty, DOT_FP32, UPCAST_DOT)
        if HAS_COL_SCALE:
            acc = col_scale_and_bias(acc, col_ptr, 0, stride_col, bias_ptr, stride_bias, offs_n,
                                     n_mask, lout_ptr, 0, 0, stride_lout, n_mask, HAS_BIAS, HAS_L_OUT)

        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return HAS_TRITON and is_interpreted(_lora_linear_fwd_kernel)


def triton_kernels() -> dict:
    """This op's ``@triton.jit`` kernels by name, for ahead-of-time compiles
    (``report_configs.py``); empty without Triton."""
    if not HAS_TRITON:
        return {}
    return {f.__name__: f for f in (_lora_shrink_kernel, _lora_linear_fwd_kernel)}


def pad_rank(r: int) -> int:
    return max(16, triton.next_power_of_2(r)) if r > 0 else 16


# ---------------------------------------------------------------------------------------
# Configurations: every configuration the launcher can choose is listed here, so that
# ci/kernel_report.py compiles exactly these (report_configs.py) and the tests run each one.
# ---------------------------------------------------------------------------------------

# Decode (BLOCK_M=16 holds every row, W streamed once): the grid is N / BLOCK_N programs,
# and each re-reads A (from L2) once, R_PAD / BLOCK_N of W's bytes. BLOCK_N=32 doubles
# the programs in flight (128 for N=4096 on 132 SMs) where A is small (R_PAD <= 16);
# wide layers (N >= 8192) and larger ranks use BLOCK_N=64 and 8 warps.
_DECODE_N32 = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
_DECODE_N64 = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=8, num_stages=4)
# fp32 with IEEE products runs on FMA units, not tensor cores, with both operands in
# registers: small tiles, and the fused decode shrink only at padded rank 16.
_DECODE_F32 = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=3)
DECODE_FUSED_MAX_RANK_F32 = 16
# Prefill: 64x128 tiles up to 256 rows (enough programs to fill the SMs; K steps of 32
# on sm_80, where 64 spills at large ranks); above, the matmul tutorial's 128x256x64 /
# 8 warps / 3 stages on sm_90 (wgmma), and 128x128 on sm_80, where 128x256 spills. The
# epilogue adds h Bᵀ in rank chunks of 16: wider chunks spill next to the fp32
# accumulator (128x256 on sm_90; 64x128 on sm_80). Parts with less shared memory than
# sm_90's 227 KiB (sm_86/89/120) take the sm_80 tiles.
_PREFILL_SMALL_SM90 = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
_PREFILL_SMALL_SM80 = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4)
_PREFILL_LARGE_SM90 = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
_PREFILL_LARGE_SM80 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
_PREFILL_F32 = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=3)
PREFILL_LARGE_MIN_M = 256
# Batched decode (16 < M <= 128 rows, 16-bit, padded rank <= 64): one launch, the shrink
# fused in the K-loop as at decode, on 32-row tiles. The two-launch path pays the 2 us
# of a dependent launch on a ~7 us GEMM (1.3x merged at M = 64, 4096 -> 4096); fusing
# repeats the shrink per N-tile, 2*M*K*R_PAD*N/BLOCK_N FLOPs, hidden under W's bytes
# while the tile is 32 rows high. BLOCK_N is the widest that still gives ~128
# programs at N = 4096 (132 SMs): 64 up to 64 rows, 128 above; 32x128 takes 8 warps
# (with 4 it spilled at padded ranks 32-64, 8-144 B). ci/kernel_report.py's roofline
# model picks this (and the 128-row bound: at 256 rows the repeated shrink makes the
# layer compute-bound); it prints both paths side by side.
BATCHED_DECODE_MAX_M = 128
_BATCHED_DECODE_N64 = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
_BATCHED_DECODE_N128 = dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
# int8/fp8 codes converted in registers hold one more W tile there: where the float
# tile spilled with them (compile report), these take its place. Batched decode: 8 warps
# on 32x64 tiles (32x64 with 4 and 32x128 with 8 spilled 8 B); prefill above 256 rows
# on sm_90: 128x128 (128x256 spilled 16-80 B at 255 registers); fp32 prefill: 8 warps
# (with 4, K steps of 16 spilled 8-16 B at padded rank 32, and of 32 at rank 128 fp8).
_BATCHED_DECODE_Q = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
_PREFILL_LARGE_SM90_Q = _PREFILL_LARGE_SM80
_PREFILL_F32_Q = dict(_PREFILL_F32, num_warps=8)
# Opt-in shared memory per block; other parts (sm_86/89/120: 99 KiB) get fewer stages.
_SMEM = {80: 166912, 87: 166912, 90: 232448, 100: 232448}
_SMEM_DEFAULT = 101376


# The shrink's grid is cdiv(M, BLOCK_M) programs; where that cannot fill the GPU's SMs
# (decode at padded rank 128-256: one program streams all of A; prefill up to ~4k rows
# at small ranks) shrink_config splits it: first 16-row tiles (A re-read from L2 per
# tile, cheaper than x), then rank blocks down to 16 columns (x re-read from L2 per
# block, no reduction), then K (serial split-K: partial tiles summed in split order by
# the last program to arrive, deterministic). The K-split costs a memset of the arrival
# counters (one more dependent launch, ~2 us in a CUDA graph) and the partials'
# traffic, so it runs only where the programs are still few (at most SMs / 4: by the
# roofline model's 2/SMs of HBM per program, at most half the bandwidth) and each
# streams at least 256 KiB (~3.5 us at that share), in at most 8 splits of at least 4
# K-blocks each. ci/kernel_report.py's model prices all three.
SHRINK_MAX_SPLIT_K = 8
SHRINK_MIN_K_BLOCKS = 4
SHRINK_SPLIT_MIN_BYTES = 256 * 1024


def shrink_config(r_pad: int, decode: bool, f32: bool, m: int = 0, k: int = 0,
                  sms: int = SMS_DEFAULT) -> dict:
    """The shrink kernel's tile and grid split: more rows per program when the rank is
    small; rank blocks and K-splits where the rows alone give fewer programs than SMs.

    fp32 (FMA products, operands in registers) takes narrower K steps at large ranks.

    Args:
        r_pad: Padded rank.
        decode: Whether the call is a decode one (``M <= 16``).
        f32: Whether the dots run in IEEE fp32.
        m, k: Rows and input features (0: no split, the tile alone).
        sms: Streaming multiprocessors to fill.

    Returns:
        ``BLOCK_M``, ``BLOCK_K``, ``BLOCK_R`` (rank columns per program), ``SPLIT_K``
        (at most; the launcher recomputes the chunk from the real K), ``num_warps``,
        ``num_stages``.
    """
    if decode:
        block_m = 16
    else:
        block_m = 64 if r_pad <= 32 else (32 if r_pad <= 128 else 16)
    block_k = 64
    if f32:
        block_m = min(block_m, 32)
        block_k = 32 if r_pad <= 64 else 16
    block_r, split = r_pad, 1
    if m > 0:
        while block_m > 16 and triton.cdiv(m, block_m) * SHRINK_MAX_SPLIT_K < sms:
            block_m //= 2
        tiles = triton.cdiv(m, block_m)
        while block_r > 16 and tiles * (r_pad // block_r) < sms:
            block_r //= 2
        programs = tiles * (r_pad // block_r)
        per_program = (m + r_pad) * k * (4 if f32 else 2) // programs  # x and A, bytes
        if 4 * programs <= sms and per_program >= SHRINK_SPLIT_MIN_BYTES:
            split = max(1, min(SHRINK_MAX_SPLIT_K, triton.cdiv(sms, programs),
                               k // (SHRINK_MIN_K_BLOCKS * block_k)))
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, SPLIT_K=split,
                num_warps=4, num_stages=3)


def _smem_estimate(cfg: dict, elem: int) -> int:
    """Pipelined operand buffers: stages x (x tile + W tile [+ A tile when fused])."""
    per = cfg["BLOCK_M"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * cfg["BLOCK_N"]
    if cfg["shrink_in_loop"]:
        per += cfg["BLOCK_K"] * cfg["R_PAD"]
    return cfg["num_stages"] * per * elem


def pick_config(m: int, n: int, k: int, r: int, dtype: torch.dtype, arch: int = 90,
                sms: int = SMS_DEFAULT, quantized: bool = False) -> dict:
    """The one place that chooses the strategy and tiles for a call, from shapes only.

    Args:
        m, n, k, r: rows, output features, input features, total rank (0: no LoRA).
        dtype: the input dtype.
        arch: compute capability as ``10 * major + minor`` (90 under the interpreter).
        sms: the GPU's streaming multiprocessors (the shrink's split fills them; 132,
            an H100/H200's, under the interpreter).
        quantized: whether W holds int8/fp8 codes (same strategy; a few tiles differ).

    Returns:
        A dict with ``case`` ("decode", "batched-decode" or "prefill"), ``shrink_in_loop``, the GEMM's tile
        (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``, ``num_warps``,
        ``num_stages``), ``R_PAD``/``R_BLOCK`` and ``shrink`` (the shrink kernel's tile,
        or ``None`` when no separate shrink runs).
    """
    r_pad = pad_rank(r)
    f32 = dtype == torch.float32
    decode = m <= DECODE_MAX_M
    f16_fusable = not f32 and 0 < r and r_pad <= DECODE_FUSED_MAX_RANK
    # Above padded rank 64, batched decode keeps the 32-row tiles with h precomputed (the
    # split shrink): the prefill 64x128 tiles give 32 programs at N = 4096 on 132 SMs.
    batched = not decode and m <= BATCHED_DECODE_MAX_M and not f32 and r > 0
    sm90_tiles = arch >= 90 and _SMEM.get(arch, _SMEM_DEFAULT) >= _SMEM[90]
    if decode:
        if f32:
            gemm = dict(_DECODE_F32)
        elif n < 8192 and (r == 0 or r_pad <= 16):
            gemm = dict(_DECODE_N32)
        else:
            gemm = dict(_DECODE_N64)
    elif f32:
        gemm = dict(_PREFILL_F32_Q if quantized else _PREFILL_F32)
    elif batched:
        gemm = dict(_BATCHED_DECODE_Q if quantized else _BATCHED_DECODE_N64 if m <= 64 else _BATCHED_DECODE_N128)
    elif m <= PREFILL_LARGE_MIN_M:
        gemm = dict(_PREFILL_SMALL_SM90 if sm90_tiles else _PREFILL_SMALL_SM80)
    else:
        gemm = dict((_PREFILL_LARGE_SM90_Q if quantized else _PREFILL_LARGE_SM90) if sm90_tiles
                    else _PREFILL_LARGE_SM80)
    max_fused = DECODE_FUSED_MAX_RANK_F32 if f32 else DECODE_FUSED_MAX_RANK
    shrink_in_loop = (r > 0 and decode and r_pad <= max_fused) or (batched and f16_fusable)
    cfg = dict(
        case="decode" if decode else ("batched-decode" if batched else "prefill"),
        shrink_in_loop=shrink_in_loop,
        R_PAD=r_pad,
        R_BLOCK=16,
        shrink=shrink_config(r_pad, decode, f32, m, k, sms) if r > 0 and not shrink_in_loop else None,
        **gemm,
    )
    limit = _SMEM.get(arch, _SMEM_DEFAULT) - 8192  # headroom for the epilogue's buffers
    elem = 4 if f32 else 2
    while cfg["num_stages"] > 2 and _smem_estimate(cfg, elem) > limit:
        cfg["num_stages"] -= 1
    return cfg


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Weight codes the kernels dequantize in the K-loop, given a per-output-channel scale.
QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)


def check_weight_scale(op: str, weight: torch.Tensor, weight_scale, n: int) -> None:
    """Validate a quantized weight and its scale (shared with ``lora_mixed``).

    Args:
        op: The op's name, for the messages.
        weight: The weight (float, or int8/float8_e4m3fn codes).
        weight_scale: ``(N,)`` or ``None``.
        n: Output features.

    Raises:
        TypeError: int8/fp8 codes without ``weight_scale``, a weight dtype the kernels
            cannot dequantize, or a non-float scale.
        ValueError: ``weight_scale`` not of shape ``(N,)``.
    """
    if weight_scale is None:
        if weight.dtype in QUANT_DTYPES:
            raise TypeError(f"{op}: weight is {weight.dtype} codes; pass their per-output-channel "
                            f"weight_scale ({n},) (dequantized W = weight * weight_scale[:, None]).")
        return
    if weight.dtype not in QUANT_DTYPES + _DTYPES:
        raise TypeError(f"{op}: weight_scale needs int8, float8_e4m3fn or float32/float16/bfloat16 "
                        f"weight codes, got {weight.dtype}.")
    if not weight_scale.is_floating_point():
        raise TypeError(f"{op}: weight_scale must be a float tensor, got {weight_scale.dtype}.")
    if weight.dtype == torch.float8_e4m3fn and weight.is_cuda and device_arch(weight.device) < 89:
        raise TypeError(f"{op}: float8 weight codes need an sm_89+ GPU (fp8 conversions); this one is "
                        f"sm_{device_arch(weight.device)}: use int8 codes or a dequantized weight.")
    if tuple(weight_scale.shape) != (n,):
        raise ValueError(f"{op}: weight_scale must have shape ({n},) (one scale per output feature), "
                         f"got {tuple(weight_scale.shape)}.")


def _check(x, weight, bias, lora_a, lora_b, lora_scale, l_in, l_out, weight_kn, col_scale=None,
           weight_scale=None) -> tuple[int, int, int]:
    """Validate shapes/dtypes; returns ``(K, N, R)``."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"lora_linear supports float32, float16 and bfloat16 inputs, got {x.dtype}.")
    if weight.dim() != 2:
        raise ValueError(f"lora_linear: weight must be 2-D, got shape {tuple(weight.shape)}.")
    k, n = (weight.shape[0], weight.shape[1]) if weight_kn else (weight.shape[1], weight.shape[0])
    check_weight_scale("lora_linear", weight, weight_scale, n)
    if x.shape[-1] != k:
        raise ValueError(f"lora_linear: x has {x.shape[-1]} features but weight expects {k}.")
    for name, t, size in (("bias", bias, n), ("l_in", l_in, k), ("l_out", l_out, n), ("col_scale", col_scale, n)):
        if t is not None and tuple(t.shape) != (size,):
            raise ValueError(f"lora_linear: {name} must have shape ({size},), got {tuple(t.shape)}.")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_linear: pass both lora_a and lora_b, or neither.")
    r = 0
    if lora_a is not None:
        r = lora_a.shape[0]
        if lora_a.dim() != 2 or lora_a.shape[1] != k:
            raise ValueError(f"lora_linear: lora_a must be (R, {k}), got {tuple(lora_a.shape)}.")
        if lora_b.dim() != 2 or tuple(lora_b.shape) != (n, r):
            raise ValueError(f"lora_linear: lora_b must be ({n}, {r}), got {tuple(lora_b.shape)}.")
        if r > MAX_RANK:
            raise ValueError(
                f"lora_linear supports a total rank up to {MAX_RANK}, got {r}; use the PyTorch path."
            )
        if lora_scale is not None and tuple(lora_scale.shape) != (r,):
            raise ValueError(f"lora_linear: lora_scale must have shape ({r},), got {tuple(lora_scale.shape)}.")
    rows = x.numel() // max(k, 1)
    if max(rows * max(k, n), weight.numel()) >= 2**31:
        # The kernels index with 32-bit offsets.
        raise ValueError("lora_linear: tensors of 2**31 elements or more are not supported; split the batch.")
    return k, n, r


_ARCH: dict = {}


def device_arch(device: torch.device) -> int:
    """Compute capability ``10 * major + minor`` of a CUDA device (cached), 90 otherwise.

    Args:
        device: The device the kernels run on.

    Returns:
        For example 80 (A100) or 90 (H100/H200); 90 on a CPU (the interpreter runs the
        sm_90 tiles).
    """
    if device.type != "cuda":
        return 90
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _ARCH:
        major, minor = torch.cuda.get_device_capability(idx)
        _ARCH[idx] = 10 * major + minor
    return _ARCH[idx]


def launch(x, weight, bias, lora_a, lora_b, lora_scale, l_in, l_out, weight_kn=False, config=None,
           col_scale=None, weight_scale=None):
    """Run the kernels (CUDA tensors, or CPU tensors under the interpreter).

    Args:
        config: Override of :func:`pick_config`'s choice (tests run every configuration).
        col_scale: DoRA's ``(N,)`` column scale, as in :func:`lora_linear`.
        weight_scale: As in :func:`lora_linear`.

    Returns:
        ``(..., N)`` in ``x.dtype``.
    """
    k, n, r = _check(x, weight, bias, lora_a, lora_b, lora_scale, l_in, l_out, weight_kn, col_scale,
                     weight_scale)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    if k == 0:  # no K-loop to run: the formula reduces to l_out ⊙ b
        return torch_lora_linear(x, weight, bias, lora_a, lora_b, lora_scale, l_in, l_out, weight_kn,
                                 col_scale, weight_scale)
    cfg = config if config is not None else pick_config(m, n, k, r, x.dtype, device_arch(x.device), programs_wanted(x.device),
                                                        weight.dtype in QUANT_DTYPES)
    # The GPU's branch under the interpreter too; UPCAST_DOT only widens its dot operands.
    dot_fp32 = x.dtype == torch.float32
    upcast = interpreted()
    has_lora = r > 0
    stride_wn, stride_wk = (weight.stride(1), weight.stride(0)) if weight_kn else weight.stride()
    dummy = y  # never read: the matching HAS_* constexpr is False
    h = dummy
    stride_hm = 0
    if has_lora and not cfg["shrink_in_loop"]:
        sc = cfg["shrink"]
        h = torch.empty((m, r), device=x.device, dtype=torch.float32)
        stride_hm = h.stride(0)
        block_r = min(sc.get("BLOCK_R", cfg["R_PAD"]), cfg["R_PAD"])
        tiles_m, tiles_r = triton.cdiv(m, sc["BLOCK_M"]), triton.cdiv(r, block_r)
        # The chunk from this call's K (a config may come from another shape).
        k_chunk = triton.cdiv(triton.cdiv(k, sc.get("SPLIT_K", 1)), sc["BLOCK_K"]) * sc["BLOCK_K"]
        split_k = triton.cdiv(k, k_chunk)
        ws = cnt = dummy
        if split_k > 1:
            ws = torch.empty((split_k, tiles_m * tiles_r, sc["BLOCK_M"], block_r),
                             device=x.device, dtype=torch.float32)
            # Fresh per call (concurrent streams never share them): one memset.
            cnt = torch.zeros(tiles_m * tiles_r, device=x.device, dtype=torch.int32)
        _lora_shrink_kernel[(tiles_r, tiles_m, split_k)](
            x2, lora_a, lora_scale if lora_scale is not None else dummy, h, ws, cnt,
            m, k, r, split_k, k_chunk,
            x2.stride(0), x2.stride(1), lora_a.stride(0), lora_a.stride(1),
            lora_scale.stride(0) if lora_scale is not None else 0, stride_hm,
            HAS_SCALE=lora_scale is not None,
            BLOCK_M=sc["BLOCK_M"], BLOCK_R=block_r, BLOCK_K=sc["BLOCK_K"], REDUCE=split_k > 1,
            DOT_FP32=dot_fp32, UPCAST_DOT=upcast,
            num_warps=sc["num_warps"], num_stages=sc["num_stages"],
        )  # fmt: skip
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _lora_linear_fwd_kernel[grid](
        x2, weight,
        weight_scale if weight_scale is not None else dummy,
        bias if bias is not None else dummy,
        lora_a if has_lora else dummy,
        lora_b if has_lora else dummy,
        lora_scale if lora_scale is not None else dummy,
        h,
        l_in if l_in is not None else dummy,
        l_out if l_out is not None else dummy,
        col_scale if col_scale is not None else dummy,
        y,
        m, n, k, r,
        x2.stride(0), x2.stride(1), stride_wn, stride_wk,
        weight_scale.stride(0) if weight_scale is not None else 0,
        bias.stride(0) if bias is not None else 0,
        lora_a.stride(0) if has_lora else 0, lora_a.stride(1) if has_lora else 0,
        lora_b.stride(0) if has_lora else 0, lora_b.stride(1) if has_lora else 0,
        lora_scale.stride(0) if lora_scale is not None else 0,
        stride_hm,
        l_in.stride(0) if l_in is not None else 0,
        l_out.stride(0) if l_out is not None else 0,
        col_scale.stride(0) if col_scale is not None else 0,
        y.stride(0),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        SHRINK_IN_LOOP=bool(cfg["shrink_in_loop"]) and has_lora,
        HAS_SCALE=lora_scale is not None,
        HAS_L_IN=l_in is not None, HAS_L_OUT=l_out is not None,
        HAS_COL_SCALE=col_scale is not None,
        W_SCALED=weight_scale is not None,
        R_PAD=cfg["R_PAD"], R_BLOCK=cfg["R_BLOCK"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], DOT_FP32=dot_fp32, UPCAST_DOT=upcast,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return y.reshape(*lead, n)


# ---------------------------------------------------------------------------------------
# Public op and its PyTorch reference
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("tinytune::lora_linear", mutates_args=())
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    lora_scale: Optional[torch.Tensor],
    l_in: Optional[torch.Tensor],
    l_out: Optional[torch.Tensor],
    weight_kn: bool = False,
    col_scale: Optional[torch.Tensor] = None,
    weight_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A linear layer with LoRA and IA³ in one pass (``torch.ops.tinytune.lora_linear``).

    ``y = l_out ⊙ (W (l_in ⊙ x) + b) + ((x Aᵀ) ⊙ s) Bᵀ``, fp32 accumulation. With
    ``col_scale`` ``g`` (DoRA): ``y = l_out ⊙ (g ⊙ W (l_in ⊙ x) + b) + g ⊙ ((x Aᵀ) ⊙ s) Bᵀ``,
    that is ``(W x + s·B·A x) ⊙ g + b`` without IA³.

    An int8 or float8_e4m3fn ``weight`` with ``weight_scale`` stands for
    ``W = weight ⊙ weight_scale[:, None]`` (weight-only quantization, one scale per output
    channel): the kernels read the codes at one byte each, convert them to the input's
    dtype inside the K-loop and scale the base accumulator in the epilogue, before the
    bias and the LoRA term. fp8 codes need an sm_89+ GPU (or the interpreter).

    Runs the Triton kernels on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU
    tensors; anywhere else (no Triton, CPU without the interpreter) it computes
    :func:`torch_lora_linear`, so it never fails for lack of a GPU. Grid and launches
    depend on shapes only (no host sync): safe inside CUDA graphs.

    Args:
        x: ``(..., K)`` float32/float16/bfloat16.
        weight: ``(N, K)``, or ``(K, N)`` when ``weight_kn`` (transformers' ``Conv1D``).
        bias: ``(N,)`` or ``None``.
        lora_a: ``(R, K)`` or ``None``: the active LoRAs' ``A``, concatenated along R
            (1 <= R <= 256); any float dtype.
        lora_b: ``(N, R)`` or ``None``: the matching ``B``, concatenated along R.
        lora_scale: ``(R,)`` or ``None`` (= 1): one scale per rank row.
        l_in: ``(K,)`` or ``None``: IA³ scale of the input features.
        l_out: ``(N,)`` or ``None``: IA³ scale of the output features.
        weight_kn: Whether ``weight`` is stored ``(K, N)``.
        col_scale: ``(N,)`` or ``None``: DoRA's per-output-column scale
            ``g = m / ‖W + s·B·A‖_row`` (any float dtype; fp32 recommended), applied to the
            base product and the LoRA term in the epilogue, not to the bias.
        weight_scale: ``(N,)`` float (fp32 preferred) or ``None``: the per-output-channel
            scale of int8/float8_e4m3fn ``weight`` codes (required for those).

    Returns:
        ``(..., N)`` in ``x.dtype``.

    Raises:
        TypeError: Unsupported dtype of ``x``; int8/fp8 codes without ``weight_scale``.
        ValueError: Inconsistent shapes, or a total rank above 256.
    """
    if HAS_TRITON and (x.is_cuda or (x.device.type == "cpu" and interpreted())):
        return launch(x, weight, bias, lora_a, lora_b, lora_scale, l_in, l_out, weight_kn,
                      col_scale=col_scale, weight_scale=weight_scale)
    _check(x, weight, bias, lora_a, lora_b, lora_scale, l_in, l_out, weight_kn, col_scale, weight_scale)
    return torch_lora_linear(x, weight, bias, lora_a, lora_b, lora_scale, l_in, l_out, weight_kn,
                             col_scale, weight_scale)


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, lora_scale, l_in, l_out, weight_kn=False, col_scale=None,
      weight_scale=None):
    n = weight.shape[1] if weight_kn else weight.shape[0]
    return x.new_empty((*x.shape[:-1], n))


def torch_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    lora_scale: Optional[torch.Tensor],
    l_in: Optional[torch.Tensor],
    l_out: Optional[torch.Tensor],
    weight_kn: bool = False,
    col_scale: Optional[torch.Tensor] = None,
    weight_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`lora_linear` (and its CPU fallback).

    Computes ``l_out ⊙ (W (l_in ⊙ x) + b) + ((x Aᵀ) ⊙ s) Bᵀ`` entirely in fp32 and
    returns it in ``x.dtype``; with ``col_scale`` ``g`` (DoRA),
    ``l_out ⊙ (g ⊙ W (l_in ⊙ x) + b) + g ⊙ ((x Aᵀ) ⊙ s) Bᵀ``; int8/fp8 codes are
    dequantized first (``W = weight ⊙ weight_scale[:, None]`` in fp32), then multiplied.
    Arguments and shapes as in :func:`lora_linear`.

    Returns:
        ``(..., N)`` in ``x.dtype``.
    """
    xf = x.float()
    xin = xf * l_in.float() if l_in is not None else xf
    w = weight.float()
    if weight_scale is not None:
        w = w * (weight_scale.float() if weight_kn else weight_scale.float()[:, None])
    y = xin @ w if weight_kn else xin @ w.t()
    g = col_scale.float() if col_scale is not None else None
    if g is not None:
        y = y * g
    if bias is not None:
        y = y + bias.float()
    if l_out is not None:
        y = y * l_out.float()
    if lora_a is not None and lora_b is not None and lora_a.shape[0] > 0:
        h = xf @ lora_a.float().t()
        if lora_scale is not None:
            h = h * lora_scale.float()
        lora = h @ lora_b.float().t()
        y = y + (lora * g if g is not None else lora)
    return y.to(x.dtype)
