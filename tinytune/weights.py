"""The one place that knows what a module's weight is: a plain float tensor, or one of
the quantized layouts tinytune supports (bitsandbytes 4-bit and 8-bit linears, torchao
int8 and float8 weight-only tensors).

Everything that reads or writes a base weight asks here: creating adapter layers (their
in/out features and dtype), merging (refused on a quantized weight, or done on its
dequantized copy), ``swap_base_model``, and the choice between the fused kernels and
PyTorch. A weight that is neither a plain float tensor in the module's own layout nor a
known quantized kind is refused with :class:`~tinytune.errors.UnsupportedModuleError`
instead of being adapted blindly.

Neither bitsandbytes nor torchao is imported here: a weight can only be theirs once
their modules are loaded, so detection reads ``sys.modules`` and class names.

Floor 1 (below ``layers``, above ``util``): imports ``errors`` and ``util`` only.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedModuleError
from .util import is_dtensor

__all__ = [
    "FLOAT",
    "KINDS",
    "QUANTIZED_KINDS",
    "dequantized_linear",
    "dequantized_weight",
    "float_dtype",
    "has_4bit",
    "int_weight_and_scale",
    "is_quantized",
    "linear_sizes",
    "model_float_dtype",
    "quantized_modules",
    "unpack_before_autograd",
    "unpack_cpu_4bit",
    "weight_kind",
    "weight_tensors",
]

#: The kind of a plain float weight (``(out, in)``, or ``Conv1D``'s ``(in, out)``), and
#: of a module without a weight tensor.
FLOAT = "float"
#: The quantized kinds tinytune supports (see :func:`weight_kind`).
QUANTIZED_KINDS = ("bnb_nf4", "bnb_fp4", "bnb_int8", "torchao_int8", "torchao_fp8")
#: Every kind :func:`weight_kind` returns.
KINDS = (FLOAT, *QUANTIZED_KINDS)

# The weight types of a plain tensor (nn.Parameter's metaclass makes every tensor with
# the parameter flag an instance of it, torchao's subclasses included: compare types).
_PLAIN = (torch.Tensor, nn.Parameter)
# torchao's tensor subclasses (torchao.quantization), by class name: the kind, and the
# dtype their ``qdata`` must hold.
_TORCHAO = {"Int8Tensor": ("torchao_int8", torch.int8), "Float8Tensor": ("torchao_fp8", torch.float8_e4m3fn)}
# bitsandbytes' int8 dequantize multiplies by this reciprocal of 127.
_INV_127 = 7.874015718698502e-3


def _bnb_modules() -> tuple[type, type] | None:
    """``(Linear4bit, Linear8bitLt)`` if bitsandbytes is loaded, else ``None``."""
    mod = sys.modules.get("bitsandbytes.nn")
    if mod is None:
        return None
    return getattr(mod, "Linear4bit", ()), getattr(mod, "Linear8bitLt", ())


def _describe(module: nn.Module, name: str | None) -> str:
    return f"Module {name!r} ({type(module).__name__})" if name else f"A {type(module).__name__}"


def _unknown(module: nn.Module, name: str | None, what: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"{_describe(module, name)} holds {what}, a weight layout tinytune does not know, so an "
        "adapter cannot be shaped for it, merged into it or fused with it; nothing was changed. "
        f"Supported: plain float weights and the quantized kinds {', '.join(QUANTIZED_KINDS)} "
        "(bitsandbytes Linear4bit/Linear8bitLt, torchao Int8WeightOnlyConfig/"
        "Float8WeightOnlyConfig). Leave this module out of target_modules, or load the model "
        "unquantized or with a supported quantization."
    )


def weight_kind(module: nn.Module, name: str | None = None) -> str:
    """What ``module``'s weight is: one of :data:`KINDS`.

    ``"float"``: a plain float tensor in the module's own layout (``nn.Linear``'s
    ``(out, in)``, ``Conv1D``'s ``(in, out)``; a DTensor shard counts), or no weight
    tensor at all. ``"bnb_nf4"`` / ``"bnb_fp4"``: a bitsandbytes ``Linear4bit``;
    ``"bnb_int8"``: a bitsandbytes ``Linear8bitLt``; ``"torchao_int8"`` /
    ``"torchao_fp8"``: a torchao ``Int8Tensor`` / ``Float8Tensor`` weight-only weight
    (``quantize_(model, Int8WeightOnlyConfig())``, ``Float8WeightOnlyConfig()``), on an
    ``nn.Linear``.

    Args:
        module: Any module.
        name: Its dotted name in the model, for the error message.

    Returns:
        The kind.

    Raises:
        UnsupportedModuleError: For any other weight (packed integers in a float
            module, an unknown tensor subclass, torchao with activation quantization, a
            float weight whose shape is not the module's layout), naming the module and
            its type.
    """
    weight = getattr(module, "weight", None)
    bnb = _bnb_modules()
    if bnb is not None:
        linear4, linear8 = bnb
        if linear4 and isinstance(module, linear4):
            quant_type = getattr(weight, "quant_type", None)
            if quant_type in ("nf4", "fp4"):
                return "bnb_" + quant_type
            raise _unknown(module, name, f"a bitsandbytes 4-bit weight of quant_type {quant_type!r}")
        if linear8 and isinstance(module, linear8):
            return "bnb_int8"
    if not isinstance(weight, torch.Tensor):
        return FLOAT
    cls = type(weight)
    if cls in _PLAIN or is_dtensor(weight):
        if not weight.is_floating_point():
            raise _unknown(module, name, f"a {weight.dtype} weight of shape {tuple(weight.shape)}")
        if isinstance(module, nn.Linear) and weight.dim() == 2 and not is_dtensor(weight):
            if tuple(weight.shape) != (module.out_features, module.in_features):
                raise _unknown(
                    module, name,
                    f"a weight of shape {tuple(weight.shape)} where nn.Linear's layout is "
                    f"(out_features, in_features) = ({module.out_features}, {module.in_features})",
                )
        return FLOAT
    if cls.__module__.split(".")[0] == "torchao" and cls.__name__ in _TORCHAO:
        kind, qdtype = _TORCHAO[cls.__name__]
        qdata = getattr(weight, "qdata", None)
        if getattr(weight, "act_quant_kwargs", None) is not None:
            raise _unknown(
                module, name,
                f"a torchao {cls.__name__} that also quantizes activations (a dynamic-activation "
                "config); tinytune supports the weight-only configs",
            )
        if (
            not isinstance(module, nn.Linear)
            or not isinstance(qdata, torch.Tensor)
            or qdata.dtype != qdtype
            or tuple(qdata.shape) != (module.out_features, module.in_features)
        ):
            raise _unknown(module, name, f"a torchao {cls.__name__} in a layout it does not expect")
        return kind
    raise _unknown(module, name, f"a weight of tensor type {cls.__module__}.{cls.__name__}")


def is_quantized(module: nn.Module, name: str | None = None) -> bool:
    """Whether ``module``'s weight is one of the quantized kinds (see :func:`weight_kind`,
    whose ``UnsupportedModuleError`` it raises for an unknown weight)."""
    return weight_kind(module, name) != FLOAT


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """``{dotted name: kind}`` of every module of ``model`` with a quantized weight.

    Raises:
        UnsupportedModuleError: For a module whose weight is of no known kind.
    """
    found = {}
    for path, module in model.named_modules():
        kind = weight_kind(module, path)
        if kind != FLOAT:
            found[path] = kind
    return found


def model_float_dtype(model: nn.Module, quantized: dict[str, str] | None = None) -> torch.dtype:
    """The dtype of ``model``'s first float parameter outside its quantized modules
    (``quantized``, as :func:`quantized_modules` returns; found if not given), else
    float32: the dtype a dequantized module should compute in when its own weight
    does not record it."""
    if quantized is None:
        quantized = quantized_modules(model)
    for path, module in model.named_modules():
        if path in quantized:
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and type(param) in _PLAIN:
                return param.dtype
    return torch.float32


def linear_sizes(module: nn.Module, name: str | None = None) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a quantized linear, from its kind (never from
    its packed weight's shape); ``None`` for a float weight (its shape tells)."""
    if weight_kind(module, name) == FLOAT:
        return None
    return int(module.in_features), int(module.out_features)


