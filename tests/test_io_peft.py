"""PEFT's on-disk format (issue 3): tinytune's files run in PEFT and back, and missing,
unsafe, corrupt or ill-fitting files fail naming the file and change nothing."""

from __future__ import annotations

import copy
import functools
import json
import os

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
    IDS,
    LLAMA_LORA,
    TOKENS,
    assert_same_wrapper_state,
    hook_count,
    logits,
    perturb,
    tiny_gpt2,
    tiny_llama,
    train_steps,
    wrapper_state,
)


# --------------------------------------------------------------------------------------
# issue 3: PEFT's on-disk format
# --------------------------------------------------------------------------------------
def test_save_writes_peft_layout_keys_and_config(tmp_path):
    from safetensors.torch import load_file

    m = AdapterWrapper.from_config(tiny_llama(**TOKENS), LoraConfig(**LLAMA_LORA, rank_pattern={"v_proj": 4}))
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
    base = tiny_llama(**TOKENS)
    m = AdapterWrapper.from_config(copy.deepcopy(base), LoraConfig(**LLAMA_LORA))
    train_steps(m, steps=2)
    out = logits(m)
    m.save_pretrained(str(tmp_path / "ad"))
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    torch.testing.assert_close(logits(pm), out, rtol=1e-5, atol=1e-5)


def test_peft_trained_adapter_runs_in_tinytune(tmp_path):
    base = tiny_llama(**TOKENS)
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
    base = tiny_llama(**TOKENS)
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
    base = tiny_gpt2(**TOKENS)
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
    m = AdapterWrapper.from_config(tiny_llama(**TOKENS), LoraConfig(**LLAMA_LORA))
    m.save_adapter(str(tmp_path / "ad"))
    m.load_adapter(str(tmp_path / "ad"), adapter_name="b")
    assert m.active_adapters == ["default", "b"]
    m.load_adapter(str(tmp_path / "ad"), adapter_name="c", activate=False)
    assert m.active_adapters == ["default", "b"]
    assert set(m.adapters) == {"default", "b", "c"}


def test_load_into_different_same_shaped_base_model(tmp_path):
    m = AdapterWrapper.from_config(tiny_llama(0, **TOKENS), LoraConfig(**LLAMA_LORA))
    perturb(m.adapter_parameters(), scale=0.4)
    m.save_adapter(str(tmp_path / "ad"))
    other = tiny_llama(1, **TOKENS)
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

    m = AdapterWrapper(tiny_llama(**TOKENS))
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
    assert list(n.adapters) == [] and hook_count(base) == 0
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
    m = AdapterWrapper.from_config(tiny_llama(**TOKENS), LoraConfig(**LLAMA_LORA))
    perturb(m.adapter_parameters(), scale=0.3)
    m.save_adapter(str(tmp_path / "ad"))
    return tmp_path / "ad"


def fresh_wrapper():
    m = AdapterWrapper(tiny_llama(**TOKENS))
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
    # hidden size 96 where the file has 64
    big = tiny_llama(None, hidden_size=96, intermediate_size=128)
    m = AdapterWrapper(big)
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
    m = AdapterWrapper.from_pretrained(tiny_llama(**TOKENS), str(saved))
    old_out = logits(m)
    m2 = AdapterWrapper.from_config(tiny_llama(**TOKENS), LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=4))
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
    fresh = AdapterWrapper(tiny_llama(**TOKENS))
    try:
        fresh.load_adapter(str(saved))
    except tinytune.AdapterFileError:
        return  # refused: fine
    # loaded: it must be exactly one of the two adapters
    out = logits(fresh)
    assert torch.allclose(out, old_out) or torch.allclose(out, logits(m2))


def test_save_into_a_path_that_is_a_file(tmp_path):
    m = AdapterWrapper.from_config(tiny_llama(**TOKENS), LoraConfig(**LLAMA_LORA))
    f = tmp_path / "afile"
    f.write_text("hello")
    with pytest.raises(tinytune.AdapterFileError):
        m.save_adapter(str(f))
    assert f.read_text() == "hello"

def test_from_pretrained_accepts_peft_is_trainable(saved):
    """PeftModel.from_pretrained(base, path, is_trainable=True) is how PEFT users resume
    training; the same call must work here, and is_trainable=False must freeze."""
    m = AdapterWrapper.from_pretrained(tiny_llama(**TOKENS), str(saved), is_trainable=True)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [
        n for n, _ in m.named_parameters() if ".lora_" in n
    ]
    losses = train_steps(m, steps=2)
    assert losses[1] != losses[0]
    frozen = AdapterWrapper.from_pretrained(tiny_llama(**TOKENS), str(saved), is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    torch.testing.assert_close(logits(frozen), logits(AdapterWrapper.from_pretrained(tiny_llama(**TOKENS), str(saved))))

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
    m = AdapterWrapper(tiny_llama(**TOKENS))
    m.add_adapter()
    m.add_adapter_layer("default", "model.layers.0.self_attn.q_proj", functools.partial(ClippedLora, r=4, lora_alpha=2))
    m.add_adapter_layer("default", "model.layers.1.mlp.up_proj", LinearIA3Layer)
    perturb(m.adapter_parameters(), scale=0.5)
    out = logits(m)
    m.save_adapter(str(tmp_path / "c"))
    n = AdapterWrapper(tiny_llama(**TOKENS))
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

def test_peft_adapters_whose_init_rewrites_the_base_are_refused_with_the_conversion(tmp_path):
    """PEFT redoes PiSSA/OLoRA init on load, rewriting the base weights; tinytune loaded
    such a file silently on the original base and gave different logits than PEFT."""
    base = tiny_llama(**TOKENS)
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
