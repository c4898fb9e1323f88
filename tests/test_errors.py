"""Bad input: a specific exception that says what to do, and nothing changed."""

from __future__ import annotations

import os
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
    InvalidConfigError,
    LinearIA3Layer,
    LinearLoraLayer,
    LoraConfig,
    TinytuneError,
)

from conftest import hook_count, randomize, small


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


# --------------------------------------------------------------------------------------
# wrong types anywhere in the public API (issue 17): a TinytuneError naming what to pass
# --------------------------------------------------------------------------------------
class _WithGenerate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)

    def generate(self, x):
        return self(x)


def _generate(adapter_names):
    w = AdapterWrapper.from_config(_WithGenerate(), LoraConfig(target_modules=["lin"]))
    return w.generate(torch.zeros(2, 4), adapter_names=adapter_names)


def _wrong_type_calls(tmp):
    from tinytune import io as tio, training

    peft = pytest.importorskip("peft")
    lora = LoraConfig(target_modules=["v_proj"])
    return [
        ("AdapterWrapper(5)", lambda w: AdapterWrapper(5), "nn.Module"),
        ("AdapterWrapper(wrapper)", lambda w: AdapterWrapper(w), "not an AdapterWrapper"),
        ("from_config model None", lambda w: AdapterWrapper.from_config(None, lora), "nn.Module"),
        ("get_peft_model model str", lambda w: tinytune.get_peft_model("gpt2", lora), "nn.Module"),
        ("set_active_adapters(None)", lambda w: w.set_active_adapters(None), "list of names"),
        ("set_adapter(3)", lambda w: w.set_adapter(3), "list of names"),
        ("merge_adapters(1.5)", lambda w: w.merge_adapters(1.5), "list of names"),
        ("unmerge_adapters(0)", lambda w: w.unmerge_adapters(0), "list of names"),
        ("forward adapter_names='a'", lambda w: w(torch.zeros(2, 3, dtype=torch.long), adapter_names="default"),
         r"\['default'\] \* batch_size"),
        ("forward adapter_names=5", lambda w: w(torch.zeros(2, 3, dtype=torch.long), adapter_names=5), "one adapter name per batch row"),
        ("generate adapter_names='a'", lambda w: _generate("default"), "one adapter name per batch row"),
        ("config dict", lambda w: w.add_adapter_from_config({"target_modules": ["v_proj"]}, "x"), r"LoraConfig\(\*\*fields\)"),
        ("config PEFT LoraConfig", lambda w: w.add_adapter_from_config(peft.LoraConfig(target_modules=["v_proj"]), "x"),
         "from tinytune import LoraConfig"),
        ("get_peft_model PEFT config", lambda w: tinytune.get_peft_model(nn.Linear(2, 2), peft.LoraConfig()), "PEFT's LoraConfig"),
        ("add_adapter_from_config activate str", lambda w: w.add_adapter_from_config(lora, "x", "yes"), "True or False"),
        ("autocast_adapter_dtype None", lambda w: w.add_adapter_from_config(lora, "x", autocast_adapter_dtype=None), "True or False"),
        ("add_adapter activate config", lambda w: w.add_adapter("x", lora), "add_adapter_from_config"),
        ("layer factory returns None", lambda w: w.add_adapter_layer("default", "head", lambda: None), "must return the layer"),
        ("layer is an int", lambda w: w.add_adapter_layer("default", "head", 3), "AdapterLayer"),
        ("swap_base_model(None)", lambda w: w.swap_base_model(None), "nn.Module"),
        ("load_state_dict(None)", lambda w: w.load_state_dict(None), "dict of tensors"),
        ("load_state_dict strict str", lambda w: w.load_state_dict(w.state_dict(), strict="no"), "True or False"),
        ("load_adapter(None)", lambda w: w.load_adapter(None, "x"), "directory path"),
        ("load_adapter subfolder int", lambda w: w.load_adapter(tmp, "x", subfolder=3), "subfolder"),
        ("load_adapter activate tensor", lambda w: w.load_adapter(tmp, "x", torch.ones(2)), "True or False"),
        ("load_adapter is_trainable None", lambda w: w.load_adapter(tmp, "x", is_trainable=None), "True or False"),
        ("load_adapter check_fingerprint str", lambda w: w.load_adapter(tmp, "x", check_fingerprint="no"), "True or False"),
        ("from_pretrained path int", lambda w: AdapterWrapper.from_pretrained(nn.Linear(2, 2), 5), "directory path"),
        ("save_adapter(None)", lambda w: w.save_adapter(None), "directory path"),
        ("save_adapter([])", lambda w: w.save_adapter([]), "directory path"),
        ("save_pretrained(None)", lambda w: w.save_pretrained(None), "save_directory"),
        ("save_pretrained selected_adapters 3", lambda w: w.save_pretrained(tmp + "/sp", selected_adapters=3), "list of names"),
        ("save_pretrained is_main_process tensor", lambda w: w.save_pretrained(tmp + "/sp", is_main_process=torch.ones(2)), "True or False"),
        ("save_pretrained save_embedding_layers tensor", lambda w: w.save_pretrained(tmp + "/sp", save_embedding_layers=torch.ones(2)), "save_embedding_layers"),
        ("hotswap_adapter(None)", lambda w: w.hotswap_adapter(None, "default"), "directory path"),
        # io takes data since issue 18 (an Adapter and the base model, never the wrapper)
        ("io.save_adapter given a model as the adapter", lambda w: tio.save_adapter(w.model, w.model, tmp + "/x"), "AdapterWrapper"),
        ("io.save_adapter model None", lambda w: tio.save_adapter(w.adapters["default"], None, tmp + "/x"), "nn.Module"),
        ("io.read_adapter on None", lambda w: tio.read_adapter(None, tmp, "x"), "AdapterWrapper"),
        ("training.load_adapter_weights(None)", lambda w: training.load_adapter_weights(w, None), "directory path"),
        ("training.save_all_adapters(3)", lambda w: training.save_all_adapters(w, 3), "directory path"),
        ("training.saved_adapter_dirs(None)", lambda w: training.saved_adapter_dirs(None), "directory path"),
        ("training.save_adapter_distributed rank tensor", lambda w: training.save_adapter_distributed(w, tmp + "/d", rank=torch.ones(2)), "rank"),
        ("training.parallelize_adapters(None)", lambda w: training.parallelize_adapters(None), "AdapterWrapper"),
        ("add_weighted_adapter adapters None", lambda w: w.add_weighted_adapter(None, [1.0], "x"), "adapters must be"),
        ("add_weighted_adapter svd_clamp 5", lambda w: w.add_weighted_adapter(["default"], [1.0], "x", svd_clamp=5), r"\[0, 1\]"),
        ("add_weighted_adapter svd_full_matrices None", lambda w: w.add_weighted_adapter(["default"], [1.0], "x", svd_full_matrices=None), "True or False"),
        ("add_weighted_adapter svd_driver 3", lambda w: w.add_weighted_adapter(["default"], [1.0], "x", svd_driver=3), "gesvd"),
        ("add_weighted_adapter svd_driver on CPU", lambda w: w.add_weighted_adapter(["default", "default2"], [1.0, 1.0], "x", svd_driver="gesvd"), "CUDA"),
        ("LoraConfig task_type list", lambda w: LoraConfig(target_modules=["q_proj"], task_type=["CAUSAL_LM"]), "TaskType"),
        ("IA3Config task_type dict", lambda w: IA3Config(target_modules=["q_proj"], task_type={}), "TaskType"),
        ("LoraConfig mimic_layers int", lambda w: LoraConfig(target_modules=["q_proj"], mimic_layers=3), "mimic_layers"),
        ("LoraConfig layers_pattern tensor", lambda w: LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=torch.ones(2)), "layers_pattern"),
    ]


