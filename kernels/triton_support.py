"""The one optional import of Triton for every kernel module.

``kernels/`` is a folder of tensor-only modules, installed as ``tinytune.kernels``. It has
no ``__init__.py`` on purpose: run from the repository root, a top-level regular package
named ``kernels`` would hide Hugging Face's PyPI package of that name (which transformers
imports), while a folder without one is only a namespace portion that any regular package
on the path wins over.

Triton is optional: where it is missing (no wheels on macOS or Windows) ``HAS_TRITON`` is
False, ``triton`` and ``tl`` are None, and everything runs on the PyTorch path.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "triton", "tl", "is_interpreted"]


def is_interpreted(fn) -> bool:
    """Whether the ``@triton.jit`` function ``fn`` runs in Triton's CPU interpreter.

    ``triton.jit`` decides when the function is defined (``TRITON_INTERPRET=1`` in the
    environment then), so this asks the function, not the environment.
    """
    return type(fn).__name__ == "InterpretedFunction"
