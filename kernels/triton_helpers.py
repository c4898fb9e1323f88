"""``@triton.jit`` helpers shared by the kernels of ``lora_linear.py`` and ``lora_mixed.py``.

Both ops compute ``l_out ⊙ (W (l_in ⊙ x) + b) + (h ⊙ s) Bᵀ`` on tiles; these are the
pieces they have in common, inlined into each kernel by the compiler:

* :func:`mma`: one ``tl.dot`` with fp32 accumulation, upcast to IEEE fp32 under
  ``DOT_FP32``;
* :func:`base_k_step`: one K step of the base GEMM (load the x and W tiles, scale x by
  ``l_in``, accumulate);
* :func:`bias_and_l_out`: the epilogue's bias and output IA³ scale;
* :func:`dequant_scale`: the per-output-channel scale of an int8/fp8 ``W``, applied to
  the base accumulator before the bias (``W_SCALED``);
* :func:`add_h_bt`: one rank chunk of the LoRA expand from a precomputed fp32 ``h``;
* :func:`col_scale_and_bias`: DoRA's epilogue, a per-output-column scale ``g`` of the
  base product and the LoRA term, then the bias (``HAS_COL_SCALE`` kernels).

``DOT_FP32`` (one name in every kernel): dot operands are upcast to fp32 with
``input_precision="ieee"`` (so fp32 inputs never silently become TF32). The launchers
set it for fp32 inputs and mixed dtypes (``lora_mixed``), on the GPU and under the
interpreter alike, so both run the same branch. ``UPCAST_DOT`` (set only under
``TRITON_INTERPRET=1``) changes nothing but the operands of the 16-bit branch's one
``tl.dot``: the interpreter computes bf16 ``tl.dot`` on the raw bits (garbage), so the
operands, already rounded to the 16-bit dtype, are widened to fp32 right before the
dot. Products of two 16-bit values are exact in fp32, so this emulates the tensor
cores' arithmetic (exact products, fp32 accumulation) while the control flow, the
roundings to the 16-bit dtype and the tiles stay the GPU's. Element-wise math is fp32
everywhere.

Each op keeps its own tiling (contiguous rows, per-token slots, slot-homogeneous
segments) and passes base pointers, 1-D masks and slot offsets; the helpers build the
2-D masks and addresses next to their loads, in the order the kernels had before they
shared them: ptxas allocates registers by that order, and another order spilled two
fp32 configurations (``ci/kernel_report.py`` checks every one). Loads are masked with
``other=0``. This module imports triton only, never tinytune.
"""

from __future__ import annotations

from .triton_support import HAS_TRITON, tl, triton

__all__ = ["mma", "base_k_step", "bias_and_l_out", "add_h_bt", "col_scale_and_bias", "dequant_scale"]

