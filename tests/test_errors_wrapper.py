"""Bad input to the wrapper as users provoke it on a tiny Llama (issue 2, and the defects
these tests found): each raises a specific ``TinytuneError`` that says what to do, and
changes nothing."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import tinytune
from tinytune import (
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
    LLAMA_LORA,
    TOKENS,
    assert_same_wrapper_state,
    hook_count,
    logits,
    perturb,
    same_state,
    snapshot,
    tiny_gpt2,
    tiny_llama,
    wrapper_state,
)


# --------------------------------------------------------------------------------------
# issue 2: bad input
# --------------------------------------------------------------------------------------
@pytest.fixture
def wrapped():
    m = AdapterWrapper.from_config(tiny_llama(**TOKENS), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
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
    base = tiny_llama(**TOKENS)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(tinytune.NoMatchingModulesError):
        AdapterWrapper.from_config(base, LoraConfig(target_modules=["query"]))
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert hook_count(base) == 0


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
    assert hook_count(layer) == 0 and same_state(m.model, before)
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
    base = tiny_llama(**TOKENS)
    with pytest.raises(TypeError) as e:
        AdapterWrapper.from_config(base, peft.LoraConfig(**LLAMA_LORA))
    assert "from tinytune import LoraConfig" in str(e.value)
    assert "peft" in str(e.value)
    assert hook_count(base) == 0 and all(p.requires_grad for p in base.parameters())

def test_config_without_targets_says_what_to_pass():
    """PEFT fills in per-architecture targets (issue 14: tinytune too, for the
    architectures PEFT knows); for other models tinytune must say to name them."""
    w = AdapterWrapper.from_config(tiny_llama(**TOKENS), LoraConfig(r=8, task_type="CAUSAL_LM"))
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

def test_looking_up_a_missing_layer_names_the_dotted_path():
    m = AdapterWrapper.from_config(tiny_llama(**TOKENS), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(KeyError) as e:
        m.adapters["default"]["model.layers.0.self_attn.k_proj"]
    msg = str(e.value)
    assert "'model.layers.0.self_attn.k_proj'" in msg and "model/layers" not in msg
    assert "model.layers.0.self_attn.q_proj" in msg

def test_wrapping_a_model_that_another_wrapper_hooks_is_refused():
    """A notebook cell run twice wrapped the same base again: both adapters applied,
    and the second wrapper's unload() did not give back the original model."""
    torch.manual_seed(0)
    base = tiny_llama(**TOKENS)
    ref = logits(base)
    cfg = LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    first = AdapterWrapper.from_config(base, cfg)
    hooks = hook_count(base)
    with pytest.raises(tinytune.AdapterStateError, match="unload"):
        AdapterWrapper.from_config(base, cfg)
    assert hook_count(base) == hooks
    assert not any(p.requires_grad for p in base.parameters())  # still first's, frozen
    other = AdapterWrapper.from_config(tiny_llama(1, **TOKENS), cfg)
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

def test_merging_into_tied_weights_is_refused_instead_of_changing_the_other_module():
    """GPT-2 ties lm_head.weight to transformer.wte.weight. Merging a modules_to_save
    copy of lm_head wrote into the shared tensor, changing the embeddings too: merged
    logits differed from unmerged by ~40 (PEFT unties on merge_and_unload)."""
    g = tiny_gpt2(**TOKENS)
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
    e = AdapterWrapper.from_config(tiny_gpt2(**TOKENS), LoraConfig(target_modules=["wte"], init_lora_weights=False))
    with pytest.raises(tinytune.MergeNotSupportedError, match="tied"):
        e.merge_adapters()
    # untied as the message says, the merge agrees with the unmerged model
    u = tiny_gpt2(**TOKENS)
    u.lm_head.weight = nn.Parameter(u.lm_head.weight.detach().clone())
    m = AdapterWrapper.from_config(u, LoraConfig(target_modules=["c_attn"], modules_to_save=["lm_head"]))
    perturb(m.adapters["default"]["lm_head"].module_copy.parameters(), scale=0.5)
    out = logits(m)
    torch.testing.assert_close(logits(m.merge_and_unload()), out, rtol=1e-5, atol=1e-5)
