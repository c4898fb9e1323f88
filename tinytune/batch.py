"""Mixed batches: one adapter per batch row (``adapter_names=[...]``)."""

from __future__ import annotations

from typing import Any, Sequence


def mixed_call(wrapper: Any, fn: Any, adapter_names: Sequence[str], args: tuple, kwargs: dict) -> Any:
    raise NotImplementedError("Per-row adapter selection (adapter_names=) is not built yet.")
