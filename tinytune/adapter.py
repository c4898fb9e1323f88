"""The ``Adapter`` record (one named set of adapter layers, keyed by module path), its
key codec, and building one from a config for a model.

Floor 3: imports ``errors``, ``util``, ``weights``, ``layers`` and ``config``. Data in, ``Adapter``
out: nothing here knows about hooks, wrappers or slots.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Iterator

from torch import nn

from .config import TASK_HEAD_MODULES, AdapterConfig, check_config, name_matches, with_model_defaults
from .errors import InvalidConfigError, NoMatchingModulesError, check_bool, suggest
from .layers import AdapterLayer, ModulesToSaveLayer, upcast_layers
from .weights import weight_kind

__all__ = [
    "Adapter",
    "BASE_ADAPTER_NAME",
    "build_adapter",
    "layer_key",
    "layer_path",
    "reset_params",
]

#: The name that selects "no adapter" for a row of a mixed batch (PEFT's convention).
BASE_ADAPTER_NAME = "__base__"


def layer_key(path: str) -> str:
    """The ``nn.ModuleDict`` key of the layer on the module called ``path`` (inverse:
    :func:`layer_path`)."""
    # nn.ModuleDict keys cannot contain dots, so dots become "/". A "/" (or "%") inside
    # a module name (legal in nn.ModuleDict) is percent-escaped first, so every path
    # maps back to itself; so is a first character that would make the key a
    # ModuleDict attribute ("keys", "items", "training", ...). Ordinary names keep
    # their old keys ("layers/0/q_proj"), so existing state dicts still load.
    key = path.replace("%", "%25").replace("/", "%2F").replace(".", "/")
    if hasattr(nn.ModuleDict, key) or key in _MODULE_DICT_ATTRS:
        key = f"%{ord(key[0]):02X}{key[1:]}"
    return key


def layer_path(key: str) -> str:
    """The dotted module path stored under ``key`` (see :func:`layer_key`)."""
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
            sub = prefix + ("." if prefix else "") + layer_path(key)
            yield from module.named_modules(memo, sub, remove_duplicate)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False):
        if args:  # the legacy positional form (destination, prefix, keep_vars)
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if destination is None:
            destination = collections.OrderedDict()
            destination._metadata = collections.OrderedDict()  # type: ignore[attr-defined]
        for key, module in self._modules.items():
            if module is not None:
                module.state_dict(destination=destination, prefix=f"{prefix}{layer_path(key)}.", keep_vars=keep_vars)
        return destination

    def _load_from_state_dict(self, state_dict, prefix, *args: Any) -> None:
        # Rename "<prefix><dotted path>.x" to the stored "<prefix><key>.x" before the
        # children look for their entries; the longest paths first, so a layer on
        # "a.b" never takes the keys of one on "a.b.c".
        for key in sorted(self._modules, key=len, reverse=True):
            dotted = f"{prefix}{layer_path(key)}."
            stored = f"{prefix}{key}."
            if dotted == stored:
                continue
            for name in [n for n in state_dict if n.startswith(dotted)]:
                state_dict[stored + name[len(dotted):]] = state_dict.pop(name)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _lookup(self, path: str) -> nn.Module:
        modules = self.__dict__.get("_modules") or {}
        key = layer_key(path)
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
        lines = [f"({layer_path(k)}): " + nn.modules.module._addindent(repr(m), 2) for k, m in self._modules.items()]
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
        return layer_key(path) in self.layers

    def __getitem__(self, path: str) -> AdapterLayer:
        key = layer_key(path)
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
            yield layer_path(key), layer  # type: ignore[misc]

    @property
    def layer_names(self) -> list[str]:
        return [layer_path(k) for k in self.layers]

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


def build_adapter(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str,
    *,
    autocast_adapter_dtype: bool = False,
) -> Adapter:
    """Build (not attach) an adapter with a layer on every module of ``model`` that
    ``config`` targets (and a copy of every ``modules_to_save`` module).

    Args:
        model: The base model.
        config: A tinytune ``AdapterConfig``.
        adapter_name: The new adapter's name.
        autocast_adapter_dtype: Store float16/bfloat16 adapter weights in float32.

    Returns:
        The new ``Adapter``.

    Raises:
        NoMatchingModulesError: If ``target_modules`` or ``modules_to_save`` match no
            module.
        InvalidConfigError: If the config names no targets and the model has no defaults.
        UnsupportedModuleError: If a matched module cannot be adapted.
        ConfigTypeError: If ``config`` is not a tinytune config (a dict, PEFT's
            ``LoraConfig``, ...) or ``autocast_adapter_dtype`` not a bool.
    """
    check_config(config)
    check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
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
        reset_params(layer, name, module)
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
        adapter.layers[layer_key(name)] = layer
    if autocast_adapter_dtype:
        upcast_layers(layer for _, layer in built)
    return adapter


def reset_params(layer: AdapterLayer, name: str, module: nn.Module) -> None:
    """``layer.reset_params``, turning an allocation failure (an absurd rank) into an
    error that says what to change.

    Raises:
        UnsupportedModuleError: If ``module``'s weight is of no kind tinytune knows (see
            :func:`tinytune.weights.weight_kind`), before the layer is touched.
    """
    weight_kind(module, name)
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
