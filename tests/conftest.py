"""Shared fixtures and helpers: tiny models built in code (nothing is downloaded).

Test files import the plain helpers with ``from conftest import ...`` (pytest puts
``tests/`` on ``sys.path``); the fixtures below hand out fresh models.
"""

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


def per_row_reference(
    wrapper, x: torch.Tensor, names: list[str], **kw
) -> torch.Tensor:
    """Each row run alone with only its adapter active (then the active set restored)."""
    active = wrapper.active_adapters
    outs = []
    try:
        for i, name in enumerate(names):
            wrapper.set_active_adapters([] if name == "__base__" else [name])
            outs.append(wrapper(x[i : i + 1], **kw))
    finally:
        wrapper.set_active_adapters(active)
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------
# tiny transformers models: the one definition of each (files override sizes by keyword)
# ----------------------------------------------------------------------------------------
LLAMA_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128,
)
GPT2_SIZES = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)


def tiny_llama(seed: int | None = 0, cls: str = "LlamaForCausalLM", **config) -> nn.Module:
    """A tiny Llama in eval mode, seeded with ``seed`` (``None``: the current RNG).

    ``config`` overrides ``LLAMA_SIZES`` or adds ``LlamaConfig`` fields; ``cls`` names
    another Llama head class of ``transformers``.
    """
    transformers = pytest.importorskip("transformers")
    if seed is not None:
        torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**LLAMA_SIZES, **config})
    return getattr(transformers, cls)(cfg).eval()


def tiny_gpt2(seed: int | None = 0, **config) -> nn.Module:
    """A tiny GPT-2 (``GPT2LMHeadModel``, Conv1D layers) in eval mode; as ``tiny_llama``."""
    transformers = pytest.importorskip("transformers")
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT2_SIZES, **config})).eval()


# Module-scoped: the tests of a module share one model, so they must not change it
# (wrap a copy.deepcopy of it to train or merge).
@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(bos_token_id=0, eos_token_id=0, pad_token_id=0)


def small() -> nn.Module:
    """A ``SmallMLP`` seeded with 0, in eval mode."""
    torch.manual_seed(0)
    return SmallMLP().eval()


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


def randomize(wrapper, seed: int = 1) -> None:
    """Give every adapter parameter random values, so adapters change outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapper.named_adapter_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            center = 1.0 if name.endswith("ia3_l") else 0.0
            p.copy_((noise + center).to(p.dtype))


# ----------------------------------------------------------------------------------------
# user-level helpers for the transformers models (only public API and plain torch)
# ----------------------------------------------------------------------------------------
IDS = torch.tensor([[3, 17, 99, 4, 60, 2], [8, 1, 42, 42, 7, 9]])
# The tiny Llama / GPT-2 of the user-level tests: token ids as a tokenizer would set them.
TOKENS = dict(max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)

LLAMA_LORA = dict(
    target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, lora_dropout=0.05,
    task_type="CAUSAL_LM",
)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def same_state(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == snap.keys() and all(
        now[k].dtype == v.dtype and torch.equal(now[k], v) for k, v in snap.items()
    )


def perturb(params, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def train_steps(model, steps=3, lr=1e-2, ids=IDS):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def wrapper_state(w):
    """Everything a failed call must leave alone."""
    return (
        list(w.adapters),
        w.active_adapters,
        w.merged_adapters,
        {n: [p for p, _ in a.items()] for n, a in w.adapters.items()},
        {k: v.detach().clone() for k, v in w.state_dict().items()},
        hook_count(w),
        {n: p.requires_grad for n, p in w.named_parameters()},
    )


def assert_same_wrapper_state(a, b):
    assert a[:4] == b[:4]
    assert a[4].keys() == b[4].keys()
    for k in a[4]:
        assert torch.equal(a[4][k], b[4][k]), k
    assert a[5] == b[5]
    assert a[6] == b[6]


# ----------------------------------------------------------------------------------------
# serving: plain calls as the reference of mixed ones, and adapter files for SmallMLP
# ----------------------------------------------------------------------------------------
def rank_lora(r: int, alpha: float | None = None, targets=("lin0", "lin1"), **kw):
    """A LoRA config of rank ``r`` on ``SmallMLP`` (alpha ``2r + 1`` unless given)."""
    from tinytune import LoraConfig

    return LoraConfig(
        target_modules=list(targets), r=r, lora_alpha=alpha or 2 * r + 1, init_lora_weights=False, **kw
    )


def plain(w, x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` run as a plain call with only ``name`` active (the active set is restored)."""
    before = w.active_adapters
    w.set_active_adapters([] if name == "__base__" else [name])
    try:
        with torch.no_grad():
            return w(x)
    finally:
        w.set_active_adapters(before)


def per_row(w, x: torch.Tensor, names) -> torch.Tensor:
    return torch.cat([plain(w, x[i : i + 1], n) for i, n in enumerate(names)])


def mixed(w, x, names) -> torch.Tensor:
    with torch.no_grad():
        return w(x, adapter_names=list(names))


def params_snapshot(w) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in w.named_adapter_parameters()}


def assert_same_params(w, saved: dict[str, torch.Tensor]) -> None:
    now = dict(w.named_adapter_parameters())
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(now[k].detach(), v), k


@pytest.fixture
def files(tmp_path):
    """Adapter directories for ``SmallMLP``: ranks 4 and 16 on both layers, LoRA+IA³ mixed (a
    TINYTUNE-format file), a rank-32 one, and one targeting lin0 only."""
    from tinytune import AdapterWrapper, IA3Config, LinearIA3Layer

    torch.manual_seed(1)
    src = AdapterWrapper(SmallMLP())
    specs = {
        "r4": rank_lora(4),
        "r16": rank_lora(16, alpha=7),
        "r2": rank_lora(2),
        "r8": rank_lora(8),
        "r32": rank_lora(32),
        "lin0_only": rank_lora(4, targets=("lin0",)),
    }
    out = {}
    for name, cfg in specs.items():
        src.add_adapter_from_config(cfg, name, activate=False)
        src.save_adapter(str(tmp_path / name), name)
        out[name] = str(tmp_path / name)
    src.add_adapter("mix", activate=False)
    src.add_adapter_layer("mix", "lin0", LinearIA3Layer)
    src.add_adapter_from_config(
        IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], init_ia3_weights=False),
        "ia3",
        activate=False,
    )
    src.save_adapter(str(tmp_path / "ia3"), "ia3")
    out["ia3"] = str(tmp_path / "ia3")
    return out
