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

* ``op_same_args``: the op called with exactly the arguments the hooks pass it (``op``
  reads the module's weight and bias through ``nn.Module.__getattr__`` in the call).

``fused_path - op`` is the hooks' overhead per adapted module call (issue 20's measure);
``fused_path - op_same_args`` is the same without the two attribute reads counted in
``op``. Both are medians of the per-round differences.

The whole-model case (``--layers``, default 32; 0 skips it) times one decode token
(one row, no KV cache) through a tiny-width Llama built from a ``LlamaConfig``
(hidden size 64) with LoRA r=8 on all seven projections of every layer, against the
bare model (the same weights, unwrapped). The kernel is a stub of no cost there: it
returns a preallocated tensor of the right shape, so ``fused_step / bare_step`` is what
runs in Python around the kernels (target: at most 1.3).

Both cases reach the fused path on CPU tensors through ``tinytune.dispatch.stub_kernels``.
One torch thread; each round runs every case ``--inner`` times in a shuffled order;
figures are medians over rounds of the calling thread's CPU time (``time.thread_time``),
which, unlike wall-clock time, does not count the time the thread spends preempted on a
shared machine (these cases never wait on anything else).

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
import time  # noqa: E402

from tinytune import AdapterWrapper, LoraConfig  # noqa: E402
from tinytune.dispatch import stub_kernels  # noqa: E402
from tinytune.kernels.lora_linear import torch_lora_linear  # noqa: E402
from tinytune.timing import clock_timer, interleave, quantiles  # noqa: E402


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def time_cases(cases: dict, rounds: int, inner: int) -> dict:
    """``{case: [µs per call, one per round]}``, interleaved, warmed up first."""
    measure = clock_timer(time.thread_time)
    for fn in cases.values():  # untimed: two rounds' worth of calls per case
        for _ in range(2 * inner):
            fn()
    return interleave(cases, rounds, lambda name: measure(cases[name], inner) * 1e6)


def per_round(times: dict, a: str, b: str, how) -> tuple[float, float, float]:
    """(p25, median, p75) over rounds of ``how(times[a][i], times[b][i])``: the two cases
    compared within each round, so that what slows a whole round cancels."""
    return quantiles([how(x, y) for x, y in zip(times[a], times[b])])


def module_case(args: argparse.Namespace) -> dict:
    """One adapted ``Linear(64, 64)``, the kernel replaced by its PyTorch reference."""
    torch.manual_seed(0)
    bare = torch.nn.Linear(64, 64)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    model[0].load_state_dict(bare.state_dict())
    with stub_kernels(torch_lora_linear):
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

        weight, bias, s_view = lin.weight, lin.bias, layer.scaling_tensor.expand(8)

        def op_same_args():
            # The op with exactly what the hooks pass it: the parameters read beforehand
            # (``op`` reads them through nn.Module.__getattr__) and the stride-0 scale.
            with tinytune.kernel_mode("triton"):
                return torch_lora_linear(x, weight, bias, a, b, s_view, None, None, False)

        def bare_call():
            with tinytune.kernel_mode("triton"):
                return bare(x)

        with torch.no_grad():
            torch.testing.assert_close(fused(), torch_path(), rtol=1e-5, atol=1e-5)
            cases = {
                "bare": bare_call,
                "op": op,
                "op_same_args": op_same_args,
                "fused_path": fused,
                "torch_path": torch_path,
            }
            times = time_cases(cases, args.rounds, args.inner)
    stats = {k: quantiles(v) for k, v in times.items()}
    us = {k: q[1] for k, q in stats.items()}
    overhead = per_round(times, "fused_path", "op", lambda f, o: f - o)
    same = per_round(times, "fused_path", "op_same_args", lambda f, o: f - o)
    return {
        "layer": "Linear(64, 64), LoRA r=8",
        "rows": args.rows,
        "median_us": {k: round(v, 2) for k, v in us.items()},
        "p25_p75_us": {k: [round(q[0], 2), round(q[2], 2)] for k, q in stats.items()},
        # Issue 20's measure: fused_path - op, the median of the per-round differences.
        "hook_overhead_us": round(overhead[1], 2),
        "hook_overhead_p25_p75_us": [round(overhead[0], 2), round(overhead[2], 2)],
        # Against the op called with the arguments the hooks pass (see op_same_args).
        "hook_overhead_vs_same_args_us": round(same[1], 2),
    }


def model_case(args: argparse.Namespace) -> dict:
    """One decode token through a tiny 32-layer Llama, LoRA on all seven projections,
    the kernel a stub of no cost, against the bare model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    bare = LlamaForCausalLM(config).eval()
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(bare.state_dict())
    ids = torch.randint(0, 128, (1, 1))
    outs: dict[int, torch.Tensor] = {}  # out_features -> the stub's preallocated result
    calls = [0]

    def stub(x, weight, *rest):
        calls[0] += 1
        return outs[weight.shape[0]]

    for n in (64, 128, config.num_key_value_heads * 16):
        outs[n] = torch.zeros(1, 1, n)
    with stub_kernels(stub):
        w = AdapterWrapper.from_config(model, LoraConfig(r=8, target_modules=PROJECTIONS))

        def fused_step():
            with tinytune.kernel_mode("triton"):
                return model(ids, use_cache=False)

        def bare_step():
            with tinytune.kernel_mode("triton"):
                return bare(ids, use_cache=False)

        with torch.no_grad():
            fused_step()
            adapted = len(w.registry.sites)
            assert calls[0] == adapted == 7 * args.layers, (calls[0], adapted)
            times = time_cases({"bare_step": bare_step, "fused_step": fused_step}, args.rounds, args.model_inner)
    stats = {k: quantiles(v) for k, v in times.items()}
    us = {k: q[1] for k, q in stats.items()}
    ratio = per_round(times, "fused_step", "bare_step", lambda f, b: f / b)
    return {
        "model": f"Llama, {args.layers} layers, hidden 64, LoRA r=8 on {', '.join(PROJECTIONS)}",
        "adapted_modules": adapted,
        "tokens": 1,
        "median_us": {k: round(v, 1) for k, v in us.items()},
        "p25_p75_us": {k: [round(q[0], 1), round(q[2], 1)] for k, q in stats.items()},
        "fused_over_bare": round(ratio[1], 3),  # median of the per-round ratios
        "host_us_per_adapted_module": round((us["fused_step"] - us["bare_step"]) / adapted, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--inner", type=int, default=200)
    parser.add_argument("--layers", type=int, default=32, help="whole-model case; 0: skip it")
    parser.add_argument("--model-inner", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"torch": torch.__version__, **module_case(args)}
    if args.layers:
        report["whole_model"] = model_case(args)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