def _wrong_type_ids():
    return [c[0] for c in _wrong_type_calls("/nonexistent")]


@pytest.mark.parametrize("index", range(len(_wrong_type_ids())), ids=_wrong_type_ids())
def test_wrong_type_raises_tinytune_error_saying_what_to_pass(wrapped, tmp_path, index):
    wrapped.add_adapter_from_config(LoraConfig(target_modules=["q_proj"], r=2), "default2")
    wrapped.save_adapter(tmp_path / "saved", "default")
    _, call, fragment = _wrong_type_calls(str(tmp_path / "saved"))[index]
    before = fingerprint(wrapped)
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(tinytune.TinytuneError, match=fragment) as info:
        call(wrapped)
    assert isinstance(info.value, (TypeError, ValueError, RuntimeError))
    assert_same(before, fingerprint(wrapped))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == files


def lora(targets=("lin0", "lin1"), **kw) -> LoraConfig:
    return LoraConfig(target_modules=list(targets), init_lora_weights=False, **kw)


X = torch.randn(4, 10, generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------------------
# 6. every error a user can provoke is a TinytuneError with the fitting builtin base
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, builtin, match",
    [
        (lambda: LoraConfig(target_modules="lin(0"), ValueError, "regular expression"),
        (lambda: LoraConfig(target_modules=["lin0"], rank_pattern={"lin[": 2}), ValueError, "rank_pattern"),
        (lambda: LoraConfig(target_modules=["lin0"], alpha_pattern={"(": 2}), ValueError, "alpha_pattern"),
        (lambda: IA3Config(target_modules="lin.*", feedforward_modules="lin)"), ValueError, "feedforward"),
        (lambda: LoraConfig(target_modules=["lin0", 5]), TypeError, "strings"),
        (lambda: LoraConfig(target_modules=[None]), TypeError, "strings"),
        (lambda: IA3Config(target_modules=["lin0"], feedforward_modules=[1]), TypeError, "strings"),
        (lambda: LoraConfig(target_modules=["lin0"], r=10**30), ValueError, "smaller rank"),
        # 7. bad values
        (lambda: LoraConfig(target_modules=["lin0"], lora_alpha=float("nan")), ValueError, "finite"),
        (lambda: LoraConfig(target_modules=["lin0"], lora_alpha=float("inf")), ValueError, "finite"),
        (lambda: LoraConfig(target_modules=["lin0"], alpha_pattern={"lin0": float("nan")}), ValueError, "finite"),
        (lambda: LoraConfig(target_modules=["lin0"], use_rslora="no"), TypeError, "True or False"),
        (lambda: LoraConfig(target_modules=["lin0"], modules_to_save=5), TypeError, "modules_to_save"),
        (lambda: tinytune.LinearLoraLayer(r=4, lora_alpha=float("inf")), ValueError, "finite"),
        (lambda: tinytune.LinearLoraLayer(r=4, use_rslora="yes"), TypeError, "True or False"),
    ],
)
def test_config_errors(make, builtin, match):
    with pytest.raises(TinytuneError, match=match) as info:
        make()
    assert isinstance(info.value, builtin)


