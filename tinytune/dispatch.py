"""Which path runs an adapted layer: the fused Triton kernel or PyTorch.

This module is the one place that decides, per call and per adapted module.

The rule (kernel mode ``"auto"``, the default): an adapted ``nn.Linear`` or
transformers ``Conv1D`` runs on the fused kernel (``tinytune.kernels.lora_linear`` for
the active adapters, ``tinytune.kernels.lora_mixed`` for per-row adapters) when

* its input is a CUDA tensor,
* no gradient is needed (``torch.no_grad()``/``torch.inference_mode()``, or neither the
  input nor any parameter involved requires grad),
* no LoRA dropout is active (dropout > 0 in training mode),
* autocast is off (``torch.autocast`` would run the module in its autocast dtype; the
  kernels compute in the input's dtype),
* its weight is a plain float tensor, or int8/fp8 codes with one scale per output
  channel (bitsandbytes ``Linear8bitLt``, torchao int8 and float8 weight-only: the
  kernels dequantize them in their K-loop; fp8 needs an sm_89+ GPU). Other quantized
  weights (4-bit, see :mod:`tinytune.weights`) run on the PyTorch path: the module's
  own forward plus the adapter,
* dtypes are fp32, fp16 or bf16 (input and module weight alike), and the module has no
  backward hooks (torch would rewrap its inputs),
* every active adapter layer on it is a built-in ``LinearLoraLayer`` or
  ``LinearIA3Layer`` (not a custom ``AdapterLayer`` or a subclass overriding their
  forward methods), or it is one built-in ``LinearDoraLayer`` alone (DoRA's cached
  column scale goes to the kernel's epilogue; DoRA composed with other active adapters
  on the module, and DoRA rows in mixed batches, run on PyTorch), and Triton is installed,
* the active LoRAs' total rank (concatenated) is at most 256 (``lora_linear``'s limit;
  mixed calls have none).

Everything else (CPU tensors, training, other modules, custom layers) runs on the
PyTorch path, layer by layer: one model may mix both.

Modes:

* ``"auto"``: as above; falls back per layer, silently.
* ``"triton"``: the fused kernels or :class:`~tinytune.errors.KernelUnavailableError`
  naming the module and the reason, never a silent fallback. CPU tensors run on the
  kernels only under ``TRITON_INTERPRET=1`` (Triton's interpreter: how the tests run
  them without a GPU).
* ``"torch"``: always the PyTorch path.

The default comes from the environment variable ``TINYTUNE_KERNELS`` (read when
tinytune is imported, and again by :func:`get_kernel_mode` and ``set_kernel_mode(None)``;
an invalid value raises :class:`~tinytune.errors.InvalidConfigError` when a mode is
needed). :func:`set_kernel_mode` sets the process-wide mode; :func:`kernel_mode` sets it
for a ``with`` block on the calling thread only, so two threads can serve with different
modes at once. Under ``torch.compile`` the mode is read while tracing and guarded on: a
change of mode recompiles (or reuses a graph compiled for that mode).

Floor 3 (beside ``adapter``): imports ``errors``, ``weights``, ``layers`` and the tensor-only
``kernels`` (which import without Triton: their ops then have no kernels to launch).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from .errors import InvalidConfigError, KernelUnavailableError, UnsupportedModuleError
from . import layers
from .layers import LinearDoraLayer, LinearIA3Layer, LinearLoraLayer, is_conv1d
from .kernels.triton_support import HAS_TRITON
from .weights import FLOAT, int_weight_and_scale, weight_kind

try:
    from .kernels.lora_linear import MAX_RANK, lora_linear
    from .kernels.lora_mixed import lora_mixed_linear, segment_plan_key, segment_tiles

    _KERNELS_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - a broken Triton install: PyTorch path only
    _KERNELS_ERROR = exc

__all__ = ["MODES", "get_kernel_mode", "kernel_mode", "set_kernel_mode"]

#: The kernel modes, in the order of the docs.
MODES = ("auto", "triton", "torch")
ENV_VAR = "TINYTUNE_KERNELS"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PLAIN_WEIGHTS = (torch.Tensor, nn.Parameter)
# Quantized kinds the kernels run: int8/fp8 codes with one scale per output channel
# (tinytune.weights.int_weight_and_scale), dequantized in the K-loop.
CODE_KINDS = ("bnb_int8", "torchao_int8", "torchao_fp8")


class _ThreadMode(threading.local):
    """The calling thread's ``kernel_mode()`` override (``None``: none).

    ``__init__`` runs in each thread on first use, so the attribute always exists
    (``torch.compile`` would otherwise guard on its presence and recompile).
    """

    def __init__(self) -> None:
        self.mode: str | None = None


_THREAD = _ThreadMode()


class _Process:
    """Process-wide state: the ``set_kernel_mode`` mode and the environment default."""

    explicit: str | None = None  # set_kernel_mode(); None: from the environment
    env_raw: str | None = None
    env_mode: str | None = "auto"  # None: env_raw is invalid
    stubbed = False  # inside stub_kernels()


def _parse(mode: Any, source: str) -> str:
    if isinstance(mode, str) and mode.strip().lower() in MODES:
        return mode.strip().lower()
    raise InvalidConfigError(
        f"{source} must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}. "
        "'auto' uses the fused kernels where they apply, 'triton' forces them (or raises), "
        "'torch' always uses the PyTorch path."
    )


def _read_env() -> None:
    raw = os.environ.get(ENV_VAR)
    _Process.env_raw = raw
    if raw is None or raw.strip() == "":
        _Process.env_mode = "auto"
    else:
        try:
            _Process.env_mode = _parse(raw, f"The environment variable {ENV_VAR}")
        except InvalidConfigError:
            _Process.env_mode = None


_read_env()


def _mode() -> str:
    """The mode in effect on this thread (the hot path: no environment read)."""
    mode = _THREAD.mode
    if mode is not None:
        return mode
    mode = _Process.explicit
    if mode is not None:
        return mode
    mode = _Process.env_mode
    if mode is None:
        _parse(_Process.env_raw, f"The environment variable {ENV_VAR}")  # raises
    return mode


def get_kernel_mode() -> str:
    """The kernel mode in effect on the calling thread.

    Returns:
        ``"auto"``, ``"triton"`` or ``"torch"``: the innermost :func:`kernel_mode` block
        of this thread, else the mode given to :func:`set_kernel_mode`, else
        ``TINYTUNE_KERNELS`` (re-read now), else ``"auto"``.

    Raises:
        InvalidConfigError: If the mode comes from ``TINYTUNE_KERNELS`` and its value is
            not one of the modes.
    """
    if _THREAD.mode is None and _Process.explicit is None:
        _read_env()
    return _mode()


def set_kernel_mode(mode: str | None) -> None:
    """Set the kernel mode for the whole process.

    Threads inside a :func:`kernel_mode` block keep their block's mode until it ends.

    Args:
        mode: ``"auto"``, ``"triton"`` or ``"torch"`` (case-insensitive), or ``None`` to
            go back to the ``TINYTUNE_KERNELS`` default (re-read now).

    Raises:
        InvalidConfigError: If ``mode`` is not one of the modes (nothing changes).
    """
    if mode is None:
        _read_env()
        _Process.explicit = None
        return
    _Process.explicit = _parse(mode, "The kernel mode")


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[str]:
    """Use ``mode`` on the calling thread for the duration of a ``with`` block.

    Thread-safe: the mode is per thread (other threads, including threads started inside
    the block, keep theirs), blocks nest, and the previous mode comes back when the
    block ends, also through an exception. Also usable as a decorator.

    Args:
        mode: ``"auto"``, ``"triton"`` or ``"torch"``.

    Yields:
        The mode, normalised.

    Raises:
        InvalidConfigError: If ``mode`` is not one of the modes.

    Example:
        >>> with tinytune.kernel_mode("torch"):
        ...     logits = wrapper(ids)
    """
    mode = _parse(mode, "The kernel mode")
    previous = _THREAD.mode
    _THREAD.mode = mode
    try:
        yield mode
    finally:
        _THREAD.mode = previous


# ----------------------------------------------------------------------------------------
# what can run fused
# ----------------------------------------------------------------------------------------
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


class _Kernels:
    """The kernel ops, imported on first need (importing Triton takes a moment)."""

    loaded = False
    reason: str | None = None  # why the kernels cannot run in this process
    interpret = False
    lora_linear: Any = None
    lora_mixed_linear: Any = None
    segment_plan_key: Any = None
    segment_tiles: Any = None
    max_rank = 0  # the largest total rank lora_linear takes


def _load() -> None:
    if _Kernels.loaded:
        return
    _Kernels.interpret = _interpret()
    if not HAS_TRITON:
        _Kernels.reason = (
            "Triton is not installed (pip install triton, on Linux with a CUDA GPU), so the "
            "fused kernels are unavailable"
        )
    elif _KERNELS_ERROR is not None:  # pragma: no cover - a broken Triton install
        exc = _KERNELS_ERROR
        _Kernels.reason = f"the fused kernels failed to import ({type(exc).__name__}: {exc})"
    else:
        _Kernels.max_rank = MAX_RANK
        _Kernels.lora_linear = lora_linear
        _Kernels.lora_mixed_linear = lora_mixed_linear
        _Kernels.segment_plan_key = segment_plan_key
        _Kernels.segment_tiles = segment_tiles
    _Kernels.loaded = True


def kernel_ops() -> type:
    """The kernel ops dispatch calls, loaded on first need (for tests and debugging).

    Tests patch its attributes (``lora_linear``, ``lora_mixed_linear``, ``interpret``)
    to count or steer the fused calls.

    Returns:
        The class whose attributes hold the ops, ``reason`` (why they cannot run, or
        ``None``) and ``interpret`` (whether Triton runs in interpreter mode).
    """
    _load()
    return _Kernels


@contextlib.contextmanager
def stub_kernels(lora_linear: Any, lora_mixed_linear: Any = None) -> Iterator[None]:
    """For benchmarks: run the fused path on CPU tensors with stand-ins for the kernels.

    Inside the block the process counts as able to fuse (no Triton, GPU or
    ``TRITON_INTERPRET=1`` needed), and the hooks call ``lora_linear`` (and
    ``lora_mixed_linear``) where they would launch the kernels, with the kernels'
    signatures (see ``tinytune.kernels.lora_linear``). Wrap the model inside the block:
    a hook site reads whether fusion is possible when it is created. What the block
    measures is the host cost around the kernels: pass the PyTorch reference
    (``torch_lora_linear``) to check results, or a stub returning a preallocated
    tensor to time the hooks alone (``bench/bench_dispatch.py`` does both). Not
    thread-safe; the previous state comes back when the block ends.

    Args:
        lora_linear: Stands in for ``lora_linear``.
        lora_mixed_linear: Stands in for ``lora_mixed_linear`` (default: unchanged).

    Yields:
        Nothing.
    """
    _load()
    names = ("reason", "interpret", "lora_linear", "lora_mixed_linear", "max_rank")
    saved = {k: getattr(_Kernels, k) for k in names}
    forced_before = _Process.stubbed
    _Kernels.reason, _Kernels.interpret = None, True
    _Kernels.lora_linear = lora_linear
    if lora_mixed_linear is not None:
        _Kernels.lora_mixed_linear = lora_mixed_linear
    _Kernels.max_rank = _Kernels.max_rank or 256  # lora_linear's limit, without Triton
    _Process.stubbed = True
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(_Kernels, k, v)
        _Process.stubbed = forced_before


def fusion_possible() -> bool:
    """Whether any call in this process could run on the fused kernels.

    False without Triton, or without both a CUDA device and ``TRITON_INTERPRET=1``
    (outside :func:`stub_kernels`): then hook sites keep their PyTorch-only hooks (no
    extra pre-hook).
    """
    if _Process.stubbed:
        return True
    if not (_interpret() or torch.cuda.is_available()):
        return False  # checked first: no Triton import on a CPU-only machine
    _load()
    return _Kernels.reason is None


def machine_reason() -> str:
    """Why no call in this process can run fused (for error messages)."""
    if _interpret() or torch.cuda.is_available():
        _load()
        if _Kernels.reason is not None:
            return _Kernels.reason
    return (
        "no CUDA device is available and TRITON_INTERPRET=1 is not set (the kernels run on "
        "CUDA tensors, or on CPU tensors through Triton's interpreter, for testing)"
    )


def fused_kind(layer: nn.Module) -> str | None:
    """``"lora"``, ``"dora"``, ``"ia3_pre"`` or ``"ia3_post"`` for built-in layers the
    kernel can run (forward methods not overridden), else ``None``."""
    if layers.is_dora(layer):
        # Checked first: a DoRA layer must never reach the kernels as a plain LoRA.
        cls = type(layer)
        if (
            isinstance(layer, LinearDoraLayer)
            and cls.post_forward is LinearDoraLayer.post_forward
            and cls.pre_forward is LinearLoraLayer.pre_forward
        ):
            return "dora"
        return None
    kind = layers.layer_kind(layer)
    return None if kind == "emb" else kind


def module_reason(module: nn.Module) -> str | None:
    """Why the kernels cannot stand in for ``module``'s forward, or ``None``."""
    reason = weight_reason(module)
    if reason is not None:
        return reason
    if type(module).forward is nn.Linear.forward and isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Linear) and weight_kind(module) in CODE_KINDS:
        return None  # Linear8bitLt's own forward computes the same linear layer
    if is_conv1d(module) and getattr(module.weight, "dim", lambda: 0)() == 2:
        return None
    return (
        f"the fused kernels run nn.Linear and transformers' Conv1D layers only, and this "
        f"module is a {type(module).__name__}"
    )


