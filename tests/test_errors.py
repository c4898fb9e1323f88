"""Bad input: a specific exception that says what to do, and nothing changed."""

from __future__ import annotations

import pathlib
from functools import partial

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

from conftest import hook_count, randomize


def fingerprint(wrapper: AdapterWrapper):
    """Everything a failed call must leave as it was."""
    model = wrapper.model
    return (
        list(wrapper.adapters),
        {n: a.layer_names for n, a in wrapper.adapters.items()},
        wrapper.active_adapters,
        wrapper.merged_adapters,
        {k: v.clone() for k, v in wrapper.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
        hook_count(model),
        {n: p.requires_grad for n, p in wrapper.named_parameters()},
    )


def assert_same(a, b):
    assert a[:4] == b[:4]
    assert a[4].keys() == b[4].keys()
    assert all(torch.equal(a[4][k], b[4][k]) for k in a[4])
    assert a[5:] == b[5:]


@pytest.fixture
def wrapped(tower):
    wrapper = AdapterWrapper.from_config(tower, LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    wrapper.add_adapter_from_config(IA3Config(target_modules=["up_proj"]), "ia3")
    randomize(wrapper)
    return wrapper


def _calls():
    """(description, call, exception type, message fragment) for every bad input."""
    return [
        ("unknown layer path suggests close names",
         lambda w: w.add_adapter_layer("default", "layers.0.q_prj", LinearLoraLayer),
         tinytune.LayerNotFoundError, "layers.0.q_proj"),
        ("layer path from another model",
         lambda w: w.add_adapter_layer("default", "model.layers.0.q_proj", LinearLoraLayer),
         tinytune.LayerNotFoundError, "named_modules"),
        ("config matching nothing",
         lambda w: w.add_adapter_from_config(LoraConfig(target_modules=["k_proj"]), "x"),
         tinytune.NoMatchingModulesError, "matches no module"),
        ("modules_to_save matching nothing",
         lambda w: w.add_adapter_from_config(LoraConfig(target_modules=["v_proj"], modules_to_save=["nope"]), "x"),
         tinytune.NoMatchingModulesError, "nope"),
        ("LoRA config on an unsupported type names the type",
         lambda w: w.add_adapter_from_config(LoraConfig(target_modules=r"layers\.0"), "x"),
         tinytune.UnsupportedModuleError, "Block"),
        ("IA3 config on an embedding",
         lambda w: w.add_adapter_from_config(IA3Config(target_modules=["embed"]), "x"),
         tinytune.UnsupportedModuleError, "Embedding"),
        ("linear LoRA layer on an embedding",
         lambda w: w.add_adapter_layer("default", "embed", LinearLoraLayer),
         tinytune.UnsupportedModuleError, "Embedding"),
        ("embedding LoRA layer on a linear",
         lambda w: w.add_adapter_layer("default", "head", EmbeddingLoraLayer),
         tinytune.UnsupportedModuleError, "Linear"),
        ("IA3 layer on a container",
         lambda w: w.add_adapter_layer("default", "layers.1", LinearIA3Layer),
         tinytune.UnsupportedModuleError, "Block"),
        ("r <= 0 in a layer",
         lambda w: w.add_adapter_layer("default", "head", partial(LinearLoraLayer, r=0)),
         tinytune.InvalidConfigError, "positive"),
        ("duplicate adapter name (add_adapter)",
         lambda w: w.add_adapter("ia3"),
         tinytune.AdapterExistsError, "already exists"),
        ("duplicate adapter name (from config)",
         lambda w: w.add_adapter_from_config(LoraConfig(target_modules=["v_proj"]), "default"),
         tinytune.AdapterExistsError, "already exists"),
        ("adapting a layer twice in one adapter",
         lambda w: w.add_adapter_layer("default", "layers.0.q_proj", LinearLoraLayer),
         tinytune.LayerAlreadyAdaptedError, "already has a layer"),
        ("unknown adapter: add_adapter_layer",
         lambda w: w.add_adapter_layer("defualt", "head", LinearLoraLayer),
         tinytune.AdapterNotFoundError, "default"),
        ("unknown adapter: set_active_adapters",
         lambda w: w.set_active_adapters(["default", "nope"]),
         tinytune.AdapterNotFoundError, "nope"),
        ("unknown adapter: set_active_adapters str",
         lambda w: w.set_active_adapters("nope"),
         tinytune.AdapterNotFoundError, "existing adapters"),
        ("unknown adapter: merge",
         lambda w: w.merge_adapters(["default", "nope"]),
         tinytune.AdapterNotFoundError, "nope"),
        ("unknown adapter: unmerge",
         lambda w: w.unmerge_adapters(["nope"]),
         tinytune.AdapterNotFoundError, "nope"),
        ("unknown adapter: delete",
         lambda w: w.delete_adapter("nope"),
         tinytune.AdapterNotFoundError, "nope"),
        ("not an adapter layer",
         lambda w: w.add_adapter_layer("default", "head", nn.Linear(2, 2)),
         TypeError, "AdapterLayer"),
        ("repeated names in the active set",
         lambda w: w.set_active_adapters(["default", "default"]),
         tinytune.InvalidConfigError, "repeat"),
        ("reserved adapter name",
         lambda w: w.add_adapter("__base__"),
         tinytune.InvalidConfigError, "reserved"),
    ]


@pytest.mark.parametrize("desc, call, exc, fragment", _calls(), ids=[c[0] for c in _calls()])
def test_bad_input_raises_specific_error_and_changes_nothing(wrapped, desc, call, exc, fragment):
    ids = torch.randint(0, 32, (2, 3))
    before = fingerprint(wrapped)
    out = wrapped(ids)
    with pytest.raises(exc, match=fragment) as info:
        call(wrapped)
    assert isinstance(info.value, (tinytune.TinytuneError, TypeError))
    assert_same(before, fingerprint(wrapped))
    assert torch.equal(wrapped(ids), out)


def test_errors_are_builtin_subclasses_too():
    assert issubclass(tinytune.LayerNotFoundError, LookupError)
    assert issubclass(tinytune.AdapterNotFoundError, LookupError)
    assert issubclass(tinytune.InvalidConfigError, ValueError)
    assert issubclass(tinytune.UnsupportedModuleError, TypeError)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LoraConfig(target_modules=["a"], r=0),
        lambda: LoraConfig(target_modules=["a"], r=-3),
        lambda: LoraConfig(target_modules=["a"], rank_pattern={"a": 0}),
        lambda: LoraConfig(target_modules=["a"], lora_dropout=1.5),
        lambda: LoraConfig(target_modules=[]),
        lambda: LinearLoraLayer(r=0),
        lambda: EmbeddingLoraLayer(r=-1),
    ],
)
def test_invalid_configs(make):
    with pytest.raises(tinytune.InvalidConfigError):
        make()


