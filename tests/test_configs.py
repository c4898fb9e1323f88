"""``LoraConfig`` and ``IA3Config`` as users write them (issue 2): target matching,
scaling, defaults, the formulas of each layer type, mixed LoRA/IA³ adapters and
``modules_to_save``."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import tinytune
from tinytune import (
    AdapterWrapper,
    EmbeddingLoraLayer,
    IA3Config,
    LinearIA3Layer,
    LinearLoraLayer,
    LoraConfig,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import TOKENS, logits, perturb, tiny_llama, train_steps  # noqa: E402


# --------------------------------------------------------------------------------------
# issue 2: configs
# --------------------------------------------------------------------------------------
def test_target_modules_regex_is_full_match_and_list_is_suffix_on_dot():
    base = tiny_llama(**TOKENS)
    # regex: fullmatch on the dotted name
    m = AdapterWrapper.from_config(base, LoraConfig(target_modules=r".*\.1\.self_attn\.(q|k)_proj"))
    assert sorted(p for p, _ in m.adapters["default"].items()) == [
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj",
    ]
    m.unload()
    # a regex that only matches part of a name matches nothing
    with pytest.raises(tinytune.NoMatchingModulesError):
        AdapterWrapper.from_config(base, LoraConfig(target_modules="q_proj"))
    # list: equal or ends with "." + entry ("proj" is not a suffix on a dot boundary)
    m = AdapterWrapper.from_config(base, LoraConfig(target_modules=["self_attn.o_proj", "proj"]))
    assert sorted(p for p, _ in m.adapters["default"].items()) == [
        "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj",
    ]


def test_lora_scaling_rslora_and_zero_b():
    base = nn.Sequential(nn.Linear(16, 16))
    m = AdapterWrapper.from_config(base, LoraConfig(target_modules=["0"], r=4, lora_alpha=8))
    layer = m.adapters["default"]["0"]
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.lora_A.weight.shape == (4, 16) and layer.lora_B.weight.shape == (16, 4)
    m.unload()
    m = AdapterWrapper.from_config(base, LoraConfig(target_modules=["0"], r=4, lora_alpha=8, use_rslora=True))
    assert m.adapters["default"]["0"].scaling == 4.0


def test_lora_defaults_match_issue():
    c = LoraConfig(target_modules=["x"])
    assert (c.r, c.lora_alpha, c.lora_dropout, c.use_rslora) == (8, 8, 0.0, False)


def test_lora_output_formula_linear():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    m = AdapterWrapper.from_config(nn.Sequential(lin), LoraConfig(target_modules=["0"], r=4, lora_alpha=6))
    layer = m.adapters["default"]["0"]
    perturb([layer.lora_B.weight], scale=0.5)
    x = torch.randn(5, 16)
    # lin itself is hooked now: compute the base output with the functional form
    want = nn.functional.linear(x, lin.weight, lin.bias) + 1.5 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


def test_lora_on_embedding_and_conv2d():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 6)
            self.conv = nn.Conv2d(3, 5, 3, padding=1)

        def forward(self, ids, img):
            return self.emb(ids).sum(), self.conv(img)

    base = Net().eval()
    ids, img = torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 6, 6)
    ref = base(ids, img)
    m = AdapterWrapper.from_config(base, LoraConfig(target_modules=["emb", "conv"], r=2, init_lora_weights=False))
    assert isinstance(m.adapters["default"]["emb"], EmbeddingLoraLayer)
    out = m(ids, img)
    assert not torch.allclose(out[0], ref[0]) and not torch.allclose(out[1], ref[1])
    m.merge_adapters()
    merged = m(ids, img)
    torch.testing.assert_close(merged[0], out[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged[1], out[1], rtol=1e-4, atol=1e-4)
    m.unmerge_adapters()
    base2 = m.unload()
    torch.testing.assert_close(base2(ids, img)[1], ref[1], rtol=0, atol=0)


def test_ia3_scales_inputs_of_feedforward_and_outputs_of_others():
    torch.manual_seed(0)
    base = tiny_llama(**TOKENS)
    cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    m = AdapterWrapper.from_config(base, cfg)
    a = m.adapters["default"]
    assert a["model.layers.0.mlp.down_proj"].ia3_l.shape == (1, 128)
    assert a["model.layers.0.self_attn.k_proj"].ia3_l.shape == (32, 1)
    # behaviour, on one module
    down = base.model.layers[0].mlp.down_proj
    x = torch.randn(3, 128)
    with torch.no_grad():
        a["model.layers.0.mlp.down_proj"].ia3_l.uniform_(0.5, 1.5)
    want = nn.functional.linear(x * a["model.layers.0.mlp.down_proj"].ia3_l.view(-1), down.weight)
    torch.testing.assert_close(down(x), want.detach(), rtol=1e-5, atol=1e-5)
    k = base.model.layers[0].self_attn.k_proj
    with torch.no_grad():
        a["model.layers.0.self_attn.k_proj"].ia3_l.uniform_(0.5, 1.5)
    xk = torch.randn(3, 64)
    want = nn.functional.linear(xk, k.weight, k.bias) * a["model.layers.0.self_attn.k_proj"].ia3_l.view(-1)
    torch.testing.assert_close(k(xk), want.detach(), rtol=1e-5, atol=1e-5)


def test_lora_and_ia3_in_one_adapter_with_different_ranks():
    base = tiny_llama(**TOKENS)
    ref = logits(base)
    m = AdapterWrapper(base)
    m.add_adapter("mix")
    m.add_adapter_layer("mix", "model.layers.0.self_attn.q_proj", functools.partial(LinearLoraLayer, r=2))
    m.add_adapter_layer("mix", "model.layers.1.self_attn.q_proj", functools.partial(LinearLoraLayer, r=6))
    m.add_adapter_layer("mix", "model.layers.1.mlp.up_proj", LinearIA3Layer)
    perturb(m.adapter_parameters(), scale=0.3)
    out = logits(m)
    assert not torch.allclose(out, ref)
    m.merge_adapters()
    torch.testing.assert_close(logits(m), out, rtol=1e-4, atol=1e-4)
    m.unmerge_adapters()
    torch.testing.assert_close(logits(m), out, rtol=0, atol=0)


def test_modules_to_save_trains_a_copy_and_original_is_untouched_until_merge():
    base = tiny_llama(**TOKENS)
    head_before = base.lm_head.weight.detach().clone()
    m = AdapterWrapper.from_config(base, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n in trainable)
    train_steps(m, steps=2, lr=5e-2)
    assert torch.equal(base.lm_head.weight, head_before)
    out = logits(m)
    merged = m.merge_and_unload()
    assert not torch.equal(merged.lm_head.weight, head_before)
    torch.testing.assert_close(logits(merged), out, rtol=1e-4, atol=1e-4)
