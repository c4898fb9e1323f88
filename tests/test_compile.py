"""torch.compile sees straight through tinytune's hooks.

What is checked, on CPU with small models (a plain MLP and a one-layer Llama built from a
``transformers`` config):

* no graph breaks (``torch._dynamo.explain``) with LoRA, IA3, LoRA+IA3 in one adapter,
  and several active adapters; ``fullgraph=True`` with inductor gives the eager outputs;
* no recompilation when adapter weights change (training steps, in-place loads) or when
  the active adapters are switched to others of the same structure (same layer types
  and shapes; ``lora_alpha`` may differ). Compilations are counted, not timed;
* a merged wrapper compiles to the bare model's graph.

Compiling costs seconds per graph on the CPU, so the tests are few and the models tiny.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import tinytune.hooks
from tinytune import AdapterWrapper, IA3Config, LinearIA3Layer, LinearLoraLayer, LoraConfig

transformers = pytest.importorskip("transformers")

from conftest import tiny_llama  # noqa: E402

LLAMA_LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Which modules each kind of adapter targets, per model. IA3 scales one feed-forward
# input (a pre-hook) and other outputs (post-hooks); "mix" puts LoRA and IA3 layers in
# one adapter.
TARGETS = {
    "mlp": {
        "lora": ["lin0", "lin1", "lin2"],
        "ia3": ["lin0", "lin1", "lin2"],
        "ia3_ff": ["lin1"],
        "mix_lora": ["lin0", "lin2"],
        "mix_ia3": ["lin1"],
    },
    "llama": {
        "lora": LLAMA_LORA,
        "ia3": ["k_proj", "v_proj", "down_proj"],
        "ia3_ff": ["down_proj"],
        "mix_lora": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
        "mix_ia3": ["k_proj", "down_proj"],
    },
}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 32)
        self.lin1 = nn.Linear(32, 32)
        self.lin2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class Logits(nn.Module):
    """A causal LM returning its logits tensor, so outputs compare directly."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits


