"""``AdapterWrapper`` on small torch models: construction, layer formulas, mixing,
activation, deletion, training, unloading, swapping and pass-through."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tinytune
from tinytune import (
    AdapterConfig,
    AdapterLayer,
    AdapterWrapper,
    Conv2dLoraLayer,
    EmbeddingLoraLayer,
    IA3Config,
    LinearIA3Layer,
    LinearLoraLayer,
    LoraConfig,
)

from conftest import MLP, ConvNet, Tower, assert_state_equal, hook_count, randomize, snapshot


def test_public_api_names():
    for name in [
        "AdapterWrapper",
        "AdapterLayer",
        "AdapterConfig",
        "LoraConfig",
        "IA3Config",
        "LinearLoraLayer",
        "EmbeddingLoraLayer",
        "LinearIA3Layer",
    ]:
        assert hasattr(tinytune, name), name
    assert issubclass(LoraConfig, AdapterConfig) and issubclass(IA3Config, AdapterConfig)
    assert issubclass(LinearLoraLayer, AdapterLayer)


def test_kernels_import_as_part_of_tinytune():
    import tinytune.kernels as k

    assert k.__name__ == "tinytune.kernels"


# --------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------
def test_from_config_targets_and_shapes(mlp):
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules="lin0", r=4))
    assert wrapper.active_adapters == ["default"]
    layer = wrapper.adapters["default"]["lin0"]
    assert isinstance(layer, LinearLoraLayer)
    assert isinstance(layer.lora_A, nn.Linear) and isinstance(layer.lora_B, nn.Linear)
    assert layer.lora_A.out_features == 4 and layer.lora_A.in_features == 10
    assert layer.lora_B.in_features == 4 and layer.lora_B.out_features == 300
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.scaling == 8 / 4
    assert "lin1" not in wrapper.adapters["default"]


def test_rslora_and_alpha_scaling(mlp):
    wrapper = AdapterWrapper.from_config(
        mlp, LoraConfig(target_modules=["lin0"], r=16, lora_alpha=32, use_rslora=True)
    )
    assert wrapper.adapters["default"]["lin0"].scaling == pytest.approx(32 / math.sqrt(16))
    assert LinearLoraLayer(r=16, lora_alpha=32).scaling == 2.0


def test_lora_init_matches_paper(mlp):
    torch.manual_seed(0)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules="lin0", r=8))
    a = wrapper.adapters["default"]["lin0"].lora_A.weight
    bound = 1 / math.sqrt(10)  # kaiming_uniform(a=sqrt(5)) on fan_in=10
    assert a.abs().max() <= bound and a.abs().max() > bound / 2


def test_target_modules_regex_is_full_match(tower):
    wrapper = AdapterWrapper.from_config(tower, LoraConfig(target_modules=r"layers\.\d+\.q_proj"))
    assert wrapper.adapters["default"].layer_names == ["layers.0.q_proj", "layers.1.q_proj"]
    # 'q_proj' alone as a regex matches no full name
    with pytest.raises(tinytune.NoMatchingModulesError, match="matches no module"):
        AdapterWrapper(Tower()).add_adapter_from_config(LoraConfig(target_modules="q_proj"))


def test_target_modules_list_is_name_or_suffix(tower):
    wrapper = AdapterWrapper.from_config(tower, LoraConfig(target_modules=["q_proj", "head"]))
    assert sorted(wrapper.adapters["default"].layer_names) == [
        "head",
        "layers.0.q_proj",
        "layers.1.q_proj",
    ]
    # suffix on a component boundary only: 'proj' does not match 'q_proj'
    with pytest.raises(tinytune.NoMatchingModulesError):
        AdapterWrapper(Tower()).add_adapter_from_config(LoraConfig(target_modules=["proj"]))


def test_rank_and_alpha_pattern(tower):
    cfg = LoraConfig(
        target_modules=["q_proj", "v_proj"],
        r=4,
        rank_pattern={"layers.1.q_proj": 2, "v_proj": 6},
        alpha_pattern={"v_proj": 12},
    )
    wrapper = AdapterWrapper.from_config(tower, cfg)
    a = wrapper.adapters["default"]
    assert a["layers.0.q_proj"].r == 4 and a["layers.1.q_proj"].r == 2
    assert a["layers.0.v_proj"].r == 6 and a["layers.0.v_proj"].scaling == 2.0


def test_all_linear_skips_output_layer(tower):
    wrapper = AdapterWrapper.from_config(tower, LoraConfig(target_modules="all-linear"))
    names = wrapper.adapters["default"].layer_names
    assert "head" not in names and "layers.0.down_proj" in names and "embed" not in names


def test_add_adapter_layer_instance_class_and_partial(mlp):
    wrapper = AdapterWrapper(mlp)
    wrapper.add_adapter(adapter_name="default")
    wrapper.add_adapter_layer("default", "lin0", LinearLoraLayer(r=4))
    wrapper.add_adapter_layer("default", "lin1", partial(LinearLoraLayer, r=16))
    a = wrapper.adapters["default"]
    assert a["lin0"].lora_A.out_features == 4 and a["lin1"].lora_A.out_features == 16
    wrapper.add_adapter("ia3")
    wrapper.add_adapter_layer("ia3", "lin1", LinearIA3Layer)
    assert isinstance(wrapper.adapters["ia3"]["lin1"], LinearIA3Layer)


def test_nested_dotted_paths(tower):
    wrapper = AdapterWrapper(tower)
    wrapper.add_adapter()
    wrapper.add_adapter_layer("default", "layers.1.up_proj", LinearLoraLayer)
    assert wrapper.adapters["default"]["layers.1.up_proj"].lora_A.in_features == 16


def test_add_adapter_activate_flag(mlp):
    wrapper = AdapterWrapper(mlp)
    wrapper.add_adapter("a")
    wrapper.add_adapter("b")
    wrapper.add_adapter("c", activate=False)
    assert wrapper.active_adapters == ["a", "b"]


def test_adapter_and_wrapper_parameters(mlp):
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules=["lin0", "lin1"], r=2))
    names = [n for n, _ in wrapper.named_adapter_parameters()]
    assert names == [
        "default.lin0.lora_A.weight",
        "default.lin0.lora_B.weight",
        "default.lin1.lora_A.weight",
        "default.lin1.lora_B.weight",
    ]
    per_adapter = [n for n, _ in wrapper.adapters["default"].named_adapter_parameters()]
    assert per_adapter == [n.split(".", 1)[1] for n in names]
    assert len(list(wrapper.adapter_parameters())) == 4
    assert len(list(wrapper.adapters["default"].adapter_parameters())) == 4


# --------------------------------------------------------------------------------------
# unintrusive
# --------------------------------------------------------------------------------------
def _module_tree(model):
    return [(n, type(m), id(m)) for n, m in model.named_modules()]


def test_adapting_changes_no_module_and_unload_restores_everything(tower):
    ids = torch.randint(0, 32, (3, 5))
    before_tree = _module_tree(tower)
    before_state = snapshot(tower)
    before_out = tower(ids)
    before_params = {n: id(p) for n, p in tower.named_parameters()}
    wrapper = AdapterWrapper.from_config(
        tower,
        LoraConfig(target_modules=["q_proj", "v_proj", "embed"], init_lora_weights=False),
    )
    wrapper.add_adapter_from_config(
        IA3Config(target_modules=["up_proj", "down_proj"], feedforward_modules=["down_proj"]), "ia3"
    )
    wrapper.add_adapter_from_config(LoraConfig(target_modules=["up_proj"], modules_to_save=["head"]), "m")
    randomize(wrapper)
    assert _module_tree(tower) == before_tree
    assert not torch.equal(wrapper(ids), before_out)
    wrapper.merge_adapters(["default", "ia3"])
    base = wrapper.unload()
    assert base is tower
    assert hook_count(base) == 0
    assert _module_tree(base) == before_tree
    assert {n: id(p) for n, p in base.named_parameters()} == before_params
    assert_state_equal(base, before_state)
    assert torch.equal(base(ids), before_out)
    assert all(p.requires_grad for p in base.parameters())


def test_unloaded_wrapper_says_how_to_reattach(mlp):
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules="lin0"))
    wrapper.unload()
    with pytest.raises(tinytune.AdapterStateError, match="swap_base_model"):
        wrapper(torch.randn(2, 10))


def test_new_adapter_is_a_no_op(mlp):
    x = torch.randn(4, 10)
    y = mlp(x)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules=["lin0", "lin1"]))
    wrapper.add_adapter_from_config(IA3Config(target_modules=["lin0", "lin1"]), "ia3")
    assert torch.equal(wrapper(x), y)


# --------------------------------------------------------------------------------------
# numerics of each layer type against a hand-written formula
# --------------------------------------------------------------------------------------
def test_linear_lora_formula(mlp):
    x = torch.randn(2, 7, 10)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules="lin0", r=3, lora_alpha=6))
    randomize(wrapper)
    layer = wrapper.adapters["default"]["lin0"]
    seen = {}
    h = mlp.lin0.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    wrapper(x)
    h.remove()
    expected = F.linear(x, mlp.lin0.weight, mlp.lin0.bias) + 2.0 * (
        x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    )
    torch.testing.assert_close(seen["out"], expected)


def test_ia3_formulas(mlp):
    x = torch.randn(5, 10)
    wrapper = AdapterWrapper(mlp)
    wrapper.add_adapter()
    wrapper.add_adapter_layer("default", "lin0", LinearIA3Layer(is_feedforward=True))
    wrapper.add_adapter_layer("default", "lin1", LinearIA3Layer(is_feedforward=False))
    randomize(wrapper)
    a = wrapper.adapters["default"]
    assert a["lin0"].ia3_l.shape == (1, 10) and a["lin1"].ia3_l.shape == (1, 1)
    h = torch.relu(F.linear(x * a["lin0"].ia3_l.view(-1), mlp.lin0.weight, mlp.lin0.bias))
    expected = F.linear(h, mlp.lin1.weight, mlp.lin1.bias) * a["lin1"].ia3_l.view(-1)
    torch.testing.assert_close(wrapper(x), expected)


def test_embedding_lora(tower):
    ids = torch.randint(0, 32, (2, 6))
    wrapper = AdapterWrapper(tower)
    wrapper.add_adapter()
    layer = wrapper.add_adapter_layer("default", "embed", partial(EmbeddingLoraLayer, r=4))
    assert isinstance(layer.lora_A, nn.Embedding) and layer.lora_A.weight.shape == (32, 4)
    assert torch.count_nonzero(layer.lora_A.weight) == 0  # PEFT: A zeros, B normal
    randomize(wrapper)
    seen = {}
    h = tower.embed.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    wrapper(ids)
    h.remove()
    expected = tower.embed.weight[ids] + layer.scaling * (
        layer.lora_A.weight[ids] @ layer.lora_B.weight.T
    )
    torch.testing.assert_close(seen["out"], expected)


def test_conv2d_lora_merges():
    torch.manual_seed(0)
    net = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    wrapper = AdapterWrapper.from_config(net, LoraConfig(target_modules=["conv"], r=2))
    assert isinstance(wrapper.adapters["default"]["conv"], Conv2dLoraLayer)
    randomize(wrapper)
    y = wrapper(x)
    assert not torch.allclose(y, net.fc(net.pool(torch.relu(F.conv2d(x, net.conv.weight, net.conv.bias, padding=1))).flatten(1)))
    wrapper.merge_adapters()
    torch.testing.assert_close(wrapper(x), y, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# mixing and composition
# --------------------------------------------------------------------------------------
def test_several_active_adapters_compose_as_nested_wrappers(mlp):
    """First active adapter innermost: LoRA on the IA3-scaled input, IA3 on top."""
    x = torch.randn(3, 10)
    wrapper = AdapterWrapper(mlp)
    wrapper.add_adapter("lora")
    lora = wrapper.add_adapter_layer("lora", "lin0", LinearLoraLayer(r=2, init_lora_weights=False))
    wrapper.add_adapter("ff")
    ff = wrapper.add_adapter_layer("ff", "lin0", LinearIA3Layer(is_feedforward=True))
    randomize(wrapper)

    def lora_fn(inp):
        return lora.scaling * inp @ lora.lora_A.weight.T @ lora.lora_B.weight.T

    def head(h):
        return mlp.lin1(torch.relu(h))

    l = ff.ia3_l.view(-1)
    base = F.linear(x * l, mlp.lin0.weight, mlp.lin0.bias)
    wrapper.set_active_adapters(["lora", "ff"])  # ff outermost: LoRA sees the scaled input
    torch.testing.assert_close(wrapper(x), head(base + lora_fn(x * l)))
    wrapper.set_active_adapters(["ff", "lora"])  # LoRA outermost: it sees the raw input
    torch.testing.assert_close(wrapper(x), head(base + lora_fn(x)))
    for order in (["lora", "ff"], ["ff", "lora"]):
        wrapper.set_active_adapters(order)
        y = wrapper(x)
        wrapper.merge_adapters()
        torch.testing.assert_close(wrapper(x), y, atol=1e-5, rtol=1e-5)
        wrapper.unmerge_adapters()


def test_two_loras_on_one_module_add_up(mlp):
    x = torch.randn(3, 10)
    wrapper = AdapterWrapper(mlp)
    for name in ("a", "b"):
        wrapper.add_adapter(name)
        wrapper.add_adapter_layer(name, "lin0", partial(LinearLoraLayer, r=2 if name == "a" else 5))
    randomize(wrapper)
    y_ab = wrapper(x)
    wrapper.set_active_adapters("a")
    y_a = wrapper(x)
    wrapper.set_active_adapters([])
    y0 = wrapper(x)
    assert torch.equal(y0, mlp(x))
    assert not torch.allclose(y_ab, y_a)
    wrapper.set_active_adapters(["b", "a"])
    torch.testing.assert_close(wrapper(x), y_ab)  # LoRA updates commute


def test_lora_and_ia3_in_one_adapter_with_mixed_ranks(tower):
    ids = torch.randint(0, 32, (2, 4))
    wrapper = AdapterWrapper(tower)
    wrapper.add_adapter()
    wrapper.add_adapter_layer("default", "layers.0.q_proj", partial(LinearLoraLayer, r=4))
    wrapper.add_adapter_layer("default", "layers.1.q_proj", partial(LinearLoraLayer, r=16))
    wrapper.add_adapter_layer("default", "layers.0.up_proj", LinearIA3Layer)
    wrapper.add_adapter_layer("default", "embed", EmbeddingLoraLayer)
    randomize(wrapper)
    y = wrapper(ids)
    wrapper.merge_adapters()
    torch.testing.assert_close(wrapper(ids), y, atol=1e-5, rtol=1e-5)


class ShiftLayer(AdapterLayer):
    """A custom adapter: adds a learned bias to the input and doubles the output."""

    def reset_params(self, prefix, target):
        self.shift = nn.Parameter(torch.zeros(target.in_features))

    def pre_forward(self, module, args, kwargs):
        return (args[0] + self.shift, *args[1:]), kwargs

    def post_forward(self, module, args, kwargs, output):
        return output * 2


class OutputOnlyLayer(AdapterLayer):
    def post_forward(self, module, args, kwargs, output):
        return output + 1


def test_custom_adapter_layers(mlp):
    x = torch.randn(2, 10)
    wrapper = AdapterWrapper(mlp)
    wrapper.add_adapter(adapter_name="default")
    wrapper.add_adapter_layer("default", "lin0", ShiftLayer)
    wrapper.add_adapter_layer("default", "lin1", OutputOnlyLayer())
    with torch.no_grad():
        wrapper.adapters["default"]["lin0"].shift.fill_(0.5)
    h = torch.relu(2 * F.linear(x + 0.5, mlp.lin0.weight, mlp.lin0.bias))
    torch.testing.assert_close(wrapper(x), F.linear(h, mlp.lin1.weight, mlp.lin1.bias) + 1)
    assert [n for n, _ in wrapper.named_adapter_parameters()] == ["default.lin0.shift"]
    with pytest.raises(tinytune.MergeNotSupportedError, match="merge"):
        wrapper.merge_adapters()
    assert wrapper.merged_adapters == []
    torch.testing.assert_close(wrapper(x), F.linear(h, mlp.lin1.weight, mlp.lin1.bias) + 1)


class ScaleWeightLayer(AdapterLayer):
    """A custom layer with merge only: unmerge is handled by tinytune."""

    def post_forward(self, module, args, kwargs, output):
        return F.linear(args[0], module.weight * 3, module.bias)

    def merge(self, module):
        with torch.no_grad():
            module.weight.mul_(3)


def test_custom_layer_merge_and_exact_unmerge(mlp):
    x = torch.randn(2, 10)
    state = snapshot(mlp)
    wrapper = AdapterWrapper(mlp)
    wrapper.add_adapter()
    wrapper.add_adapter_layer("default", "lin0", ScaleWeightLayer)
    y = wrapper(x)
    wrapper.merge_adapters()
    torch.testing.assert_close(wrapper(x), y)
    wrapper.unmerge_adapters()
    assert_state_equal(mlp, state)


# --------------------------------------------------------------------------------------
# activation, deletion
# --------------------------------------------------------------------------------------
def test_switching_adapters(mlp):
    x = torch.randn(3, 10)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules="lin0", init_lora_weights=False), "a")
    wrapper.add_adapter_from_config(LoraConfig(target_modules="lin1", init_lora_weights=False), "b")
    y_ab = wrapper(x)
    wrapper.set_active_adapters("a")
    y_a = wrapper(x)
    wrapper.set_active_adapters(["b"])
    y_b = wrapper(x)
    wrapper.set_active_adapters([])
    assert wrapper.active_adapters == []
    assert torch.equal(wrapper(x), mlp(x)) and hook_count(mlp) == 0
    assert not torch.allclose(y_a, y_b) and not torch.allclose(y_a, y_ab)
    wrapper.set_active_adapters(["a", "b"])
    torch.testing.assert_close(wrapper(x), y_ab)


def test_delete_adapter(mlp):
    x = torch.randn(3, 10)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules="lin0", init_lora_weights=False), "a")
    wrapper.add_adapter_from_config(LoraConfig(target_modules="lin0", init_lora_weights=False), "b")
    wrapper.set_active_adapters("b")
    y_b = wrapper(x)
    wrapper.set_active_adapters(["a", "b"])
    wrapper.delete_adapter("a")
    assert list(wrapper.adapters) == ["b"] and wrapper.active_adapters == ["b"]
    torch.testing.assert_close(wrapper(x), y_b)
    wrapper.delete_adapter("b")
    assert hook_count(mlp) == 0 and torch.equal(wrapper(x), mlp(x))


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------
def test_training_touches_only_active_adapter_params(tower):
    ids = torch.randint(0, 32, (4, 5))
    state = snapshot(tower)
    wrapper = AdapterWrapper.from_config(
        tower, LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["head"]), "train_me"
    )
    wrapper.add_adapter_from_config(LoraConfig(target_modules=["q_proj"]), "idle", activate=False)
    trainable = {n for n, p in wrapper.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapters.") for n in trainable)
    assert any(".mimic." in n for n in trainable)
    idle = {n: p.detach().clone() for n, p in wrapper.adapters["idle"].named_adapter_parameters()}
    trained = {n: p.detach().clone() for n, p in wrapper.adapters["train_me"].named_adapter_parameters()}
    wrapper.train()
    opt = torch.optim.SGD([p for p in wrapper.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        wrapper(ids).pow(2).mean().backward()
        opt.step()
    assert_state_equal(tower, state)
    for n, p in wrapper.adapters["idle"].named_adapter_parameters():
        assert torch.equal(p, idle[n]) and p.grad is None
    changed = [n for n, p in wrapper.adapters["train_me"].named_adapter_parameters() if not torch.equal(p, trained[n])]
    assert any("lora_B" in n for n in changed) and any(".mimic." in n for n in changed)


def test_dropout_only_in_train_mode(mlp):
    x = torch.randn(64, 10)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules="lin1", lora_dropout=0.5, init_lora_weights=False))
    mlp.drop.p = 0.0
    wrapper.eval()
    assert torch.equal(wrapper(x), wrapper(x))
    wrapper.train()
    torch.manual_seed(0)
    a = wrapper(x)
    torch.manual_seed(1)
    assert not torch.equal(a, wrapper(x))


def test_state_dict_round_trip(mlp):
    x = torch.randn(3, 10)
    twin = copy.deepcopy(mlp)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    wrapper.add_adapter_from_config(IA3Config(target_modules=["lin0"], init_ia3_weights=False), "ia3")
    y = wrapper(x)
    sd = wrapper.state_dict()
    assert any(k.startswith("adapters.default.") for k in sd) and any(k.startswith("adapters.ia3.") for k in sd)
    torch.manual_seed(123)
    other = AdapterWrapper.from_config(twin, LoraConfig(target_modules=["lin0", "lin1"]))
    other.add_adapter_from_config(IA3Config(target_modules=["lin0"]), "ia3")
    assert not torch.allclose(other(x), y)
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), y)


def test_modules_to_save_leaves_original_until_merge(mlp):
    x = torch.randn(3, 10)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules="lin0", modules_to_save=["lin1"]))
    original = mlp.lin1.weight.detach().clone()
    with torch.no_grad():
        wrapper.adapters["default"]["lin1"].module_copy.weight.add_(1.0)
    y = wrapper(x)
    assert torch.equal(mlp.lin1.weight, original)
    wrapper.merge_adapters()
    assert torch.equal(mlp.lin1.weight, original + 1.0)
    torch.testing.assert_close(wrapper(x), y)
    wrapper.unmerge_adapters()
    assert torch.equal(mlp.lin1.weight, original)


# --------------------------------------------------------------------------------------
# swapping the base model
# --------------------------------------------------------------------------------------
def test_swap_base_model(mlp):
    x = torch.randn(3, 10)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    layer = wrapper.adapters["default"]["lin0"]
    torch.manual_seed(5)
    new = MLP().eval()
    state = snapshot(new)
    old = wrapper.swap_base_model(new)
    assert old is mlp and hook_count(mlp) == 0 and all(p.requires_grad for p in mlp.parameters())
    expected = new.lin1(torch.relu(F.linear(x, new.lin0.weight, new.lin0.bias) + layer.scaling * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T))
    hooked_out = wrapper(x)
    torch.testing.assert_close(hooked_out, expected)
    assert not any(p.requires_grad for p in new.parameters())
    base = wrapper.unload()
    assert base is new
    assert_state_equal(new, state)


def test_swap_to_a_different_structure_fails_and_changes_nothing(mlp):
    x = torch.randn(3, 10)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    y = wrapper(x)
    bad = nn.Sequential(nn.Linear(10, 300))
    with pytest.raises(tinytune.LayerNotFoundError, match="lin0"):
        wrapper.swap_base_model(bad)
    wrong_shape = MLP()
    wrong_shape.lin0 = nn.Linear(10, 299)
    with pytest.raises(tinytune.UnsupportedModuleError, match="shapes"):
        wrapper.swap_base_model(wrong_shape)
    assert wrapper.model is mlp and torch.equal(wrapper(x), y)
    assert hook_count(bad) == 0 and hook_count(wrong_shape) == 0


def test_swap_after_unload_reattaches(mlp):
    x = torch.randn(3, 10)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    y = wrapper(x)
    base = wrapper.unload()
    assert wrapper.swap_base_model(base) is None
    torch.testing.assert_close(wrapper(x), y)


# --------------------------------------------------------------------------------------
# pass-through
# --------------------------------------------------------------------------------------
def test_forward_passes_kwargs_and_attributes_through():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.config = {"name": "kw"}

        def forward(self, x, *, scale=1.0):
            return self.lin(x) * scale

        def generate(self, x, steps=1):
            return [self.lin(x)] * steps

    model = KW()
    wrapper = AdapterWrapper.from_config(model, LoraConfig(target_modules="lin"))
    x = torch.randn(2, 4)
    torch.testing.assert_close(wrapper(x, scale=2.0), model.lin(x) * 2)
    assert wrapper.config == {"name": "kw"}
    assert len(wrapper.generate(x, steps=3)) == 3


def test_disable_adapter_context(mlp):
    x = torch.randn(3, 10)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules="lin0", init_lora_weights=False))
    y = wrapper(x)
    with wrapper.disable_adapter():
        assert torch.equal(wrapper(x), F.linear(torch.relu(F.linear(x, mlp.lin0.weight, mlp.lin0.bias)), mlp.lin1.weight, mlp.lin1.bias))
        assert hook_count(mlp) == 0
    assert wrapper.active_adapters == ["default"] and torch.equal(wrapper(x), y)
    wrapper.merge_adapters()
    with pytest.raises(tinytune.AdapterStateError, match="unmerge"):
        with wrapper.disable_adapter():
            pass


def test_trainable_parameter_counts(mlp):
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules="lin0", r=2))
    trainable, total = wrapper.get_nb_trainable_parameters()
    assert trainable == 2 * 10 + 300 * 2
    assert total == trainable + sum(p.numel() for p in mlp.parameters())


def test_modules_to_save_children_are_not_targeted(tower):
    wrapper = AdapterWrapper.from_config(
        tower, LoraConfig(target_modules=["q_proj", "up_proj"], modules_to_save=["layers.1"])
    )
    names = wrapper.adapters["default"].layer_names
    assert "layers.1" in names and "layers.0.q_proj" in names
    assert not any(n.startswith("layers.1.") for n in names)
