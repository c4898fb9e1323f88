"""Acceptance tests written from the words of issues 2 and 3, the way users write code.

Each test is a small user script: PEFT-style configs on tiny `transformers` models built
from configs (nothing is downloaded), short training loops, save/load round trips with
PEFT on the other side, and the error cases the issues list.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os

import pytest
import torch
from torch import nn

import tinytune
from tinytune import (
    AdapterConfig,
    AdapterLayer,
    AdapterWrapper,
    EmbeddingLoraLayer,
    IA3Config,
    LinearIA3Layer,
    LinearLoraLayer,
    LoraConfig,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.tensor([[3, 17, 99, 4, 60, 2], [8, 1, 42, 42, 7, 9]])


# --------------------------------------------------------------------------------------
# helpers (user-level: only public API and plain torch)
# --------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == snap.keys() and all(
        now[k].dtype == v.dtype and torch.equal(now[k], v) for k, v in snap.items()
    )


def n_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()
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


def wrapper_state(w: AdapterWrapper):
    """Everything a failed call must leave alone."""
    return (
        list(w.adapters),
        w.active_adapters,
        w.merged_adapters,
        {n: [p for p, _ in a.items()] for n, a in w.adapters.items()},
        {k: v.detach().clone() for k, v in w.state_dict().items()},
        n_hooks(w),
        {n: p.requires_grad for n, p in w.named_parameters()},
    )


def assert_same_wrapper_state(a, b):
    assert a[:4] == b[:4]
    assert a[4].keys() == b[4].keys()
    for k in a[4]:
        assert torch.equal(a[4][k], b[4][k]), k
    assert a[5] == b[5]
    assert a[6] == b[6]


LLAMA_LORA = dict(
    target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, lora_dropout=0.05,
    task_type="CAUSAL_LM",
)


# --------------------------------------------------------------------------------------
# issue 2: public API
# --------------------------------------------------------------------------------------
def test_public_names_import_from_tinytune():
    for name in [
        "AdapterWrapper", "AdapterLayer", "AdapterConfig", "LoraConfig", "IA3Config",
        "LinearLoraLayer", "EmbeddingLoraLayer", "LinearIA3Layer",
    ]:
        assert isinstance(getattr(tinytune, name), type), name
    assert issubclass(LoraConfig, AdapterConfig) and issubclass(IA3Config, AdapterConfig)
    importlib.import_module("tinytune.kernels")  # part of the installed distribution


def test_llama_user_script_train_merge_unload():
    """The typical PEFT script, with AdapterWrapper in place of get_peft_model."""
    base = tiny_llama()
    before = snapshot(base)
    ref = logits(base)
    model = AdapterWrapper.from_config(base, LoraConfig(**LLAMA_LORA))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert model.adapters["default"]["model.layers.1.self_attn.q_proj"].lora_A.out_features == 8
    assert model.adapters["default"]["model.layers.1.self_attn.q_proj"].scaling == 2.0
    # a fresh LoRA is a no-op
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=0)

    losses = train_steps(model, steps=4)
    assert losses[-1] < losses[0]
    assert same_state(base, before)  # base weights never change while unmerged
    out = logits(model)
    assert not torch.allclose(out, ref)

    merged = model.merge_and_unload()
    assert merged is base
    assert n_hooks(merged) == 0
    torch.testing.assert_close(logits(merged), out, rtol=1e-4, atol=1e-4)
    assert all(p.requires_grad for p in merged.parameters())  # flags come back


def test_llama_generate_through_wrapper_matches_merged_model():
    base = tiny_llama()
    model = AdapterWrapper.from_config(base, LoraConfig(**LLAMA_LORA))
    perturb(model.adapter_parameters(), scale=0.5)
    prompt = IDS[:1, :3]
    gen = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    plain = copy.deepcopy(base)
    for m in plain.modules():
        m._forward_hooks.clear(), m._forward_pre_hooks.clear()
    gen_plain = plain.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    merged = model.merge_and_unload()
    gen_merged = merged.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, gen_merged)
    assert gen.shape == (1, 9)
    assert not torch.equal(gen, gen_plain)  # the adapter mattered


def test_wrapper_passes_through_model_attributes():
    base = tiny_llama()
    model = AdapterWrapper.from_config(base, LoraConfig(**LLAMA_LORA))
    assert model.config is base.config
    out = model(input_ids=IDS, labels=IDS)
    assert out.loss is not None and out.logits.shape == (2, 6, 128)
    out2 = model(IDS)  # positional input, as users call models
    torch.testing.assert_close(out2.logits, out.logits)


def test_add_adapter_keeps_others_active_and_add_adapter_layer_accepts_three_forms():
    base = tiny_llama()
    model = AdapterWrapper(base)
    model.add_adapter()  # default name
    model.add_adapter("other", activate=False)
    model.add_adapter("third")
    assert model.active_adapters == ["default", "third"]
    q = "model.layers.1.self_attn.q_proj"
    inst = LinearLoraLayer(r=3)
    assert model.add_adapter_layer("default", q, inst) is inst
    model.add_adapter_layer("other", q, LinearLoraLayer)
    model.add_adapter_layer("third", q, functools.partial(LinearLoraLayer, r=16))
    model.add_adapter_layer("third", "model.layers.0.mlp.down_proj", lambda: LinearIA3Layer(is_feedforward=True))
    assert model.adapters["default"][q].lora_A.out_features == 3
    assert model.adapters["other"][q].lora_A.out_features == 8
    assert model.adapters["third"][q].lora_B.in_features == 16
    assert model.adapters["third"]["model.layers.0.mlp.down_proj"].ia3_l.shape == (1, 128)


def test_set_active_adapters_name_list_and_empty():
    base = tiny_llama()
    ref = logits(base)
    model = AdapterWrapper(base)
    model.add_adapter_from_config(LoraConfig(target_modules=["q_proj"], init_lora_weights=False), "a")
    model.add_adapter_from_config(LoraConfig(target_modules=["v_proj"], init_lora_weights=False), "b")
    model.set_active_adapters("a")
    assert model.active_adapters == ["a"]
    out_a = logits(model)
    model.set_active_adapters(["b"])
    out_b = logits(model)
    model.set_active_adapters(["a", "b"])
    out_ab = logits(model)
    model.set_active_adapters([])
    assert model.active_adapters == []
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=0)
    assert n_hooks(base) == 0
    assert not torch.allclose(out_a, out_b)
    assert not torch.allclose(out_ab, out_a) and not torch.allclose(out_ab, out_b)


def test_two_loras_on_same_module_add_up():
    base = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(4, 8)
    ref = base(x)
    model = AdapterWrapper(base)
    model.add_adapter_from_config(LoraConfig(target_modules=["0"], init_lora_weights=False), "a")
    model.add_adapter_from_config(LoraConfig(target_modules=["0"], r=2, init_lora_weights=False), "b")
    model.set_active_adapters("a")
    da = model(x) - ref
    model.set_active_adapters("b")
    db = model(x) - ref
    model.set_active_adapters(["a", "b"])
    torch.testing.assert_close(model(x) - ref, da + db, rtol=1e-5, atol=1e-5)


def test_named_adapter_parameters_on_wrapper_and_each_adapter():
    model = AdapterWrapper(tiny_llama())
    model.add_adapter_from_config(LoraConfig(target_modules=["q_proj"], r=2), "a")
    model.add_adapter_from_config(IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]), "b")
    names = dict(model.named_adapter_parameters())
    assert len(names) == 2 * 2 + 2
    a_names = dict(model.adapters["a"].named_adapter_parameters())
    assert len(a_names) == 4 and all("lora_" in n for n in a_names)
    assert {id(p) for p in model.adapters["b"].adapter_parameters()} == {
        id(p) for n, p in names.items() if "ia3_l" in n
    }
    # every adapter parameter is a parameter of the wrapper (so optimizers see it)
    wrapper_ids = {id(p) for p in model.parameters()}
    assert all(id(p) in wrapper_ids for p in model.adapter_parameters())


# --------------------------------------------------------------------------------------
# issue 2: configs
# --------------------------------------------------------------------------------------
def test_target_modules_regex_is_full_match_and_list_is_suffix_on_dot():
    base = tiny_llama()
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
    base = tiny_llama()
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
    base = tiny_llama()
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
    base = tiny_llama()
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


# --------------------------------------------------------------------------------------
# issue 2: custom adapters
# --------------------------------------------------------------------------------------
class ShiftScale(AdapterLayer):
    """Shift the input, scale the output; parameters shaped for the target."""

    def reset_params(self, prefix, target):
        self.seen_prefix = prefix
        self.shift = nn.Parameter(torch.zeros(target.in_features))
        self.scale = nn.Parameter(torch.ones(target.out_features))

    def pre_forward(self, module, args, kwargs):
        return (args[0] + self.shift, *args[1:]), kwargs

    def post_forward(self, module, args, kwargs, output):
        return output * self.scale


def test_custom_adapter_layer_on_nested_path_trains_and_unloads():
    base = tiny_llama()
    before = snapshot(base)
    ref = logits(base)
    m = AdapterWrapper(base)
    m.add_adapter("custom")
    path = "model.layers.1.mlp.down_proj"
    layer = m.add_adapter_layer("custom", path, ShiftScale)
    assert layer.seen_prefix == path
    assert layer.shift.shape == (128,) and layer.scale.shape == (64,)
    torch.testing.assert_close(logits(m), ref, rtol=0, atol=0)
    train_steps(m, steps=2, lr=5e-2)
    assert layer.shift.abs().sum() > 0
    out = logits(m)
    down = base.model.layers[1].mlp.down_proj
    x = torch.randn(2, 128)
    torch.testing.assert_close(
        down(x), ((nn.functional.linear(x + layer.shift, down.weight)) * layer.scale).detach(),
        rtol=1e-5, atol=1e-5,
    )
    with pytest.raises(tinytune.MergeNotSupportedError):
        m.merge_adapters()
    assert m.merged_adapters == []
    torch.testing.assert_close(logits(m), out, rtol=0, atol=0)
    back = m.unload()
    assert n_hooks(back) == 0 and same_state(back, before)
    torch.testing.assert_close(logits(back), ref, rtol=0, atol=0)


class OutputOnly(AdapterLayer):
    def post_forward(self, module, args, kwargs, output):
        return output + 1.0


def test_custom_layer_with_only_post_forward_and_no_params():
    base = nn.Sequential(nn.Linear(4, 4))
    m = AdapterWrapper(base)
    m.add_adapter()
    m.add_adapter_layer("default", "0", OutputOnly())
    x = torch.randn(2, 4)
    torch.testing.assert_close(m(x), nn.functional.linear(x, base[0].weight, base[0].bias) + 1)
    m.set_active_adapters([])
    torch.testing.assert_close(m(x), nn.functional.linear(x, base[0].weight, base[0].bias))


# --------------------------------------------------------------------------------------
# issue 2: guarantees
# --------------------------------------------------------------------------------------
def test_unintrusive_no_module_replaced_and_unload_is_bit_identical():
    base = tiny_llama()
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
    assert back is base and n_hooks(back) == 0
    assert same_state(back, state_before)
    torch.testing.assert_close(logits(back), ref, rtol=0, atol=0)


def test_inactive_adapter_untouched_by_training_step_even_with_weight_decay():
    base = tiny_llama()
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
    m = AdapterWrapper.from_config(tiny_llama(), LoraConfig(**LLAMA_LORA))
    m.add_adapter_from_config(IA3Config(target_modules=["k_proj"]), "ia3")
    train_steps(m, steps=2)
    out = logits(m)
    sd = m.state_dict()

    fresh = AdapterWrapper.from_config(tiny_llama(), LoraConfig(**LLAMA_LORA))
    fresh.add_adapter_from_config(IA3Config(target_modules=["k_proj"]), "ia3")
    assert not torch.allclose(logits(fresh), out)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(logits(fresh), out, rtol=0, atol=0)

    # the common "save only the trainable part" pattern
    trainable = {k: v for k, v in m.state_dict().items() if "adapters." in k}
    fresh2 = AdapterWrapper.from_config(tiny_llama(), LoraConfig(**LLAMA_LORA))
    fresh2.add_adapter_from_config(IA3Config(target_modules=["k_proj"]), "ia3")
    result = fresh2.load_state_dict(trainable, strict=False)
    assert not result.unexpected_keys
    torch.testing.assert_close(logits(fresh2), out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_unmerge_bit_exact_many_cycles_with_zero_ia3(dtype):
    base = tiny_llama().to(dtype)
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
    m = AdapterWrapper.from_config(tiny_llama(), LoraConfig(**LLAMA_LORA))
    m.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    train_steps(m, steps=2)
    out = logits(m)
    assert out.dtype == torch.bfloat16
    base = m.merge_and_unload()
    torch.testing.assert_close(logits(base), out, rtol=5e-2, atol=5e-2)


def test_swap_base_model_runs_same_adapters_on_new_model():
    m = AdapterWrapper.from_config(tiny_llama(0), LoraConfig(**LLAMA_LORA))
    perturb(m.adapter_parameters(), scale=0.5)
    new = tiny_llama(1)
    want = AdapterWrapper.from_config(copy.deepcopy(new), LoraConfig(**LLAMA_LORA))
    want.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith("adapters.")}, strict=False)
    old = m.swap_base_model(new)
    assert n_hooks(old) == 0
    torch.testing.assert_close(logits(m), logits(want), rtol=1e-6, atol=1e-6)


def test_deepcopy_of_wrapper_is_independent():
    """EMA / checkpoint-averaging scripts deep-copy the model."""
    m = AdapterWrapper.from_config(tiny_llama(), LoraConfig(**LLAMA_LORA))
    perturb(m.adapter_parameters(), scale=0.3)
    out = logits(m)
    c = copy.deepcopy(m)
    torch.testing.assert_close(logits(c), out, rtol=0, atol=0)
    perturb(c.adapter_parameters(), seed=3, scale=0.3)
    torch.testing.assert_close(logits(m), out, rtol=0, atol=0)
    assert not torch.allclose(logits(c), out)


def test_gradient_checkpointing_on_hf_model_trains_the_adapter():
    base = tiny_llama()
    base.gradient_checkpointing_enable()
    m = AdapterWrapper.from_config(base, LoraConfig(**LLAMA_LORA))
    m.train()
    loss = m(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in m.adapter_parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_enabled_on_wrapper_trains_the_adapter():
    m = AdapterWrapper.from_config(tiny_llama(), LoraConfig(**LLAMA_LORA))
    m.gradient_checkpointing_enable()
    m.train()
    loss = m(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in m.adapter_parameters()]
    assert all(g is not None for g in grads)


# --------------------------------------------------------------------------------------
# issue 2: bad input
# --------------------------------------------------------------------------------------
@pytest.fixture
def wrapped():
    m = AdapterWrapper.from_config(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    m.add_adapter_from_config(IA3Config(target_modules=["v_proj"]), "ia3", activate=False)
    return m


def test_unknown_layer_path_suggests_close_names(wrapped):
    before = wrapper_state(wrapped)
    with pytest.raises(tinytune.LayerNotFoundError) as e:
        wrapped.add_adapter_layer("default", "model.layers.1.self_attn.q_prj", LinearLoraLayer)
    assert "model.layers.1.self_attn.q_proj" in str(e.value)
    assert isinstance(e.value, LookupError)
    assert_same_wrapper_state(before, wrapper_state(wrapped))


def test_config_matching_nothing(wrapped):
    before = wrapper_state(wrapped)
    with pytest.raises(tinytune.NoMatchingModulesError) as e:
        wrapped.add_adapter_from_config(LoraConfig(target_modules=["query", "value"]), "x")
    assert "query" in str(e.value)
    assert_same_wrapper_state(before, wrapper_state(wrapped))
    base = tiny_llama()
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(tinytune.NoMatchingModulesError):
        AdapterWrapper.from_config(base, LoraConfig(target_modules=["query"]))
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert n_hooks(base) == 0


def test_unsupported_module_type_is_named(wrapped):
    before = wrapper_state(wrapped)
    with pytest.raises(tinytune.UnsupportedModuleError) as e:
        wrapped.add_adapter_layer("default", "model.norm", LinearLoraLayer)
    assert "LlamaRMSNorm" in str(e.value)
    with pytest.raises(tinytune.UnsupportedModuleError) as e:
        wrapped.add_adapter_from_config(LoraConfig(target_modules=["q_proj", "input_layernorm"]), "x")
    assert "LlamaRMSNorm" in str(e.value)
    with pytest.raises(tinytune.UnsupportedModuleError) as e:
        wrapped.add_adapter_from_config(IA3Config(target_modules=["embed_tokens"]), "x")
    assert "Embedding" in str(e.value)
    with pytest.raises(tinytune.UnsupportedModuleError):
        wrapped.add_adapter_layer("default", "model.embed_tokens", LinearIA3Layer)
    assert_same_wrapper_state(before, wrapper_state(wrapped))


def test_nonpositive_rank(wrapped):
    before = wrapper_state(wrapped)
    for r in (0, -2):
        with pytest.raises(tinytune.InvalidConfigError, match="r"):
            LoraConfig(target_modules=["q_proj"], r=r)
        with pytest.raises(tinytune.InvalidConfigError):
            wrapped.add_adapter_layer("default", "model.layers.0.self_attn.k_proj", functools.partial(LinearLoraLayer, r=r))
    with pytest.raises(tinytune.InvalidConfigError):
        LoraConfig(target_modules=["q_proj"], rank_pattern={"v_proj": 0})
    assert_same_wrapper_state(before, wrapper_state(wrapped))


def test_duplicate_adapter_name(wrapped, tmp_path):
    wrapped.save_adapter(str(tmp_path / "a"))
    before = wrapper_state(wrapped)
    with pytest.raises(tinytune.AdapterExistsError):
        wrapped.add_adapter("default")
    with pytest.raises(tinytune.AdapterExistsError):
        wrapped.add_adapter_from_config(LoraConfig(target_modules=["k_proj"]), "ia3")
    with pytest.raises(tinytune.AdapterExistsError):
        wrapped.load_adapter(str(tmp_path / "a"), adapter_name="default")
    assert_same_wrapper_state(before, wrapper_state(wrapped))


def test_unknown_adapter_in_any_call(wrapped, tmp_path):
    before = wrapper_state(wrapped)
    calls = [
        lambda: wrapped.set_active_adapters("nope"),
        lambda: wrapped.set_active_adapters(["default", "nope"]),
        lambda: wrapped.set_adapter("nope"),
        lambda: wrapped.delete_adapter("nope"),
        lambda: wrapped.merge_adapters("nope"),
        lambda: wrapped.merge_adapters(["default", "nope"]),
        lambda: wrapped.unmerge_adapters(["nope"]),
        lambda: wrapped.add_adapter_layer("nope", "model.layers.0.self_attn.k_proj", LinearLoraLayer),
        lambda: wrapped.save_adapter(str(tmp_path / "x"), adapter_name="nope"),
        lambda: wrapped.adapters["nope"],
    ]
    for call in calls:
        with pytest.raises(LookupError) as e:
            call()
        assert "nope" in str(e.value)
        assert_same_wrapper_state(before, wrapper_state(wrapped))
    for call in calls[:-1]:
        with pytest.raises(tinytune.AdapterNotFoundError) as e:
            call()
        assert "default" in str(e.value)  # says which adapters exist
    assert not (tmp_path / "x").exists()


def test_unknown_adapter_while_merged_leaves_merge_alone(wrapped):
    wrapped.merge_adapters()
    before = wrapper_state(wrapped)
    with pytest.raises(tinytune.AdapterNotFoundError):
        wrapped.unmerge_adapters(["default", "nope"])
    assert_same_wrapper_state(before, wrapper_state(wrapped))


def test_adapting_a_layer_twice_within_one_adapter(wrapped):
    before = wrapper_state(wrapped)
    with pytest.raises(tinytune.LayerAlreadyAdaptedError) as e:
        wrapped.add_adapter_layer("default", "model.layers.0.self_attn.q_proj", LinearLoraLayer)
    assert "model.layers.0.self_attn.q_proj" in str(e.value)
    assert_same_wrapper_state(before, wrapper_state(wrapped))


def test_layer_factory_returning_wrong_type(wrapped):
    before = wrapper_state(wrapped)
    with pytest.raises(TypeError):
        wrapped.add_adapter_layer("default", "model.layers.0.self_attn.k_proj", lambda: nn.Linear(2, 2))
    with pytest.raises(TypeError):
        wrapped.add_adapter_layer("default", "model.layers.0.self_attn.k_proj", 3)
    assert_same_wrapper_state(before, wrapper_state(wrapped))


def test_failing_reset_params_leaves_nothing_attached(wrapped):
    class Broken(AdapterLayer):
        def reset_params(self, prefix, target):
            self.p = nn.Parameter(torch.zeros(3))
            raise RuntimeError("boom")

    before = wrapper_state(wrapped)
    with pytest.raises(RuntimeError, match="boom"):
        wrapped.add_adapter_layer("default", "model.layers.0.self_attn.k_proj", Broken)
    assert_same_wrapper_state(before, wrapper_state(wrapped))


# --------------------------------------------------------------------------------------
# issue 3: PEFT's on-disk format
# --------------------------------------------------------------------------------------
def test_save_writes_peft_layout_keys_and_config(tmp_path):
    from safetensors.torch import load_file

    m = AdapterWrapper.from_config(tiny_llama(), LoraConfig(**LLAMA_LORA, rank_pattern={"v_proj": 4}))
    m.save_adapter(str(tmp_path / "ad"))
    files = sorted(os.listdir(tmp_path / "ad"))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert cfg["rank_pattern"] == {"v_proj": 4}
    assert cfg["task_type"] == "CAUSAL_LM"
    for key in ("use_rslora", "fan_in_fan_out", "alpha_pattern", "modules_to_save"):
        assert key in cfg, key
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 8)
    assert sd["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (4, 64)
    assert len(sd) == 8


def test_tinytune_trained_adapter_runs_in_peft(tmp_path):
    base = tiny_llama()
    m = AdapterWrapper.from_config(copy.deepcopy(base), LoraConfig(**LLAMA_LORA))
    train_steps(m, steps=2)
    out = logits(m)
    m.save_pretrained(str(tmp_path / "ad"))
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    torch.testing.assert_close(logits(pm), out, rtol=1e-5, atol=1e-5)


def test_peft_trained_adapter_runs_in_tinytune(tmp_path):
    base = tiny_llama()
    cfg = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}, use_rslora=True,
        modules_to_save=["lm_head"], init_lora_weights=False, task_type="CAUSAL_LM",
    )
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    perturb([p for n, p in pm.named_parameters() if p.requires_grad], scale=0.05)
    pm.eval()
    want = logits(pm)
    pm.save_pretrained(str(tmp_path / "ad"))
    m = AdapterWrapper.from_pretrained(base, str(tmp_path / "ad"))
    torch.testing.assert_close(logits(m), want, rtol=1e-5, atol=1e-5)
    # train a step here, save, and PEFT reads it back
    train_steps(m, steps=1)
    out = logits(m)
    m.save_adapter(str(tmp_path / "again"))
    pm2 = peft.PeftModel.from_pretrained(m.unload(), str(tmp_path / "again")).eval()
    torch.testing.assert_close(logits(pm2), out, rtol=1e-5, atol=1e-5)


def test_peft_ia3_adapter_runs_in_tinytune_and_back(tmp_path):
    base = tiny_llama()
    cfg = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                         init_ia3_weights=False, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    want = logits(pm)
    pm.save_pretrained(str(tmp_path / "ad"))
    m = AdapterWrapper(base)
    m.load_adapter(str(tmp_path / "ad"), adapter_name="ia3")
    assert m.active_adapters == ["ia3"]
    torch.testing.assert_close(logits(m), want, rtol=1e-5, atol=1e-5)
    m.save_adapter(str(tmp_path / "back"), adapter_name="ia3")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(m.unload()), str(tmp_path / "back")).eval()
    torch.testing.assert_close(logits(pm2), want, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_user_passing_fan_in_fan_out_round_trips_with_peft(tmp_path):
    base = tiny_gpt2()
    m = AdapterWrapper.from_config(
        copy.deepcopy(base),
        LoraConfig(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8, fan_in_fan_out=True),
    )
    perturb(m.adapter_parameters(), scale=0.3)
    out = logits(m)
    m.save_adapter(str(tmp_path / "g"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "g")).eval()
    torch.testing.assert_close(logits(pm), out, rtol=1e-5, atol=1e-5)
    gen = m.generate(input_ids=IDS[:1, :3], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, pm.generate(input_ids=IDS[:1, :3], max_new_tokens=4, do_sample=False))
    m.merge_adapters()
    torch.testing.assert_close(logits(m), out, rtol=1e-4, atol=1e-4)


def test_load_activates_like_add_adapter(tmp_path):
    m = AdapterWrapper.from_config(tiny_llama(), LoraConfig(**LLAMA_LORA))
    m.save_adapter(str(tmp_path / "ad"))
    m.load_adapter(str(tmp_path / "ad"), adapter_name="b")
    assert m.active_adapters == ["default", "b"]
    m.load_adapter(str(tmp_path / "ad"), adapter_name="c", activate=False)
    assert m.active_adapters == ["default", "b"]
    assert set(m.adapters) == {"default", "b", "c"}


def test_load_into_different_same_shaped_base_model(tmp_path):
    m = AdapterWrapper.from_config(tiny_llama(0), LoraConfig(**LLAMA_LORA))
    perturb(m.adapter_parameters(), scale=0.4)
    m.save_adapter(str(tmp_path / "ad"))
    other = tiny_llama(1)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(other), str(tmp_path / "ad")).eval()
    n = AdapterWrapper.from_pretrained(other, str(tmp_path / "ad"))
    torch.testing.assert_close(logits(n), logits(pm), rtol=1e-5, atol=1e-5)


def test_mixed_and_custom_adapter_saves_and_loads_with_class_passed_back(tmp_path):
    class Gain(AdapterLayer):
        def __init__(self, init=1.0):
            super().__init__()
            self.init = init

        def get_config(self):
            return {"init": self.init}

        def reset_params(self, prefix, target):
            self.g = nn.Parameter(torch.full((target.out_features,), float(self.init)))

        def post_forward(self, module, args, kwargs, output):
            return output * self.g

    m = AdapterWrapper(tiny_llama())
    m.add_adapter("mix")
    m.add_adapter_layer("mix", "model.layers.0.self_attn.q_proj", functools.partial(LinearLoraLayer, r=2))
    m.add_adapter_layer("mix", "model.layers.0.mlp.down_proj", functools.partial(LinearIA3Layer, is_feedforward=True))
    m.add_adapter_layer("mix", "model.layers.1.self_attn.o_proj", functools.partial(Gain, init=0.5))
    perturb(m.adapter_parameters(), scale=0.2)
    out = logits(m)
    m.save_adapter(str(tmp_path / "mix"), adapter_name="mix")
    base = m.unload()
    n = AdapterWrapper(base)
    with pytest.raises(tinytune.AdapterFileError, match="Gain"):
        n.load_adapter(str(tmp_path / "mix"))
    assert list(n.adapters) == [] and n_hooks(base) == 0
    n.load_adapter(str(tmp_path / "mix"), custom_layers=[Gain])
    torch.testing.assert_close(logits(n), out, rtol=1e-6, atol=1e-6)
    assert len(n.adapters["default"]) == 3
    # PEFT refuses such a file loudly instead of loading part of it
    with pytest.raises(Exception):
        peft.PeftModel.from_pretrained(copy.deepcopy(n.unload()), str(tmp_path / "mix"))


# --------------------------------------------------------------------------------------
# issue 3: safety and failure
# --------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    m = AdapterWrapper.from_config(tiny_llama(), LoraConfig(**LLAMA_LORA))
    perturb(m.adapter_parameters(), scale=0.3)
    m.save_adapter(str(tmp_path / "ad"))
    return tmp_path / "ad"


def fresh_wrapper():
    m = AdapterWrapper(tiny_llama())
    m.add_adapter_from_config(IA3Config(target_modules=["k_proj"]), "keep")
    return m


def test_missing_directory_or_file(saved, tmp_path):
    m = fresh_wrapper()
    before = wrapper_state(m)
    with pytest.raises(FileNotFoundError):
        m.load_adapter(str(tmp_path / "nowhere"))
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        m.load_adapter(str(saved))
    assert "adapter_model.safetensors" in str(e.value)
    assert_same_wrapper_state(before, wrapper_state(m))


def test_legacy_bin_is_refused_or_read_safely(saved):
    sd = {}
    from safetensors.torch import load_file
    sd = load_file(str(saved / "adapter_model.safetensors"))
    (saved / "adapter_model.safetensors").unlink()
    torch.save(sd, str(saved / "adapter_model.bin"))
    m = fresh_wrapper()
    before = wrapper_state(m)
    try:
        m.load_adapter(str(saved))
    except tinytune.AdapterFileError as e:
        assert "safetensors" in str(e) and "weights_only" in str(e)
        assert_same_wrapper_state(before, wrapper_state(m))
    else:
        assert "default" in m.adapters


def test_pickle_never_runs(tmp_path):
    """A malicious .bin with a pickle payload must not execute on load."""
    d = tmp_path / "evil"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    m = fresh_wrapper()
    with pytest.raises(tinytune.AdapterFileError):
        m.load_adapter(str(d))
    assert not marker.exists()


def test_truncated_or_corrupt_file_names_file(saved):
    m = fresh_wrapper()
    before = wrapper_state(m)
    f = saved / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(tinytune.AdapterFileError) as e:
        m.load_adapter(str(saved))
    assert "adapter_model.safetensors" in str(e.value)
    f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(tinytune.AdapterFileError):
        m.load_adapter(str(saved))
    (saved / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8')
    with pytest.raises(tinytune.AdapterFileError) as e:
        m.load_adapter(str(saved))
    assert "adapter_config.json" in str(e.value)
    assert_same_wrapper_state(before, wrapper_state(m))


def test_key_naming_no_module(saved):
    from safetensors.torch import load_file, save_file

    f = saved / "adapter_model.safetensors"
    sd = load_file(str(f))
    sd["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)
    sd["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 8)
    save_file(sd, str(f), metadata={"format": "pt"})
    m = fresh_wrapper()
    before = wrapper_state(m)
    with pytest.raises(tinytune.AdapterFileError) as e:
        m.load_adapter(str(saved))
    msg = str(e.value)
    assert "model.layers.7.self_attn.q_proj" in msg and "adapter_model.safetensors" in msg
    assert_same_wrapper_state(before, wrapper_state(m))


def test_shape_that_does_not_fit_names_file_key_and_both_shapes(saved):
    big = transformers.LlamaConfig(
        hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )
    m = AdapterWrapper(transformers.LlamaForCausalLM(big))
    m.add_adapter_from_config(IA3Config(target_modules=["k_proj"]), "keep")
    before = wrapper_state(m)
    with pytest.raises(tinytune.AdapterFileError) as e:
        m.load_adapter(str(saved))
    msg = str(e.value)
    assert "adapter_model.safetensors" in msg
    assert "lora_A.weight" in msg or "lora_B.weight" in msg
    assert "64" in msg and "96" in msg
    assert_same_wrapper_state(before, wrapper_state(m))


def test_failed_save_into_existing_adapter_dir_never_loads_as_different_adapter(saved, monkeypatch):
    """Crash mid-save (the second rename fails): the directory must not load as a mix."""
    m = AdapterWrapper.from_pretrained(tiny_llama(), str(saved))
    old_out = logits(m)
    m2 = AdapterWrapper.from_config(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=4))
    perturb(m2.adapter_parameters(), seed=5, scale=0.3)
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError):
        m2.save_adapter(str(saved))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not [p for p in os.listdir(saved) if p.endswith(".tmp")]
    fresh = AdapterWrapper(tiny_llama())
    try:
        fresh.load_adapter(str(saved))
    except tinytune.AdapterFileError:
        return  # refused: fine
    # loaded: it must be exactly one of the two adapters
    out = logits(fresh)
    assert torch.allclose(out, old_out) or torch.allclose(out, logits(m2))


def test_save_into_a_path_that_is_a_file(tmp_path):
    m = AdapterWrapper.from_config(tiny_llama(), LoraConfig(**LLAMA_LORA))
    f = tmp_path / "afile"
    f.write_text("hello")
    with pytest.raises(tinytune.AdapterFileError):
        m.save_adapter(str(f))
    assert f.read_text() == "hello"



# --------------------------------------------------------------------------------------
# defects found by these tests (each fixed in its own commit)
# --------------------------------------------------------------------------------------
def test_multihead_attention_out_proj_is_refused_not_silently_ignored():
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj, so a hook
    there never runs: unmerged it did nothing, merged it changed the outputs."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True, dropout=0.0)
    layer.eval()
    before = snapshot(layer)
    m = AdapterWrapper(layer)
    m.add_adapter()
    for make in (
        lambda: m.add_adapter_from_config(LoraConfig(target_modules=["out_proj"]), "x"),
        lambda: m.add_adapter_from_config(IA3Config(target_modules=["out_proj"]), "x"),
        lambda: m.add_adapter_layer("default", "self_attn.out_proj", LinearLoraLayer),
        lambda: m.add_adapter_layer("default", "self_attn.out_proj", LinearIA3Layer),
    ):
        with pytest.raises(tinytune.UnsupportedModuleError, match="MultiheadAttention"):
            make()
    assert list(m.adapters) == ["default"] and len(m.adapters["default"]) == 0
    assert n_hooks(layer) == 0 and same_state(m.model, before)
    # "all-linear" adapts the layers hooks can reach, and merging agrees with unmerged
    m.add_adapter_from_config(LoraConfig(target_modules="all-linear", init_lora_weights=False), "all")
    assert sorted(p for p, _ in m.adapters["all"].items()) == ["linear1"]  # linear2 is the output layer
    x = torch.randn(2, 5, 16)
    out = m(x)
    m.merge_adapters()
    torch.testing.assert_close(m(x), out, rtol=1e-5, atol=1e-5)


def test_peft_style_add_adapter_with_a_config_is_refused(wrapped):
    """PEFT's add_adapter(adapter_name, peft_config): here the config would land in
    `activate` and silently create an empty adapter."""
    before = wrapper_state(wrapped)
    with pytest.raises(TypeError, match="add_adapter_from_config"):
        wrapped.add_adapter("b", LoraConfig(target_modules=["k_proj"]))
    assert "b" not in wrapped.adapters
    assert_same_wrapper_state(before, wrapper_state(wrapped))


def test_peft_config_passed_to_tinytune_says_which_config_to_use():
    base = tiny_llama()
    with pytest.raises(TypeError) as e:
        AdapterWrapper.from_config(base, peft.LoraConfig(**LLAMA_LORA))
    assert "from tinytune import LoraConfig" in str(e.value)
    assert "peft" in str(e.value)
    assert n_hooks(base) == 0 and all(p.requires_grad for p in base.parameters())


def test_config_without_targets_says_what_to_pass():
    """PEFT fills in per-architecture targets (issue 14: tinytune too, for the
    architectures PEFT knows); for other models tinytune must say to name them."""
    w = AdapterWrapper.from_config(tiny_llama(), LoraConfig(r=8, task_type="CAUSAL_LM"))
    assert sorted({p.rsplit(".", 1)[-1] for p in w.adapters["default"].layer_names}) == ["q_proj", "v_proj"]
    with pytest.raises(tinytune.InvalidConfigError, match="target_modules, e.g."):
        AdapterWrapper.from_config(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=8, task_type="CAUSAL_LM"))


@pytest.mark.parametrize("bad", [None, 3])
def test_adapter_names_of_wrong_type_get_a_helpful_error(wrapped, bad):
    before = wrapper_state(wrapped)
    calls = [wrapped.set_active_adapters, wrapped.set_adapter]
    if bad is not None:  # None means "the default set" for these two
        calls += [wrapped.merge_adapters, wrapped.unmerge_adapters]
    for call in calls:
        with pytest.raises(TypeError, match="list of names"):
            call(bad)
    assert_same_wrapper_state(before, wrapper_state(wrapped))


def test_from_pretrained_accepts_peft_is_trainable(saved):
    """PeftModel.from_pretrained(base, path, is_trainable=True) is how PEFT users resume
    training; the same call must work here, and is_trainable=False must freeze."""
    m = AdapterWrapper.from_pretrained(tiny_llama(), str(saved), is_trainable=True)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [
        n for n, _ in m.named_parameters() if ".lora_" in n
    ]
    losses = train_steps(m, steps=2)
    assert losses[1] != losses[0]
    frozen = AdapterWrapper.from_pretrained(tiny_llama(), str(saved), is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    torch.testing.assert_close(logits(frozen), logits(AdapterWrapper.from_pretrained(tiny_llama(), str(saved))))


class ForgetsToReturn(AdapterLayer):
    def reset_params(self, prefix, target):
        self.s = nn.Parameter(torch.full((target.out_features,), 2.0))

    def post_forward(self, module, args, kwargs, output):
        output = output * self.s  # noqa: F841 - the bug under test: no `return output`


class PreForgetsToReturn(AdapterLayer):
    def pre_forward(self, module, args, kwargs):
        args = (args[0] * 2,)  # noqa: F841 - no `return args, kwargs`


def test_custom_layer_returning_none_is_an_error_not_a_silent_no_op():
    """torch reads a hook's None as "unchanged", so a post_forward that forgets to
    return silently disabled the adapter."""
    x = torch.randn(2, 4)
    for cls, others in [(ForgetsToReturn, []), (ForgetsToReturn, [LinearIA3Layer]), (PreForgetsToReturn, [])]:
        m = AdapterWrapper(nn.Sequential(nn.Linear(4, 4)))
        m.add_adapter()
        m.add_adapter_layer("default", "0", cls)
        for i, other in enumerate(others):
            m.add_adapter(f"o{i}")
            m.add_adapter_layer(f"o{i}", "0", other)
        with pytest.raises(TypeError, match=r"returned None.*add `return"):
            m(x)


@pytest.mark.parametrize(
    "field, value",
    [("lora_alpha", None), ("lora_alpha", "16"), ("rank_pattern", [4]), ("alpha_pattern", {"q_proj": None})],
)
def test_bad_lora_numbers_in_a_config_file_name_the_file(saved, field, value):
    """A hand-edited or corrupt adapter_config.json gave a bare TypeError/AttributeError
    from deep inside the layer code."""
    cfg_file = saved / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[field] = value
    cfg_file.write_text(json.dumps(cfg))
    m = fresh_wrapper()
    before = wrapper_state(m)
    with pytest.raises(tinytune.InvalidConfigError, match=rf"adapter_config.json: {field}.* must be"):
        m.load_adapter(str(saved), check_fingerprint=False)
    assert_same_wrapper_state(before, wrapper_state(m))
    with pytest.raises(tinytune.InvalidConfigError, match="lora_alpha must be a number"):
        LinearLoraLayer(r=4, lora_alpha=None)


class ClippedLora(LinearLoraLayer):
    """A LoRA that changes only post_forward: its settings are LinearLoraLayer's."""

    def post_forward(self, module, args, kwargs, output):
        return super().post_forward(module, args, kwargs, output).clamp(-0.5, 0.5)


