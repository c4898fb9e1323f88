"""The prototype's module names (``from tinytune.lora import LoraConfig, LinearLoraLayer``).

Floor 10 (the package face): may import any tinytune module below it.
"""

from .config import LoraConfig
from .layers import Conv2dLoraLayer, EmbeddingLoraLayer, LinearLoraLayer, LoraLayer

__all__ = ["LoraConfig", "LoraLayer", "LinearLoraLayer", "EmbeddingLoraLayer", "Conv2dLoraLayer"]
