"""``AdapterWrapper``: adapters on a base model, through hooks only.

The wrapper holds the base model and a dict of adapters. Each adapter maps dotted
module names to :class:`~tinytune.layers.AdapterLayer` objects; each adapted module has
one :class:`~tinytune.hooks.HookSite`. No module of the base model is ever replaced,
added or patched: removing the hooks (``unload``) gives back the original model, with
its ``state_dict`` bit-identical to before.

Floor 8, the façade: the ``nn.Module`` the user holds, its signature and PEFT's names.
The work is done by collaborators below it: the adapter registry (:mod:`tinytune.registry`),
mixed batches (:mod:`tinytune.batch`), reserved slots (:mod:`tinytune.serving`), files
(:mod:`tinytune.io`) and weighted combination (:mod:`tinytune.weighted`); each method
states its contract briefly and points to the function that documents the details.
"""

from __future__ import annotations

import collections.abc
from typing import Any, Callable, Iterator, Sequence

from torch import nn

from . import io, serving
from .adapter import BASE_ADAPTER_NAME, Adapter, build_adapter
from .batch import assigned_call, forget_adapter, mixed_call
from .config import AdapterConfig
from .errors import AdapterStateError, check_bool, wrong_type
from .layers import AdapterLayer, upcast_layers
from .registry import AdapterRegistry
from .util import adapter_dir, present_forward_signature, run_frames_eagerly, run_model
from .weighted import add_weighted_adapter

