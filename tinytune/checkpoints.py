"""Checkpoints of adapters: loading saved files into an existing adapter (resuming),
PEFT's several-adapter layout, saving from a sharded run (FSDP2 / tensor parallel).

Floor 7 (training helpers): imports ``errors``, ``util``, ``io`` and ``serving``; it
takes an :class:`~tinytune.AdapterWrapper` as an argument (never imports it). Its
names are re-exported by :mod:`tinytune.training`, and :mod:`tinytune.hf_trainer`
uses them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import io as tio
from .errors import AdapterFileNotFoundError, check_path, check_wrapper, wrong_type
from .serving import slot_hooks
from .util import adapter_dir, dtensor_type, holds_adapter

__all__ = [
    "load_adapter_weights",
    "load_all_adapters",
    "save_adapter_distributed",
    "save_all_adapters",
    "saved_adapter_dirs",
]


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
    adapter = check_wrapper(wrapper).registry.get(adapter_name)
    directory = Path(check_path(path))
    config, config_file = tio.read_config(directory)
    tensors, _, weights_file = tio.read_weights(directory)
    ours, _ = tio.serialise(adapter, wrapper.registry.model())
    ours = {k: v for k, v in ours.items() if k not in tio.INFORMATIONAL}
    theirs = {k: v for k, v in config.items() if k not in tio.INFORMATIONAL}
    if tio.fingerprint(ours) != tio.fingerprint(theirs):
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise tio.AdapterFileError(
            f"{config_file} describes a different adapter than {adapter_name!r} (fields "
            f"{differ!r} differ), so its weights cannot be loaded into it in place. Load it "
            "as a new adapter with wrapper.load_adapter(path, adapter_name=<new name>)."
        )
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    expected: set[str] = set()
    for path_, layer in adapter.items():
        for suffix, (param, transposed) in tio.tensor_map(layer).items():
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
    dtensor = dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        from torch.distributed.tensor import distribute_tensor

        full = full.to(device=param.device_mesh.device_type, dtype=param.dtype)
        param.copy_(distribute_tensor(full, param.device_mesh, param.placements))
    else:
        param.copy_(full.to(device=param.device, dtype=param.dtype))


def saved_adapter_dirs(path: str | os.PathLike) -> dict[str, Path]:
    """The adapters saved under ``path`` the way PEFT lays out several adapters:
    ``"default"`` in ``path`` itself, any other adapter in ``path/<name>``.

    Returns:
        ``{adapter name: directory}`` for every directory holding both adapter files.
    """
    root = Path(check_path(path))
    found: dict[str, Path] = {}
    if holds_adapter(root):
        found["default"] = root
    if root.is_dir():
        for sub in sorted(root.iterdir()):
            if sub.is_dir() and holds_adapter(sub):
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
        wrapper.save_adapter(adapter_dir(path, name), name)
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
    registry = check_wrapper(wrapper).registry
    root = Path(check_path(path))
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
        registry.check_new_name(name)
        new.append(tio.read_adapter(registry.model(), saved[name], name, is_trainable=False))
    attached: list[str] = []
    try:
        for adapter in new:
            registry.attach(adapter, False, slots=slot_hooks(wrapper))
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
    adapter = wrapper.registry.get(adapter_name)
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
        dtensor = dtensor_type()
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
