"""The prototype's contract: its README's usage and the way its own test suite calls the
API (module paths, exception types, attribute names, shapes) work unchanged.

The prototype's tests import from ``tinytune.lora``, ``tinytune.ia3`` and
``tinytune.wrapper``; catch ``KeyError`` for unknown adapters and ``AttributeError``
for unknown layers; read ``LinearIA3Layer().ia3_weight`` of shape ``(1, in_features)``;
configure trained copies with ``mimic_layers`` and recognise their parameters by
``"mimic."`` in the name; and call ``unmerge_adapter()``. See the README's section
"Coming from PEFT or the prototype" for the two prototype tests that rely on its bugs.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from tinytune.base import AdapterLayer, MimicLayer
from tinytune.ia3 import IA3Config, LinearIA3Layer
from tinytune.lora import EmbeddingLoraLayer, LinearLoraLayer, LoraConfig
from tinytune.wrapper import AdapterWrapper

from conftest import MLP


class EmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 300)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(300, 1)

    def forward(self, X):
        return self.lin1(self.drop(self.relu(self.emb(X)))).squeeze(-1)


CASES = [
    (MLP, lambda: LoraConfig(target_modules="lin0")),
    (MLP, lambda: LoraConfig(target_modules=["lin0", "lin1"])),
    (MLP, lambda: LoraConfig(target_modules=["lin0"], mimic_layers=["lin1"])),
    (EmbModel, lambda: LoraConfig(target_modules=["emb"], mimic_layers=["lin1"])),
    (MLP, lambda: IA3Config(target_modules=["lin0", "lin1"])),
    (MLP, lambda: IA3Config(target_modules=["lin0"], mimic_layers=["lin1"])),
]
IDS = [f"{m.__name__}-{i}" for i, (m, _) in enumerate(CASES)]


def data(model_cls):
    torch.manual_seed(0)
    X = torch.rand(9, 10) if model_cls is MLP else torch.randint(0, 10, (9, 1))
    return X, torch.rand(9, 1)


def fit(model, X, y, steps=10):
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # all parameters, as the prototype's tests
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), y).backward()
        opt.step()
    model.eval()


def is_trained(name: str, config) -> bool:
    """The prototype's tests' rule for which parameters an adapter trains."""
    prefix = "lora" if isinstance(config, LoraConfig) else "ia3"
    return prefix in name or "mimic." in name


@pytest.mark.parametrize("model_cls, make_config", CASES, ids=IDS)
def test_only_adapter_parameters_train_and_names_say_which(model_cls, make_config):
    config = make_config()
    X, y = data(model_cls)
    torch.manual_seed(0)
    model = AdapterWrapper.from_config(model_cls(), config).eval()
    base_out = model.model(X)
    torch.testing.assert_close(model(X), base_out)  # a new adapter is a no-op
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    fit(model, X, y)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    for name, old in before.items():
        if is_trained(name, config):
            assert after[name].requires_grad and not torch.allclose(old, after[name]), name
        else:
            assert not after[name].requires_grad and torch.equal(old, after[name]), name
    assert not torch.allclose(model(X), base_out)


@pytest.mark.parametrize("model_cls, make_config", CASES, ids=IDS)
def test_merge_unmerge_unload_and_merge_and_unload(model_cls, make_config):
    X, y = data(model_cls)
    torch.manual_seed(0)
    model = AdapterWrapper.from_config(model_cls(), make_config()).eval()
    base_out = model(X)
    fit(model, X, y)
    out = model(X)
    model.merge_adapters()
    torch.testing.assert_close(model(X), out)
    model.unmerge_adapter()  # the prototype's (and PEFT's) spelling
    torch.testing.assert_close(model(X), out)
    model.merge_adapters()
    torch.testing.assert_close(model.unload()(X), base_out)  # unload undoes the merge

    torch.manual_seed(0)
    model = AdapterWrapper.from_config(model_cls(), make_config()).eval()
    fit(model, X, y)
    out = model(X)
    torch.testing.assert_close(model.merge_and_unload()(X), out)


def test_swap_base_model_keeps_the_trained_adapters():
    X, y = data(MLP)
    torch.manual_seed(0)
    model0 = MLP().eval()
    model = AdapterWrapper.from_config(model0, LoraConfig(target_modules=["lin0"], mimic_layers=["lin1"])).eval()
    torch.manual_seed(1)
    model1 = MLP().eval()
    model.swap_base_model(model1)
    before = model.model(X)
    fit(model, X, y)
    assert not torch.allclose(model.model(X), before)
    trained = model.model(X)
    twin = MLP().eval()
    twin.load_state_dict(model.unload().state_dict())
    model.swap_base_model(twin)
    torch.testing.assert_close(model.model(X), trained)


def test_several_adapters_and_the_errors_the_prototype_raised():
    X, y = data(MLP)
    config = LoraConfig(target_modules=["lin0", "lin1"])
    model = AdapterWrapper.from_config(MLP().eval(), config, adapter_name="adapter-B")
    model.add_adapter_from_config(copy.copy(config), "adapter-A")
    assert model.active_adapters == ["adapter-B", "adapter-A"]
    model.set_active_adapters("adapter-A")
    out_a = model(X)
    b_before = {k: v.detach().clone() for k, v in model.adapters["adapter-B"].named_adapter_parameters()}
    fit(model, X, y)
    # Names inside one adapter are the module paths: nothing collides.
    assert set(b_before) == {"lin0.lora_A.weight", "lin0.lora_B.weight", "lin1.lora_A.weight", "lin1.lora_B.weight"}
    for k, v in model.adapters["adapter-B"].named_adapter_parameters():
        torch.testing.assert_close(v, b_before[k])
    assert not torch.allclose(model(X), out_a)
    model.delete_adapter("adapter-B")
    with pytest.raises(KeyError):
        model.delete_adapter("adapter-B")
    with pytest.raises(KeyError):
        model.add_adapter_layer("adapter-B", "lin0", LinearLoraLayer)
    with pytest.raises(AttributeError):
        model.add_adapter_layer("adapter-A", "lin7", LinearLoraLayer)
    with pytest.raises(KeyError):  # the prototype raised KeyError for a taken name too
        model.add_adapter("adapter-A")
    model.delete_adapter("adapter-A")


def test_readme_mixing_ranks_and_types():
    X, y = data(MLP)
    model = AdapterWrapper(MLP().eval())
    model.add_adapter(adapter_name="default")
    model.add_adapter_layer("default", "lin0", LinearLoraLayer(r=4))
    model.add_adapter_layer("default", "lin1", partial(LinearLoraLayer, r=16))
    lora = [m for m in model.modules() if isinstance(m, LinearLoraLayer)]
    assert [(l.lora_A.out_features, l.lora_B.in_features) for l in lora] == [(4, 4), (16, 16)]

    model = AdapterWrapper(MLP().eval())
    model.add_adapter()
    base = model(X)
    model.add_adapter_layer("default", "lin0", partial(LinearLoraLayer, r=4))
    model.add_adapter_layer("default", "lin1", LinearIA3Layer)
    torch.testing.assert_close(model(X), base)
    fit(model, X, y)
    assert not torch.allclose(model(X), base)
    (ia3,) = [m for m in model.modules() if isinstance(m, LinearIA3Layer)]
    # The prototype's IA³ layer scales the input: one scale per input feature.
    assert ia3.ia3_weight.shape == (1, 300) and ia3.ia3_weight is ia3.ia3_l
    out = model(X)
    model.merge_adapters()
    torch.testing.assert_close(model(X), out)


def test_directly_built_ia3_layer_scales_the_input():
    lin = nn.Linear(4, 3)
    model = AdapterWrapper(nn.Sequential(lin))
    model.add_adapter()
    layer = model.add_adapter_layer("default", "0", LinearIA3Layer())
    with torch.no_grad():
        layer.ia3_weight.copy_(torch.tensor([[2.0, 0.5, -1.0, 3.0]]))
    x = torch.randn(5, 4)
    want = nn.functional.linear(x * layer.ia3_weight, lin.weight, lin.bias)
    torch.testing.assert_close(model(x), want)
    # IA3Config keeps PEFT's placement: non-feed-forward targets scale the output.
    cfg_layer = AdapterWrapper.from_config(nn.Sequential(nn.Linear(4, 3)), IA3Config(target_modules=["0"]))
    assert cfg_layer.adapters["default"]["0"].ia3_weight.shape == (3, 1)


def test_custom_adapter_layer_and_embedding_lora():
    class Shift(AdapterLayer):
        def reset_params(self, prefix, target):
            self.shift = nn.Parameter(torch.zeros(target.in_features))

        def pre_forward(self, module, args, kwargs):
            return (args[0] + self.shift, *args[1:]), kwargs

    X, y = data(MLP)
    model = AdapterWrapper(MLP().eval())
    model.add_adapter(adapter_name="default")
    model.add_adapter_layer("default", "lin0", Shift)
    fit(model, X, y)
    assert model.adapters["default"]["lin0"].shift.abs().sum() > 0

    emb = AdapterWrapper.from_config(EmbModel().eval(), LoraConfig(target_modules="emb"))
    assert isinstance(emb.adapters["default"]["emb"], EmbeddingLoraLayer)
    mimic = AdapterWrapper.from_config(MLP(), LoraConfig(target_modules="lin0", mimic_layers=["lin1"]))
    assert isinstance(mimic.adapters["default"]["lin1"], MimicLayer)
    assert mimic.peft_config["default"].modules_to_save == ["lin1"]
