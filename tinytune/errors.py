"""Exception types raised by tinytune.

Every error tinytune raises for bad input is a subclass of :class:`TinytuneError` and
also of the matching built-in type (``ValueError``, ``TypeError``, ``LookupError``,
``RuntimeError``, ``KeyError``), so existing ``except ValueError`` code keeps working. Messages say
what to do next.

Floor 0: imports nothing from tinytune.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Iterable


class TinytuneError(Exception):
    """Base class of every error raised by tinytune."""


class InvalidConfigError(TinytuneError, ValueError):
    """A config or layer argument is out of range (for example ``r <= 0``)."""


class UnsupportedArgumentError(TinytuneError, TypeError):
    """A keyword argument (or value) that PEFT accepts but tinytune cannot honour, such
    as ``save_pretrained(..., safe_serialization=False)``; the message names it."""


class AdapterExistsError(TinytuneError, ValueError, KeyError):
    """An adapter with this name already exists.

    Also a ``KeyError``, which the prototype raised for a taken name.
    """

    def __str__(self) -> str:
        # KeyError's str() is repr(message), which would wrap the message in quotes.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class AdapterNotFoundError(TinytuneError, KeyError, ValueError):
    """No adapter with this name exists.

    A ``KeyError`` (what the prototype's users catch) and a ``ValueError`` (what PEFT
    raises for an unknown adapter name), so either ``except`` clause keeps working.
    """

    def __str__(self) -> str:
        # KeyError's str() is repr(message), which would wrap the message in quotes.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class LayerNotFoundError(TinytuneError, LookupError, AttributeError):
    """A dotted layer path names no module of the base model.

    Also an ``AttributeError``, which the prototype raised for an unknown layer.
    """


class LayerAlreadyAdaptedError(TinytuneError, ValueError):
    """The same adapter already has a layer on this module."""


class UnsupportedModuleError(TinytuneError, TypeError):
    """An adapter layer cannot adapt a module of this type, or the module's weight is of
    no layout tinytune knows (packed integers in a float module, an unknown tensor
    subclass: see :func:`tinytune.weights.weight_kind`); the message names the module
    and its type."""


class NoMatchingModulesError(TinytuneError, ValueError):
    """A config's ``target_modules`` matched no module of the base model."""


class AdapterStateError(TinytuneError, RuntimeError):
    """The call is not possible in the wrapper's current state (merged, unloaded, ...)."""


class MergeNotSupportedError(TinytuneError, NotImplementedError):
    """A merge that would not be exact, refused with nothing changed: an adapter layer
    does not implement ``merge``, the module's weights are tied to another module's, or
    its weight is quantized (the message names the way out,
    ``merge_and_unload(dequantize=True)``)."""


class AdapterFileError(TinytuneError, ValueError):
    """An adapter file is unreadable, corrupt, in a refused format, or does not fit the
    base model (a key naming no module, a tensor of the wrong shape)."""


class AdapterFileNotFoundError(AdapterFileError, FileNotFoundError):
    """An adapter directory lacks ``adapter_config.json`` or its weights file."""


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ``" Did you mean: 'a', 'b'?"`` for the closest candidates, or ``""``."""
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not close:
        # Fall back on names sharing the last component (``q_proj`` vs ``layers.0.q_proj``).
        last = name.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == last][:n]
    if not close:
        return ""
    return " Did you mean: " + ", ".join(repr(c) for c in close) + "?"


class MixedBatchError(TinytuneError, ValueError):
    """A mixed-batch call (``adapter_names=``) does not fit its inputs: the list's
    length is not the batch size, or a module sees a batch dimension of another size."""


class KernelUnavailableError(TinytuneError, RuntimeError):
    """Kernel mode ``"triton"`` forces the fused kernels, and a layer cannot use them
    (a custom ``AdapterLayer``, an unsupported module or dtype, a gradient is needed,
    Triton is missing, ...). The message names the module and the reason; kernel mode
    ``"auto"`` runs such layers on the PyTorch path instead."""


class ConfigTypeError(InvalidConfigError, TypeError):
    """An argument has the wrong type (a number where names belong, a string where a
    bool belongs, ``None`` where a path belongs). Also an ``InvalidConfigError`` and a
    ``TypeError``."""


class AdapterSaveError(AdapterFileError, OSError):
    """An adapter cannot be written where asked (the path is a file, a dangling
    symlink, or not writable). Also an ``AdapterFileError`` and an ``OSError``."""


# --------------------------------------------------------------------------------------
# argument checks shared by every public call (so each says what to pass instead)
# --------------------------------------------------------------------------------------
def _shown(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def wrong_type(what: str, expected: str, value: Any, hint: str = "") -> ConfigTypeError:
    """The error for ``what`` (an argument) holding ``value`` where ``expected`` belongs.

    Args:
        what: The argument, as the user wrote it (``"adapter_names"``).
        expected: What to pass instead (``"a list of adapter names"``).
        value: What was passed.
        hint: A further sentence, with its leading space.

    Returns:
        A :class:`ConfigTypeError` to raise.
    """
    return ConfigTypeError(f"{what} must be {expected}, got {_shown(value)}.{hint}")


def check_bool(value: Any, what: str) -> bool:
    """``value`` if it is ``True`` or ``False`` (a truthy string such as ``"no"`` would
    silently switch an option on), else raise :class:`ConfigTypeError`."""
    if not isinstance(value, bool):
        raise wrong_type(what, "True or False", value)
    return value


def check_path(value: Any, what: str = "path") -> str:
    """``value`` as a ``str`` path if it is a non-empty ``str`` or ``os.PathLike``,
    else raise :class:`ConfigTypeError` (rather than ``os``'s bare ``TypeError``)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise wrong_type(what, "a directory path (a non-empty str or pathlib.Path)", value)
    return value


def check_wrapper(value: Any, what: str = "wrapper") -> Any:
    """``value`` if it is a tinytune ``AdapterWrapper`` (duck-typed: this floor cannot
    import the wrapper), else raise :class:`ConfigTypeError`."""
    if getattr(value, "registry", None) is None or not hasattr(value, "adapters"):
        raise wrong_type(
            what, "a tinytune.AdapterWrapper", value,
            " Wrap the model first: AdapterWrapper(model) or AdapterWrapper.from_config(model, config).",
        )
    return value
