"""Shared fixtures: tiny models built in code (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class MLP(nn.Module):
    """The seed README's model."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 300)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(300, 1)

    def forward(self, X):
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.lin1(X)
        return X


class SmallMLP(nn.Module):
    """Issue 13's model: lin0 10 -> 32, relu, lin1 32 -> 4."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 32)
        self.lin1 = nn.Linear(32, 4)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.up_proj = nn.Linear(d, 2 * d)
        self.down_proj = nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.q_proj(x) + self.v_proj(x)
        return x + self.down_proj(torch.relu(self.up_proj(h)))


class Tower(nn.Module):
    """Embedding -> nested blocks -> head, for dotted-path and embedding tests."""

    def __init__(self, vocab: int = 32, d: int = 16, n: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def tower():
    torch.manual_seed(0)
    return Tower().eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert current.keys() == saved.keys()
    for k, v in saved.items():
        assert current[k].dtype == v.dtype, k
        assert torch.equal(current[k], v), f"{k} changed"


def hook_count(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return n


def randomize(wrapper) -> None:
    """Give every adapter parameter random values, so adapters change outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in wrapper.named_adapter_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            center = 1.0 if name.endswith("ia3_l") else 0.0
            p.copy_((noise + center).to(p.dtype))


