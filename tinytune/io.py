"""Adapter files in Hugging Face PEFT's on-disk format.

An adapter is a directory with two files:

* ``adapter_config.json``: PEFT's config (``peft_type``, ``r``, ``lora_alpha``,
  ``target_modules``, ``rank_pattern``, ...);
* ``adapter_model.safetensors``: the tensors, under PEFT's key names
  (``base_model.model.<dotted module path>.lora_A.weight``, ``...ia3_l``, ...).

Adapters that PEFT can express (LoRA or IA³, optionally with ``modules_to_save``) are
written exactly as PEFT writes them, so PEFT and other PEFT readers load them (vLLM
only plain LoRA files without ``modules_to_save``; see the README).
Anything else (LoRA and IA³ mixed in one adapter, custom :class:`AdapterLayer` s,
per-layer settings PEFT has no field for) is written with ``"peft_type": "TINYTUNE"``
and a ``"tinytune"`` block that lists every layer; PEFT refuses such a file loudly
instead of loading part of it.

Loading reads JSON and safetensors only, never pickle, so a file cannot run code. The
whole adapter is built and checked before anything is attached: a failed load leaves
the wrapper and the base model untouched. Saving writes each file under a temporary
name and renames it into place; the weights file records a fingerprint of the config
it belongs to, so a save interrupted between the two renames is detected on load
instead of pairing new weights with an old config.

Floor 4 (beside ``hooks`` and ``weighted``): imports ``errors``, ``util``, ``layers``,
``config`` and ``adapter``. Takes a model and ``Adapter`` objects, returns an
``Adapter``; never calls back into the wrapper.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .adapter import Adapter, layer_key
from .config import AdapterConfig, IA3Config, LoraConfig, name_matches
from .errors import (
    AdapterFileError,
    AdapterFileNotFoundError,
    AdapterSaveError,
    AdapterStateError,
    ConfigTypeError,
    InvalidConfigError,
    UnsupportedArgumentError,
    check_bool,
    check_path,
    suggest,
    wrong_type,
)
from .util import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, device_of, is_dtensor
from .layers import (
    AdapterLayer,
    Conv2dDoraLayer,
    Conv2dLoraLayer,
    EmbeddingDoraLayer,
    EmbeddingLoraLayer,
    LinearDoraLayer,
    LinearIA3Layer,
    LinearLoraLayer,
    LoraLayer,
    ModulesToSaveLayer,
    is_conv1d,
    lora_layer_for,
)

__all__ = [
    "check_save_pretrained",
    "load_options",
    "save_adapter",
    "save_adapters",
    "read_adapter",
    "read_config",
    "read_weights",
    "serialise",
    "fingerprint",
    "tensor_map",
    "layer_config",
    "INFORMATIONAL",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "LEGACY_WEIGHTS_NAME",
]


#: Prefix PEFT puts before every key (``PeftModel.base_model.model`` is the user's model).
KEY_PREFIX = "base_model.model."
#: Version of the ``"tinytune"`` block in ``adapter_config.json``.
FORMAT_VERSION = 1
#: safetensors metadata entry holding the fingerprint of the matching config.
FINGERPRINT_KEY = "tinytune_config_sha256"

# Builtin layer types, by the name written in the "tinytune" block.
_BUILTIN_TYPES: dict[str, type[AdapterLayer]] = {
    "tinytune.LinearLoraLayer": LinearLoraLayer,
    "tinytune.EmbeddingLoraLayer": EmbeddingLoraLayer,
    "tinytune.Conv2dLoraLayer": Conv2dLoraLayer,
    "tinytune.LinearDoraLayer": LinearDoraLayer,
    "tinytune.EmbeddingDoraLayer": EmbeddingDoraLayer,
    "tinytune.Conv2dDoraLayer": Conv2dDoraLayer,
    "tinytune.LinearIA3Layer": LinearIA3Layer,
    "tinytune.ModulesToSaveLayer": ModulesToSaveLayer,
}
_BUILTIN_NAMES = {cls: name for name, cls in _BUILTIN_TYPES.items()}
_DORA_TYPES = (LinearDoraLayer, EmbeddingDoraLayer, Conv2dDoraLayer)
_LORA_TYPES = (LinearLoraLayer, EmbeddingLoraLayer, Conv2dLoraLayer, *_DORA_TYPES)

# PEFT config fields that describe where the adapter came from; they never change what
# it computes. Kept out of the fingerprint so that editing them by hand stays harmless.
INFORMATIONAL = {
    "base_model_name_or_path",
    "revision",
    "task_type",
    "peft_version",
    "auto_mapping",
    "inference_mode",
}
# PEFT fields carried over from a loaded file and written back when saving again.
_CARRIED = ("base_model_name_or_path", "revision", "task_type")
# PEFT fields that only matter while initialising or choosing modules, not for loading
# trained weights: the saved keys already say which modules are adapted.
_INERT = INFORMATIONAL | {
    "init_lora_weights",
    "init_ia3_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "megatron_core",
    "qalora_group_size",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
}


def check_model(model: Any) -> nn.Module:
    """``model`` if it is an ``nn.Module`` (the base model), else raise
    :class:`~tinytune.ConfigTypeError`: io takes the model, not the wrapper's name for it."""
    if not isinstance(model, nn.Module):
        raise wrong_type(
            "model", "the base nn.Module (AdapterWrapper.get_base_model())", model,
            " To load into or save from an AdapterWrapper, call its load_adapter() or save_adapter().",
        )
    return model


