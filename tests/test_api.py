"""The public API as users write it (issue 2): names, a Llama training script, activation,
composition, parameters, and custom ``AdapterLayer``s, on tiny ``transformers`` models built
from configs (nothing is downloaded)."""

from __future__ import annotations

import copy
import functools
import importlib

import pytest
import torch
from torch import nn

import tinytune
from tinytune import (
    AdapterConfig,
    AdapterLayer,
    AdapterWrapper,
    IA3Config,
    LinearIA3Layer,
    LinearLoraLayer,
    LoraConfig,
)

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
    base = tiny_llama(**TOKENS)
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
    assert hook_count(merged) == 0
    torch.testing.assert_close(logits(merged), out, rtol=1e-4, atol=1e-4)
    assert all(p.requires_grad for p in merged.parameters())  # flags come back


def test_llama_generate_through_wrapper_matches_merged_model():
    base = tiny_llama(**TOKENS)
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
    base = tiny_llama(**TOKENS)
    model = AdapterWrapper.from_config(base, LoraConfig(**LLAMA_LORA))
    assert model.config is base.config
    out = model(input_ids=IDS, labels=IDS)
    assert out.loss is not None and out.logits.shape == (2, 6, 128)
    out2 = model(IDS)  # positional input, as users call models
    torch.testing.assert_close(out2.logits, out.logits)


def test_add_adapter_keeps_others_active_and_add_adapter_layer_accepts_three_forms():
    base = tiny_llama(**TOKENS)
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
    base = tiny_llama(**TOKENS)
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
    assert hook_count(base) == 0
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
    model = AdapterWrapper(tiny_llama(**TOKENS))
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
    base = tiny_llama(**TOKENS)
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
    assert hook_count(back) == 0 and same_state(back, before)
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


