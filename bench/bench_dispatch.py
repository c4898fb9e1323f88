"""Cost of the hooks around the fused kernel (the empty-batch trick), on the CPU.

The fused path hands the module an empty batch in a forward pre-hook and returns the
kernel's result from the forward hook. What that costs on top of the kernel itself is
pure host overhead (two hook calls, the dispatch decision, a zero-row view and the
module's forward on it), so it is measured on the CPU with a tiny layer, with the
kernel replaced by its PyTorch reference ``torch_lora_linear`` (no Triton, no
interpreter):

* ``bare``: ``nn.Linear(64, 64)`` alone, no hooks;
* ``op``: ``torch_lora_linear`` called directly (the kernel's work, here in PyTorch);
* ``fused_path``: the wrapped module (LoRA r=8) on the fused path, with that op;
* ``torch_path``: the wrapped module on the PyTorch path (kernel mode ``"torch"``).

``fused_path - op`` is the hooks' overhead per adapted module call. One torch thread;
each round runs every case ``--inner`` times in a shuffled order; figures are medians
over rounds of the calling thread's CPU time (``time.thread_time``), which, unlike
wall-clock time, does not count the time the thread spends preempted on a shared
machine (these cases never wait on anything else).

Run: ``python bench/bench_dispatch.py`` (``--rounds N``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tinytune  # noqa: E402
import tinytune.dispatch as dispatch  # noqa: E402
import time  # noqa: E402

from tinytune import AdapterWrapper, LoraConfig  # noqa: E402
from tinytune.kernels.lora_linear import torch_lora_linear  # noqa: E402
from tinytune.timing import clock_timer, interleave, quantiles  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--inner", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # Make the fused path reachable on CPU tensors without Triton's interpreter: mark
    # the process as able to fuse and use the PyTorch reference as "the kernel".
    dispatch._load()
    dispatch._Kernels.reason = None
    dispatch._Kernels.interpret = True
    dispatch._Kernels.lora_linear = torch_lora_linear
    dispatch.fusion_possible = lambda: True

    torch.manual_seed(0)
    bare = torch.nn.Linear(64, 64)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    model[0].load_state_dict(bare.state_dict())
    w = AdapterWrapper.from_config(model, LoraConfig(r=8, target_modules=["0"], init_lora_weights=False))
    layer = w.adapters["default"]["0"]
    lin = model[0]
    x = torch.randn(args.rows, 64)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    s = layer.scaling_tensor.expand(8).contiguous()

    def fused():
        with tinytune.kernel_mode("triton"):
            return lin(x)

    def torch_path():
        with tinytune.kernel_mode("torch"):
            return lin(x)

    def op():
        with tinytune.kernel_mode("triton"):  # same context-manager cost as the others
            return torch_lora_linear(x, lin.weight, lin.bias, a, b, s, None, None)

    def bare_call():
        with tinytune.kernel_mode("triton"):
            return bare(x)

    with torch.no_grad():
        torch.testing.assert_close(fused(), torch_path(), rtol=1e-5, atol=1e-5)
        cases = {"bare": bare_call, "op": op, "fused_path": fused, "torch_path": torch_path}
        measure = clock_timer(time.thread_time)
        for fn in cases.values():  # untimed: two rounds' worth of calls per case
            for _ in range(2 * args.inner):
                fn()
        times = interleave(cases, args.rounds, lambda name: measure(cases[name], args.inner) * 1e6)
    stats = {k: quantiles(v) for k, v in times.items()}  # (p25, median, p75) in us
    us = {k: q[1] for k, q in stats.items()}
    report = {
        "layer": "Linear(64, 64), LoRA r=8",
        "rows": args.rows,
        "torch": torch.__version__,
        "median_us": {k: round(v, 2) for k, v in us.items()},
        "p25_p75_us": {k: [round(q[0], 2), round(q[2], 2)] for k, q in stats.items()},
        "hook_overhead_us": round(us["fused_path"] - us["op"], 2),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