# ======================================================================================
# saving
# ======================================================================================
def save_adapter(adapter: Any, model: nn.Module, path: str | os.PathLike) -> None:
    """Save one adapter as ``adapter_config.json`` + ``adapter_model.safetensors``.

    Plain LoRA and IA³ adapters (with ``modules_to_save``) are written in PEFT's format,
    readable by PEFT and PEFT-compatible servers. Other adapters are written in the same
    two files with ``"peft_type": "TINYTUNE"`` and a ``"tinytune"`` block listing every
    layer (see the README); no layer is ever left out.

    Args:
        adapter: The :class:`~tinytune.adapter.Adapter` to save. Its name is not
            stored (as in PEFT).
        model: The base model it adapts.
        path: Directory to write into; created if missing. Other files in it are kept;
            the two adapter files are replaced atomically, each one by a rename.

    Raises:
        AdapterNotFoundError: If there is no such adapter.
        AdapterFileError: If ``path`` is an existing file, the adapter has no layers,
            or a custom layer's settings cannot be stored (no ``get_config()`` although
            its constructor takes arguments, or a result JSON cannot hold). Nothing is
            written then.
    """
    save_adapters(model, [(adapter, path)])


def save_adapters(model: nn.Module, items: list[tuple[Any, Any]], write: bool = True) -> None:
    """Save several adapters of ``model``, ``[(adapter, directory), ...]``: every adapter is
    serialised and checked before the first file is written (``write=False``: check
    only). Raises as :func:`save_adapter`."""
    check_model(model)
    prepared = [_prepare_save(adapter, model, path) for adapter, path in items]
    if write:
        for args in prepared:
            _write_adapter(*args)


def _prepare_save(adapter: Any, model: nn.Module, path: Any) -> tuple:
    if not isinstance(adapter, Adapter):
        raise wrong_type(
            "adapter", "a tinytune Adapter (wrapper.adapters[name])", adapter,
            " To save an adapter by name call AdapterWrapper.save_adapter(path, adapter_name).",
        )
    adapter_name = adapter.name
    path = check_path(path)
    if any(is_dtensor(p) for p in adapter.parameters()):
        # Reading a shard's storage fails deep in torch; gathering needs every rank.
        raise AdapterStateError(
            f"Adapter {adapter_name!r} has sharded parameters (FSDP2 or tensor parallelism), "
            "which save_adapter cannot write from one process. Call "
            "tinytune.training.save_adapter_distributed(wrapper, path, adapter_name) on "
            "every rank instead: it gathers the full weights and rank 0 writes them."
        )
    if len(adapter) == 0:
        raise AdapterFileError(
            f"Adapter {adapter_name!r} has no layers, so there is nothing to save; add layers "
            "with add_adapter_layer() first."
        )
    config, tensors = serialise(adapter, model)
    config_bytes = (json.dumps(config, indent=2, sort_keys=False) + "\n").encode("utf-8")
    metadata = {"format": "pt", FINGERPRINT_KEY: fingerprint(json.loads(config_bytes))}

    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise AdapterFileError(
            f"Cannot save adapter {adapter_name!r} to {str(directory)!r}: it is a file. "
            "Pass a directory path."
        )
    return adapter_name, directory, tensors, config_bytes, metadata


def _write_adapter(
    adapter_name: str, directory: Path, tensors: dict, config_bytes: bytes, metadata: dict
) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Weights first: if the process dies between the two renames, the new weights
        # carry the fingerprint of the new config and the loader refuses the old config
        # beside them, instead of loading a mix of two adapters.
        _atomic_write(
            directory / WEIGHTS_NAME, lambda tmp: write_safetensors(tensors, tmp, metadata)
        )
        _atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_bytes(config_bytes))
    except OSError as exc:
        hint = (
            "it is a symlink to a missing target; remove the link or create its target"
            if directory.is_symlink() and not directory.exists()
            else "a part of the path is a file, not a directory"
            if isinstance(exc, (NotADirectoryError, FileExistsError))
            else "check that the directory is writable and the disk has space"
        )
        error = AdapterSaveError(
            f"Cannot save adapter {adapter_name!r} to {str(directory)!r}: "
            f"{exc.strerror or exc} ({hint}). Any earlier adapter files there are unchanged."
        )
        error.errno, error.strerror, error.filename = exc.errno, str(error.args[0]), exc.filename
        raise error from exc
    _fsync_dir(directory)


