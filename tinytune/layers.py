"""Adapter layers: what one adapter does to one module of the base model.

An :class:`AdapterLayer` never owns or replaces the module it adapts. It is handed the
module in each call: ``pre_forward`` may change the module's inputs, ``post_forward``
may change its output, ``merge`` may fold the layer into the module's weights.

Floor 1 (above ``weights``): imports ``errors``, ``util`` and ``weights`` only.
"""

from __future__ import annotations

import copy
import math
import weakref
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidConfigError, MergeNotSupportedError, UnsupportedModuleError, check_bool
from .util import check_init_lora_weights, check_number, check_rank, is_dtensor
from .weights import is_quantized, linear_sizes, weight_kind

__all__ = [
    "AdapterLayer",
    "LoraLayer",
    "LinearLoraLayer",
    "EmbeddingLoraLayer",
    "Conv2dLoraLayer",
    "DoraLayer",
    "LinearDoraLayer",
    "EmbeddingDoraLayer",
    "Conv2dDoraLayer",
    "LinearIA3Layer",
    "ModulesToSaveLayer",
    "lora_layer_for",
]


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The module's main input: the first positional argument, else the first keyword."""
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def replace_first_input(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: x}


def _definer(mro: tuple, name: str) -> type:
    return next(c for c in mro if name in c.__dict__)


def row_chunks(weight: torch.Tensor, max_bytes: int = 64 << 20) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of ``weight`` (dim 0) for chunked in-place updates.

    Each chunk's fp32 copy is at most an eighth of the weight's own size (and at most
    ``max_bytes``), at least one row: a merge's few fp32 temporaries per chunk then
    stay well under one weight, whatever the dtype.
    """
    rows = weight.shape[0] if weight.dim() else 1
    row_fp32 = 4 * max(1, weight.numel() // max(rows, 1))
    budget = min(weight.numel() * weight.element_size() // 8, max_bytes)
    step = max(1, budget // row_fp32)
    return [(i, min(rows, i + step)) for i in range(0, rows, step)]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: a linear layer storing W as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight")


def bypasses_forward(module: nn.Module) -> bool:
    """Whether ``module``'s owner reads its weights without calling it.

    ``nn.MultiheadAttention`` hands ``out_proj.weight`` (a
    ``NonDynamicallyQuantizableLinear``) to the attention kernel directly, so hooks on
    ``out_proj`` never run: an adapter there would do nothing unmerged, yet change the
    outputs once merged.
    """
    return isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def linear_features(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)`` of a linear-like module: from
    its kind for a quantized weight (see :mod:`tinytune.weights`), never from the packed
    weight's shape.

    Raises:
        UnsupportedModuleError: For other modules, and weights of no known kind.
    """
    if bypasses_forward(module):
        raise UnsupportedModuleError(
            f"{type(module).__name__} is the out_proj of nn.MultiheadAttention, which uses "
            "its weight without calling it, so a hook-based adapter on it would never run. "
            "Adapt other layers, or the attention with a custom AdapterLayer."
        )
    sizes = linear_sizes(module)
    if sizes is not None:
        return sizes[0], sizes[1], False
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if is_conv1d(module):
        fan_in, fan_out = module.weight.shape
        return int(fan_in), int(fan_out), True
    raise UnsupportedModuleError(
        f"expected nn.Linear or transformers' Conv1D, got {type(module).__name__}."
    )


def _param_kwargs(module: nn.Module) -> dict[str, Any]:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        return {"device": weight.device, "dtype": dtype}
    return {}


def quantized_merge_error(what: str, kind: str) -> MergeNotSupportedError:
    """The refusal of a merge into a quantized weight (``what`` names the module)."""
    return MergeNotSupportedError(
        f"Cannot merge into {what}: its weight is quantized ({kind}), and adding a float "
        "update to quantized data would corrupt it; nothing was merged. Keep the adapter "
        "unmerged (it runs on the quantized base as it is), or call "
        "merge_and_unload(dequantize=True) for a float model with the adapter merged into "
        "the dequantized weights."
    )


def refuse_quantized_merge(layer: nn.Module, module: nn.Module) -> None:
    """Raise :func:`quantized_merge_error` if ``module``'s weight is quantized (and
    ``UnsupportedModuleError`` for a weight of no known kind)."""
    weight = getattr(module, "weight", None)
    if type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point():
        return  # a plain float weight (whatever its shape: a merge reads its layout itself)
    if is_quantized(module):
        raise quantized_merge_error(
            f"this {type(module).__name__} (adapted by {type(layer).__name__})", weight_kind(module)
        )


