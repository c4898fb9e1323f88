"""Adapter files: round trips, the TINYTUNE extension, safe loading and atomic saving.

These tests need neither PEFT nor transformers; parity with PEFT is in
test_peft_parity.py and test_transformers_models.py.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tinytune.io as tio
from tinytune import (
    AdapterExistsError,
    AdapterFileError,
    AdapterFileNotFoundError,
    AdapterLayer,
    AdapterWrapper,
    EmbeddingLoraLayer,
    IA3Config,
    InvalidConfigError,
    LinearIA3Layer,
    LinearLoraLayer,
    LoraConfig,
    ModulesToSaveLayer,
)


class Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.q(x))))


class Tiny(nn.Module):
    def __init__(self, d: int = 8, vocab: int = 20) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, 5)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class ScaleShift(AdapterLayer):
    """A custom layer: ``y * scale + shift``, with a hyperparameter and a buffer."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        self.gain = gain

    def get_config(self):
        return {"gain": self.gain}

    def reset_params(self, prefix, target):
        out = target.out_features
        self.scale = nn.Parameter(torch.ones(out))
        self.register_buffer("shift", torch.zeros(out))

    def post_forward(self, module, args, kwargs, output):
        return output * self.scale * self.gain + self.shift


IDS = torch.tensor([[1, 4, 7, 2, 19], [0, 3, 3, 8, 11]])


