"""Exception types raised by tinytune.

Every error tinytune raises for bad input is a subclass of :class:`TinytuneError` and
also of the matching built-in type (``ValueError``, ``TypeError``, ``LookupError``,
``RuntimeError``), so existing ``except ValueError`` code keeps working. Messages say
what to do next.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class TinytuneError(Exception):
    """Base class of every error raised by tinytune."""


class InvalidConfigError(TinytuneError, ValueError):
    """A config or layer argument is out of range (for example ``r <= 0``)."""


class AdapterExistsError(TinytuneError, ValueError):
    """An adapter with this name already exists."""


class AdapterNotFoundError(TinytuneError, LookupError):
    """No adapter with this name exists."""


class LayerNotFoundError(TinytuneError, LookupError):
    """A dotted layer path names no module of the base model."""


class LayerAlreadyAdaptedError(TinytuneError, ValueError):
    """The same adapter already has a layer on this module."""


class UnsupportedModuleError(TinytuneError, TypeError):
    """An adapter layer cannot adapt a module of this type."""


class NoMatchingModulesError(TinytuneError, ValueError):
    """A config's ``target_modules`` matched no module of the base model."""


class AdapterStateError(TinytuneError, RuntimeError):
    """The call is not possible in the wrapper's current state (merged, unloaded, ...)."""


class MergeNotSupportedError(TinytuneError, NotImplementedError):
    """An adapter layer does not implement ``merge``."""


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


class ConfigTypeError(InvalidConfigError, TypeError):
    """A config or layer argument has the wrong type (a number where names belong, a
    string where a bool belongs). Also an ``InvalidConfigError`` and a ``TypeError``."""


class AdapterSaveError(AdapterFileError, OSError):
    """An adapter cannot be written where asked (the path is a file, a dangling
    symlink, or not writable). Also an ``AdapterFileError`` and an ``OSError``."""
