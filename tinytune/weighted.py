"""``add_weighted_adapter``: a new LoRA adapter combined from existing ones, as in PEFT.

The three exact or classic combinations of PEFT's ``LoraModel.add_weighted_adapter``,
computed the same way on the same weights, so a PEFT user's script gives the same
outputs here:

* ``"linear"``: ``A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ``, ``B = Σ √|wᵢsᵢ|·Bᵢ`` (all ranks equal;
  an approximation of the weighted sum);
* ``"cat"``: ``A = [w₁s₁A₁; w₂s₂A₂; ...]``, ``B = [B₁, B₂, ...]``, rank ``Σ rᵢ``: exactly
  ``Σ wᵢ ΔWᵢ``;
* ``"svd"``: the best rank-``svd_rank`` approximation of ``Σ wᵢ ΔWᵢ``.

The new adapter has ``r = lora_alpha = new rank`` (``use_rslora`` and dropout from the
first adapter), like PEFT's.

Floor 4 (beside ``hooks`` and ``io``): imports ``errors``, ``util``, ``layers``,
``config`` and ``adapter``. Takes the source adapters and modules, returns an
``Adapter``; never calls back into the wrapper.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .adapter import Adapter, layer_key
from .config import AdapterConfig, LoraConfig
from .errors import InvalidConfigError, UnsupportedModuleError, check_bool, wrong_type
from .util import check_number, device_of
from .layers import (
    AdapterLayer,
    Conv2dLoraLayer,
    EmbeddingLoraLayer,
    LoraLayer,
    ModulesToSaveLayer,
    lora_layer_for,
)

__all__ = ["add_weighted_adapter", "COMBINATION_TYPES"]

#: The combination types tinytune implements (PEFT's other ones are refused by name).
COMBINATION_TYPES = ("linear", "cat", "svd")
_SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")  # torch.linalg.svd's, cuSOLVER only
_PEFT_ONLY = (
    "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
    "magnitude_prune", "magnitude_prune_svd",
)


def _factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` in PEFT's layout: A ``(r, in[, kh, kw])`` (embeddings: ``(r, num)``),
    B ``(out, r[, 1, 1])``."""
    if isinstance(layer, EmbeddingLoraLayer):
        return layer.lora_A.weight.detach().t(), layer.lora_B.weight.detach()
    return layer.lora_A.weight.detach(), layer.lora_B.weight.detach()


def _set_factors(layer: LoraLayer, a: torch.Tensor, b: torch.Tensor) -> None:
    with torch.no_grad():
        if isinstance(layer, EmbeddingLoraLayer):
            a = a.t()
        layer.lora_A.weight.copy_(a.to(layer.lora_A.weight.dtype))
        layer.lora_B.weight.copy_(b.to(layer.lora_B.weight.dtype))


def _delta(layer: LoraLayer) -> torch.Tensor:
    """``s·B A`` in PEFT's layout, fp32: ``(out, in)``, ``(dim, num)`` for embeddings,
    ``(out, in, kh, kw)`` for Conv2d."""
    a, b = _factors(layer)
    if isinstance(layer, Conv2dLoraLayer):
        return layer.delta_weight()
    return (b.float() @ a.float()) * layer.scaling


