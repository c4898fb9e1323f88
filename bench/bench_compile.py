"""Compiled vs eager, unmerged vs merged: what LoRA hooks cost a Llama-style model.

Six cases on one small Llama-style model (random weights, built from a config), plus
the LoRA arithmetic alone as the floor:

* ``eager_bare`` / ``compiled_bare``: the model without tinytune;
* ``eager_merged`` / ``compiled_merged``: wrapped, LoRA merged (no hooks run);
* ``eager_unmerged`` / ``compiled_unmerged``: wrapped, LoRA applied by the hooks;
* ``lora_ops``: only the extra LoRA arithmetic of one forward, eagerly, with the ops the
  hook runs (``F.linear(x, A)`` and ``addmm(out, h, B^T, alpha=s)`` per adapted linear),
  on the same shapes.

The goal is ``compiled_unmerged - compiled_merged ~= lora_ops``: the compiled hooks cost
no more than the arithmetic they add. The FLOP share of LoRA is reported next to it.

Method: one thread, no grad, warm-up (and compilation) first, then rounds; each round
runs every case in a new random order, ``--reps`` calls each, and keeps the fastest
call. Ratios are taken within a round; the report gives their medians over rounds with
the interquartile range.

Usage::

    python bench/bench_compile.py            # full: about a minute on one CPU core
    python bench/bench_compile.py --quick    # a smaller model, a few rounds (smoke run)
    python bench/bench_compile.py --quick --compiled unmerged  # one compile (the test's smoke)
    python bench/bench_compile.py --markdown bench/results/compile_cpu.json  # README table
    python bench/bench_compile.py --batch 1 --seq 1 --reps 20 \
        --out bench/results/compile_cpu_1token.json  # per-op overheads dominate
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark the checkout this file lives in

import tinytune  # noqa: E402
from tinytune import AdapterWrapper, LinearLoraLayer, LoraConfig  # noqa: E402
from tinytune.timing import cpu_name, git_sha, quantiles, time_cases  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

FULL = dict(hidden=512, intermediate=1376, layers=2, heads=8, vocab=1024, batch=4, seq=128, r=16)
QUICK = dict(hidden=256, intermediate=688, layers=1, heads=4, vocab=512, batch=2, seq=64, r=16)


def build_model(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        vocab_size=shape["vocab"],
        max_position_embeddings=max(256, shape["seq"]),
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


class Logits(torch.nn.Module):
    """Returns the logits tensor, so every case returns the same kind of thing."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits


def lora_layers(wrapper: AdapterWrapper) -> list[tuple[str, LinearLoraLayer]]:
    layers = wrapper.adapters["default"].items()
    return [(path, layer) for path, layer in layers if isinstance(layer, LinearLoraLayer)]


def flop_counts(shape: dict, wrapper: AdapterWrapper) -> dict:
    """Multiply-add FLOPs (2 per MAC) of one forward."""
    n = shape["batch"] * shape["seq"]
    base_linear = lora = 0
    for _, layer in lora_layers(wrapper):
        fan_in, fan_out = layer.lora_A.weight.shape[1], layer.lora_B.weight.shape[0]
        base_linear += 2 * n * fan_in * fan_out
        lora += 2 * n * layer.r * (fan_in + fan_out)
    lm_head = 2 * n * shape["hidden"] * shape["vocab"]
    # QK^T and PV per layer (full causal matrices, as SDPA's math kernel on CPU computes).
    attention = shape["layers"] * 2 * 2 * shape["batch"] * shape["seq"] ** 2 * shape["hidden"]
    total = base_linear + lm_head + attention
    return {
        "base_adapted_linears": base_linear,
        "lm_head": lm_head,
        "attention_matmuls": attention,
        "model_total": total,
        "lora": lora,
        "lora_share_of_adapted_linears": lora / base_linear,
        "lora_share_of_model": lora / total,
    }


def make_lora_ops(shape: dict, wrapper: AdapterWrapper):
    """The LoRA arithmetic of one forward alone, with the hook's own ops and shapes."""
    n = shape["batch"] * shape["seq"]
    g = torch.Generator().manual_seed(3)
    work = []
    for _, layer in lora_layers(wrapper):
        a, b = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        x = torch.randn(n, a.shape[1], generator=g)
        out = torch.randn(n, b.shape[0], generator=g)
        work.append((x, a, b, out, layer.scaling))

    def run():
        for x, a, b, out, s in work:
            torch.addmm(out, F.linear(x, a), b.t(), alpha=s)

    return run


