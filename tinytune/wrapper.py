"""``AdapterWrapper``: adapters on a base model, through hooks only.

The wrapper holds the base model and a dict of adapters. Each adapter maps dotted
module names to :class:`~tinytune.layers.AdapterLayer` objects; each adapted module has
one :class:`~tinytune.hooks.HookSite`. No module of the base model is ever replaced,
added or patched: removing the hooks (``unload``) gives back the original model, with
its ``state_dict`` bit-identical to before.

Floor 8, the façade: the ``nn.Module`` the user holds, its signature and PEFT's names.
The work is done by collaborators below it, which it may import: the adapter registry
(:mod:`tinytune.registry`: sites, active/merged sets, attach, merge), mixed batches
(:mod:`tinytune.batch`), reserved slots (:mod:`tinytune.serving`), files
(:mod:`tinytune.io`) and weighted combination (:mod:`tinytune.weighted`), which take
data and return an :class:`~tinytune.adapter.Adapter` (re-exported here).
"""

from __future__ import annotations

import collections.abc
import os
from typing import Any, Iterator, Sequence

from torch import nn

from . import serving
from .adapter import BASE_ADAPTER_NAME, Adapter, build_adapter
from .batch import forget_adapter, mixed_call
from .config import AdapterConfig
from .errors import (
    AdapterStateError,
    MixedBatchError,
    UnsupportedArgumentError,
    check_bool,
    check_path,
    wrong_type,
)
from .io import read_adapter, save_adapters
from .layers import AdapterLayer, upcast_layers
from .registry import AdapterRegistry
from .util import adapter_dir, present_forward_signature
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
        if not isinstance(model, nn.Module):
            raise wrong_type("model", "a torch nn.Module (the base model to adapt)", model)
        if isinstance(model, AdapterWrapper):
            raise wrong_type(
                "model", "a base model, not an AdapterWrapper", model,
                " Add adapters to this wrapper directly (add_adapter_from_config).",
            )
        adapters = nn.ModuleDict()
        registry = AdapterRegistry(model, adapters)  # refuses a model wrapped elsewhere
        self.model = model
        self.adapters = adapters
        #: The adapters' state and operations (:class:`tinytune.registry.AdapterRegistry`).
        self.registry = registry
        # inspect.signature(wrapper.forward) shows the base model's parameters (for HF
        # Trainer's remove_unused_columns); see tinytune/util.py.
        present_forward_signature(self, model)

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
            wrapper.registry.release(model)
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
        self.registry.add_adapter(adapter_name, activate)

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
        self.registry.check_new_name(adapter_name)
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
        adapter = build_adapter(
            self.registry.model(), config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
        )
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
            AdapterNotFoundError, LayerNotFoundError, LayerAlreadyAdaptedError,
            UnsupportedModuleError, AdapterStateError (the adapter is merged).
        """
        return self.registry.add_adapter_layer(
            adapter_name, layer_name, layer, slots=serving.slot_hooks(self)
        )

    def _attach(self, adapter: Adapter, activate: bool) -> None:
        self.registry.attach(adapter, activate, slots=serving.slot_hooks(self))

    # ------------------------------------------------------------------------------------
    # activation and deletion
    # ------------------------------------------------------------------------------------
    def set_active_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Make exactly these adapters active, in this order (an empty list: none)."""
        self.registry.set_active_adapters(adapter_names)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """PEFT's name for :meth:`set_active_adapters`."""
        self.set_active_adapters(adapter_name)

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
        self.registry.check_new_name(adapter_name)
        adapters = self.registry.names(adapters, "adapters")
        # With reserved slots, sources outside a slot have their weights in host memory:
        # combine them from their slots (on the model's device) instead.
        pins = serving.pin_adapters(self, adapters, combining=True)
        try:
            modules = {path: site.module for path, site in self.registry.sites.items()}
            adapter = add_weighted_adapter(
                self.registry.get, modules, adapters, weights, adapter_name, combination_type,
                svd_rank, svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method,
            )
            # Not activated, as in PEFT: call set_adapter(adapter_name) to use it.
            self._attach(adapter, False)
        finally:
            if pins is not None:
                pins.release()

    def unmerge_adapters(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Undo merges (default: all), restoring the original weights bit-exactly.

        The saved host copies are copied back in place: no device memory is allocated
        (adapters that stay merged are then merged again).
        """
        self.registry.unmerge_adapters(adapter_names, slots=serving.slot_hooks(self))

    def unload(self) -> nn.Module:
        """Remove every hook, undo merges and return the base model as it was.

        The wrapper keeps its adapters; :meth:`swap_base_model` attaches them again.
        """
        return self._unhooked(self.registry.unload())

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
        model = self.registry.model()
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
        old = self.registry.swap_base_model(new_model)
        self.model = new_model
        present_forward_signature(self, new_model)
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
        if self.registry.backups:
            prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
            for path, saved in self.registry.backups.items():
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
        registry = self.registry
        merged = list(registry.merged)
        if merged:
            registry.restore_all()
            registry.merged = []
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            if merged:
                for name in merged:
                    self._merge_one(name)
                registry.refresh()

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
        model = self.registry.model()
        if self.registry.hook_layout < 0:  # never true: the read makes torch.compile guard on it
            raise AdapterStateError("Corrupt hook layout; rebuild the wrapper.")
        if "adapter_names" in kwargs:
            adapter_names = kwargs.pop("adapter_names")
            if adapter_names is not None:
                return self._mixed_call(model, adapter_names, args, kwargs)
        if self.registry.slots_reserved:
            return serving.plain_call(self, model, args, kwargs)
        return model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Call the base model's ``generate`` (transformers models)."""
        model = self.registry.model()
        if not hasattr(model, "generate"):
            raise AttributeError(f"{type(model).__name__} has no generate() method.")
        if "adapter_names" in kwargs:
            adapter_names = kwargs.pop("adapter_names")
            if adapter_names is not None:
                return self._mixed_call(model.generate, adapter_names, args, kwargs)
        if self.registry.slots_reserved:
            return serving.plain_call(self, model.generate, args, kwargs)
        return model.generate(*args, **kwargs)

    def _mixed_call(self, fn: Any, adapter_names: Sequence[str], args: tuple, kwargs: dict) -> Any:
        if self.registry.tensor_parallel:
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
        serving.reserve(self, max_adapters, max_rank)

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
        serving.hotswap(self, path, adapter_name, **kwargs)

    def slot_stats(self) -> dict[str, Any]:
        """Memory and traffic of the mixed-batch stacks.

        Returns:
            A plain dict: ``device_bytes`` (the stacks, on the model's device),
            ``host_bytes`` (the host tier: weights of adapters kept outside the slots),
            ``resident`` (names of adapters in slots, most recently used first),
            ``loads`` (adapters written into a slot so far), ``evictions``, and
            ``max_adapters`` / ``max_rank`` (``None`` without reserved slots).
        """
        return serving.stats(self)

    # ------------------------------------------------------------------------------------
    # files (PEFT's on-disk format; see tinytune/io.py)
    # ------------------------------------------------------------------------------------
    def save_adapter(self, path: str, adapter_name: str = "default") -> None:
        """Save one adapter in PEFT's layout (``adapter_config.json`` +
        ``adapter_model.safetensors``)."""
        self._save([(adapter_name, path)])

    def load_adapter(
        self, path: str, adapter_name: str = "default", activate: bool = True, **kwargs: Any
    ) -> None:
        """Load an adapter saved by PEFT or tinytune; activates it like ``add_adapter``.

        Reads ``adapter_config.json`` and ``adapter_model.safetensors`` only (never
        pickle). The keys in the weights file say which modules are adapted; the config
        gives each layer its settings (``lora_alpha``, ``alpha_pattern``, ``use_rslora``,
        ...). The whole adapter is built and checked first; any error leaves the wrapper
        and base model exactly as they were. ``subfolder=`` (PEFT's keyword) reads
        ``path/subfolder``, where ``save_pretrained`` puts the adapters other than
        ``"default"``. ``autocast_adapter_dtype=True`` stores float16/bfloat16 weights in
        float32 (PEFT's option).

        Args:
            path: The adapter directory.
            adapter_name: Name for the loaded adapter; must be new.
            activate: Add it to the active adapters, as ``add_adapter`` does.
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

        Raises:
            AdapterExistsError: If ``adapter_name`` is taken.
            AdapterFileNotFoundError: If the directory or one of the two files is missing.
            AdapterFileError: For a legacy ``adapter_model.bin``, a corrupt or truncated
                file, a key that names no module, a tensor of the wrong shape, a missing
                tensor, or a custom layer type with no class passed in ``custom_layers``.
            InvalidConfigError: If the config uses a PEFT option tinytune does not
                implement (``use_dora``, ``bias``, ...), or an unsupported ``peft_type``.
        """
        path = check_path(path)
        subfolder = kwargs.pop("subfolder", None)
        if subfolder:
            path = os.path.join(path, check_path(subfolder, "subfolder"))
        autocast = kwargs.pop("autocast_adapter_dtype", False)
        self.registry.check_new_name(adapter_name)
        check_bool(activate, "activate")
        adapter = read_adapter(self.registry.model(), path, adapter_name, **kwargs)
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
            names = list(self.adapters) if selected_adapters is None else self.registry.names(selected_adapters)
            items = [(name, adapter_dir(save_directory, name)) for name in names]
        self._save(items, write=is_main_process)

    def _save(self, items: list[tuple[str, Any]], write: bool = True) -> None:
        """Write ``[(adapter name, directory), ...]``, every adapter checked first."""
        adapters = [(self.registry.get(name), path) for name, path in items]
        save_adapters(self.registry.model(), adapters, write=write)

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
            wrapper.registry.release(model)
            raise
        return wrapper

    def __getstate__(self) -> dict:
        # The per-instance ``forward`` (the base model's signature, see
        # tinytune/training.py) is derived state: rebuilt on unpickling / deep copies.
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

    # Read by tests and older code: the registry's state under its former names.
    @property
    def _sites(self) -> dict:
        return self.registry.sites

    @property
    def _hook_layout(self) -> int:
        return self.registry.hook_layout

    @property
    def _backups(self) -> dict:
        return self.registry.backups
