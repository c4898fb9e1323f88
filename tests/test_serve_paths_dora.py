"""Compiled mixed decode on the CPU with DoRA rows (issue 20 meets DoRA).

Under ``torch.compile`` on the CPU a mixed call's LoRA runs as
``torch_lora_mixed_indexed`` (each row's factors read by index inside the graph's
products). DoRA layers are stacked with the LoRAs, so it adds their ``s·B A x`` too;
their rows must still get DoRA's
per-row scale ``g ⊙ (W x + s·B A x) + b`` (``SiteStacks.dora``), as in eager mode.
"""

from __future__ import annotations

import torch
from torch import nn

import tinytune
from tinytune import AdapterWrapper, LoraConfig
from conftest import per_row  # noqa: E402


def _dora_mixed_model() -> AdapterWrapper:
    """Two DoRA adapters and a LoRA on both linears of a small MLP (random weights)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    w = AdapterWrapper(model)
    w.add_adapter_from_config(LoraConfig(r=16, target_modules=["0", "2"], use_dora=True), "d1")
    w.add_adapter_from_config(LoraConfig(r=8, target_modules=["0", "2"], use_dora=True), "d2")
    w.add_adapter_from_config(LoraConfig(r=16, target_modules=["0", "2"]), "lora")
    with torch.no_grad():
        for p in w.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return w.eval()


def test_compiled_mixed_decode_with_dora_rows_keeps_their_scales():
    """DoRA, LoRA and base rows in one compiled mixed call: the LoRA part runs as
    torch_lora_mixed_indexed (in the graph), every row equals that row run alone, and a
    new assignment does not recompile."""
    w = _dora_mixed_model()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(w, backend=backend, fullgraph=False)
    # 16 rows of one token at rank 16, three adapters: grouping pays (worth_grouping)
    x = torch.randn(16, 1, 16)
    assignments = [
        ["d1", "d2", "lora", "__base__"] * 4,
        ["d1"] * 16,
        ["lora", "lora", "d2", "d2", "__base__", "d1", "d1", "d1"] * 2,
    ]
    with torch.no_grad(), tinytune.kernel_mode("torch"):
        compiled(x, adapter_names=assignments[0])  # compiles
        n_graphs = len(graphs)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for names in assignments:
                got = compiled(x, adapter_names=names)
                torch.testing.assert_close(got, per_row(w, x, names), rtol=1e-5, atol=1e-5)
    assert len(graphs) == n_graphs
    assert len(graphs) == 1  # the whole model in one graph
    nodes = list(graphs[0].graph.nodes)
    sums = [node for node in nodes if node.op == "call_method" and node.target == "sum"]
    assert len(sums) == 4  # two indexed products per adapted module
