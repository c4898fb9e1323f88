"""The fused path's per-call host work: what the hook sites keep between calls.

A hook site keeps the kernel's adapter inputs between eager calls where they are views
of one LoRA's tensors (``HookSite._fused_inputs``). These tests check that what is kept
follows every change that gives a call other inputs: another active chain, a merge, a
hot-swap (same rank or not, in a reserved slot or not), an in-place update, a kernel
mode change and a dtype change. They run the fused path on CPU tensors through
``tinytune.dispatch.stub_kernels`` with the PyTorch reference as the kernel, so they
need neither Triton's interpreter nor a GPU, and compare with the PyTorch path.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tinytune
from tinytune import AdapterWrapper, LoraConfig, dispatch
from tinytune.kernels.lora_linear import torch_lora_linear


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 12)
        self.lin1 = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


class Counting:
    """The PyTorch reference as the kernel, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.ranks: list[int] = []  # the rank of lora_a in each call

    def __call__(self, *args):
        self.calls += 1
        self.ranks.append(args[3].shape[0])
        return torch_lora_linear(*args)


@pytest.fixture
def kernel():
    op = Counting()
    with dispatch.stub_kernels(op):
        yield op


def wrapped(**lora) -> AdapterWrapper:
    torch.manual_seed(0)
    w = AdapterWrapper.from_config(
        MLP().eval(), LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False, **lora), "a"
    )
    w.add_adapter_from_config(
        LoraConfig(r=8, lora_alpha=3, target_modules=["lin0", "lin1"], init_lora_weights=False), "b",
        activate=False,
    )
    return w


def check(w: AdapterWrapper, x: torch.Tensor, kernel: Counting) -> torch.Tensor:
    """The fused call (it must run the kernel) equals the PyTorch path."""
    with torch.no_grad():
        before = kernel.calls
        with tinytune.kernel_mode("triton"):
            fused = w(x)
        assert kernel.calls > before
        with tinytune.kernel_mode("torch"):
            ref = w(x)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    return fused


def test_stub_kernels_restores_the_process_state():
    before = dispatch.fusion_possible()
    with dispatch.stub_kernels(torch_lora_linear):
        assert dispatch.fusion_possible()
    assert dispatch.fusion_possible() == before