def weight_reason(module: nn.Module) -> str | None:
    """Why ``module``'s weight cannot go to the float kernels (it is quantized, or of no
    known kind: see :func:`tinytune.weights.weight_kind`), or ``None``."""
    try:
        kind = weight_kind(module)
    except UnsupportedModuleError as exc:
        return str(exc)
    if kind == FLOAT or kind in CODE_KINDS:
        return None
    return (
        f"its weight is quantized ({kind}), and the fused kernels take float weights or "
        "int8/fp8 codes with one scale per output channel; the PyTorch path runs the "
        "module's own quantized forward plus the adapter"
    )


def codes_reason(module: nn.Module, x: torch.Tensor) -> str | None:
    """Why the kernels cannot take this call's int8/fp8 weight codes (per call: the
    data and the device can change), or ``None`` (also for float weights)."""
    if weight_kind(module) not in CODE_KINDS:
        return None
    pair = int_weight_and_scale(module)
    if pair is None:
        return (
            "its quantized weight has no int8/fp8 codes with one scale per output channel "
            "(a Linear8bitLt with has_fp16_weights=True, or group-wise scales)"
        )
    if pair[0].dtype == torch.float8_e4m3fn and x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 9):
        return "its weight is float8 codes, which the kernels convert on sm_89+ GPUs only"
    if x.dtype not in _FLOAT_DTYPES:
        return f"the input is {x.dtype}; the kernels take fp32, fp16 or bf16 inputs"
    return None


