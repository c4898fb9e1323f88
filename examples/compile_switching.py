"""``torch.compile`` a wrapped model and switch adapters without recompiling.

    python examples/compile_switching.py --adapters 4

Adapters with the same structure (the same layer types and shapes on the same modules;
``lora_alpha`` may differ) share one compiled graph: switching between them with
``set_active_adapters`` does not recompile, and neither do training steps or loading
weights in place. The script proves it under ``error_on_recompile``, then shows what does
compile a new graph (a different rank, merging) and counts the compilations.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from tinytune import AdapterWrapper, LoraConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=4, help="same-structure adapters to switch between (default 4)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    model = AdapterWrapper(base)
    for i in range(args.adapters):
        config = LoraConfig(target_modules=["0", "2"], r=8, lora_alpha=8 * (i + 1), init_lora_weights=False)
        model.add_adapter_from_config(config, f"a{i}", activate=False)
    model.add_adapter_from_config(LoraConfig(target_modules=["0", "2"], r=16, init_lora_weights=False),
                                  "wide", activate=False)

    compiled = torch.compile(model)  # compile the wrapper, not model.model
    x = torch.randn(3, 16)
    eager = {}
    with torch.no_grad():
        model.set_active_adapters("a0")
        compiled(x)  # the first graph
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(args.adapters):
                model.set_active_adapters(f"a{i}")
                out = compiled(x)
                eager[i] = model(x)
                torch.testing.assert_close(out, eager[i])
            model.adapters["a0"]["0"].lora_A.weight.mul_(0.5)  # new weights in place: still no recompile
            model.set_active_adapters("a0")
            torch.testing.assert_close(compiled(x), model(x))
        print(f"switched between {args.adapters} adapters and changed weights in place: one graph")

        counts = torch._dynamo.utils.counters["stats"]
        before = counts["unique_graphs"]
        model.set_active_adapters("wide")  # rank 16: another structure, another graph
        torch.testing.assert_close(compiled(x), model(x))
        model.merge_adapters()  # merged: no hooks, the bare model's graph
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        model.unmerge_adapters()
        model.set_active_adapters("a1")  # back to a structure compiled before: reused
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(compiled(x), eager[1])
    new = counts["unique_graphs"] - before
    print(f"a new rank and merging compiled {new} new graph(s); switching back reused the first")
    return new


if __name__ == "__main__":
    main()
