"""DoRA in mixed batches, serving slots, hot-swaps and ``torch.compile``.

Each row of a mixed batch (DoRA rows next to LoRA, IA³ and ``__base__`` rows) equals
that row run alone with only its adapter; a hot-swap recomputes DoRA's norm; compiled
models have no graph break and do not recompile when adapters or assignments change.
"""

from __future__ import annotations

import copy

import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import tinytune as tt

transformers = pytest.importorskip("transformers")

from conftest import randomize, small, tiny_llama  # noqa: E402

IDS = torch.tensor([[3, 17, 99, 4, 60, 5], [8, 1, 42, 42, 7, 0], [5, 6, 7, 8, 9, 10]] * 2)
ROWS = ["dora", "lora", "__base__", "ia3", "dora2", "dora"]


class Logits(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids, **kw):
        return self.lm(input_ids=ids, **kw).logits


def dora_config(**kw):
    base = dict(
        use_dora=True, r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
    )
    return tt.LoraConfig(**{**base, **kw})


def wrapped(seed: int = 1) -> tt.AdapterWrapper:
    """A one-layer Llama with two DoRA adapters, a LoRA and an IA³ (random weights)."""
    w = tt.AdapterWrapper(Logits(tiny_llama(num_hidden_layers=1)))
    w.add_adapter_from_config(dora_config(), "dora")
    w.add_adapter_from_config(dora_config(r=2, lora_alpha=2), "dora2", activate=False)
    w.add_adapter_from_config(tt.LoraConfig(r=2, target_modules=["q_proj", "up_proj"], init_lora_weights=False), "lora")
    w.add_adapter_from_config(
        tt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
        "ia3",
    )
    randomize(w, seed)
    return w


def alone(w, x, names):
    """Each row run alone with only its adapter active."""
    active = w.active_adapters
    outs = []
    try:
        for i, name in enumerate(names):
            w.set_active_adapters([] if name == "__base__" else [name])
            outs.append(w(x[i : i + 1]))
    finally:
        w.set_active_adapters(active)
    return torch.cat(outs)


def test_mixed_batch_rows_equal_running_alone():
    w = wrapped()
    with torch.no_grad():
        expected = alone(w, IDS, ROWS)
        assert not torch.allclose(expected[0], expected[2], atol=1e-3)
        got = w(IDS, adapter_names=ROWS)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # With autograd: the DoRA rows' magnitudes get gradients from their rows only.
    w.train()
    w(IDS, adapter_names=["dora", "lora", "__base__", "ia3", "dora", "lora"]).pow(2).mean().backward()
    mags = {n: p.grad for n, p in w.named_adapter_parameters() if "magnitude" in n}
    assert all(g is not None and g.abs().sum() > 0 for n, g in mags.items() if n.startswith("dora.")), mags
    assert all(g is None or g.abs().sum() == 0 for n, g in mags.items() if n.startswith("dora2."))


def test_reserved_slots_and_row_adapters():
    w = wrapped()
    with torch.no_grad():
        expected = alone(w, IDS, ROWS)
        w.reserve_adapter_slots(max_adapters=4, max_rank=8, max_rows=8)
        torch.testing.assert_close(w(IDS, adapter_names=ROWS), expected, rtol=0, atol=1e-5)
        w.set_row_adapters(ROWS)
        try:
            torch.testing.assert_close(w(IDS), expected, rtol=0, atol=1e-5)
        finally:
            w.clear_row_adapters()


def test_hotswap_recomputes_the_norm(tmp_path):
    w = wrapped()
    other = wrapped(seed=7)
    other.save_adapter(tmp_path / "d", "dora")
    with torch.no_grad():
        want = alone(other, IDS, ["dora"] * len(IDS))
        before = w(IDS, adapter_names=["dora"] * len(IDS))
        assert not torch.allclose(before, want, atol=1e-3)
        layer = dict(w.adapters["dora"].items())["lm.model.layers.0.self_attn.q_proj"]
        scale = layer.dora_scale().clone()
        w.hotswap_adapter(tmp_path / "d", "dora")
        assert not torch.allclose(layer.dora_scale(), scale)
        torch.testing.assert_close(w(IDS, adapter_names=["dora"] * len(IDS)), want, rtol=0, atol=1e-5)
        w.set_active_adapters(["dora"])
        torch.testing.assert_close(w(IDS), want, rtol=0, atol=1e-5)