def test_failed_from_config_restores_base_model(tower):
    flags = {n: p.requires_grad for n, p in tower.named_parameters()}
    with pytest.raises(tinytune.UnsupportedModuleError):
        AdapterWrapper.from_config(tower, LoraConfig(target_modules=["q_proj", "layers.0"]))
    assert hook_count(tower) == 0
    assert {n: p.requires_grad for n, p in tower.named_parameters()} == flags


def test_delete_or_add_to_merged_adapter_is_refused(wrapped):
    wrapped.merge_adapters(["default"])
    before = fingerprint(wrapped)
    with pytest.raises(tinytune.AdapterStateError, match="unmerge"):
        wrapped.delete_adapter("default")
    with pytest.raises(tinytune.AdapterStateError, match="unmerge"):
        wrapped.add_adapter_layer("default", "head", LinearLoraLayer)
    with pytest.raises(tinytune.AdapterStateError, match="unmerge"):
        wrapped.swap_base_model(wrapped.model)
    assert_same(before, fingerprint(wrapped))


def test_library_has_no_bare_asserts():
    root = pathlib.Path(tinytune.__file__).parent
    for path in root.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not line.strip().startswith("assert "), f"{path.name}:{n} uses assert"


def test_ia3_feedforward_modules_must_be_targets():
    with pytest.raises(tinytune.InvalidConfigError, match="down_proj"):
        IA3Config(target_modules=["up_proj"], feedforward_modules=["down_proj"])


def test_peft_style_config_arguments_are_accepted():
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], lora_dropout=0.05,
                     bias="none", task_type="CAUSAL_LM")
    assert cfg.task_type == "CAUSAL_LM"
    with pytest.raises(tinytune.InvalidConfigError, match="bias"):
        LoraConfig(target_modules=["q_proj"], bias="all")
