"""The fused per-row adapted linear layer: ``torch.ops.tinytune.lora_mixed_linear``.

    y[i] = l_out[s] * (W (l_in[s] * x[i]) + b) + scale[s] * (x[i] A[s]^T) B[s]^T,   s = row_index[i]

The base GEMM, each row's LoRA at its slot's true rank and its IA³ scales, in two
launches, for any assignment of slots to rows. It takes the mixed-batch layout of
``tinytune.mixed_torch`` (the library's PyTorch path) unchanged:

* ``row_index``: ``(B,)`` int64, the *slot* of each batch row in the stacks. The last
  slot of every stack is the identity (zero LoRA factors, unit IA³ scales), so rows
  without an adapter or whose adapter has no layer on this module come out unchanged.
* LoRA: ``a_stack`` ``(S, r_max, in)`` and ``bt_stack`` ``(S, r_max, out)``, each
  adapter's ``A`` and ``B^T`` zero-padded to the largest rank at this module, and
  ``scale`` ``(S,)``; ``ranks`` ``(S,)`` int32, each slot's true rank (0 for the
  identity slot and slots without LoRA): the kernels never touch the padding.
* IA³: ``l_in_stack`` ``(S, in)`` and ``l_out_stack`` ``(S, out)``, ones in slots
  without an IA³ layer.
* DoRA: ``col_scale`` ``(S, out)``, each DoRA slot's column scale
  ``g[s] = m / ‖W + s·B·A‖_row`` (ones in other slots and the identity slot):
  ``y[i] = l_out[s] * (g[s] * W (l_in[s] * x[i]) + b) + g[s] * scale[s] * (x[i] A[s]^T) B[s]^T``,
  i.e. ``g[s] * (W x[i] + LoRA) + b`` for a DoRA row. The epilogue applies ``l_out``,
  adds the LoRA term, scales by ``g`` and adds the bias (constexpr ``HAS_COL_SCALE``).

Rows are batch dimension 0 of ``x``; all other leading dimensions (sequence, ...) are
tokens of that row.

``weight`` may be int8 or float8_e4m3fn codes with one scale per output channel
(``weight_scale``): both GEMM kernels read the codes at one byte each, convert them in
the K-loop and scale the base accumulator before the bias (``W_SCALED``), as
``lora_linear`` does.

This file holds, in order: the ``@triton.jit`` kernels, the launcher, the registered op
:func:`lora_mixed_linear` and its PyTorch reference and CPU path
:func:`torch_lora_mixed_linear`. The strategy and tile choices live in
``lora_mixed_plan.py``, the dot and epilogue helpers shared with ``lora_linear.py`` in
``triton_helpers.py``, the configurations the compile report builds in
``report_configs.py``.

This module imports torch (and triton, when present) only, never tinytune.
"""

from __future__ import annotations

from typing import Optional

import torch

from .lora_linear import QUANT_DTYPES, check_weight_scale, device_arch
from .lora_mixed_plan import (choose_strategy, k_splits, programs_wanted, rows_config, segment_tiles,
                              segments_config)
from .triton_helpers import add_h_bt, base_k_step, bias_and_l_out, col_scale_and_bias, dequant_scale, mma
from .triton_support import HAS_TRITON, is_interpreted, tl, triton

# segment_tiles is re-exported: callers that share one plan across layers build it with
# it (see segment_plan_key).
__all__ = ["lora_mixed_linear", "segment_plan_key", "segment_tiles", "torch_lora_mixed_linear",
           "triton_kernels"]


