"""Mixed-adapter batches on the CPU: tinytune vs PEFT, same weights, one process.

Model: a small Llama-style ``LlamaForCausalLM`` (hidden 512, intermediate 1376, 2 layers,
8 heads, vocab 1024) with LoRA r=16 on all seven projections, N adapters with random
(nonzero) A and B. PEFT's model gets exactly our weights, and the logits of both are
compared before anything is timed.

Cases, each timed as bare model / PEFT ``adapter_names`` / tinytune ``adapter_names``:

* decode-like: 32 rows x 1 token over 16 distinct adapters (64 loaded, and again with
  only those 16 loaded);
* prefill-like: 8 rows x 64 tokens over 4 distinct adapters;
* scaling: 1..64 distinct adapters, at decode size (64 rows x 1 token) and at prefill
  size (64 rows x 64 tokens; ``--quick``: 64 x 16).

Timing: one thread, warm-up first, each round runs every variant once in a shuffled
order, and ratios are the median over rounds of the per-round ratios (with the spread
between the 25th and 75th percentiles). ``minimum bytes`` is the base weights plus the
distinct adapters' weights that one forward has to read at least; GB/s is that over the
tinytune time. Results go to ``bench/results/mixed_<date>.json`` with versions and the git
SHA.

Run: ``python bench/bench_mixed.py`` (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import random
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import peft  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import tinytune  # noqa: E402
from tinytune.timing import cpu_name, git_sha, ratio_quantiles, time_cases  # noqa: E402
from tinytune import AdapterWrapper, LoraConfig  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32


MODEL = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 2}
SMOKE_MODEL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1}


def build(n_adapters: int, seed: int = 0, model: dict = MODEL):
    """The bare model, the tinytune wrapper and the PEFT model, with identical weights."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(num_attention_heads=8, num_key_value_heads=8, vocab_size=1024, **model)
    base = LlamaForCausalLM(cfg).eval()
    bare = copy.deepcopy(base)
    ours = AdapterWrapper(copy.deepcopy(base))
    names = [f"a{i}" for i in range(n_adapters)]
    for name in names:
        ours.add_adapter_from_config(
            LoraConfig(target_modules=TARGETS, r=RANK, lora_alpha=ALPHA, init_lora_weights=False),
            name,
            activate=False,
        )
    with torch.no_grad():
        for p in ours.adapter_parameters():
            p.normal_(0, 0.02)  # random and nonzero B, so every adapter changes the logits
    peft_cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg, adapter_name=names[0])
    for name in names[1:]:
        theirs.add_adapter(name, peft_cfg)
    theirs.eval()
    peft_modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name in names:
            for path, layer in ours.adapters[name].items():
                target = peft_modules[path]
                target.lora_A[name].weight.copy_(layer.lora_A.weight)
                target.lora_B[name].weight.copy_(layer.lora_B.weight)
    return bare, ours, theirs, names


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def adapter_bytes(wrapper: AdapterWrapper, name: str) -> int:
    return sum(p.numel() * p.element_size() for p in wrapper.adapters[name].adapter_parameters())


def time_case(fns: dict, rounds: int, warmup: int = 2) -> dict:
    """One call per measurement, interleaved rounds: tinytune.timing's harness."""
    return time_cases(fns, rounds, warmup=warmup, min_time=0.0, seed=random.randrange(1 << 30))


def ratio_stats(num: list[float], den: list[float]) -> dict:
    q = ratio_quantiles(num, den)
    return {k: q[k] for k in ("median", "p25", "p75")}


