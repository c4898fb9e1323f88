"""The prototype's module names (``from tinytune.base import AdapterConfig, AdapterLayer``).

``MimicLayer``, the prototype's trained copy of a module, is :class:`ModulesToSaveLayer`.

Floor 10 (the package face): may import any tinytune module below it.
"""

from .config import AdapterConfig
from .layers import AdapterLayer, ModulesToSaveLayer
from .wrapper import Adapter

MimicLayer = ModulesToSaveLayer

__all__ = ["AdapterConfig", "AdapterLayer", "Adapter", "MimicLayer", "ModulesToSaveLayer"]
