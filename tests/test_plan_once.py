"""Issue 20, target 2: a mixed call plans its rows once per forward, not once per layer.

The planning ops (sorts, cumsums, searchsorted, unique, nonzero, bincount, scatter_add)
that a mixed forward runs are counted under a ``TorchDispatchMode``: a 2-layer and an
8-layer model on the same batch must run the same number.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

import tinytune
from tinytune import AdapterWrapper, LoraConfig, dispatch
from tinytune.kernels import lora_mixed

PLANNING = {
    "sort", "argsort", "cumsum", "cumsum_", "searchsorted", "unique", "_unique",
    "_unique2", "unique_consecutive", "unique_dim", "nonzero", "nonzero_static",
    "bincount", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_",
    "histc", "bucketize", "index_put", "index_put_", "masked_select",
}


class PlanningOps(TorchDispatchMode):
    """Counts the planning ops that run inside the mode, by name (inside tinytune's
    custom ops as well)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in PLANNING:
            self.seen[name] = self.seen.get(name, 0) + 1
        opdef = _maybe_get_opdef(func._name) if func.namespace == "tinytune" else None
        if opdef is not None:
            # A custom op's own ops would run below the mode: run its Python body here,
            # under the mode, so that they are counted too.
            with self:
                return opdef._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _wrapper(layers: int, d: int = 32) -> AdapterWrapper:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(d, d) for _ in range(layers)))
    w = AdapterWrapper(model)
    targets = [str(i) for i in range(layers)]
    for name in ("a", "b", "c"):
        w.add_adapter_from_config(LoraConfig(r=4, lora_alpha=8, target_modules=targets), name)
    with torch.no_grad():
        for p in w.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return w.eval()


NAMES = ["a", "b", "__base__", "a", "c", "b"]


def _count(layers: int, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    w = _wrapper(layers)
    with torch.no_grad():
        w(x, adapter_names=NAMES)  # warm: builds the stacks
        with PlanningOps() as ops:
            y = w(x, adapter_names=NAMES)
    return ops.total, ops.seen, y, w


def _reference(w: AdapterWrapper, x: torch.Tensor) -> torch.Tensor:
    rows = []
    with torch.no_grad(), tinytune.kernel_mode("torch"):
        for i, name in enumerate(NAMES):
            if name == "__base__":
                with w.disable_adapter():
                    rows.append(w(x[i : i + 1]))
            else:
                w.set_adapter(name)
                rows.append(w(x[i : i + 1]))
    return torch.cat(rows)


needs_fused = pytest.mark.skipif(
    not dispatch.fusion_possible(), reason="needs Triton and TRITON_INTERPRET=1 (or a GPU)"
)


@needs_fused
def test_fused_segments_plan_once_per_forward(monkeypatch):
    # Prefill-shaped calls take the "segments" strategy on a GPU; force it at this size.
    monkeypatch.setattr(lora_mixed, "choose_strategy", lambda *args: "segments")
    x = torch.randn(len(NAMES), 5, 32)
    with tinytune.kernel_mode("triton"):
        small, seen_small, _, _ = _count(2, x)
        big, seen_big, y, w = _count(8, x)
    assert small > 0, "the segments strategy plans on the device"
    assert big == small, (seen_small, seen_big)
    torch.testing.assert_close(y, _reference(w, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens", [1, 5])
def test_torch_path_plans_once_per_forward(tokens):
    x = torch.randn(len(NAMES), tokens, 32)
    with tinytune.kernel_mode("torch"):
        small, seen_small, _, _ = _count(2, x)
        big, seen_big, y, w = _count(8, x)
    assert big == small, (seen_small, seen_big)
    torch.testing.assert_close(y, _reference(w, x), atol=1e-5, rtol=1e-5)