class AdapterLayer(nn.Module):
    """Base class of every adapter layer, built-in or custom.

    Subclass it and implement ``pre_forward`` and/or ``post_forward``; create parameters
    in ``reset_params``, which is called once when the layer is attached to its module,
    so they can be shaped for it. Implement ``merge`` to allow merging; unmerging needs
    nothing from the layer (tinytune restores the module's saved weights, exactly).

    Attributes:
        merged: Whether the layer is currently folded into its module's weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.merged = False

    # --- what subclasses implement -------------------------------------------------
    def reset_params(self, prefix: str, target: nn.Module) -> None:
        """Create this layer's parameters for ``target`` (the module it adapts).

        Args:
            prefix: The dotted name of ``target`` in the base model.
            target: The module being adapted.

        Raises:
            UnsupportedModuleError: If the layer cannot adapt this kind of module.
        """

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Change the module's inputs. Returns the new ``(args, kwargs)``."""
        return args, kwargs

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Change the module's output. ``args``/``kwargs`` are the inputs it saw."""
        return output

    def merge(self, module: nn.Module) -> None:
        """Fold this layer into ``module``'s weights in place (optional)."""
        raise MergeNotSupportedError(
            f"{type(self).__name__} does not implement merge(); keep it unmerged, or "
            "implement merge(module) to fold it into the module's weights."
        )

    # --- introspection used by the hook site ----------------------------------------
    @property
    def uses_pre_forward(self) -> bool:
        return type(self).pre_forward is not AdapterLayer.pre_forward

    @property
    def uses_post_forward(self) -> bool:
        return type(self).post_forward is not AdapterLayer.post_forward

    @property
    def can_merge(self) -> bool:
        return type(self).merge is not AdapterLayer.merge

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "Adapter layers are applied by hooks on the module they adapt; call the "
            "AdapterWrapper (or the base model), not the layer."
        )


