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
"""

from __future__ import annotations

import inspect
import os
import threading
import types
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import InvalidConfigError, check_path, check_wrapper, wrong_type

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

_P = inspect.Parameter

# One forward function per presented signature, shared by every wrapper with that
# signature: torch.compile then reuses one wrapper's graph for another whose guards pass,
# as it does for the class's own forward.
_FORWARDS: dict[str, types.FunctionType] = {}
_FORWARDS_LOCK = threading.Lock()


def present_forward_signature(wrapper: nn.Module, model: nn.Module | None) -> None:
    """Make ``inspect.signature(wrapper.forward)`` show ``model.forward``'s parameters.

    ``AdapterWrapper.forward(*args, **kwargs)`` passes everything through, which hides
    the base model's argument names from code that reads them: Hugging Face ``Trainer``
    drops every dataset column that is not a parameter of ``model.forward``
    (``remove_unused_columns``), and decides from a ``**kwargs`` parameter whether the
    model accepts loss arguments (``num_items_in_batch``). PEFT solves the same problem
    with ``update_forward_signature``. The wrapper gets an instance attribute ``forward``:
    a method whose ``__signature__`` is the base model's, plus the keyword-only
    ``adapter_names=None`` of mixed batches, and which calls the class's ``forward``. The
    call itself is unchanged.

    Args:
        wrapper: The :class:`~tinytune.AdapterWrapper`.
        model: Its base model, or ``None`` (unloaded): then the plain signature is shown.
    """
    wrapper.__dict__.pop("forward", None)
    if model is None:
        return
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # builtins or odd callables: keep (*args, **kwargs)
        return
    params = list(sig.parameters.values())
    if all(p.kind in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD) for p in params):
        return
    if "adapter_names" not in sig.parameters:
        extra = _P("adapter_names", _P.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is _P.VAR_KEYWORD), len(params))
        params.insert(at, extra)
    try:
        shown = sig.replace(parameters=[_P("self", _P.POSITIONAL_OR_KEYWORD), *params])
    except ValueError:  # a parameter called "self", say: keep the plain signature
        return
    base = type(wrapper).forward
    key = (str(shown), base)
    with _FORWARDS_LOCK:
        fn = _FORWARDS.get(key)
        if fn is None:
            fn = _FORWARDS[key] = _forward_with(base, shown)
    wrapper.__dict__["forward"] = types.MethodType(fn, wrapper)


def _forward_with(base: types.FunctionType, signature: inspect.Signature) -> types.FunctionType:
    # A copy of the class's forward sharing its code object, not a function that calls
    # it: torch.compile then traces exactly the class's forward (same guards, same cache
    # entry) instead of one more frame that re-packs **kwargs, which made dynamo guard on
    # the values of adapter_names and recompile for every new assignment.
    forward = types.FunctionType(
        base.__code__, base.__globals__, base.__name__, base.__defaults__, base.__closure__
    )
    forward.__kwdefaults__ = base.__kwdefaults__
    forward.__dict__.update(base.__dict__)
    forward.__signature__ = signature  # type: ignore[attr-defined]
    forward.__doc__ = base.__doc__
    forward.__qualname__ = base.__qualname__
    return forward


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
    names = list(wrapper.adapters) if adapter_name is None else [wrapper._adapter(adapter_name).name]
    for name in names:
        upcast_layers((layer for _, layer in wrapper.adapters[name].items()), dtype)


def upcast_layers(layers: Iterator[nn.Module], dtype: torch.dtype = torch.float32) -> None:
    """Store the float16/bfloat16 parameters of ``layers`` in ``dtype`` (see
    :func:`cast_adapter_dtype`); other parameters are left alone."""
    from .layers import ModulesToSaveLayer

    for layer in layers:
        if isinstance(layer, ModulesToSaveLayer):
            # A full copy of a base module: it stays in the base dtype, so its output
            # fits the rest of the model (PEFT does not upcast these either).
            continue
        for module in layer.modules():
            for pname, param in list(module._parameters.items()):
                if param is not None and param.dtype in (torch.float16, torch.bfloat16):
                    # A new Parameter (as nn.Module.to does): keeps requires_grad.
                    module._parameters[pname] = nn.Parameter(
                        param.detach().to(dtype), requires_grad=param.requires_grad
                    )


# ======================================================================================
# loading into an existing adapter (resuming)
# ======================================================================================
def load_adapter_weights(wrapper: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Load saved adapter files into the existing adapter ``adapter_name``, in place.

    Unlike :meth:`~tinytune.AdapterWrapper.load_adapter`, which builds a new adapter,
    this copies the saved tensors into the adapter's current parameters, so everything
    holding them (an optimizer and its state, FSDP2 / tensor-parallel sharding, a
    compiled graph) keeps working. It is what resuming a run from a checkpoint needs.
    The file must describe the same adapter: the same layers on the same modules with
    the same settings (rank, alpha, ...). Sharded parameters (``DTensor``) receive their
    shard of the saved full tensor; then every rank must call this.

    Args:
        wrapper: The :class:`~tinytune.AdapterWrapper`.
        path: The adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        adapter_name: The adapter to fill.

    Raises:
        AdapterNotFoundError: If there is no adapter of that name.
        AdapterFileNotFoundError / AdapterFileError: If the files are missing or
            corrupt, or describe a different adapter (other modules, settings, shapes).
            Nothing is changed then.
    """
    _copy_pairs(_checked_weights(wrapper, path, adapter_name))


