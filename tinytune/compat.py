"""PEFT's entry point, for code written against PEFT: ``get_peft_model``.

Floor 10 (the package face): may import any tinytune module below it.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import AdapterConfig
from .layers import ModulesToSaveLayer
from .wrapper import AdapterWrapper

__all__ = ["get_peft_model"]


def get_peft_model(
    model: nn.Module,
    peft_config: AdapterConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> AdapterWrapper:
    """Wrap ``model`` with one adapter built from ``peft_config`` (PEFT's function).

    Same as ``AdapterWrapper.from_config(model, peft_config, adapter_name)``, with
    PEFT's keyword arguments:

    Args:
        model: The base model (used in place; its parameters are frozen).
        peft_config: A tinytune ``LoraConfig`` or ``IA3Config``.
        adapter_name: The adapter's name.
        mixed: Accepted for PEFT's mixed models; every tinytune wrapper mixes adapter
            types already.
        autocast_adapter_dtype: As in PEFT: adapter weights (LoRA factors, IA³
            scales; not ``modules_to_save`` copies) created in float16 or bfloat16 (a
            half-precision base model) are upcast to float32.
        revision: Recorded as the adapter's ``revision`` in saved files.
        low_cpu_mem_usage: Accepted; adapters are always created directly on the
            adapted module's device.

    Returns:
        The :class:`~tinytune.AdapterWrapper`.

    Raises:
        TinytuneError: The errors of :meth:`AdapterWrapper.from_config`.
    """
    wrapper = AdapterWrapper.from_config(model, peft_config, adapter_name)
    adapter = wrapper.adapters[adapter_name]
    if autocast_adapter_dtype:
        for _, layer in adapter.items():
            if isinstance(layer, ModulesToSaveLayer):
                continue  # PEFT upcasts the adapter factors only, not trained copies
            for param in layer.parameters():
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()
    if revision is not None:
        adapter.peft_extras["revision"] = revision
    return wrapper
