"""DoRA (``LoraConfig(use_dora=True)``): parity with PEFT (outputs, files both ways,
training), exact merges, and clear errors.

PEFT is the reference: the same weights (``lora_magnitude_vector`` included) give the
same outputs, the files use PEFT's keys, and a few optimizer steps from the same start
follow PEFT's trajectory (the norm detached, as in PEFT).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import tinytune as tt  # noqa: E402
from conftest import ConvNet, assert_state_equal, snapshot, tiny_gpt2  # noqa: E402

ATOL = 1e-5  # fp32; the two libraries order the same few operations differently
IDS = torch.tensor([[3, 17, 99, 4, 60, 5, 127], [8, 1, 42, 42, 7, 0, 77]])


def randomise(params, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def peft_model(base, config, seed=0):
    """A PEFT DoRA model with random A, B and magnitudes (magnitudes perturbed too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), config)
    randomise([p for _, p in sorted(pm.named_parameters()) if p.requires_grad], seed)
    return pm.eval()


def peft_load(base, path, is_trainable=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        return PeftModel.from_pretrained(copy.deepcopy(base), path, is_trainable=is_trainable)


def out(model, x):
    with torch.no_grad():
        y = model(x)
    return y.logits if hasattr(y, "logits") else y


LLAMA_DORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
GPT2_DORA = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "wte"])


# ----------------------------------------------------------------------------------------
# layers and config
# ----------------------------------------------------------------------------------------
def test_config_picks_dora_layers(llama):
    w = tt.AdapterWrapper.from_config(copy.deepcopy(llama), tt.LoraConfig(use_dora=True, **LLAMA_DORA))
    layers = dict(w.adapters["default"].items())
    q = layers["model.layers.0.self_attn.q_proj"]
    assert type(q) is tt.LinearDoraLayer
    assert type(layers["model.embed_tokens"]) is tt.EmbeddingDoraLayer
    assert q.lora_magnitude_vector.shape == (64,)
    # A new adapter is a no-op: m starts at the weight's row norms, B at zero.
    assert torch.allclose(out(w, IDS), out(llama, IDS), atol=1e-6, rtol=0)
    module = w.get_base_model().model.layers[0].self_attn.q_proj
    assert torch.allclose(q.dora_scale(), torch.ones(64), atol=1e-6)
    assert torch.allclose(q.lora_magnitude_vector.detach(), module.weight.norm(dim=1), atol=1e-6)


def test_dora_scale_is_cached_and_follows_changes(llama):
    w = tt.AdapterWrapper.from_config(copy.deepcopy(llama), tt.LoraConfig(use_dora=True, **LLAMA_DORA))
    layer = dict(w.adapters["default"].items())["model.layers.1.mlp.down_proj"]
    module = w.get_base_model().model.layers[1].mlp.down_proj

    def expected():
        full = module.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        return layer.lora_magnitude_vector / full.norm(dim=1)

    g = layer.dora_scale()
    assert layer.dora_scale() is g  # the same cached tensor, updated in place
    for change in (
        lambda: layer.lora_B.weight.add_(0.1),  # B in place
        lambda: layer.lora_A.weight.mul_(1.5),  # A in place
        lambda: layer.lora_magnitude_vector.add_(0.3),  # m
        lambda: setattr(layer, "scaling", 0.7),  # scaling
        lambda: module.weight.mul_(0.9),  # the base weight
    ):
        with torch.no_grad():
            change()
        assert torch.allclose(layer.dora_scale(), expected().detach(), atol=1e-6), change
    assert layer.dora_scale().dtype == torch.float32 and layer.dora_scale().shape == (64,)


def test_unsupported_module_is_refused_and_nothing_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    w = tt.AdapterWrapper(model)
    before = snapshot(model)
    with pytest.raises(tt.UnsupportedModuleError, match=r"DoRA \(use_dora=True\) cannot adapt.*LayerNorm"):
        w.add_adapter_from_config(tt.LoraConfig(use_dora=True, target_modules=["0", "1"]), "d")
    assert list(w.adapters) == [] and not w.active_adapters
    assert_state_equal(model, before)
    with pytest.raises(tt.TinytuneError, match="use_dora"):
        tt.LoraConfig(use_dora="yes", target_modules=["0"])


def test_grouped_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    w = tt.AdapterWrapper(model)
    with pytest.raises(tt.UnsupportedModuleError, match="grouped"):
        w.add_adapter_from_config(tt.LoraConfig(use_dora=True, target_modules=["0"]), "d")
    assert list(w.adapters) == []


# ----------------------------------------------------------------------------------------
# PEFT parity: outputs and files, both ways
# ----------------------------------------------------------------------------------------
def _models():
    torch.manual_seed(0)
    return {
        "llama": (None, lambda: LLAMA_DORA, IDS),
        # No dropout in the model, so training runs are deterministic.
        "gpt2": (tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), lambda: GPT2_DORA, IDS),
        "conv": (ConvNet().eval(), lambda: dict(r=2, lora_alpha=4, target_modules=["conv", "fc"]), torch.randn(2, 3, 6, 6)),
    }