def kernel_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, weight_scale)`` to hand the kernels: a float weight and ``None``, or a
    quantized weight's int8/fp8 codes and their per-output-channel fp32 scale."""
    weight = module.weight
    if type(weight) in _PLAIN_WEIGHTS:
        return weight, None
    pair = int_weight_and_scale(module)
    return pair if pair is not None else (weight, None)


def chain_reason(module: nn.Module, chain: Iterable[nn.Module]) -> str | None:
    """Why this set of active layers on ``module`` cannot run fused (static part)."""
    reason = module_reason(module)
    if reason is not None:
        return reason
    chain = tuple(chain)
    for layer in chain:
        if layers.is_dora(layer) and fused_kind(layer) is None:
            return (
                f"{type(layer).__name__} is a DoRA layer that the fused kernels do not run "
                "(they take nn.Linear/Conv1D DoRA layers whose forward methods are the built-in ones)"
            )
        if fused_kind(layer) == "dora" and len(chain) > 1:
            return (
                "a DoRA layer is active on it together with other adapters; the fused kernels "
                "take one DoRA layer alone (DoRA composed with other adapters runs on the PyTorch path)"
            )
        if fused_kind(layer) is None:
            return (
                f"{type(layer).__name__} is not a built-in LinearLoraLayer/LinearIA3Layer "
                "(custom AdapterLayers, modules_to_save and layers overriding forward "
                "methods run on the PyTorch path only)"
            )
    return None


