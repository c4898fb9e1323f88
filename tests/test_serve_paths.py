"""Issue 20, targets 1 and 7: the eager fused path's kept state, and compiled mixed decode
on the CPU (``torch_lora_mixed_indexed``).

Target 1: the eager fused path reads the module's parameters from its parameter dict and
keeps a ``(0, in_features)`` empty input between calls (see ``dispatch.empty_input``):
both must follow every change (a cast, a replaced parameter). Target 7: under
``torch.compile`` on the CPU, a mixed call's LoRA reads each row's factors by index
inside the graph's products (shapes that depend on the batch only), so a new
assignment never recompiles, and the result is the eager one.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import tinytune
from tinytune import AdapterWrapper, LoraConfig
from tinytune.dispatch import stub_kernels
from tinytune.kernels.lora_linear import torch_lora_linear
from conftest import per_row  # noqa: E402


def _fused_linear() -> tuple[AdapterWrapper, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    w = AdapterWrapper.from_config(
        model, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False)
    )
    return w, model[0]


def _both_paths(lin: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        with tinytune.kernel_mode("triton"):
            fused = lin(x)
        with tinytune.kernel_mode("torch"):
            ref = lin(x)
    return fused, ref


def test_kept_empty_input_follows_a_cast():
    """The kept empty input has the input's dtype: after a cast the module's own forward
    must get one of the new dtype (F.linear raises on a mismatch)."""
    with stub_kernels(torch_lora_linear):
        w, lin = _fused_linear()
        x = torch.randn(3, 16)
        fused, ref = _both_paths(lin, x)
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
        w.to(torch.bfloat16)
        fused, ref = _both_paths(lin, x.bfloat16())
        assert fused.dtype == torch.bfloat16
        torch.testing.assert_close(fused, ref, rtol=2e-2, atol=2e-2)
        w.to(torch.float32)
        fused, ref = _both_paths(lin, x)
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def test_module_forward_sees_no_rows_of_the_right_width():
    seen = []
    with stub_kernels(torch_lora_linear):
        w, lin = _fused_linear()
        lin.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
        # registered after the wrapper's hooks: sees what the module's forward gets
        x = torch.randn(2, 3, 16)
        fused, ref = _both_paths(lin, x)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    assert seen[0] == (0, 16) and seen[1] == (2, 3, 16)


def test_replaced_parameters_are_read_anew():
    """The fused path reads weight and bias on every call, never a kept reference."""
    with stub_kernels(torch_lora_linear):
        w, lin = _fused_linear()
        x = torch.randn(3, 16)
        before, _ = _both_paths(lin, x)
        lin.weight = nn.Parameter(torch.randn(8, 16))
        lin.bias = nn.Parameter(torch.randn(8))
        fused, ref = _both_paths(lin, x)
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fused, before)
        lin.bias = None
        fused, ref = _both_paths(lin, x)
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def test_fused_path_decision_follows_modes_and_autograd():
    calls = []

    def counting(*args):
        calls.append(1)
        return torch_lora_linear(*args)

    with stub_kernels(counting):
        w, lin = _fused_linear()
        x = torch.randn(3, 16)
        with torch.no_grad(), tinytune.kernel_mode("torch"):
            lin(x)
        assert not calls
        with torch.no_grad(), tinytune.kernel_mode("triton"):
            lin(x)
        assert len(calls) == 1
        # autograd on and a LoRA factor requires grad: "triton" raises, "auto" falls back
        with tinytune.kernel_mode("triton"), pytest.raises(tinytune.KernelUnavailableError):
            lin(x)
        with tinytune.kernel_mode("auto"):
            lin(x).sum().backward()
        assert len(calls) == 1
        # a backward hook on the module: never fused
        handle = lin.register_full_backward_hook(lambda *a: None)
        try:
            with torch.no_grad(), tinytune.kernel_mode("triton"):
                with pytest.raises(tinytune.KernelUnavailableError, match="backward hooks"):
                    lin(x)
        finally:
            handle.remove()


# --------------------------------------------------------------------------- target 7
def _mixed_model() -> AdapterWrapper:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    w = AdapterWrapper(model)
    for name in ("a", "b", "c"):
        w.add_adapter_from_config(LoraConfig(r=16, target_modules=["0", "2"]), name)
    with torch.no_grad():
        for p in w.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return w.eval()


def test_compiled_mixed_decode_groups_without_recompiling():
    """Compiled mixed calls on the CPU run their LoRA inside the graph as
    torch_lora_mixed_indexed (two indexed products per module, no opaque op), equal
    each row run alone, and never recompile for a new assignment."""
    w = _mixed_model()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(w, backend=backend, fullgraph=False)
    # 16 rows of one token, rank 16: the rows are grouped by adapter (worth_grouping)
    x = torch.randn(16, 1, 16)
    assignments = [
        ["a"] * 16,
        ["a", "b", "c", "__base__"] * 4,
        ["c", "c", "b", "b", "__base__", "a", "a", "a"] * 2,
        ["__base__"] * 16,
    ]
    with torch.no_grad(), tinytune.kernel_mode("torch"):
        compiled(x, adapter_names=assignments[0])  # compiles
        n_graphs = len(graphs)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for names in assignments:
                got = compiled(x, adapter_names=names)
                torch.testing.assert_close(got, per_row(w, x, names), rtol=1e-5, atol=1e-5)
    assert len(graphs) == n_graphs
    assert len(graphs) == 1  # the whole model in one graph
    nodes = list(graphs[0].graph.nodes)
    sums = [node for node in nodes if node.op == "call_method" and node.target == "sum"]
    assert len(sums) == 4  # two indexed products per adapted module


def test_mixed_calls_on_two_threads_keep_their_rows():
    """Each thread's sites read the call in flight on that thread."""
    w = _mixed_model()
    x = torch.randn(6, 2, 16)
    jobs = {"t1": ["a", "b", "c", "a", "b", "c"], "t2": ["c", "__base__", "a", "a", "b", "b"]}
    with torch.no_grad():
        refs = {k: w(x, adapter_names=v) for k, v in jobs.items()}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(key: str) -> None:
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(30):
                    torch.testing.assert_close(w(x, adapter_names=jobs[key]), refs[key])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