def run_case(bare, ours, theirs, names_all, rows, tokens, distinct, rounds, label):
    g = torch.Generator().manual_seed(rows * 1000 + tokens + distinct)
    ids = torch.randint(0, 1024, (rows, tokens), generator=g)
    used = names_all[:distinct]
    names = [used[i % distinct] for i in range(rows)]
    random.Random(distinct).shuffle(names)
    with torch.inference_mode():
        ref = theirs(input_ids=ids, adapter_names=names).logits
        out = ours(input_ids=ids, adapter_names=names).logits
        plain = bare(input_ids=ids).logits
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert (out - plain).abs().max() > 1e-2, "adapters must change the logits"
        fns = {
            "bare": lambda: bare(input_ids=ids, use_cache=False),
            "peft": lambda: theirs(input_ids=ids, adapter_names=names, use_cache=False),
            "tinytune": lambda: ours(input_ids=ids, adapter_names=names, use_cache=False),
        }
        times = time_case(fns, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    min_bytes = weight_bytes(bare) + sum(adapter_bytes(ours, n) for n in used)
    result = {
        "case": label,
        "rows": rows,
        "tokens_per_row": tokens,
        "distinct_adapters": distinct,
        "loaded_adapters": len(names_all),
        "rounds": rounds,
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "peft_over_bare": ratio_stats(times["peft"], times["bare"]),
        "tinytune_over_bare": ratio_stats(times["tinytune"], times["bare"]),
        "tinytune_over_peft": ratio_stats(times["tinytune"], times["peft"]),
        "max_abs_diff_vs_peft": (out - ref).abs().max().item(),
        "minimum_bytes": min_bytes,
        "tinytune_GBps_of_minimum_bytes": min_bytes / med["tinytune"] / 1e9,
    }
    print(
        f"{label:>28}: bare {1e3 * med['bare']:7.2f} ms | peft {1e3 * med['peft']:7.2f} ms"
        f" ({result['peft_over_bare']['median']:.2f}x bare)"
        f" | tinytune {1e3 * med['tinytune']:7.2f} ms"
        f" ({result['tinytune_over_bare']['median']:.2f}x bare,"
        f" {result['tinytune_over_peft']['median']:.2f}x peft"
        f" [{result['tinytune_over_peft']['p25']:.2f}-{result['tinytune_over_peft']['p75']:.2f}])",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, smaller prefill scaling")
    parser.add_argument(
        "--out", default=None, help="JSON path (default bench/results/mixed_<date>.json)"
    )
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model, 4 adapters, two cases of one round: checks that it runs")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    if args.smoke:
        bare, ours, theirs, names = build(4, model=SMOKE_MODEL)
        for rows, tokens in ((8, 1), (2, 4)):
            run_case(bare, ours, theirs, names, rows, tokens, 2, 1, f"smoke {rows}x{tokens}, 2 of 4 loaded")
        return
    bare, ours, theirs, names = build(64)
    results = []
    r_dec, r_pre = (10, 4) if args.quick else (40, 12)
    results.append(
        run_case(bare, ours, theirs, names, 32, 1, 16, r_dec, "decode 32x1, 16 of 64 loaded")
    )
    results.append(
        run_case(bare, ours, theirs, names, 8, 64, 4, r_pre, "prefill 8x64, 4 of 64 loaded")
    )
    # The same decode case with only the 16 adapters it uses loaded: the cost should not
    # depend on how many adapters are loaded.
    small = build(16)
    results.append(run_case(*small, 32, 1, 16, r_dec, "decode 32x1, 16 of 16 loaded"))
    del small
    scaling = []
    for n in (1, 2, 4, 8, 16, 32, 64):
        scaling.append(
            run_case(bare, ours, theirs, names, 64, 1, n, r_dec // 2, f"decode 64x1, {n} adapters")
        )
    pre_tokens = 16 if args.quick else 64
    for n in (1, 4, 16, 64):
        scaling.append(
            run_case(
                bare,
                ours,
                theirs,
                names,
                64,
                pre_tokens,
                n,
                max(3, r_pre // 3),
                f"prefill 64x{pre_tokens}, {n} adapters",
            )
        )
    report = {
        "benchmark": "mixed-adapter batches (adapter_names=), CPU",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "device": cpu_name(),
        "threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "tinytune": tinytune.__version__,
        },
        "git_sha": git_sha(),
        "model": "LlamaForCausalLM hidden 512, intermediate 1376, 2 layers, 8 heads, vocab 1024",
        "lora": {"r": RANK, "alpha": ALPHA, "targets": TARGETS, "loaded_adapters": len(names)},
        "cases": results,
        "scaling": scaling,
    }
    out = (
        Path(args.out)
        if args.out
        else ROOT
        / "bench"
        / "results"
        / (
            "mixed_"
            + dt.datetime.now().strftime("%Y%m%d_%H%M%S")
            + ("_quick" if args.quick else "")
            + ".json"
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
