"""Hooks and the call state (issue 13): ``disable_adapter()`` blocks, mixed calls that leave
no hook behind, ``generate()`` expansions, odd module names, nothing left on the call stack,
``swap_base_model`` checks and wrapping a model twice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tinytune
import tinytune.hooks
from tinytune import (
    AdapterStateError,
    AdapterWrapper,
    IA3Config,
    LoraConfig,
    MixedBatchError,
    UnsupportedModuleError,
)

from conftest import assert_state_equal, hook_count, small, snapshot, tiny_llama


def lora(targets=("lin0", "lin1"), **kw) -> LoraConfig:
    return LoraConfig(target_modules=list(targets), init_lora_weights=False, **kw)


X = torch.randn(4, 10, generator=torch.Generator().manual_seed(3))


def alone(w: AdapterWrapper, names: list[str], x: torch.Tensor = X) -> torch.Tensor:
    """``x`` run with exactly ``names`` active, restoring the active set after."""
    before = w.active_adapters
    w.set_active_adapters(names)
    try:
        return w(x)
    finally:
        w.set_active_adapters(before)


# ----------------------------------------------------------------------------------------
# 2. disable_adapter() and the calls made inside it
# ----------------------------------------------------------------------------------------
def test_delete_inside_disable_block_keeps_state_consistent():
    base = small()
    ref = base(X)
    w = AdapterWrapper(base)
    w.add_adapter_from_config(lora(), "a")
    with_a = w(X)
    with w.disable_adapter():
        torch.testing.assert_close(w(X), ref, rtol=0, atol=0)
        w.delete_adapter("a")
        assert w.active_adapters == []
    assert w.active_adapters == []
    torch.testing.assert_close(w(X), ref, rtol=0, atol=0)
    w.merge_adapters()  # used to raise: "a" was still listed as active
    w.unmerge_adapters()
    torch.manual_seed(0)
    w.add_adapter_from_config(lora(), "a")
    assert w.active_adapters == ["a"]
    assert len(w.registry.sites["lin0"].chain) == 1  # applied once, not twice
    assert not torch.allclose(w(X), ref)
    w2 = AdapterWrapper(small())
    torch.manual_seed(0)
    w2.add_adapter_from_config(lora(), "a")
    torch.testing.assert_close(w(X), w2(X), rtol=0, atol=0)
    del with_a


def test_activation_inside_disable_block_is_kept_after_it():
    w = AdapterWrapper(small())
    w.add_adapter_from_config(lora(), "a")
    w.add_adapter_from_config(lora(r=4), "b", activate=False)
    ref = alone(w, [])
    with w.disable_adapter():
        w.set_active_adapters("b")
        w.add_adapter_from_config(lora(r=2), "c")  # activate=True
        assert w.active_adapters == ["b", "c"]
        torch.testing.assert_close(w(X), ref, rtol=0, atol=0)  # still disabled
        with w.disable_adapter():  # nests
            pass
        torch.testing.assert_close(w(X), ref, rtol=0, atol=0)
        with pytest.raises(AdapterStateError, match="disable_adapter"):
            w.merge_adapters()
        with pytest.raises(AdapterStateError):
            w.merge_and_unload()
        # Mixed rows inside the block run the base model too, as in PEFT.
        torch.testing.assert_close(w(X, adapter_names=["a", "b", "c", "a"]), ref, rtol=0, atol=0)
    assert w.active_adapters == ["b", "c"]
    assert hook_count(w.model) > 0
    out = w(X)
    assert not torch.allclose(out, ref)
    torch.testing.assert_close(out, alone(w, ["b", "c"]))


# ----------------------------------------------------------------------------------------
# 3. mixed calls leave no hook behind; generate() expansions
# ----------------------------------------------------------------------------------------
class Folding(nn.Module):
    """Reshapes the batch before an adapted layer (rows become tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 32)
        self.lin1 = nn.Linear(32, 4)

    def forward(self, x):
        h = self.lin0(x)
        return self.lin1(h.reshape(-1, 2, 32)).reshape(x.shape[0], 4)


def test_failed_mixed_call_leaves_no_hooks():
    torch.manual_seed(0)
    w = AdapterWrapper(Folding().eval())
    w.add_adapter_from_config(lora(), "a", activate=False)
    w.add_adapter_from_config(IA3Config(target_modules=["lin0", "lin1"],
                                        feedforward_modules=["lin1"]), "b", activate=False)
    before = hook_count(w.model)
    layout = w.registry.hook_layout
    with pytest.raises(MixedBatchError, match="lin1"):
        w(X, adapter_names=["a", "b", "a", "__base__"])
    assert hook_count(w.model) == before == 0
    assert w.registry.hook_layout == layout
    assert all(getattr(s.call_state, "mixed", None) is None for s in w.registry.sites.values())


