"""One adapted linear layer in one pass: base GEMM + LoRA + IA³ (placeholder launcher).

    y = l_out ⊙ (W (l_in ⊙ x) + b) + ((x Aᵀ) ⊙ s) Bᵀ

This module imports torch (and triton, when present) only, never tinytune.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["torch_lora_linear", "lora_linear"]


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
) -> torch.Tensor:
    """PyTorch reference of :func:`lora_linear`, in fp32, returned in ``x.dtype``."""
    xf = x.float()
    xin = xf * l_in.float() if l_in is not None else xf
    w = weight.float()
    y = xin @ w if weight_kn else xin @ w.t()
    if bias is not None:
        y = y + bias.float()
    if l_out is not None:
        y = y * l_out.float()
    if lora_a is not None and lora_b is not None and lora_a.shape[0] > 0:
        h = xf @ lora_a.float().t()
        if lora_scale is not None:
            h = h * lora_scale.float()
        y = y + h @ lora_b.float().t()
    return y.to(x.dtype)


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
) -> torch.Tensor:
    """Fused adapted linear layer (placeholder: runs the reference until the kernels land)."""
    return torch_lora_linear(x, weight, bias, lora_a, lora_b, lora_scale, l_in, l_out, weight_kn)


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, lora_scale, l_in, l_out, weight_kn=False):
    n = weight.shape[1] if weight_kn else weight.shape[0]
    return x.new_empty((*x.shape[:-1], n))