# ----------------------------------------------------------------------------------------
# Triton kernels
#
# Two strategies share one op (chosen by shape only, in choose_strategy):
#
# * "rows" (decode: few tokens, many distinct adapters). _shrink_rows_kernel computes
#   each token's h = scale[s] * x A[s]^T once, gathering its slot's A (split over K
#   so that even 64 tokens fill the GPU; partial sums go to a small fp32 buffer).
#   _mixed_rows_kernel then runs the base GEMM over contiguous token tiles (W is read
#   once per M-tile: once for the whole batch at decode) and adds h B[s]^T in the
#   epilogue, gathering the B^T rows of each token's slot. Both mask every rank row
#   at or past ranks[s], so padded ranks cost no bytes and identity rows (rank 0) load
#   no adapter data at all.
# * "segments" (prefill: many tokens). Tokens are grouped into adapter-homogeneous
#   tiles on the device (segment_tiles: stable sort of the rows by slot, counts by
#   scatter_add, cumsum; no host sync), at most cdiv(M, BLOCK_M) + S tiles, so the
#   grid depends only on shapes and the slot count. Each tile belongs to one slot:
#   _shrink_segments_kernel runs tl.dot(x, A[s]^T) per tile and rank block,
#   _mixed_segments_kernel runs the base GEMM on the tile's tokens and a real
#   tl.dot(h, B[s]^T) in its epilogue. Tiles past the real tile count, rank blocks past
#   a slot's rank and rank-0 tiles do no work (zero-trip loops, masked loads).
#
# IA³ runs in the same launches: l_in[s] scales the x tile inside the base K-loop,
# l_out[s] scales the base result in the epilogue (before the LoRA term is added).
#
# The base K-step, the bias/l_out epilogue and the dots are triton_helpers.py's, shared
# with lora_linear.py. DOT_FP32 (see there) is set when any operand is fp32 or the dtypes
# differ, on a GPU and under TRITON_INTERPRET=1 alike, which also runs the GPU's tiles
# and split-K (132 SMs); UPCAST_DOT (interpreter only) widens the 16-bit branch's dot
# operands and nothing else. LORA_FP32 is the same rule for the segments expand's B^T
# alone. Accumulation is fp32 everywhere.
# ----------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _shrink_rows_kernel(
        # pointers
        x_ptr,  # (B, T, K)
        a_ptr,  # (S, r_max, K)
        row_ptr,  # (B,) int64 slot per row
        rank_ptr,  # (S,) int32 true rank per slot
        scale_ptr,  # (S,) LoRA scale per slot (unused without HAS_SCALE)
        hp_ptr,  # (SPLIT, M, r_max) fp32 partial h, one K-chunk per split
        cnt_ptr,  # (N_CNT,) int32 split-K arrival counters of the GEMM that follows
        # sizes
        T,
        K,
        K_CHUNK,  # multiple of BLOCK_K: the K range of one split
        N_CNT,  # counters to zero (0: the GEMM does not split K)
        # strides
        stride_xb,
        stride_xt,
        stride_xk,
        stride_as,
        stride_ar,
        stride_ak,
        stride_hs,
        stride_hm,
        # meta
        HAS_SCALE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """hp[split, m, :rank] = scale[s] * x[m, chunk] A[s, :rank, chunk]^T, s = slot(m).

        One program per (token, K-chunk). Decode has one token per row, so there is no
        matrix to hand tl.dot: products are element-wise in fp32 and reduced along K.
        The rank loop stops at the slot's true rank (zero trips for rank-0 slots).
        """
        m = tl.program_id(0)
        split = tl.program_id(1)
        if (m == 0) & (split == 0):
            # Zero the next kernel's counters here: saves a memset in the decode chain.
            for c0 in range(0, N_CNT, 256):
                offs_c = c0 + tl.arange(0, 256)
                tl.store(cnt_ptr + offs_c, tl.zeros([256], dtype=tl.int32), mask=offs_c < N_CNT)
        b = m // T
        t = m % T
        s = tl.load(row_ptr + b)
        rank = tl.load(rank_ptr + s)
        k_lo = split * K_CHUNK
        k_hi = tl.minimum(K, k_lo + K_CHUNK)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + s).to(tl.float32)
        else:
            sc = 1.0
        x_row = x_ptr + b * stride_xb + t * stride_xt
        a_slot = a_ptr + s * stride_as
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            acc = tl.zeros([BLOCK_R], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_hi
                xv = tl.load(x_row + offs_k * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
                av = tl.load(
                    a_slot + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_mask[:, None] & k_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum(av * xv[None, :], axis=1)
            tl.store(hp_ptr + split * stride_hs + m * stride_hm + offs_r, acc * sc, mask=r_mask)

    @triton.jit
    def _gather_expand(acc, hp_ptr, bt_rows, rank, offs_m, m_mask, n_mask, r_lo, r_hi, SPLIT,
                       stride_hs, stride_hm, stride_br, BLOCK_M: tl.constexpr):
        """acc += h[:, r] B[s]^T[r, :] for r in [r_lo, r_hi), per token, its own slot s.

        h is summed over the shrink's K-splits on the fly; rows whose slot has a smaller
        rank (identity rows: rank 0) load nothing.
        """
        for r in range(r_lo, r_hi):
            live = m_mask & (r < rank)
            h = tl.zeros([BLOCK_M], dtype=tl.float32)
            for split in range(0, SPLIT):
                h += tl.load(hp_ptr + split * stride_hs + offs_m * stride_hm + r, mask=live, other=0.0)
            bv = tl.load(bt_rows + r * stride_br, mask=live[:, None] & n_mask[None, :], other=0.0)
            acc += h[:, None] * bv.to(tl.float32)
        return acc

    @triton.jit
    def _mixed_rows_kernel(
        # pointers
        x_ptr,  # (B, T, K)
        w_ptr,  # (N, K), or (K, N) with the strides swapped by the launcher
        wscale_ptr,  # (N,) contiguous scale of int8/fp8 W codes, read when W_SCALED
        bias_ptr,  # (N,)
        row_ptr,  # (B,) int64
        rank_ptr,  # (S,) int32
        bt_ptr,  # (S, r_max, N)
        hp_ptr,  # (SPLIT, M, r_max) fp32 from _shrink_rows_kernel
        lin_ptr,  # (S, K)
        lout_ptr,  # (S, N)
        col_ptr,  # (S, N) DoRA column scales, read when HAS_COL_SCALE
        y_ptr,  # (B, T, N)
        ws_ptr,  # (SPLIT_K, tiles, BLOCK_M, BLOCK_N) fp32 partial tiles (SPLIT_K > 1)
        cnt_ptr,  # (tiles,) int32 arrivals per output tile, zero at launch
        # sizes
        M,
        N,
        K,
        T,
        SPLIT,
        K_CHUNK,  # multiple of BLOCK_K: the K range of one split of the base GEMM
        # strides
        stride_xb,
        stride_xt,
        stride_xk,
        stride_wn,
        stride_wk,
        stride_bs,
        stride_br,
        stride_bn,
        stride_hs,
        stride_hm,
        stride_lis,
        stride_lik,
        stride_los,
        stride_lon,
        stride_cs,
        stride_cn,
        stride_yb,
        stride_yt,
        stride_yn,
        # meta
        HAS_BIAS: tl.constexpr,
        HAS_LORA: tl.constexpr,
        HAS_L_IN: tl.constexpr,
        HAS_L_OUT: tl.constexpr,
        HAS_COL_SCALE: tl.constexpr,
        W_SCALED: tl.constexpr,
        DOT_FP32: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        SPLIT_K: tl.constexpr,
        SPREAD_LORA: tl.constexpr,  # each K-split adds a rank slice (needs no l_out)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """y = l_out[s] * (W (l_in[s] * x) + b) + h B[s]^T per token, s = slot(token);
        with HAS_COL_SCALE, y = l_out[s] * (g[s] * W (l_in[s] * x) + b) + g[s] * h B[s]^T.

        Tiles are contiguous tokens (any mix of slots), so W is streamed once per M-tile.
        At decode there are few output tiles, so the K range is split over SPLIT_K
        programs (serial split-K): each stores its fp32 partial tile, and the last to
        arrive at a tile's counter sums them and runs the epilogue. That keeps every SM streaming W, and each program reads only its K-chunk
        of x (x re-reads from L2 would otherwise cost more than W itself).
        The expand walks the rank up to the largest true rank in the tile (split over the
        K-splits when there is no l_out, else after the reduction), gathering
        row r of each token's B[s]^T (tokens of one slot share the cache lines; tokens
        whose slot is shorter, and identity tokens, load nothing).
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        split_id = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        b = offs_m // T
        t = offs_m % T
        s = tl.load(row_ptr + b, mask=m_mask, other=0)
        x_rows = x_ptr + b[:, None] * stride_xb + t[:, None] * stride_xt
        k_lo = split_id * K_CHUNK
        k_hi = tl.minimum(K, k_lo + K_CHUNK)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            acc, _ = base_k_step(acc, x_rows + offs_k[None, :] * stride_xk, m_mask, k_mask,
                                 w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                                 n_mask,
                                 lin_ptr + s[:, None] * stride_lis + offs_k[None, :] * stride_lik,
                                 m_mask[:, None] & k_mask[None, :], HAS_L_IN, DOT_FP32,
                                 UPCAST_DOT, W_SCALED)
        if W_SCALED:
            # per partial tile, before SPREAD_LORA adds LoRA rank slices to it
            acc = dequant_scale(acc, wscale_ptr, offs_n, 1, n_mask)
        if HAS_LORA:
            rank = tl.load(rank_ptr + s, mask=m_mask, other=0)
            r_top = tl.max(rank, axis=0)
            bt_rows = bt_ptr + s[:, None] * stride_bs + offs_n[None, :] * stride_bn
        if SPREAD_LORA:
            # The expand is linear: without l_out it can go into the partial tiles, a
            # slice of the rank per K-split, instead of all of it after the reduction.
            per = (r_top + SPLIT_K - 1) // SPLIT_K
            r_lo = split_id * per
            acc = _gather_expand(acc, hp_ptr, bt_rows, rank, offs_m, m_mask, n_mask, r_lo,
                                 tl.minimum(r_top, r_lo + per), SPLIT, stride_hs, stride_hm,
                                 stride_br, BLOCK_M)
        last = True
        if SPLIT_K > 1:
            tiles = tl.num_programs(0) * tl.num_programs(1)
            tile = pid_m * tl.num_programs(1) + pid_n
            offs_t = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            tile_ws = ws_ptr + tile * (BLOCK_M * BLOCK_N) + offs_t
            tl.store(tile_ws + split_id * tiles * (BLOCK_M * BLOCK_N), acc)
            # Every thread's partial is stored before one thread's release-atomic
            # publishes the arrival (the CUTLASS semaphore pattern).
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            last = arrived == SPLIT_K - 1
            if last:
                tl.debug_barrier()
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for j in range(0, SPLIT_K):
                    # .cg: read the other programs' partials from L2, never a stale L1
                    acc += tl.load(tile_ws + j * tiles * (BLOCK_M * BLOCK_N), cache_modifier=".cg")
        if last:
            # bias: contiguous (the launcher makes it so); held back with HAS_COL_SCALE
            acc = bias_and_l_out(acc, bias_ptr, 1, offs_n, n_mask,
                                 lout_ptr, s[:, None], stride_los, stride_lon,
                                 m_mask[:, None] & n_mask[None, :],
                                 HAS_BIAS and not HAS_COL_SCALE, HAS_L_OUT)
            if HAS_LORA:
                if not SPREAD_LORA:
                    acc = _gather_expand(acc, hp_ptr, bt_rows, rank, offs_m, m_mask, n_mask, 0,
                                         r_top, SPLIT, stride_hs, stride_hm, stride_br, BLOCK_M)
            if HAS_COL_SCALE:
                acc = col_scale_and_bias(acc, col_ptr, stride_cs, stride_cn, bias_ptr, 1, offs_n,
                                         n_mask, lout_ptr, s.to(tl.int32)[:, None], stride_los, stride_lon,
                                         m_mask[:, None] & n_mask[None, :], HAS_BIAS, HAS_L_OUT)
            tl.store(
                y_ptr + b[:, None] * stride_yb + t[:, None] * stride_yt + offs_n[None, :] * stride_yn,
                acc.to(y_ptr.dtype.element_ty),
                mask=m_mask[:, None] & n_mask[None, :],
            )

    @triton.jit
    def _shrink_segments_kernel(
        # pointers
        x_ptr,  # (B, T, K)
        a_ptr,  # (S, r_max, K)
        tiles_ptr,  # (3, NT) int32: slot, first and end sorted position of each tile
        order_ptr,  # (B,) int64 rows sorted by slot
        rank_ptr,  # (S,) int32
        scale_ptr,  # (S,)
        h_ptr,  # (M, r_max) fp32, in sorted token order
        # sizes
        T,
        K,
        NT,
        # strides
        stride_xb,
        stride_xt,
        stride_xk,
        stride_as,
        stride_ar,
        stride_ak,
        stride_hm,
        # meta
        HAS_SCALE: tl.constexpr,
        DOT_FP32: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """h[p, r-block] = scale[s] * x[tok(p)] A[s, r-block]^T for one slot-homogeneous tile.

        Grid (NT, cdiv(r_max, BLOCK_R)): rank blocks at or past the slot's rank, empty
        tiles and rank-0 slots run zero K iterations.
        """
        tile = tl.program_id(0)
        r0 = tl.program_id(1) * BLOCK_R
        s = tl.load(tiles_ptr + tile)
        start = tl.load(tiles_ptr + NT + tile)
        end = tl.load(tiles_ptr + 2 * NT + tile)
        rank = tl.load(rank_ptr + s)
        k_end = tl.where((r0 < rank) & (start < end), K, 0)
        offs_p = start + tl.arange(0, BLOCK_M)
        p_mask = offs_p < end
        row = tl.load(order_ptr + offs_p // T, mask=p_mask, other=0)
        t = offs_p % T
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        x_rows = x_ptr + row[:, None] * stride_xb + t[:, None] * stride_xt
        a_cols = a_ptr + s * stride_as + offs_r[None, :] * stride_ar
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xv = tl.load(
                x_rows + offs_k[None, :] * stride_xk,
                mask=p_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            av = tl.load(
                a_cols + offs_k[:, None] * stride_ak,
                mask=k_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            acc = mma(xv, av, acc, DOT_FP32, UPCAST_DOT)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + s).to(tl.float32)
        tl.store(
            h_ptr + offs_p[:, None] * stride_hm + offs_r[None, :],
            acc,
            mask=p_mask[:, None] & r_mask[None, :],
        )

    @triton.jit
    def _mixed_segments_kernel(
        # pointers
        x_ptr,  # (B, T, K)
        w_ptr,  # (N, K), or (K, N) with the strides swapped by the launcher
        wscale_ptr,  # (N,) contiguous scale of int8/fp8 W codes, read when W_SCALED
        bias_ptr,  # (N,)
        tiles_ptr,  # (3, NT) int32
        order_ptr,  # (B,) int64
        rank_ptr,  # (S,) int32
        bt_ptr,  # (S, r_max, N)
        h_ptr,  # (M, r_max) fp32 from _shrink_segments_kernel
        lin_ptr,  # (S, K)
        lout_ptr,  # (S, N)
        col_ptr,  # (S, N) DoRA column scales, read when HAS_COL_SCALE
        y_ptr,  # (B, T, N)
        # sizes
        N,
        K,
        T,
        NT,
        # strides
        stride_xb,
        stride_xt,
        stride_xk,
        stride_wn,
        stride_wk,
        stride_bs,
        stride_br,
        stride_bn,
        stride_hm,
        stride_lis,
        stride_lik,
        stride_los,
        stride_lon,
        stride_cs,
        stride_cn,
        stride_yb,
        stride_yt,
        stride_yn,
        # meta
        HAS_BIAS: tl.constexpr,
        HAS_LORA: tl.constexpr,
        HAS_L_IN: tl.constexpr,
        HAS_L_OUT: tl.constexpr,
        HAS_COL_SCALE: tl.constexpr,
        W_SCALED: tl.constexpr,
        DOT_FP32: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        LORA_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """y = l_out[s] * (W (l_in[s] * x) + b) + h B[s]^T for one slot-homogeneous tile
        (with HAS_COL_SCALE: l_out[s] * (g[s] * W (l_in[s] * x) + b) + g[s] * h B[s]^T).

        The tile's tokens are gathered through the sorted row order and written back to
        their own places; the slot is one scalar, so IA³ scales are vectors and the LoRA
        epilogue is tl.dot(h, B[s]^T) over rank blocks up to the slot's rank.
        """
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        s = tl.load(tiles_ptr + tile)
        start = tl.load(tiles_ptr + NT + tile)
        end = tl.load(tiles_ptr + 2 * NT + tile)
        k_end = tl.where(start < end, K, 0)
        offs_p = start + tl.arange(0, BLOCK_M)
        p_mask = offs_p < end
        row = tl.load(order_ptr + offs_p // T, mask=p_mask, other=0)
        t = offs_p % T
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        x_rows = x_ptr + row[:, None] * stride_xb + t[:, None] * stride_xt
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            acc, _ = base_k_step(acc, x_rows + offs_k[None, :] * stride_xk, p_mask, k_mask,
                                 w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                                 n_mask, lin_ptr + s * stride_lis + offs_k * stride_lik, k_mask,
                                 HAS_L_IN, DOT_FP32, UPCAST_DOT, W_SCALED)
        if W_SCALED:
            acc = dequant_scale(acc, wscale_ptr, offs_n, 1, n_mask)
        # bias: contiguous (the launcher makes it so); held back with HAS_COL_SCALE
        acc = bias_and_l_out(acc, bias_ptr, 1, offs_n, n_mask, lout_ptr, s, stride_los, stride_lon,
                             n_mask, HAS_BIAS and not HAS_COL_SCALE, HAS_L_OUT)
        if HAS_LORA:
            rank = tl.where(start < end, tl.load(rank_ptr + s), 0)
            for r0 in range(0, rank, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_mask = offs_r < rank
                acc = add_h_bt(acc, h_ptr + offs_p[:, None] * stride_hm, p_mask, offs_r, r_mask,
                               bt_ptr, s, stride_bs, stride_br, offs_n, stride_bn, n_mask,
                               x_ptr.dtype.element_ty, LORA_FP32, UPCAST_DOT)
        if HAS_COL_SCALE:
            acc = col_scale_and_bias(acc, col_ptr, stride_cs, stride_cn, bias_ptr, 1, offs_n, n_mask,
                                     lout_ptr, s, stride_los, stride_lon, n_mask, HAS_BIAS, HAS_L_OUT)
        tl.store(
            y_ptr + row[:, None] * stride_yb + t[:, None] * stride_yt + offs_n[None, :] * stride_yn,
            acc.to(y_ptr.dtype.element_ty),
            mask=p_mask[:, None] & n_mask[None, :],
        )


# ----------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------
def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (decided when they were defined)."""
    return HAS_TRITON and is_interpreted(_mixed_rows_kernel)


def triton_kernels() -> dict:
    """This op's ``@triton.jit`` kernels by name, for ahead-of-time compiles
    (``report_configs.py``); empty without Triton."""
    if not HAS_TRITON:
        return {}
    kernels = (_shrink_rows_kernel, _mixed_rows_kernel, _shrink_segments_kernel, _mixed_segments_kernel)
    return {f.__name__: f for f in kernels}


def _can_launch(x: torch.Tensor) -> bool:
    if not HAS_TRITON or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    return x.is_cuda or (x.device.type == "cpu" and interpreted())


def _check_inputs(x, weight, bias, row_index, a_stack, bt_stack, scale, ranks, l_in_stack,
                  l_out_stack, weight_kn, col_scale=None, weight_scale=None) -> None:
    """Shape checks shared by both paths (values are not checked: that needs a sync)."""
    def bad(what: str) -> ValueError:
        return ValueError(f"lora_mixed_linear: {what}")

    if x.dim() < 2:
        raise bad(f"x must be (rows, ..., in_features), got shape {tuple(x.shape)}.")
    b, k = x.shape[0], x.shape[-1]
    if weight.dim() != 2:
        raise bad(f"weight must be 2-D, got shape {tuple(weight.shape)}.")
    n = weight.shape[1] if weight_kn else weight.shape[0]
    if (weight.shape[0] if weight_kn else weight.shape[1]) != k:
        layout = "(in, out) (weight_kn=True)" if weight_kn else "(out, in)"
        raise bad(f"weight {tuple(weight.shape)} is not {layout} for x with {k} input features.")
    check_weight_scale("lora_mixed_linear", weight, weight_scale, n)
    if bias is not None and tuple(bias.shape) != (n,):
        raise bad(f"bias must have shape ({n},), got {tuple(bias.shape)}.")
    if row_index.dim() != 1 or row_index.shape[0] != b:
        raise bad(f"row_index must have shape ({b},) (one slot per row), got {tuple(row_index.shape)}.")
    if (a_stack is None) != (bt_stack is None):
        raise bad("give both a_stack and bt_stack, or neither.")
    slots = None
    expected = {"a_stack": ("slots", "r_max", k), "bt_stack": ("slots", "r_max", n),
                "scale": ("slots",), "ranks": ("slots",), "l_in_stack": ("slots", k),
                "l_out_stack": ("slots", n), "col_scale": ("slots", n)}
    given = {"a_stack": a_stack, "bt_stack": bt_stack, "scale": scale, "ranks": ranks,
             "l_in_stack": l_in_stack, "l_out_stack": l_out_stack, "col_scale": col_scale}
    for name, t in given.items():
        if t is None:
            continue
        want = expected[name]
        fixed = [i for i, w in enumerate(want) if isinstance(w, int)]
        if t.dim() != len(want) or any(t.shape[i] != want[i] for i in fixed):
            shape = "(" + ", ".join(map(str, want)) + ")"
            raise bad(f"{name} has shape {tuple(t.shape)}; expected {shape} for this layer.")
        if slots is not None and t.shape[0] != slots:
            raise bad(f"{name} has {t.shape[0]} slots but another stack has {slots}.")
        slots = t.shape[0]
    if a_stack is not None and bt_stack.shape[1] != a_stack.shape[1]:
        raise bad(f"a_stack and bt_stack must pad to the same rank, got {a_stack.shape[1]} and {bt_stack.shape[1]}.")


def _max_offset(t: Optional[torch.Tensor]) -> int:
    """The largest element offset a kernel computes into ``t`` (32-bit in the kernels)."""
    if t is None or t.numel() == 0:
        return 0
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _stack_facts(a_stack, bt_stack, scale, ranks, l_in_stack, l_out_stack, col_scale=None) -> tuple:
    """``(has_lora, r_max, slots)`` of a call's stacks."""
    has_lora = a_stack is not None and bt_stack is not None and a_stack.shape[1] > 0
    r_max = a_stack.shape[1] if has_lora else 0
    stacks = [t for t in (a_stack, l_in_stack, l_out_stack, scale, ranks, col_scale) if t is not None]
    return has_lora, r_max, stacks[0].shape[0] if stacks else 1


def _dot_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if weight.dtype in QUANT_DTYPES:  # codes become x's dtype in the K-loop
        weight = x
    # The same rule on a GPU and under the interpreter (which then runs the 16-bit
    # branch, UPCAST_DOT emulating only its dots' arithmetic).
    return x.dtype == torch.float32 or weight.dtype != x.dtype


def segment_plan_key(
    x: torch.Tensor,
    weight: torch.Tensor,
    a_stack: Optional[torch.Tensor],
    bt_stack: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    ranks: Optional[torch.Tensor],
    l_in_stack: Optional[torch.Tensor],
    l_out_stack: Optional[torch.Tensor],
    weight_kn: bool = False,
    col_scale: Optional[torch.Tensor] = None,
) -> Optional[tuple]:
    """What the segment plan of this call would be built from, if the kernels run the
    "segments" strategy: ``(slots, tokens, block_m)`` for ``segment_tiles``, else
    ``None``. Shapes only (no sync).

    A caller running many layers on one row assignment builds the plan once per key
    (``segment_tiles(row_index, *key)``) and passes it to :func:`lora_mixed_linear`
    (``seg_tiles``, ``seg_order``), instead of every layer planning again.

    Args:
        x: As in :func:`lora_mixed_linear`.
        weight: As in :func:`lora_mixed_linear`.
        a_stack: As in :func:`lora_mixed_linear`.
        bt_stack: As in :func:`lora_mixed_linear`.
        scale: As in :func:`lora_mixed_linear`.
        ranks: As in :func:`lora_mixed_linear`.
        l_in_stack: As in :func:`lora_mixed_linear`.
        l_out_stack: As in :func:`lora_mixed_linear`.
        weight_kn: As in :func:`lora_mixed_linear`.
        col_scale: As in :func:`lora_mixed_linear`.

    Returns:
        ``(slots, tokens, block_m)`` or ``None`` (the "rows" strategy, or no kernels).
    """
    if not _can_launch(x) or x.dim() < 2 or x.numel() == 0 or x.shape[-1] == 0:
        return None
    if all(t is None for t in (a_stack, scale, ranks, l_in_stack, l_out_stack, col_scale)):
        return None  # nothing per row: the launcher plans nothing either
    b, k = x.shape[0], x.shape[-1]
    n = weight.shape[1] if weight_kn else weight.shape[0]
    tokens = x.numel() // (b * k)
    has_lora, r_max, slots = _stack_facts(a_stack, bt_stack, scale, ranks, l_in_stack, l_out_stack,
                                          col_scale)
    elem = a_stack.element_size() if has_lora else x.element_size()
    if choose_strategy(b * tokens, n, k, r_max, slots, elem) != "segments":
        return None
    cfg = segments_config(_dot_fp32(x, weight), r_max)
    return slots, tokens, cfg["BLOCK_M"]


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    row_index: torch.Tensor,
    a_stack: Optional[torch.Tensor],
    bt_stack: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    ranks: Optional[torch.Tensor],
    l_in_stack: Optional[torch.Tensor],
    l_out_stack: Optional[torch.Tensor],
    weight_kn: bool = False,
    strategy: Optional[str] = None,
    seg_tiles: Optional[torch.Tensor] = None,
    seg_order: Optional[torch.Tensor] = None,
    sms: Optional[int] = None,
    col_scale: Optional[torch.Tensor] = None,
    weight_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run the fused kernels (``strategy`` forces "rows" or "segments"; tests use it;
    ``seg_tiles``/``seg_order``: a segment plan built by the caller, see
    :func:`segment_plan_key`; ``sms``: the programs that fill the GPU, for the decode
    GEMM's split-K, by default the device's SM count, 132 on a CPU; ``col_scale`` and
    ``weight_scale``: as in :func:`lora_mixed_linear`)."""
    b, k = x.shape[0], x.shape[-1]
    n = weight.shape[1] if weight_kn else weight.shape[0]
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if y.numel() == 0 or k == 0:
        y.copy_(torch_lora_mixed_linear(x, weight, bias, row_index, a_stack, bt_stack, scale,
                                        ranks, l_in_stack, l_out_stack, weight_kn, col_scale, weight_scale))
        return y
    x3 = x.reshape(b, -1, k)
    y3 = y.view(b, -1, n)
    if max(map(_max_offset, (x3, y3, weight, a_stack, bt_stack, l_in_stack, l_out_stack, col_scale))) >= 2**31:
        # The kernels index with 32-bit offsets.
        raise ValueError("lora_mixed_linear: tensors of 2**31 elements or more are not "
                         "supported by the kernels; split the batch.")
    tokens = x3.shape[1]
    m = b * tokens
    has_lora, r_max, slots = _stack_facts(a_stack, bt_stack, scale, ranks, l_in_stack, l_out_stack,
                                          col_scale)
    # The kernels index the 1-D vectors (row_index, ranks, scale, bias) with unit stride:
    # a strided view is copied (a no-op for the contiguous vectors the library passes).
    row_index = row_index.to(device=x.device, dtype=torch.long).contiguous()
    if not any(t is not None for t in (a_stack, l_in_stack, l_out_stack, scale, ranks, col_scale)):
        # nothing per row: every row is in the one (identity) slot
        row_index = torch.zeros_like(row_index)
    if has_lora:
        ranks = (torch.full((slots,), r_max, dtype=torch.int32, device=x.device)
                 if ranks is None else ranks.to(device=x.device, dtype=torch.int32).contiguous())
    scale = scale.contiguous() if scale is not None else None
    bias = bias.contiguous() if bias is not None else None
    w_scale = weight_scale.contiguous() if weight_scale is not None else y  # y: never read
    dummy = y  # stands for absent tensors; the kernels never read it (constexpr flags)
    a = a_stack if has_lora else dummy
    bt = bt_stack if has_lora else dummy
    rk = ranks if has_lora else row_index
    sc = scale if scale is not None else dummy
    lin = l_in_stack if l_in_stack is not None else dummy
    lout = l_out_stack if l_out_stack is not None else dummy
    col = col_scale if col_scale is not None else dummy
    bias_t = bias if bias is not None else dummy
    if weight_kn:
        stride_wk, stride_wn = weight.stride(0), weight.stride(1)
    else:
        stride_wn, stride_wk = weight.stride(0), weight.stride(1)
    a_strides = a.stride() if has_lora else (0, 0, 0)
    bt_strides = bt.stride() if has_lora else (0, 0, 0)
    lin_strides = lin.stride() if l_in_stack is not None else (0, 0)
    lout_strides = lout.stride() if l_out_stack is not None else (0, 0)
    col_strides = col.stride() if col_scale is not None else (0, 0)
    interp = interpreted()
    dot_fp32 = _dot_fp32(x, weight)
    lora_fp32 = has_lora and (bt.dtype == torch.float32 or bt.dtype != x.dtype)
    shrink_fp32 = has_lora and (a.dtype == torch.float32 or a.dtype != x.dtype)
    if strategy is None:
        elem = a.element_size() if has_lora else x.element_size()
        strategy = choose_strategy(m, n, k, r_max, slots, elem)
    flags = dict(HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_L_IN=l_in_stack is not None,
                 HAS_L_OUT=l_out_stack is not None, HAS_COL_SCALE=col_scale is not None,
                 W_SCALED=weight_scale is not None)
    if strategy == "rows":
        cfg = rows_config(m, dot_fp32, weight.dtype in QUANT_DTYPES, device_arch(x.device))
        tiles_m, tiles_n = triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"])
        split_k, gemm_chunk = k_splits(tiles_m * tiles_n, k, cfg["BLOCK_K"],
                                       sms if sms is not None else programs_wanted(x.device))
        ws = cnt = dummy
        if split_k > 1:
            ws = torch.empty((split_k, tiles_m * tiles_n, cfg["BLOCK_M"], cfg["BLOCK_N"]),
                             dtype=torch.float32, device=x.device)
            # Arrival counters, fresh per call (so concurrent streams never share them):
            # the shrink kernel zeroes them, or a memset when there is no shrink.
            cnt = (torch.empty if has_lora else torch.zeros)(
                tiles_m * tiles_n, dtype=torch.int32, device=x.device)
        split, k_chunk = 1, k
        hp = dummy
        hp_strides = (0, 0)
        if has_lora:
            # Enough (token, K-chunk) programs to fill ~264 SMs-worth of work at decode.
            split = max(1, min(triton.cdiv(264, m), triton.cdiv(k, cfg["SHRINK_K"])))
            k_chunk = triton.cdiv(triton.cdiv(k, split), cfg["SHRINK_K"]) * cfg["SHRINK_K"]
            split = triton.cdiv(k, k_chunk)
            hp = torch.empty((split, m, r_max), dtype=torch.float32, device=x.device)
            hp_strides = (hp.stride(0), hp.stride(1))
            _shrink_rows_kernel[(m, split)](
                x3, a, row_index, rk, sc, hp, cnt,
                tokens, k, k_chunk, tiles_m * tiles_n if split_k > 1 else 0,
                *x3.stride(), *a_strides, *hp_strides,
                HAS_SCALE=scale is not None, BLOCK_R=cfg["SHRINK_R"], BLOCK_K=cfg["SHRINK_K"],
                num_warps=4,
            )
        _mixed_rows_kernel[(tiles_m, tiles_n, split_k)](
            x3, weight, w_scale, bias_t, row_index, rk, bt, hp, lin, lout, col, y3, ws, cnt,
            m, n, k, tokens, split, gemm_chunk,
            *x3.stride(), stride_wn, stride_wk, *bt_strides, *hp_strides,
            *lin_strides, *lout_strides, *col_strides, *y3.stride(),
            **flags, DOT_FP32=dot_fp32, UPCAST_DOT=interp, SPLIT_K=split_k,
            SPREAD_LORA=has_lora and split_k > 1 and l_out_stack is None,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return y
    if strategy != "segments":
        raise ValueError(f"strategy must be 'rows' or 'segments', got {strategy!r}")
    cfg = segments_config(dot_fp32, r_max, weight.dtype in QUANT_DTYPES)
    if seg_tiles is not None and seg_order is not None and seg_tiles.shape[1] == (
        triton.cdiv(m, cfg["BLOCK_M"]) + slots
    ):
        # The caller's plan, built once per forward for every layer (see segment_plan_key).
        tiles, order = seg_tiles, seg_order
    else:
        tiles, order = segment_tiles(row_index, slots, tokens, cfg["BLOCK_M"])
    nt = tiles.shape[1]
    h = dummy
    h_stride = 0
    if has_lora:
        h = torch.empty((m, r_max), dtype=torch.float32, device=x.device)
        h_stride = h.stride(0)
        _shrink_segments_kernel[(nt, triton.cdiv(r_max, cfg["BLOCK_R"]))](
            x3, a, tiles, order, rk, sc, h,
            tokens, k, nt,
            *x3.stride(), *a_strides, h_stride,
            HAS_SCALE=scale is not None, DOT_FP32=shrink_fp32, UPCAST_DOT=interp,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=4, num_stages=cfg["num_stages"],
        )
    _mixed_segments_kernel[(nt, triton.cdiv(n, cfg["BLOCK_N"]))](
        x3, weight, w_scale, bias_t, tiles, order, rk, bt, h, lin, lout, col, y3,
        n, k, tokens, nt,
        *x3.stride(), stride_wn, stride_wk, *bt_strides, h_stride,
        *lin_strides, *lout_strides, *col_strides, *y3.stride(),
        **flags, DOT_FP32=dot_fp32, LORA_FP32=lora_fp32, UPCAST_DOT=interp,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=cfg["BLOCK_R"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


@torch.library.custom_op("tinytune::lora_mixed_linear", mutates_args=())
def lora_mixed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    row_index: torch.Tensor,
    a_stack: Optional[torch.Tensor],
    bt_stack: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    ranks: Optional[torch.Tensor],
    l_in_stack: Optional[torch.Tensor],
    l_out_stack: Optional[torch.Tensor],
    weight_kn: bool = False,
    seg_tiles: Optional[torch.Tensor] = None,
    seg_order: Optional[torch.Tensor] = None,
    col_scale: Optional[torch.Tensor] = None,
    weight_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused adapted linear layer with one adapter slot per batch row.

    ``y[i] = l_out[s] * (W (l_in[s] * x[i]) + b) + scale[s] * (x[i] A[s]^T) B[s]^T`` with
    ``s = row_index[i]`` (with ``col_scale`` ``g``: ``l_out[s] * (g[s] * W (l_in[s] * x[i])
    + b) + g[s] * scale[s] * (x[i] A[s]^T) B[s]^T``, DoRA's ``g[s] * (W x[i] + LoRA) + b``
    for a row without IA³): the base GEMM, the row's LoRA at its true rank and its IA³
    scales in two kernel launches (shrink, then base GEMM with the expand in its
    epilogue), whatever the assignment. Runs the Triton kernels on CUDA tensors (and on
    CPU tensors under ``TRITON_INTERPRET=1``); elsewhere it runs
    :func:`torch_lora_mixed_linear`. Registered as ``torch.ops.tinytune.lora_mixed_linear``.

    Args:
        x: ``(B, ..., K)`` fp32/fp16/bf16; rows are dimension 0.
        weight: ``(N, K)``, or ``(K, N)`` when ``weight_kn`` (``Conv1D``).
        bias: ``(N,)`` or ``None``.
        row_index: ``(B,)`` int64 slot of each row, in ``[0, S)`` (not checked on the
            device: checking would need a host sync).
        a_stack: ``(S, r_max, K)`` or ``None``.
        bt_stack: ``(S, r_max, N)`` or ``None``.
        scale: ``(S,)`` or ``None``.
        ranks: ``(S,)`` int32 true ranks (0: no LoRA in that slot) or ``None`` (all
            ``r_max``).
        l_in_stack: ``(S, K)`` or ``None``.
        l_out_stack: ``(S, N)`` or ``None``.
        weight_kn: Whether ``weight`` is stored ``(K, N)``.
        seg_tiles: ``(3, NT)`` int32, the tiles of the segment plan
            ``segment_tiles(row_index, *key)`` for ``key = segment_plan_key(...)`` of this
            call, built once and shared by every layer of a forward; ``None`` (or a plan
            of another shape): the plan is built here.
        seg_order: ``(B,)`` int64, that plan's row order (with ``seg_tiles``).
        col_scale: ``(S, N)`` or ``None``: each slot's DoRA column scale
            ``m / ‖W + s·B·A‖_row``; ones in slots without DoRA and in the identity slot
            (``__base__`` rows are then unscaled). Any float dtype.
        weight_scale: ``(N,)`` float or ``None``: the per-output-channel scale of
            int8/float8_e4m3fn ``weight`` codes (required for those), which stand for
            ``W = weight ⊙ weight_scale[:, None]``; read at one byte each and dequantized
            inside the kernels' K-loop (fp8 needs an sm_89+ GPU or the interpreter).

    Returns:
        ``(B, ..., N)`` in ``x.dtype``.

    Raises:
        ValueError: If the shapes do not fit together, or (kernels only) a tensor spans
            2**31 elements or more.
        TypeError: int8/fp8 codes without ``weight_scale``, or a scale that is not float.
    """
    _check_inputs(x, weight, bias, row_index, a_stack, bt_stack, scale, ranks, l_in_stack,
                  l_out_stack, weight_kn, col_scale, weight_scale)
    if _can_launch(x):
        return launch(x, weight, bias, row_index, a_stack, bt_stack, scale, ranks,
                       l_in_stack, l_out_stack, weight_kn, seg_tiles=seg_tiles,
                       seg_order=seg_order, col_scale=col_scale, weight_scale=weight_scale)
    return torch_lora_mixed_linear(
        x, weight, bias, row_index, a_stack, bt_stack, scale, ranks, l_in_stack, l_out_stack, weight_kn,
        col_scale, weight_scale,
    )


@lora_mixed_linear.register_fake
def _(x, weight, bias, row_index, a_stack, bt_stack, scale, ranks, l_in_stack, l_out_stack, weight_kn=False,
      seg_tiles=None, seg_order=None, col_scale=None, weight_scale=None):
    n = weight.shape[1] if weight_kn else weight.shape[0]
    return x.new_empty((*x.shape[:-1], n))


# ----------------------------------------------------------------------------------------
# the PyTorch reference (and CPU path)
# ----------------------------------------------------------------------------------------
def torch_lora_mixed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    row_index: torch.Tensor,
    a_stack: Optional[torch.Tensor],
    bt_stack: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    ranks: Optional[torch.Tensor],
    l_in_stack: Optional[torch.Tensor],
    l_out_stack: Optional[torch.Tensor],
    weight_kn: bool = False,
    col_scale: Optional[torch.Tensor] = None,
    weight_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """PyTorch reference (and CPU path) of :func:`lora_mixed_linear`.

    ``y[i] = l_out[s] * (W (l_in[s] * x[i]) + b) + scale[s] * (x[i] A[s]^T) B[s]^T`` with
    ``s = row_index[i]`` (with ``col_scale`` ``g``: ``l_out[s] * (g[s] * W (l_in[s] * x[i])
    + b) + g[s] * scale[s] * (x[i] A[s]^T) B[s]^T``), computed in fp32 and returned in ``x.dtype``. Rank rows at or
    beyond ``ranks[s]`` are ignored (treated as zero), exactly as the kernels mask them.

    Args:
        x: ``(B, ..., K)``; rows are dimension 0, the other leading dimensions are tokens
            of that row.
        weight: ``(N, K)`` (``nn.Linear``) or ``(K, N)`` when ``weight_kn`` (``Conv1D``).
        bias: ``(N,)`` or ``None``.
        row_index: ``(B,)`` integer slot of each row.
        a_stack: ``(S, r_max, K)`` stacked ``A`` factors or ``None`` (no LoRA).
        bt_stack: ``(S, r_max, N)`` stacked ``B^T`` factors or ``None``.
        scale: ``(S,)`` per-slot LoRA scaling or ``None`` (1).
        ranks: ``(S,)`` true rank of each slot (0: no LoRA in that slot) or ``None``
            (every slot uses all ``r_max`` rows).
        l_in_stack: ``(S, K)`` input IA³ scales or ``None``.
        l_out_stack: ``(S, N)`` output IA³ scales or ``None``.
        weight_kn: Whether ``weight`` is stored ``(K, N)``.
        col_scale: ``(S, N)`` per-slot DoRA column scales or ``None``.
        weight_scale: ``(N,)`` scale of int8/fp8 ``weight`` codes or ``None``: the
            weight is dequantized first (``weight ⊙ weight_scale[:, None]`` in fp32),
            then multiplied.

    Returns:
        ``(B, ..., N)`` in ``x.dtype``.
    """
    b, k = x.shape[0], x.shape[-1]
    idx = row_index.long()
    x3 = x.reshape(b, -1, k).float()
    w = weight.float()
    if weight_scale is not None:
        w = w * (weight_scale.float() if weight_kn else weight_scale.float()[:, None])
    xin = x3 * l_in_stack.float().index_select(0, idx).unsqueeze(1) if l_in_stack is not None else x3
    y = xin @ w if weight_kn else xin @ w.t()  # (B, T, N)
    g = col_scale.float().index_select(0, idx).unsqueeze(1) if col_scale is not None else None
    if g is not None:
        y = y * g
    if bias is not None:
        y = y + bias.float()
    if l_out_stack is not None:
        y = y * l_out_stack.float().index_select(0, idx).unsqueeze(1)
    if a_stack is not None and bt_stack is not None and a_stack.shape[1] > 0:
        a = a_stack.float().index_select(0, idx)  # (B, r, K)
        bt = bt_stack.float().index_select(0, idx)  # (B, r, N)
        if ranks is not None:
            # Rank rows past a slot's true rank are never read by the kernels: drop them
            # here with where() (not a multiply: they may hold anything, even inf/nan).
            r_idx = torch.arange(a.shape[1], device=a.device)
            live = (r_idx < ranks.to(a.device).long().index_select(0, idx).unsqueeze(1)).unsqueeze(2)
            zero = torch.zeros((), device=a.device)
            a = torch.where(live, a, zero)
            bt = torch.where(live, bt, zero)
        h = torch.bmm(x3, a.transpose(1, 2))  # (B, T, r)
        if scale is not None:
            h = h * scale.float().index_select(0, idx).view(b, 1, 1)
        lora = torch.bmm(h, bt)
        y = y + (lora * g if g is not None else lora)
    n = y.shape[-1]
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
