"""``@triton.jit`` helpers shared by the kernels of ``lora_linear.py`` and ``lora_mixed.py``.

Both ops compute ``l_out ⊙ (W (l_in ⊙ x) + b) + (h ⊙ s) Bᵀ`` on tiles; these are the
pieces they have in common, inlined into each kernel by the compiler:

* :func:`mma`: one ``tl.dot`` with fp32 accumulation, upcast to IEEE fp32 under
  ``DOT_FP32``;
* :func:`base_k_step`: one K step of the base GEMM (load the x and W tiles, scale x by
  ``l_in``, accumulate);
* :func:`bias_and_l_out`: the epilogue's bias and output IA³ scale;
* :func:`add_h_bt`: one rank chunk of the LoRA expand from a precomputed fp32 ``h``.

``DOT_FP32`` (one name in every kernel): dot operands are upcast to fp32 with
``input_precision="ieee"`` (so fp32 inputs never silently become TF32). The launchers
set it for fp32 inputs, mixed dtypes (``lora_mixed``) and always under
``TRITON_INTERPRET=1``: the interpreter computes fp16/bf16 ``tl.dot`` on the raw bits
(garbage), so it only gets fp32 operands. Element-wise math is fp32 everywhere.

Pointers and masks are built by the callers (each op has its own tiling: contiguous
rows, per-token slots, slot-homogeneous segments); loads here are masked with
``other=0``. This module imports triton only, never tinytune.
"""

from __future__ import annotations

from .triton_support import HAS_TRITON, tl, triton

__all__ = ["mma", "base_k_step", "bias_and_l_out", "add_h_bt"]

if HAS_TRITON:

    @triton.jit
    def mma(a, b, acc, DOT_FP32: tl.constexpr):
        """``acc + a @ b``, accumulating in fp32; ``b`` is cast to ``a``'s dtype.

        Callers pass ``a`` in the dtype the tensor cores should see (the input's).
        """
        if DOT_FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b.to(a.dtype), acc)

    @triton.jit
    def base_k_step(acc, x_ptrs, x_mask, w_ptrs, w_mask, lin_ptrs, lin_mask,
                    HAS_L_IN: tl.constexpr, DOT_FP32: tl.constexpr):
        """One K step of the base GEMM: ``acc + (l_in ⊙ x) Wᵀ`` on one tile.

        ``x_ptrs`` is a ``(BLOCK_M, BLOCK_K)`` block, ``w_ptrs`` a ``(BLOCK_K, BLOCK_N)``
        block of ``Wᵀ``, ``lin_ptrs`` broadcasts against the x block (one row of scales
        per tile, or one per token). ``l_in ⊙ x`` is formed in fp32 and handed to the dot
        in fp32 under ``DOT_FP32``, else rounded back to x's dtype (the tensor cores'
        operand).

        Returns:
            ``(acc, x)``: the new accumulator and the unscaled x tile (the decode kernel's
            fused shrink reads it too).
        """
        xv = tl.load(x_ptrs, mask=x_mask, other=0.0)
        wv = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if HAS_L_IN:
            li = tl.load(lin_ptrs, mask=lin_mask, other=0.0)
            xs = xv.to(tl.float32) * li.to(tl.float32)
            if not DOT_FP32:
                xs = xs.to(xv.dtype)
        else:
            xs = xv
        return mma(xs, wv, acc, DOT_FP32), xv

    @triton.jit
    def bias_and_l_out(acc, bias_ptr, stride_bias, offs_n, n_mask, lout_ptrs, lout_mask,
                       HAS_BIAS: tl.constexpr, HAS_L_OUT: tl.constexpr):
        """``l_out ⊙ (acc + b)`` in fp32: the epilogue before the LoRA term is added.

        ``lout_ptrs`` broadcasts against ``acc`` (one row of scales per tile, or one per
        token).
        """
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if HAS_L_OUT:
            lout = tl.load(lout_ptrs, mask=lout_mask, other=0.0)
            acc = acc * lout.to(tl.float32)
        return acc

    @triton.jit
    def add_h_bt(acc, h_ptrs, h_mask, b_ptrs, b_mask, X_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
        """``acc + h Bᵀ`` for one rank chunk: ``h`` a ``(BLOCK_M, chunk)`` block of the
        precomputed fp32 ``(x Aᵀ) ⊙ s``, ``b_ptrs`` a ``(chunk, BLOCK_N)`` block of ``Bᵀ``.

        Without ``DOT_FP32`` both operands go to the tensor cores in the input's dtype
        ``X_DTYPE`` (``h`` rounded once, ``B`` cast if stored wider).
        """
        hv = tl.load(h_ptrs, mask=h_mask, other=0.0)
        bv = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if DOT_FP32:
            return mma(hv, bv, acc, True)
        else:
            return mma(hv.to(X_DTYPE), bv, acc, False)