def build(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP().eval(), torch.randn(3, 5, 10)
    llama = tiny_llama(
        None, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64,
    )
    model = Logits(llama).eval()
    return model, torch.randint(0, 64, (2, 8))


def lora(model_kind: str, **kw) -> LoraConfig:
    return LoraConfig(target_modules=TARGETS[model_kind]["lora"], init_lora_weights=False, **kw)


def ia3(model_kind: str) -> IA3Config:
    t = TARGETS[model_kind]
    return IA3Config(
        target_modules=t["ia3"], feedforward_modules=t["ia3_ff"], init_ia3_weights=False
    )


def add_mix(
    wrapper: AdapterWrapper, model_kind: str, name: str, alpha: float = 8, activate: bool = True
) -> None:
    """One adapter holding LoRA layers on some modules and IA3 layers on others."""
    t = TARGETS[model_kind]
    wrapper.add_adapter(name, activate=activate)
    for path, _ in wrapper.model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if leaf in t["mix_lora"]:
            wrapper.add_adapter_layer(
                name, path, lambda: LinearLoraLayer(r=4, lora_alpha=alpha, init_lora_weights=False)
            )
        elif leaf in t["mix_ia3"]:
            ff = leaf in t["ia3_ff"]
            wrapper.add_adapter_layer(
                name, path, lambda ff=ff: LinearIA3Layer(is_feedforward=ff, init_ia3_weights=False)
            )


def wrap(model_kind: str, adapters: str) -> tuple[AdapterWrapper, torch.Tensor, torch.Tensor]:
    """The wrapped model, an input, and the bare model's output on it."""
    model, x = build(model_kind)
    with torch.no_grad():
        bare_out = model(x)
    w = AdapterWrapper(model)
    if adapters == "lora":
        w.add_adapter_from_config(lora(model_kind), "lora")
    elif adapters == "ia3":
        w.add_adapter_from_config(ia3(model_kind), "ia3")
    elif adapters == "lora+ia3":
        add_mix(w, model_kind, "mix")
    elif adapters == "several":
        # IA3 innermost: on the feed-forward module its pre-hook runs inside LoRA's
        # post-hook (the site's input-stack path); on the others two post-hooks chain.
        w.add_adapter_from_config(ia3(model_kind), "ia3")
        w.add_adapter_from_config(lora(model_kind), "lora")
        add_mix(w, model_kind, "mix")
        assert w.active_adapters == ["ia3", "lora", "mix"]
        assert any(site.needs_stack for site in w.registry.sites.values())
    else:
        raise ValueError(adapters)
    return w, x, bare_out


KINDS = ["lora", "ia3", "lora+ia3", "several"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("adapters", KINDS)
@pytest.mark.parametrize("model_kind", ["mlp", "llama"])
def test_no_graph_breaks(model_kind, adapters):
    w, x, bare_out = wrap(model_kind, adapters)
    with torch.no_grad():
        eager = w(x)
        explanation = dynamo.explain(w)(x)
    assert not torch.allclose(eager, bare_out), "the adapters must change the output"
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("adapters", KINDS)
def test_fullgraph_inductor_matches_eager_mlp(adapters):
    w, x, _ = wrap("mlp", adapters)
    compiled = torch.compile(w, backend="inductor", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), w(x), rtol=1e-5, atol=1e-6)


def test_fullgraph_inductor_llama_several_adapters_and_switch():
    # LoRA, IA3 (pre- and post-hooks) and a LoRA+IA3 adapter, all active at once.
    w, x, bare_out = wrap("llama", "several")
    # A second set of the same structure, with other weights and another alpha.
    w.add_adapter_from_config(ia3("llama"), "ia3_b", activate=False)
    w.add_adapter_from_config(lora("llama", lora_alpha=32), "lora_b", activate=False)
    add_mix(w, "llama", "mix_b", alpha=2, activate=False)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(w, backend=counter, fullgraph=True)
    with torch.no_grad():
        first = compiled(x)
        torch.testing.assert_close(first, w(x), rtol=1e-5, atol=1e-5)
        w.set_active_adapters(["ia3_b", "lora_b", "mix_b"])
        second = compiled(x)
        torch.testing.assert_close(second, w(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)
    assert counter.frame_count == 1


# --- recompilation ------------------------------------------------------------------------


def test_training_steps_do_not_recompile():
    w, x, _ = wrap("mlp", "several")
    w.train()
    target = torch.randn(3, 5, 4)
    params = list(w.adapter_parameters())
    assert params and all(p.requires_grad for p in params)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(w, backend=counter, fullgraph=True)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(compiled(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True)), (
        "every weight must train"
    )
    assert losses[-1] < losses[0]
    # The compiled graph reads the current weights, not the ones it was traced with.
    # (Still with grad enabled: grad mode is part of what a graph is compiled for.)
    torch.testing.assert_close(compiled(x), w(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_in_place_weight_loads_do_not_recompile():
    # What loading same-shaped adapter weights boils down to: new values copied into
    # the existing parameters (load_state_dict, or param.copy_).
    w, x, _ = wrap("mlp", "several")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(w, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        out0 = compiled(x)
        state = w.state_dict()
        new_lora = [k for k in state if k.startswith("adapters.lora.")]
        assert new_lora
        for k in new_lora:
            state[k] = torch.randn(state[k].shape, generator=g)
        w.load_state_dict(state)
        out1 = compiled(x)
        torch.testing.assert_close(out1, w(x), rtol=1e-5, atol=1e-6)
        for p in w.adapters["mix"].parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        out2 = compiled(x)
        torch.testing.assert_close(out2, w(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out0, out1) and not torch.allclose(out1, out2)
    assert counter.frame_count == 1


def test_switching_same_structure_adapters_does_not_recompile():
    w, x, _ = wrap("mlp", "lora")
    w.add_adapter_from_config(lora("mlp", lora_alpha=32), "lora_b", activate=False)
    add_mix(w, "mlp", "mix_a", activate=False)
    add_mix(w, "mlp", "mix_b", alpha=3, activate=False)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(w, backend=counter, fullgraph=True)
    outs = {}
    with torch.no_grad():
        for active in (["lora"], ["lora_b"], ["lora"], ["lora", "mix_a"], ["lora_b", "mix_b"]):
            w.set_active_adapters(active)
            out = compiled(x)
            torch.testing.assert_close(out, w(x), rtol=1e-5, atol=1e-6)
            outs[tuple(active)] = out
    assert not torch.allclose(outs[("lora",)], outs[("lora_b",)])
    assert not torch.allclose(outs[("lora", "mix_a")], outs[("lora_b", "mix_b")])
    # Two structures (one adapter; two adapters), so two graphs; switching within a
    # structure compiled nothing new.
    assert counter.frame_count == 2
    # The count is sensitive: a different rank is a different structure.
    w.add_adapter_from_config(lora("mlp", r=4), "lora_r4", activate=False)
    w.set_active_adapters(["lora_r4"])
    with torch.no_grad():
        compiled(x)
    assert counter.frame_count == 3


def test_hooks_added_after_compiling_are_not_skipped():
    # dynamo does not guard on empty hook dicts, so without the wrapper's layout guard
    # a graph compiled while merged (no hooks) would keep running after unmerging.
    w, x, _ = wrap("mlp", "several")
    w.merge_adapters()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(w, backend=counter, fullgraph=True)
    with torch.no_grad():
        for step in ("unmerge", "merge", "unmerge", "none", "lora"):
            if step == "unmerge":
                w.unmerge_adapters()
            elif step == "merge":
                w.merge_adapters()
            elif step == "none":
                w.set_active_adapters([])
            else:
                w.set_active_adapters(["lora"])
            torch.testing.assert_close(compiled(x), w(x), rtol=1e-5, atol=1e-6, msg=step)
    # Graphs: merged (= no hooks, reused for "none"), all three unmerged, lora alone.
    assert counter.frame_count == 3


def test_graph_of_one_wrapper_is_not_reused_for_another_with_other_hooks():
    # Wrappers share the code of AdapterWrapper.forward, and with parameters as graph
    # inputs a graph serves any wrapper whose guards pass. One without hooks must not
    # pass for one with hooks.
    model, x = build("mlp")
    plain = AdapterWrapper(model)
    plain.add_adapter_from_config(lora("mlp"), "lora", activate=False)  # never hooked
    hooked, _, _ = wrap("mlp", "lora")
    counter = CompileCounterWithBackend("inductor")
    with torch.no_grad():
        torch.compile(plain, backend=counter, fullgraph=True)(x)
        out = torch.compile(hooked, backend=counter, fullgraph=True)(x)
        torch.testing.assert_close(out, hooked(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 2


def test_fresh_wrapper_without_adapters_has_its_own_layout():
    hooked, x, _ = wrap("mlp", "lora")
    model, _ = build("mlp")
    empty = AdapterWrapper(model)  # no adapter yet: no hook anywhere
    counter = CompileCounterWithBackend("inductor")
    with torch.no_grad():
        torch.compile(empty, backend=counter, fullgraph=True)(x)
        out = torch.compile(hooked, backend=counter, fullgraph=True)(x)
        torch.testing.assert_close(out, hooked(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 2


def test_deep_copied_wrapper_compiles_without_recompiles():
    # A copy's hook sites get their own per-thread call stack (the input-stack path).
    original, x, _ = wrap("mlp", "several")
    w = copy.deepcopy(original)
    assert all(
        s.call_state is not o.call_state
        for s, o in zip(w.registry.sites.values(), original.registry.sites.values(), strict=True)
    )
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(w, backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(x), original(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_load_adapter_into_new_name_does_not_recompile(tmp_path):
    w, x, _ = wrap("mlp", "lora")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(w, backend=counter, fullgraph=True)
    with torch.no_grad():
        expected = compiled(x)
        w.save_adapter(str(tmp_path / "lora"), "lora")
        w.load_adapter(str(tmp_path / "lora"), "reloaded", activate=False)
        w.set_active_adapters(["reloaded"])
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_scaling_change_reaches_compiled_graph():
    # lora_alpha is read as a tensor by compiled code, so setting it recompiles
    # nothing and takes effect.
    w, x, _ = wrap("mlp", "lora")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(w, backend=counter, fullgraph=True)
    with torch.no_grad():
        out0 = compiled(x)
        for _, layer in w.adapters["lora"].items():
            layer.scaling = 3 * layer.scaling
        out1 = compiled(x)
        torch.testing.assert_close(out1, w(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out0, out1)
    assert counter.frame_count == 1


def test_scaling_tensor_is_derived_state():
    layer = LinearLoraLayer(r=4, lora_alpha=2)
    assert layer.scaling == 0.5 and layer.scaling_tensor.item() == 0.5
    layer.scaling = 1.25
    assert layer.scaling == 1.25 and layer.scaling_tensor.item() == 1.25
    layer.reset_params("lin", nn.Linear(3, 5))
    assert "scaling_tensor" not in layer.state_dict()
    assert LinearLoraLayer(r=4, lora_alpha=4, use_rslora=True).scaling_tensor.item() == 2.0
    # Dtype conversions leave it exact (1/3 is not a bf16 number).
    layer.scaling = 1 / 3
    layer.to(torch.bfloat16)
    assert layer.lora_A.weight.dtype == torch.bfloat16
    assert layer.scaling_tensor.dtype == torch.float32
    assert layer.scaling_tensor.item() == torch.tensor(1 / 3).item()


# --- merged -------------------------------------------------------------------------------


class GraphRecorder:
    """A dynamo backend that keeps every FX graph it is given and runs it as is."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def ops(self) -> list[tuple[str, str]]:
        assert len(self.graphs) == 1
        return [
            (n.op, str(n.target))
            for n in self.graphs[0].graph.nodes
            if n.op in ("call_function", "call_method", "call_module")
        ]


def captured_ops(model: nn.Module, x: torch.Tensor) -> tuple[list[tuple[str, str]], torch.Tensor]:
    dynamo.reset()
    rec = GraphRecorder()
    with torch.no_grad():
        out = torch.compile(model, backend=rec, fullgraph=True)(x)
    return rec.ops(), out


@pytest.mark.parametrize("model_kind", ["mlp", "llama"])
def test_merged_compiles_to_bare_graph(model_kind):
    w, x, bare_out = wrap(model_kind, "lora+ia3")
    w.set_active_adapters([])  # no hooks, so the copy is the bare model
    bare = copy.deepcopy(w.model)
    bare_ops, _ = captured_ops(bare, x)
    w.set_active_adapters(["mix"])
    unmerged_ops, unmerged_out = captured_ops(w, x)
    w.merge_adapters()
    merged_ops, merged_out = captured_ops(w, x)
    assert merged_ops == bare_ops
    # The comparison can tell: unmerged, the graph carries the adapter arithmetic.
    assert len(unmerged_ops) > len(bare_ops)
    torch.testing.assert_close(merged_out, unmerged_out, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged_out, bare_out)


def test_compiled_mixed_call_after_a_bare_instance_of_the_same_class_was_compiled():
    """The mixed call must stay one compiled frame: had it graph-broken inside a try
    block, dynamo would run it eagerly and compile the base model's forward as a frame
    of its own, reusing the graph of a hook-less instance of the same class (what
    tinytune-bench does: bare, merged, then unmerged and mixed, all compiled)."""
    from tinytune.benchmark import build_models, parse_args

    s = parse_args(["--device", "cpu", "--hidden", "16", "--layers", "1", "--rank", "2",
                    "--adapters", "4", "--no-peft"])
    m = build_models(s)
    ids = torch.randint(0, 100, (s.rows, 1))
    names = [m.names[0]] * (s.rows - 1) + ["__base__"]
    with torch.inference_mode():
        expected = m.unmerged(ids, adapter_names=names)
        torch.compile(m.bare)(ids)
        torch.compile(m.merged)(ids)
        compiled = torch.compile(m.unmerged)
        compiled(ids)
        torch.testing.assert_close(compiled(ids, adapter_names=names), expected)