def quartiles(values: list[float]) -> dict:
    p25, med, p75 = quantiles(values)
    return {"median": med, "p25": p25, "p75": p75}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer rounds")
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds (default 25; quick 4)"
    )
    parser.add_argument(
        "--reps", type=int, default=3, help="calls per case per round (fastest kept)"
    )
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size")
    parser.add_argument("--seq", type=int, default=None, help="override the tokens per row")
    parser.add_argument(
        "--compiled",
        default="bare,merged,unmerged",
        help="the compiled cases to run (comma-separated; each costs a compile); ratios "
        "and the README table need all three",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="JSON",
        help="print the README table of an earlier results file and exit",
    )
    args = parser.parse_args(argv)
    if args.markdown is not None:
        print(markdown_table(json.loads(args.markdown.read_text())))
        return {}
    shape = dict(QUICK if args.quick else FULL)
    if args.batch is not None:
        shape["batch"] = args.batch
    if args.seq is not None:
        shape["seq"] = args.seq
    rounds = args.rounds or (4 if args.quick else 25)
    # A new file per run by default: the tracked results are never overwritten.
    out_path = args.out or ROOT / "bench" / "results" / (
        ("compile_cpu_quick_" if args.quick else "compile_cpu_")
        + time.strftime("%Y%m%d_%H%M%S") + ".json"
    )
    torch.set_num_threads(1)

    base = build_model(shape)
    bare = Logits(copy.deepcopy(base)).eval()
    unmerged = AdapterWrapper.from_config(
        Logits(copy.deepcopy(base)).eval(),
        LoraConfig(
            target_modules=TARGETS, r=shape["r"], lora_alpha=2 * shape["r"], init_lora_weights=False
        ),
    )
    merged = AdapterWrapper.from_config(
        Logits(copy.deepcopy(base)).eval(),
        LoraConfig(target_modules=TARGETS, r=shape["r"], lora_alpha=2 * shape["r"]),
    )
    merged.adapters.load_state_dict(unmerged.adapters.state_dict())  # the same LoRA weights
    merged.merge_adapters()
    del base

    ids = torch.randint(
        0,
        shape["vocab"],
        (shape["batch"], shape["seq"]),
        generator=torch.Generator().manual_seed(1),
    )
    eager = {"eager_bare": bare, "eager_merged": merged, "eager_unmerged": unmerged}
    models = {"bare": bare, "merged": merged, "unmerged": unmerged}
    wanted = [c for c in args.compiled.split(",") if c]
    if not wanted or set(wanted) - set(models):
        parser.error(f"--compiled takes a comma-separated subset of {','.join(models)}, not {args.compiled!r}")
    compiled = {f"compiled_{c}": torch.compile(models[c], fullgraph=True) for c in models if c in wanted}
    cases = {**eager, **compiled, "lora_ops": make_lora_ops(shape, unmerged)}

    compile_s = {}
    with torch.no_grad():
        ref = {k: m(ids) for k, m in eager.items()}
        for k, m in compiled.items():
            t0 = time.perf_counter()
            out = m(ids)
            compile_s[k] = time.perf_counter() - t0
            eager_out = ref["eager" + k[len("compiled") :]]
            torch.testing.assert_close(out, eager_out, rtol=1e-3, atol=1e-3)
        # Merged and unmerged compute the same function, up to rounding.
        torch.testing.assert_close(ref["eager_merged"], ref["eager_unmerged"], rtol=1e-3, atol=1e-3)
        assert not torch.allclose(ref["eager_bare"], ref["eager_unmerged"], atol=1e-3), (
            "LoRA is a no-op"
        )
        # tinytune.timing: warm-up, shuffled rounds, the fastest of --reps
        # single calls per case per round.
        calls = {k: (fn if k == "lora_ops" else (lambda fn=fn: fn(ids))) for k, fn in cases.items()}
        times = time_cases(calls, rounds, warmup=2, min_time=0.0, repeats=args.reps,
                           seed=random.randrange(1 << 30))

    def ratio(a: str, b: str) -> dict:
        return quartiles([x / y for x, y in zip(times[a], times[b], strict=True)])

    ratio_cases = [
        ("eager_merged", "eager_bare"),
        ("eager_unmerged", "eager_merged"),
        ("compiled_bare", "eager_bare"),
        ("compiled_merged", "compiled_bare"),
        ("compiled_unmerged", "compiled_merged"),
        ("compiled_unmerged", "eager_unmerged"),
    ]
    ratios = {f"{a}/{b}": ratio(a, b) for a, b in ratio_cases if a in times and b in times}

    flops = flop_counts(shape, unmerged)
    # What is left of compiled_unmerged - compiled_merged once the LoRA arithmetic is
    # paid for, as a fraction of compiled_merged.
    complete = len(compiled) == len(models)
    if complete:
        ratios["(compiled_merged+lora_ops)/compiled_merged"] = quartiles(
            [(mer + lo) / mer for mer, lo in zip(times["compiled_merged"], times["lora_ops"], strict=True)]
        )
        beyond = [
            (unm - mer - lo) / mer
            for unm, mer, lo in zip(
                times["compiled_unmerged"], times["compiled_merged"], times["lora_ops"], strict=True
            )
        ]
    result = {
        "benchmark": "bench/bench_compile.py",
        "quick": args.quick,
        "shape": shape,
        "targets": TARGETS,
        "rounds": rounds,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "device": cpu_name(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tinytune": tinytune.__version__,
        },
        "git_sha": git_sha(),
        "compile_seconds_first_call": compile_s,
        "ms_median": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "ratios": ratios,
        "compiled_unmerged_beyond_lora_ops_fraction": quartiles(beyond) if complete else None,
        "flops": flops,
        "expected_ratio_from_flops": {
            "1+lora/adapted_linears": 1 + flops["lora_share_of_adapted_linears"],
            "1+lora/model": 1 + flops["lora_share_of_model"],
        },
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    if complete:
        print("\n" + markdown_table(result))
    print(f"\nwrote {os.path.relpath(out_path, Path.cwd())}")
    return result


def print_table(r: dict) -> None:
    ms = r["ms_median"]
    s = r["shape"]
    print(
        f"Llama-style, hidden {s['hidden']}, intermediate {s['intermediate']}, "
        f"{s['layers']} layers, LoRA r={s['r']} on {len(r['targets'])} projections, "
        f"batch {s['batch']} x {s['seq']} tokens, {r['threads']} thread, {r['rounds']} rounds"
    )
    print(f"{'case':<20}{'ms (median)':>12}")
    for k in (
        "eager_bare",
        "eager_merged",
        "eager_unmerged",
        "compiled_bare",
        "compiled_merged",
        "compiled_unmerged",
        "lora_ops",
    ):
        if k in ms:
            print(f"{k:<20}{ms[k]:>12.2f}")
    print(f"\n{'ratio (per round)':<46}{'median':>8}{'p25':>8}{'p75':>8}")
    for k, q in r["ratios"].items():
        print(f"{k:<46}{q['median']:>8.3f}{q['p25']:>8.3f}{q['p75']:>8.3f}")
    b = r["compiled_unmerged_beyond_lora_ops_fraction"]
    if b is not None:
        label = "compiled unmerged beyond LoRA ops (frac.)"
        print(f"{label:<46}{b['median']:>8.3f}{b['p25']:>8.3f}{b['p75']:>8.3f}")
    e = r["expected_ratio_from_flops"]
    print(
        f"1 + LoRA FLOPs / adapted-linear FLOPs = {e['1+lora/adapted_linears']:.3f}; "
        f"1 + LoRA FLOPs / model FLOPs = {e['1+lora/model']:.3f}"
    )


def markdown_table(r: dict) -> str:
    """The README's table, from a results dict (``--markdown JSON`` prints it again)."""
    ms, q = r["ms_median"], r["ratios"]

    def rq(key: str) -> str:
        x = q[key]
        return f"{x['median']:.3f} ({x['p25']:.3f}-{x['p75']:.3f})"

    rows = [
        ("eager, bare model", ms["eager_bare"], "1 (reference)"),
        ("eager, merged", ms["eager_merged"], rq("eager_merged/eager_bare") + " of eager bare"),
        (
            "eager, unmerged",
            ms["eager_unmerged"],
            rq("eager_unmerged/eager_merged") + " of eager merged",
        ),
        (
            "compiled, bare model",
            ms["compiled_bare"],
            rq("compiled_bare/eager_bare") + " of eager bare",
        ),
        (
            "compiled, merged",
            ms["compiled_merged"],
            rq("compiled_merged/compiled_bare") + " of compiled bare",
        ),
        (
            "compiled, unmerged",
            ms["compiled_unmerged"],
            rq("compiled_unmerged/compiled_merged") + " of compiled merged",
        ),
        (
            "LoRA ops alone (eager)",
            ms["lora_ops"],
            rq("(compiled_merged+lora_ops)/compiled_merged").replace(
                " (", " = (compiled merged + these) / compiled merged (", 1
            ),
        ),
    ]
    lines = [
        "| case | ms (median) | ratio, median (p25-p75) of per-round ratios |",
        "|---|---:|---|",
    ]
    lines += [f"| {a} | {b:.2f} | {c} |" for a, b, c in rows]
    e = r["expected_ratio_from_flops"]
    b = r["compiled_unmerged_beyond_lora_ops_fraction"]
    lines.append("")
    lines.append(
        f"1 + LoRA FLOPs / adapted-linear FLOPs = {e['1+lora/adapted_linears']:.3f} "
        f"(1 + LoRA FLOPs / all matmul FLOPs = {e['1+lora/model']:.3f}). "
        f"Compiled unmerged minus compiled merged minus the LoRA ops alone: "
        f"{100 * b['median']:+.1f}% of compiled merged "
        f"(p25 {100 * b['p25']:+.1f}%, p75 {100 * b['p75']:+.1f}%)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
