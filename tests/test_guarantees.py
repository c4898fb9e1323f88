"""The README's guarantees on a tiny Llama (issue 2): nothing replaced, bit-exact unload
and unmerge, untouched inactive adapters, dropout, state dicts, dtypes, swapping the base
model, deepcopy and gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tinytune import AdapterWrapper, IA3Config, LoraConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import (  # noqa: E402
    IDS,
    LLAMA_LORA,
    TOKENS,
    hook_count,
    logits,
    perturb,
    same_state,
    snapshot,
    tiny_llama,
    train_steps,
)


# --------------------------------------------------------------------------------------
# issue 2: guarantees
# --------------------------------------------------------------------------------------
def test_unintrusive_no_module_replaced_and_unload_is_bit_identical():
    base = tiny_llama(**TOKENS)
    modules_before = dict(base.named_modules())
    params_before = {n: p for n, p in base.named_parameters()}
    state_before = snapshot(base)
    ref = logits(base)
    m = AdapterWrapper.from_config(base, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    m.add_adapter_from_config(IA3Config(target_modules=["k_proj"]), "ia3")
    assert dict(base.named_modules()).keys() == modules_before.keys()
    assert all(base.get_submodule(n) is mod for n, mod in modules_before.items() if n)
    assert all(dict(base.named_parameters())[n] is p for n, p in params_before.items())
    train_steps(m, steps=1)
    m.merge_adapters()
    m.unmerge_adapters()
    m.merge_adapters()
    back = m.unload()
    assert back is base and hook_count(back) == 0
    assert same_state(back, state_before)
    torch.testing.assert_close(logits(back), ref, rtol=0, atol=0)


def test_inactive_adapter_untouched_by_training_step_even_with_weight_decay():
    base = tiny_llama(**TOKENS)
    m = AdapterWrapper(base)
    m.add_adapter_from_config(LoraConfig(target_modules=["q_proj"], init_lora_weights=False), "train_me")
    m.add_adapter_from_config(LoraConfig(target_modules=["q_proj"], init_lora_weights=False), "frozen", activate=False)
    frozen = {n: p.detach().clone() for n, p in m.adapters["frozen"].named_adapter_parameters()}
    trained = {n: p.detach().clone() for n, p in m.adapters["train_me"].named_adapter_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    m.train()
    loss = m(input_ids=IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    for n, p in m.adapters["frozen"].named_adapter_parameters():
        assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trained[n]) for n, p in m.adapters["train_me"].named_adapter_parameters())


def test_dropout_only_in_train_mode():
    base = nn.Sequential(nn.Linear(32, 32))
    m = AdapterWrapper.from_config(base, LoraConfig(target_modules=["0"], lora_dropout=0.5, init_lora_weights=False))
    x = torch.randn(8, 32)
    m.eval()
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    b = m(x)
    assert not torch.allclose(a, b)


def test_wrapper_state_dict_round_trip_into_fresh_wrapper():
    m = AdapterWrapper.from_config(tiny_llama(**TOKENS), LoraConfig(**LLAMA_LORA))
    m.add_adapter_from_config(IA3Config(target_modules=["k_proj"]), "ia3")
    train_steps(m, steps=2)
    out = logits(m)
    sd = m.state_dict()

    fresh = AdapterWrapper.from_config(tiny_llama(**TOKENS), LoraConfig(**LLAMA_LORA))
    fresh.add_adapter_from_config(IA3Config(target_modules=["k_proj"]), "ia3")
    assert not torch.allclose(logits(fresh), out)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(logits(fresh), out, rtol=0, atol=0)

    # the common "save only the trainable part" pattern
    trainable = {k: v for k, v in m.state_dict().items() if "adapters." in k}
    fresh2 = AdapterWrapper.from_config(tiny_llama(**TOKENS), LoraConfig(**LLAMA_LORA))
    fresh2.add_adapter_from_config(IA3Config(target_modules=["k_proj"]), "ia3")
    result = fresh2.load_state_dict(trainable, strict=False)
    assert not result.unexpected_keys
    torch.testing.assert_close(logits(fresh2), out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_unmerge_bit_exact_many_cycles_with_zero_ia3(dtype):
    base = tiny_llama(**TOKENS).to(dtype)
    before = snapshot(base)
    m = AdapterWrapper(base)
    m.add_adapter_from_config(LoraConfig(target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False), "l")
    m.add_adapter_from_config(IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), "i")
    with torch.no_grad():
        for n, p in m.adapters["i"].named_adapter_parameters():
            p.zero_()
    unmerged = logits(m)
    for _ in range(5):
        m.merge_adapters()
        m.unmerge_adapters()
    assert same_state(base, before)
    m.merge_adapters()
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(logits(m), unmerged, rtol=tol, atol=tol)
    m.unmerge_adapters()
    assert same_state(base, before)


def test_wrapper_to_bfloat16_then_train_and_merge():
    """Users cast the whole wrapped model, e.g. model.to(torch.bfloat16)."""
    m = AdapterWrapper.from_config(tiny_llama(**TOKENS), LoraConfig(**LLAMA_LORA))
    m.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    train_steps(m, steps=2)
    out = logits(m)
    assert out.dtype == torch.bfloat16
    base = m.merge_and_unload()
    torch.testing.assert_close(logits(base), out, rtol=5e-2, atol=5e-2)


def test_swap_base_model_runs_same_adapters_on_new_model():
    m = AdapterWrapper.from_config(tiny_llama(0, **TOKENS), LoraConfig(**LLAMA_LORA))
    perturb(m.adapter_parameters(), scale=0.5)
    new = tiny_llama(1, **TOKENS)
    want = AdapterWrapper.from_config(copy.deepcopy(new), LoraConfig(**LLAMA_LORA))
    want.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith("adapters.")}, strict=False)
    old = m.swap_base_model(new)
    assert hook_count(old) == 0
    torch.testing.assert_close(logits(m), logits(want), rtol=1e-6, atol=1e-6)


def test_deepcopy_of_wrapper_is_independent():
    """EMA / checkpoint-averaging scripts deep-copy the model."""
    m = AdapterWrapper.from_config(tiny_llama(**TOKENS), LoraConfig(**LLAMA_LORA))
    perturb(m.adapter_parameters(), scale=0.3)
    out = logits(m)
    c = copy.deepcopy(m)
    torch.testing.assert_close(logits(c), out, rtol=0, atol=0)
    perturb(c.adapter_parameters(), seed=3, scale=0.3)
    torch.testing.assert_close(logits(m), out, rtol=0, atol=0)
    assert not torch.allclose(logits(c), out)


def test_gradient_checkpointing_on_hf_model_trains_the_adapter():
    base = tiny_llama(**TOKENS)
    base.gradient_checkpointing_enable()
    m = AdapterWrapper.from_config(base, LoraConfig(**LLAMA_LORA))
    m.train()
    loss = m(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in m.adapter_parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_enabled_on_wrapper_trains_the_adapter():
    m = AdapterWrapper.from_config(tiny_llama(**TOKENS), LoraConfig(**LLAMA_LORA))
    m.gradient_checkpointing_enable()
    m.train()
    loss = m(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in m.adapter_parameters()]
    assert all(g is not None for g in grads)