def rank_reason(chain: Iterable[nn.Module]) -> str | None:
    """Why ``lora_linear`` cannot take the active LoRAs of one module: their total rank
    (concatenated, as :func:`fused_inputs` passes them) is above its limit, or ``None``.

    Checked per call (by :func:`checked_inputs`, on the kernel's inputs): a hot-swap or a
    slot changes the rank without a new chain.
    (Mixed calls run on ``lora_mixed_linear``, which walks any rank in blocks.)
    """
    ranks = [_factors(layer)[0].shape[0] for layer in chain if fused_kind(layer) in ("lora", "dora")]
    if sum(ranks) <= _Kernels.max_rank:
        return None
    parts = " + ".join(map(str, ranks))
    return (
        f"the total LoRA rank of its active adapters is {sum(ranks)}"
        f"{f' ({parts})' if len(ranks) > 1 else ''}, above the fused kernel's limit of "
        f"{_Kernels.max_rank}"
    )


def _call_reason(
    module: nn.Module,
    x: Any,
    params: Iterable[torch.Tensor],
    dropout: bool,
    weight: torch.Tensor | None = None,
) -> str | None:
    """Why this call cannot run fused (the per-call part), or ``None``.

    ``weight``: the module's weight where the caller has read it already (the eager
    hooks read it from ``module._parameters``, cheaper than ``module.weight``).
    """
    if not isinstance(x, torch.Tensor):
        return f"its input is a {type(x).__name__}, not a tensor"
    if not _Kernels.loaded:
        _load()
    if _Kernels.reason is not None:
        return _Kernels.reason
    if x.is_cuda:
        pass  # checked first: reading x.device builds a Python object per call
    elif x.is_cpu:
        if not _Kernels.interpret:
            return (
                "its input is a CPU tensor: the kernels run on CUDA tensors (CPU tensors only "
                "through Triton's interpreter, TRITON_INTERPRET=1, for testing)"
            )
    elif x.device.type != "cuda":
        return f"its input is on {x.device.type}, and the kernels run on CUDA tensors"
    if weight is None:
        weight = module.weight
    codes = False
    if type(weight) not in _PLAIN_WEIGHTS and not torch.compiler.is_compiling():
        # Quantized after the hook site was built (torchao's quantize_ on a wrapped
        # model swaps the weight for a tensor subclass).
        reason = weight_reason(module) or codes_reason(module, x)
        if reason is not None:
            return reason
        codes = weight_kind(module) in CODE_KINDS
    dtype = x.dtype
    if dtype not in _FLOAT_DTYPES or (weight.dtype is not dtype and not codes):
        return (
            f"the input is {dtype} and the weight {weight.dtype}; the kernels take fp32, "
            "fp16 or bf16 with both alike"
        )
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or any(p.requires_grad for p in params)
    ):
        return (
            "a gradient is needed (autograd is on and a parameter or the input requires "
            "grad); the kernels have no backward: run under torch.no_grad() or "
            "torch.inference_mode() to use them"
        )
    if dropout:
        return "LoRA dropout is active (training mode); call model.eval() to use the kernels"
    if _autocast_on():
        return (
            "autocast is on (torch.autocast), and the kernels compute in the input's dtype; "
            "cast the model to that dtype and leave autocast off to use them"
        )
    if (
        module._backward_hooks
        or module._backward_pre_hooks
        or _GLOBAL_BACKWARD_HOOKS
        or _GLOBAL_BACKWARD_PRE_HOOKS
    ):
        # torch rewraps the module's inputs for them, which would lose the real input
        # that the pre-hook hands to the post-hook.
        return "the module has backward hooks"
    return None