MODELS = _models()


@pytest.mark.parametrize("name", list(MODELS))
def test_peft_file_to_tinytune_and_back(llama, tmp_path, name):
    base, kw, x = MODELS[name]
    base = llama if base is None else base
    pm = peft_model(base, peft.LoraConfig(use_dora=True, **kw()))
    pm.save_pretrained(tmp_path / "peft")
    expected = out(pm, x)
    assert not torch.allclose(expected, out(base, x), atol=1e-3)  # the adapter does something
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)

    w = tt.AdapterWrapper(copy.deepcopy(base))
    w.load_adapter(tmp_path / "peft")
    assert all(isinstance(layer, tt.DoraLayer) for _, layer in w.adapters["default"].items())
    assert torch.allclose(out(w, x), expected, atol=ATOL, rtol=0)

    # Saved by tinytune: PEFT's keys and use_dora in the config; PEFT reads it back.
    w.save_adapter(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    keys = {k: v for k, v in keys.items() if ".base_layer." not in k}  # PEFT's embedding copy
    assert set(ours) == set(keys)
    for k in keys:
        assert ours[k].shape == keys[k].shape and torch.equal(ours[k], keys[k]), k
    assert torch.allclose(out(peft_load(base, tmp_path / "ours").eval(), x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_tinytune_trained_file_to_peft(llama, tmp_path, name):
    base, kw, x = MODELS[name]
    base = llama if base is None else base
    w = tt.AdapterWrapper.from_config(copy.deepcopy(base), tt.LoraConfig(use_dora=True, **kw()))
    randomise([p for _, p in sorted(w.named_adapter_parameters())], seed=5)
    expected = out(w, x)
    w.save_adapter(tmp_path)
    pm = peft_load(base, tmp_path).eval()
    assert torch.allclose(out(pm, x), expected, atol=ATOL, rtol=0)


def test_tinytune_format_file_round_trip(tmp_path):
    """A hand-built DoRA adapter PEFT cannot describe (DoRA next to LoRA) round-trips
    through tinytune's own format."""
    torch.manual_seed(0)
    model = ConvNet().eval()
    w = tt.AdapterWrapper(copy.deepcopy(model))
    w.add_adapter("a")
    w.add_adapter_layer("a", "conv", tt.Conv2dDoraLayer(r=2))
    w.add_adapter_layer("a", "fc", tt.LinearLoraLayer(r=2))
    randomise([p for _, p in w.named_adapter_parameters()], seed=2)
    x = torch.randn(2, 3, 5, 5)
    expected = out(w, x)
    w.save_adapter(tmp_path, "a")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "TINYTUNE"
    w2 = tt.AdapterWrapper(copy.deepcopy(model))
    w2.load_adapter(tmp_path, "a")
    assert type(dict(w2.adapters["a"].items())["conv"]) is tt.Conv2dDoraLayer
    assert torch.equal(out(w2, x), expected)


# ----------------------------------------------------------------------------------------
# training: gradients and PEFT's trajectory
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2", "conv"])
def test_training_follows_peft(llama, tmp_path, name):
    base, kw, x = MODELS[name]
    base = llama if base is None else base
    peft_model(base, peft.LoraConfig(use_dora=True, **kw())).save_pretrained(tmp_path)
    pm = peft_load(base, tmp_path, is_trainable=True)
    w = tt.AdapterWrapper(copy.deepcopy(base))
    w.load_adapter(tmp_path, is_trainable=True)
    theirs = {_peft_name(n): p for n, p in pm.named_parameters() if p.requires_grad}
    ours = {n.split(".", 1)[1]: p for n, p in w.named_adapter_parameters()}
    assert set(theirs) == set(ours) and any("lora_magnitude_vector" in n for n in ours)

    def loss(model):
        y = model(x)
        y = y.logits if hasattr(y, "logits") else y
        return y.float().pow(2).mean()

    names = sorted(ours)
    # SGD: Adam divides near-zero gradients by their own size, which turns rounding
    # noise into full-size steps; SGD keeps the comparison about the gradients.
    opts = [torch.optim.SGD([m[n] for n in names], lr=0.5, momentum=0.9) for m in (theirs, ours)]
    start = {n: p.detach().clone() for n, p in ours.items()}
    for model in (pm, w):
        model.train()
    for step in range(3):
        for model, opt in zip((pm, w), opts):
            opt.zero_grad()
            loss(model).backward()
        if step == 0:
            # Gradients reach A, B and the magnitude, and equal PEFT's.
            for n in names:
                a, b = theirs[n].grad, ours[n].grad
                assert b is not None and b.abs().sum() > 0, n
                assert torch.allclose(_as_ours(n, a, b), b, atol=1e-6, rtol=1e-4), n
        for opt in opts:
            opt.step()
    moved = max((ours[n].detach() - start[n]).abs().max().item() for n in names)
    assert moved > 1e-2, moved  # the steps went somewhere
    for n in names:  # the same trajectory
        assert torch.allclose(_as_ours(n, theirs[n].detach(), ours[n]), ours[n].detach(), atol=1e-5, rtol=1e-4), n
    for model in (pm, w):
        model.eval()
    assert torch.allclose(out(w, x), out(pm, x), atol=1e-4, rtol=0)


def _peft_name(name: str) -> str:
    """PEFT's parameter name in tinytune's spelling (``<path>.lora_A.weight``, ...)."""
    name = name.removeprefix("base_model.model.").replace(".default", "")
    name = name.replace("lora_embedding_A", "lora_A.weight").replace("lora_embedding_B", "lora_B.weight")
    return name.removesuffix("lora_magnitude_vector.weight") + "lora_magnitude_vector" if "magnitude" in name else name


def _as_ours(name: str, theirs: torch.Tensor, ours: torch.Tensor) -> torch.Tensor:
    """PEFT's embedding factors are stored transposed (lora_embedding_A is (r, num))."""
    return theirs.t() if theirs.shape != ours.shape and theirs.dim() == 2 else theirs.reshape(ours.shape)


# ----------------------------------------------------------------------------------------
# merges
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_merge_unmerge_exact_and_merge_and_unload(llama, tmp_path, name):
    base, kw, x = MODELS[name]
    base = llama if base is None else base
    kw = kw()
    if name == "gpt2":  # GPT-2 ties wte to lm_head: merging into it is refused
        kw = {**kw, "target_modules": ["c_attn", "c_proj"]}
    pm = peft_model(base, peft.LoraConfig(use_dora=True, **kw))
    pm.save_pretrained(tmp_path)
    w = tt.AdapterWrapper(copy.deepcopy(base))
    w.load_adapter(tmp_path)
    before = snapshot(w.get_base_model())
    unmerged = out(w, x)
    w.merge_adapters()
    assert w.merged_adapters == ["default"]
    merged = out(w, x)
    now = snapshot(w.get_base_model())
    assert any(not torch.equal(now[k], before[k]) for k in before)  # the merge changed weights
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=0)
    w.unmerge_adapters()
    assert_state_equal(w.get_base_model(), before)  # bit-identical
    assert torch.equal(out(w, x), unmerged)

    plain = w.merge_and_unload()
    assert torch.allclose(out(plain, x), unmerged, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_plain = pm.merge_and_unload()
    assert torch.allclose(out(plain, x), out(peft_plain, x), atol=1e-5, rtol=0)


def test_merged_weights_change_and_two_adapters_merge_in_order(llama, tmp_path):
    """DoRA merged after a LoRA on the same modules equals running both unmerged."""
    w = tt.AdapterWrapper(copy.deepcopy(llama))
    w.add_adapter_from_config(tt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "lora")
    w.add_adapter_from_config(tt.LoraConfig(use_dora=True, init_lora_weights=False, **LLAMA_DORA), "dora")
    randomise([p for n, p in w.named_adapter_parameters() if "magnitude" in n], seed=9, scale=0.5)
    w.set_active_adapters(["lora", "dora"])
    before = snapshot(w.get_base_model())
    q = "model.layers.0.self_attn.q_proj.weight"
    unmerged = out(w, IDS)
    w.merge_adapters(["lora", "dora"])
    assert not torch.equal(w.get_base_model().state_dict()[q], before[q])
    assert torch.allclose(out(w, IDS), unmerged, atol=1e-5, rtol=0)
    w.unmerge_adapters(["dora"])  # LoRA stays merged; DoRA runs unmerged over it
    assert w.merged_adapters == ["lora"]
    assert torch.allclose(out(w, IDS), unmerged, atol=1e-5, rtol=0)
    w.unmerge_adapters()
    assert_state_equal(w.get_base_model(), before)


# ----------------------------------------------------------------------------------------
# the fused path: DoRA never runs on the plain-LoRA kernels
# ----------------------------------------------------------------------------------------
def test_fused_modes_keep_dora_on_the_pytorch_path(llama):
    cfg = tt.LoraConfig(use_dora=True, init_lora_weights=False, r=4, target_modules=["q_proj", "down_proj"])
    w = tt.AdapterWrapper.from_config(copy.deepcopy(llama), cfg)
    randomise([p for _, p in w.named_adapter_parameters()], seed=1)
    with tt.kernel_mode("torch"):
        expected = out(w, IDS)
    with tt.kernel_mode("auto"):
        assert torch.equal(out(w, IDS), expected)
    with tt.kernel_mode("triton"), pytest.raises(tt.KernelUnavailableError, match="DoRA"):
        out(w, IDS)