class LoraLayer(AdapterLayer):
    """Shared parts of the LoRA layers: rank, scaling and dropout.

    Args:
        r: Rank of the update (positive).
        lora_alpha: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: Dropout probability on the LoRA branch, in training mode only
            (not used by EmbeddingLoraLayer, as in PEFT).
        use_rslora: Rank-stabilised scaling.
        init_lora_weights: ``True``: B (or the embedding's A) starts at zero, so a new
            adapter is a no-op. ``"gaussian"``: the same, but A ~ N(0, 1/r²) (PEFT's
            option; embeddings as with ``True``). ``False``: both factors random.
    """

    def __init__(
        self,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool = True,
    ) -> None:
        super().__init__()
        check_rank(r, "r")
        for what, value in (("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout)):
            check_number(value, what)
        check_bool(use_rslora, "use_rslora")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise InvalidConfigError(f"lora_dropout must be in [0, 1), got {lora_dropout}.")
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.init_lora_weights = check_init_lora_weights(init_lora_weights)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)

    #: ``(A, Bᵀ)`` padded to the reserved ``max_rank`` (rows past ``r`` are zero): views
    #: of this layer's adapter slot, set while it is in one (see tinytune.serving).
    #: Calls without autograd read these instead of ``lora_A``/``lora_B``, so a compiled
    #: graph sees the same shapes whatever the rank (a rank-changing hot-swap does not
    #: recompile). ``None`` outside reserved slots.
    slot_factors: tuple[torch.Tensor, torch.Tensor] | None = None

    def padded_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:attr:`slot_factors` when this call may read them (no gradient needed)."""
        if self.slot_factors is None or torch.is_grad_enabled():
            return None
        return self.slot_factors

    # ``scaling`` lives twice: as a Python float, which eager code passes to ``addmm``
    # for free, and as a 0-dim tensor that compiled code reads. A float read by a
    # compiled graph is baked in as a constant and guarded on, so switching to an
    # adapter with another alpha (or setting ``scaling``) would recompile; a buffer is a
    # graph input, so its value can change under a compiled model. Non-persistent: it
    # is derived state, not part of ``state_dict``.
    @property
    def scaling(self) -> float:
        """The factor on the LoRA branch: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
        return self._scaling

    @scaling.setter
    def scaling(self, value: float) -> None:
        value = float(value)
        buf = self._buffers.get("scaling_tensor")
        if buf is None:
            self.register_buffer("scaling_tensor", torch.tensor(value), persistent=False)
        else:
            with torch.no_grad():
                buf.fill_(value)
        self._scaling = value

    def _scale(self) -> float | torch.Tensor:
        """The scaling to multiply by: the tensor under ``torch.compile``, else the float."""
        if torch.compiler.is_compiling():
            return self.scaling_tensor
        return self._scaling

    #: How many conversions (``.to()``, ``.half()``, ...) this layer went through: each
    #: may give it new tensors, so hook sites key the kernel inputs they keep on it.
    conversions = 0

    def _apply(self, fn: Any, recurse: bool = True) -> "LoraLayer":
        # ``.half()``/``.to(dtype)`` would round the scaling; keep it exact in fp32 (the
        # 0-dim tensor does not promote the half-precision tensors it multiplies).
        super()._apply(fn, recurse)
        buf = self._buffers.get("scaling_tensor")
        if buf is not None and buf.dtype != torch.float32:
            self._buffers["scaling_tensor"] = torch.tensor(self._scaling, device=buf.device)
        self.conversions += 1
        return self

    def _place_scaling(self, target: nn.Module) -> None:
        # Keep the scaling tensor on the adapted module's device, like the parameters.
        device = _param_kwargs(target).get("device")
        if device is not None and self.scaling_tensor.device != device:
            self.scaling_tensor = self.scaling_tensor.to(device)

    def _init_a(self, weight: torch.Tensor) -> None:
        """PEFT's init of A: Kaiming-uniform, or N(0, 1/r²) for ``"gaussian"``."""
        if self.init_lora_weights == "gaussian":
            nn.init.normal_(weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def _dropout(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.lora_dropout and module.training:
            return F.dropout(x, self.lora_dropout, training=True)
        return x

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * B A`` in the target weight's layout, in fp32."""
        raise NotImplementedError

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along dim 0 of the target weight) of :meth:`delta_weight`.

        Subclasses compute just those rows, so a merge never holds the whole fp32 update.
        """
        return self.delta_weight()[start:stop]

    def merge(self, module: nn.Module) -> None:
        # Row chunks, so the fp32 temporaries stay a fraction of one weight (see
        # row_chunks): a merge never doubles a large weight on its device.
        refuse_quantized_merge(self, module)
        weight = module.weight
        mro = type(self).__mro__
        by_rows = mro.index(_definer(mro, "delta_rows")) <= mro.index(_definer(mro, "delta_weight"))
        with torch.no_grad():
            # A subclass that overrides delta_weight but not delta_rows gets its own
            # delta, computed whole (delta_rows would compute the parent's).
            whole = None if by_rows else self.delta_weight().to(weight.device)
            for start, stop in row_chunks(weight):
                if whole is None:
                    d = self.delta_rows(start, stop).to(weight.device)
                else:
                    d = whole[start:stop].clone()
                d.add_(weight[start:stop])  # the same fp32 sum as weight.float() + delta
                weight[start:stop].copy_(d)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


class LinearLoraLayer(LoraLayer):
    """LoRA for ``nn.Linear`` and transformers' ``Conv1D``: ``y + s * B(A(x))``.

    ``lora_A`` is ``nn.Linear(in_features, r)`` and ``lora_B`` is
    ``nn.Linear(r, out_features)``, both without bias.
    """

    fan_in_fan_out = False

    def reset_params(self, prefix: str, target: nn.Module) -> None:
        try:
            fan_in, fan_out, self.fan_in_fan_out = linear_features(target)
        except UnsupportedModuleError as exc:
            raise UnsupportedModuleError(
                f"LinearLoraLayer cannot adapt {prefix!r}: {exc} Use EmbeddingLoraLayer for "
                "nn.Embedding, Conv2dLoraLayer for nn.Conv2d, or a custom AdapterLayer."
            ) from None
        kw = _param_kwargs(target)
        self._place_scaling(target)
        self.lora_A = nn.Linear(fan_in, self.r, bias=False, **kw)
        self.lora_B = nn.Linear(self.r, fan_out, bias=False, **kw)
        self._init_a(self.lora_A.weight)
        if self.init_lora_weights:
            nn.init.zeros_(self.lora_B.weight)
        else:
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))

    def post_forward(self, module, args, kwargs, output):
        padded = self.padded_factors()
        if padded is not None:
            a, bt = padded  # never touch lora_A/lora_B: compiled code would guard on r
        else:
            a, bt = self.lora_A.weight, self.lora_B.weight.t()
            if not torch.compiler.is_compiling() and is_dtensor(a):
                # Tensor parallelism (tinytune.training.parallelize_adapters).
                return tp_lora_post_forward(self, module, first_input(args, kwargs), output)
        x = self._dropout(module, first_input(args, kwargs))
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        h = F.linear(x, a)
        if output.dim() >= 2 and output.dtype == bt.dtype:
            # One GEMM with the add folded in: out + s * h @ B^T.
            out2d = output.reshape(-1, output.shape[-1])
            h2d = h.reshape(-1, h.shape[-1])
            if torch.compiler.is_compiling():
                # The scale as a tensor (see LoraLayer.scaling), applied to the small
                # (tokens, r) factor so the GEMM still accumulates into ``out``.
                y = torch.addmm(out2d, h2d * self.scaling_tensor, bt)
            else:
                y = torch.addmm(out2d, h2d, bt, alpha=self._scaling)
            return y.view(output.shape)
        return output + (F.linear(h, bt.t()) * self._scale()).to(output.dtype)

    def delta_weight(self) -> torch.Tensor:
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta.t() if self.fan_in_fan_out else delta

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
        if self.fan_in_fan_out:  # weight (in, out): rows are input features
            return (b @ a[:, start:stop]).t().mul_(self.scaling)
        return (b[start:stop] @ a).mul_(self.scaling)


class EmbeddingLoraLayer(LoraLayer):
    """LoRA for ``nn.Embedding``: ``E[x] + s * B(A[x])``.

    ``lora_A`` is ``nn.Embedding(num_embeddings, r)`` (initialised to zero, as in PEFT)
    and ``lora_B`` is ``nn.Linear(r, embedding_dim)`` (normal init).
    """

    def reset_params(self, prefix: str, target: nn.Module) -> None:
        weight_kind(target, prefix)  # a weight of no known kind is refused
        if not isinstance(target, nn.Embedding):
            raise UnsupportedModuleError(
                f"EmbeddingLoraLayer cannot adapt {prefix!r} of type {type(target).__name__}: "
                "it needs nn.Embedding. Use LinearLoraLayer for linear layers."
            )
        kw = _param_kwargs(target)
        self._place_scaling(target)
        self.lora_A = nn.Embedding(target.num_embeddings, self.r, **kw)
        self.lora_B = nn.Linear(self.r, target.embedding_dim, bias=False, **kw)
        nn.init.normal_(self.lora_B.weight)
        if self.init_lora_weights:
            nn.init.zeros_(self.lora_A.weight)
        else:
            nn.init.normal_(self.lora_A.weight)

    def post_forward(self, module, args, kwargs, output):
        ids = first_input(args, kwargs)
        padded = self.padded_factors()
        a, bt = padded if padded is not None else (self.lora_A.weight, self.lora_B.weight.t())
        h = F.embedding(
            ids,
            a,
            padding_idx=module.padding_idx,
            scale_grad_by_freq=module.scale_grad_by_freq,
            sparse=module.sparse,
        )
        # No dropout on embedding LoRA, as in PEFT: dropping token ids' rows is not what
        # lora_dropout means.
        return output + (F.linear(h, bt.t()) * self._scale()).to(output.dtype)

    def delta_weight(self) -> torch.Tensor:
        a = self.lora_A.weight.float()  # (num_embeddings, r)
        return (a @ self.lora_B.weight.float().t()) * self.scaling

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        a = self.lora_A.weight[start:stop].float()
        return (a @ self.lora_B.weight.float().t()).mul_(self.scaling)


class Conv2dLoraLayer(LoraLayer):
    """LoRA for ``nn.Conv2d``: A is a conv with the target's kernel, B a 1x1 conv."""

    def reset_params(self, prefix: str, target: nn.Module) -> None:
        weight_kind(target, prefix)  # a weight of no known kind is refused
        if not isinstance(target, nn.Conv2d):
            raise UnsupportedModuleError(
                f"Conv2dLoraLayer cannot adapt {prefix!r} of type {type(target).__name__}: "
                "it needs nn.Conv2d."
            )
        if target.groups != 1:
            raise UnsupportedModuleError(
                f"Conv2dLoraLayer cannot adapt {prefix!r}: grouped convolutions "
                f"(groups={target.groups}) are not supported."
            )
        kw = _param_kwargs(target)
        self._place_scaling(target)
        self.lora_A = nn.Conv2d(
            target.in_channels,
            self.r,
            target.kernel_size,
            target.stride,
            target.padding,
            target.dilation,
            bias=False,
            padding_mode=target.padding_mode,
            **kw,
        )
        self.lora_B = nn.Conv2d(self.r, target.out_channels, 1, bias=False, **kw)
        self._init_a(self.lora_A.weight)
        if self.init_lora_weights:
            nn.init.zeros_(self.lora_B.weight)
        else:
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))

    def post_forward(self, module, args, kwargs, output):
        x = self._dropout(module, first_input(args, kwargs))
        if x.dtype != self.lora_A.weight.dtype:
            x = x.to(self.lora_A.weight.dtype)
        return output + (self.lora_B(self.lora_A(x)) * self._scale()).to(output.dtype)

    def delta_weight(self) -> torch.Tensor:
        a = self.lora_A.weight.float()  # (r, in, kh, kw)
        b = self.lora_B.weight.float()  # (out, r, 1, 1)
        delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        return delta * self.scaling

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        a = self.lora_A.weight.float()
        b = self.lora_B.weight[start:stop].float()
        return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * self.scaling