def serialise(adapter: Any, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config dict and the tensors (PEFT keys) for ``adapter``; raises before writing."""
    modules = dict(model.named_modules())
    peft_cfg = _peft_config_dict(adapter, model, modules)
    carried = {k: v for k, v in adapter.peft_extras.items() if k in _CARRIED}
    if "base_model_name_or_path" not in carried:
        name = getattr(model, "name_or_path", None)
        carried["base_model_name_or_path"] = name if isinstance(name, str) and name else None

    tensors: dict[str, torch.Tensor] = {}
    for path, layer in adapter.items():
        for suffix, (param, transposed) in tensor_map(layer).items():
            t = param.detach()
            t = t.t() if transposed else t
            # A fresh contiguous CPU copy: safetensors refuses shared or strided storage.
            tensors[f"{KEY_PREFIX}{path}.{suffix}"] = t.to("cpu", copy=True).contiguous()

    if peft_cfg is not None:
        config = {**peft_cfg, **carried}
        return config, tensors

    layers = []
    for path, layer in adapter.items():
        entry: dict[str, Any] = {"module": path, "type": _type_name(layer)}
        if type(layer) not in _BUILTIN_NAMES:
            entry["python_class"] = f"{type(layer).__module__}.{type(layer).__qualname__}"
        entry["config"] = layer_config(path, layer)
        layers.append(entry)
    config = {
        "peft_type": "TINYTUNE",
        **carried,
        "tinytune": {"format_version": FORMAT_VERSION, "layers": layers},
    }
    return config, tensors


def _type_name(layer: AdapterLayer) -> str:
    return _BUILTIN_NAMES.get(type(layer), type(layer).__qualname__)


def layer_config(path: str, layer: AdapterLayer) -> dict[str, Any]:
    """Constructor arguments recorded for one layer of a TINYTUNE-format file."""
    # The built-in layers, and subclasses that keep their constructor (a LoRA that
    # changes only post_forward, say): the constructor's arguments are known attributes.
    own_config = hasattr(layer, "get_config")
    if (
        isinstance(layer, LoraLayer)
        and type(layer).__init__ is LoraLayer.__init__
        and not own_config
    ):
        return {
            "r": layer.r,
            "lora_alpha": layer.lora_alpha,
            "lora_dropout": layer.lora_dropout,
            "use_rslora": layer.use_rslora,
        }
    if (
        isinstance(layer, LinearIA3Layer)
        and type(layer).__init__ is LinearIA3Layer.__init__
        and not own_config
    ):
        return {"is_feedforward": bool(layer.is_feedforward)}
    if type(layer) is ModulesToSaveLayer:
        return {}
    get_config = getattr(layer, "get_config", None)
    if get_config is None:
        params = [
            p.name
            for p in inspect.signature(type(layer).__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if params:
            # Its constructor arguments live outside the state_dict; saving without them
            # would silently load back a different layer.
            raise AdapterFileError(
                f"Layer {path!r} is a {type(layer).__name__}, whose constructor takes "
                f"{params!r}, but it has no get_config(): tinytune cannot know which values "
                "to store. Define get_config(self) returning those keyword arguments as a "
                "JSON-friendly dict (return {} if the defaults are right). Nothing was written."
            )
        return {}
    cfg = get_config()
    try:
        json.loads(json.dumps(cfg))
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(
            f"{type(layer).__name__}.get_config() for layer {path!r} returned something "
            f"JSON cannot store ({exc}); return a dict of plain numbers, strings, lists "
            "and dicts. Nothing was written."
        ) from None
    if not isinstance(cfg, dict):
        raise AdapterFileError(
            f"{type(layer).__name__}.get_config() for layer {path!r} must return a dict of "
            f"constructor keyword arguments, got {type(cfg).__name__}. Nothing was written."
        )
    return cfg


def tensor_map(layer: AdapterLayer) -> dict[str, tuple[torch.Tensor, bool]]:
    """File key suffix -> (the layer's tensor, whether the file stores its transpose).

    Builtin layers use PEFT's names and layouts; custom layers their own state_dict.
    """
    t = type(layer)
    if t in (LinearLoraLayer, Conv2dLoraLayer, LinearDoraLayer, Conv2dDoraLayer):
        out = {"lora_A.weight": (layer.lora_A.weight, False), "lora_B.weight": (layer.lora_B.weight, False)}
    elif t in (EmbeddingLoraLayer, EmbeddingDoraLayer):
        # PEFT's lora_embedding_A is (r, num_embeddings): our nn.Embedding weight transposed.
        out = {
            "lora_embedding_A": (layer.lora_A.weight, True),
            "lora_embedding_B": (layer.lora_B.weight, False),
        }
    else:
        out = None
    if out is not None:
        if t in _DORA_TYPES:
            # PEFT's key (its state_dict says ``lora_magnitude_vector.<adapter>.weight``,
            # its files drop the adapter name and ".weight").
            out["lora_magnitude_vector"] = (layer.lora_magnitude_vector, False)
        return out
    if t is LinearIA3Layer:
        return {"ia3_l": (layer.ia3_l, False)}
    if t is ModulesToSaveLayer:
        return {k: (v, False) for k, v in layer.module_copy.state_dict(keep_vars=True).items()}
    return {k: (v, False) for k, v in layer.state_dict(keep_vars=True).items()}


# --------------------------------------------------------------------------------------
# PEFT configs for saving
# --------------------------------------------------------------------------------------
def _peft_config_dict(adapter: Any, model: nn.Module, modules: dict[str, nn.Module]) -> dict | None:
    """A PEFT config dict describing ``adapter`` exactly, or ``None`` if PEFT cannot."""
    items = list(adapter.items())
    kinds = {_kind(layer) for _, layer in items}
    if "custom" in kinds or not kinds - {"save"} or {"lora", "ia3"} <= kinds:
        return None
    kind = "lora" if "lora" in kinds else "ia3"
    candidates: list[AdapterConfig] = []
    own = adapter.config
    if (kind == "lora" and type(own) is LoraConfig) or (kind == "ia3" and type(own) is IA3Config):
        candidates.append(own)
    candidates.extend(_derived_configs(kind, items))
    for cfg in candidates:
        if _describes(cfg, items, model, modules):
            out = cfg.to_dict()
            out["peft_type"] = cfg.peft_type
            if any(is_conv1d(modules[p]) for p, l in items if _kind(l) != "save"):
                # What PEFT itself stores once it has seen a Conv1D target.
                out["fan_in_fan_out"] = True
            return out
    return None


def _kind(layer: AdapterLayer) -> str:
    t = type(layer)
    if t in _LORA_TYPES:
        return "lora"
    if t is LinearIA3Layer:
        return "ia3"
    if t is ModulesToSaveLayer:
        return "save"
    return "custom"


def _derived_configs(kind: str, items: list[tuple[str, AdapterLayer]]) -> Iterator[AdapterConfig]:
    """Candidate configs for a hand-built adapter, most readable first."""
    adapted = [(p, l) for p, l in items if _kind(l) != "save"]
    saves = [p for p, l in items if _kind(l) == "save"] or None
    paths = [p for p, _ in adapted]
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    forms = [(short, False), (paths, False), (paths, True)]
    if kind == "lora":
        lora = [l for _, l in adapted]
        if len({l.use_rslora for l in lora}) != 1 or len({l.lora_dropout for l in lora}) != 1:
            return
        if len({type(l) in _DORA_TYPES for l in lora}) != 1:
            return  # DoRA and plain LoRA layers in one adapter: no PEFT config says that
        r = _mode([l.r for l in lora])
        alpha = _mode([l.lora_alpha for l in lora])
        for targets, escape in forms:
            key = re.escape if escape else (lambda s: s)
            try:
                yield LoraConfig(
                    target_modules=list(targets),
                    modules_to_save=saves,
                    r=r,
                    lora_alpha=alpha,
                    lora_dropout=lora[0].lora_dropout,
                    use_rslora=lora[0].use_rslora,
                    use_dora=type(lora[0]) in _DORA_TYPES,
                    rank_pattern={key(p): l.r for p, l in adapted if l.r != r},
                    alpha_pattern={key(p): l.lora_alpha for p, l in adapted if l.lora_alpha != alpha},
                )
            except InvalidConfigError:
                return
    else:
        ff = [p for p, l in adapted if l.is_feedforward]
        for targets, _ in forms[:2]:
            ff_form = sorted({p.rsplit(".", 1)[-1] for p in ff}) if targets is short else ff
            yield IA3Config(target_modules=list(targets), modules_to_save=saves, feedforward_modules=ff_form)


def _mode(values: list) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _describes(
    cfg: AdapterConfig, items: list[tuple[str, AdapterLayer]], model: nn.Module, modules: dict
) -> bool:
    """Whether PEFT (and tinytune) would rebuild exactly these layers from ``cfg``."""
    try:
        targets, saves = _selection(cfg, model, modules)
    except re.error:
        return False
    adapted = {p: l for p, l in items if _kind(l) != "save"}
    if set(adapted) != targets or {p for p, l in items if _kind(l) == "save"} != saves:
        return False
    for path, layer in adapted.items():
        module = modules[path]
        if isinstance(cfg, LoraConfig):
            if not isinstance(layer, LoraLayer) or type(layer) is not lora_layer_for(
                module, use_dora=cfg.use_dora
            ):
                return False
            if (
                layer.r != cfg.rank_for(path)
                or layer.lora_alpha != cfg.alpha_for(path)
                or layer.use_rslora != cfg.use_rslora
                or layer.lora_dropout != float(cfg.lora_dropout)
            ):
                return False
        else:
            if type(layer) is not LinearIA3Layer:
                return False
            ff = layer.is_feedforward
            if ff != cfg.is_feedforward(path) or ff != _peft_is_ff(cfg, path):
                return False
    if isinstance(cfg, IA3Config):
        t, f = cfg.target_modules, cfg.feedforward_modules
        # PEFT refuses feedforward_modules that are not a subset of target_modules.
        if isinstance(t, list) and isinstance(f, list) and not set(f) <= set(t):
            return False
    return True


def _selection(cfg: AdapterConfig, model: nn.Module, modules: dict) -> tuple[set[str], set[str]]:
    """(targeted modules, modules_to_save) under both tinytune's and PEFT's rules.

    Where the two rules disagree on a module the config is not used (the caller derives
    a more explicit one), so a file we write means the same thing to both readers.
    """
    save_names = cfg.modules_to_save or []
    saves: set[str] = set()
    for name in modules:
        if not name:
            continue
        ours = name_matches(name, save_names)
        peft = any(name.endswith(s) for s in save_names)
        if ours != peft:
            raise re.error("modules_to_save rules disagree")
        if ours:
            saves.add(name)
    targets: set[str] = set()
    for name, module in modules.items():
        if not name or cfg.target_modules is None:
            continue
        # PEFT never adapts a module inside (or equal to) a modules_to_save module.
        if any(re.match(rf"(^|.*\.){s}($|\..*)", name) for s in save_names):
            continue
        if cfg.matches(name, module, model):
            targets.add(name)
    return targets, saves


def _peft_is_ff(cfg: IA3Config, path: str) -> bool:
    """PEFT's feed-forward rule (a plain ``endswith``, without a dot boundary)."""
    ff = cfg.feedforward_modules
    if ff is None:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, path) is not None
    return any(path.endswith(f) for f in ff)


# --------------------------------------------------------------------------------------
# writing files
# --------------------------------------------------------------------------------------
def write_safetensors(tensors: dict[str, torch.Tensor], tmp: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` to the temporary file ``tmp`` of a save.

    Public so that the crash tests can replace it (a process dying mid-write).

    Args:
        tensors: The adapter's tensors, by key.
        tmp: The temporary file, renamed over the final one after this returns.
        metadata: The safetensors header metadata.
    """
    from safetensors.torch import save_file

    save_file(tensors, str(tmp), metadata=metadata)


def _atomic_write(final: Path, write: Callable[[Path], Any]) -> None:
    """Write ``final`` through a temporary file in the same directory and a rename."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open directories; the renames are still atomic.
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the config's meaningful fields, in a canonical JSON form."""
    core = {k: v for k, v in config.items() if k not in INFORMATIONAL}
    text = json.dumps(core, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ======================================================================================
# PEFT's save_pretrained / load_adapter arguments
# ======================================================================================
def check_save_pretrained(
    save_directory: Any,
    safe_serialization: Any = True,
    selected_adapters: Any = None,
    save_embedding_layers: Any = "auto",
    is_main_process: Any = True,
    path_initial_model_for_weight_conversion: Any = None,
    adapter_name: Any = None,
    unknown: Mapping[str, Any] | None = None,
) -> str:
    """Check the arguments of ``AdapterWrapper.save_pretrained`` (PEFT's, plus
    tinytune's ``adapter_name``) before anything is written.

    Args:
        save_directory, safe_serialization, selected_adapters, save_embedding_layers,
        is_main_process, path_initial_model_for_weight_conversion, adapter_name: As
            passed to ``save_pretrained``.
        unknown: Any other keyword arguments it got.

    Returns:
        ``save_directory`` as a ``str``.

    Raises:
        UnsupportedArgumentError: For values and keywords tinytune refuses (named in
            the message).
        ConfigTypeError: For a missing directory or a non-bool ``is_main_process``.
    """
    if unknown:
        raise UnsupportedArgumentError(
            f"save_pretrained() got {sorted(unknown)!r}, which tinytune does not support. "
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
    if adapter_name is not None and selected_adapters is not None:
        raise UnsupportedArgumentError(
            "Pass either adapter_name (one adapter, saved in save_directory itself) or "
            "selected_adapters (PEFT's layout), not both; nothing was written."
        )
    return save_directory


def load_options(path: Any, kwargs: dict[str, Any]) -> tuple[str, bool, dict[str, Any]]:
    """Split ``AdapterWrapper.load_adapter``'s PEFT keywords off ``kwargs``.

    Args:
        path: The adapter directory as passed.
        kwargs: The other keyword arguments: ``subfolder`` (PEFT's: read
            ``path/subfolder``) and ``autocast_adapter_dtype`` are taken from them.

    Returns:
        ``(directory to read, autocast_adapter_dtype, the keywords for read_adapter)``.

    Raises:
        ConfigTypeError: If ``path`` or ``subfolder`` is not a path.
    """
    kwargs = dict(kwargs)
    path = check_path(path)
    subfolder = kwargs.pop("subfolder", None)
    if subfolder:
        path = os.path.join(path, check_path(subfolder, "subfolder"))
    return path, kwargs.pop("autocast_adapter_dtype", False), kwargs


# ======================================================================================
# loading
# ======================================================================================
def read_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    custom_layers: Mapping[str, Callable[..., AdapterLayer]] | Iterable[type] | None = None,
    check_fingerprint: bool = True,
    is_trainable: bool = True,
) -> Any:
    """Read and check an adapter directory and build its :class:`~tinytune.Adapter`
    for ``model``, without attaching it (``AdapterWrapper.load_adapter`` and
    ``hotswap_adapter`` attach or copy it); the name is not checked.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` only (never
    pickle). The keys in the weights file say which modules are adapted; the config
    gives each layer its settings (``lora_alpha``, ``alpha_pattern``, ``use_rslora``,
    ...). The whole adapter is built and checked here, so an error changes nothing.

    Args:
        model: The base model.
        path: The adapter directory.
        adapter_name: The new adapter's name.
        custom_layers: Classes (or factories) for the custom layers of a TINYTUNE-format
            file: a mapping ``{type name in the file: class or factory}``, or an
            iterable of classes, keyed by ``__qualname__``. Each is called with the
            keyword arguments its ``get_config()`` returned at save time. Nothing named
            in the file is ever imported.
        check_fingerprint: Refuse a config that does not match the fingerprint a
            tinytune-written weights file records (an interrupted save, or a config
            edited by hand). Set ``False`` to accept a deliberate edit.
        is_trainable: Whether the loaded adapter's parameters require grad (PEFT's
            argument; unlike PEFT, tinytune loads adapters trainable by default).

    Returns:
        The new, unattached ``Adapter``, its layers on their modules' devices.

    Raises:
        AdapterFileNotFoundError: If the directory or one of the two files is missing.
        AdapterFileError: For a legacy ``adapter_model.bin``, a corrupt or truncated
            file, a key that names no module, a tensor of the wrong shape, a missing
            tensor, or a custom layer type with no class passed in ``custom_layers``.
        InvalidConfigError: If the config uses a PEFT option tinytune does not
            implement (``use_dora``, ``bias``, ...), or an unsupported ``peft_type``.
        ConfigTypeError: For an argument of the wrong type.
    """
    check_model(model)
    registry = _registry(custom_layers)  # checked whatever the file's format
    check_bool(check_fingerprint, "check_fingerprint")
    check_bool(is_trainable, "is_trainable")
    directory = Path(check_path(path))
    config, config_file = read_config(directory)
    tensors, metadata, weights_file = read_weights(directory)
    if check_fingerprint and FINGERPRINT_KEY in metadata:
        if metadata[FINGERPRINT_KEY] != fingerprint(config):
            raise AdapterFileError(
                f"{config_file} does not belong to {weights_file}: the weights were written "
                "with another config (a save was interrupted, or the config was edited by "
                "hand). Save the adapter again; to accept a deliberate edit, pass "
                "check_fingerprint=False."
            )

    if tensors and not any(k.startswith(KEY_PREFIX) for k in tensors):
        # Adapters saved from a model with injected layers but no PeftModel around it
        # (transformers' own PEFT integration, inject_adapter_in_model) lack the prefix.
        tensors = {KEY_PREFIX + k: v for k, v in tensors.items()}
    ctx = _LoadContext(model, config_file, weights_file, tensors)
    peft_type = config.get("peft_type")
    if peft_type == "TINYTUNE":
        layers = _build_tinytune(ctx, config, registry)
        cfg = None
    elif peft_type in ("LORA", "IA3"):
        cfg = _config_from_peft(config, config_file)
        # As PEFT's from_pretrained: the config says whether the adapter trains.
        cfg.inference_mode = not bool(is_trainable)
        layers = _build_peft(ctx, cfg)
    else:
        raise InvalidConfigError(
            f"{config_file}: peft_type {peft_type!r} is not supported. tinytune reads LORA "
            "and IA3 adapters (and its own TINYTUNE files)."
        )
    ctx.check_all_used()
    if not layers:
        raise AdapterFileError(f"{weights_file} holds no adapter tensors; nothing to load.")

    adapter = Adapter(adapter_name, cfg)
    adapter.peft_extras = {k: config[k] for k in _CARRIED if config.get(k) is not None}
    for layer_path, layer in layers:
        layer.requires_grad_(bool(is_trainable))
        device = device_of(ctx.modules[layer_path])
        if device is not None:
            layer.to(device)
        adapter.layers[layer_key(layer_path)] = layer
    return adapter


class _LoadContext:
    """The model's modules and the file's tensors, with the bookkeeping of a load."""

    def __init__(self, model: nn.Module, config_file: Path, weights_file: Path, tensors: dict) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.config_file = config_file
        self.weights_file = weights_file
        self.tensors = tensors  # file key -> tensor
        self.used: set[str] = set()

    def module(self, path: str, key: str) -> nn.Module:
        module = self.modules.get(path) if path else None
        if module is None:
            names = [n for n in self.modules if n]
            raise AdapterFileError(
                f"Key {key!r} in {self.weights_file} names module {path!r}, which "
                f"{type(self.model).__name__} does not have; load the adapter into the base "
                f"model it was trained for.{suggest(path, names)}"
            )
        return module

    def fill(self, path: str, layer: AdapterLayer, legacy_infix: str | None = None) -> None:
        """Copy the file's tensors into ``layer`` (fresh, unattached), checking shapes."""
        with torch.no_grad():
            for suffix, (param, transposed) in tensor_map(layer).items():
                key = f"{KEY_PREFIX}{path}.{suffix}"
                if key not in self.tensors and legacy_infix is not None:
                    legacy = f"{KEY_PREFIX}{path}.{legacy_infix}.{suffix}"
                    if legacy in self.tensors:
                        key = legacy
                if key not in self.tensors:
                    raise AdapterFileError(
                        f"{self.weights_file} has no tensor {key!r}, which the "
                        f"{type(layer).__name__} on {path!r} needs; the file is incomplete "
                        "or was written for another adapter layout."
                    )
                value = self.tensors[key]
                want = tuple(param.shape[::-1]) if transposed else tuple(param.shape)
                if tuple(value.shape) != want:
                    raise AdapterFileError(
                        f"Key {key!r} in {self.weights_file} has shape {tuple(value.shape)}, but "
                        f"module {path!r} ({type(self.modules[path]).__name__}) needs {want}; "
                        "the adapter was trained for a differently shaped model, or its config "
                        "(r, rank_pattern) does not match its weights."
                    )
                if not value.is_floating_point() and param.is_floating_point():
                    # Integer, bool and complex values would be truncated or lose their
                    # imaginary part in the copy.
                    raise AdapterFileError(
                        f"Key {key!r} in {self.weights_file} holds {value.dtype} values where "
                        f"{param.dtype} is expected; an adapter file holds real floating-point "
                        "tensors. Save the adapter again from a model with real weights."
                    )
                param.copy_(value.t() if transposed else value)
                self.used.add(key)

    def check_all_used(self) -> None:
        unused = [k for k in self.tensors if k not in self.used]
        base = self.model.state_dict()
        for key in unused:
            name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
            # PEFT also saves whole embedding matrices when embeddings are targeted (as
            # "<path>.base_layer.weight") or resized. tinytune never changes base weights,
            # so accept them only when they equal the model's own.
            base_name = name.replace(".base_layer.", ".")
            if base_name in base:
                ours = base[base_name]
                theirs = self.tensors[key]
                if tuple(ours.shape) == tuple(theirs.shape) and torch.equal(
                    ours.detach().cpu(), theirs.to(ours.dtype)
                ):
                    continue
                raise AdapterFileError(
                    f"Key {key!r} in {self.weights_file} holds base-model weights for "
                    f"{base_name!r} (shape {tuple(theirs.shape)}) that differ from the model's "
                    f"(shape {tuple(ours.shape)}); PEFT saves these when embeddings were "
                    "resized or trained. tinytune never changes base weights: copy that tensor "
                    "into your base model first (to get PEFT's result), or delete the key from "
                    "the file (to keep this model's own), then load the adapter again."
                )
            path = name.rsplit(".", 1)[0]
            while path and path not in self.modules:
                path = path.rsplit(".", 1)[0] if "." in path else ""
            names = [n for n in self.modules if n]
            where = (
                f"module {path!r} exists but no layer of this adapter reads this key"
                if path
                else f"it names no module of {type(self.model).__name__}{suggest(name, names)}"
            )
            raise AdapterFileError(
                f"Key {key!r} in {self.weights_file} was not loaded: {where}. The file does not "
                "fit this base model or this config; nothing was loaded."
            )


# --------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------
_MAX_JSON_DEPTH = 32


def _json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    depth, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, (dict, list)):
            depth = max(depth, level)
            if level > _MAX_JSON_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            todo.extend((child, level + 1) for child in children)
    return depth


