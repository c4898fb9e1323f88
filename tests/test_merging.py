"""Merging: exact merge/unmerge in each dtype, partial unmerges, ``merge_and_unload``,
failing merges that change nothing; state dicts of a merged wrapper hold the unmerged
base; merges work in row chunks with host copies instead of doubling memory; subclasses
merge their own delta."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tinytune
from tinytune import AdapterWrapper, IA3Config, LinearLoraLayer, LoraConfig
from tinytune.layers import row_chunks

from conftest import SmallMLP, Tower, assert_state_equal, hook_count, randomize, small, snapshot


def lora(targets=("lin0", "lin1"), **kw) -> LoraConfig:
    return LoraConfig(target_modules=list(targets), init_lora_weights=False, **kw)


X = torch.randn(4, 10, generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------------------
# merging
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, atol",
    [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)],
)
def test_merge_unmerge_exact_in_each_dtype(dtype, atol):
    torch.manual_seed(0)
    tower = Tower().to(dtype).eval()
    ids = torch.randint(0, 32, (2, 5))
    state = snapshot(tower)
    wrapper = AdapterWrapper.from_config(
        tower, LoraConfig(target_modules=["q_proj", "v_proj", "embed"], r=4, init_lora_weights=False)
    )
    wrapper.add_adapter_from_config(
        IA3Config(target_modules=["up_proj", "down_proj"], feedforward_modules=["down_proj"]), "ia3"
    )
    randomize(wrapper)
    # zero IA3 scales: merging multiplies by 0, an unmerge by division could not recover
    with torch.no_grad():
        wrapper.adapters["ia3"]["layers.0.up_proj"].ia3_l[:3] = 0
    y = wrapper(ids)
    for _ in range(25):
        wrapper.merge_adapters()
        wrapper.unmerge_adapters()
        assert_state_equal(tower, state)
    wrapper.merge_adapters()
    assert wrapper.merged_adapters == ["default", "ia3"]
    assert hook_count(tower) == 0  # merged: no hook work at all
    torch.testing.assert_close(wrapper(ids), y, atol=atol, rtol=atol)
    wrapper.unmerge_adapters()
    assert_state_equal(tower, state)
    assert torch.equal(wrapper(ids), y)


def test_partial_unmerge_keeps_the_rest_merged(mlp):
    x = torch.randn(3, 10)
    state = snapshot(mlp)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules="lin0", init_lora_weights=False), "a")
    # b on another module than a: merged adapters act innermost, so the two must commute
    wrapper.add_adapter_from_config(IA3Config(target_modules=["lin1"], init_ia3_weights=False), "b")
    y = wrapper(x)
    wrapper.merge_adapters()
    wrapper.unmerge_adapters("a")
    assert wrapper.merged_adapters == ["b"]
    torch.testing.assert_close(wrapper(x), y, atol=1e-5, rtol=1e-5)
    wrapper.unmerge_adapters()
    assert_state_equal(mlp, state)


def test_merge_and_unload(mlp):
    x = torch.randn(3, 10)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    y = wrapper(x)
    base = wrapper.merge_and_unload()
    assert base is mlp and hook_count(base) == 0
    torch.testing.assert_close(base(x), y, atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad for p in base.parameters())


def test_merging_a_failing_layer_leaves_weights_as_they_were(mlp):
    class Boom(LinearLoraLayer):
        def merge(self, module):
            raise RuntimeError("boom")

    x = torch.randn(2, 10)
    state = snapshot(mlp)
    wrapper = AdapterWrapper.from_config(mlp, LoraConfig(target_modules="lin0", init_lora_weights=False), "a")
    wrapper.add_adapter("b")
    wrapper.add_adapter_layer("b", "lin1", Boom)
    y = wrapper(x)
    with pytest.raises(RuntimeError, match="boom"):
        wrapper.merge_adapters()
    assert wrapper.merged_adapters == []
    assert_state_equal(mlp, state)
    assert torch.equal(wrapper(x), y)


# ----------------------------------------------------------------------------------------
# 10. state_dict while merged
# ----------------------------------------------------------------------------------------
def test_state_dict_of_a_merged_wrapper_holds_the_unmerged_base():
    base = small()
    saved = snapshot(base)
    w = AdapterWrapper(base)
    w.add_adapter_from_config(lora(), "a")
    randomize(w)
    out = w(X)
    unmerged_sd = {k: v.clone() for k, v in w.state_dict().items()}
    w.merge_adapters()
    merged_sd = w.state_dict()
    assert merged_sd.keys() == unmerged_sd.keys()
    for k in unmerged_sd:
        assert torch.equal(merged_sd[k], unmerged_sd[k]), k
    fresh = AdapterWrapper(small())
    fresh.add_adapter_from_config(lora(), "a")
    fresh.load_state_dict(merged_sd)
    torch.testing.assert_close(fresh(X), out, rtol=1e-5, atol=1e-6)  # applied once
    assert_state_equal(fresh.unload(), saved)


def test_load_state_dict_into_a_merged_wrapper_keeps_the_loaded_base():
    w = AdapterWrapper(small())
    w.add_adapter_from_config(lora(), "a")
    w.merge_adapters()
    torch.manual_seed(5)
    donor = AdapterWrapper(SmallMLP().eval())
    donor.add_adapter_from_config(lora(), "a")
    randomize(donor)
    sd = donor.state_dict()
    w.load_state_dict(sd)
    assert w.merged_adapters == ["a"]
    torch.testing.assert_close(w(X), donor(X), rtol=1e-5, atol=1e-6)
    w.unmerge_adapters()
    assert_state_equal(w.model, snapshot(donor.model))


# ----------------------------------------------------------------------------------------
# merges must not double memory
# ----------------------------------------------------------------------------------------
def test_merge_keeps_host_copies_and_merge_and_unload_keeps_none(monkeypatch):
    w = AdapterWrapper(small())
    w.add_adapter_from_config(lora(), "a")
    w.add_adapter_from_config(IA3Config(target_modules=["lin1"]), "b")
    randomize(w)
    out = w(X)
    w.merge_adapters(["a"])
    assert all(t.device.type == "cpu" for saved in w.registry.backups.values() for t in saved.values())
    w.unmerge_adapters()
    calls = []
    original = AdapterWrapper._merge_one

    def spy(self, name, backup=True):
        calls.append(backup)
        return original(self, name, backup)

    monkeypatch.setattr(AdapterWrapper, "_merge_one", spy)
    clones = []
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t.shape) or t)
    merged = w.merge_and_unload()
    monkeypatch.undo()
    assert calls == [False, False] and not clones
    torch.testing.assert_close(merged(X), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_chunked_merge_equals_whole_merge(dtype, fan_in_fan_out):
    torch.manual_seed(0)
    lin = nn.Linear(64, 96).to(dtype)
    layer = tinytune.LinearLoraLayer(r=4, init_lora_weights=False)
    layer.reset_params("lin", lin)
    if fan_in_fan_out:  # emulate transformers' Conv1D: weight stored (in, out)
        layer.fan_in_fan_out = True
        lin.weight = nn.Parameter(lin.weight.detach().t().contiguous())
    whole = (lin.weight.float() + layer.delta_weight()).to(dtype)
    assert len(row_chunks(lin.weight)) >= 8  # each chunk at most an eighth of the weight
    with torch.no_grad():
        layer.merge(lin)
    torch.testing.assert_close(lin.weight, whole, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)


def test_row_chunks_bound_the_temporaries():
    w = torch.empty(1000, 300, dtype=torch.bfloat16)
    chunks = row_chunks(w)
    assert chunks[0][0] == 0 and chunks[-1][1] == 1000
    assert all(a < b for a, b in chunks)
    biggest = max(b - a for a, b in chunks) * 300 * 4  # fp32 bytes
    assert biggest <= w.numel() * w.element_size() // 8
    assert row_chunks(torch.empty(1, 5)) == [(0, 1)]


def test_unmerge_is_bit_exact_with_host_copies():
    w = AdapterWrapper(small().to(torch.bfloat16))
    saved = snapshot(w.model)
    w.add_adapter_from_config(lora(), "a")
    w.add_adapter_from_config(IA3Config(target_modules=["lin0"], feedforward_modules=["lin0"]), "b")
    randomize(w)
    for _ in range(3):
        w.merge_adapters()
        w.unmerge_adapters()
    assert_state_equal(w.model, saved)

def test_subclass_overriding_only_delta_weight_merges_its_own_delta():
    class Doubled(tinytune.LinearLoraLayer):
        def delta_weight(self):
            return 2 * super().delta_weight()

    torch.manual_seed(0)
    lin = nn.Linear(16, 24)
    layer = Doubled(r=2, init_lora_weights=False)
    layer.reset_params("lin", lin)
    expected = lin.weight.detach() + layer.delta_weight()  # twice the plain LoRA update
    with torch.no_grad():
        layer.merge(lin)
    torch.testing.assert_close(lin.weight, expected, rtol=0, atol=1e-6)