def add_weighted_adapter(
    get_adapter: Callable[[str], Any],
    modules: Mapping[str, nn.Module],
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
) -> Adapter:
    """Build (not attach) ``adapter_name``, a LoRA adapter combining ``adapters`` with
    ``weights`` (PEFT's method, same arguments and, for ``"linear"``, ``"cat"`` and
    ``"svd"``, the same result); the caller checks the new name first.

    ``"cat"`` stacks the weighted factors (rank = sum of ranks; exactly
    ``Σ wᵢ ΔWᵢ``); ``"svd"`` keeps the top ``svd_rank`` (default: the largest rank)
    singular directions of ``Σ wᵢ ΔWᵢ``; ``"linear"`` sums the factors, each scaled
    by ``√|wᵢ sᵢ|`` (same ranks only; an approximation). The new adapter has
    ``r = lora_alpha =`` the new rank and is not activated (as in PEFT): call
    ``set_adapter(adapter_name)``. ``density``/``majority_sign_method`` belong to
    PEFT's TIES/DARE types, which tinytune does not implement.

    Args:
        get_adapter: Looks up a source adapter by name (raises for an unknown one).
        modules: ``{module path: module}`` of the adapted modules.
        adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
        svd_full_matrices, svd_driver, density, majority_sign_method: PEFT's.

    Returns:
        The new ``Adapter`` (not activated, as in PEFT), on its modules' devices.

    Raises:
        AdapterNotFoundError: For an unknown adapter (from ``get_adapter``).
        InvalidConfigError: For weights that are not one number per adapter, another
            ``combination_type``, ``"linear"`` with different ranks, or two adapters
            training a copy of the same module (``modules_to_save``).
        UnsupportedModuleError: If an adapter has non-LoRA layers (IA³, custom).
    """
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    if not adapters:
        raise InvalidConfigError("adapters is empty: name the adapters to combine.")
    sources = [get_adapter(name) for name in adapters]
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise InvalidConfigError(f"weights must be a list of numbers, got {weights!r}.")
    weights = list(weights)
    if len(weights) != len(adapters) or not all(
        isinstance(w, numbers.Real) and not isinstance(w, bool) for w in weights
    ):
        raise InvalidConfigError(
            f"weights must be a list of {len(adapters)} numbers, one per adapter in "
            f"{adapters!r}; got {weights!r}."
        )
    if combination_type in _PEFT_ONLY:
        raise InvalidConfigError(
            f"combination_type={combination_type!r} is not implemented by tinytune; use one of "
            f"{list(COMBINATION_TYPES)!r} (\"cat\" and \"svd\" are exact, \"linear\" approximate)."
        )
    if combination_type not in COMBINATION_TYPES:
        raise InvalidConfigError(
            f"combination_type must be one of {list(COMBINATION_TYPES)!r}, got {combination_type!r}."
        )
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise InvalidConfigError(f"svd_rank must be a positive integer or None, got {svd_rank!r}.")
    if svd_clamp is not None:
        check_number(svd_clamp, "svd_clamp")
        if not 0 <= svd_clamp <= 1:
            raise InvalidConfigError(
                f"svd_clamp is a quantile in [0, 1] (e.g. 0.99) or None, got {svd_clamp!r}."
            )
    check_bool(svd_full_matrices, "svd_full_matrices")
    if svd_driver is not None and svd_driver not in _SVD_DRIVERS:
        raise wrong_type("svd_driver", f"None or one of {list(_SVD_DRIVERS)!r} (CUDA only)", svd_driver)
    if len(adapters) == 1:
        combination_type = "linear"  # as in PEFT

    # Which modules, and what is on them.
    per_path: dict[str, dict[str, LoraLayer]] = {}
    saves: dict[str, list[str]] = {}
    for name, adapter in zip(adapters, sources):
        for path, layer in adapter.items():
            if isinstance(layer, ModulesToSaveLayer):
                saves.setdefault(path, []).append(name)
            elif type(layer) in (lora_layer_for(modules[path]),) and isinstance(layer, LoraLayer):
                per_path.setdefault(path, {})[name] = layer
            else:
                raise UnsupportedModuleError(
                    f"add_weighted_adapter combines LoRA adapters only, but adapter {name!r} has a "
                    f"{type(layer).__name__} on {path!r}. Combine adapters made of built-in LoRA "
                    "layers (and modules_to_save)."
                )
    shared = {p: n for p, n in saves.items() if len(n) > 1}
    if shared:
        path, names = next(iter(shared.items()))
        raise InvalidConfigError(
            f"Adapters {names!r} all train a copy of {path!r} (modules_to_save), which cannot be "
            "combined (PEFT refuses this too). Combine adapters that train different modules."
        )
    if not per_path:
        raise InvalidConfigError(f"Adapters {adapters!r} have no LoRA layers to combine.")

    ranks = [max((l.r for _, l in a.items() if isinstance(l, LoraLayer)), default=0) for a in sources]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise InvalidConfigError(
                f"combination_type='linear' needs adapters of one rank, got ranks {ranks} for "
                f"{adapters!r} (as in PEFT); use combination_type='cat' or 'svd'."
            )
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)

    # Dropout and rsLoRA of the new layers: the first adapter's, as PEFT copies its config.
    first = next(
        (l for _, l in sources[0].items() if isinstance(l, LoraLayer)),
        next(iter(per_path[next(iter(per_path))].values())),
    )
    model_modules = {path: modules[path] for path in list(per_path) + list(saves)}
    built: list[tuple[str, AdapterLayer]] = []
    clipped: dict[str, int] = {}
    for path, present in per_path.items():
        module = model_modules[path]
        cls = lora_layer_for(module)
        rank = new_rank
        if combination_type == "svd":
            # Σ wᵢ ΔWᵢ has rank at most min(out, in): beyond that the SVD has no more
            # directions, and PEFT's factors come out with that many rows.
            rank = min(new_rank, _max_rank(next(iter(present.values()))))
            if rank < new_rank:
                clipped[path] = rank
        layer = cls(
            r=rank,
            lora_alpha=rank,
            lora_dropout=first.lora_dropout,
            use_rslora=first.use_rslora,
        )
        layer.reset_params(path, module)
        used = [(n, w) for n, w in zip(adapters, weights) if n in present]
        if combination_type == "cat":
            a_parts, b_parts = [], []
            for n, w in used:
                a, b = _factors(present[n])
                a_parts.append(a.float() * w * present[n].scaling)
                b_parts.append(b.float())
            a_cat, b_cat = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
            a_new, b_new = (t.detach().clone().float().zero_() for t in _factors(layer))
            a_new[: a_cat.shape[0]] = a_cat
            b_new[:, : b_cat.shape[1]] = b_cat
        elif combination_type == "linear":
            shapes = {tuple(_factors(present[n])[0].shape) for n, _ in used}
            if len(shapes) != 1:
                raise InvalidConfigError(
                    f"combination_type='linear' needs one rank per module, but the adapters' "
                    f"layers on {path!r} differ (A shapes {sorted(shapes)}); use 'cat' or 'svd'."
                )
            a_new = b_new = None
            for n, w in used:
                ws = w * present[n].scaling
                sign = 1.0 if ws >= 0 else -1.0
                a, b = _factors(present[n])
                ta = a.float() * (math.sqrt(abs(ws)) * sign)
                tb = b.float() * math.sqrt(abs(ws))
                a_new = ta if a_new is None else a_new + ta
                b_new = tb if b_new is None else b_new + tb
        else:
            a_new, b_new = _svd(layer, [(present[n], w) for n, w in used], rank,
                                svd_clamp, svd_full_matrices, svd_driver)
        _set_factors(layer, a_new, b_new)
        built.append((path, layer))
    for path, names in saves.items():
        if names[0] != adapters[0]:
            continue  # PEFT keeps the first adapter's modules_to_save only
        # PEFT's new adapter gets a fresh copy of the original module.
        layer = ModulesToSaveLayer()
        layer.reset_params(path, model_modules[path])
        built.append((path, layer))

    config = _combined_config(sources, new_rank, clipped)
    adapter = Adapter(adapter_name, config)
    for path, layer in built:
        device = device_of(model_modules[path])
        if device is not None:
            layer.to(device)
        adapter.layers[layer_key(path)] = layer
    return adapter