class DoraLayer(LoraLayer):
    """Shared parts of the DoRA layers (weight-decomposed LoRA, PEFT's ``use_dora=True``).

    DoRA rescales each output unit of the adapted weight: with ``W' = W + s·B·A``,

    ``y = g ⊙ (W' x) + b``,  ``g = m / ‖W'‖_row``,

    where the norm is taken per output unit over the input dimension and ``m``
    (``lora_magnitude_vector``, one entry per output unit, PEFT's name) is trained.
    As in PEFT (and the DoRA paper, section 4.3) the norm is treated as a constant:
    no gradient flows through it. It depends on the weights only, so outside
    autograd it is computed once and cached (:meth:`dora_scale`), and computed again
    whenever the base weight, ``A``, ``B``, ``m`` or the scaling change.

    ``m`` starts at ``‖W + s·B·A‖_row`` (with ``B = 0``: the base weight's norms), so
    a new adapter is a no-op, as in PEFT.
    """

    #: Whether the target weight's dim 0 indexes output units (Linear, Conv2d) or input
    #: units (Conv1D and Embedding store ``(in, out)`` / ``(num, dim)``).
    out_rows = True

    #: The module's weight as it was before any adapter was merged into it (a host
    #: copy, set by the wrapper while merges are in place), else ``None``. The norm is
    #: always taken over that original weight, as PEFT's merges do: then merging in the
    #: chain's order gives the same function as running unmerged, whatever else is
    #: merged into the module.
    norm_base: torch.Tensor | None = None

    def reset_params(self, prefix: str, target: nn.Module) -> None:
        super().reset_params(prefix, target)
        self.__dict__["_dora_target"] = weakref.ref(target)
        self.__dict__["_dora_key"] = None
        kw = _param_kwargs(target)
        with torch.no_grad():
            norm = self.weight_norm(target.weight)
        self.lora_magnitude_vector = nn.Parameter(
            norm.to(kw.get("dtype", torch.float32)).view(self.magnitude_shape(norm.numel()))
        )
        self.register_buffer(
            "dora_scale_cache", torch.ones(norm.numel(), device=norm.device), persistent=False
        )

    def magnitude_shape(self, n: int) -> tuple[int, ...]:
        """The shape of ``lora_magnitude_vector`` (PEFT's): ``(n,)``."""
        return (n,)

    # --- the norm and the scale ------------------------------------------------------
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``‖weight + s·B·A‖`` per output unit, in fp32, shape ``(out,)`` (no autograd).

        Computed in row chunks of the weight (see :func:`row_chunks`), so it never holds
        an fp32 copy of the whole weight.

        Args:
            weight: The adapted module's weight, in its own layout.

        Returns:
            A detached fp32 tensor of shape ``(out,)`` on the weight's device.
        """
        with torch.no_grad():
            weight = weight.detach()
            parts: list[torch.Tensor] = []
            acc: torch.Tensor | None = None
            for start, stop in row_chunks(weight):
                d = self.delta_rows(start, stop).to(weight.device)
                d = d + weight[start:stop].float()
                if self.out_rows:
                    parts.append(d.flatten(1).square().sum(1))
                else:
                    part = d.square().sum(0)
                    acc = part if acc is None else acc + part
            sq = torch.cat(parts) if self.out_rows else acc
            return sq.sqrt()

    def _key(self, weight: torch.Tensor) -> tuple:
        a, b, m = self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector
        base = self.norm_base
        if base is not None:
            weight = base
        return (
            weight.data_ptr(), weight._version, weight.dtype, base is None,
            a.data_ptr(), a._version, b.data_ptr(), b._version,
            m.data_ptr(), m._version, self._scaling, self.conversions,
        )

    def _target_weight(self, module: nn.Module | None) -> torch.Tensor:
        if module is None:
            ref = self.__dict__.get("_dora_target")
            module = ref() if ref is not None else None
            if module is None:
                raise UnsupportedModuleError(
                    f"{type(self).__name__}.dora_scale() needs the adapted module: attach the "
                    "layer to a model first, or pass the module."
                )
        return module.weight

    def dora_norm(self, module: nn.Module | None = None) -> torch.Tensor:
        """The cached ``‖W + s·B·A‖`` per output unit (fp32, detached, shape ``(out,)``).

        Computed again when the base weight, ``A``, ``B``, ``m`` or the scaling changed
        since the last call (in place or by replacement), as :meth:`dora_scale` is.

        Args:
            module: The adapted module (default: the one the layer was attached to).
        """
        self._refresh(self._target_weight(module))
        return self.__dict__["_dora_norm"]

    def dora_scale(self, module: nn.Module | None = None) -> torch.Tensor:
        """DoRA's per-output scale ``g = m / ‖W + s·B·A‖_row``, cached.

        The value the fused kernels apply to each output column (``col_scale``) and the
        PyTorch path multiplies by. Recomputed when the base weight, ``A``, ``B``, ``m``
        or the scaling changed since the last call (hot-swaps, in-place updates, a new
        base model); under ``torch.compile`` the cached tensor is returned as it is
        (tinytune refreshes it eagerly whenever it changes adapters or weights).

        Args:
            module: The adapted module (default: the one the layer was attached to).

        Returns:
            A detached fp32 tensor of shape ``(out,)`` on the module's device; it is
            updated in place, so callers may keep it.
        """
        if torch.compiler.is_compiling():
            return self.dora_scale_cache
        self._refresh(self._target_weight(module))
        return self.dora_scale_cache

    def _refresh(self, weight: torch.Tensor) -> None:
        key = self._key(weight)
        if key == self.__dict__.get("_dora_key"):
            return
        with torch.inference_mode(False), torch.no_grad():
            source = weight if self.norm_base is None else self.norm_base
            norm = self.weight_norm(source).to(weight.device)
            m = self.lora_magnitude_vector.detach().reshape(-1).to(norm.device, torch.float32)
            cache = self.dora_scale_cache
            if cache.device != norm.device or cache.shape != norm.shape:
                cache = self.dora_scale_cache = torch.empty_like(norm)
            cache.copy_(m / norm)
        self.__dict__["_dora_norm"] = norm
        self.__dict__["_dora_key"] = self._key(weight)

    def _apply(self, fn: Any, recurse: bool = True) -> "DoraLayer":
        super()._apply(fn, recurse)
        buf = self._buffers.get("dora_scale_cache")
        if buf is not None and buf.dtype != torch.float32:
            self._buffers["dora_scale_cache"] = buf.float()
        self.__dict__["_dora_key"] = None
        return self

    def scale_for(self, module: nn.Module) -> torch.Tensor:
        """``g`` for one forward call: differentiable in ``m`` when autograd needs it
        (the norm detached, as in PEFT), else the cached :meth:`dora_scale`."""
        m = self.lora_magnitude_vector
        if torch.is_grad_enabled() and m.requires_grad:
            if torch.compiler.is_compiling():
                source = module.weight if self.norm_base is None else self.norm_base
                norm = self.weight_norm(source).to(module.weight.device)
            else:
                norm = self.dora_norm(module)
            return m.reshape(-1) / norm.to(m.dtype)
        if torch.compiler.is_compiling():
            return self.dora_scale_cache
        return self.dora_scale(module)

    # --- merging -----------------------------------------------------------------------
    def merge(self, module: nn.Module) -> None:
        # W <- g ⊙ (W + s·B·A), with g from the weight as it is now (as the unmerged
        # forward computes it); unmerging restores the saved original (exact).
        weight = module.weight
        with torch.no_grad():
            source = weight if self.norm_base is None else self.norm_base
            norm = self.weight_norm(source).to(weight.device)
            g = self.lora_magnitude_vector.detach().reshape(-1).float().to(norm.device) / norm
            for start, stop in row_chunks(weight):
                d = self.delta_rows(start, stop).to(weight.device)
                d.add_(weight[start:stop])
                if self.out_rows:
                    d.mul_(g[start:stop].view(-1, *([1] * (d.dim() - 1))))
                else:
                    d.mul_(g.view(1, -1))
                weight[start:stop].copy_(d)
        self.__dict__["_dora_key"] = None

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


class LinearDoraLayer(DoraLayer, LinearLoraLayer):
    """DoRA for ``nn.Linear`` and transformers' ``Conv1D``.

    ``y = g ⊙ (W x + s·B A x) + b`` with ``g = m / ‖W + s·B·A‖_row`` (see
    :class:`DoraLayer`). ``lora_magnitude_vector`` has shape ``(out_features,)``.
    """

    @property
    def out_rows(self) -> bool:  # type: ignore[override]
        return not self.fan_in_fan_out

    def post_forward(self, module, args, kwargs, output):
        x = first_input(args, kwargs)
        padded = self.padded_factors()
        if padded is not None:
            a, bt = padded
        else:
            a, bt = self.lora_A.weight, self.lora_B.weight.t()
            if not torch.compiler.is_compiling() and is_dtensor(a):
                raise UnsupportedModuleError(
                    "DoRA layers do not support tensor parallelism (DTensor factors); use "
                    "LoRA (use_dora=False) with parallelize_adapters."
                )
        g = self.scale_for(module).to(output.dtype)
        xd = self._dropout(module, x)
        h = xd if xd.dtype == a.dtype else xd.to(a.dtype)
        lora = F.linear(F.linear(h, a), bt.t()).to(output.dtype)
        weight = module.weight
        if xd is not x:
            # Dropout changed the input: PEFT computes the base product of the dropped
            # input for the rescaled part.
            w = weight.t() if self.fan_in_fan_out else weight
            base = F.linear(xd.to(w.dtype), w).to(output.dtype)
        else:
            bias = getattr(module, "bias", None)
            base = output if bias is None else output - bias.to(output.dtype)
        return output + ((g - 1) * base + g * lora * self._scale())


class EmbeddingDoraLayer(DoraLayer, EmbeddingLoraLayer):
    """DoRA for ``nn.Embedding``: ``g ⊙ (E[x] + s·A[x] Bᵀ)``, with one scale per
    embedding dimension (the norm runs over the vocabulary, as in PEFT).
    ``lora_magnitude_vector`` has shape ``(embedding_dim,)``.
    """

    out_rows = False

    def post_forward(self, module, args, kwargs, output):
        ids = first_input(args, kwargs)
        padded = self.padded_factors()
        a, bt = padded if padded is not None else (self.lora_A.weight, self.lora_B.weight.t())
        h = F.embedding(
            ids,
            a,
            padding_idx=module.padding_idx,
            scale_grad_by_freq=module.scale_grad_by_freq,
            sparse=module.sparse,
        )
        g = self.scale_for(module).to(output.dtype)
        lora = F.linear(h, bt.t()).to(output.dtype)
        return g * output + g * lora * self._scale()


class Conv2dDoraLayer(DoraLayer, Conv2dLoraLayer):
    """DoRA for ``nn.Conv2d``: one scale per output channel, the norm over
    ``(in_channels, kh, kw)``. ``lora_magnitude_vector`` has PEFT's shape
    ``(1, out_channels, 1, 1)``.
    """

    out_rows = True

    def magnitude_shape(self, n: int) -> tuple[int, ...]:
        return (1, n, 1, 1)

    def post_forward(self, module, args, kwargs, output):
        x = first_input(args, kwargs)
        g = self.scale_for(module).to(output.dtype).view(1, -1, 1, 1)
        xd = self._dropout(module, x)
        h = xd if xd.dtype == self.lora_A.weight.dtype else xd.to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(h)).to(output.dtype)
        if xd is not x:
            base = module._conv_forward(xd.to(module.weight.dtype), module.weight, None)
            base = base.to(output.dtype)
        else:
            bias = module.bias
            base = output if bias is None else output - bias.to(output.dtype).view(1, -1, 1, 1)
        return output + ((g - 1) * base + g * lora * self._scale())


_DORA_OF = {
    LinearLoraLayer: LinearDoraLayer,
    EmbeddingLoraLayer: EmbeddingDoraLayer,
    Conv2dLoraLayer: Conv2dDoraLayer,
}


def lora_layer_for(module: nn.Module, use_dora: bool = False) -> type[LoraLayer] | None:
    """The LoRA layer class for a module type, or ``None`` if LoRA cannot adapt it.

    Args:
        module: The module to adapt.
        use_dora: The DoRA class instead (:class:`LinearDoraLayer`, ...).
    """
    cls: type[LoraLayer] | None = None
    if isinstance(module, nn.Linear) or is_conv1d(module):
        cls = LinearLoraLayer
    elif isinstance(module, nn.Embedding):
        cls = EmbeddingLoraLayer
    elif isinstance(module, nn.Conv2d):
        cls = Conv2dLoraLayer
    if cls is not None and use_dora:
        return _DORA_OF[cls]
    return cls


def is_dora(layer: Any) -> bool:
    """Whether ``layer`` is a DoRA layer (:class:`DoraLayer`)."""
    return isinstance(layer, DoraLayer)


class LinearIA3Layer(AdapterLayer):
    """IA³ for ``nn.Linear`` and transformers' ``Conv1D``: learned per-feature scales.

    With ``is_feedforward=True`` (the default, as in the prototype) the input is
    scaled, ``W (x * l)`` with ``ia3_l`` of shape ``(1, in_features)``; with
    ``is_feedforward=False`` the output is scaled, ``y * l`` with ``ia3_l`` of shape
    ``(out_features, 1)`` (PEFT's shapes). ``IA3Config`` chooses per module by PEFT's
    rule (``feedforward_modules``), and files use PEFT's name ``ia3_l``; the
    prototype's name ``ia3_weight`` reads the same parameter.

    Args:
        is_feedforward: Scale the input (``True``) or the output (``False``).
        init_ia3_weights: ``True``: start at 1 (a no-op). ``False``: random scales.
    """

    def __init__(self, is_feedforward: bool = True, init_ia3_weights: bool = True) -> None:
        super().__init__()
        self.is_feedforward = is_feedforward
        self.init_ia3_weights = init_ia3_weights
        self.fan_in_fan_out = False

    def reset_params(self, prefix: str, target: nn.Module) -> None:
        try:
            fan_in, fan_out, self.fan_in_fan_out = linear_features(target)
        except UnsupportedModuleError as exc:
            raise UnsupportedModuleError(f"LinearIA3Layer cannot adapt {prefix!r}: {exc}") from None
        shape = (1, fan_in) if self.is_feedforward else (fan_out, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, **_param_kwargs(target)))
        if not self.init_ia3_weights:
            with torch.no_grad():
                self.ia3_l.normal_(1.0, 0.2)

    @property
    def ia3_weight(self) -> nn.Parameter:
        """The prototype's name for ``ia3_l`` (the same parameter)."""
        return self.ia3_l

    @property
    def uses_pre_forward(self) -> bool:
        return self.is_feedforward

    @property
    def uses_post_forward(self) -> bool:
        return not self.is_feedforward

    def pre_forward(self, module, args, kwargs):
        x = first_input(args, kwargs)
        return replace_first_input(args, kwargs, x * self.ia3_l.view(-1).to(x.dtype))

    def post_forward(self, module, args, kwargs, output):
        return output * self.ia3_l.view(-1).to(output.dtype)

    def merge(self, module: nn.Module) -> None:
        refuse_quantized_merge(self, module)
        scale = self.ia3_l.detach().view(-1).float()
        weight = module.weight
        # Linear stores W as (out, in), Conv1D as (in, out).
        per_column = self.is_feedforward != self.fan_in_fan_out
        with torch.no_grad():
            for start, stop in row_chunks(weight):
                s = scale.view(1, -1) if per_column else scale[start:stop].view(-1, 1)
                weight[start:stop].copy_(weight[start:stop].float() * s)
            bias = getattr(module, "bias", None)
            if not self.is_feedforward and bias is not None:
                bias.copy_((bias.float() * scale).to(bias.dtype))

    def extra_repr(self) -> str:
        return f"is_feedforward={self.is_feedforward}"


def _drop_hooks(module: nn.Module) -> None:
    """Clear every forward hook of ``module`` and its children (used on fresh copies)."""
    for m in module.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_pre_hooks_with_kwargs",
            "_forward_hooks_always_called",
        ):
            d = getattr(m, attr, None)
            if d is not None:
                d.clear()


