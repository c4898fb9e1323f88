"""tinytune: parameter-efficient adapters applied through forward hooks.

Adapters never replace, add or patch a module of the base model: they run as forward
hooks, and removing the hooks gives back the original model, bit for bit.
"""

from .config import AdapterConfig, IA3Config, LoraConfig, TaskType
from .dispatch import get_kernel_mode, kernel_mode, set_kernel_mode
from .errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterFileNotFoundError,
    AdapterNotFoundError,
    AdapterSaveError,
    AdapterStateError,
    ConfigTypeError,
    InvalidConfigError,
    KernelUnavailableError,
    LayerAlreadyAdaptedError,
    LayerNotFoundError,
    MergeNotSupportedError,
    MixedBatchError,
    NoMatchingModulesError,
    TinytuneError,
    UnsupportedArgumentError,
    UnsupportedModuleError,
)
from .layers import (
    AdapterLayer,
    Conv2dDoraLayer,
    Conv2dLoraLayer,
    DoraLayer,
    EmbeddingDoraLayer,
    EmbeddingLoraLayer,
    LinearDoraLayer,
    LinearIA3Layer,
    LinearLoraLayer,
    LoraLayer,
    ModulesToSaveLayer,
)
from .wrapper import BASE_ADAPTER_NAME, Adapter, AdapterWrapper
from .compat import get_peft_model

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterExistsError",
    "AdapterFileError",
    "AdapterFileNotFoundError",
    "AdapterLayer",
    "AdapterNotFoundError",
    "AdapterSaveError",
    "AdapterStateError",
    "AdapterWrapper",
    "BASE_ADAPTER_NAME",
    "ConfigTypeError",
    "Conv2dDoraLayer",
    "Conv2dLoraLayer",
    "DoraLayer",
    "EmbeddingDoraLayer",
    "EmbeddingLoraLayer",
    "IA3Config",
    "InvalidConfigError",
    "KernelUnavailableError",
    "LayerAlreadyAdaptedError",
    "LayerNotFoundError",
    "LinearDoraLayer",
    "LinearIA3Layer",
    "LinearLoraLayer",
    "LoraConfig",
    "LoraLayer",
    "MergeNotSupportedError",
    "MixedBatchError",
    "ModulesToSaveLayer",
    "NoMatchingModulesError",
    "TaskType",
    "TinytuneError",
    "UnsupportedArgumentError",
    "UnsupportedModuleError",
    "get_kernel_mode",
    "get_peft_model",
    "kernel_mode",
    "set_kernel_mode",
]
