"""Issue 20, target 1: the eager fused path's lean branch (one LoRA on an ``nn.Linear``).

Where no hook but tinytune's sees the module's input or output, the module's own
forward gets a placeholder on which ``F.linear`` does nothing: not even a matmul on no
rows runs. Everything else (other hooks, a torch-function mode, a patched ``forward``)
must still see ordinary tensors, and the result must be the PyTorch path's.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import tinytune
from tinytune import AdapterWrapper, LoraConfig
from tinytune.dispatch import stub_kernels
from tinytune.kernels.lora_linear import torch_lora_linear


def _wrapped(out_features: int = 8) -> tuple[AdapterWrapper, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, out_features))
    w = AdapterWrapper.from_config(
        model, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False)
    )
    return w, model[0]


def _reference(lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), tinytune.kernel_mode("torch"):
        return lin(x)


def _fused(lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), tinytune.kernel_mode("triton"):
        return lin(x)


class _AtenOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_modules_own_matmul_does_not_run():
    """With a kernel of no cost, a fused call runs no aten op at all: the module's
    forward does no matmul, not even on zero rows."""
    calls = []
    result = torch.full((3, 8), 7.0)

    def free_kernel(x, *rest):
        calls.append(x)
        return result

    with stub_kernels(free_kernel):
        w, lin = _wrapped()
        x = torch.randn(3, 16)
        with torch.no_grad(), tinytune.kernel_mode("triton"):
            lin(x)  # first call builds and keeps the kernel's inputs
            with _AtenOps() as mode:
                out = lin(x)
    assert out is result
    assert calls[-1] is x
    assert mode.ops == []


def test_result_is_the_pytorch_paths():
    with stub_kernels(torch_lora_linear):
        w, lin = _wrapped()
        for shape in [(1, 16), (5, 16), (2, 3, 16)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(_fused(lin, x), _reference(lin, x), rtol=1e-5, atol=1e-5)


def _record_into(seen: list):
    def hook(module, args, *rest):
        seen.append([type(a) for a in args])
    return hook


_HOOKS = {
    "forward pre-hook": lambda lin, h: lin.register_forward_pre_hook(h),
    "forward hook": lambda lin, h: lin.register_forward_hook(h),
    "global forward pre-hook": lambda lin, h: nn.modules.module.register_module_forward_pre_hook(h),
    "global forward hook": lambda lin, h: nn.modules.module.register_module_forward_hook(h),
}


@pytest.mark.parametrize("kind", list(_HOOKS))
def test_other_hooks_see_tensors(kind):
    """A hook registered after the wrapper's (on the module, or global) sees ordinary
    tensors, and the result is unchanged; once it is gone, the same result again."""
    seen: list = []
    with stub_kernels(torch_lora_linear):
        w, lin = _wrapped()
        x = torch.randn(3, 16)
        ref = _reference(lin, x)
        handle = _HOOKS[kind](lin, _record_into(seen))
        try:
            torch.testing.assert_close(_fused(lin, x), ref, rtol=1e-5, atol=1e-5)
        finally:
            handle.remove()
        assert seen and all(types == [torch.Tensor] for types in seen)
        seen.clear()
        torch.testing.assert_close(_fused(lin, x), ref, rtol=1e-5, atol=1e-5)
        assert not seen


def test_a_torch_function_mode_sees_only_tensors():
    seen_types: set = set()
    calls: list = []

    class Recording(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            # anything taking part in the torch-function protocol but a tensor
            seen_types.update(
                type(a) for a in args
                if hasattr(type(a), "__torch_function__") and not isinstance(a, torch.Tensor)
            )
            calls.append(func)
            return func(*args, **(kwargs or {}))

    with stub_kernels(torch_lora_linear):
        w, lin = _wrapped()
        x = torch.randn(3, 16)
        ref = _reference(lin, x)
        with Recording():
            out = _fused(lin, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls and not seen_types


def test_a_patched_forward_gets_a_tensor():
    """An instance-level ``forward`` (as accelerate's hooks install) may read its input:
    it gets a tensor, and the result is right."""
    got = []
    with stub_kernels(torch_lora_linear):
        w, lin = _wrapped()
        original = lin.forward

        def forward(inp):
            got.append(tuple(inp.shape))
            return original(inp)

        x = torch.randn(3, 16)
        ref = _reference(lin, x)
        got.clear()
        lin.forward = forward
        try:
            torch.testing.assert_close(_fused(lin, x), ref, rtol=1e-5, atol=1e-5)
        finally:
            del lin.forward
    assert got == [(0, 16)]


def test_threads_keep_their_inputs():
    with stub_kernels(torch_lora_linear):
        w, lin = _wrapped()
        inputs = [torch.randn(2, 16) for _ in range(4)]
        refs = [_reference(lin, x) for x in inputs]
        errors: list = []

        def run(i: int) -> None:
            try:
                for _ in range(200):
                    torch.testing.assert_close(_fused(lin, inputs[i]), refs[i], rtol=1e-5, atol=1e-5)
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # threads switch between the two hooks of a call
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(interval)
    assert not errors, errors[0]


def test_lean_branch_follows_swap_and_adapter_changes():
    with stub_kernels(torch_lora_linear):
        w, lin = _wrapped()
        x = torch.randn(3, 16)
        torch.testing.assert_close(_fused(lin, x), _reference(lin, x), rtol=1e-5, atol=1e-5)
        # a second adapter active as well: two LoRAs on the module
        w.add_adapter_from_config(LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), "other")
        w.set_adapter(["default", "other"])
        torch.testing.assert_close(_fused(lin, x), _reference(lin, x), rtol=1e-5, atol=1e-5)
        w.set_adapter("other")
        torch.testing.assert_close(_fused(lin, x), _reference(lin, x), rtol=1e-5, atol=1e-5)
        # a new base model under the adapters
        torch.manual_seed(1)
        new = nn.Sequential(nn.Linear(16, 8))
        w.swap_base_model(new)
        torch.testing.assert_close(_fused(new[0], x), _reference(new[0], x), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            bare = nn.functional.linear(x, new[0].weight, new[0].bias)
        assert not torch.allclose(_fused(new[0], x), bare)