def test_successful_mixed_call_leaves_no_hooks_on_inactive_modules():
    w = AdapterWrapper(small())
    w.add_adapter_from_config(lora(["lin0"]), "a")  # active on lin0 only
    w.add_adapter_from_config(lora(["lin1"]), "b", activate=False)
    hooks = {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in w.model.named_modules()}
    out = w(X, adapter_names=["a", "b", "b", "__base__"])
    torch.testing.assert_close(out[1:2], alone(w, ["b"], X[1:2]))
    after = {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in w.model.named_modules()}
    # lin0's active LoRA needs a post-hook, plus a pre-hook where the fused kernels can
    # run (Triton present with CUDA or TRITON_INTERPRET=1: see tinytune.dispatch).
    assert after == hooks and hooks["lin1"] == 0
    assert hooks["lin0"] == (2 if w.registry.sites["lin0"].fusable else 1)


def test_nested_mixed_call_keeps_the_outer_calls_hooks():
    # Hooks added for a mixed call stay while any call (here an outer one on the same
    # thread) still uses them.
    w = AdapterWrapper(small())
    w.add_adapter_from_config(lora(), "a", activate=False)
    names = ["a", "__base__", "a", "a"]
    expected = w(X, adapter_names=names)
    assert hook_count(w.model) == 0
    inner_out = []

    def nested(module, args, output):
        if not inner_out:
            inner_out.append(None)
            inner_out[0] = w(X, adapter_names=["__base__"] * 4)

    handle = w.model.lin0.register_forward_hook(nested)
    out = w(X, adapter_names=names)
    handle.remove()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # lin1 still adapted
    torch.testing.assert_close(inner_out[0], alone(w, []), rtol=0, atol=0)
    assert hook_count(w.model) == 0


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    model = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1, vocab_size=64)
    w = AdapterWrapper(model)
    for name, r in (("a", 4), ("b", 8)):
        w.add_adapter_from_config(
            LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=r,
                       init_lora_weights=False), name, activate=False,
        )
    with torch.no_grad():
        for p in w.adapter_parameters():
            p.mul_(4.0)
    return transformers, w


def test_generate_num_return_sequences_and_generation_config_num_beams():
    transformers, w = _tiny_llama()
    ids = torch.randint(1, 64, (2, 4), generator=torch.Generator().manual_seed(0))
    names = ["a", "b"]
    before = hook_count(w.model)
    with torch.no_grad():
        # Sampling with top_k=1 is greedy, so each returned sequence equals the row's
        # greedy continuation, run alone.
        kw = dict(max_new_tokens=4, do_sample=True, top_k=1, num_return_sequences=2, pad_token_id=0)
        out = w.generate(input_ids=ids, adapter_names=names, **kw)
        assert out.shape[0] == 4
        for i, n in enumerate(names):
            w.set_active_adapters(n)
            row = w.generate(input_ids=ids[i : i + 1], max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(out[2 * i], row[0]) and torch.equal(out[2 * i + 1], row[0])
        w.set_active_adapters([])
        gc = transformers.GenerationConfig(num_beams=2, max_new_tokens=4, pad_token_id=0)
        out = w.generate(input_ids=ids, adapter_names=names, generation_config=gc)
        for i, n in enumerate(names):
            w.set_active_adapters(n)
            row = w.generate(input_ids=ids[i : i + 1], generation_config=gc)[0]
            assert torch.equal(out[i, : len(row)], row)
        w.set_active_adapters([])
    assert hook_count(w.model) == before == 0


# ----------------------------------------------------------------------------------------
# 4. module names containing "/"
# ----------------------------------------------------------------------------------------
class Slashed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({"a/b": nn.Linear(10, 8), "c": nn.Linear(8, 4)})

    def forward(self, x):
        return self.blocks["c"](torch.relu(self.blocks["a/b"](x)))


def test_module_names_with_slashes(tmp_path):
    torch.manual_seed(0)
    model = Slashed().eval()
    saved = snapshot(model)
    w = AdapterWrapper(model)
    w.add_adapter_from_config(lora(["a/b", "c"]), "x")
    assert w.adapters["x"].layer_names == ["blocks.a/b", "blocks.c"]
    assert "blocks.a/b" in w.adapters["x"]
    out = w(X)
    w.merge_adapters()
    torch.testing.assert_close(w(X), out, rtol=1e-5, atol=1e-6)
    w.unmerge_adapters()
    w.save_adapter(str(tmp_path / "x"), "x")
    w.load_adapter(str(tmp_path / "x"), "y", activate=False)
    torch.testing.assert_close(alone(w, ["y"]), out, rtol=0, atol=0)
    torch.testing.assert_close(w(X, adapter_names=["x", "y", "x", "y"]), out)
    sd = w.state_dict()
    fresh = AdapterWrapper(Slashed().eval())
    fresh.add_adapter_from_config(lora(["a/b", "c"]), "x")
    fresh.add_adapter_from_config(lora(["a/b", "c"]), "y", activate=False)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(X), out, rtol=0, atol=0)
    assert_state_equal(w.unload(), saved)