def _bnb_int8_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(CB, SCB)`` of a ``Linear8bitLt``: the int8 data and the row absmax, which
    bitsandbytes keeps on the weight until the first forward and in ``module.state`` after."""
    weight = module.weight
    if weight.dtype != torch.int8:
        return None  # has_fp16_weights=True: float data, quantized per call
    state = getattr(module, "state", None)
    scb = getattr(state, "SCB", None)
    if scb is None:
        scb = getattr(weight, "SCB", None)
    if scb is None:
        return None
    return weight.data, scb


def _bnb_4bit_dequantized(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(weight, "bnb_quantized", True):
        raise UnsupportedModuleError(
            f"This {type(module).__name__} is not quantized yet (bitsandbytes quantizes a "
            "Linear4bit when it is moved to its device): call .to(device) on the model first."
        )
    functional = sys.modules["bitsandbytes.functional"]
    if getattr(state, "packing_format_for_cpu", False):
        unpack_cpu_4bit(module)  # bitsandbytes' own layout back (see unpack_cpu_4bit)
        state = weight.quant_state
    return functional.dequantize_4bit(weight.data, state)


def dequantized_weight(module: nn.Module, name: str | None = None) -> torch.Tensor:
    """The float weight ``module``'s data stands for, in its own layout, as a new tensor
    (a float weight: the weight itself, detached).

    For the quantized kinds: the library's own dequantize, in :func:`float_dtype`
    (bitsandbytes 4-bit: ``dequantize_4bit`` in the dtype it was quantized from;
    ``Linear8bitLt``: ``int8 * SCB / 127`` in float32; torchao: ``weight.dequantize()``).
    The module's forward multiplies by these values, cast to its compute dtype. Shape
    ``(out_features, in_features)``.

    Args:
        module: The module.
        name: Its dotted name, for error messages.

    Raises:
        UnsupportedModuleError: For a weight of no known kind.
    """
    kind = weight_kind(module, name)
    weight = module.weight
    with torch.no_grad():
        if kind == FLOAT:
            return weight.detach()
        if kind in ("bnb_nf4", "bnb_fp4"):
            return _bnb_4bit_dequantized(module)
        if kind == "bnb_int8":
            parts = _bnb_int8_parts(module)
            if parts is None:
                return weight.detach().clone()
            functional = sys.modules["bitsandbytes.functional"]
            return functional.int8_vectorwise_dequant(*parts)
        return weight.dequantize()


def int_weight_and_scale(
    module: nn.Module, name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(qdata, scale)`` of a weight stored as int8 or float8 with one scale per output
    channel: ``bnb_int8``, ``torchao_int8`` and ``torchao_fp8``.

    ``qdata`` is the stored ``(out, in)`` data (``torch.int8`` or
    ``torch.float8_e4m3fn``; a view, no copy) and ``scale`` a float32 ``(out,)`` vector with
    ``dequantized_weight(module) == qdata.float() * scale[:, None]`` up to float32 rounding
    (bitsandbytes multiplies by ``SCB`` then by ``1/127``).

    Returns:
        The pair, or ``None`` for other kinds (float, 4-bit), for a ``Linear8bitLt``
        holding float data (``has_fp16_weights=True``), and for torchao scales that are
        not per channel (group-wise).
    """
    kind = weight_kind(module, name)
    if kind == "bnb_int8":
        parts = _bnb_int8_parts(module)
        if parts is None:
            return None
        data, scb = parts
        return data, scb.float().view(-1) * _INV_127
    if kind in ("torchao_int8", "torchao_fp8"):
        weight = module.weight
        qdata, scale = weight.qdata, weight.scale
        out = qdata.shape[0]
        if scale.numel() == 1:
            scale = scale.reshape(1).expand(out)
        elif scale.numel() == out:
            scale = scale.reshape(out)
        else:
            return None
        return qdata, scale.float()
    return None


