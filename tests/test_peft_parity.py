"""Parity with Hugging Face PEFT through files, on a tiny Llama built from a config.

An adapter saved by PEFT and loaded by tinytune gives PEFT's logits, and the other way
round, for LoRA (several ranks, rsLoRA, rank_pattern/alpha_pattern, embeddings,
modules_to_save) and IA³. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import tinytune as tt  # noqa: E402

ATOL = 1e-5  # fp32; the two libraries order the same few matmuls differently


@pytest.fixture(scope="module")
def llama_other(llama):
    """Same architecture, different weights: a swapped base model."""
    torch.manual_seed(123)
    return transformers.LlamaForCausalLM(llama.config).eval()


IDS = torch.tensor([[3, 17, 99, 4, 60, 5, 127], [8, 1, 42, 42, 7, 0, 77]])


def randomise(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def peft_adapter(base, config, path):
    """A PEFT model with random adapter weights, saved to ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), config)
        randomise([p for _, p in sorted(pm.named_parameters()) if p.requires_grad])
        pm.save_pretrained(path)
    return pm.eval()


def peft_load(base, path):
    """PEFT loads ``path``; a missing adapter key would be a silent mismatch, so fail."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        pm = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    # Every tensor in the file was used, and PEFT has no adapter tensor the file lacks.
    assert set(get_peft_model_state_dict(pm, save_embedding_layers=False)) == set(load_file(path / "adapter_model.safetensors"))
    return pm


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


PEFT_CONFIGS = {
    "lora-r2": lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "lora-r16-mlp": lambda: peft.LoraConfig(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "lora-rslora-all-linear": lambda: peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear"),
    "lora-patterns": lambda: peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "o_proj": 6},
        alpha_pattern={"v_proj": 16, r"layers\.0\.self_attn\.k_proj": 3},
    ),
    "lora-regex-targets": lambda: peft.LoraConfig(r=3, target_modules=r".*layers\.1\.mlp\.(up|down)_proj"),
    "lora-embedding-modules-to-save": lambda: peft.LoraConfig(
        r=4, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]
    ),
    "lora-layers-to-transform": lambda: peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"
    ),
    "lora-exclude-modules": lambda: peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]
    ),
    "ia3": lambda: peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
    "ia3-modules-to-save": lambda: peft.IA3Config(
        target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"], modules_to_save=["lm_head"]
    ),
}


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_peft_to_tinytune_and_back(llama, tmp_path, name):
    pm = peft_adapter(llama, PEFT_CONFIGS[name](), tmp_path / "peft")
    expected = logits(pm)
    assert not torch.allclose(expected, logits(llama), atol=1e-3)  # the adapter does something

    wrapper = tt.AdapterWrapper(copy.deepcopy(llama))
    wrapper.load_adapter(tmp_path / "peft")
    assert torch.allclose(logits(wrapper), expected, atol=ATOL, rtol=0)

    # Saved again by tinytune, PEFT reads it back to the same function.
    wrapper.save_adapter(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] in ("LORA", "IA3")
    assert torch.allclose(logits(peft_load(llama, tmp_path / "ours")), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["lora-patterns", "lora-embedding-modules-to-save", "ia3"])
def test_different_same_shaped_base(llama, llama_other, tmp_path, name):
    """Adapters move between base models of the same shape, as in PEFT."""
    peft_adapter(llama, PEFT_CONFIGS[name](), tmp_path)
    wrapper = tt.AdapterWrapper(copy.deepcopy(llama_other))
    if name == "lora-embedding-modules-to-save":
        # PEFT also stored llama's whole embedding matrix; tinytune refuses to silently
        # ignore (or apply) base weights that differ from this model's.
        with pytest.raises(tt.AdapterFileError, match=r"embed_tokens.*base-model weights"):
            wrapper.load_adapter(tmp_path)
        assert len(wrapper.adapters) == 0
        return
    wrapper.load_adapter(tmp_path)
    expected = logits(peft_load(llama_other, tmp_path))
    assert torch.allclose(logits(wrapper), expected, atol=ATOL, rtol=0)


TT_CONFIGS = {
    "lora": lambda: tt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "lora-rslora-patterns-save": lambda: tt.LoraConfig(
        r=8,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "o_proj", "up_proj", "embed_tokens"],
        rank_pattern={"layers.0.mlp.up_proj": 2},
        alpha_pattern={"o_proj": 32},
        modules_to_save=["lm_head"],
        init_lora_weights=False,
    ),
    "lora-all-linear": lambda: tt.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False),
    "ia3": lambda: tt.IA3Config(
        target_modules=["k_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    ),
}


@pytest.mark.parametrize("name", list(TT_CONFIGS))
def test_tinytune_to_peft(llama, tmp_path, name):
    wrapper = tt.AdapterWrapper.from_config(copy.deepcopy(llama), TT_CONFIGS[name]())
    randomise([p for _, p in wrapper.named_adapter_parameters()], seed=3)
    expected = logits(wrapper)
    assert not torch.allclose(expected, logits(llama), atol=1e-3)
    wrapper.save_adapter(tmp_path)
    pm = peft_load(llama, tmp_path)
    assert torch.allclose(logits(pm), expected, atol=ATOL, rtol=0)


def test_hand_built_per_layer_ranks_to_peft(llama, tmp_path):
    """No config at all: per-layer ranks/alphas become rank_pattern/alpha_pattern."""
    wrapper = tt.AdapterWrapper(copy.deepcopy(llama))
    wrapper.add_adapter("a")
    specs = {
        "model.layers.0.self_attn.q_proj": (4, 8),
        "model.layers.1.self_attn.q_proj": (4, 8),
        "model.layers.0.self_attn.v_proj": (2, 8),
        "model.layers.1.mlp.down_proj": (8, 2),
    }
    for path, (r, alpha) in specs.items():
        wrapper.add_adapter_layer("a", path, functools.partial(tt.LinearLoraLayer, r=r, lora_alpha=alpha))
    randomise([p for _, p in wrapper.named_adapter_parameters()], seed=4)
    wrapper.save_adapter(tmp_path, "a")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"] and cfg["alpha_pattern"]
    pm = peft_load(llama, tmp_path)
    assert torch.allclose(logits(pm), logits(wrapper), atol=ATOL, rtol=0)


def test_mixed_adapter_is_refused_by_peft_not_half_loaded(llama, tmp_path):
    wrapper = tt.AdapterWrapper(copy.deepcopy(llama))
    wrapper.add_adapter("mix")
    wrapper.add_adapter_layer("mix", "model.layers.0.self_attn.q_proj", tt.LinearLoraLayer)
    wrapper.add_adapter_layer("mix", "model.layers.1.mlp.down_proj", tt.LinearIA3Layer)
    wrapper.save_adapter(tmp_path, "mix")
    with pytest.raises(Exception, match="TINYTUNE"):
        PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path)


def test_generate_matches_peft(llama, tmp_path):
    pm = peft_adapter(llama, PEFT_CONFIGS["lora-patterns"](), tmp_path)
    wrapper = tt.AdapterWrapper(copy.deepcopy(llama))
    wrapper.load_adapter(tmp_path)
    ours = wrapper.generate(IDS[:, :4], max_new_tokens=5, do_sample=False)
    theirs = pm.generate(input_ids=IDS[:, :4], max_new_tokens=5, do_sample=False)
    assert ours.shape == (2, 9)
    assert torch.equal(ours, theirs)


class ConvNet(torch.nn.Module):
    """A plain (non-transformers) model with Conv2d, Embedding and Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.emb = torch.nn.Embedding(10, 8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x, ids):
        h = self.conv(x).mean(dim=(2, 3)) + self.emb(ids)
        return self.fc(h)


def test_plain_model_conv2d_embedding_both_ways(tmp_path):
    torch.manual_seed(0)
    base = ConvNet().eval()
    x, ids = torch.randn(2, 3, 6, 6), torch.tensor([1, 7])
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["conv", "emb", "fc"])
    pm = peft_adapter(base, config, tmp_path / "peft")
    with torch.no_grad():
        expected = pm(x, ids)
        assert not torch.allclose(expected, base(x, ids), atol=1e-3)
        wrapper = tt.AdapterWrapper(copy.deepcopy(base))
        wrapper.load_adapter(tmp_path / "peft")
        assert torch.allclose(wrapper(x, ids), expected, atol=ATOL, rtol=0)
        wrapper.save_adapter(tmp_path / "ours")
        back = peft_load(base, tmp_path / "ours")
        assert torch.allclose(back(x, ids), expected, atol=ATOL, rtol=0)