def _checked_weights(
    wrapper: nn.Module, path: str | os.PathLike, adapter_name: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, saved value)`` for every parameter of adapter ``adapter_name``,
    after every check of :func:`load_adapter_weights`; nothing is copied yet."""
    from . import io as tio

    adapter = check_wrapper(wrapper)._adapter(adapter_name)
    directory = Path(check_path(path))
    config, config_file = tio._read_config(directory)
    tensors, _, weights_file = tio._read_weights(directory)
    ours, _ = tio._serialise(adapter, wrapper._model())
    ours = {k: v for k, v in ours.items() if k not in tio._INFORMATIONAL}
    theirs = {k: v for k, v in config.items() if k not in tio._INFORMATIONAL}
    if tio._fingerprint(ours) != tio._fingerprint(theirs):
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise tio.AdapterFileError(
            f"{config_file} describes a different adapter than {adapter_name!r} (fields "
            f"{differ!r} differ), so its weights cannot be loaded into it in place. Load it "
            "as a new adapter with wrapper.load_adapter(path, adapter_name=<new name>)."
        )
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    expected: set[str] = set()
    for path_, layer in adapter.items():
        for suffix, (param, transposed) in tio._tensor_map(layer).items():
            key = f"{tio.KEY_PREFIX}{path_}.{suffix}"
            expected.add(key)
            if key not in tensors:
                raise tio.AdapterFileError(
                    f"{weights_file} has no tensor {key!r} for adapter {adapter_name!r}; the "
                    "file is incomplete or belongs to another adapter. Nothing was loaded."
                )
            value = tensors[key].t() if transposed else tensors[key]
            if tuple(value.shape) != tuple(param.shape):
                raise tio.AdapterFileError(
                    f"Tensor {key!r} in {weights_file} has shape {tuple(value.shape)}, but "
                    f"adapter {adapter_name!r} needs {tuple(param.shape)}. Nothing was loaded."
                )
            pairs.append((param, value))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise tio.AdapterFileError(
            f"{weights_file} holds tensors adapter {adapter_name!r} has no place for, e.g. "
            f"{extra[0]!r}; it belongs to another adapter. Nothing was loaded."
        )
    return pairs


def _copy_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for param, value in pairs:
            _copy_into(param, value)


def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into ``param``, which may be a sharded DTensor."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        from torch.distributed.tensor import distribute_tensor

        full = full.to(device=param.device_mesh.device_type, dtype=param.dtype)
        param.copy_(distribute_tensor(full, param.device_mesh, param.placements))
    else:
        param.copy_(full.to(device=param.device, dtype=param.dtype))


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def saved_adapter_dirs(path: str | os.PathLike) -> dict[str, Path]:
    """The adapters saved under ``path`` the way PEFT lays out several adapters:
    ``"default"`` in ``path`` itself, any other adapter in ``path/<name>``.

    Returns:
        ``{adapter name: directory}`` for every directory holding both adapter files.
    """
    from .io import CONFIG_NAME, WEIGHTS_NAME

    root = Path(check_path(path))
    found: dict[str, Path] = {}
    if (root / CONFIG_NAME).is_file() and (root / WEIGHTS_NAME).is_file():
        found["default"] = root
    if root.is_dir():
        for sub in sorted(root.iterdir()):
            if sub.is_dir() and (sub / CONFIG_NAME).is_file() and (sub / WEIGHTS_NAME).is_file():
                found.setdefault(sub.name, sub)
    return found


def save_all_adapters(wrapper: nn.Module, path: str | os.PathLike) -> list[str]:
    """Save every adapter that has layers, as PEFT's ``save_pretrained`` lays them out:
    ``"default"`` in ``path``, any other adapter in ``path/<name>``.

    Returns:
        The names of the adapters written.
    """
    check_wrapper(wrapper)
    path = check_path(path)
    written = []
    for name, adapter in wrapper.adapters.items():
        if len(adapter) == 0:
            continue
        wrapper.save_adapter(path if name == "default" else os.path.join(path, name), name)
        written.append(name)
    return written


def load_all_adapters(wrapper: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a directory written by :func:`save_all_adapters` (a checkpoint) back into
    ``wrapper``, all or nothing: what resuming a run needs.

    Every adapter of the wrapper that has layers must be saved there (``"default"`` in
    ``path``, any other in ``path/<name>``); its weights are copied in place, as
    :func:`load_adapter_weights` does. An adapter saved there that the wrapper lacks is
    added, inactive and frozen (as PEFT's ``Trainer`` integration loads it). Every file
    is read and checked before anything changes, so a failure leaves all adapters as
    they were.

    Args:
        wrapper: The :class:`~tinytune.AdapterWrapper`.
        path: The directory (a ``Trainer`` checkpoint, say).

    Returns:
        The names of the adapters loaded or added.

    Raises:
        AdapterFileNotFoundError: If an adapter of the wrapper has no complete files in
            ``path`` (the message names the missing file).
        AdapterFileError, InvalidConfigError: If a saved adapter is corrupt, describes a
            different adapter, or cannot be added (see :func:`load_adapter_weights` and
            :meth:`~tinytune.AdapterWrapper.load_adapter`). Nothing is changed then.
    """
    from .errors import AdapterFileNotFoundError
    from .io import read_adapter

    root = Path(path)
    saved = saved_adapter_dirs(root)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    in_place = [name for name, adapter in wrapper.adapters.items() if len(adapter) or name in saved]
    for name in in_place:
        where = saved.get(name, root if name == "default" else root / name)
        try:
            pairs += _checked_weights(wrapper, where, name)
        except AdapterFileNotFoundError as exc:
            raise AdapterFileNotFoundError(
                f"Cannot load adapter {name!r} of the model from {str(root)!r}: {exc} Load a "
                "directory that holds every adapter of the model (AdapterTrainer's "
                "checkpoints do), or delete the adapters it does not hold. Nothing was loaded."
            ) from None
    new = []
    for name in sorted(set(saved) - set(wrapper.adapters)):
        wrapper._check_new_name(name)
        new.append(read_adapter(wrapper, saved[name], name, is_trainable=False))
    attached: list[str] = []
    try:
        for adapter in new:
            wrapper._attach(adapter, False)
            attached.append(adapter.name)
    except BaseException:
        for name in attached:
            wrapper.delete_adapter(name)
        raise
    _copy_pairs(pairs)
    return in_place + attached