__all__ = ["Adapter", "AdapterWrapper", "BASE_ADAPTER_NAME"]


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
        adapters = nn.ModuleDict()
        # Refuses what is not a model, a wrapper, and a model wrapped elsewhere.
        registry = AdapterRegistry(model, adapters)
        self.model = model
        self.adapters = adapters
        #: The adapters' state and operations (:class:`tinytune.registry.AdapterRegistry`).
        self.registry = registry
        # inspect.signature(wrapper.forward) shows the base model's parameters (for HF
        # Trainer's remove_unused_columns); see tinytune/util.py.
        present_forward_signature(self, model)

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        model: nn.Module,
        config: AdapterConfig,
        adapter_name: str = "default",
        *,
        autocast_adapter_dtype: bool = False,
    ) -> "AdapterWrapper":
        """Wrap ``model`` and add one adapter built from ``config`` (see
        :meth:`add_adapter_from_config`)."""
        return cls._wrap_and(
            model,
            lambda w: w.add_adapter_from_config(config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype),
        )

    @classmethod
    def _wrap_and(cls, model: nn.Module, fill: Callable[["AdapterWrapper"], Any]) -> "AdapterWrapper":
        """A new wrapper of ``model`` after ``fill(wrapper)``; if that fails, ``model``
        is left unwrapped."""
        wrapper = cls(model)
        try:
            fill(wrapper)
        except BaseException:
            wrapper.registry.release(model)
            raise
        return wrapper

    def add_adapter(self, adapter_name: str = "default", activate: bool = True) -> None:
        """Add an empty adapter (active if ``activate``); see :meth:`add_adapter_layer`.

        Raises:
            AdapterExistsError: If the name is taken.
            ConfigTypeError: If ``activate`` is not a bool (PEFT's ``add_adapter(name,
                config)`` passes a config there; use :meth:`add_adapter_from_config`).
        """
        self.registry.add_adapter(adapter_name, activate)

    def add_adapter_from_config(
        self,
        config: AdapterConfig,
        adapter_name: str = "default",
        activate: bool = True,
        *,
        autocast_adapter_dtype: bool = False,
    ) -> None:
        """Add an adapter with a layer on every module that ``config`` targets (see
        :func:`tinytune.adapter.build_adapter`). ``autocast_adapter_dtype=True`` stores
        float16/bfloat16 adapter weights in float32, as PEFT's option does.

        Raises:
            AdapterExistsError: If the name is taken.
            ConfigTypeError, NoMatchingModulesError, UnsupportedModuleError: As
                ``build_adapter``; also ``ConfigTypeError`` for a non-bool ``activate``.
        """
        self.registry.check_new_name(adapter_name)
        check_bool(activate, "activate")
        adapter = build_adapter(
            self.registry.model(), config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
        )
        self._attach(adapter, activate)

    def add_adapter_layer(self, adapter_name: str, layer_name: str, layer: Any) -> AdapterLayer:
        """Attach ``layer`` (an ``AdapterLayer``, a subclass, or a factory such as
        ``functools.partial(LinearLoraLayer, r=16)``) to the module ``layer_name`` (a
        dotted name from ``named_modules()``) in adapter ``adapter_name``, and return it.

        Raises:
            AdapterNotFoundError: No adapter has this name.
            LayerNotFoundError: The model has no module of this name.
            LayerAlreadyAdaptedError: The adapter already has a layer on this module.
            UnsupportedModuleError: The layer cannot adapt this module's type.
            AdapterStateError: The adapter is merged.
        """
        return self.registry.add_adapter_layer(
            adapter_name, layer_name, layer, slots=serving.slot_hooks(self)
        )

    def _attach(self, adapter: Adapter, activate: bool) -> None:
        self.registry.attach(adapter, activate, slots=serving.slot_hooks(self))

    # --- activation and deletion ---------------------------------------------------------
    def set_active_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Make exactly these adapters active, in this order (an empty list: none)."""
        self.registry.set_active_adapters(adapter_names)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """PEFT's name for :meth:`set_active_adapters`."""
        self.set_active_adapters(adapter_name)

    def disable_adapter(self) -> Iterator[None]:
        """Context manager: run the bare base model inside it (PEFT's name); calls made
        inside act for good. See :meth:`tinytune.registry.AdapterRegistry.disable_adapter`.

        Raises:
            AdapterStateError: If an adapter is merged (its update lives in the weights).
        """
        return self.registry.disable_adapter()

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters, innermost first."""
        return list(self.registry.active)

    @property
    def active_adapter(self) -> str | None:
        """The first active adapter (PEFT's single-adapter accessor), or ``None``."""
        active = self.registry.active
        return active[0] if active else None

    @property
    def peft_config(self) -> dict[str, AdapterConfig | None]:
        """``{adapter name: its config}`` (``None``: built by :meth:`add_adapter_layer`)."""
        return {name: adapter.config for name, adapter in self.adapters.items()}

    @property
    def base_model(self) -> "AdapterWrapper":
        """The wrapper itself, as PEFT's ``base_model`` is the tuner around your model
        (``wrapper.base_model.model`` is your model; see :meth:`get_base_model`)."""
        return self

    def get_base_model(self) -> nn.Module:
        """The wrapped model, hooks on (PEFT's name); raises ``AdapterStateError``
        after ``unload()``."""
        return self.registry.model()

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters currently folded into the base weights, in merge order."""
        return list(self.registry.merged)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its layers. It must not be merged."""
        adapter = self.registry.delete_adapter(adapter_name)
        # The mixed-batch stacks must not keep the deleted adapter (or its memory) alive.
        forget_adapter(self, adapter_name, adapter)

    # --- merging and unloading -----------------------------------------------------------
    def merge_adapters(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Fold adapters into the base weights (default: the active ones), keeping host
        copies for a bit-exact unmerge; see
        :meth:`tinytune.registry.AdapterRegistry.merge_adapters`.

        Raises:
            AdapterNotFoundError, MergeNotSupportedError, AdapterStateError: Nothing is
                merged then.
        """
        self.registry.merge_adapters(adapter_names, slots=serving.slot_hooks(self))

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
        """Add a LoRA adapter combining ``adapters`` with ``weights``, not activated
        (PEFT's method; see :func:`tinytune.weighted.add_weighted_adapter`).

        Raises:
            AdapterExistsError: If ``adapter_name`` is taken (PEFT silently keeps the old).
            AdapterNotFoundError, InvalidConfigError, UnsupportedModuleError: As there.
            MixedBatchError: With reserved slots, if ``adapters`` are more than the slots;
                nothing changes then.
        """
        self.registry.check_new_name(adapter_name)
        adapters = self.registry.names(adapters, "adapters")
        # With reserved slots, sources outside a slot have their weights in host memory:
        # combine them from their slots (on the model's device) instead.
        with serving.pinned(self, adapters, combining=True):
            modules = {path: site.module for path, site in self.registry.sites.items()}
            adapter = add_weighted_adapter(
                self.registry.get, modules, adapters, weights, adapter_name, combination_type,
                svd_rank, svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method,
            )
            self._attach(adapter, False)

    def unmerge_adapters(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Undo merges (default: all), restoring the original weights bit-exactly."""
        self.registry.unmerge_adapters(adapter_names, slots=serving.slot_hooks(self))

    def unload(self) -> nn.Module:
        """Remove every hook, undo merges and return the base model as it was.

        The wrapper keeps its adapters; :meth:`swap_base_model` attaches them again.
        """
        return self._unhooked(self.registry.unload())

    def merge_and_unload(self, *, dequantize: bool = False) -> nn.Module:
        """Merge the active adapters in place (no copy kept), remove every hook and
        return the base model. All checks run first; an error while writing (out of
        memory, say) can leave weights partly merged.

        Args:
            dequantize: For a quantized base (bitsandbytes, torchao; see
                :mod:`tinytune.weights`): return a float model, every quantized linear
                replaced by a plain ``nn.Linear`` holding its dequantized weight with the
                adapters merged into it exactly (the fp32 sum ``dequant(W) + delta``,
                rounded once to the weight's dtype). Without it a quantized base refuses
                the merge. See
                :meth:`tinytune.registry.AdapterRegistry.merge_dequantized_and_unload`.

        Raises:
            MergeNotSupportedError: As :meth:`merge_adapters`, and for a quantized base
                without ``dequantize=True``; nothing changes then.
            AdapterStateError: As :meth:`merge_adapters`; nothing changes then.
        """
        check_bool(dequantize, "dequantize")
        model = self.registry.model()
        if dequantize:
            names = self.registry.mergeable(None, dequantize=True)
            merged = self.registry.merge_dequantized_and_unload(names, slots=serving.slot_hooks(self))
            return self._unhooked(merged)
        for name in self.registry.mergeable(None):
            self._merge_one(name, backup=False)
        return self._unhooked(self.registry.unload_merged(model))

    def _merge_one(self, adapter_name: str, backup: bool = True) -> None:
        self.registry.merge_one(adapter_name, backup, slots=serving.slot_hooks(self))

    def _unhooked(self, model: nn.Module) -> nn.Module:
        self.model = None
        present_forward_signature(self, None)
        return model

    def swap_base_model(self, new_model: nn.Module) -> nn.Module | None:
        """Move every adapter onto ``new_model``, a structurally identical model, and
        return the previous one, unhooked (``None`` after ``unload``). See
        :meth:`tinytune.registry.AdapterRegistry.swap_base_model` for what must match.

        Raises:
            AdapterStateError, LayerNotFoundError, UnsupportedModuleError: Nothing
                changes then.
        """
        old = self.registry.swap_base_model(new_model)
        self.model = new_model
        present_forward_signature(self, new_model)
        return old

    # --- state_dict: the same whether merged or not --------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The base model's and every adapter's tensors; merged modules show their
        original tensors (see :meth:`tinytune.registry.AdapterRegistry.unmerged_state`),
        so a fresh wrapper loading it applies each adapter once (PEFT's would twice)."""
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        return self.registry.unmerged_state(super().state_dict(*args, **kwargs), prefix)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a state dict from :meth:`state_dict` (base tensors unmerged); merged
        adapters are merged again on top of the loaded weights."""
        if not isinstance(state_dict, collections.abc.Mapping):
            raise wrong_type(
                "state_dict", "a dict of tensors (what wrapper.state_dict() returns)", state_dict
            )
        check_bool(strict, "strict")
        check_bool(assign, "assign")
        with self.registry.unmerged(slots=serving.slot_hooks(self)):
            result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.registry.refresh_dora_scales()
        return result

    # --- parameters ----------------------------------------------------------------------
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

    # --- running -------------------------------------------------------------------------
    # forward and _run never get a compiled frame of their own: under torch.compile the
    # model runs in util.run_model's frame (one frame per call, mixed calls
    # included, their host-side work outside it; see util.run_frames_eagerly).
    @run_frames_eagerly
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the base model with the active adapters applied; with
        ``adapter_names=[...]`` (one name per batch row) each row runs with its own
        adapter (see :func:`tinytune.batch.mixed_call`).

        Raises:
            MixedBatchError: With reserved slots, if more adapters are active (unmerged)
                than there are slots; nothing changes then.
        """
        return self._run(self.registry.model(), args, kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Call the base model's ``generate`` (transformers models), as :meth:`forward`."""
        model = self.registry.model()
        if not hasattr(model, "generate"):
            raise AttributeError(f"{type(model).__name__} has no generate() method.")
        return self._run(model.generate, args, kwargs)

    @run_frames_eagerly
    def _run(self, fn: Any, args: tuple, kwargs: dict) -> Any:
        if "adapter_names" in kwargs:
            adapter_names = kwargs.pop("adapter_names")
            if adapter_names is not None:
                return mixed_call(self, fn, adapter_names, args, kwargs)
        if self.registry.rows_assigned:
            return assigned_call(self, fn, args, kwargs)
        if self.registry.slots_reserved:
            return serving.plain_call(self, fn, args, kwargs)
        return run_model(self, fn, args, kwargs)

    # --- serving many adapters (see tinytune/serving.py) ---------------------------------
    def reserve_adapter_slots(
        self, max_adapters: int, max_rank: int, max_rows: int | None = None
    ) -> None:
        """Fix the mixed-batch stacks' shape: ``max_adapters`` slots, LoRA padded to
        ``max_rank``, on the model's device; with ``max_rows``, also a static buffer of
        that many rows for :meth:`set_row_adapters`. See :func:`tinytune.serving.reserve`.

        Raises:
            InvalidConfigError: For an argument that is not a positive integer, or a
                loaded adapter above ``max_rank`` (nothing changes then).
            AdapterStateError: If the wrapper is unloaded.
        """
        serving.reserve(self, max_adapters, max_rank, max_rows)

    def set_row_adapters(self, adapter_names: Sequence[str]) -> None:
        """Run row ``i`` of every later call with adapter ``adapter_names[i]`` until
        :meth:`clear_row_adapters` (``adapter_names=`` in a call still wins); needs
        ``reserve_adapter_slots(..., max_rows=N)``. The slots are written in place into a
        static row buffer, so a captured graph replays any assignment; details, and the
        errors (``MixedBatchError``, ``AdapterNotFoundError``, ``AdapterStateError``,
        ``ConfigTypeError``; nothing changes when one is raised), in
        :func:`tinytune.serving.assign_rows`.

        Args:
            adapter_names: One adapter name (or ``"__base__"``) per row, 1 to ``N`` names.
        """
        serving.assign_rows(self, adapter_names)

    def clear_row_adapters(self) -> None:
        """End :meth:`set_row_adapters`: calls run the active adapters again, and the
        assigned adapters are unpinned. Does nothing without an assignment."""
        serving.clear_rows(self)

    def hotswap_adapter(self, path: str, adapter_name: str, **kwargs: Any) -> None:
        """Replace an adapter's weights in place from the directory ``path``; keywords
        as in :meth:`load_adapter` (``is_trainable=None`` keeps ``requires_grad``). See
        :func:`tinytune.serving.hotswap`.

        Raises:
            AdapterNotFoundError: If no adapter has that name.
            AdapterStateError: If it is merged.
            AdapterFileError: If the file adapts other modules or layer kinds, or is unreadable.
            InvalidConfigError: If its rank is above the reserved ``max_rank``.
            ConfigTypeError: If ``is_trainable`` is neither a bool nor ``None``.
        """
        serving.hotswap(self, path, adapter_name, **kwargs)

    def slot_stats(self) -> dict[str, Any]:
        """Memory and traffic of the mixed-batch stacks (see :func:`tinytune.serving.stats`)."""
        return serving.stats(self)

    # --- files (PEFT's on-disk format; see tinytune/io.py) -------------------------------
    def save_adapter(self, path: str, adapter_name: str = "default") -> None:
        """Save one adapter in PEFT's layout (``adapter_config.json`` +
        ``adapter_model.safetensors``); see :func:`tinytune.io.save_adapter`."""
        self._save([(adapter_name, path)])

    def load_adapter(
        self, path: str, adapter_name: str = "default", activate: bool = True, **kwargs: Any
    ) -> None:
        """Load the adapter directory ``path`` (PEFT's or tinytune's) under the new name
        ``adapter_name``, active if ``activate``. Everything is checked first: an error
        changes nothing.

        Args:
            **kwargs: ``custom_layers``, ``check_fingerprint``, ``is_trainable`` (see
                :func:`tinytune.io.read_adapter`); PEFT's ``subfolder`` and
                ``autocast_adapter_dtype`` (see :func:`tinytune.io.load_options`).

        Raises:
            AdapterExistsError: If ``adapter_name`` is taken.
            AdapterFileNotFoundError, AdapterFileError, InvalidConfigError: As
                ``io.read_adapter``.
        """
        path, autocast, kwargs = io.load_options(path, kwargs)
        self.registry.check_new_name(adapter_name)
        check_bool(activate, "activate")
        adapter = io.read_adapter(self.registry.model(), path, adapter_name, **kwargs)
        self._attach(adapter, activate)
        if autocast:
            upcast_layers(layer for _, layer in adapter.items())

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
        every other adapter in ``save_directory/<name>``; every adapter is checked before
        any file is written. ``is_main_process=False`` writes nothing. ``adapter_name``
        (tinytune's older form) saves that one adapter into ``save_directory`` itself.
        Refused values: see :func:`tinytune.io.check_save_pretrained`.

        Raises:
            AdapterNotFoundError: For an unknown name in ``selected_adapters``.
            UnsupportedArgumentError, ConfigTypeError, AdapterFileError: See
                ``io.check_save_pretrained`` and :meth:`save_adapter`.
        """
        save_directory = io.check_save_pretrained(
            save_directory, safe_serialization, selected_adapters, save_embedding_layers,
            is_main_process, path_initial_model_for_weight_conversion, adapter_name, kwargs,
        )
        if adapter_name is not None:
            items = [(adapter_name, save_directory)]
        else:
            names = list(self.adapters) if selected_adapters is None else self.registry.names(selected_adapters)
            items = [(name, adapter_dir(save_directory, name)) for name in names]
        self._save(items, write=is_main_process)

    def _save(self, items: list[tuple[str, Any]], write: bool = True) -> None:
        """Write ``[(adapter name, directory), ...]``, every adapter checked first."""
        adapters = [(self.registry.get(name), path) for name, path in items]
        io.save_adapters(self.registry.model(), adapters, write=write)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, path: str, adapter_name: str = "default", **kwargs: Any
    ) -> "AdapterWrapper":
        """Wrap ``model`` and load the adapter saved at ``path`` (PEFT's
        ``PeftModel.from_pretrained``). Keyword arguments go to :meth:`load_adapter`."""
        return cls._wrap_and(model, lambda w: w.load_adapter(path, adapter_name, **kwargs))

    def __getstate__(self) -> dict:
        # The per-instance ``forward`` (the base model's signature, see tinytune/util.py)
        # is derived state: rebuilt on unpickling / deep copies.
        state = self.__dict__.copy()
        state.pop("forward", None)
        return state

    def __setstate__(self, state: dict) -> None:
        if "registry" not in state:  # pickled before the registry held the adapter state
            modules = state["_modules"]
            state["registry"] = AdapterRegistry.from_state(state, modules.get("model"), modules["adapters"])
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