class ClippedLoraWithArg(LinearLoraLayer):
    def __init__(self, clip=0.5, **kwargs):
        super().__init__(**kwargs)
        self.clip = clip


def test_subclass_of_builtin_lora_saves_without_writing_get_config(tmp_path):
    """Subclassing LinearLoraLayer was refused at save time (no get_config) although
    its constructor is LinearLoraLayer's, whose settings tinytune knows."""
    m = AdapterWrapper(tiny_llama())
    m.add_adapter()
    m.add_adapter_layer("default", "model.layers.0.self_attn.q_proj", functools.partial(ClippedLora, r=4, lora_alpha=2))
    m.add_adapter_layer("default", "model.layers.1.mlp.up_proj", LinearIA3Layer)
    perturb(m.adapter_parameters(), scale=0.5)
    out = logits(m)
    m.save_adapter(str(tmp_path / "c"))
    n = AdapterWrapper(tiny_llama())
    n.load_adapter(str(tmp_path / "c"), custom_layers=[ClippedLora])
    layer = n.adapters["default"]["model.layers.0.self_attn.q_proj"]
    assert type(layer) is ClippedLora and (layer.r, layer.lora_alpha) == (4, 2)
    torch.testing.assert_close(logits(n), out, rtol=1e-6, atol=1e-6)
    # a subclass with its own constructor arguments still needs get_config()
    m.add_adapter("own")
    m.add_adapter_layer("own", "model.layers.0.self_attn.q_proj", functools.partial(ClippedLoraWithArg, clip=0.1))
    with pytest.raises(tinytune.AdapterFileError, match="get_config"):
        m.save_adapter(str(tmp_path / "own"), adapter_name="own")
    assert not (tmp_path / "own").exists()