def test_kept_inputs_follow_the_active_chain_and_merges(kernel):
    w = wrapped()
    x = torch.randn(3, 10)
    out_a = check(w, x, kernel)
    w.set_active_adapters("b")
    out_b = check(w, x, kernel)
    assert not torch.allclose(out_a, out_b)
    w.set_active_adapters("a")
    torch.testing.assert_close(check(w, x, kernel), out_a)
    w.merge_adapters()
    calls = kernel.calls
    with torch.no_grad(), tinytune.kernel_mode("triton"):
        torch.testing.assert_close(w(x), out_a, rtol=1e-5, atol=1e-5)
    assert kernel.calls == calls  # merged: no hook runs
    w.unmerge_adapters()
    torch.testing.assert_close(check(w, x, kernel), out_a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("active", [["a"], ["a", "b"]])
def test_kept_inputs_follow_in_place_updates_and_scaling(kernel, active):
    w = wrapped()
    w.set_active_adapters(active)  # two LoRAs reach the kernel concatenated (copies)
    x = torch.randn(3, 10)
    first = check(w, x, kernel)
    layer = w.adapters["a"]["lin0"]
    with torch.no_grad():
        layer.lora_B.weight.mul_(-2.0)  # as an optimizer step would
    second = check(w, x, kernel)
    layer.scaling = 5.0
    third = check(w, x, kernel)
    assert not torch.allclose(first, second) and not torch.allclose(second, third)


def test_kept_inputs_follow_a_dtype_change(kernel):
    w = wrapped()
    x = torch.randn(3, 10)
    check(w, x, kernel)  # keeps fp32 inputs
    w.to(torch.bfloat16)  # the adapter layers get new scaling buffers
    w.adapters["a"]["lin0"].scaling = 7.0  # written into the new buffer only
    with torch.no_grad():
        with tinytune.kernel_mode("triton"):
            fused = w(x.bfloat16())
        with tinytune.kernel_mode("torch"):
            ref = w(x.bfloat16())
    torch.testing.assert_close(fused, ref, rtol=2e-2, atol=2e-2)
    # Cast there and back between two calls: same dtype, a new buffer all the same.
    w.to(torch.float32)
    check(w, x, kernel)
    w.to(torch.bfloat16)
    w.to(torch.float32)
    w.adapters["a"]["lin0"].scaling = 0.5
    check(w, x, kernel)


def test_a_copied_wrapper_reads_its_own_tensors(kernel):
    import copy

    w = wrapped()
    x = torch.randn(3, 10)
    check(w, x, kernel)  # the original keeps its inputs
    c = copy.deepcopy(w)
    c.adapters["a"]["lin0"].scaling = 9.0
    with torch.no_grad():
        c.adapters["a"]["lin0"].lora_B.weight.add_(1.0)
    check(c, x, kernel)


def test_kept_inputs_follow_kernel_modes_and_autograd(kernel):
    w = wrapped()
    x = torch.randn(3, 10)
    ref = check(w, x, kernel)
    calls = kernel.calls
    with torch.no_grad():
        with tinytune.kernel_mode("torch"):
            w(x)
        with tinytune.kernel_mode("auto"):  # CPU tensors: the PyTorch path
            w(x)
    assert kernel.calls == calls
    # With autograd on, the call needs a gradient: mode "triton" refuses, as before.
    with pytest.raises(tinytune.KernelUnavailableError), tinytune.kernel_mode("triton"):
        w(x)
    torch.testing.assert_close(check(w, x, kernel), ref)


@pytest.fixture
def files(tmp_path):
    out = {}
    for name, r in (("r4", 4), ("r8", 8), ("r16", 16)):
        torch.manual_seed(r)
        src = AdapterWrapper.from_config(
            MLP(), LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["lin0", "lin1"], init_lora_weights=False), "x"
        )
        src.save_adapter(str(tmp_path / name), "x")
        out[name] = str(tmp_path / name)
    return out


@pytest.mark.parametrize("slots", [False, True])
def test_kept_inputs_follow_hotswaps(kernel, files, slots):
    w = AdapterWrapper(MLP().eval())
    if slots:
        w.reserve_adapter_slots(max_adapters=2, max_rank=16)
    w.load_adapter(files["r4"], "a")
    x = torch.randn(3, 10)
    first = check(w, x, kernel)
    w.hotswap_adapter(files["r16"], "a")  # another rank and alpha
    second = check(w, x, kernel)
    w.hotswap_adapter(files["r4"], "a")  # back, same values as the first
    torch.testing.assert_close(check(w, x, kernel), first)
    assert not torch.allclose(first, second)


def test_kept_inputs_follow_slot_evictions(kernel, files):
    # Two slots: a mixed call of b and c evicts the active "a"; the next plain call
    # loads it back into another slot than the one its kept inputs viewed.
    w = AdapterWrapper(MLP().eval())
    w.reserve_adapter_slots(max_adapters=2, max_rank=16)
    w.load_adapter(files["r4"], "a")
    w.load_adapter(files["r16"], "b", activate=False)
    w.load_adapter(files["r8"], "c", activate=False)
    x = torch.randn(3, 10)
    first = check(w, x, kernel)
    with torch.no_grad():
        w(x, adapter_names=["b", "c", "b"])
    torch.testing.assert_close(check(w, x, kernel), first)


def test_slots_reach_the_kernel_padded_only_without_autograd(kernel, files):
    # Reserved slots are read (padded to max_rank) only where no gradient can be
    # needed; with autograd on, the layer's own factors, whatever was kept before.
    w = AdapterWrapper(MLP().eval())
    w.reserve_adapter_slots(max_adapters=2, max_rank=16)
    w.load_adapter(files["r4"], "a")
    w.requires_grad_(False)  # then calls fuse with autograd on as well
    x = torch.randn(3, 10)
    with tinytune.kernel_mode("triton"):
        with torch.no_grad():
            w(x)
        w(x)
        with torch.no_grad():
            w(x)
    assert kernel.ranks == [16, 16, 4, 4, 16, 16]