@pytest.mark.parametrize("name", ["keys", "items", "training", "forward", "update", "pop"])
def test_adapter_names_of_module_dict_attributes_are_refused(name):
    w = AdapterWrapper(small())
    with pytest.raises(InvalidConfigError, match="pick another name"):
        w.add_adapter(name)
    with pytest.raises(InvalidConfigError):
        w.add_adapter_from_config(lora(), name)
    assert list(w.adapters) == [] and w.active_adapters == []


def test_empty_mixed_batch_is_an_empty_plain_call():
    w = AdapterWrapper(small())
    w.add_adapter_from_config(lora(), "a")
    out = w(X[:0], adapter_names=[])
    assert out.shape == (0, 4)
    assert out.shape == w(X[:0]).shape


def test_deeply_nested_config_json_is_refused(tmp_path):
    w = AdapterWrapper(small())
    w.add_adapter_from_config(lora(), "a")
    w.save_adapter(str(tmp_path), "a")
    config = tmp_path / "adapter_config.json"
    for depth in (100, 100_000):
        config.write_text('{"x": ' + "[" * depth + "]" * depth + "}")
        with pytest.raises(tinytune.AdapterFileError, match="deeper"):
            w.load_adapter(str(tmp_path), "b", check_fingerprint=False)
    assert list(w.adapters) == ["a"]


def test_saving_under_a_file_or_onto_a_dangling_symlink(tmp_path):
    w = AdapterWrapper(small())
    w.add_adapter_from_config(lora(), "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(tinytune.AdapterSaveError, match="part of the path is a file") as info:
        w.save_adapter(str(tmp_path / "file" / "sub"), "a")
    assert isinstance(info.value, OSError) and isinstance(info.value, tinytune.AdapterFileError)
    os.symlink(tmp_path / "missing", tmp_path / "link")
    with pytest.raises(OSError, match="symlink to a missing target"):
        w.save_adapter(str(tmp_path / "link"), "a")
    assert sorted(os.listdir(tmp_path)) == ["file", "link"]


def test_absurd_rank_fails_before_allocating_or_with_a_hint():
    w = AdapterWrapper(small())
    with pytest.raises(InvalidConfigError, match="smaller rank"):
        w.add_adapter_from_config(LoraConfig(target_modules=["lin0"], r=2**31), "a")
    with pytest.raises(InvalidConfigError, match="smaller rank"):
        w.add_adapter_layer(w.add_adapter("b") or "b", "lin0",
                            lambda: tinytune.LinearLoraLayer(r=2**40))
    # A rank that passes the check but cannot be allocated: an error with a hint.
    with pytest.raises(InvalidConfigError, match="Out of memory.*r=") as info:
        w.add_adapter_from_config(LoraConfig(target_modules=["lin0"], r=2**31 - 1), "c")
    assert isinstance(info.value, ValueError)
    assert "c" not in w.adapters and hook_count(w.model) == 0


def test_custom_layers_of_the_wrong_type_are_refused_for_any_file(tmp_path):
    w = AdapterWrapper(small())
    w.add_adapter_from_config(lora(), "a")
    w.save_adapter(str(tmp_path), "a")  # a plain PEFT file: custom_layers unused
    with pytest.raises(tinytune.ConfigTypeError, match="custom_layers") as info:
        w.load_adapter(str(tmp_path), "b", custom_layers=5)
    assert isinstance(info.value, TypeError)
    assert list(w.adapters) == ["a"]