def _svd(
    layer: LoraLayer,
    parts: list[tuple[LoraLayer, float]],
    new_rank: int,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's SVD combination: the top ``new_rank`` singular triplets of ``Σ wᵢ ΔWᵢ``."""
    delta = sum(w * _delta(l) for l, w in parts)
    a_shape, b_shape = (tuple(t.shape) for t in _factors(layer))
    conv = isinstance(layer, Conv2dLoraLayer)
    if conv:
        delta = delta.flatten(start_dim=1) if delta.shape[2:4] != (1, 1) else delta.squeeze()
    if driver is not None and delta.device.type != "cuda":
        raise InvalidConfigError(
            f"svd_driver={driver!r} selects a cuSOLVER routine, which only runs on CUDA; the "
            f"adapters are on {delta.device.type}. Leave svd_driver=None."
        )
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    vh = vh[:new_rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    if conv:
        u, vh = u.reshape(b_shape), vh.reshape(a_shape)
    return vh, u


def _max_rank(layer: LoraLayer) -> int:
    """The largest rank of a delta on ``layer``'s module: ``min(out, in)`` of its 2-D
    form (a Conv2d's input dimension is ``in·kh·kw``)."""
    a, b = _factors(layer)
    return min(b.shape[0], math.prod(a.shape[1:]))


def _combined_config(sources: list, new_rank: int, clipped: dict[str, int]) -> AdapterConfig | None:
    """PEFT's config for the combination: the first config with the new rank and the
    union of the targets; ``None`` when the adapters have no common config form.
    ``clipped`` (module path: rank) are the modules whose rank was clipped below the new
    rank, recorded as ``rank_pattern`` and ``alpha_pattern`` (scale 1, as elsewhere)."""
    configs = [a.config for a in sources]
    if not all(type(c) is LoraConfig for c in configs):
        return None
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, list) for t in targets):
        combined: Any = sorted({name for t in targets for name in t})
    elif all(isinstance(t, str) and t != "all-linear" for t in targets):
        combined = "|".join(f"({t})" for t in targets)
    else:
        return None
    try:
        return dataclasses.replace(
            configs[0],
            r=new_rank,
            lora_alpha=new_rank,
            target_modules=combined,
            rank_pattern=dict(clipped),
            alpha_pattern={path: float(r) for path, r in clipped.items()},
        )
    except InvalidConfigError:
        return None
