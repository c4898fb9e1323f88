"""Fused GPU kernels for tinytune, importable as ``tinytune.kernels``.

This package knows about tensors only: it imports torch (and triton, when present)
and never tinytune itself, so the kernels can be tested and reused on their own.
"""

try:  # Triton is optional: without it everything runs on the PyTorch path.
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]