def auto_device(x: torch.Tensor) -> bool:
    """Whether mode ``"auto"`` considers ``x``'s device for the kernels: CUDA only.

    Public so that tests can replace it, to exercise the per-layer fallback on the CPU.

    Args:
        x: The input of an adapted module.

    Returns:
        True for a CUDA tensor.
    """
    return x.is_cuda


# Whether autocast is on for any device type (one call; torch.compile traces it).
_autocast_on = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")
)

# torch's process-wide backward hooks: dicts that torch mutates in place (registering
# and removing a hook), never rebinds, so they are read here without a module lookup.
_GLOBAL_BACKWARD_HOOKS = _torch_module._global_backward_hooks
_GLOBAL_BACKWARD_PRE_HOOKS = _torch_module._global_backward_pre_hooks


def use_fused(
    path: str,
    static_reason: str | None,
    module: nn.Module,
    x: Any,
    params: Iterable[torch.Tensor],
    dropout: bool,
    weight: torch.Tensor | None = None,
) -> bool:
    """Decide one call of one adapted module.

    Args:
        path: The module's dotted name (for error messages).
        static_reason: What :func:`chain_reason` said about the module and its layers.
        module: The adapted module.
        x: Its input.
        params: The adapter tensors the call would read (checked for ``requires_grad``).
        dropout: Whether LoRA dropout is active in this call.
        weight: The module's weight, where the caller has it already (see
            :func:`module_weights`); ``None``: read as ``module.weight``.

    Returns:
        Whether to run the fused kernel.

    Raises:
        KernelUnavailableError: In mode ``"triton"``, if the call cannot run fused.
    """
    mode = _mode()
    if mode == "torch":
        return False
    if mode == "auto":
        if static_reason is not None or not isinstance(x, torch.Tensor) or not auto_device(x):
            return False
        return _call_reason(module, x, params, dropout, weight) is None
    reason = static_reason or _call_reason(module, x, params, dropout, weight)
    if reason is not None:
        raise unavailable(path, reason)
    return True


def checked_inputs(path: str, chain: tuple) -> tuple | None:
    """:func:`fused_inputs` of ``chain``, for a call :func:`use_fused` sent to the kernel.

    The total rank is checked on the inputs themselves (several LoRAs are
    concatenated along the rank), so they are gathered once per call.

    Args:
        path: The module's dotted name (for error messages).
        chain: Its active built-in layers, innermost first.

    Returns:
        The inputs, or ``None`` if their total rank is above ``lora_linear``'s limit
        (mode ``"auto"``: the call runs on the PyTorch path).

    Raises:
        KernelUnavailableError: In mode ``"triton"``, if the total rank is too large.
    """
    inputs = fused_inputs(chain)
    if inputs[0] is None or inputs[0].shape[0] <= _Kernels.max_rank:
        return inputs
    if _mode() == "triton":
        raise unavailable(path, rank_reason(chain))
    return None