# ======================================================================================
# saving from a sharded run
# ======================================================================================
def save_adapter_distributed(
    wrapper: nn.Module, path: str | os.PathLike, adapter_name: str = "default", rank: int | None = None
) -> None:
    """Save an adapter whose parameters are sharded (FSDP2, tensor parallelism).

    Every rank must call this (gathering a sharded parameter is a collective); rank 0
    writes a normal adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``, the same files one process would write), atomically,
    as :meth:`~tinytune.AdapterWrapper.save_adapter` does. Plain (replicated)
    parameters, as under DDP, are written as they are. The other ranks wait at a barrier
    until the files are in place, so a rank may read them right after.

    Args:
        wrapper: The :class:`~tinytune.AdapterWrapper` (or the FSDP2 module it became).
        path: The directory to write.
        adapter_name: The adapter to save.
        rank: The writing decision's rank; by default ``torch.distributed.get_rank()``
            (0 when torch.distributed is not initialised: then this is ``save_adapter``).

    Raises:
        AdapterNotFoundError, AdapterFileError: As ``save_adapter``, on every rank.
    """
    import torch.distributed as dist

    check_wrapper(wrapper)
    path = check_path(path)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise wrong_type("rank", "an int (this process's rank) or None", rank)
    distributed = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if distributed else 0
    adapter = wrapper._adapter(adapter_name)
    with _full_parameters(adapter):
        if rank == 0:
            wrapper.save_adapter(path, adapter_name)
    if distributed:
        dist.barrier()


