"""Unmerged and merged LoRA forward cost against the bare model and against PEFT (CPU).

A Llama-style model (hidden 512, intermediate 1376, LoRA r=16 on all seven projections,
batch 4 x 128 tokens); tinytune and PEFT carry the same adapter weights, and their
outputs are checked to agree before anything is timed.

    python bench/bench_core.py            # full run (about a minute)
    python bench/bench_core.py --quick    # a few rounds, to check it works
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import LLAMA_PROJECTIONS, interleaved, llama, markdown_table, write_results  # noqa: E402

from tinytune import AdapterWrapper, LoraConfig  # noqa: E402


def build(layers: int, rank: int):
    base = llama(layers=layers)
    config = LoraConfig(target_modules=LLAMA_PROJECTIONS, r=rank, lora_alpha=2 * rank)
    unmerged = AdapterWrapper.from_config(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in unmerged.named_adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    merged = AdapterWrapper.from_config(copy.deepcopy(base), config)
    merged.load_state_dict(unmerged.state_dict())
    merged.merge_adapters()

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(base),
        PeftLoraConfig(target_modules=LLAMA_PROJECTIONS, r=rank, lora_alpha=2 * rank),
    ).eval()
    with torch.no_grad():
        for path, layer in unmerged.adapters["default"].items():
            target = peft_model.base_model.model.get_submodule(path)
            target.lora_A["default"].weight.copy_(layer.lora_A.weight)
            target.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return base, unmerged, merged, peft_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, to check the script")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = args.rounds or (3 if args.quick else 30)

    base, unmerged, merged, peft_model = build(args.layers, args.rank)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = unmerged(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(merged(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(base(input_ids=ids).logits, ref, atol=1e-4)

        cases = {
            "bare model": lambda: base(input_ids=ids),
            "tinytune unmerged": lambda: unmerged(input_ids=ids),
            "tinytune merged": lambda: merged(input_ids=ids),
            "PEFT unmerged": lambda: peft_model(input_ids=ids),
        }
        res = interleaved(cases, reference="bare model", rounds=rounds, warmup=2)
    peft_t = res["PEFT unmerged"]["ratio"]
    rows = []
    for name, r in res.items():
        rows.append([
            name,
            f"{r['median_ms']:.1f}",
            f"{r['ratio']:.3f} ({r['ratio_p25']:.3f}-{r['ratio_p75']:.3f})",
            f"{r['ratio'] / peft_t:.3f}",
        ])
    # The LoRA arithmetic: per token, per projection, r*(in+out) multiply-adds on top of
    # in*out; the share over all linear layers (the attention math is left out).
    cfg = base.config
    h, i, r = cfg.hidden_size, cfg.intermediate_size, args.rank
    shapes = [(h, h)] * 4 + [(h, i), (h, i), (i, h)]
    base_flops = sum(a * b for a, b in shapes) * cfg.num_hidden_layers + h * cfg.vocab_size
    lora_flops = sum(r * (a + b) for a, b in shapes) * cfg.num_hidden_layers
    table = markdown_table(rows, ["case", "median ms", "x bare (p25-p75)", "x PEFT unmerged"])
    print(table)
    print(f"\nLoRA arithmetic over the model's linear layers: +{100 * lora_flops / base_flops:.1f}%")
    path = write_results(
        "core",
        {
            "shape": {"batch": args.batch, "seq": args.seq, "layers": args.layers, "rank": r},
            "rounds": rounds,
            "results": res,
            "lora_flop_share": lora_flops / base_flops,
            "table": table,
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