def float_dtype(module: nn.Module, default: torch.dtype = torch.float32, name: str | None = None) -> torch.dtype:
    """The float dtype ``module``'s weight stands for: a float weight's own dtype; the
    dtype a bitsandbytes 4-bit weight was quantized from; a torchao weight's dtype.
    ``Linear8bitLt`` does not record it: its float bias's dtype, else ``default``."""
    kind = weight_kind(module, name)
    weight = getattr(module, "weight", None)
    if kind == FLOAT:
        return weight.dtype if isinstance(weight, torch.Tensor) else default
    if kind in ("bnb_nf4", "bnb_fp4"):
        state = getattr(weight, "quant_state", None)
        return getattr(state, "dtype", None) or default
    if kind == "bnb_int8":
        bias = getattr(module, "bias", None)
        return bias.dtype if isinstance(bias, torch.Tensor) and bias.is_floating_point() else default
    return weight.dtype


def dequantized_linear(module: nn.Module, dtype: torch.dtype | None = None, name: str | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` computing what the quantized ``module`` does: its
    :func:`dequantized_weight` and a copy of its bias, in ``dtype`` (default
    :func:`float_dtype`), on the module's device. ``module`` is not changed.

    Raises:
        UnsupportedModuleError: For a weight of no known kind.
    """
    weight = dequantized_weight(module, name)
    dtype = dtype or float_dtype(module, name=name)
    bias = getattr(module, "bias", None)
    out, inp = weight.shape
    linear = nn.Linear(inp, out, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype=dtype, copy=True), requires_grad=False)
    return linear


def weight_tensors(module: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors that hold ``module``'s weight as stored (no copies): a float weight
    itself; bitsandbytes 4-bit data and every tensor of its ``quant_state`` (absmax,
    code, the nested statistics); ``Linear8bitLt``'s int8 data and ``SCB``; torchao's
    ``qdata`` and ``scale``. For checks that a call left them bit-identical.
    """
    kind = weight_kind(module, name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return {}
    if kind == FLOAT:
        return {"weight": weight}
    if kind in ("bnb_nf4", "bnb_fp4"):
        found = {"weight": weight.data}
        state = getattr(weight, "quant_state", None)
        _state_tensors(state, "quant_state", found)
        return found
    if kind == "bnb_int8":
        parts = _bnb_int8_parts(module)
        return {"weight": weight.data} if parts is None else {"weight": parts[0], "SCB": parts[1]}
    return {"qdata": weight.qdata, "scale": weight.scale}


def _state_tensors(state: Any, prefix: str, into: dict[str, torch.Tensor]) -> None:
    if state is None:
        return
    for key, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            into[f"{prefix}.{key}"] = value
        elif type(value).__name__ == "QuantState":  # the nested statistics (state2)
            _state_tensors(value, f"{prefix}.{key}", into)


def unpack_cpu_4bit(module: nn.Module) -> bool:
    """Give a bitsandbytes 4-bit weight back its own layout, if bitsandbytes repacked it
    for its CPU inference kernel.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight in place on the first
    forward in eval mode without autograd; a forward with autograd then fails inside
    bitsandbytes. bitsandbytes undoes the repack itself when it saves the module
    (``state_dict``); this calls that path. The next forward without autograd repacks
    again.

    Returns:
        Whether the weight was repacked (and is now back in bitsandbytes' layout).
    """
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return False
    # Linear4bit._save_to_state_dict converts back before saving: state_dict() is the
    # public way to run it (the returned dict is dropped).
    module.state_dict()
    return True


def unpack_before_autograd(model: nn.Module, args: tuple) -> None:
    """A forward pre-hook for a base model holding bitsandbytes 4-bit linears: with
    autograd on, give every repacked 4-bit weight its own layout back first (see
    :func:`unpack_cpu_4bit`), so training after a no-grad eval forward works."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    bnb = _bnb_modules()
    if bnb is None or not bnb[0]:
        return
    for module in model.modules():
        if isinstance(module, bnb[0]):
            unpack_cpu_4bit(module)


def has_4bit(model: nn.Module) -> bool:
    """Whether ``model`` holds a bitsandbytes ``Linear4bit``."""
    bnb = _bnb_modules()
    if bnb is None or not bnb[0]:
        return False
    return any(isinstance(m, bnb[0]) for m in model.modules())
