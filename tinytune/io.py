"""Adapter files in PEFT's on-disk format."""

from __future__ import annotations

from typing import Any


def save_adapter(wrapper: Any, path: str, adapter_name: str = "default") -> None:
    raise NotImplementedError("save_adapter is not built yet.")


def load_adapter(wrapper: Any, path: str, adapter_name: str = "default", activate: bool = True, **kwargs: Any) -> None:
    raise NotImplementedError("load_adapter is not built yet.")