class _full_parameters:
    """Context manager: the adapter's sharded (DTensor) parameters replaced by plain
    parameters holding the gathered full tensors, put back on exit (even after an
    error). Gathering is a collective, in a fixed order (the adapter's), on every rank."""

    def __init__(self, adapter: nn.Module) -> None:
        self.adapter = adapter
        self.swapped: list[tuple[nn.Module, str, nn.Parameter]] = []

    def __enter__(self) -> None:
        dtensor = _dtensor_type()
        if dtensor is None:
            return
        try:
            for module in self.adapter.modules():
                for name, param in list(module._parameters.items()):
                    if isinstance(param, dtensor):
                        full = param.full_tensor().detach()
                        module._parameters[name] = nn.Parameter(full, requires_grad=False)
                        self.swapped.append((module, name, param))
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        while self.swapped:
            module, name, param = self.swapped.pop()
            module._parameters[name] = param


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

    from .errors import UnsupportedModuleError
    from .layers import LinearLoraLayer

    model = check_wrapper(wrapper)._model()
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
        wrapper.__dict__["_tensor_parallel"] = True
    return len(todo)


def tp_lora_post_forward(layer: Any, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """LoRA's ``output + s * (x A^T) B^T`` with DTensor factors (see
    :func:`parallelize_adapters`); called by ``LinearLoraLayer.post_forward``."""
    from torch.distributed.tensor import DTensor, Replicate

    a, b = layer.lora_A.weight, layer.lora_B.weight
    if not isinstance(x, DTensor):
        # The module itself was not parallelized: its input is the same on every rank.
        x = DTensor.from_local(x, a.device_mesh, [Replicate()], run_check=False)
    x = layer._dropout(module, x)
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    delta = torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * layer._scaling
    if isinstance(output, DTensor):
        # Before the layer's output hook: a colwise output is Shard(-1) like delta, a
        # rowwise one Partial like delta, which the layer's all-reduce then sums.
        return output + delta.to(output.dtype)
    if any(p.is_partial() for p in delta.placements):
        delta = delta.redistribute(delta.device_mesh, [Replicate()])
    return output + delta.to_local().to(output.dtype)


def __getattr__(name: str) -> Any:
    # AdapterTrainer needs transformers; import it only when asked for.
    if name == "AdapterTrainer":
        from .hf_trainer import AdapterTrainer

        return AdapterTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