def test_looking_up_a_missing_layer_names_the_dotted_path():
    m = AdapterWrapper.from_config(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(KeyError) as e:
        m.adapters["default"]["model.layers.0.self_attn.k_proj"]
    msg = str(e.value)
    assert "'model.layers.0.self_attn.k_proj'" in msg and "model/layers" not in msg
    assert "model.layers.0.self_attn.q_proj" in msg


def test_wrapping_a_model_that_another_wrapper_hooks_is_refused():
    """A notebook cell run twice wrapped the same base again: both adapters applied,
    and the second wrapper's unload() did not give back the original model."""
    torch.manual_seed(0)
    base = tiny_llama()
    ref = logits(base)
    cfg = LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    first = AdapterWrapper.from_config(base, cfg)
    hooks = n_hooks(base)
    with pytest.raises(tinytune.AdapterStateError, match="unload"):
        AdapterWrapper.from_config(base, cfg)
    assert n_hooks(base) == hooks
    assert not any(p.requires_grad for p in base.parameters())  # still first's, frozen
    other = AdapterWrapper.from_config(tiny_llama(1), cfg)
    before = wrapper_state(other)
    with pytest.raises(tinytune.AdapterStateError, match="unload"):
        other.swap_base_model(base)
    assert_same_wrapper_state(before, wrapper_state(other))
    other.swap_base_model(other.model)  # its own hooks are fine
    back = first.unload()
    assert all(p.requires_grad for p in back.parameters())
    again = AdapterWrapper.from_config(back, cfg)  # fine once unloaded
    again.unload()
    torch.testing.assert_close(logits(back), ref, rtol=0, atol=0)


def test_peft_adapters_whose_init_rewrites_the_base_are_refused_with_the_conversion(tmp_path):
    """PEFT redoes PiSSA/OLoRA init on load, rewriting the base weights; tinytune loaded
    such a file silently on the original base and gave different logits than PEFT."""
    base = tiny_llama()
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights="pissa")
    )
    pm.save_pretrained(str(tmp_path / "init"))  # as PEFT's docs say: keep the initial adapter
    perturb([p for n, p in pm.named_parameters() if "lora_" in n], scale=0.05)  # "training"
    pm.save_pretrained(str(tmp_path / "pissa"))
    m = fresh_wrapper()
    before = wrapper_state(m)
    with pytest.raises(tinytune.InvalidConfigError, match="path_initial_model_for_weight_conversion"):
        m.load_adapter(str(tmp_path / "pissa"))
    assert_same_wrapper_state(before, wrapper_state(m))
    # the conversion the message names gives a plain LoRA that matches PEFT on the original base
    pm.save_pretrained(str(tmp_path / "plain"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    want = logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "plain")).eval())
    w = AdapterWrapper.from_pretrained(base, str(tmp_path / "plain"))
    torch.testing.assert_close(logits(w), want, rtol=1e-5, atol=1e-5)


