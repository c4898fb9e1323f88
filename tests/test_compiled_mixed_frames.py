"""Issue 20, target 7: compiled mixed decode on the CPU no slower than eager.

Two parts. The wrapper's own frames (``forward``, ``_run``, ``mixed_call``, ...) never
get a compiled frame of their own: under ``torch.compile`` a call, mixed or plain, runs
exactly one compiled frame (``util.run_model``, the model), its host-side work before
it, so a mixed call pays for no graph-break frames, guards or resume functions. And the
LoRA of a compiled mixed call reads each row's factors by index inside its products
(``torch_lora_mixed_indexed``), which must equal the gather.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import tinytune
import tinytune.batch
import tinytune.util
from tinytune import AdapterWrapper, LoraConfig
from tinytune.mixed_torch import torch_lora_mixed, torch_lora_mixed_indexed, worth_indexing
from conftest import per_row  # noqa: E402


@pytest.mark.parametrize("tokens", [1, 3])
def test_torch_lora_mixed_indexed_matches_the_gather(tokens):
    torch.manual_seed(0)
    slots, batch = 5, 12
    a = torch.randn(slots, 8, 16)
    bt = torch.randn(slots, 8, 6)
    a[-1] = 0
    bt[-1] = 0
    scale = torch.rand(slots)
    x = torch.randn(batch, tokens, 16)
    out = torch.randn(batch, tokens, 6)
    before = out.clone()
    for rows in ([0] * batch, [i % slots for i in range(batch)], [slots - 1] * batch):
        row_index = torch.tensor(rows)
        got = torch_lora_mixed_indexed(x, out, a, bt, scale, row_index)
        want = torch_lora_mixed(x, out, a, bt, scale, row_index)
        assert got.dtype == out.dtype and got.shape == out.shape
        torch.testing.assert_close(got, want)
    assert torch.equal(out, before)  # not modified


def _model() -> AdapterWrapper:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    w = AdapterWrapper(model)
    for name in ("a", "b"):
        w.add_adapter_from_config(LoraConfig(r=8, target_modules=["0", "2"]), name)
    with torch.no_grad():
        for p in w.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return w.eval()


def _compiled_entries(fn) -> int:
    return len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__))


def test_compiled_calls_run_one_frame_each():
    w = _model()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(w, backend=counter)
    x = torch.randn(4, 1, 16)
    torch._dynamo.reset()
    wrapper_frames = (AdapterWrapper.forward, tinytune.batch.mixed_call)
    with torch.no_grad(), tinytune.kernel_mode("torch"):
        got = compiled(x, adapter_names=["a", "b", "__base__", "a"])
        # One frame (the model's) compiled for a mixed call: one graph, no break, and
        # no compiled code (guards, resume functions) for the wrapper's frames.
        assert counter.frame_count == 1
        assert _compiled_entries(tinytune.util.run_model) == 1
        assert [_compiled_entries(f) for f in wrapper_frames] == [0, 0]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for names in (["b", "b", "a", "__base__"], ["__base__"] * 4):
                torch.testing.assert_close(
                    compiled(x, adapter_names=names), per_row(w, x, names), rtol=1e-5, atol=1e-5
                )
        # A plain call has other hooks (the layout guard): one more entry, no more.
        w.set_active_adapters(["a"])
        plain = compiled(x)
        assert _compiled_entries(tinytune.util.run_model) == 2
        assert [_compiled_entries(f) for f in wrapper_frames] == [0, 0]
    torch.testing.assert_close(got, per_row(w, x, ["a", "b", "__base__", "a"]), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(plain, w(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [16, 17])
def test_compiled_mixed_reads_factors_by_index_for_short_rows_only(tokens):
    # Up to worth_indexing's tokens per row the graph reads each row's factors by index
    # (two sums per adapted module); longer rows keep the gather (batched matmuls).
    w = _model()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(w, backend=backend)
    x = torch.randn(2, tokens, 16)
    names = ["a", "b"]
    with torch.no_grad(), tinytune.kernel_mode("torch"):
        torch.testing.assert_close(
            compiled(x, adapter_names=names), per_row(w, x, names), rtol=1e-5, atol=1e-5
        )
    assert len(graphs) == 1
    nodes = list(graphs[0].graph.nodes)
    sums = [n for n in nodes if n.op == "call_method" and n.target == "sum"]
    bmms = [n for n in nodes if n.target is torch.bmm]
    assert worth_indexing(tokens) == (tokens <= 16)
    assert len(sums) == (4 if worth_indexing(tokens) else 0)
    assert len(bmms) == (0 if worth_indexing(tokens) else 2)  # one per module (+ baddbmm_)
