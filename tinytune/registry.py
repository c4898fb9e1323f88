"""The adapters on one model: their hook sites, the active / merged / disabled sets,
attaching and deleting, merging and unmerging with their checks.

Floor 5: imports ``errors``, ``util``, ``weights``, ``layers``, ``config``,
``adapter`` and ``hooks``. ``AdapterWrapper`` (floor 8) is a façade over one ``AdapterRegistry``; the
reserved slots (``serving``, floor 6) reach it only through the ``slots`` argument
of the methods that attach or merge (an object with ``check_attach``, ``on_attach``
and ``pin``, see :func:`tinytune.serving.slot_hooks`), so nothing here imports them.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .adapter import BASE_ADAPTER_NAME, Adapter, layer_key, reset_params
from .config import layer_factory
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterStateError,
    InvalidConfigError,
    LayerAlreadyAdaptedError,
    LayerNotFoundError,
    MergeNotSupportedError,
    UnsupportedModuleError,
    suggest,
    wrong_type,
)
from .hooks import HookSite, hook_layout_id
from .layers import AdapterLayer, ModulesToSaveLayer, is_dora, quantized_merge_error
from .util import device_of
from .weights import (
    dequantized_linear,
    float_dtype,
    has_4bit,
    is_quantized,
    model_float_dtype,
    quantized_modules,
    unpack_before_autograd,
    weight_kind,
)

__all__ = ["AdapterRegistry", "hooked_by_tinytune", "wrapped_by"]


class AdapterRegistry:
    """The adapters on one base model and the hook sites that apply them.

    Owns the state ``AdapterWrapper`` used to keep in its own attributes: ``active``
    (innermost first), ``disabled`` (depth of ``disable_adapter()`` blocks),
    ``sites`` (module path -> :class:`~tinytune.hooks.HookSite`), ``merged`` (merge
    order), ``backups`` (module path -> host copies of its original tensors),
    ``grad_flags``, ``hook_layout``, ``slots_reserved`` and ``rows_assigned`` (read by the wrapper's
    ``forward``, so a compiled forward is guarded on them).

    Args:
        model: The base model (frozen here; its flags come back with ``unload``).
        adapters: The ``nn.ModuleDict`` of adapters; the wrapper registers the same
            object as its submodule, so state-dict keys stay ``adapters.<name>...``.

    Raises:
        AdapterStateError: If another wrapper holds ``model`` or its hooks are on it.
    """

    def __init__(self, model: nn.Module, adapters: nn.ModuleDict) -> None:
        if not isinstance(model, nn.Module):
            raise wrong_type("model", "a torch nn.Module (the base model to adapt)", model)
        if isinstance(getattr(model, "registry", None), AdapterRegistry):
            raise wrong_type(
                "model", "a base model, not an AdapterWrapper", model,
                " Add adapters to this wrapper directly (add_adapter_from_config).",
            )
        _check_not_wrapped(model, None)
        hooked = _hooked_by_tinytune(model)
        if hooked is not None:
            # Typically a notebook cell run twice: both wrappers' adapters would apply, and
            # this wrapper's unload() would not give back the original model.
            raise AdapterStateError(
                f"Module {hooked!r} of this model already carries tinytune adapter hooks from "
                "another AdapterWrapper. Add adapters to that wrapper, or call its unload() "
                "(or merge_and_unload()) first, or wrap a freshly built model."
            )
        self.base: nn.Module | None = model
        self.adapters = adapters
        self.active: list[str] = []
        # Depth of nested disable_adapter() blocks: while > 0 no adapter runs.
        self.disabled = 0
        self.sites: dict[str, HookSite] = {}
        self.merged: list[str] = []  # merge order
        self.backups: dict[str, dict[str, torch.Tensor]] = {}  # path -> original tensors
        self.grad_flags: dict[str, bool] = {}
        # Which modules carry hooks, as a small int (see note_hook_layout).
        self.hook_layout = hook_layout_id(())
        # Set by reserve_adapter_slots(): plain calls then bring the active adapters
        # into slots first (see tinytune/serving.py); without it they cost nothing more.
        self.slots_reserved = False
        # Set by set_row_adapters() (see tinytune/serving.py): calls then run each row
        # with its assigned adapter, until clear_row_adapters().
        self.rows_assigned = False
        # Set by tinytune.training.parallelize_adapters (mixed batches are refused then).
        self.tensor_parallel = False
        # bitsandbytes 4-bit weights repacked for the CPU (see weights.unpack_cpu_4bit).
        self.unpack_hook: Any = None
        self.freeze(model)
        _WRAPPED[model] = weakref.ref(self)
        self.guard_4bit(model)

    @classmethod
    def from_state(cls, state: dict, model: nn.Module | None, adapters: nn.ModuleDict) -> "AdapterRegistry":
        """A registry from a wrapper pickled before the registry existed (its
        ``_active``, ``_merged``, ``_sites``, ... attributes, popped from ``state``)."""
        self = cls.__new__(cls)
        self.base, self.adapters = model, adapters
        self.active = state.pop("_active", [])
        self.disabled = state.pop("_disabled", 0)
        self.sites = state.pop("_sites", {})
        self.merged = state.pop("_merged", [])
        self.backups = state.pop("_backups", {})
        self.grad_flags = state.pop("_grad_flags", {})
        self.hook_layout = state.pop("_hook_layout", hook_layout_id(self.sites.values()))
        self.slots_reserved = state.pop("_slots_reserved", False)
        self.rows_assigned = False
        self.tensor_parallel = state.pop("_tensor_parallel", False)
        self.unpack_hook = None
        return self

    def release(self, model: nn.Module) -> None:
        """Undo the constructor (a failed ``from_config`` / ``from_pretrained``)."""
        self.restore_grad_flags()
        self.unguard_4bit()
        _WRAPPED.pop(model, None)

    def guard_4bit(self, model: nn.Module) -> None:
        """On a model holding bitsandbytes 4-bit linears, add a forward pre-hook that
        gives every 4-bit weight bitsandbytes repacked for its CPU inference kernel its
        own layout back before a forward with autograd (such a forward fails inside
        bitsandbytes otherwise: see :func:`tinytune.weights.unpack_cpu_4bit`). Removed
        by ``unload`` and ``swap_base_model``."""
        self.unguard_4bit()
        if has_4bit(model):
            self.unpack_hook = model.register_forward_pre_hook(unpack_before_autograd)

    def unguard_4bit(self) -> None:
        hook, self.unpack_hook = getattr(self, "unpack_hook", None), None
        if hook is not None:
            hook.remove()

    def model(self) -> nn.Module:
        """The base model.

        Raises:
            AdapterStateError: After ``unload()`` (no model then).
        """
        model = self.base
        if model is None:
            raise AdapterStateError(
                "This wrapper has no base model (it was unloaded); attach one with "
                "swap_base_model(model)."
            )
        return model

    def set_model(self, model: nn.Module) -> None:
        """Hold ``model`` (after ``swap_base_model`` checked it)."""
        self.base = model

    def add_adapter(self, adapter_name: str = "default", activate: bool = True) -> None:
        """See ``AdapterWrapper.add_adapter``."""
        self.check_new_name(adapter_name)
        if not isinstance(activate, bool):
            # PEFT's add_adapter(adapter_name, peft_config) would land a config here and
            # silently create an empty adapter.
            raise wrong_type(
                "activate", "True or False", activate,
                " To add an adapter from a config, call add_adapter_from_config(config, adapter_name).",
            )
        self.adapters[adapter_name] = Adapter(adapter_name)
        if activate:
            self.active.append(adapter_name)

    def add_adapter_layer(
        self, adapter_name: str, layer_name: str, layer: Any, slots: Any = None
    ) -> AdapterLayer:
        """See ``AdapterWrapper.add_adapter_layer``; ``slots``: the reserved slots\' hooks
        (:func:`tinytune.serving.slot_hooks`), or ``None``."""
        adapter = self.get(adapter_name)
        if adapter_name in self.merged:
            raise AdapterStateError(
                f"Adapter {adapter_name!r} is merged; call unmerge_adapters() before adding layers."
            )
        module = self.module(layer_name)
        if layer_name in adapter:
            raise LayerAlreadyAdaptedError(
                f"Adapter {adapter_name!r} already has a layer on {layer_name!r}; delete the "
                "adapter or use another adapter name to stack a second layer on it."
            )
        instance = layer_factory(layer)()
        if not isinstance(instance, AdapterLayer):
            raise wrong_type(
                "layer", "an AdapterLayer, or a class or factory that returns one", instance,
                " (what the factory returned; a factory must return the layer, e.g. "
                "lambda: LinearLoraLayer(r=16), and a custom layer must subclass "
                "tinytune.AdapterLayer)",
            )
        if any(instance is l for a in self.adapters.values() for _, l in a.items()):
            raise LayerAlreadyAdaptedError(
                "This layer instance is already attached; pass a class or a factory to "
                "create a fresh layer for each module."
            )
        reset_params(instance, layer_name, module)
        device = device_of(module)
        if device is not None:
            instance.to(device)
        if slots is not None:
            probe = Adapter(adapter_name)
            probe.layers[layer_key(layer_name)] = instance
            slots.check_attach(probe)  # a rank above reserved slots' max_rank
        adapter.layers[layer_key(layer_name)] = instance
        site = self.sites.get(layer_name)
        if site is None:
            site = self.sites[layer_name] = HookSite(layer_name, module)
        site.layers[adapter_name] = instance
        self.refresh()
        if slots is not None:
            slots.on_attach(adapter_name)
        return instance

    def set_active_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Make exactly these adapters active, in this order (an empty list: none)."""
        names = self.names(adapter_names)
        if len(set(names)) != len(names):
            raise InvalidConfigError(f"Adapter names repeat in {names!r}; name each once.")
        self.active = names
        self.refresh()

    def delete_adapter(self, adapter_name: str) -> Adapter:
        """Remove an adapter and its layers (it must not be merged); returns it."""
        self.get(adapter_name)
        if adapter_name in self.merged:
            raise AdapterStateError(
                f"Adapter {adapter_name!r} is merged; call unmerge_adapters() before deleting it."
            )
        for site in self.sites.values():
            site.layers.pop(adapter_name, None)
        if adapter_name in self.active:
            self.active.remove(adapter_name)
        adapter = self.adapters[adapter_name]
        del self.adapters[adapter_name]
        self.refresh()
        return adapter

    def merge_adapters(self, adapter_names: str | Sequence[str] | None = None, slots: Any = None) -> None:
        """Fold adapters into the base weights (default: the active ones).

        Before a module's first merge its tensors are copied to host (CPU) memory, so
        :meth:`unmerge_adapters` restores them bit-exactly while the model's device
        holds no second copy; the update itself is added in row chunks, so the extra
        device memory at any moment is a fraction of one module's weight. A merged
        adapter runs no hook at all. ``slots`` as in :meth:`add_adapter_layer`.

        Raises:
            AdapterNotFoundError: For an unknown name.
            MergeNotSupportedError: If a layer cannot merge, or its module's weights are
                tied to another module's (merging would change both); nothing is merged
                then.
            AdapterStateError: Inside a ``disable_adapter()`` block.
        """
        todo = self.mergeable(adapter_names)
        before = list(self.merged)
        try:
            for name in todo:
                self.merge_one(name, slots=slots)
        except BaseException:
            self.restore_all()
            self.merged = []
            for name in before:
                self.merge_one(name, slots=slots)
            self.refresh()
            raise
        self.refresh()

    def mergeable(self, adapter_names: str | Sequence[str] | None, dequantize: bool = False) -> list[str]:
        """The adapters a merge would fold in, checked first so a refused merge changes
        nothing. A module with a quantized weight refuses a merge (its data would be
        corrupted) unless ``dequantize`` (``merge_and_unload(dequantize=True)``, which
        merges into a dequantized float copy)."""
        if self.disabled:
            raise AdapterStateError(
                "Adapters are disabled (inside a disable_adapter() block); merge after the "
                "block exits."
            )
        names = self.active if adapter_names is None else self.names(adapter_names)
        todo = [n for n in names if n not in self.merged]
        owners: dict[int, list[str]] | None = None
        for name in todo:
            for path, layer in self.get(name).items():
                if not layer.can_merge:
                    raise MergeNotSupportedError(
                        f"Layer {path!r} of adapter {name!r} ({type(layer).__name__}) does not "
                        "implement merge(); nothing was merged. Keep it unmerged, or implement "
                        "merge(module)."
                    )
                module = self.sites[path].module
                if not dequantize and is_quantized(module, path):
                    raise quantized_merge_error(
                        f"{path!r} (adapter {name!r}, a {type(module).__name__})",
                        weight_kind(module, path),
                    )
                if owners is None:
                    owners = _param_owners(self.model())
                _check_not_tied(path, name, self.sites[path].module, owners)
        return todo

    def unmerge_adapters(self, adapter_names: str | Sequence[str] | None = None, slots: Any = None) -> None:
        """Undo merges (default: all), restoring the original weights bit-exactly.

        The saved host copies are copied back in place: no device memory is allocated
        (adapters that stay merged are then merged again).
        """
        names = list(self.merged) if adapter_names is None else self.names(adapter_names)
        keep = [n for n in self.merged if n not in names]
        self.restore_all()
        self.merged = []
        for name in keep:
            self.merge_one(name, slots=slots)
        self.refresh()

    def unload(self) -> nn.Module:
        """Remove every hook, undo merges and return the base model as it was.

        The wrapper keeps its adapters; :meth:`swap_base_model` attaches them again.
        """
        model = self.model()
        self.restore_all()
        self.merged = []
        for adapter in self.adapters.values():
            for _, layer in adapter.items():
                layer.merged = False
        return self.detach(model)

    def unload_merged(self, model: nn.Module) -> nn.Module:
        """The end of ``merge_and_unload``, once every adapter is merged without a
        backup: drop the host copies of earlier merges and detach."""
        self.backups.clear()
        self.merged = []
        for adapter in self.adapters.values():
            for _, layer in adapter.items():
                layer.merged = False
        return self.detach(model)

    def merge_dequantized_and_unload(self, adapter_names: Sequence[str], slots: Any = None) -> nn.Module:
        """``merge_and_unload(dequantize=True)``: a float model with ``adapter_names``
        (checked by ``mergeable(..., dequantize=True)``) merged in, hooks off.

        Every module of the model with a quantized weight (adapted or not) is replaced
        by a plain ``nn.Linear`` holding its dequantized weight (see
        :func:`tinytune.weights.dequantized_linear`), into which its adapter layers are
        merged as into any float weight (the fp32 sum ``dequant(W) + delta``, rounded once
        to the weight's dtype). The float copies are built first, so an error there (out
        of memory) changes nothing; the float modules are then merged in place, as
        ``merge_and_unload()`` does, and the quantized modules swapped out last. A
        transformers model's quantization config is removed once no quantized module
        is left.
        """
        model = self.model()
        quantized = quantized_modules(model)
        default = model_float_dtype(model, quantized)
        modules = dict(model.named_modules())
        pins = slots.pin(list(adapter_names)) if slots is not None and adapter_names else None
        try:
            floats: dict[str, nn.Module] = {}
            for path in quantized:
                module = modules[path]
                site = self.sites.get(path)
                layers = [site.layers[n] for n in adapter_names if site is not None and n in site.layers]
                saved = [layer for layer in layers if isinstance(layer, ModulesToSaveLayer)]
                if saved:  # the adapter trains a copy: that copy (dequantized) replaces it
                    module, layers = saved[-1].module_copy, layers[layers.index(saved[-1]) + 1:]
                linear = dequantized_linear(module, float_dtype(module, default, path), path)
                linear.requires_grad_(self.grad_flags.get(f"{path}.weight", False))
                with torch.no_grad():
                    for layer in layers:
                        layer.merge(linear)
                floats[path] = linear
            for name in adapter_names:
                for path, layer in self.get(name).items():
                    if path not in floats:
                        layer.merge(self.sites[path].module)
        finally:
            if pins is not None:
                pins.release()
        self.unload_merged(model)
        for path, linear in floats.items():
            model.set_submodule(path, linear)
        quantizer = getattr(model, "hf_quantizer", None)
        if floats and quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
            quantizer.remove_quantization_config(model)
        return model

    def swap_base_model(self, new_model: nn.Module) -> nn.Module | None:
        """Move every adapter onto ``new_model``, a structurally identical model.

        Returns:
            The previous base model, unhooked (``None`` after ``unload``).

        Raises:
            AdapterStateError: If an adapter is merged, or another wrapper's adapter hooks
                are on ``new_model``.
            LayerNotFoundError / UnsupportedModuleError: If ``new_model`` lacks an
                adapted module or has one of another type, shape or settings (a
                ``Conv2d``'s stride, padding, ...: its ``extra_repr``), or dtypes other
                than a ``modules_to_save`` copy's there. Nothing changes then.
        """
        if self.merged:
            raise AdapterStateError(
                f"Adapters {self.merged!r} are merged; call unmerge_adapters() before swapping."
            )
        if not isinstance(new_model, nn.Module):
            raise wrong_type("new_model", "a torch nn.Module", new_model)
        _check_not_wrapped(new_model, self)
        hooked = _hooked_by_tinytune(new_model, own=list(self.sites.values()))
        if hooked is not None:
            raise AdapterStateError(
                f"Module {hooked!r} of new_model already carries adapter hooks from another "
                "AdapterWrapper; call that wrapper's unload() first."
            )
        new_modules = dict(new_model.named_modules())
        moved: dict[str, nn.Module] = {}
        for path, site in self.sites.items():
            if path not in new_modules:
                raise LayerNotFoundError(
                    f"The new base model has no module {path!r}, which adapters "
                    f"{list(site.layers)!r} adapt.{suggest(path, new_modules)}"
                )
            new = new_modules[path]
            _check_same_shape(path, site.module, new)
            _check_same_dtypes(path, list(site.layers.values()), new)
            moved[path] = new
        old = self.base
        for site in self.sites.values():
            site.remove_hooks()
        self.unguard_4bit()
        if old is not None:
            self.restore_grad_flags()
            _WRAPPED.pop(old, None)
        self.base = new_model
        self.freeze(new_model)
        _WRAPPED[new_model] = weakref.ref(self)
        self.guard_4bit(new_model)
        for path, site in self.sites.items():
            site.module = moved[path]
            site.chain = ()
            device = device_of(moved[path])
            if device is not None:
                for layer in site.layers.values():
                    layer.to(device)
        self.refresh()
        return old

    def check_new_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name:
            raise InvalidConfigError(f"adapter_name must be a non-empty string, got {adapter_name!r}.")
        if "." in adapter_name or adapter_name == BASE_ADAPTER_NAME:
            raise InvalidConfigError(
                f"adapter_name {adapter_name!r} is reserved or contains a dot; pick another name."
            )
        if adapter_name not in self.adapters and hasattr(self.adapters, adapter_name):
            # nn.ModuleDict refuses names of its own attributes with a bare KeyError.
            raise InvalidConfigError(
                f"adapter_name {adapter_name!r} is reserved (a method or attribute of "
                "torch's nn.ModuleDict, which holds the adapters); pick another name, e.g. "
                f"{adapter_name + '_adapter'!r}."
            )
        if adapter_name in self.adapters:
            raise AdapterExistsError(
                f"An adapter named {adapter_name!r} already exists; pick another name or "
                "delete_adapter() it first."
            )

    def get(self, adapter_name: str) -> Adapter:
        if not isinstance(adapter_name, str) or adapter_name not in self.adapters:
            raise AdapterNotFoundError(
                f"No adapter named {adapter_name!r}; existing adapters: "
                f"{list(self.adapters)!r}.{suggest(str(adapter_name), self.adapters)}"
            )
        return self.adapters[adapter_name]  # type: ignore[return-value]

    def names(self, adapter_names: str | Sequence[str], what: str = "adapter_names") -> list[str]:
        """``adapter_names`` as a list, every name checked to exist; ``what`` is the
        argument's name in the error."""
        if isinstance(adapter_names, str):
            names = [adapter_names]
        else:
            try:
                names = list(adapter_names)
            except TypeError:
                raise wrong_type(
                    what, "an adapter name or a list of names (an empty list for none)",
                    adapter_names, f" Existing adapters: {list(self.adapters)!r}.",
                ) from None
        for name in names:
            self.get(name)
        return names

    def module(self, layer_name: str) -> nn.Module:
        model = self.model()
        modules = dict(model.named_modules())
        if not isinstance(layer_name, str) or layer_name not in modules or not layer_name:
            raise LayerNotFoundError(
                f"{type(model).__name__} has no module {layer_name!r}; use a dotted name from "
                f"named_modules().{suggest(str(layer_name), [n for n in modules if n])}"
            )
        return modules[layer_name]

    def attach(self, adapter: Adapter, activate: bool, slots: Any = None) -> None:
        """Attach a built ``adapter`` (see :func:`tinytune.adapter.build_adapter`) to
        the model's modules; ``slots`` as in :meth:`add_adapter_layer`."""
        model = self.model()
        if slots is not None:
            slots.check_attach(adapter)  # before anything changes
        modules = dict(model.named_modules())
        missing = [path for path in adapter.layer_names if path not in modules]
        if missing:  # checked before anything is registered
            raise LayerNotFoundError(
                f"{type(model).__name__} has no module {missing[0]!r}; use a dotted name "
                f"from named_modules().{suggest(missing[0], [n for n in modules if n])}"
            )
        self.adapters[adapter.name] = adapter
        for path, layer in adapter.items():
            site = self.sites.get(path)
            if site is None:
                site = self.sites[path] = HookSite(path, modules[path])
            site.layers[adapter.name] = layer
        if activate:
            self.active.append(adapter.name)
        self.refresh()
        if slots is not None:
            slots.on_attach(adapter.name)

    def refresh(self) -> None:
        """Re-derive every site's hook chain from the active and merged adapters."""
        if self.base is None:
            return
        for path in list(self.sites):
            site = self.sites[path]
            if not site.layers:
                site.remove_hooks()
                del self.sites[path]
                continue
            chain = tuple(
                site.layers[name]
                for name in self.active
                if name in site.layers and name not in self.merged and not self.disabled
            )
            site.set_chain(chain)
            for layer in chain:
                if is_dora(layer):
                    # Eagerly, so a compiled graph (which reads the cached scale as it
                    # is) never sees a scale from before this change.
                    layer.dora_scale(site.module)
        self.note_hook_layout()

    def note_hook_layout(self) -> None:
        """Number the current set of hooked modules, for ``forward`` to read.

        torch.compile does not guard on a module's hook dicts while they are empty
        (``torch._dynamo.config.skip_nnmodule_hook_guards``): a graph compiled while a
        module had no hook keeps running after one is added there (unmerging, or
        activating an adapter on a module that had none), silently dropping the adapter.
        ``forward`` reads this number, so the compiled graph is guarded on it: a new
        layout recompiles (or reuses the graph already compiled for it), while switching
        between adapters with the same layout does not. Hooks that are present are
        guarded by dynamo itself.
        """
        self.hook_layout = hook_layout_id(self.sites.values())

    def merge_one(self, adapter_name: str, backup: bool = True, slots: Any = None) -> None:
        # With reserved slots, an adapter outside a slot has its weights in host memory:
        # merge it from its slot (on the model's device) instead.
        pins = slots.pin([adapter_name]) if slots is not None else None
        try:
            self._merge_layers(adapter_name, backup)
        finally:
            if pins is not None:
                pins.release()
        self.merged.append(adapter_name)

    def _merge_layers(self, adapter_name: str, backup: bool) -> None:
        for path, layer in self.get(adapter_name).items():
            module = self.sites[path].module
            if backup and path not in self.backups:
                # Host memory: an exact copy on the model's device would double it.
                self.backups[path] = {
                    k: t.detach().to("cpu", copy=True)
                    for k, t in module.state_dict(keep_vars=True).items()
                }
            self._set_norm_bases(path)
            layer.merge(module)
            layer.merged = True

    def _set_norm_bases(self, path: str) -> None:
        """Hand the DoRA layers at ``path`` the module's original weight (the merge
        backup; ``None`` without merges): their norms are over it (see
        ``DoraLayer.norm_base``)."""
        saved = self.backups.get(path)
        site = self.sites.get(path)
        if site is None:
            return
        for layer in site.layers.values():
            if is_dora(layer):
                layer.norm_base = None if saved is None else saved.get("weight")

    def restore_all(self) -> None:
        with torch.no_grad():
            for path, saved in self.backups.items():
                current = self.sites[path].module.state_dict(keep_vars=True)
                for k, t in saved.items():
                    current[k].copy_(t)
        paths = list(self.backups)
        self.backups.clear()
        for path in paths:
            self._set_norm_bases(path)

    @contextlib.contextmanager
    def unmerged(self, slots: Any = None) -> Iterator[None]:
        """Context manager: every merge undone inside the block (the original weights
        back), the same adapters merged again on exit over what the block left there
        (``load_state_dict``); ``slots`` as in :meth:`add_adapter_layer`."""
        merged = list(self.merged)
        if merged:
            self.restore_all()
            self.merged = []
        try:
            yield
        finally:
            if merged:
                for name in merged:
                    self.merge_one(name, slots=slots)
                self.refresh()

    def unmerged_state(self, state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """``state`` (the wrapper's state dict, base keys ``<prefix>model.<path>.<name>``)
        with the original tensors of merged modules, from the host copies the merges
        saved (CPU tensors), in place of the merged ones: a state dict then means the
        same merged or not. (PEFT's holds the merged weights, which a fresh wrapper
        would adapt a second time.)"""
        for path, saved in self.backups.items():
            for k, t in saved.items():
                key = f"{prefix}model.{path}.{k}"
                if key in state:
                    state[key] = t
        return state
        for adapter in self.adapters.values():
            for _, layer in adapter.items():
                layer.merged = False

    def detach(self, model: nn.Module) -> nn.Module:
        for site in self.sites.values():
            site.remove_hooks()
            site.chain = ()
        self.unguard_4bit()
        self.restore_grad_flags()
        self.base = None
        _WRAPPED.pop(model, None)
        return model

    def freeze(self, model: nn.Module) -> None:
        self.grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)

    def restore_grad_flags(self) -> None:
        model = self.base
        if model is None:
            return
        for n, p in model.named_parameters():
            if n in self.grad_flags:
                p.requires_grad_(self.grad_flags[n])
        self.grad_flags = {}
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: run the bare base model inside it (PEFT's name).

        Inside the block no adapter runs, including rows of a mixed call
        (``adapter_names=``), as in PEFT. The adapter state stays the wrapper's own:
        ``active_adapters`` keeps reporting the active set, and calls made inside the
        block act on it for good: ``set_active_adapters``, ``add_adapter(activate=True)``
        and ``delete_adapter`` change the set that applies again when the block exits
        (nothing is reverted on exit). Merging inside the block is refused (the merged
        update would live in the weights, so the block would no longer run the base
        model). Blocks may nest.

        Raises:
            AdapterStateError: If an adapter is merged (its update lives in the weights).
        """
        if self.merged:
            raise AdapterStateError(
                f"Adapters {self.merged!r} are merged into the weights; call "
                "unmerge_adapters() before disabling adapters."
            )
        self.disabled += 1
        self.refresh()
        try:
            yield
        finally:
            self.disabled -= 1
            self.refresh()



def _param_owners(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> ["<module path>.<name>", ...]``, listing tied parameters once
    per module that holds them."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for pname, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append(f"{path}.{pname}" if path else pname)
    return owners


def _check_not_tied(path: str, adapter_name: str, module: nn.Module, owners: dict) -> None:
    """Refuse to merge into a module whose weights another module also uses (tied input
    and output embeddings): the merge would change that module too, so merged and
    unmerged outputs would differ."""
    for pname, param in module.named_parameters():
        full = f"{path}.{pname}"
        others = [o for o in owners.get(id(param), []) if o != full and not o.startswith(path + ".")]
        if others:
            raise MergeNotSupportedError(
                f"Cannot merge adapter {adapter_name!r}: {full!r} is tied to {others[0]!r} (the "
                "same tensor), so merging into it would change that module too; nothing was "
                "merged. Keep the adapter unmerged, or untie the weights before wrapping, e.g. "
                f"model.{full} = nn.Parameter(model.{full}.detach().clone())."
            )


# base model -> the wrapper holding it, so a second wrapper is refused even when the
# first has no hook on the model (its adapters inactive): the second would record the
# first one's frozen requires_grad flags as the originals.
_WRAPPED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _check_not_wrapped(model: nn.Module, own: "AdapterRegistry | None") -> None:
    ref = _WRAPPED.get(model)
    other = ref() if ref is not None else None
    if other is None or other is own or other.base is not model:
        return
    raise AdapterStateError(
        f"This {type(model).__name__} is already wrapped by another AdapterWrapper (its "
        "adapters may be inactive, so it carries no hook). Add adapters to that wrapper, "
        "or call its unload() (or merge_and_unload()) first, or wrap a fresh model."
    )


def _hooked_by_tinytune(model: nn.Module, own: Sequence[HookSite] = ()) -> str | None:
    """The name of the first module holding a hook of a tinytune HookSite (other than
    ``own``), if any."""
    own_ids = {id(site) for site in own}
    for name, module in model.named_modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook in hooks.values():
                site = getattr(hook, "__self__", None)
                if isinstance(site, HookSite) and id(site) not in own_ids:
                    return name
    return None


def _check_same_shape(path: str, old: nn.Module, new: nn.Module) -> None:
    weight_kind(new, path)  # a weight of no known kind is refused
    if type(old) is not type(new):
        raise UnsupportedModuleError(
            f"Module {path!r} is {type(new).__name__} in the new base model but "
            f"{type(old).__name__} in the old one; swap_base_model needs the same structure."
        )
    old_shapes = {k: tuple(v.shape) for k, v in old.state_dict().items()}
    new_shapes = {k: tuple(v.shape) for k, v in new.state_dict().items()}
    if old_shapes != new_shapes:
        raise UnsupportedModuleError(
            f"Module {path!r} has shapes {new_shapes} in the new base model but {old_shapes} "
            "in the old one; swap_base_model needs the same shapes."
        )
    # The module's settings (a Conv2d's stride, padding, dilation, groups; an
    # Embedding's padding_idx; ...), which adapter layers copied when they were built
    # (a Conv2d LoRA's A, a modules_to_save copy).
    if old.extra_repr() != new.extra_repr():
        raise UnsupportedModuleError(
            f"Module {path!r} is {type(new).__name__}({new.extra_repr()}) in the new base model "
            f"but {type(old).__name__}({old.extra_repr()}) in the old one; its adapters were "
            "built for the old settings. swap_base_model needs modules with the same settings."
        )


def _check_same_dtypes(path: str, layers: Sequence[AdapterLayer], new: nn.Module) -> None:
    """A ``modules_to_save`` copy replaces the module's output, so it must compute in
    the new module's dtypes (a float32 copy in a bfloat16 model would hand float32 to
    the next layer)."""
    new_dtypes = {k: v.dtype for k, v in new.state_dict().items()}
    for layer in layers:
        if isinstance(layer, ModulesToSaveLayer):
            copy_dtypes = {k: v.dtype for k, v in layer.module_copy.state_dict().items()}
            if copy_dtypes != new_dtypes:
                raise UnsupportedModuleError(
                    f"Module {path!r} has dtypes {_fmt_dtypes(new_dtypes)} in the new base model, "
                    f"but its modules_to_save copy has {_fmt_dtypes(copy_dtypes)}. Convert the "
                    "new model to the copy's dtype, or convert the wrapper first "
                    "(wrapper.to(dtype) converts the copies too), then swap."
                )


def _fmt_dtypes(dtypes: dict) -> str:
    return "{" + ", ".join(f"{k}: {str(v).replace('torch.', '')}" for k, v in dtypes.items()) + "}"


def wrapped_by(model: nn.Module) -> "AdapterRegistry | None":
    """The registry (of a live wrapper) holding ``model``, if any."""
    ref = _WRAPPED.get(model)
    return ref() if ref is not None else None


hooked_by_tinytune = _hooked_by_tinytune