def test_compiled_switch_hotswap_and_assignment_do_not_recompile(tmp_path):
    """One graph for plain calls: switching DoRA adapters of the same structure, a
    hot-swap (the norm recomputed), in-place loads; no graph breaks (fullgraph)."""
    w = wrapped()
    wrapped(seed=7).save_adapter(tmp_path / "d", "dora")
    w.set_active_adapters(["dora"])
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(w, backend=counter, fullgraph=True)
    x = IDS[:2]
    with torch.no_grad():
        first = compiled(x)
        torch.testing.assert_close(first, w(x), rtol=1e-5, atol=1e-5)
        w.hotswap_adapter(tmp_path / "d", "dora")  # same ranks: one graph
        second = compiled(x)
        assert not torch.allclose(first, second, atol=1e-3)
        torch.testing.assert_close(second, w(x), rtol=1e-5, atol=1e-5)
        state = w.state_dict()
        key = next(k for k in state if k.startswith("adapters.dora.") and "magnitude" in k)
        state[key] = state[key] * 1.5
        w.load_state_dict(state)
        third = compiled(x)
        assert not torch.allclose(second, third, atol=1e-3)
        torch.testing.assert_close(third, w(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_compiled_row_adapters_do_not_recompile(tmp_path):
    """Served rows (``set_row_adapters``, whose preparation runs outside the graph by
    design, as for LoRA): new assignments and a DoRA hot-swap replay without
    recompiling."""
    torch._dynamo.reset()
    w = wrapped()
    wrapped(seed=7).save_adapter(tmp_path / "d", "dora2")
    assignments = [ROWS, ["lora", "dora2", "dora", "__base__", "ia3", "dora2"], ["dora2"] * 6]
    with torch.no_grad():
        w.reserve_adapter_slots(max_adapters=4, max_rank=8, max_rows=6)
        compiled = torch.compile(w)
        w.set_row_adapters(ROWS)
        compiled(IDS)  # warm-up
        with torch._dynamo.config.patch(error_on_recompile=True):
            for names in assignments:
                x = IDS[: len(names)]
                torch.testing.assert_close(served(w, compiled, x, names), alone(w, x, names), rtol=1e-5, atol=1e-5)
            w.hotswap_adapter(tmp_path / "d", "dora2")
            got = served(w, compiled, IDS, assignments[1])
            torch.testing.assert_close(got, alone(w, IDS, assignments[1]), rtol=1e-5, atol=1e-5)
            # An in-place edit with no tinytune call between: each served call refreshes
            # the scales before the graph runs.
            for _, layer in w.adapters["dora"].items():
                layer.lora_magnitude_vector.mul_(1.3)
            got = served(w, compiled, IDS, ROWS)
            torch.testing.assert_close(got, alone(w, IDS, ROWS), rtol=1e-5, atol=1e-5)


def served(w, compiled, x, names):
    """``compiled(x)`` with rows assigned by ``set_row_adapters`` (cleared after)."""
    w.set_row_adapters(names)
    try:
        return compiled(x)
    finally:
        w.clear_row_adapters()


def test_mixed_batches_with_dora_rows_run_on_the_per_row_kernel():
    """DoRA rows next to LoRA and base rows: mode "triton" runs the per-row kernel with
    DoRA's column scales (CPU tensors reach it under TRITON_INTERPRET=1) and gives the
    PyTorch path's rows."""
    w = tt.AdapterWrapper(Logits(tiny_llama(num_hidden_layers=1)))
    w.add_adapter_from_config(dora_config(target_modules=["q_proj", "down_proj"]), "dora")
    w.add_adapter_from_config(tt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "lora")
    randomize(w)
    rows = ["dora", "lora", "__base__", "dora"]
    with torch.no_grad():
        with tt.kernel_mode("torch"):
            expected = w(IDS[:4], adapter_names=rows)
        with tt.kernel_mode("auto"):
            torch.testing.assert_close(w(IDS[:4], adapter_names=rows), expected, rtol=0, atol=0)
        if os.environ.get("TRITON_INTERPRET") == "1":
            with tt.kernel_mode("triton"):
                torch.testing.assert_close(w(IDS[:4], adapter_names=rows), expected, rtol=1e-4, atol=1e-4)


def test_compiled_plain_calls_with_reserved_slots_and_hotswap(tmp_path):
    """Reserved slots: the cached scale is a view of the slot's row; a hot-swap
    rewrites the row and the compiled plain call sees the new scale without
    recompiling."""
    torch._dynamo.reset()
    w = wrapped()
    wrapped(seed=7).save_adapter(tmp_path / "d", "dora")
    w.set_active_adapters(["dora"])
    x = IDS[:2]
    with torch.no_grad():
        w.reserve_adapter_slots(max_adapters=4, max_rank=8)
        w(x, adapter_names=["dora", "lora"])  # the adapters move into their slots
        compiled = torch.compile(w)
        first = compiled(x)
        torch.testing.assert_close(first, w(x), rtol=1e-5, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            w.hotswap_adapter(tmp_path / "d", "dora")
            second = compiled(x)
        assert not torch.allclose(first, second, atol=1e-3)
        torch.testing.assert_close(second, alone(w, x, ["dora", "dora"]), rtol=1e-5, atol=1e-5)


def test_compiled_training_fullgraph_follows_eager():
    """With autograd the norm is computed in the graph (detached); training steps do
    not recompile and the compiled model follows the eager one."""
    torch._dynamo.reset()
    w = tt.AdapterWrapper(small())
    w.add_adapter_from_config(tt.LoraConfig(use_dora=True, r=2, target_modules=["lin0", "lin1"], init_lora_weights=False), "dora")
    randomize(w)
    twin = copy.deepcopy(w)
    x = torch.randn(4, 3, 10)
    counter = CompileCounterWithBackend("aot_eager")  # graph breaks and recompiles are the point
    compiled = torch.compile(w, backend=counter, fullgraph=True)
    models = (compiled, twin)
    opts = [torch.optim.SGD(list(m.adapter_parameters()), lr=0.5) for m in (w, twin)]
    for m in (w, twin):
        m.train()
    for _ in range(2):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for (n, a), (_, b) in zip(w.named_adapter_parameters(), twin.named_adapter_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    assert counter.frame_count == 1
