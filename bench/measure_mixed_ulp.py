"""How far mixed-batch rows are from running each row alone, across seeds.

Builds the mixed-batch test's model (``tests/test_mixed_batch.py``: a Tower with LoRA of
several ranks and alphas, rsLoRA, IA³ on inputs and outputs, modules_to_save, a mixed
LoRA+IA³ adapter and a custom layer) for each seed, runs the test's nine rows once as a
mixed batch and once row by row, and reports the largest difference in units in the
last place of the largest output magnitude (outputs are below 8, so one unit is 2**-21
in fp32, 2**-8 in fp16, 2**-5 in bf16), which is the unit the README states.

    python bench/measure_mixed_ulp.py --seeds 200
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import Tower  # noqa: E402
from test_mixed_batch import NAMES, many_kinds, per_row_reference  # noqa: E402

MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def measure(dtype: torch.dtype, seed: int) -> float:
    torch.manual_seed(seed)
    w = many_kinds(Tower().eval())
    w.to(dtype)
    ids = torch.randint(0, 32, (len(NAMES), 5))
    with torch.no_grad():
        ref = per_row_reference(w, ids, NAMES).float()
        out = w(ids, adapter_names=NAMES).float()
    top = ref.abs().max().item()
    ulp = 2.0 ** (math.floor(math.log2(top)) - MANTISSA[dtype])
    return (out - ref).abs().max().item() / ulp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ulps = sorted(measure(dtype, s) for s in range(args.seeds))
        worst = ulps[-1]
        print(
            f"{str(dtype):16s} seeds={args.seeds}: max {worst:.1f} ulp, "
            f"p99 {ulps[int(0.99 * (len(ulps) - 1))]:.1f}, median {ulps[len(ulps) // 2]:.1f}"
        )


if __name__ == "__main__":
    main()
