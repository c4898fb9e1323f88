"""Training helpers: what training scripts, Hugging Face ``Trainer`` and distributed
recipes (FSDP2, tensor parallelism) need from an :class:`~tinytune.AdapterWrapper`.

Nothing here is needed for plain PyTorch training on one process: the wrapper's adapter
parameters are ordinary ``nn.Parameter`` s that any optimizer trains. This module adds

* the base model's ``forward`` signature on the wrapper (so ``Trainer`` keeps the
  dataset's columns), set up by the wrapper itself;
* :func:`cast_adapter_dtype`: fp32 adapter weights on an fp16/bf16 base (PEFT's
  ``autocast_adapter_dtype``);
* :func:`load_adapter_weights`: load saved adapter files *into* an existing adapter, in
  place (parameters keep their identity, so an optimizer holding them keeps working):
  what resuming from a checkpoint needs; :func:`load_all_adapters` does it for every
  adapter of a checkpoint, all checked before any is changed;
* :func:`save_adapter_distributed`: save from a sharded run (FSDP2 / tensor parallel):
  every rank gathers, rank 0 writes a normal adapter directory;
* :func:`parallelize_adapters`: LoRA factors sharded to match ``ColwiseParallel`` /
  ``RowwiseParallel`` layers (tensor parallelism);
* ``AdapterTrainer`` (in :mod:`tinytune.hf_trainer`, importable from here): a
  ``transformers.Trainer`` that saves and loads adapter files.

Floor 9 (training helpers): imports ``errors``, ``util``, ``layers`` and
``checkpoints``; ``hf_trainer`` only inside ``__getattr__`` (it needs transformers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .checkpoints import (
    load_adapter_weights,
    load_all_adapters,
    save_adapter_distributed,
    save_all_adapters,
    saved_adapter_dirs,
)
from .errors import InvalidConfigError, UnsupportedModuleError, check_wrapper
from .layers import LinearLoraLayer, tp_lora_post_forward, upcast_layers  # noqa: F401 - re-exported
from .util import present_forward_signature

__all__ = [
    "AdapterTrainer",
    "cast_adapter_dtype",
    "load_adapter_weights",
    "load_all_adapters",
    "parallelize_adapters",
    "present_forward_signature",
    "save_adapter_distributed",
    "save_all_adapters",
    "saved_adapter_dirs",
]

# ======================================================================================
# dtypes
# ======================================================================================
def cast_adapter_dtype(
    wrapper: nn.Module,
    adapter_name: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Store fp16/bf16 adapter weights in ``dtype`` (fp32), as PEFT's
    ``autocast_adapter_dtype=True`` does.

    A half-precision base model keeps its weights; only the adapters' floating-point
    parameters in float16 or bfloat16 are upcast, so the optimizer updates fp32 master
    weights (small updates are not lost to bf16 rounding). The layers cast activations
    themselves: the LoRA branch runs in the adapter's dtype (or in ``torch.autocast``'s)
    and is added to the module's output in the output's dtype. Merging rounds the fp32
    update into the base weight's dtype once.

    Args:
        wrapper: The :class:`~tinytune.AdapterWrapper`.
        adapter_name: One adapter, or ``None`` for all.
        dtype: The dtype to store them in (float32 by default).

    Raises:
        AdapterNotFoundError: If ``adapter_name`` names no adapter.
        InvalidConfigError: If ``dtype`` is not a floating-point dtype.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidConfigError(f"dtype must be a floating-point torch.dtype, got {dtype!r}.")
    names = list(wrapper.adapters) if adapter_name is None else [wrapper.registry.get(adapter_name).name]
    for name in names:
        upcast_layers((layer for _, layer in wrapper.adapters[name].items()), dtype)


# ======================================================================================
# tensor parallelism
# ======================================================================================
def parallelize_adapters(wrapper: nn.Module) -> int:
    """Shard LoRA factors to match a base model parallelized with
    ``torch.distributed.tensor.parallel.parallelize_module``.

    Call it on every rank after ``parallelize_module`` (before or after wrapping). For
    each adapted module whose weight is a ``DTensor`` (1-D mesh):

    * ``ColwiseParallel`` (weight ``Shard(0)``, the output dimension): ``lora_B`` is
      sharded on its output dimension, ``lora_A`` is replicated; each rank computes the
      LoRA update of its own output columns, no communication.
    * ``RowwiseParallel`` (weight ``Shard(1)``, the input dimension): ``lora_A`` is
      sharded on its input dimension, ``lora_B`` is replicated; each rank's partial
      ``x A^T B^T`` joins the layer's own partial sum, reduced by the layer's all-reduce
      (if tinytune's hook runs after the layer's output was already reduced, which
      happens when the adapter was added after parallelizing, the update is all-reduced
      on its own).
    * replicated weights: both factors replicated.

    The factors' values are taken from rank 0 (``distribute_tensor``), so all ranks
    start alike. Gradients and optimizer states of sharded factors are sharded alike;
    :func:`save_adapter_distributed` gathers full weights for saving, and
    :func:`load_adapter_weights` loads full weights back into the shards.

    Args:
        wrapper: The :class:`~tinytune.AdapterWrapper`.

    Returns:
        The number of adapter layers placed on a tensor-parallel mesh.

    Raises:
        UnsupportedModuleError: If a tensor-parallel module carries an adapter layer other
            than LoRA on ``nn.Linear`` (IA³, ``modules_to_save``, custom layers, Conv1D),
            or its weight's sharding is not ``Shard(0)``, ``Shard(1)`` or ``Replicate()``
            on a 1-D mesh. Nothing is changed then.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    model = check_wrapper(wrapper).registry.model()
    modules = dict(model.named_modules())
    todo: list[tuple[nn.Module, Any, list, list]] = []
    for adapter_name, adapter in wrapper.adapters.items():
        for path, layer in adapter.items():
            weight = getattr(modules.get(path), "weight", None)
            if not isinstance(weight, DTensor):
                continue
            where = f"adapter {adapter_name!r} on tensor-parallel module {path!r}"
            if not isinstance(layer, LinearLoraLayer) or layer.fan_in_fan_out:
                raise UnsupportedModuleError(
                    f"The {type(layer).__name__} of {where} cannot be sharded: tinytune "
                    "supports LoRA on nn.Linear under tensor parallelism. Target the "
                    "parallelized modules with LoRA only, or keep this adapter on modules "
                    "that are not parallelized. Nothing was changed."
                )
            mesh, placements = weight.device_mesh, tuple(weight.placements)
            if mesh.ndim != 1 or placements[0] not in (Shard(0), Shard(1), Replicate()):
                raise UnsupportedModuleError(
                    f"The weight of {path!r} is sharded as {placements} on a {mesh.ndim}-D "
                    f"mesh; {where} supports ColwiseParallel (Shard(0)), RowwiseParallel "
                    "(Shard(1)) or replicated weights on a 1-D mesh. Nothing was changed."
                )
            if placements[0] == Shard(0):
                a_pl, b_pl = [Replicate()], [Shard(0)]
            elif placements[0] == Shard(1):
                a_pl, b_pl = [Shard(1)], [Replicate()]
            else:
                a_pl, b_pl = [Replicate()], [Replicate()]
            todo.append((layer, mesh, a_pl, b_pl))
    for layer, mesh, a_pl, b_pl in todo:
        for sub, pl in ((layer.lora_A, a_pl), (layer.lora_B, b_pl)):
            param = sub.weight
            if isinstance(param, DTensor):
                continue
            sub.weight = nn.Parameter(
                distribute_tensor(param.detach(), mesh, pl), requires_grad=param.requires_grad
            )
    if todo:
        # Read by the wrapper to refuse mixed batches (adapter_names=), whose stacked
        # kernels take plain tensors.
        wrapper.registry.tensor_parallel = True
    return len(todo)


def __getattr__(name: str) -> Any:
    # AdapterTrainer needs transformers; import it only when asked for.
    if name == "AdapterTrainer":
        from .hf_trainer import AdapterTrainer

        return AdapterTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
