"""Small facts every floor shares: where a module lives, DTensor detection, argument
checks, PEFT's directory layout, the wrapper's presented ``forward`` signature.

Floor 0 (with ``errors``): imports only ``errors``, torch and the standard library.
Everything above may import it.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import sys
import threading
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdapterStateError, InvalidConfigError

__all__ = [
    "CONFIG_NAME",
    "LEGACY_WEIGHTS_NAME",
    "MAX_RANK",
    "WEIGHTS_NAME",
    "adapter_dir",
    "check_init_lora_weights",
    "check_number",
    "check_rank",
    "device_of",
    "dtensor_type",
    "holds_adapter",
    "is_dtensor",
    "present_forward_signature",
    "run_frames_eagerly",
    "run_model",
]


# ======================================================================================
# torch.compile
# ======================================================================================
try:  # torch >= 2.1; elsewhere every frame is compiled, as without the mark
    from torch._dynamo.eval_frame import skip_code as _skip_code
except ImportError:  # pragma: no cover
    _skip_code = None


def run_frames_eagerly(fn: Any) -> Any:
    """Mark ``fn`` so that ``torch.compile`` never compiles a frame of its own for it.

    Its body then runs as plain Python when it is the outermost frame of a compiled
    call (``torch.compile(wrapper)`` enters ``forward`` first), while the functions it
    calls are compiled as usual: the wrapper's host-side work (validating a mixed call,
    publishing its plans) costs no frame, guards or resume functions, and the model
    runs in the one compiled frame of :func:`run_model`. Code that inlines
    ``fn`` into a larger compiled function still traces it (only the frame is skipped,
    no ``torch.compiler.disable``).

    Args:
        fn: A function (or method, before binding).

    Returns:
        ``fn`` itself.
    """
    if _skip_code is not None:
        _skip_code(fn.__code__)
    return fn


def run_model(wrapper: nn.Module, fn: Any, args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)``: every call of the base model (or its ``generate``)
    through ``wrapper``, plain, mixed or on reserved slots, in this one frame.

    Under ``torch.compile`` this is the frame that is compiled (the wrapper's own frames
    run eagerly, see :func:`run_frames_eagerly`). It reads the wrapper's
    ``registry.hook_layout`` (see ``AdapterRegistry.note_hook_layout``), so the graph
    is guarded on the modules' hooks as they are during the call, a mixed call's
    included. Read through the wrapper, an ``nn.Module``: dynamo specializes on ints
    reached from a module, where an int attribute of a plain object becomes a symbol
    (no guard on its value) once it changes.

    Args:
        wrapper: The ``AdapterWrapper``.
        fn: Its base model, or the model's ``generate``.
        args: Positional arguments for ``fn``.
        kwargs: Keyword arguments for ``fn``.

    Returns:
        Whatever ``fn`` returns.
    """
    if wrapper.registry.hook_layout < 0:  # never true: the read makes torch.compile guard on it
        raise AdapterStateError("Corrupt hook layout; rebuild the wrapper.")
    return fn(*args, **kwargs)