def forced() -> bool:
    """Whether the mode in effect is ``"triton"`` (for hooks that cannot fuse at all)."""
    return _mode() == "triton"


def unavailable(path: str, reason: str) -> KernelUnavailableError:
    """The error of mode ``"triton"`` for module ``path``."""
    return KernelUnavailableError(
        f"Kernel mode is 'triton', but module {path!r} cannot run on the fused kernels: "
        f"{reason}. Use kernel mode 'auto' (tinytune.set_kernel_mode('auto'), or "
        f"{ENV_VAR}=auto) to run such layers on the PyTorch path."
    )


# ----------------------------------------------------------------------------------------
# the fused call for the active adapters
# ----------------------------------------------------------------------------------------
def chain_params(chain: Iterable[nn.Module]) -> list[torch.Tensor]:
    """The tensors of ``chain`` that the fused kernel reads."""
    params: list[torch.Tensor] = []
    for layer in chain:
        if isinstance(layer, LinearLoraLayer):
            params += [layer.lora_A.weight, layer.lora_B.weight]
            if layers.is_dora(layer):
                params.append(layer.lora_magnitude_vector)
        elif isinstance(layer, LinearIA3Layer):
            params.append(layer.ia3_l)
    return params


def _mul(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a * b


def _factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, K), B (N, r))`` of a LoRA layer; in reserved slots (without autograd)
    its fixed-shape slot, padded with zero rows, so the rank a compiled graph sees stays
    the same through a rank-changing hot-swap."""
    padded = layer.padded_factors()
    if padded is not None:
        return padded[0], padded[1].t()
    return layer.lora_A.weight, layer.lora_B.weight


def fused_inputs(chain: tuple) -> tuple:
    """The kernel's adapter inputs for the active layers of one module.

    Several LoRAs are concatenated along the rank, with one scale per rank row. IA³
    scales become ``l_in``/``l_out``; an IA³ layer that composes with a LoRA (it wraps
    it: it comes later in the chain, whose first layer is innermost) is folded into
    that LoRA's ``A`` (input scale, on its columns) or ``B`` (output scale, on its
    rows). Built per call from the parameters, so values are never stale; with one
    LoRA and no IA³ around it, the parameters are passed as they are (no copy).

    Args:
        chain: Built-in layers, innermost first (see :func:`chain_reason`).

    Returns:
        ``(lora_a (R, K) | None, lora_b (N, R) | None, lora_scale (R,) fp32 | None,
        l_in (K,) | None, l_out (N,) | None)``; a DoRA layer (alone, see
        :func:`chain_reason`) adds its cached column scale ``dora_scale()`` (``(N,)``
        fp32) as a sixth entry.
    """
    if len(chain) == 1 and fused_kind(chain[0]) == "dora":
        a, b = _factors(chain[0])
        return a, b, chain[0].scaling_tensor.expand(a.shape[0]), None, None, chain[0].dora_scale()
    if len(chain) == 1 and fused_kind(chain[0]) == "lora":
        # The common case, without a copy: the scale as a stride-0 view of the layer's
        # fp32 scaling (the kernels take strides).
        a, b = _factors(chain[0])
        return a, b, chain[0].scaling_tensor.expand(a.shape[0]), None, None
    terms: list[list] = []  # [A (r, K), B (N, r), layer, input scale, output scale]
    l_in = l_out = None
    for layer in chain:
        kind = fused_kind(layer)
        if kind == "lora":
            terms.append([*_factors(layer), layer, None, None])
        elif kind == "ia3_pre":
            # y(u) = f(l * u): every inner term sees the scaled input.
            lv = layer.ia3_l.reshape(-1)
            l_in = _mul(l_in, lv)
            for t in terms:
                t[3] = _mul(t[3], lv)
        else:
            lv = layer.ia3_l.reshape(-1)
            l_out = _mul(l_out, lv)
            for t in terms:
                t[4] = _mul(t[4], lv)
    if not terms:
        return None, None, None, l_in, l_out
    a_parts, b_parts, s_parts = [], [], []
    for a, b, layer, c, d in terms:
        if c is not None:
            a = a.float() * c.float()
        if d is not None:
            b = b.float() * d.float().unsqueeze(1)
        a_parts.append(a)
        b_parts.append(b)
        s_parts.append(layer.scaling_tensor.expand(a.shape[0]))
    if len(terms) == 1:
        return a_parts[0], b_parts[0], s_parts[0], l_in, l_out
    if len({t.dtype for t in a_parts + b_parts}) > 1:
        a_parts = [t.float() for t in a_parts]
        b_parts = [t.float() for t in b_parts]
    return torch.cat(a_parts), torch.cat(b_parts, 1), torch.cat(s_parts), l_in, l_out


def fused_linear(module: nn.Module, x: torch.Tensor, inputs: tuple, conv1d: bool) -> torch.Tensor:
    """``module(x)`` with the active layers applied, in one fused kernel.

    Args:
        module: The ``nn.Linear`` or ``Conv1D``.
        x: ``(..., K)`` the module's real input.
        inputs: :func:`checked_inputs` of its active layers.
        conv1d: Whether ``module`` is a ``Conv1D`` (weight stored transposed).

    Returns:
        ``(..., N)`` in ``x.dtype``.
    """
    weight, scale = kernel_weight(module)
    return fused_linear_with(x, weight, module.bias, inputs, conv1d, scale)


def module_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of an ``nn.Linear`` or ``Conv1D``, read from its parameter dict.

    The eager hooks' way to read them: a dict lookup, where ``module.weight`` goes
    through ``nn.Module.__getattr__`` (several times slower, on every call). Always
    current: a replaced parameter is read anew. A weight or bias kept elsewhere than
    in ``_parameters`` (a buffer, a property) is read as an attribute.

    Args:
        module: The module.

    Returns:
        Its weight and its bias (``None`` without one).
    """
    params = module._parameters
    weight = params.get("weight")
    if weight is None:
        weight = module.weight
    bias = params.get("bias", _ABSENT)
    if bias is _ABSENT:
        bias = getattr(module, "bias", None)
    return weight, bias


