"""Issue 20, target 3: ``set_row_adapters`` / ``clear_row_adapters``, a static row
assignment that captured (CUDA graph) or compiled forwards replay.

A forward under an assignment must create no tensor from host data: the
``HostData`` dispatch mode below flags every op that does (``lift_fresh``: a tensor
made from a Python list or scalar, e.g. ``torch.tensor([...])`` or ``x[i] = 5``;
``scalar_tensor``; a copy from CPU memory to another device) or that syncs with the
host (``_local_scalar_dense``: ``.item()`` / ``.tolist()``; ``nonzero``: a shape read
back from the device).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tinytune
from tinytune import (
    AdapterNotFoundError,
    AdapterWrapper,
    ConfigTypeError,
    LoraConfig,
    MixedBatchError,
    TinytuneError,
)

ROOT = Path(__file__).resolve().parents[1]

HOST_OPS = {"lift_fresh", "lift_fresh_copy", "scalar_tensor", "_local_scalar_dense", "nonzero"}


class HostData(TorchDispatchMode):
    """Records the ops that create a tensor from host data or sync with the host."""

    def __init__(self) -> None:
        super().__init__()
        self.flagged: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in HOST_OPS:
            self.flagged.append(str(func))
        elif name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device", src.device)
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and torch.device(dst).type != "cpu":
                self.flagged.append(str(func))
        return func(*args, **kwargs)


class Net(nn.Module):
    def __init__(self, d: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x):
        for lin in self.lins:
            x = torch.tanh(lin(x))
        return x


NAMES = ("a", "b", "c")


def _wrapper(max_rows: int | None = 4, slots: int = 2, device: str = "cpu") -> AdapterWrapper:
    torch.manual_seed(0)
    w = AdapterWrapper(Net().to(device))
    for i, name in enumerate(NAMES):
        w.add_adapter_from_config(
            LoraConfig(r=2 + i, lora_alpha=8, target_modules=["lins.0", "lins.1", "lins.2"]), name
        )
    _randomize(w)
    w.to(device)
    w.reserve_adapter_slots(slots, 8, max_rows=max_rows)
    return w.eval()


def _randomize(w: AdapterWrapper, std: float = 0.3) -> None:
    with torch.no_grad():
        for p in w.adapters.parameters():
            p.normal_(0, std)


def _per_row(w: AdapterWrapper, x: torch.Tensor, names) -> torch.Tensor:
    """The reference: each row alone, with only its adapter active."""
    saved = w.registry.rows_assigned
    w.registry.rows_assigned = False  # bypass the assignment for the reference
    try:
        rows = []
        with torch.no_grad():
            for i in range(x.shape[0]):
                name = names[i] if i < len(names) else "__base__"
                rows.append(w(x[i : i + 1], adapter_names=[name]))
        return torch.cat(rows)
    finally:
        w.registry.rows_assigned = saved


def test_rows_follow_each_assignment_and_clear():
    w = _wrapper()
    x = torch.randn(4, 3, 16)
    for names in (["a", "b", "__base__", "a"], ["c", "c", "b", "a"][:2], ["b", "a", "a", "b"]):
        w.set_row_adapters(names)
        with torch.no_grad():
            torch.testing.assert_close(w(x), _per_row(w, x, names))
            # a smaller batch uses the first rows of the buffer
            torch.testing.assert_close(w(x[:3]), _per_row(w, x[:3], names))
    w.clear_row_adapters()
    with torch.no_grad():
        w.set_adapter("a")
        torch.testing.assert_close(w(x), _per_row(w, x, ["a"] * 4))
    assert not w.registry.rows_assigned


def test_adapter_names_wins_over_assignment():
    w = _wrapper(slots=3)
    x = torch.randn(2, 16)
    w.set_row_adapters(["a", "b"])
    with torch.no_grad():
        torch.testing.assert_close(w(x, adapter_names=["c", "c"]), _per_row(w, x, ["c", "c"]))


@pytest.mark.parametrize("mode", ["torch", "fused"])
def test_assigned_forward_creates_no_tensor_from_host_data(mode):
    if mode == "fused" and not tinytune.dispatch.fusion_possible():
        pytest.skip("needs Triton and TRITON_INTERPRET=1 (or a GPU)")
    w = _wrapper()
    x = torch.randn(4, 16)
    names = ["a", "__base__", "b", "a"]
    with tinytune.kernel_mode("triton" if mode == "fused" else "torch"), torch.no_grad():
        # The per-call path builds its row index from the names: the mode catches it.
        with HostData() as seen:
            w(x, adapter_names=names)
        assert any("lift_fresh" in op for op in seen.flagged), seen.flagged
        w.set_row_adapters(names)
        w(x)  # warm
        with HostData() as seen:
            y = w(x)
    assert seen.flagged == []
    torch.testing.assert_close(y, _per_row(w, x, names), atol=1e-5, rtol=1e-5)


def test_errors_change_nothing():
    w = AdapterWrapper(Net())
    w.add_adapter_from_config(LoraConfig(r=2, target_modules=["lins.0"]), "a")
    with pytest.raises(MixedBatchError, match="reserve_adapter_slots"):
        w.set_row_adapters(["a"])
    w.reserve_adapter_slots(2, 4)  # no max_rows: no buffer
    with pytest.raises(MixedBatchError, match="max_rows"):
        w.set_row_adapters(["a"])

    w = _wrapper(max_rows=3, slots=2)
    w.set_row_adapters(["a", "b"])
    buf = w_rows(w).clone()
    stats = w.slot_stats()
    bad = [
        (["a"] * 4, MixedBatchError),  # more rows than max_rows
        ([], MixedBatchError),
        (["a", "nope"], AdapterNotFoundError),
        (["a", "b", "c"], MixedBatchError),  # 3 distinct adapters, 2 slots
        ("a", ConfigTypeError),
    ]
    for names, exc in bad:
        with pytest.raises(exc) as info:
            w.set_row_adapters(names)
        assert isinstance(info.value, TinytuneError)
        assert torch.equal(w_rows(w), buf)
        assert w.slot_stats() == stats
        assert tinytune.serving.row_assignment(w)[0] == ("a", "b")
    with pytest.raises(MixedBatchError, match="max_rows"):
        w(torch.randn(4, 16))  # batch above max_rows
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(w(x), _per_row(w, x, ["a", "b"]))


def w_rows(w: AdapterWrapper) -> torch.Tensor:
    return tinytune.serving.row_assignment(w)[2]


def test_assigned_adapters_stay_pinned_and_swap_in():
    w = _wrapper(max_rows=4, slots=2)
    x = torch.randn(4, 16)
    w.set_row_adapters(["a", "b"])
    # A mixed call needing a third adapter cannot evict the assigned ones.
    with pytest.raises(MixedBatchError):
        w(x[:1], adapter_names=["c"])
    # A new assignment releases the old one's slots first.
    w.set_row_adapters(["c", "c", "b"])
    with torch.no_grad():
        torch.testing.assert_close(w(x), _per_row(w, x, ["c", "c", "b"]))
    w.clear_row_adapters()
    with torch.no_grad():
        w(x[:2], adapter_names=["a", "a"])  # slots free again


def test_hotswap_between_calls_is_seen(tmp_path):
    w = _wrapper()
    x = torch.randn(4, 16)
    names = ["a", "b", "a", "__base__"]
    w.set_row_adapters(names)
    with torch.no_grad():
        before = w(x)
    donor = _wrapper()
    _randomize(donor, std=0.5)
    donor.save_adapter(str(tmp_path / "a2"), "a")
    w.hotswap_adapter(str(tmp_path / "a2"), "a")
    with torch.no_grad():
        after = w(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _per_row(w, x, names))


def test_compiled_reduce_overhead_replays_every_assignment_without_recompiling(tmp_path):
    torch._dynamo.reset()
    w = _wrapper()
    x = torch.randn(4, 16)
    compiled = torch.compile(w, mode="reduce-overhead")
    assignments = [["a", "b", "__base__", "a"], ["b", "b", "a", "a"], ["c", "a"], ["__base__"] * 4]
    with torch.no_grad():
        for names in assignments[:2]:  # warm-up
            w.set_row_adapters(names)
            compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for names in assignments:
                w.set_row_adapters(names)
                torch.testing.assert_close(compiled(x), _per_row(w, x, names))
            donor = _wrapper()
            _randomize(donor, std=0.5)
            donor.save_adapter(str(tmp_path / "c2"), "c")
            w.set_row_adapters(["c", "a", "c", "b"][:3])
            w.hotswap_adapter(str(tmp_path / "c2"), "c")
            torch.testing.assert_close(compiled(x), _per_row(w, x, ["c", "a", "c"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (ci/gpu_check.sh runs it)")
@pytest.mark.parametrize("mode", ["torch", "fused"])
def test_cuda_graph_replays_each_assignment_and_a_hotswap(mode, tmp_path):
    """Capture one whole forward in a CUDA graph; then 3 assignments and 1 hot-swap,
    each set between replays, outside the capture: every replay equals eager."""
    if mode == "fused" and not tinytune.dispatch.fusion_possible():
        pytest.skip("needs Triton")
    w = _wrapper(device="cuda")
    x = torch.randn(4, 3, 16, device="cuda")
    assignments = [["a", "b", "__base__", "a"], ["b", "b", "a"], ["c", "__base__", "c", "c"]]
    with tinytune.kernel_mode("triton" if mode == "fused" else "torch"), torch.no_grad():
        w.set_row_adapters(assignments[0])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (Triton compiles, allocator) off-graph
            for _ in range(2):
                w(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = w(x)
        for names in assignments:
            w.set_row_adapters(names)
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(out, _per_row(w, x, names), atol=1e-4, rtol=1e-4)
        donor = _wrapper()
        _randomize(donor, std=0.5)
        donor.save_adapter(str(tmp_path / "c2"), "c")
        w.hotswap_adapter(str(tmp_path / "c2"), "c")
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, _per_row(w, x, assignments[-1]), atol=1e-4, rtol=1e-4)


def test_decode_loop_example_runs(tmp_path):
    """The smoke case of examples/serving_decode_loop.py (tests/test_scripts.py's SMOKE
    table should name it too)."""
    argv = [sys.executable, "examples/serving_decode_loop.py", "--adapters", "3", "--slots", "2",
            "--rows", "3", "--steps", "4", "--no-compile"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "every step matched" in proc.stdout