# ======================================================================================
# modules and tensors
# ======================================================================================
def device_of(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter, else its first buffer, else ``None``."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor``, or ``None`` where no DTensor can exist.

    Looked up without importing torch.distributed (slow, and absent from some torch
    builds): a DTensor can only exist once that module is loaded.
    """
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (sharded)."""
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


# ======================================================================================
# argument checks (configs and layers)
# ======================================================================================
_REFUSED_INITS = ("pissa", "olora", "loftq", "corda", "eva", "lora_ga", "orthogonal")


def check_init_lora_weights(init: Any) -> bool | str:
    """Validate ``init_lora_weights``: ``True``, ``False`` or ``"gaussian"``.

    Raises:
        InvalidConfigError: For PEFT's other inits, which tinytune cannot run (PiSSA,
            OLoRA, LoftQ, CorDA rewrite the base weights; EVA and LoRA-GA need data),
            and for unknown values.
    """
    if isinstance(init, bool):
        return init
    if isinstance(init, str) and init.lower() == "gaussian":
        return "gaussian"
    if isinstance(init, str) and init.lower().startswith(_REFUSED_INITS):
        raise InvalidConfigError(
            f"init_lora_weights={init!r} is not supported: tinytune never rewrites the base "
            "model's weights (PiSSA, OLoRA, LoftQ and CorDA do) and does not run data-driven "
            "inits (EVA, LoRA-GA) or orthogonal init, so the adapter would train from another "
            "start than you asked for. Use init_lora_weights=True, 'gaussian' or False, or "
            "initialise with PEFT, save, and load the file with load_adapter()."
        )
    raise InvalidConfigError(
        f"init_lora_weights must be True, False or 'gaussian', got {init!r}."
    )


#: Ranks at or above this are refused up front (torch sizes overflow far below what
#: such factors would need; a LoRA rank is typically 4..256).
MAX_RANK = 2**31


def check_rank(r: Any, what: str) -> None:
    """Refuse a rank that is not a positive integer below :data:`MAX_RANK`.

    Raises:
        InvalidConfigError: With ``what`` (the argument's name) in the message.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise InvalidConfigError(f"{what} must be a positive integer, got {r!r}.")
    if r >= MAX_RANK:
        raise InvalidConfigError(
            f"{what}={r} is absurdly large (at least 2**31); LoRA ranks are typically "
            "4 to 256. Pick a smaller rank."
        )


def check_number(value: Any, what: str) -> None:
    """Refuse a value that is not a finite real number (bools included).

    Raises:
        InvalidConfigError: With ``what`` (the argument's name) in the message.
    """
    # Caught here, not later as a bare TypeError from ``alpha / r`` in a layer.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidConfigError(f"{what} must be a number, got {value!r}.")
    if not math.isfinite(float(value)):
        # A nan/inf scale would turn every merged weight into nan.
        raise InvalidConfigError(f"{what} must be a finite number, got {value!r}.")


# ======================================================================================
# PEFT's directory layout
# ======================================================================================
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def adapter_dir(root: str | os.PathLike, adapter_name: str) -> str:
    """Where PEFT's ``save_pretrained`` puts an adapter under ``root``: ``"default"``
    in ``root`` itself, any other adapter in ``root/<name>``."""
    return str(root) if adapter_name == "default" else os.path.join(root, adapter_name)


def holds_adapter(directory: Path) -> bool:
    """Whether ``directory`` holds both adapter files (config and safetensors)."""
    return (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()


# ======================================================================================
# the wrapper's forward signature (for Hugging Face Trainer)
# ======================================================================================
_P = inspect.Parameter

# One forward function per presented signature, shared by every wrapper with that
# signature: torch.compile then reuses one wrapper's graph for another whose guards pass,
# as it does for the class's own forward.
_FORWARDS: dict[str, types.FunctionType] = {}
_FORWARDS_LOCK = threading.Lock()


def present_forward_signature(wrapper: nn.Module, model: nn.Module | None) -> None:
    """Make ``inspect.signature(wrapper.forward)`` show ``model.forward``'s parameters.

    ``AdapterWrapper.forward(*args, **kwargs)`` passes everything through, which hides
    the base model's argument names from code that reads them: Hugging Face ``Trainer``
    drops every dataset column that is not a parameter of ``model.forward``
    (``remove_unused_columns``), and decides from a ``**kwargs`` parameter whether the
    model accepts loss arguments (``num_items_in_batch``). PEFT solves the same problem
    with ``update_forward_signature``. The wrapper gets an instance attribute ``forward``:
    a method whose ``__signature__`` is the base model's, plus the keyword-only
    ``adapter_names=None`` of mixed batches, and which calls the class's ``forward``. The
    call itself is unchanged.

    Args:
        wrapper: The :class:`~tinytune.AdapterWrapper`.
        model: Its base model, or ``None`` (unloaded): then the plain signature is shown.
    """
    wrapper.__dict__.pop("forward", None)
    if model is None:
        return
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # builtins or odd callables: keep (*args, **kwargs)
        return
    params = list(sig.parameters.values())
    if all(p.kind in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD) for p in params):
        return
    if "adapter_names" not in sig.parameters:
        extra = _P("adapter_names", _P.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is _P.VAR_KEYWORD), len(params))
        params.insert(at, extra)
    try:
        shown = sig.replace(parameters=[_P("self", _P.POSITIONAL_OR_KEYWORD), *params])
    except ValueError:  # a parameter called "self", say: keep the plain signature
        return
    base = type(wrapper).forward
    key = (str(shown), base)
    with _FORWARDS_LOCK:
        fn = _FORWARDS.get(key)
        if fn is None:
            fn = _FORWARDS[key] = _forward_with(base, shown)
    wrapper.__dict__["forward"] = types.MethodType(fn, wrapper)


def _forward_with(base: types.FunctionType, signature: inspect.Signature) -> types.FunctionType:
    # A copy of the class's forward sharing its code object, not a function that calls
    # it: torch.compile then traces exactly the class's forward (same guards, same cache
    # entry) instead of one more frame that re-packs **kwargs, which made dynamo guard on
    # the values of adapter_names and recompile for every new assignment.
    forward = types.FunctionType(
        base.__code__, base.__globals__, base.__name__, base.__defaults__, base.__closure__
    )
    forward.__kwdefaults__ = base.__kwdefaults__
    forward.__dict__.update(base.__dict__)
    forward.__signature__ = signature  # type: ignore[attr-defined]
    forward.__doc__ = base.__doc__
    forward.__qualname__ = base.__qualname__
    return forward