class ModulesToSaveLayer(AdapterLayer):
    """A trainable full copy of a module (``modules_to_save``): its output replaces the
    original's while the adapter is active. Merging copies its weights into the
    original, which stays untouched until then.

    The copy is the child ``mimic`` (the prototype's name, so its parameters read
    ``...lin1.mimic.weight``); ``module_copy`` is the same module.
    """

    def reset_params(self, prefix: str, target: nn.Module) -> None:
        self.mimic = copy.deepcopy(target)
        _drop_hooks(self.mimic)
        self.mimic.requires_grad_(True)

    @property
    def module_copy(self) -> nn.Module:
        """The trained copy of the module (the child ``mimic``)."""
        return self.mimic

    def post_forward(self, module, args, kwargs, output):
        return self.mimic(*args, **kwargs)

    def merge(self, module: nn.Module) -> None:
        with torch.no_grad():
            src = self.module_copy.state_dict()
            for name, tensor in module.state_dict(keep_vars=True).items():
                tensor.copy_(src[name])


def layer_kind(layer: AdapterLayer) -> str | None:
    """How ``layer`` can be batched or fused: ``"lora"``, ``"emb"``, ``"ia3_pre"`` or
    ``"ia3_post"``, or ``None`` if it must run as itself (mixed batches stack these
    kinds; the fused kernels take all but ``"emb"``).

    A subclass that overrides the forward methods keeps its own behaviour, so only
    layers whose forward methods are the built-in ones are stacked.
    """
    cls = type(layer)
    if isinstance(layer, LinearLoraLayer) and cls.post_forward is LinearLoraLayer.post_forward:
        return "lora"
    if (
        isinstance(layer, EmbeddingLoraLayer)
        and cls.post_forward is EmbeddingLoraLayer.post_forward
    ):
        return "emb"
    if (
        isinstance(layer, LinearIA3Layer)
        and cls.pre_forward is LinearIA3Layer.pre_forward
        and cls.post_forward is LinearIA3Layer.post_forward
    ):
        return "ia3_pre" if layer.is_feedforward else "ia3_post"
    return None


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


def upcast_layers(layers: Iterator[nn.Module], dtype: torch.dtype = torch.float32) -> None:
    """Store the float16/bfloat16 parameters of ``layers`` in ``dtype`` (see
    :func:`cast_adapter_dtype`); other parameters are left alone."""
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
