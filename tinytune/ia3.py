"""The prototype's module names (``from tinytune.ia3 import IA3Config, LinearIA3Layer``).

Floor 10 (the package face): may import any tinytune module below it.
"""

from .config import IA3Config
from .layers import LinearIA3Layer

__all__ = ["IA3Config", "LinearIA3Layer"]