if HAS_TRITON:

    @triton.jit
    def mma(a, b, acc, DOT_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr):
        """``acc + a @ b``, accumulating in fp32; ``b`` is cast to ``a``'s dtype.

        Callers pass ``a`` in the dtype the tensor cores should see (the input's).
        ``UPCAST_DOT`` (interpreter only) widens the 16-bit branch's rounded operands to
        fp32 for the one ``tl.dot`` below, which stays the branch's only dot.
        """
        if DOT_FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            b = b.to(a.dtype)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            return tl.dot(a, b, acc)

    @triton.jit
    def base_k_step(acc, x_ptrs, row_mask, k_mask, w_ptrs, n_mask, lin_ptrs, lin_mask,
                    HAS_L_IN: tl.constexpr, DOT_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
                    W_SCALED: tl.constexpr):
        """One K step of the base GEMM: ``acc + (l_in ⊙ x) Wᵀ`` on one tile.

        ``x_ptrs`` is a ``(BLOCK_M, BLOCK_K)`` block (rows masked by ``row_mask``, columns
        by ``k_mask``), ``w_ptrs`` a ``(BLOCK_K, BLOCK_N)`` block of ``Wᵀ``, ``lin_ptrs`` a
        ``(BLOCK_K,)`` block (one slot per tile) or a ``(BLOCK_M, BLOCK_K)`` block (one
        slot per token) masked by ``lin_mask``, broadcast against x. ``l_in ⊙ x`` is
        formed in fp32 and handed to the dot in fp32 under ``DOT_FP32``, else rounded back
        to x's dtype (the tensor cores' operand).

        ``W_SCALED``: ``W`` holds int8 or float8_e4m3fn codes (its per-channel scale is
        applied in the epilogue, :func:`dequant_scale`); the tile crosses HBM at one byte
        per element and is converted here, in registers, to the dot's dtype: exactly,
        since every int8 and e4m3 value is a bf16/fp16 value. The interpreter converts
        through fp32 (its int8 -> bf16 conversion reinterprets bits).

        Returns:
            ``(acc, x)``: the new accumulator and the unscaled x tile (the decode kernel's
            fused shrink reads it too).
        """
        xv = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_L_IN:
            li = tl.load(lin_ptrs, mask=lin_mask, other=0.0)
            xs = xv.to(tl.float32) * li.to(tl.float32)
            if not DOT_FP32:
                xs = xs.to(xv.dtype)
        else:
            xs = xv
        wv = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if W_SCALED:
            if DOT_FP32 or UPCAST_DOT:
                wv = wv.to(tl.float32)
            else:
                wv = wv.to(xv.dtype)
        return mma(xs, wv, acc, DOT_FP32, UPCAST_DOT), xv

    @triton.jit
    def bias_and_l_out(acc, bias_ptr, stride_bias, offs_n, n_mask, lout_ptr, slot, stride_ls,
                       stride_lout, lout_mask, HAS_BIAS: tl.constexpr, HAS_L_OUT: tl.constexpr):
        """``l_out ⊙ (acc + b)`` in fp32: the epilogue before the LoRA term is added.

        The output IA³ scales are read at ``lout_ptr + slot * stride_ls + offs_n *
        stride_lout`` under ``lout_mask``: ``slot`` is one slot (per tile; 0 for a single
        row of scales) or a ``(BLOCK_M, 1)`` block (one slot per token).
        """
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if HAS_L_OUT:
            lout = tl.load(lout_ptr + slot * stride_ls + offs_n * stride_lout, mask=lout_mask, other=0.0)
            acc = acc * lout.to(tl.float32)
        return acc

    @triton.jit
    def add_h_bt(acc, h_rows, row_mask, offs_r, r_mask, b_ptr, slot, stride_bs, stride_br,
                 offs_n, stride_bn, n_mask, X_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
                 UPCAST_DOT: tl.constexpr):
        """``acc + h Bᵀ`` for one rank chunk ``offs_r`` of the precomputed fp32
        ``h = (x Aᵀ) ⊙ s``: ``h_rows`` a ``(BLOCK_M, 1)`` block of pointers to the tile's
        rows of ``h``; ``Bᵀ`` of slot ``slot`` (0 for a single one) read from ``b_ptr``.

        Without ``DOT_FP32`` both operands go to the tensor cores in the input's dtype
        ``X_DTYPE`` (``h`` rounded once, ``B`` cast if stored wider).
        """
        hv = tl.load(h_rows + offs_r[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        bv = tl.load(b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            return mma(hv, bv, acc, True, UPCAST_DOT)
        else:
            return mma(hv.to(X_DTYPE), bv, acc, False, UPCAST_DOT)

    @triton.jit
    def col_scale_and_bias(acc, col_ptr, stride_cs, stride_col, bias_ptr, stride_bias, offs_n,
                           n_mask, lout_ptr, slot, stride_ls, stride_lout, lout_mask,
                           HAS_BIAS: tl.constexpr, HAS_L_OUT: tl.constexpr):
        """``g ⊙ acc + l_out ⊙ b`` in fp32: DoRA's epilogue, after the LoRA term is added.

        ``acc`` holds ``l_out ⊙ W x + L`` (the kernels apply ``l_out`` before the LoRA
        term, with the bias held back), so the result is ``l_out ⊙ (g ⊙ W x + b) + g ⊙ L``:
        ``g`` scales the base product and the LoRA term, never the bias, and ``g = 1``
        gives the kernels' formula without it. ``g`` is read at ``col_ptr + slot *
        stride_cs + offs_n * stride_col`` and ``l_out`` at ``lout_ptr + slot * stride_ls
        + offs_n * stride_lout``, both under ``lout_mask`` (``slot``: one slot per tile, 0
        for a single vector, or a ``(BLOCK_M, 1)`` block, one slot per token). ``l_out``
        is read again for the bias only when both are present (one adapter per slot
        makes that an IA³ row next to DoRA rows; the reads hit the cache).
        """
        g = tl.load(col_ptr + slot * stride_cs + offs_n * stride_col, mask=lout_mask, other=0.0)
        acc = acc * g.to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_L_OUT:
                lout = tl.load(lout_ptr + slot * stride_ls + offs_n * stride_lout, mask=lout_mask, other=0.0)
                acc += bias[None, :] * lout.to(tl.float32)
            else:
                acc += bias[None, :]
        return acc

    @triton.jit
    def dequant_scale(acc, ws_ptr, offs_n, stride_ws, n_mask):
        """``acc ⊙ weight_scale`` on the columns ``offs_n``: the base product of int8/fp8
        codes becomes ``x · dequant(W)ᵀ`` (one fp32 multiply per output, before the bias;
        on a split-K partial tile it is the same, the scale being linear)."""
        ws = tl.load(ws_ptr + offs_n * stride_ws, mask=n_mask, other=0.0)
        return acc * ws.to(tl.float32)[None, :]
