"""The prototype's module names (``from tinytune.lora import LoraConfig, LinearLoraLayer``)."""

from .config import LoraConfig
from .layers import Conv2dLoraLayer, EmbeddingLoraLayer, LinearLoraLayer, LoraLayer

__all__ = ["LoraConfig", "LoraLayer", "LinearLoraLayer", "EmbeddingLoraLayer", "Conv2dLoraLayer"]