def read_config(directory: Path) -> tuple[dict[str, Any], Path]:
    if not directory.is_dir():
        raise AdapterFileNotFoundError(
            f"No adapter directory at {str(directory)!r}; pass the directory that holds "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise AdapterFileNotFoundError(
            f"{file} is missing: an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(if a save was interrupted, save the adapter again)."
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterFileError(f"{file} is not valid JSON ({exc}); the file is corrupt.") from None
    except RecursionError:
        config = None
    if config is None or _json_depth(config) > _MAX_JSON_DEPTH:
        raise AdapterFileError(
            f"{file} nests JSON deeper than {_MAX_JSON_DEPTH} levels; an adapter config is a "
            "few levels deep, so the file is corrupt or hostile. Save the adapter again."
        )
    if not isinstance(config, dict):
        raise AdapterFileError(f"{file} must hold a JSON object, got {type(config).__name__}.")
    return config, file


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    file = directory / WEIGHTS_NAME
    if not file.is_file():
        legacy = directory / LEGACY_WEIGHTS_NAME
        if legacy.is_file():
            raise AdapterFileError(
                f"{legacy} is a pickle file, which tinytune does not read (unpickling can run "
                "code). Convert it once, from a trusted source, with:\n"
                "  python -c \"import torch; from safetensors.torch import save_file; "
                f"save_file(torch.load({str(legacy)!r}, weights_only=True), "
                f"{str(file)!r}, metadata={{'format': 'pt'}})\""
            )
        raise AdapterFileNotFoundError(
            f"{file} is missing: an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    from safetensors import safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise AdapterFileError(
            f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is "
            "truncated or corrupt. Save or download the adapter again."
        ) from None
    return tensors, metadata, file


# --------------------------------------------------------------------------------------
# PEFT configs for loading
# --------------------------------------------------------------------------------------
def _config_from_peft(config: dict[str, Any], file: Path) -> AdapterConfig:
    """Our config from a PEFT dict; refuses options that would change the outputs."""
    cls: type[AdapterConfig] = LoraConfig if config["peft_type"] == "LORA" else IA3Config
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in config.items():
        if key in ("peft_type", "tinytune"):
            continue
        if key in fields:
            kwargs[key] = value
        elif key not in _INERT and not _unused(value):
            raise InvalidConfigError(
                f"{file} sets {key}={value!r}, a PEFT option tinytune does not implement; "
                "loading it would give different outputs than PEFT. Merge the adapter with "
                "PEFT (merge_and_unload) or retrain it without that option."
            )
    if "init_lora_weights" in kwargs and not isinstance(kwargs["init_lora_weights"], bool):
        init = str(kwargs["init_lora_weights"])
        if init.lower().startswith(_BASE_REWRITING_INITS):
            # PEFT re-runs these when it loads the adapter, and they overwrite the base
            # weights (PiSSA/OLoRA/CorDA keep W - BA, LoftQ a quantised W): PEFT's outputs
            # then come from a changed base model, which tinytune never makes.
            raise InvalidConfigError(
                f"{file} sets init_lora_weights={init!r}: PEFT redoes that initialisation "
                "when loading, which rewrites the base model's weights, so tinytune (which "
                "never changes base weights) would not reproduce PEFT's outputs. Convert "
                "it with PEFT to a plain LoRA first: save_pretrained(out_dir, "
                "path_initial_model_for_weight_conversion=<the adapter saved right after "
                "initialisation>), or merge it with PEFT (merge_and_unload)."
            )
        # "gaussian", "eva", "orthogonal", ...: how training started; the saved weights
        # are what count.
        kwargs["init_lora_weights"] = True
    if "init_ia3_weights" in kwargs:
        kwargs["init_ia3_weights"] = bool(kwargs["init_ia3_weights"])
    for key in ("rank_pattern", "alpha_pattern"):
        if kwargs.get(key) is None and key in kwargs:
            kwargs[key] = {}
    if cls is LoraConfig and "lora_dropout" in kwargs and kwargs["lora_dropout"] is None:
        kwargs["lora_dropout"] = 0.0
    try:
        return cls(**kwargs)
    except (InvalidConfigError, TypeError, ValueError) as exc:
        raise InvalidConfigError(f"{file}: {exc}") from None


def _unused(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value in ("none", "")


# init_lora_weights values after which PEFT's loading changes the base weights.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq")

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


def _build_peft(ctx: _LoadContext, cfg: AdapterConfig) -> list[tuple[str, AdapterLayer]]:
    """Layers for a PEFT file: the keys say which modules, the config how."""
    paths: dict[str, str] = {}  # module path -> the first key seen for it
    for key in ctx.tensors:
        if not key.startswith(KEY_PREFIX):
            continue
        name = key[len(KEY_PREFIX):]
        if isinstance(cfg, LoraConfig):
            for suffix in _LORA_SUFFIXES:
                if name.endswith(suffix):
                    paths.setdefault(name[: -len(suffix)], key)
        elif name.endswith(".ia3_l"):
            paths.setdefault(name[: -len(".ia3_l")], key)

    # Model order, as add_adapter_from_config builds them (the file's keys are sorted).
    order = {name: i for i, name in enumerate(ctx.modules)}
    layers: list[tuple[str, AdapterLayer]] = []
    for path, key in sorted(paths.items(), key=lambda kv: order.get(kv[0], -1)):
        module = ctx.module(path, key)
        if isinstance(cfg, LoraConfig):
            layer = _peft_lora_layer(ctx, cfg, path, module, key)
        else:
            layer = _peft_ia3_layer(ctx, cfg, path, module, key)
        ctx.fill(path, layer)
        layers.append((path, layer))

    for path, module in ctx.modules.items():
        if path and name_matches(path, cfg.modules_to_save or []) and path not in paths:
            layer = ModulesToSaveLayer()
            layer.reset_params(path, module)
            # PEFT < 0.14 wrote "<path>.modules_to_save.<param>"; newer "<path>.<param>".
            ctx.fill(path, layer, legacy_infix="modules_to_save")
            layers.append((path, layer))
    return layers


def _peft_lora_layer(
    ctx: _LoadContext, cfg: LoraConfig, path: str, module: nn.Module, key: str
) -> LoraLayer:
    cls = lora_layer_for(module, use_dora=cfg.use_dora)
    embedding = f"{KEY_PREFIX}{path}.lora_embedding_A" in ctx.tensors
    if cls is None or issubclass(cls, EmbeddingLoraLayer) != embedding:
        raise AdapterFileError(
            f"Key {key!r} in {ctx.weights_file} is a LoRA weight for module {path!r}, which is "
            f"a {type(module).__name__} here; LoRA {'embedding ' if embedding else ''}weights "
            "do not fit it. Load the adapter into the base model it was trained for."
        )
    a_key = f"{KEY_PREFIX}{path}." + ("lora_embedding_A" if embedding else "lora_A.weight")
    if a_key not in ctx.tensors:
        raise AdapterFileError(
            f"{ctx.weights_file} has {key!r} but no {a_key!r}; the file is incomplete."
        )
    a = ctx.tensors[a_key]
    r_file = int(a.shape[0]) if a.dim() >= 1 else 0
    r_cfg = cfg.rank_for(path)
    if r_file != r_cfg:
        raise AdapterFileError(
            f"Key {a_key!r} in {ctx.weights_file} has shape {tuple(a.shape)} (rank {r_file}), but "
            f"{ctx.config_file} gives module {path!r} rank {r_cfg} (r / rank_pattern); the "
            "config and the weights do not belong together."
        )
    layer = cls(
        r=r_cfg,
        lora_alpha=cfg.alpha_for(path),
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        init_lora_weights=True,
    )
    layer.reset_params(path, module)
    return layer


def _peft_ia3_layer(
    ctx: _LoadContext, cfg: IA3Config, path: str, module: nn.Module, key: str
) -> LinearIA3Layer:
    value = ctx.tensors[key]
    if not isinstance(module, nn.Linear) and not is_conv1d(module):
        raise AdapterFileError(
            f"Key {key!r} in {ctx.weights_file} is an IA3 scale for module {path!r}, a "
            f"{type(module).__name__} here; tinytune's IA3 adapts nn.Linear and Conv1D only."
        )
    # The saved shape tells PEFT's choice: (1, in) scales the input (feed-forward), (out, 1)
    # the output. Only a 1x1 scale is ambiguous; then PEFT's own rule decides.
    shape = tuple(value.shape)
    if len(shape) == 2 and shape[0] == 1 and shape[1] != 1:
        ff = True
    elif len(shape) == 2 and shape[1] == 1 and shape[0] != 1:
        ff = False
    else:
        ff = _peft_is_ff(cfg, path)
    layer = LinearIA3Layer(is_feedforward=ff)
    layer.reset_params(path, module)
    return layer


# --------------------------------------------------------------------------------------
# TINYTUNE-format files
# --------------------------------------------------------------------------------------
def _registry(custom_layers: Any) -> dict[str, Callable[..., AdapterLayer]]:
    if custom_layers is None:
        return {}
    if isinstance(custom_layers, Mapping):
        return dict(custom_layers)
    if isinstance(custom_layers, type):
        custom_layers = [custom_layers]
    if isinstance(custom_layers, (str, bytes)) or not isinstance(custom_layers, Iterable):
        raise ConfigTypeError(
            "custom_layers must be a mapping {type name: class or factory} or a list of "
            f"AdapterLayer classes; got {type(custom_layers).__name__} ({custom_layers!r})."
        )
    out = {}
    for cls in custom_layers:
        if not isinstance(cls, type):
            raise ConfigTypeError(
                "custom_layers must be a mapping {type name: class or factory} or a list of "
                f"AdapterLayer classes; got an item of type {type(cls).__name__}."
            )
        out[cls.__qualname__] = cls
    return out


def _build_tinytune(
    ctx: _LoadContext, config: dict[str, Any], registry: dict[str, Callable[..., AdapterLayer]]
) -> list[tuple[str, AdapterLayer]]:
    block = config.get("tinytune")
    file = ctx.config_file
    if not isinstance(block, dict) or not isinstance(block.get("layers"), list):
        raise AdapterFileError(f"{file} has peft_type TINYTUNE but no valid 'tinytune.layers' list.")
    version = block.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterFileError(
            f"{file} uses tinytune format version {version!r}; this tinytune reads version "
            f"{FORMAT_VERSION}. Upgrade tinytune."
        )
    layers: list[tuple[str, AdapterLayer]] = []
    seen: set[str] = set()
    for entry in block["layers"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("module"), str):
            raise AdapterFileError(f"{file}: every entry of tinytune.layers needs a 'module' string.")
        path, type_name = entry["module"], entry.get("type")
        if not isinstance(type_name, str):
            raise AdapterFileError(
                f"{file}: the 'type' of the layer on {path!r} must be a layer type name (a "
                f"string such as 'LinearLoraLayer'), got {type_name!r}; the file is corrupt or "
                "was edited by hand. Save the adapter again."
            )
        args = entry.get("config") or {}
        if path in seen:
            raise AdapterFileError(f"{file} lists module {path!r} twice.")
        seen.add(path)
        if not isinstance(args, dict):
            raise AdapterFileError(f"{file}: 'config' of the layer on {path!r} must be an object.")
        module = ctx.module(path, f"tinytune.layers[{path!r}]")
        if type_name in _BUILTIN_TYPES:
            factory: Callable[..., Any] = _BUILTIN_TYPES[type_name]
        elif type_name in registry:
            factory = registry[type_name]
        else:
            raise AdapterFileError(
                f"{file}: the layer on {path!r} is a custom AdapterLayer of type {type_name!r} "
                f"({entry.get('python_class', 'class unknown')}). tinytune never imports code "
                f"named in a file: pass the class, load_adapter(path, custom_layers="
                f"{{{type_name!r}: {str(type_name).rsplit('.', 1)[-1]}}})."
            )
        try:
            layer = factory(**args)
        except Exception as exc:  # noqa: BLE001 - the user's constructor
            raise AdapterFileError(
                f"{file}: building the {type_name} layer on {path!r} with {args!r} failed "
                f"({type(exc).__name__}: {exc}). A layer class is called with the keyword "
                "arguments its get_config() returned at save time; pass a factory in "
                "custom_layers if it needs others."
            ) from None
        if not isinstance(layer, AdapterLayer):
            raise AdapterFileError(
                f"{file}: custom_layers[{type_name!r}] returned a {type(layer).__name__}, not "
                "an AdapterLayer."
            )
        layer.reset_params(path, module)
        ctx.fill(path, layer)
        layers.append((path, layer))
    return layers
