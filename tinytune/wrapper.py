"""``AdapterWrapper``: adapters on a base model, through hooks only.

The wrapper holds the base model and a dict of adapters. Each adapter maps dotted
module names to :class:`~tinytune.layers.AdapterLayer` objects; each adapted module has
one :class:`~tinytune.hooks.HookSite`. No module of the base model is ever replaced,
added or patched: removing the hooks (``unload``) gives back the original model, with
its ``state_dict`` bit-identical to before.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import os
import re
import weakref
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .config import AdapterConfig, layer_factory, name_matches
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterStateError,
    InvalidConfigError,
    LayerAlreadyAdaptedError,
    LayerNotFoundError,
    MergeNotSupportedError,
    NoMatchingModulesError,
    UnsupportedModuleError,
    check_bool,
    check_path,
    suggest,
    wrong_type,
)
from .hooks import HookSite, hook_layout_id
from .layers import AdapterLayer, ModulesToSaveLayer
from .training import present_forward_signature

__all__ = ["Adapter", "AdapterWrapper", "BASE_ADAPTER_NAME"]

#: The name that selects "no adapter" for a row of a mixed batch (PEFT's convention).
BASE_ADAPTER_NAME = "__base__"


def _key(path: str) -> str:
    # nn.ModuleDict keys cannot contain dots, so dots become "/". A "/" (or "%") inside
    # a module name (legal in nn.ModuleDict) is percent-escaped first, so every path
    # maps back to itself; so is a first character that would make the key a
    # ModuleDict attribute ("keys", "items", "training", ...). Ordinary names keep
    # their old keys ("layers/0/q_proj"), so existing state dicts still load.
    key = path.replace("%", "%25").replace("/", "%2F").replace(".", "/")
    if hasattr(nn.ModuleDict, key) or key in _MODULE_DICT_ATTRS:
        key = f"%{ord(key[0]):02X}{key[1:]}"
    return key


def _path(key: str) -> str:
    return re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), key.replace("/", "."))


# Instance attributes of every nn.ModuleDict (hasattr on the class misses them).
_MODULE_DICT_ATTRS = frozenset(vars(nn.ModuleDict()))


class _PathPrefix(nn.Module):
    """A step along a dotted layer path inside an :class:`_LayerDict` (``get_submodule``
    walks ``layers.model.layers.0...`` one name at a time); owns nothing."""

    def __init__(self, owner: "_LayerDict", prefix: str) -> None:
        super().__init__()
        self.__dict__["_owner"] = owner  # not registered as a child
        self.__dict__["_prefix"] = prefix

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            return super().__getattr__(name)
        return self.__dict__["_owner"]._lookup(f"{self.__dict__['_prefix']}.{name}")


class _LayerDict(nn.ModuleDict):
    """The layers of an :class:`Adapter`, keyed by module path.

    ``nn.ModuleDict`` keys cannot hold dots, so paths are stored with ``/``; everything a
    user sees shows the dotted path instead: ``named_parameters()`` /
    ``named_modules()`` / ``state_dict()`` keys (``adapters.default.layers.model.
    layers.0.self_attn.q_proj.lora_A.weight``), ``load_state_dict``, ``repr`` and
    ``get_submodule``/``get_parameter`` with those names. (One adapter with layers on
    both a module and one of its children, ``block`` and ``block.fc``, is the exception
    for ``get_submodule``: ``...layers.block`` is the first layer, so the walk cannot go
    on to ``fc``; names and ``state_dict`` still work.)
    """

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        if memo is None:
            memo = set()
        if remove_duplicate:
            if self in memo:
                return
            memo.add(self)
        yield prefix, self
        for key, module in self._modules.items():
            if module is None:
                continue
            sub = prefix + ("." if prefix else "") + _path(key)
            yield from module.named_modules(memo, sub, remove_duplicate)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False):
        if args:  # the legacy positional form (destination, prefix, keep_vars)
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if destination is None:
            destination = collections.OrderedDict()
            destination._metadata = collections.OrderedDict()  # type: ignore[attr-defined]
        for key, module in self._modules.items():
            if module is not None:
                module.state_dict(destination=destination, prefix=f"{prefix}{_path(key)}.", keep_vars=keep_vars)
        return destination

    def _load_from_state_dict(self, state_dict, prefix, *args: Any) -> None:
        # Rename "<prefix><dotted path>.x" to the stored "<prefix><key>.x" before the
        # children look for their entries; the longest paths first, so a layer on
        # "a.b" never takes the keys of one on "a.b.c".
        for key in sorted(self._modules, key=len, reverse=True):
            dotted = f"{prefix}{_path(key)}."
            stored = f"{prefix}{key}."
            if dotted == stored:
                continue
            for name in [n for n in state_dict if n.startswith(dotted)]:
                state_dict[stored + name[len(dotted):]] = state_dict.pop(name)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _lookup(self, path: str) -> nn.Module:
        modules = self.__dict__.get("_modules") or {}
        key = _key(path)
        if key in modules:
            return modules[key]
        if any(k.startswith(key + "/") for k in modules):
            return _PathPrefix(self, path)
        raise AttributeError(f"This adapter has no layer on {path!r}.")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or not self.__dict__.get("_modules"):
                raise
            return self._lookup(name)

    def __repr__(self) -> str:
        lines = [f"({_path(k)}): " + nn.modules.module._addindent(repr(m), 2) for k, m in self._modules.items()]
        if not lines:
            return f"{type(self).__name__}()"
        return f"{type(self).__name__}(\n  " + "\n  ".join(lines) + "\n)"


class Adapter(nn.Module):
    """One named adapter: a set of adapter layers, keyed by dotted module name.

    Args:
        name: The adapter's name.
        config: The config it was built from, if any (kept for saving).
    """

    def __init__(self, name: str, config: AdapterConfig | None = None) -> None:
        super().__init__()
        self.name = name
        self.config = config
        self.layers = _LayerDict()
        # PEFT config fields carried through a load and a re-save unchanged
        # (task_type, base_model_name_or_path, revision); see tinytune/io.py.
        self.peft_extras: dict[str, Any] = {}

    def __contains__(self, path: str) -> bool:
        return _key(path) in self.layers

    def __getitem__(self, path: str) -> AdapterLayer:
        key = _key(path)
        if key not in self.layers:
            # A KeyError (as before), but naming the dotted path, not the internal key.
            raise KeyError(
                f"Adapter {self.name!r} has no layer on {path!r}; it has {len(self)} layers, "
                f"{'first ' if len(self) > 4 else ''}on {self.layer_names[:4]!r}."
                f"{suggest(str(path), self.layer_names)}"
            )
        return self.layers[key]  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.layers)

    def items(self) -> Iterator[tuple[str, AdapterLayer]]:
        """``(dotted module name, layer)`` pairs, in the order they were added."""
        for key, layer in self.layers.items():
            yield _path(key), layer  # type: ignore[misc]

    @property
    def layer_names(self) -> list[str]:
        return [_path(k) for k in self.layers]

    def named_adapter_parameters(self, prefix: str = "") -> Iterator[tuple[str, nn.Parameter]]:
        """``("<module path>.<param>", parameter)`` for every parameter of the adapter."""
        for path, layer in self.items():
            for pname, param in layer.named_parameters():
                yield f"{prefix}{path}.{pname}", param

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_adapter_parameters():
            yield param

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Adapters are applied through the AdapterWrapper; call it instead.")


class AdapterWrapper(nn.Module):
    """Wraps a model and applies adapters to it through forward hooks.

    The base model's parameters are frozen while wrapped (their ``requires_grad`` flags
    are restored by ``unload``/``merge_and_unload``); adapter parameters train.

    Args:
        model: The base model. It is used in place, not copied.

    Raises:
        ConfigTypeError: If ``model`` is not an ``nn.Module`` or is already a wrapper.
        AdapterStateError: If another wrapper holds ``model`` (even with no hook on it,
            its adapters inactive) or its adapter hooks are still on it.

    Example:
        >>> wrapper = AdapterWrapper.from_config(model, LoraConfig(target_modules=["q_proj"]))
        >>> out = wrapper(x)
        >>> base = wrapper.merge_and_unload()
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise wrong_type("model", "a torch nn.Module (the base model to adapt)", model)
        if isinstance(model, AdapterWrapper):
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
        self.model = model
        self.adapters = nn.ModuleDict()
        self._active: list[str] = []
        # Depth of nested disable_adapter() blocks: while > 0 no adapter runs (see there).
        self._disabled = 0
        self._sites: dict[str, HookSite] = {}
        self._merged: list[str] = []  # merge order
        self._backups: dict[str, dict[str, torch.Tensor]] = {}  # path -> original tensors
        self._grad_flags: dict[str, bool] = {}
        # Which modules carry hooks, as a small int (see _note_hook_layout).
        self._hook_layout = hook_layout_id(())
        # Set by reserve_adapter_slots(): plain calls then bring the active adapters
        # into slots first (see tinytune/serving.py); without it they cost nothing more.
        self._slots_reserved = False
        self._freeze(model)
        # inspect.signature(wrapper.forward) shows the base model's parameters (for HF
        # Trainer's remove_unused_columns); see tinytune/training.py.
        present_forward_signature(self, model)
        _WRAPPED[model] = weakref.ref(self)

    # ------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        model: nn.Module,
        config: AdapterConfig,
        adapter_name: str = "default",
        *,
        autocast_adapter_dtype: bool = False,
    ) -> "AdapterWrapper":
        """Wrap ``model`` and add one adapter built from ``config``.

        ``autocast_adapter_dtype=True`` stores the adapter's weights in float32 when the
        base model is float16/bfloat16 (PEFT's option; see
        :func:`tinytune.training.cast_adapter_dtype`).
        """
        wrapper = cls(model)
        try:
            wrapper.add_adapter_from_config(
                config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
            )
        except BaseException:
            wrapper._restore_grad_flags()
            _WRAPPED.pop(model, None)
            raise
        return wrapper

    def add_adapter(self, adapter_name: str = "default", activate: bool = True) -> None:
        """Add an empty adapter; fill it with :meth:`add_adapter_layer`.

        Args:
            adapter_name: Its name; must be new.
            activate: Add it to the active adapters (the others stay active).

        Raises:
            AdapterExistsError: If the name is taken.
            ConfigTypeError: If ``activate`` is not a bool (PEFT's ``add_adapter(name,
                config)`` passes a config there; use :meth:`add_adapter_from_config`).
        """
        self._check_new_name(adapter_name)
        if not isinstance(activate, bool):
            # PEFT's add_adapter(adapter_name, peft_config) would land a config here and
            # silently create an empty adapter.
            raise wrong_type(
                "activate", "True or False", activate,
                " To add an adapter from a config, call add_adapter_from_config(config, adapter_name).",
            )
        self.adapters[adapter_name] = Adapter(adapter_name)
        if activate:
            self._active.append(adapter_name)

    def add_adapter_from_config(
        self,
        config: AdapterConfig,
        adapter_name: str = "default",
        activate: bool = True,
        *,
        autocast_adapter_dtype: bool = False,
    ) -> None:
        """Add an adapter with a layer on every module that ``config`` targets.

        ``autocast_adapter_dtype=True``: float16/bfloat16 adapter weights (built in the
        base weights' dtype) are stored in float32 instead, as PEFT's option does.

        Raises:
            AdapterExistsError: If the name is taken.
            ConfigTypeError: If ``config`` is not a tinytune config (a dict, PEFT's
                ``LoraConfig``, ...) or ``activate``/``autocast_adapter_dtype`` not a bool.
            NoMatchingModulesError: If ``target_modules`` or ``modules_to_save`` match
                no module.
            UnsupportedModuleError: If a matched module cannot be adapted.
        """
        self._check_new_name(adapter_name)
        if not isinstance(config, AdapterConfig):
            cls = type(config)
            hint = ""
            if cls.__module__.split(".")[0] == "peft":
                hint = (
                    f" This is PEFT's {cls.__name__}; use tinytune's, which takes the same "
                    "fields: from tinytune import LoraConfig, IA3Config."
                )
            elif isinstance(config, dict):
                hint = " To build one from a dict of fields: tinytune.LoraConfig(**fields)."
            raise wrong_type(
                "config",
                "a tinytune AdapterConfig (tinytune.LoraConfig, tinytune.IA3Config, ...)",
                config,
                f" (a {cls.__module__}.{cls.__qualname__}){hint}",
            )
        check_bool(activate, "activate")
        check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        model = self._model()
        from .config import with_model_defaults

        # PEFT's defaults for a transformers model when target_modules is left out.
        config = with_model_defaults(config, model)
        named = [(n, m) for n, m in model.named_modules() if n]
        save_names = config.modules_to_save or []
        to_save = [(n, m) for n, m in named if name_matches(n, save_names)]
        saved = {n for n, _ in to_save}
        targets = [
            (n, m)
            for n, m in named
            if config.target_modules is not None
            and config.matches(n, m, model)
            # a module inside a modules_to_save copy runs as part of the copy (as in PEFT)
            and not any(n == s or n.startswith(s + ".") for s in saved)
        ]
        leaf_names = [n for n, m in named if not list(m.children())]
        if config.target_modules is not None and not targets:
            hint = ""
            if isinstance(config.target_modules, str) and config.target_modules != "all-linear":
                short = config.target_modules.rsplit(".", 1)[-1]
                hint = (
                    " A string target_modules is a regular expression that must match the "
                    f"whole dotted module name (re.fullmatch), so {config.target_modules!r} does "
                    f"not match 'layers.0.{short}'; to match by name, pass a list: "
                    f"target_modules=[{short!r}] (or a regex such as '.*{short}')."
                )
            filters = [
                f for f in ("exclude_modules", "layers_to_transform")
                if getattr(config, f, None) not in (None, [])
            ]
            if filters:
                hint += f" Check {' and '.join(filters)} too."
            raise NoMatchingModulesError(
                f"target_modules={config.target_modules!r} matches no module of "
                f"{type(model).__name__}.{hint} Module names look like: "
                f"{', '.join(repr(n) for n in leaf_names[:8])}."
            )
        if config.target_modules is None and not save_names:
            # PEFT's per-architecture defaults did not apply (not a transformers model, or
            # an architecture outside the table in tinytune/config.py).
            raise InvalidConfigError(
                "The config names no target_modules and no modules_to_save, and this model "
                "has no default targets (they exist for transformers models such as Llama, "
                "GPT-2, Mistral, Qwen, BERT, T5): pass target_modules, e.g. ['q_proj', "
                "'v_proj'] for Llama-style models, ['c_attn'] for GPT-2, or 'all-linear'."
            )
        from .config import TASK_HEAD_MODULES

        # The heads a task_type adds are optional: models name them differently.
        optional = TASK_HEAD_MODULES.get(config.task_type or "", ())
        missing = [
            s
            for s in save_names
            if s not in optional and not any(name_matches(n, [s]) for n, _ in named)
        ]
        if missing:
            raise NoMatchingModulesError(
                f"modules_to_save entries {missing!r} match no module.{suggest(missing[0], leaf_names)}"
            )
        built: list[tuple[str, AdapterLayer]] = []
        for name, module in targets:
            layer = config.make_layer(name, module)
            _reset_params(layer, name, module)
            built.append((name, layer))
        for name, module in to_save:
            layer = ModulesToSaveLayer()
            layer.reset_params(name, module)
            built.append((name, layer))
        adapter = Adapter(adapter_name, config)
        for name, layer in built:
            if config.inference_mode:
                # PEFT's inference_mode=True: the adapter is created frozen.
                layer.requires_grad_(False)
            adapter.layers[_key(name)] = layer
        if autocast_adapter_dtype:
            from .training import upcast_layers

            upcast_layers(layer for _, layer in built)
        self._attach(adapter, activate)

    def add_adapter_layer(self, adapter_name: str, layer_name: str, layer: Any) -> AdapterLayer:
        """Attach one adapter layer to the module called ``layer_name``.

        Args:
            adapter_name: An existing adapter.
            layer_name: Dotted module name, as in ``model.named_modules()``.
            layer: An ``AdapterLayer`` instance, an ``AdapterLayer`` subclass, or any
                callable returning one (``functools.partial(LinearLoraLayer, r=16)``).
                Its ``reset_params(layer_name, module)`` is called here.

        Returns:
            The attached layer instance.

        Raises:
            AdapterNotFoundError: No adapter has this name.
            LayerNotFoundError: The model has no module of this name.
            LayerAlreadyAdaptedError: The adapter already has a layer on this module.
            UnsupportedModuleError: The layer cannot adapt this module's type.
            AdapterStateError: The adapter is merged.
        """
        adapter = self._adapter(adapter_name)
        if adapter_name in self._merged:
            raise AdapterStateError(
                f"Adapter {adapter_name!r} is merged; call unmerge_adapters() before adding layers."
            )
        module = self._module(layer_name)
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
        _reset_params(instance, layer_name, module)
        device = _device_of(module)
        if device is not None:
            instance.to(device)
        from . import serving

        probe = Adapter(adapter_name)
        probe.layers[_key(layer_name)] = instance
        serving.check_attach(self, probe)  # a rank above reserved slots' max_rank
        adapter.layers[_key(layer_name)] = instance
        site = self._sites.get(layer_name)
        if site is None:
            site = self._sites[layer_name] = HookSite(layer_name, module)
        site.layers[adapter_name] = instance
        self._refresh()
        serving.on_attach(self, adapter_name)
        return instance

    # ------------------------------------------------------------------------------------
    # activation and deletion
    # ------------------------------------------------------------------------------------
    def set_active_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Make exactly these adapters active, in this order (an empty list: none)."""
        names = self._names(adapter_names)
        if len(set(names)) != len(names):
            raise InvalidConfigError(f"Adapter names repeat in {names!r}; name each once.")
        self._active = names
        self._refresh()

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """PEFT's name for :meth:`set_active_adapters`."""
        self.set_active_adapters(adapter_name)

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
        if self._merged:
            raise AdapterStateError(
                f"Adapters {self._merged!r} are merged into the weights; call "
                "unmerge_adapters() before disabling adapters."
            )
        self._disabled += 1
        self._refresh()
        try:
            yield
        finally:
            self._disabled -= 1
            self._refresh()

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters, innermost first."""
        return list(self._active)

    @property
    def active_adapter(self) -> str | None:
        """The first active adapter (PEFT's single-adapter accessor), or ``None``."""
        return self._active[0] if self._active else None

    @property
    def peft_config(self) -> dict[str, AdapterConfig | None]:
        """``{adapter name: its config}``, as PEFT's ``peft_config`` (``None`` for an
        adapter built by hand with :meth:`add_adapter_layer`)."""
        return {name: adapter.config for name, adapter in self.adapters.items()}

    @property
    def base_model(self) -> "AdapterWrapper":
        """The wrapper itself, as PEFT's ``PeftModel.base_model`` is the tuner around your
        model: ``wrapper.base_model.model`` is your model. Use :meth:`get_base_model`
        for the model itself."""
        return self

    def get_base_model(self) -> nn.Module:
        """The wrapped model (PEFT's ``get_base_model()``), with the adapter hooks on it.

        Raises:
            AdapterStateError: After ``unload()`` (the wrapper holds no model then).
        """
        return self._model()

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters currently folded into the base weights, in merge order."""
        return list(self._merged)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its layers. It must not be merged."""
        self._adapter(adapter_name)
        if adapter_name in self._merged:
            raise AdapterStateError(
                f"Adapter {adapter_name!r} is merged; call unmerge_adapters() before deleting it."
            )
        for site in self._sites.values():
            site.layers.pop(adapter_name, None)
        if adapter_name in self._active:
            self._active.remove(adapter_name)
        adapter = self.adapters[adapter_name]
        del self.adapters[adapter_name]
        self._refresh()
        from .batch import forget_adapter

        # The mixed-batch stacks must not keep the deleted adapter (or its memory) alive.
        forget_adapter(self, adapter_name, adapter)

    # ------------------------------------------------------------------------------------
    # merging and unloading
    # ------------------------------------------------------------------------------------
    def merge_adapters(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Fold adapters into the base weights (default: the active ones).

        Before a module's first merge its tensors are copied to host (CPU) memory, so
        :meth:`unmerge_adapters` restores them bit-exactly while the model's device
        holds no second copy; the update itself is added in row chunks, so the extra
        device memory at any moment is a fraction of one module's weight. A merged
        adapter runs no hook at all.

        Raises:
            AdapterNotFoundError: For an unknown name.
            MergeNotSupportedError: If a layer cannot merge, or its module's weights are
                tied to another module's (merging would change both); nothing is merged
                then.
            AdapterStateError: Inside a ``disable_adapter()`` block.
        """
        todo = self._mergeable(adapter_names)
        before = list(self._merged)
        try:
            for name in todo:
                self._merge_one(name)
        except BaseException:
            self._restore_all()
            self._merged = []
            for name in before:
                self._merge_one(name)
            self._refresh()
            raise
        self._refresh()

    def _mergeable(self, adapter_names: str | Sequence[str] | None) -> list[str]:
        """The adapters a merge would fold in, checked first so a refused merge changes
        nothing."""
        if self._disabled:
            raise AdapterStateError(
                "Adapters are disabled (inside a disable_adapter() block); merge after the "
                "block exits."
            )
        names = self._active if adapter_names is None else self._names(adapter_names)
        todo = [n for n in names if n not in self._merged]
        owners: dict[int, list[str]] | None = None
        for name in todo:
            for path, layer in self._adapter(name).items():
                if not layer.can_merge:
                    raise MergeNotSupportedError(
                        f"Layer {path!r} of adapter {name!r} ({type(layer).__name__}) does not "
                        "implement merge(); nothing was merged. Keep it unmerged, or implement "
                        "merge(module)."
                    )
                if owners is None:
                    owners = _param_owners(self._model())
                _check_not_tied(path, name, self._sites[path].module, owners)
        return todo

    def merge_adapter(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """PEFT's name for :meth:`merge_adapters`."""
        self.merge_adapters(adapter_names)

    def unmerge_adapter(self) -> None:
        """PEFT's name for :meth:`unmerge_adapters` (undo every merge)."""
        self.unmerge_adapters()

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add a LoRA adapter combining ``adapters`` with ``weights`` (PEFT's method, same
        arguments and, for ``"linear"``, ``"cat"`` and ``"svd"``, the same result).

        ``"cat"`` stacks the weighted factors (rank = sum of ranks; exactly
        ``Σ wᵢ ΔWᵢ``); ``"svd"`` keeps the top ``svd_rank`` (default: the largest rank)
        singular directions of ``Σ wᵢ ΔWᵢ``; ``"linear"`` sums the factors, each scaled
        by ``√|wᵢ sᵢ|`` (same ranks only; an approximation). The new adapter has
        ``r = lora_alpha =`` the new rank and is not activated (as in PEFT): call
        ``set_adapter(adapter_name)``. ``density``/``majority_sign_method`` belong to
        PEFT's TIES/DARE types, which tinytune does not implement.

        Raises:
            AdapterExistsError: If ``adapter_name`` is taken (PEFT silently keeps the old).
            AdapterNotFoundError: For an unknown adapter.
            InvalidConfigError: For weights that are not one number per adapter, another
                ``combination_type``, ``"linear"`` with different ranks, or two adapters
                training a copy of the same module (``modules_to_save``).
            UnsupportedModuleError: If an adapter has non-LoRA layers (IA³, custom).
            MixedBatchError: With reserved slots, if ``adapters`` are more than the slots
                (each is brought into a slot while it is read); nothing changes then.
        """
        from .serving import pin_adapters
        from .weighted import add_weighted_adapter

        pins = None
        if self._slots_reserved and isinstance(adapters, (list, tuple)):
            # With reserved slots, sources outside a slot have their weights in host
            # memory: combine them from their slots (on the model's device) instead.
            names = [n for n in adapters if isinstance(n, str) and n in self.adapters]
            pins = pin_adapters(self, names, combining=True) if len(names) == len(adapters) else None
        try:
            add_weighted_adapter(
                self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                svd_full_matrices, svd_driver, density, majority_sign_method,
            )
        finally:
            if pins is not None:
                pins.release()

    def unmerge_adapters(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Undo merges (default: all), restoring the original weights bit-exactly.

        The saved host copies are copied back in place: no device memory is allocated
        (adapters that stay merged are then merged again).
        """
        names = list(self._merged) if adapter_names is None else self._names(adapter_names)
        keep = [n for n in self._merged if n not in names]
        self._restore_all()
        self._merged = []
        for name in keep:
            self._merge_one(name)
        self._refresh()

    def unload(self) -> nn.Module:
        """Remove every hook, undo merges and return the base model as it was.

        The wrapper keeps its adapters; :meth:`swap_base_model` attaches them again.
        """
        model = self._model()
        self._restore_all()
        self._merged = []
        for adapter in self.adapters.values():
            for _, layer in adapter.items():
                layer.merged = False
        return self._detach(model)

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters, remove every hook and return the base model.

        No weight is copied: the updates are added in place (in row chunks), and copies
        saved by earlier ``merge_adapters()`` calls are dropped. Every check runs before
        the first weight changes; an error while writing (out of memory, say) can leave
        weights partly merged, since there is no copy to restore.

        Raises:
            MergeNotSupportedError, AdapterStateError: As :meth:`merge_adapters`;
                nothing changes then.
        """
        model = self._model()
        todo = self._mergeable(None)
        for name in todo:
            self._merge_one(name, backup=False)
        self._backups.clear()
        self._merged = []
        for adapter in self.adapters.values():
            for _, layer in adapter.items():
                layer.merged = False
        return self._detach(model)

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
        if self._merged:
            raise AdapterStateError(
                f"Adapters {self._merged!r} are merged; call unmerge_adapters() before swapping."
            )
        if not isinstance(new_model, nn.Module):
            raise wrong_type("new_model", "a torch nn.Module", new_model)
        _check_not_wrapped(new_model, self)
        hooked = _hooked_by_tinytune(new_model, own=list(self._sites.values()))
        if hooked is not None:
            raise AdapterStateError(
                f"Module {hooked!r} of new_model already carries adapter hooks from another "
                "AdapterWrapper; call that wrapper's unload() first."
            )
        new_modules = dict(new_model.named_modules())
        moved: dict[str, nn.Module] = {}
        for path, site in self._sites.items():
            if path not in new_modules:
                raise LayerNotFoundError(
                    f"The new base model has no module {path!r}, which adapters "
                    f"{list(site.layers)!r} adapt.{suggest(path, new_modules)}"
                )
            new = new_modules[path]
            _check_same_shape(path, site.module, new)
            _check_same_dtypes(path, list(site.layers.values()), new)
            moved[path] = new
        old = self.model
        for site in self._sites.values():
            site.remove_hooks()
        if old is not None:
            self._restore_grad_flags()
            _WRAPPED.pop(old, None)
        self.model = new_model
        self._freeze(new_model)
        present_forward_signature(self, new_model)
        _WRAPPED[new_model] = weakref.ref(self)
        for path, site in self._sites.items():
            site.module = moved[path]
            site.chain = ()
            device = _device_of(moved[path])
            if device is not None:
                for layer in site.layers.values():
                    layer.to(device)
        self._refresh()
        return old

    # ------------------------------------------------------------------------------------
    # state_dict: the same whether merged or not
    # ------------------------------------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapper's state: base model tensors and every adapter's tensors.

        While adapters are merged, the base entries of merged modules are the original
        (unmerged) tensors, taken from the host copies the merge saved (so they are CPU
        tensors): a state dict means the same thing merged or not, and loading it into a
        fresh wrapper applies each adapter once. (PEFT returns the merged weights there,
        which a fresh wrapper would then adapt a second time.)
        """
        sd = super().state_dict(*args, **kwargs)
        if self._backups:
            prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
            for path, saved in self._backups.items():
                for k, t in saved.items():
                    key = f"{prefix}model.{path}.{k}"
                    if key in sd:
                        sd[key] = t
        return sd

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a state dict from :meth:`state_dict` (base tensors unmerged).

        On a merged wrapper the merged adapters are unmerged first, the state is
        loaded, and they are merged again on top of the loaded base weights (with the
        loaded adapter weights), so unmerging later gives back the loaded base weights.
        """
        if not isinstance(state_dict, collections.abc.Mapping):
            raise wrong_type(
                "state_dict", "a dict of tensors (what wrapper.state_dict() returns)", state_dict
            )
        check_bool(strict, "strict")
        check_bool(assign, "assign")
        merged = list(self._merged)
        if merged:
            self._restore_all()
            self._merged = []
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            if merged:
                for name in merged:
                    self._merge_one(name)
                self._refresh()

    # ------------------------------------------------------------------------------------
    # parameters
    # ------------------------------------------------------------------------------------
    def named_adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``("<adapter>.<module path>.<param>", parameter)`` for every adapter."""
        for name, adapter in self.adapters.items():
            yield from adapter.named_adapter_parameters(prefix=f"{name}.")

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_adapter_parameters():
            yield param

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable parameters, all parameters)``, counted in elements."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # ------------------------------------------------------------------------------------
    # running
    # ------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the base model (with the active adapters applied).

        With ``adapter_names=[...]`` (one name per batch row) each row runs with its own
        adapter (see ``tinytune.batch``). With reserved slots (:meth:`reserve_adapter_slots`)
        a plain call first brings the active adapters into slots and pins them for the
        call.

        Raises:
            MixedBatchError: With reserved slots, if more adapters are active (unmerged)
                than there are slots; nothing changes then.
        """
        model = self._model()
        if self._hook_layout < 0:  # never true: the read makes torch.compile guard on it
            raise AdapterStateError("Corrupt hook layout; rebuild the wrapper.")
        if "adapter_names" in kwargs:
            adapter_names = kwargs.pop("adapter_names")
            if adapter_names is not None:
                return self._mixed_call(model, adapter_names, args, kwargs)
        if self._slots_reserved:
            from .serving import plain_call

            return plain_call(self, model, args, kwargs)
        return model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Call the base model's ``generate`` (transformers models)."""
        model = self._model()
        if not hasattr(model, "generate"):
            raise AttributeError(f"{type(model).__name__} has no generate() method.")
        if "adapter_names" in kwargs:
            adapter_names = kwargs.pop("adapter_names")
            if adapter_names is not None:
                return self._mixed_call(model.generate, adapter_names, args, kwargs)
        if self._slots_reserved:
            from .serving import plain_call

            return plain_call(self, model.generate, args, kwargs)
        return model.generate(*args, **kwargs)

    def _mixed_call(self, fn: Any, adapter_names: Sequence[str], args: tuple, kwargs: dict) -> Any:
        from .batch import mixed_call

        if self.__dict__.get("_tensor_parallel"):
            from .errors import MixedBatchError

            raise MixedBatchError(
                "Mixed batches (adapter_names=) are not supported on adapters sharded for "
                "tensor parallelism (tinytune.training.parallelize_adapters); run one "
                "adapter per call with set_active_adapters(), or gather the model first."
            )

        return mixed_call(self, fn, adapter_names, args, kwargs)

    # ------------------------------------------------------------------------------------
    # serving many adapters (see tinytune/serving.py)
    # ------------------------------------------------------------------------------------
    def reserve_adapter_slots(self, max_adapters: int, max_rank: int) -> None:
        """Give the mixed-batch stacks a fixed shape: ``max_adapters`` slots, LoRA padded
        to ``max_rank``, allocated once on the model's device.

        From now on any number of adapters may be loaded; those not in a slot keep
        their LoRA/IA³ weights in host memory (pinned when the model is on CUDA). A call
        with ``adapter_names=`` brings the adapters it names into slots, least recently
        used out first, copying only those (asynchronously on CUDA, ordered before the
        call's kernels). A plain call (``forward`` or ``generate`` without
        ``adapter_names``) and ``merge_adapters`` bring the active (or merged) adapters
        into slots the same way first, so they never read host memory. Loading,
        hot-swapping, evicting or changing an adapter never changes a stack's shape or
        identity, so a compiled model does not recompile for it and the stacks a
        captured CUDA graph reads stay valid (README, "Serving many adapters", says
        what capturing mixed calls takes). Calling it again re-reserves.

        Args:
            max_adapters: Number of adapter slots (distinct adapters one call may use).
            max_rank: Largest LoRA rank an adapter may have.

        Raises:
            InvalidConfigError: If an argument is not a positive integer, or a loaded
                adapter has a rank above ``max_rank`` (nothing changes then).
            AdapterStateError: If the wrapper is unloaded.
        """
        from .serving import reserve

        reserve(self, max_adapters, max_rank)

    def hotswap_adapter(self, path: str, adapter_name: str, **kwargs: Any) -> None:
        """Replace the weights (and scaling) of an existing adapter, in place, from a
        saved adapter directory (PEFT's or tinytune's format).

        Everything is read and checked before anything changes. The new adapter may
        have another rank and ``lora_alpha`` as long as it targets the same modules with
        the same kinds of layers (and, with reserved slots, fits ``max_rank``). With
        reserved slots its slot is rewritten in place, so a compiled model serving
        mixed batches does not recompile. Parameters keep their identity where the rank
        is unchanged; a new rank brings new ``lora_A`` / ``lora_B`` modules.

        Args:
            path: The adapter directory.
            adapter_name: The loaded adapter to replace.
            **kwargs: ``custom_layers`` and ``check_fingerprint``, as in
                :meth:`load_adapter`; ``is_trainable``: ``True``/``False`` makes the
                swapped adapter's parameters trainable or frozen (``requires_grad``);
                ``None`` (default) keeps them as they were, as PEFT's
                ``hotswap_adapter`` does. The adapter keeps its dtype.

        Raises:
            AdapterNotFoundError: If there is no such adapter.
            AdapterStateError: If it is merged.
            AdapterFileError: If the file targets other modules or other kinds of layers,
                or cannot be read (see :meth:`load_adapter`).
            InvalidConfigError: If its rank exceeds the reserved ``max_rank``.
            ConfigTypeError: If ``is_trainable`` is not a bool or ``None``.
        """
        from .serving import hotswap

        hotswap(self, path, adapter_name, **kwargs)

    def slot_stats(self) -> dict[str, Any]:
        """Memory and traffic of the mixed-batch stacks.

        Returns:
            A plain dict: ``device_bytes`` (the stacks, on the model's device),
            ``host_bytes`` (the host tier: weights of adapters kept outside the slots),
            ``resident`` (names of adapters in slots, most recently used first),
            ``loads`` (adapters written into a slot so far), ``evictions``, and
            ``max_adapters`` / ``max_rank`` (``None`` without reserved slots).
        """
        from .serving import stats

        return stats(self)

    # ------------------------------------------------------------------------------------
    # files (PEFT's on-disk format; see tinytune/io.py)
    # ------------------------------------------------------------------------------------
    def save_adapter(self, path: str, adapter_name: str = "default") -> None:
        """Save one adapter in PEFT's layout (``adapter_config.json`` +
        ``adapter_model.safetensors``)."""
        from .io import save_adapter

        save_adapter(self, path, adapter_name)

    def load_adapter(
        self, path: str, adapter_name: str = "default", activate: bool = True, **kwargs: Any
    ) -> None:
        """Load an adapter saved by PEFT or tinytune; activates it like ``add_adapter``.

        ``subfolder=`` (PEFT's keyword) reads ``path/subfolder``, where
        ``save_pretrained`` puts the adapters other than ``"default"``.
        ``autocast_adapter_dtype=True`` stores float16/bfloat16 weights in float32 (PEFT's
        option). The other keywords are those of :func:`tinytune.io.load_adapter`.
        """
        from .io import load_adapter

        path = check_path(path)
        subfolder = kwargs.pop("subfolder", None)
        if subfolder:
            path = os.path.join(path, check_path(subfolder, "subfolder"))
        autocast = kwargs.pop("autocast_adapter_dtype", False)
        load_adapter(self, path, adapter_name, activate=activate, **kwargs)
        if autocast:
            from .training import cast_adapter_dtype

            cast_adapter_dtype(self, adapter_name)

    def save_pretrained(
        self,
        save_directory: str,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        *,
        adapter_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Save adapters in PEFT's layout: ``"default"`` in ``save_directory`` itself,
        every other adapter in ``save_directory/<name>``.

        Args:
            save_directory: The directory (created if missing).
            safe_serialization: Must be ``True``: tinytune writes safetensors only.
            selected_adapters: The adapters to save (default: all, as in PEFT).
            save_embedding_layers: ``"auto"`` or ``False``. tinytune never changes base
                weights, so there are no embedding layers to save; ``True`` is refused.
            is_main_process: ``False`` writes nothing (the other ranks of a
                distributed run), as in PEFT.
            path_initial_model_for_weight_conversion: PEFT's PiSSA/OLoRA conversion;
                must be ``None`` (tinytune has no such adapters).
            adapter_name: tinytune's older form: save this one adapter into
                ``save_directory`` itself (not with ``selected_adapters``).

        Raises:
            AdapterNotFoundError: For an unknown name in ``selected_adapters``.
            UnsupportedArgumentError: For the values above that tinytune refuses, and
                for any other PEFT keyword (named in the message).
            AdapterFileError: See :meth:`save_adapter`. Every adapter is checked before
                any file is written.
        """
        from .errors import UnsupportedArgumentError
        from .io import save_adapters

        if kwargs:
            raise UnsupportedArgumentError(
                f"save_pretrained() got {sorted(kwargs)!r}, which tinytune does not support. "
                "It accepts save_directory, safe_serialization=True, selected_adapters, "
                "save_embedding_layers ('auto' or False), is_main_process, and "
                "adapter_name; nothing was written."
            )
        if safe_serialization is not True:
            raise UnsupportedArgumentError(
                f"save_pretrained(safe_serialization={safe_serialization!r}) is not supported: "
                "tinytune writes safetensors only (pickle files can run code when loaded). "
                "Leave safe_serialization=True; nothing was written."
            )
        save_directory = check_path(save_directory, "save_directory")
        check_bool(is_main_process, "is_main_process")
        if not (save_embedding_layers == "auto" or save_embedding_layers is False):
            raise UnsupportedArgumentError(
                f"save_pretrained(save_embedding_layers={save_embedding_layers!r}) is not "
                "supported: tinytune never changes the base model's embedding weights, so there "
                "are none to save. Use 'auto' or False; nothing was written."
            )
        if path_initial_model_for_weight_conversion is not None:
            raise UnsupportedArgumentError(
                "save_pretrained(path_initial_model_for_weight_conversion=...) converts PEFT's "
                "PiSSA/OLoRA adapters, which tinytune does not make; drop the argument. Nothing "
                "was written."
            )
        if adapter_name is not None:
            if selected_adapters is not None:
                raise UnsupportedArgumentError(
                    "Pass either adapter_name (one adapter, saved in save_directory itself) or "
                    "selected_adapters (PEFT's layout), not both; nothing was written."
                )
            items = [(adapter_name, save_directory)]
        else:
            names = list(self.adapters) if selected_adapters is None else self._names(selected_adapters)
            items = [
                (name, save_directory if name == "default" else os.path.join(save_directory, name))
                for name in names
            ]
        save_adapters(self, items, write=is_main_process)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, path: str, adapter_name: str = "default", **kwargs: Any
    ) -> "AdapterWrapper":
        """Wrap ``model`` and load the adapter saved at ``path`` (PEFT's
        ``PeftModel.from_pretrained``). Keyword arguments go to :meth:`load_adapter`."""
        wrapper = cls(model)
        try:
            wrapper.load_adapter(path, adapter_name, **kwargs)
        except BaseException:
            wrapper._restore_grad_flags()
            _WRAPPED.pop(model, None)
            raise
        return wrapper

    def __getstate__(self) -> dict:
        # The per-instance ``forward`` (the base model's signature, see
        # tinytune/training.py) is derived state: rebuilt on unpickling / deep copies.
        state = self.__dict__.copy()
        state.pop("forward", None)
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_slots_reserved", False)  # pickled before it existed
        super().__setstate__(state)
        present_forward_signature(self, self._modules.get("model"))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None:
                raise
            try:
                return getattr(model, name)
            except AttributeError:
                raise AttributeError(
                    f"'{type(self).__name__}' object has no attribute {name!r}, and neither "
                    f"has its base model ({type(model).__name__}), where the wrapper looks up "
                    "attributes it does not have."
                ) from None

    # ------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------
    def _model(self) -> nn.Module:
        model = self._modules.get("model")
        if model is None:
            raise AdapterStateError(
                "This wrapper has no base model (it was unloaded); attach one with "
                "swap_base_model(model)."
            )
        return model

    def _check_new_name(self, adapter_name: str) -> None:
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

    def _adapter(self, adapter_name: str) -> Adapter:
        if not isinstance(adapter_name, str) or adapter_name not in self.adapters:
            raise AdapterNotFoundError(
                f"No adapter named {adapter_name!r}; existing adapters: "
                f"{list(self.adapters)!r}.{suggest(str(adapter_name), self.adapters)}"
            )
        return self.adapters[adapter_name]  # type: ignore[return-value]

    def _names(self, adapter_names: str | Sequence[str], what: str = "adapter_names") -> list[str]:
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
            self._adapter(name)
        return names

    def _module(self, layer_name: str) -> nn.Module:
        model = self._model()
        modules = dict(model.named_modules())
        if not isinstance(layer_name, str) or layer_name not in modules or not layer_name:
            raise LayerNotFoundError(
                f"{type(model).__name__} has no module {layer_name!r}; use a dotted name from "
                f"named_modules().{suggest(str(layer_name), [n for n in modules if n])}"
            )
        return modules[layer_name]

    def _attach(self, adapter: Adapter, activate: bool) -> None:
        from . import serving

        model = self._model()
        serving.check_attach(self, adapter)  # before anything changes
        modules = dict(model.named_modules())
        missing = [path for path in adapter.layer_names if path not in modules]
        if missing:  # checked before anything is registered
            raise LayerNotFoundError(
                f"{type(model).__name__} has no module {missing[0]!r}; use a dotted name "
                f"from named_modules().{suggest(missing[0], [n for n in modules if n])}"
            )
        self.adapters[adapter.name] = adapter
        for path, layer in adapter.items():
            site = self._sites.get(path)
            if site is None:
                site = self._sites[path] = HookSite(path, modules[path])
            site.layers[adapter.name] = layer
        if activate:
            self._active.append(adapter.name)
        self._refresh()
        serving.on_attach(self, adapter.name)

    def _refresh(self) -> None:
        """Re-derive every site's hook chain from the active and merged adapters."""
        if self._modules.get("model") is None:
            return
        for path in list(self._sites):
            site = self._sites[path]
            if not site.layers:
                site.remove_hooks()
                del self._sites[path]
                continue
            chain = tuple(
                site.layers[name]
                for name in self._active
                if name in site.layers and name not in self._merged and not self._disabled
            )
            site.set_chain(chain)
        self._note_hook_layout()

    def _note_hook_layout(self) -> None:
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
        self._hook_layout = hook_layout_id(self._sites.values())

    def _merge_one(self, adapter_name: str, backup: bool = True) -> None:
        from .serving import pin_adapters

        # With reserved slots, an adapter outside a slot has its weights in host memory:
        # merge it from its slot (on the model's device) instead.
        pins = pin_adapters(self, [adapter_name]) if self._slots_reserved else None
        try:
            self._merge_layers(adapter_name, backup)
        finally:
            if pins is not None:
                pins.release()
        self._merged.append(adapter_name)

    def _merge_layers(self, adapter_name: str, backup: bool) -> None:
        for path, layer in self._adapter(adapter_name).items():
            module = self._sites[path].module
            if backup and path not in self._backups:
                # Host memory: an exact copy on the model's device would double it.
                self._backups[path] = {
                    k: t.detach().to("cpu", copy=True)
                    for k, t in module.state_dict(keep_vars=True).items()
                }
            layer.merge(module)
            layer.merged = True

    def _restore_all(self) -> None:
        with torch.no_grad():
            for path, saved in self._backups.items():
                current = self._sites[path].module.state_dict(keep_vars=True)
                for k, t in saved.items():
                    current[k].copy_(t)
        self._backups.clear()
        for adapter in self.adapters.values():
            for _, layer in adapter.items():
                layer.merged = False

    def _detach(self, model: nn.Module) -> nn.Module:
        for site in self._sites.values():
            site.remove_hooks()
            site.chain = ()
        self._restore_grad_flags()
        self.model = None
        present_forward_signature(self, None)
        _WRAPPED.pop(model, None)
        return model

    def _freeze(self, model: nn.Module) -> None:
        self._grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)

    def _restore_grad_flags(self) -> None:
        model = self._modules.get("model")
        if model is None:
            return
        for n, p in model.named_parameters():
            if n in self._grad_flags:
                p.requires_grad_(self._grad_flags[n])
        self._grad_flags = {}


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


def _check_not_wrapped(model: nn.Module, own: "AdapterWrapper | None") -> None:
    ref = _WRAPPED.get(model)
    other = ref() if ref is not None else None
    if other is None or other is own or other._modules.get("model") is not model:
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


def _reset_params(layer: AdapterLayer, name: str, module: nn.Module) -> None:
    """``layer.reset_params``, turning an allocation failure (an absurd rank) into an
    error that says what to change."""
    try:
        layer.reset_params(name, module)
    except (RuntimeError, MemoryError) as exc:
        if not (isinstance(exc, MemoryError) or "alloc" in str(exc) or "out of memory" in str(exc)):
            raise
        r = getattr(layer, "r", None)
        raise InvalidConfigError(
            f"Out of memory creating the {type(layer).__name__} on {name!r}"
            f"{f' with r={r}' if r is not None else ''}: {str(exc).splitlines()[0][:200]} "
            "Use a smaller rank (rank_pattern sets it per module) or free memory."
        ) from None


def _device_of(module: nn.Module) -> torch.device | None:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def _check_same_shape(path: str, old: nn.Module, new: nn.Module) -> None:
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