def make(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny().eval()


def randomise(wrapper: AdapterWrapper, seed: int = 1) -> None:
    """Non-trivial adapter weights, so that a wrong load shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in wrapper.named_adapter_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
        for adapter in wrapper.adapters.values():
            for _, layer in adapter.items():
                for name, buf in layer.named_buffers():
                    buf.add_(torch.randn(buf.shape, generator=g))


def snapshot(wrapper: AdapterWrapper) -> dict:
    """Everything a failed load must leave unchanged."""
    model = wrapper.model
    return {
        "adapters": list(wrapper.adapters),
        "active": wrapper.active_adapters,
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": [
            (n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
        ],
        "out": wrapper(IDS).detach().clone(),
    }


def assert_unchanged(wrapper: AdapterWrapper, before: dict) -> None:
    after = snapshot(wrapper)
    assert after["adapters"] == before["adapters"]
    assert after["active"] == before["active"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for k in before["state"]:
        assert torch.equal(after["state"][k], before["state"][k]), k
    assert torch.equal(after["out"], before["out"])


def config_of(path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


# ------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(target_modules=["q", "down"], r=4, lora_alpha=16),
        LoraConfig(
            target_modules=["q", "up", "emb"],
            r=4,
            rank_pattern={"blocks.1.q": 2},
            alpha_pattern={"up": 3.0},
            use_rslora=True,
            modules_to_save=["head"],
        ),
        LoraConfig(target_modules=r"blocks\.\d\.(q|up)", r=3),
        IA3Config(target_modules=["q", "down"], feedforward_modules=["down"], modules_to_save=["head"]),
    ],
    ids=["lora", "lora-patterns-rslora-embedding-save", "lora-regex", "ia3"],
)
def test_config_adapter_round_trips(tmp_path, config):
    src = AdapterWrapper.from_config(make(), config)
    randomise(src)
    expected = src(IDS)
    src.save_adapter(tmp_path)
    saved = config_of(tmp_path)
    assert saved["peft_type"] == config.peft_type
    assert "tinytune" not in saved  # a plain PEFT file

    dst = AdapterWrapper(make())
    dst.load_adapter(tmp_path, "loaded")
    assert dst.active_adapters == ["loaded"]
    assert torch.allclose(dst(IDS), expected, atol=1e-6)
    assert dst.adapters["loaded"].config == config
    assert dst.adapters["loaded"].layer_names == src.adapters["default"].layer_names


def test_peft_key_names_and_layouts(tmp_path):
    w = AdapterWrapper.from_config(
        make(), LoraConfig(target_modules=["blocks.0.q", "emb"], r=2, modules_to_save=["head"])
    )
    randomise(w)
    w.save_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {
        "base_model.model.blocks.0.q.lora_A.weight",
        "base_model.model.blocks.0.q.lora_B.weight",
        "base_model.model.emb.lora_embedding_A",
        "base_model.model.emb.lora_embedding_B",
        "base_model.model.head.weight",
        "base_model.model.head.bias",
    }
    layer = w.adapters["default"]["emb"]
    # PEFT's embedding A is (r, num_embeddings): the transpose of our nn.Embedding weight.
    assert tensors["base_model.model.emb.lora_embedding_A"].shape == (2, 20)
    assert torch.equal(tensors["base_model.model.emb.lora_embedding_A"], layer.lora_A.weight.t())
    assert torch.equal(tensors["base_model.model.emb.lora_embedding_B"], layer.lora_B.weight)
    assert torch.equal(
        tensors["base_model.model.head.weight"], w.adapters["default"]["head"].module_copy.weight
    )
    cfg = config_of(tmp_path)
    for field in ("peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
                  "use_rslora", "fan_in_fan_out", "modules_to_save", "bias"):
        assert field in cfg, field


def test_conv2d_lora_round_trip(tmp_path):
    torch.manual_seed(0)
    src = AdapterWrapper.from_config(ConvNet(), LoraConfig(target_modules=["conv"], r=2))
    randomise(src)
    x = torch.randn(2, 3, 5, 5)
    src.save_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.conv.lora_A.weight"].shape == (2, 3, 3, 3)
    assert tensors["base_model.model.conv.lora_B.weight"].shape == (6, 2, 1, 1)
    torch.manual_seed(0)
    dst = AdapterWrapper(ConvNet())
    dst.load_adapter(tmp_path)
    assert torch.allclose(dst(x), src(x), atol=1e-6)


def test_hand_built_lora_gets_a_derived_peft_config(tmp_path):
    w = AdapterWrapper(make())
    w.add_adapter("a")
    w.add_adapter_layer("a", "blocks.0.q", functools.partial(LinearLoraLayer, r=4, lora_alpha=8))
    w.add_adapter_layer("a", "blocks.1.q", functools.partial(LinearLoraLayer, r=4, lora_alpha=8))
    w.add_adapter_layer("a", "blocks.1.up", functools.partial(LinearLoraLayer, r=2, lora_alpha=6))
    w.add_adapter_layer("a", "head", ModulesToSaveLayer)
    randomise(w)
    w.save_adapter(tmp_path, "a")
    cfg = config_of(tmp_path)
    assert cfg["peft_type"] == "LORA"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["rank_pattern"] == {"blocks.1.up": 2}
    assert cfg["alpha_pattern"] == {"blocks.1.up": 6}
    assert cfg["modules_to_save"] == ["head"]
    # "q" would also select blocks.0.q and blocks.1.q only, but "up" would select
    # blocks.0.up too, so the derived config names full paths.
    assert sorted(cfg["target_modules"]) == ["blocks.0.q", "blocks.1.q", "blocks.1.up"]

    dst = AdapterWrapper(make())
    dst.load_adapter(tmp_path)
    assert torch.allclose(dst(IDS), w(IDS), atol=1e-6)
    assert isinstance(dst.adapters["default"].config, LoraConfig)


def test_hand_built_ia3_gets_short_target_names(tmp_path):
    w = AdapterWrapper(make())
    w.add_adapter("a")
    for i in range(2):
        w.add_adapter_layer("a", f"blocks.{i}.q", functools.partial(LinearIA3Layer, is_feedforward=False))
        w.add_adapter_layer("a", f"blocks.{i}.down", functools.partial(LinearIA3Layer, is_feedforward=True))
    randomise(w)
    w.save_adapter(tmp_path, "a")
    cfg = config_of(tmp_path)
    assert cfg["peft_type"] == "IA3"
    assert sorted(cfg["target_modules"]) == ["down", "q"]
    assert cfg["feedforward_modules"] == ["down"]
    dst = AdapterWrapper(make())
    dst.load_adapter(tmp_path)
    assert torch.allclose(dst(IDS), w(IDS), atol=1e-6)


def test_config_adapter_changed_by_hand_is_saved_as_it_is(tmp_path):
    """A layer added to a config-built adapter is not lost: the config is re-derived."""
    w = AdapterWrapper.from_config(make(), LoraConfig(target_modules=["q"], r=4))
    w.add_adapter_layer("default", "blocks.0.up", functools.partial(LinearLoraLayer, r=2))
    randomise(w)
    w.save_adapter(tmp_path)
    dst = AdapterWrapper(make())
    dst.load_adapter(tmp_path)
    assert sorted(dst.adapters["default"].layer_names) == sorted(w.adapters["default"].layer_names)
    assert torch.allclose(dst(IDS), w(IDS), atol=1e-6)


# ------------------------------------------------------------------------------------------
# the TINYTUNE extension
# ------------------------------------------------------------------------------------------
def mixed_wrapper() -> AdapterWrapper:
    w = AdapterWrapper(make())
    w.add_adapter("mix")
    w.add_adapter_layer("mix", "blocks.0.q", functools.partial(LinearLoraLayer, r=3, lora_alpha=5))
    w.add_adapter_layer("mix", "blocks.0.down", functools.partial(LinearIA3Layer, is_feedforward=True))
    w.add_adapter_layer("mix", "blocks.1.up", LinearIA3Layer)
    w.add_adapter_layer("mix", "emb", functools.partial(EmbeddingLoraLayer, r=2))
    w.add_adapter_layer("mix", "blocks.1.q", functools.partial(ScaleShift, gain=0.5))
    w.add_adapter_layer("mix", "head", ModulesToSaveLayer)
    randomise(w)
    return w


def test_mixed_adapter_with_custom_layer_round_trips(tmp_path):
    src = mixed_wrapper()
    src.save_adapter(tmp_path, "mix")
    cfg = config_of(tmp_path)
    assert cfg["peft_type"] == "TINYTUNE"
    entries = cfg["tinytune"]["layers"]
    assert [e["module"] for e in entries] == src.adapters["mix"].layer_names  # none dropped
    by_module = {e["module"]: e for e in entries}
    assert by_module["blocks.1.q"]["type"] == "ScaleShift"
    assert by_module["blocks.1.q"]["config"] == {"gain": 0.5}
    assert by_module["blocks.0.q"]["config"]["r"] == 3
    assert by_module["blocks.0.down"]["config"] == {"is_feedforward": True}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.blocks.1.q.shift" in tensors  # buffers are saved too
    assert "base_model.model.blocks.0.down.ia3_l" in tensors
    assert "base_model.model.emb.lora_embedding_A" in tensors

    for custom in ([ScaleShift], {"ScaleShift": ScaleShift}):
        dst = AdapterWrapper(make())
        dst.load_adapter(tmp_path, "x", custom_layers=custom)
        assert dst.adapters["x"].layer_names == src.adapters["mix"].layer_names
        assert dst.adapters["x"]["blocks.1.q"].gain == 0.5
        assert torch.allclose(dst(IDS), src(IDS), atol=1e-6)
        assert dst.adapters["x"].config is None


def test_custom_layer_without_its_class_is_refused_cleanly(tmp_path):
    mixed_wrapper().save_adapter(tmp_path, "mix")
    dst = AdapterWrapper(make())
    before = snapshot(dst)
    with pytest.raises(AdapterFileError, match=r"ScaleShift.*custom_layers"):
        dst.load_adapter(tmp_path)
    assert_unchanged(dst, before)


def test_custom_layer_with_a_non_json_config_is_refused_before_writing(tmp_path):
    class Bad(ScaleShift):
        def get_config(self):
            return {"gain": torch.tensor(1.0)}

    w = AdapterWrapper(make())
    w.add_adapter("a")
    w.add_adapter_layer("a", "head", Bad)
    with pytest.raises(AdapterFileError, match="JSON"):
        w.save_adapter(tmp_path / "out", "a")
    assert not (tmp_path / "out").exists()


class NoConfig(AdapterLayer):
    def __init__(self, gain: float = 2.0) -> None:
        super().__init__()
        self.gain = gain

    def post_forward(self, module, args, kwargs, output):
        return output * self.gain


class NoArgs(AdapterLayer):
    def reset_params(self, prefix, target):
        self.bias = nn.Parameter(torch.zeros(target.out_features))

    def post_forward(self, module, args, kwargs, output):
        return output + self.bias


def test_custom_layer_arguments_are_never_dropped_silently(tmp_path):
    w = AdapterWrapper(make())
    w.add_adapter("a")
    w.add_adapter_layer("a", "head", functools.partial(NoConfig, gain=3.0))
    with pytest.raises(AdapterFileError, match=r"\['gain'\].*get_config"):
        w.save_adapter(tmp_path / "out", "a")
    assert not (tmp_path / "out").exists()
    # A layer whose constructor takes nothing needs no get_config().
    w2 = AdapterWrapper(make())
    w2.add_adapter("a")
    w2.add_adapter_layer("a", "head", NoArgs)
    randomise(w2)
    w2.save_adapter(tmp_path / "ok", "a")
    dst = AdapterWrapper(make())
    dst.load_adapter(tmp_path / "ok", custom_layers=[NoArgs])
    assert torch.allclose(dst(IDS), w2(IDS))


def test_per_layer_dropout_is_not_dropped(tmp_path):
    w = AdapterWrapper(make())
    w.add_adapter("a")
    w.add_adapter_layer("a", "blocks.0.q", functools.partial(LinearLoraLayer, r=2, lora_dropout=0.1))
    w.add_adapter_layer("a", "blocks.1.q", functools.partial(LinearLoraLayer, r=2, lora_dropout=0.2))
    w.save_adapter(tmp_path, "a")
    assert config_of(tmp_path)["peft_type"] == "TINYTUNE"
    dst = AdapterWrapper(make())
    dst.load_adapter(tmp_path)
    assert dst.adapters["default"]["blocks.1.q"].lora_dropout == 0.2


# ------------------------------------------------------------------------------------------
# loading behaviour
# ------------------------------------------------------------------------------------------
def test_load_into_another_same_shaped_model(tmp_path):
    src = AdapterWrapper.from_config(make(0), LoraConfig(target_modules=["q", "up"], r=2))
    randomise(src)
    src.save_adapter(tmp_path)
    other = make(7)
    dst = AdapterWrapper(other)
    dst.load_adapter(tmp_path)
    # Same adapter weights on the other base: equal to moving src's adapter there.
    src.swap_base_model(make(7))
    assert torch.allclose(dst(IDS), src(IDS), atol=1e-6)


def test_activate_false_and_name_clash(tmp_path):
    src = AdapterWrapper.from_config(make(), LoraConfig(target_modules=["q"], r=2))
    src.save_adapter(tmp_path)
    dst = AdapterWrapper(make())
    dst.load_adapter(tmp_path, "a", activate=False)
    assert "a" in dst.adapters and dst.active_adapters == []
    before = snapshot(dst)
    with pytest.raises(AdapterExistsError):
        dst.load_adapter(tmp_path, "a")
    assert_unchanged(dst, before)


def test_legacy_modules_to_save_keys_load(tmp_path):
    src = AdapterWrapper.from_config(make(), LoraConfig(target_modules=["q"], r=2, modules_to_save=["head"]))
    randomise(src)
    src.save_adapter(tmp_path)
    # PEFT before 0.14 wrote "<path>.modules_to_save.<param>".
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    legacy = {
        k.replace("head.", "head.modules_to_save.") if k.startswith("base_model.model.head.") else k: v
        for k, v in tensors.items()
    }
    save_file(legacy, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    dst = AdapterWrapper(make())
    dst.load_adapter(tmp_path)
    assert torch.allclose(dst(IDS), src(IDS), atol=1e-6)


def test_keys_without_peft_prefix_load(tmp_path):
    src = AdapterWrapper.from_config(make(), LoraConfig(target_modules=["q"], r=2))
    randomise(src)
    src.save_adapter(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({k.removeprefix("base_model.model."): t.pop(k) for k in list(t)}))
    assert not any(k.startswith("base_model") for k in load_file(tmp_path / "adapter_model.safetensors"))
    dst = AdapterWrapper(make())
    dst.load_adapter(tmp_path)
    assert torch.allclose(dst(IDS), src(IDS), atol=1e-6)


# ------------------------------------------------------------------------------------------
# failures leave everything as it was
# ------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    src = AdapterWrapper.from_config(make(), LoraConfig(target_modules=["q", "up"], r=2, modules_to_save=["head"]))
    randomise(src)
    d = tmp_path / "adapter"
    src.save_adapter(d)
    return d


@pytest.fixture
def victim():
    """A wrapper that already holds an active adapter, so 'unchanged' means something."""
    w = AdapterWrapper.from_config(make(), LoraConfig(target_modules=["down"], r=2), "existing")
    randomise(w, seed=5)
    return w


def _rewrite(d, fn):
    tensors = load_file(d / "adapter_model.safetensors")
    fn(tensors)
    save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})


def test_missing_directory_and_files(tmp_path, saved, victim):
    before = snapshot(victim)
    with pytest.raises(AdapterFileNotFoundError, match="No adapter directory"):
        victim.load_adapter(tmp_path / "nope")
    os.remove(saved / "adapter_config.json")
    with pytest.raises(AdapterFileNotFoundError, match="adapter_config.json"):
        victim.load_adapter(saved)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        victim.load_adapter(saved)
    assert_unchanged(victim, before)


def test_missing_weights(saved, victim):
    before = snapshot(victim)
    os.remove(saved / "adapter_model.safetensors")
    with pytest.raises(AdapterFileNotFoundError, match="adapter_model.safetensors"):
        victim.load_adapter(saved)
    assert_unchanged(victim, before)


def test_legacy_bin_is_refused_without_unpickling(saved, victim, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    os.remove(saved / "adapter_model.safetensors")
    with open(saved / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    before = snapshot(victim)
    with pytest.raises(AdapterFileError, match=r"(?s)pickle.*save_file.*weights_only=True"):
        victim.load_adapter(saved)
    assert not marker.exists()  # nothing was unpickled
    assert_unchanged(victim, before)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_weights(saved, victim, keep):
    f = saved / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    before = snapshot(victim)
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors.*truncated or corrupt"):
        victim.load_adapter(saved)
    assert_unchanged(victim, before)


def test_corrupt_config(saved, victim):
    (saved / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    before = snapshot(victim)
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json is not valid JSON"):
        victim.load_adapter(saved)
    assert_unchanged(victim, before)


def test_key_naming_no_module(saved, victim):
    def add(t):
        t["base_model.model.blocks.7.q.lora_A.weight"] = torch.zeros(2, 8)
        t["base_model.model.blocks.7.q.lora_B.weight"] = torch.zeros(8, 2)

    _rewrite(saved, add)
    before = snapshot(victim)
    with pytest.raises(AdapterFileError, match=r"blocks\.7\.q\.lora_A\.weight.*adapter_model\.safetensors.*'blocks\.7\.q'"):
        victim.load_adapter(saved, check_fingerprint=False)
    assert_unchanged(victim, before)


def test_stray_key_is_refused(saved, victim):
    _rewrite(saved, lambda t: t.__setitem__("base_model.model.blocks.0.q.something", torch.zeros(3)))
    before = snapshot(victim)
    with pytest.raises(AdapterFileError, match=r"blocks\.0\.q\.something.*not loaded"):
        victim.load_adapter(saved, check_fingerprint=False)
    assert_unchanged(victim, before)


def test_shape_mismatch_names_file_key_and_both_shapes(saved, victim):
    _rewrite(saved, lambda t: t.__setitem__("base_model.model.blocks.1.up.lora_B.weight", torch.zeros(12, 2)))
    before = snapshot(victim)
    with pytest.raises(AdapterFileError) as info:
        victim.load_adapter(saved)
    msg = str(info.value)
    assert "adapter_model.safetensors" in msg and "blocks.1.up.lora_B.weight" in msg
    assert "(12, 2)" in msg and "(16, 2)" in msg
    assert_unchanged(victim, before)


def test_rank_disagreeing_with_config(saved, victim):
    def rank3(t):
        t["base_model.model.blocks.0.q.lora_A.weight"] = torch.zeros(3, 8)
        t["base_model.model.blocks.0.q.lora_B.weight"] = torch.zeros(8, 3)

    _rewrite(saved, rank3)
    before = snapshot(victim)
    with pytest.raises(AdapterFileError, match=r"\(3, 8\).*rank 3.*rank 2"):
        victim.load_adapter(saved)
    assert_unchanged(victim, before)


def test_missing_tensor(saved, victim):
    _rewrite(saved, lambda t: t.pop("base_model.model.head.bias"))
    before = snapshot(victim)
    with pytest.raises(AdapterFileError, match=r"no tensor 'base_model\.model\.head\.bias'"):
        victim.load_adapter(saved)
    assert_unchanged(victim, before)


def test_loading_into_a_different_model_fails_cleanly(saved):
    class Wider(Tiny):
        def __init__(self):
            super().__init__(d=12)

    victim = AdapterWrapper(Wider().eval())
    victim.add_adapter("x")
    victim.add_adapter_layer("x", "blocks.0.down", LinearIA3Layer)
    before = {
        "adapters": list(victim.adapters),
        "state": {k: v.clone() for k, v in victim.model.state_dict().items()},
    }
    with pytest.raises(AdapterFileError, match=r"shape"):
        victim.load_adapter(saved)
    assert list(victim.adapters) == before["adapters"]
    for k, v in victim.model.state_dict().items():
        assert torch.equal(v, before["state"][k])


@pytest.mark.parametrize(
    "field, value",
    [("bias", "all"), ("lora_bias", True), ("target_parameters", ["w"]),
     ("layer_replication", [[0, 1]])],
)
def test_unsupported_peft_options_are_refused(saved, victim, field, value):
    cfg = config_of(saved)
    cfg[field] = value
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    before = snapshot(victim)
    with pytest.raises(InvalidConfigError, match=field):
        victim.load_adapter(saved, check_fingerprint=False)
    assert_unchanged(victim, before)


def test_dora_config_without_magnitude_vectors_is_refused(saved, victim):
    # use_dora is supported now; a file that claims it without lora_magnitude_vector
    # tensors is incomplete, and loading it changes nothing.
    cfg = config_of(saved)
    cfg["use_dora"] = True
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    before = snapshot(victim)
    with pytest.raises(AdapterFileError, match="lora_magnitude_vector"):
        victim.load_adapter(saved, check_fingerprint=False)
    assert_unchanged(victim, before)


def test_unsupported_peft_type(saved, victim):
    cfg = config_of(saved)
    cfg["peft_type"] = "LOHA"
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidConfigError, match="LOHA"):
        victim.load_adapter(saved, check_fingerprint=False)


def test_harmless_peft_fields_are_accepted(saved):
    cfg = config_of(saved)
    cfg.update(task_type="CAUSAL_LM", use_dora=False, layers_to_transform=None, some_future_field=None,
               init_lora_weights="gaussian", base_model_name_or_path="org/model")
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    dst = AdapterWrapper(make())
    dst.load_adapter(saved, check_fingerprint=False)
    assert dst.adapters["default"].peft_extras == {"task_type": "CAUSAL_LM", "base_model_name_or_path": "org/model"}


# ------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------
def test_save_into_a_file_path_is_refused(tmp_path):
    w = AdapterWrapper.from_config(make(), LoraConfig(target_modules=["q"], r=2))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(AdapterFileError, match="is a file"):
        w.save_adapter(f)


def test_save_of_an_empty_adapter_is_refused(tmp_path):
    w = AdapterWrapper(make())
    w.add_adapter("empty")
    with pytest.raises(AdapterFileError, match="no layers"):
        w.save_adapter(tmp_path / "out", "empty")
    assert not (tmp_path / "out").exists()


def test_save_keeps_other_files_and_leaves_no_temporaries(tmp_path):
    w = AdapterWrapper.from_config(make(), LoraConfig(target_modules=["q"], r=2))
    (tmp_path / "README.md").write_text("mine")
    w.save_adapter(tmp_path)
    w.save_adapter(tmp_path)  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def _interrupt_at(monkeypatch, n: int):
    """Make the n-th os.replace in tinytune.io die, as a crash would."""
    real = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(tio.os, "replace", replace)


def test_interrupted_save_never_loads_as_another_adapter(tmp_path, monkeypatch):
    old = AdapterWrapper.from_config(make(), LoraConfig(target_modules=["q"], r=2, lora_alpha=2))
    randomise(old, seed=1)
    old.save_adapter(tmp_path)
    new = AdapterWrapper.from_config(make(), LoraConfig(target_modules=["q"], r=2, lora_alpha=16))
    randomise(new, seed=2)

    # Crash before the weights are renamed: the old adapter is still there, whole.
    _interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        new.save_adapter(tmp_path)
    monkeypatch.undo()
    dst = AdapterWrapper(make())
    dst.load_adapter(tmp_path)
    assert torch.allclose(dst(IDS), old(IDS), atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]

    # Crash between the two renames: new weights beside the old config are refused.
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        new.save_adapter(tmp_path)
    monkeypatch.undo()
    dst = AdapterWrapper(make())
    before = snapshot(dst)
    with pytest.raises(AdapterFileError, match="does not belong to"):
        dst.load_adapter(tmp_path)
    assert_unchanged(dst, before)

    # Finishing the save gives the new adapter.
    new.save_adapter(tmp_path)
    dst.load_adapter(tmp_path)
    assert torch.allclose(dst(IDS), new(IDS), atol=1e-6)


def test_hand_edited_config_needs_check_fingerprint_false(saved):
    cfg = config_of(saved)
    cfg["lora_alpha"] = 32
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    dst = AdapterWrapper(make())
    with pytest.raises(AdapterFileError, match="check_fingerprint=False"):
        dst.load_adapter(saved)
    dst.load_adapter(saved, check_fingerprint=False)
    assert dst.adapters["default"]["blocks.0.q"].lora_alpha == 32
    # Informational fields are outside the fingerprint: editing them is harmless.
    cfg["lora_alpha"] = 8
    cfg["base_model_name_or_path"] = "somewhere/else"
    (saved / "adapter_config.json").write_text(json.dumps(cfg, indent=4))
    AdapterWrapper(make()).load_adapter(saved)


def test_peft_style_pretrained_aliases(tmp_path):
    import torch
    from torch import nn

    from tinytune import AdapterWrapper, LoraConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    twin = copy.deepcopy(model)
    x = torch.randn(3, 6)
    wrapper = AdapterWrapper.from_config(model, LoraConfig(target_modules=["0"], init_lora_weights=False))
    y = wrapper(x)
    wrapper.save_pretrained(str(tmp_path / "a"))
    loaded = AdapterWrapper.from_pretrained(twin, str(tmp_path / "a"))
    assert loaded.active_adapters == ["default"]
    torch.testing.assert_close(loaded(x), y)
    fresh = nn.Sequential(nn.Linear(6, 6))
    with pytest.raises(FileNotFoundError):
        AdapterWrapper.from_pretrained(fresh, str(tmp_path / "missing"))
    assert all(p.requires_grad for p in fresh.parameters())


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_non_real_float_tensors_are_refused(saved, victim, dtype):
    # complex values would lose their imaginary part in the copy (issue 17)
    key = "base_model.model.blocks.0.q.lora_A.weight"
    _rewrite(saved, lambda t: t.__setitem__(key, t[key].to(dtype)))
    before = snapshot(victim)
    with pytest.raises(AdapterFileError, match=rf"{re.escape(key)}.*{str(dtype).split('.')[-1]}"):
        victim.load_adapter(saved)
    assert_unchanged(victim, before)


@pytest.mark.parametrize("bad_type", [["LinearLoraLayer"], {"name": "LinearLoraLayer"}, None])
def test_layer_type_entry_that_is_not_a_string_is_refused(tmp_path, bad_type):
    mixed_wrapper().save_adapter(tmp_path, "mix")
    cfg = config_of(tmp_path)
    cfg["tinytune"]["layers"][0]["type"] = bad_type
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    dst = AdapterWrapper(make())
    before = snapshot(dst)
    with pytest.raises(AdapterFileError, match="'type' of the layer on"):
        dst.load_adapter(tmp_path, custom_layers=[ScaleShift], check_fingerprint=False)
    assert_unchanged(dst, before)