_ABSENT = object()


def lean_weights(
    module: nn.Module, x: Any, params: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The eager hooks' most common call, decided in as few steps as it takes.

    For a module whose layers :func:`chain_reason` accepts, with no active LoRA dropout:
    whether this call runs on the fused kernel with the module's float weight as it is,
    checking what :func:`_call_reason` checks for a call that passes every check. Never
    raises: ``None`` means "not this case", and the caller asks :func:`fused_weights`
    (which also gives the reason, or raises in mode ``"triton"``).

    Args:
        module: The adapted module (weight and bias in its parameter dict).
        x: Its input.
        params: The adapter tensors the call would read.

    Returns:
        ``(weight, bias)`` read from the module's parameter dict, or ``None``.
    """
    mode = _THREAD.mode
    if mode is None:
        mode = _mode()
    if (
        mode == "torch"
        or type(x) is not torch.Tensor
        or _Kernels.reason is not None
        or _autocast_on()
    ):
        return None
    if x.is_cuda:
        if mode != "triton" and not auto_device(x):
            return None
    elif not (mode == "triton" and _Kernels.interpret and x.is_cpu):
        return None
    weights = module._parameters
    weight = weights.get("weight")
    bias = weights.get("bias", _ABSENT)
    dtype = x.dtype
    if (
        _Kernels.loaded
        and bias is not _ABSENT
        and type(weight) in _PLAIN_WEIGHTS  # else: quantized? (see _call_reason)
        and weight.dtype is dtype
        and dtype in _FLOAT_DTYPES
        and not (
            torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad or any(p.requires_grad for p in params))
        )
        and not (
            module._backward_hooks
            or module._backward_pre_hooks
            or _GLOBAL_BACKWARD_HOOKS
            or _GLOBAL_BACKWARD_PRE_HOOKS
        )
    ):
        return weight, bias
    return None


def fused_weights(
    path: str,
    static_reason: str | None,
    module: nn.Module,
    x: Any,
    params: Iterable[torch.Tensor],
    dropout: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """:func:`use_fused` for the eager hooks, with the module's parameters it read.

    The same decision as :func:`use_fused` (and the same errors in mode ``"triton"``),
    with the weight and bias read once, as :func:`module_weights` reads them, for both
    the decision and the kernel call.

    Args:
        path: The module's dotted name (for error messages).
        static_reason: What :func:`chain_reason` said about the module and its layers.
        module: The adapted module.
        x: Its input.
        params: The adapter tensors the call would read.
        dropout: Whether LoRA dropout is active in this call.

    Returns:
        ``(weight, bias, weight_scale)`` where the call runs on the fused kernel (int8/fp8
        codes and their scale for a quantized weight, see :func:`kernel_weight`), else
        ``None``.

    Raises:
        KernelUnavailableError: In mode ``"triton"``, if the call cannot run fused.
    """
    if static_reason is None and not dropout:
        # The common case first (the same decision, without the reason).
        plain = lean_weights(module, x, params)
        if plain is not None:
            return plain[0], plain[1], None
    weight, bias = module_weights(module)
    if not use_fused(path, static_reason, module, x, params, dropout, weight):
        return None
    return _kernel_params(module, weight, bias)


def _kernel_params(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """``(weight, bias, weight_scale)`` for the kernel: a float weight as read, or a
    quantized weight's int8/fp8 codes and their scale (:func:`kernel_weight`)."""
    if type(weight) in _PLAIN_WEIGHTS:
        return weight, bias, None
    codes, scale = kernel_weight(module)
    return codes, bias, scale


def fused_linear_with(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inputs: tuple,
    conv1d: bool,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`fused_linear` with the module's parameters already read (see
    :func:`fused_weights`); a sixth entry of ``inputs`` (a DoRA layer's column scale,
    see :func:`fused_inputs`) goes to the kernel as ``col_scale``, and ``weight_scale``
    with int8/fp8 codes as ``weight``."""
    if len(inputs) > 5:  # DoRA's column scale
        return _Kernels.lora_linear(x, weight, bias, *inputs[:5], conv1d, inputs[5], weight_scale)
    if weight_scale is not None:
        return _Kernels.lora_linear(x, weight, bias, *inputs, conv1d, None, weight_scale)
    return _Kernels.lora_linear(x, weight, bias, *inputs, conv1d)


def empty_input(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """A ``(0, in_features)`` tensor like ``weight``: what an eager hook hands the module's
    own forward on the fused path, instead of :func:`empty_rows` of its input.

    Kept by the hook site and reused while the input's dtype and device stay the same:
    a 2-D batch of no rows is the cheapest input for ``nn.Linear.forward`` (a 3-D one
    goes through a reshape in ``F.linear``), and reusing it saves slicing the input on
    every call. It has no elements, so sharing it between calls and threads is safe.
    Always an ordinary tensor (never an inference tensor), whatever mode creates it.

    Args:
        weight: The module's weight (``(N, K)``; ``(K, N)`` for a ``Conv1D``).
        conv1d: Whether the module is a ``Conv1D``.

    Returns:
        ``(0, K)`` in ``weight``'s dtype, on its device.
    """
    k = weight.shape[0] if conv1d else weight.shape[1]
    with torch.inference_mode(False):
        return torch.empty((0, k), dtype=weight.dtype, device=weight.device)


def mixed_linear(
    module: nn.Module,
    x: torch.Tensor,
    *inputs: Any,
    plans: dict | None = None,
    col_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-row fused op on ``module`` (see ``tinytune.kernels.lora_mixed``).

    Args:
        module: The ``nn.Linear`` or ``Conv1D``.
        x: ``(B, ..., K)`` the module's real input.
        inputs: ``row_index, a_stack, bt_stack, scale, ranks, l_in_stack, l_out_stack``.
        plans: The forward's segment plans by key (``segment_plan_key``), shared by
            every module of one mixed call: a plan missing here is built (on the device)
            and added, so a forward plans once per key, not once per module. ``None``:
            the op plans itself.
        col_scale: ``(S, N)`` DoRA column scales (the stacks' ``dora``: ones on the
            other slots) or ``None``.

    Returns:
        ``(B, ..., N)`` in ``x.dtype``.
    """
    (weight, scale), kn = kernel_weight(module), is_conv1d(module)
    tiles = order = None
    if plans is not None:
        row_index, stacks = inputs[0], inputs[1:]
        key = _Kernels.segment_plan_key(x, weight, *stacks, kn)
        if key is not None:
            if key not in plans:
                plans[key] = _Kernels.segment_tiles(row_index, *key)
            tiles, order = plans[key]
    if col_scale is not None or scale is not None:
        return _Kernels.lora_mixed_linear(x, weight, module.bias, *inputs, kn, tiles, order, col_scale, scale)
    return _Kernels.lora_mixed_linear(x, weight, module.bias, *inputs, kn, tiles, order)


def unstacked_reason(module: nn.Module, others: Iterable[nn.Module]) -> str | None:
    """Why a mixed call cannot fuse a module whose layers ``others`` run as themselves
    on their rows (not in the stacks: custom layers), or ``None`` when there are none.
    (DoRA layers are stacked with the LoRAs, their scales beside them.)"""
    for layer in others:
        reason = chain_reason(module, (layer,))
        return reason or f"{type(layer).__name__} runs as itself in mixed batches"
    return None


def empty_rows(x: torch.Tensor) -> torch.Tensor:
    """A view of ``x`` with no rows (what the module's own forward gets on the fused
    path): its matmul then costs nothing, and its output is discarded."""
    return x[:0] if x.dim() >= 2 else x.unsqueeze(0)[:0]