def test_module_names_that_are_module_dict_attributes():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.keys = nn.Linear(10, 4)
            self.update = nn.Linear(4, 4)

        def forward(self, x):
            return self.update(self.keys(x))

    w = AdapterWrapper(Odd())
    w.add_adapter_from_config(lora(["keys", "update"]), "x")
    assert w.adapters["x"].layer_names == ["keys", "update"]
    out = w(X)
    w.merge_adapters()
    torch.testing.assert_close(w(X), out, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# 5. leaks
# ----------------------------------------------------------------------------------------
def test_failing_plain_call_leaves_nothing_on_the_call_stack():
    w = AdapterWrapper(small())
    w.add_adapter_from_config(IA3Config(target_modules=["lin0"], feedforward_modules=["lin0"]), "i")
    w.add_adapter_from_config(lora(["lin0"]), "l")
    w.set_active_adapters(["i", "l"])  # IA3 scales the input LoRA reads: the stack path
    site = w.registry.sites["lin0"]
    assert site.needs_stack
    ok = w(X)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            w(X.double())
    assert site.call_state.stack == []
    torch.testing.assert_close(w(X), ok, rtol=0, atol=0)
    assert site.call_state.stack == []


def test_hook_layout_numbers_need_no_registry():
    assert not hasattr(tinytune.hooks, "_LAYOUT_IDS")
    a = AdapterWrapper(small())
    b = AdapterWrapper(small())
    for w in (a, b):
        w.add_adapter_from_config(lora(), "x")
    assert a.registry.hook_layout == b.registry.hook_layout
    a.set_active_adapters([])
    assert a.registry.hook_layout != b.registry.hook_layout
    c = AdapterWrapper(small())
    c.add_adapter_from_config(lora(), "x", activate=False)
    assert a.registry.hook_layout == c.registry.hook_layout
    assert a.registry.hook_layout >= 0


# ----------------------------------------------------------------------------------------
# 8. swap_base_model compares what adapters depend on
# ----------------------------------------------------------------------------------------
class Conv(nn.Module):
    def __init__(self, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("kw", [dict(stride=2), dict(padding=0)])
def test_swap_refuses_conv_with_other_settings(kw):
    w = AdapterWrapper(Conv())
    w.add_adapter_from_config(LoraConfig(target_modules=["conv"], init_lora_weights=False), "a")
    x = torch.randn(1, 3, 6, 6)
    out = w(x)
    other = Conv(**kw)
    grads = [p.requires_grad for p in other.parameters()]
    with pytest.raises(UnsupportedModuleError, match="same settings"):
        w.swap_base_model(other)
    assert [p.requires_grad for p in other.parameters()] == grads and hook_count(other) == 0
    torch.testing.assert_close(w(x), out, rtol=0, atol=0)


def test_swap_refuses_modules_to_save_copies_of_another_dtype():
    w = AdapterWrapper(small())
    w.add_adapter_from_config(LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]), "a")
    with pytest.raises(UnsupportedModuleError, match="modules_to_save copy"):
        w.swap_base_model(small().to(torch.bfloat16))
    # Converting the wrapper first converts the copies: then the swap fits.
    w.to(torch.bfloat16)
    w.swap_base_model(small().to(torch.bfloat16))
    assert w(X.bfloat16()).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------
# 9. wrapping a model twice
# ----------------------------------------------------------------------------------------
def test_wrapping_a_wrapped_model_is_refused_even_without_hooks():
    model = small()
    model.lin1.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    first = AdapterWrapper(model)
    first.add_adapter_from_config(lora(), "a", activate=False)
    assert hook_count(model) == 0
    with pytest.raises(AdapterStateError, match="already wrapped"):
        AdapterWrapper(model)
    assert first.unload() is model
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    second = AdapterWrapper(model)  # fine once the first let go
    second.unload()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    # swap_base_model onto a model another wrapper holds is refused the same way.
    third = AdapterWrapper(model)
    with pytest.raises(AdapterStateError, match="already wrapped"):
        first.swap_base_model(model)
    third.unload()