def test_merging_into_tied_weights_is_refused_instead_of_changing_the_other_module():
    """GPT-2 ties lm_head.weight to transformer.wte.weight. Merging a modules_to_save
    copy of lm_head wrote into the shared tensor, changing the embeddings too: merged
    logits differed from unmerged by ~40 (PEFT unties on merge_and_unload)."""
    g = tiny_gpt2()
    assert g.lm_head.weight is g.transformer.wte.weight
    m = AdapterWrapper.from_config(g, LoraConfig(target_modules=["c_attn"], modules_to_save=["lm_head"]))
    perturb(m.adapters["default"]["lm_head"].module_copy.parameters(), scale=0.5)
    out = logits(m)
    before = wrapper_state(m)
    for call in (m.merge_adapters, m.merge_and_unload):
        with pytest.raises(tinytune.MergeNotSupportedError, match="tied to 'transformer.wte.weight'"):
            call()
        assert_same_wrapper_state(before, wrapper_state(m))
    torch.testing.assert_close(logits(m), out, rtol=0, atol=0)
    # LoRA on the tied embedding: same refusal
    e = AdapterWrapper.from_config(tiny_gpt2(), LoraConfig(target_modules=["wte"], init_lora_weights=False))
    with pytest.raises(tinytune.MergeNotSupportedError, match="tied"):
        e.merge_adapters()
    # untied as the message says, the merge agrees with the unmerged model
    u = tiny_gpt2()
    u.lm_head.weight = nn.Parameter(u.lm_head.weight.detach().clone())
    m = AdapterWrapper.from_config(u, LoraConfig(target_modules=["c_attn"], modules_to_save=["lm_head"]))
    perturb(m.adapters["default"]["lm_head"].module_copy.parameters(), scale=0.5)
    out = logits(m)
    torch.testing.assert_close(logits(m.merge_and_unload()), out, rtol=1e-5, atol=1e-5)
