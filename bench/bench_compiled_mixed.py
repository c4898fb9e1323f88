"""Compiled against eager mixed decode on the CPU (issue 20, target 7).

``tinytune-bench``'s models and variants, 64 rows x 1 token, 64 adapters loaded, the
rows spread over 1, 8 and 64 distinct adapters (``--distinct``): each mixed call eagerly
and under ``torch.compile``, with the bare model (eager and compiled) beside them. The
compiled outputs are checked against the eager ones first.

Method: one torch thread, inference mode, warm-up (and compilation) first; each round
runs every case in a new random order and keeps the fastest of three calls (thread CPU
time); ``compiled_over_eager`` is the median over rounds of the per-round ratio.

Usage::

    python bench/bench_compiled_mixed.py            # tinytune-bench's default model
    python bench/bench_compiled_mixed.py --quick    # its --quick model (hidden 128, 1 layer)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tinytune import benchmark  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tinytune-bench's --quick model")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--distinct", default="1,8,64", help="distinct adapters per batch")
    args = parser.parse_args()
    ks = [int(k) for k in args.distinct.split(",")]
    argv = ["--tokens", "1", "--no-peft", "--adapters", "64", "--rows", "64"]
    s = benchmark.parse_args((["--quick"] if args.quick else []) + argv)
    s = dataclasses.replace(s, distinct=ks)
    torch.set_num_threads(1)
    torch._dynamo.config.cache_size_limit = 256
    models = benchmark.build_models(s)
    variants, _ = benchmark.make_variants(s, models)
    want = {f"mixed {k}{c}" for k in ks for c in ("", " compiled")} | {"bare", "bare compiled"}
    cases = {v.name: v.call for v in variants if v.name in want}
    ids = torch.randint(0, s.vocab, (s.rows, 1), generator=torch.Generator().manual_seed(1))
    per: dict[str, list[float]] = {n: [] for n in cases}
    with torch.inference_mode():
        for fn in cases.values():  # warm-up, compiles
            for _ in range(3):
                fn(ids)
        for k in ks:
            torch.testing.assert_close(
                cases[f"mixed {k} compiled"](ids), cases[f"mixed {k}"](ids), rtol=1e-4, atol=1e-4
            )
        for r in range(args.rounds):
            names = list(cases)
            random.Random(r).shuffle(names)
            for name in names:
                best = float("inf")
                for _ in range(3):
                    t0 = time.thread_time()
                    cases[name](ids)
                    best = min(best, time.thread_time() - t0)
                per[name].append(best * 1e3)
    med = statistics.median
    mixed = {}
    for k in ks:
        eager, compiled = per[f"mixed {k}"], per[f"mixed {k} compiled"]
        mixed[k] = {
            "eager_ms": round(med(eager), 3),
            "compiled_ms": round(med(compiled), 3),
            "compiled_over_eager": round(med([c / e for e, c in zip(eager, compiled)]), 3),
        }
    print(json.dumps({
        "model": benchmark.model_description(s),
        "bare_ms": round(med(per["bare"]), 3),
        "bare_compiled_ms": round(med(per["bare compiled"]), 3),
        "mixed": mixed,
    }, indent=1))


if __name__ == "__main__":
    main()
