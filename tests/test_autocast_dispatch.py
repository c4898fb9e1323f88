"""The fused kernels compute in the input's dtype, so under ``torch.autocast`` (which runs
a module in its autocast dtype) a call must not take them: mode ``"auto"`` runs the
PyTorch path (the output autocast gives), mode ``"triton"`` raises and says why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tinytune
from tinytune import AdapterWrapper, KernelUnavailableError, LoraConfig, dispatch
from tinytune.dispatch import stub_kernels
from tinytune.kernels.lora_linear import torch_lora_linear


def _counting(calls: list):
    def kernel(*args):
        calls.append(1)
        return torch_lora_linear(*args)
    return kernel


def _wrapped() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    AdapterWrapper.from_config(model, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    return model[0]


def test_triton_mode_refuses_under_autocast():
    calls: list = []
    with stub_kernels(_counting(calls)):
        lin = _wrapped()
        x = torch.randn(3, 16)
        with torch.no_grad(), tinytune.kernel_mode("triton"):
            lin(x)
            assert len(calls) == 1  # fused without autocast
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with pytest.raises(KernelUnavailableError, match="autocast"):
                    lin(x)
            torch.testing.assert_close(lin(x), lin(x))  # nothing left behind
    assert len(calls) == 3


def test_auto_mode_runs_the_pytorch_path_under_autocast(monkeypatch):
    calls: list = []
    monkeypatch.setattr(dispatch, "auto_device", lambda x: True)  # CPU tensors count as on device
    with stub_kernels(_counting(calls)):
        lin = _wrapped()
        x = torch.randn(3, 16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            with tinytune.kernel_mode("torch"):
                ref = lin(x)
            with tinytune.kernel_mode("auto"):
                got = lin(x)
        assert not calls
        assert got.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        with torch.no_grad(), tinytune.kernel_mode("auto"):
            lin(x)
        assert len(calls) == 1  # autocast off again: fused
