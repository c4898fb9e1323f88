"""Benchmark per-row adapters (``tinytune::lora_mixed_linear``) on a GPU.

    python ci/gpu_bench_mixed.py [--out FILE.json] [--rounds N]
    TRITON_INTERPRET=1 python ci/gpu_bench_mixed.py --dry-run    # CPU: check the logic

One adapted 4096 -> 4096 linear layer, bf16, rank-16 LoRA adapters stacked as
``tinytune/batch.py`` stacks them (one slot per adapter plus the identity slot):

* decode: 64 rows of 1 token over 1, 4, 16 and 64 distinct adapters,
* prefill: 8 rows of 512 tokens over 4 adapters.

Three ways to compute the layer, each captured in a CUDA graph (on several copies of the
weights, so that W comes from HBM and not from L2), replayed and timed with CUDA events,
interleaved in shuffled order for several rounds (ratios: medians of per-round ratios):

* merged: ``F.linear(x, W + s B A)`` with one adapter merged (the floor: no adapter work),
* pytorch: ``F.linear(x, W, b)`` then ``torch_lora_mixed`` (the package's PyTorch mixed
  path: per-row gathers and batched matmuls),
* fused: ``torch.ops.tinytune.lora_mixed_linear`` (the Triton kernels).

Targets (issue 9): at decode with 16 distinct adapters fused <= 1.25x merged; at decode
fused >= 2x faster than the PyTorch mixed path. The roofline prediction (H200: 4.8 TB/s,
989 TFLOP/s bf16) is printed beside each measurement. Exit status: 0 all targets met,
1 a target missed or a result wrong, 2 no GPU (without ``--dry-run``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's tinytune, not an installed one
    sys.path.insert(1, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_report import PEAKS  # noqa: E402

HBM_BPS, TC_FLOPS = PEAKS["H200"]
TARGET_MERGED_16 = 1.25  # fused / merged at decode, 16 distinct adapters
TARGET_PYTORCH = 2.0  # pytorch / fused at decode
L2_BYTES = 60 * 2**20  # H200: 60 MiB (copies of the weights must not fit)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU/interpreter: tiny shapes, wall-clock timing; checks the script only")
    return p.parse_args(argv)


def roofline(rows: int, tokens: int, d: int, r: int, distinct: int, elem: int = 2) -> dict:
    """Predicted seconds on an H200: bytes at 4.8 TB/s or FLOPs at 989 TFLOP/s, whichever
    is larger (no launch gaps, no efficiency losses).

    merged reads W and x and writes y; fused also reads each distinct adapter's A and B
    once (the physical limit of the fused kernels); pytorch additionally reads the stacks,
    writes and reads back one gathered copy of A and B^T per row, and reads and writes y
    once more (the expand is a separate batched GEMM after torch's).
    """
    tokens = rows * tokens
    io = 2 * tokens * d * elem
    w = d * d * elem
    adapters = distinct * 2 * r * d * elem
    flops = 2 * tokens * d * d
    lora_flops = 2 * tokens * r * 2 * d
    merged = max((w + io) / HBM_BPS, flops / TC_FLOPS)
    fused = max((w + io + adapters) / HBM_BPS, (flops + lora_flops) / TC_FLOPS)
    gathered = 3 * rows * 2 * r * d * elem  # index_select writes + bmm reads, A and B^T
    pytorch = max((w + io + adapters + gathered + 2 * io) / HBM_BPS, (flops + lora_flops) / TC_FLOPS)
    return {"merged_s": merged, "fused_s": fused, "pytorch_s": pytorch}


def bench_case(L, timer, device, dtype, rows, tokens, distinct, d, r, rounds):
    """Times merged / pytorch / fused for one batch; returns a result dict."""
    import torch
    import torch.nn.functional as F

    from tinytune.timing import interleave, ratio_quantiles
    from tinytune.mixed_torch import torch_lora_mixed

    g = torch.Generator().manual_seed(rows * 100 + distinct)
    elem = torch.finfo(dtype).bits // 8
    copies = max(1, min(8, math.ceil(2 * L2_BYTES / (d * d * elem)))) if timer.cuda else 1

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    slots = distinct + 1  # + the identity slot, as tinytune/batch.py stacks them
    x = rnd(rows, tokens, d)
    perm = torch.randperm(rows, generator=g)
    row_index = (perm % distinct).to(device)  # every adapter used, rows shuffled
    ranks = torch.tensor([r] * distinct + [0], dtype=torch.int32, device=device)
    scale = torch.full((slots,), 2.0, device=device)
    layers = []
    for _ in range(copies):
        w = rnd(d, d, std=d**-0.5)
        bias = rnd(d)
        a = rnd(slots, r, d, std=d**-0.5)
        bt = rnd(slots, r, d, std=r**-0.5)
        a[-1].zero_()
        bt[-1].zero_()
        merged_w = (w.float() + 2.0 * (bt[0].float().t() @ a[0].float())).to(dtype)
        layers.append((w, bias, a, bt, merged_w))

    # Correctness on this very batch before timing it.
    w, bias, a, bt, _ = layers[0]
    got = L.lora_mixed_linear(x, w, bias, row_index, a, bt, scale, ranks, None, None).float()
    want = L.torch_lora_mixed_linear(x, w, bias, row_index, a, bt, scale, ranks, None, None).float()
    rel_err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    del got, want

    def merged():
        for _, bias, _, _, mw in layers:
            F.linear(x, mw, bias)

    def pytorch():
        for w, bias, a, bt, _ in layers:
            y = F.linear(x, w, bias)
            torch_lora_mixed(x, y, a, bt, scale, row_index, inplace=True)

    def fused():
        for w, bias, a, bt, _ in layers:
            torch.ops.tinytune.lora_mixed_linear(x, w, bias, row_index, a, bt, scale, ranks, None, None)

    names = ["merged", "pytorch", "fused"]
    replays = dict(zip(names, timer.prepare([merged, pytorch, fused])))
    probe = timer.time(replays["merged"], 1)
    iters = max(1, min(100, int(0.02 / max(probe, 1e-7)))) if timer.cuda else 1
    per = interleave(names, rounds, lambda n: timer.time(replays[n], iters) / copies,
                     seed=rows * 100 + distinct)
    del replays
    med = {n: statistics.median(v) for n, v in per.items()}
    fm = ratio_quantiles(per["fused"], per["merged"])
    pf = ratio_quantiles(per["pytorch"], per["fused"])
    pred = roofline(rows, tokens, d, r, distinct, elem)
    fused_bytes = (d * d + distinct * 2 * r * d + 2 * rows * tokens * d) * elem
    return {
        "rows": rows, "tokens": tokens, "distinct": distinct, "d": d, "r": r,
        "copies": copies, "iters": iters, "rounds": rounds,
        "merged_us": med["merged"] * 1e6, "pytorch_us": med["pytorch"] * 1e6,
        "fused_us": med["fused"] * 1e6,
        "fused_over_merged": fm["median"], "pytorch_over_fused": pf["median"],
        "spread_fused_over_merged": [min(fm["samples"]), max(fm["samples"])],
        "fused_bytes_per_s": fused_bytes / med["fused"],
        "predicted_fused_over_merged": pred["fused_s"] / pred["merged_s"],
        "predicted_pytorch_over_fused": pred["pytorch_s"] / pred["fused_s"],
        "rel_err": rel_err,
    }  # fmt: skip


def verdict(row) -> list:
    out = []
    if not row["rel_err"] <= 2e-2:
        out.append(f"MISS accuracy rel_err={row['rel_err']:.2g}")
    if row["tokens"] == 1:
        if row["distinct"] == 16:
            ok = row["fused_over_merged"] <= TARGET_MERGED_16
            out.append(("ok" if ok else "MISS") + f" fused/merged<={TARGET_MERGED_16}")
        ok = row["pytorch_over_fused"] >= TARGET_PYTORCH
        out.append(("ok" if ok else "MISS") + f" pytorch/fused>={TARGET_PYTORCH}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_bench_mixed: no CUDA device (torch.cuda.is_available() is False); this "
              "benchmark needs a GPU. On a CPU, check the script with "
              "TRITON_INTERPRET=1 python ci/gpu_bench_mixed.py --dry-run", file=sys.stderr)
        return 2
    if args.dry_run and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_bench_mixed: --dry-run on a CPU needs TRITON_INTERPRET=1 (set before "
              "Python starts) to exercise the kernels", file=sys.stderr)
        return 2
    from tinytune.kernels import lora_mixed as L

    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16
    d, rounds = (4096, args.rounds) if not args.dry_run else (48, 1)
    decode_rows, prefill = (64, (8, 512)) if not args.dry_run else (6, (2, 5))
    cases = [(decode_rows, 1, n) for n in (1, 4, 16, 64)] + [(prefill[0], prefill[1], 4)]
    if args.dry_run:
        cases = [(rows, tokens, min(n, rows)) for rows, tokens, n in cases]
    from tinytune.timing import GraphTimer, git_sha

    timer = GraphTimer(cuda and not args.dry_run)
    name = torch.cuda.get_device_name(0) if cuda else "cpu (dry run: not a GPU measurement)"
    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "missing"
    print(f"gpu_bench_mixed: {name}; torch {torch.__version__}, triton {tv}; d={d}, r=16, bf16")
    header = (f"{'rows x tok':>10} {'adapters':>8} {'merged us':>10} {'pytorch us':>10} "
              f"{'fused us':>9} {'fused/merged':>12} {'(pred)':>7} {'pytorch/fused':>13} "
              f"{'(pred)':>7} {'fused TB/s':>10}  targets")
    print(header)
    results = []
    status = 0
    for rows, tokens, distinct in cases:
        row = bench_case(L, timer, device, dtype, rows, tokens, distinct, d, 16, rounds)
        marks = verdict(row)
        status |= any(m.startswith("MISS") for m in marks)
        row["targets"] = marks
        results.append(row)
        print(f"{rows:>4} x {tokens:<4} {distinct:>8} {row['merged_us']:>10.2f} {row['pytorch_us']:>10.2f} "
              f"{row['fused_us']:>9.2f} {row['fused_over_merged']:>11.3f}x {row['predicted_fused_over_merged']:>6.2f}x "
              f"{row['pytorch_over_fused']:>12.2f}x {row['predicted_pytorch_over_fused']:>6.2f}x "
              f"{row['fused_bytes_per_s'] / 1e12:>10.2f}  {'; '.join(marks)}")  # fmt: skip
    summary = "all targets met" if not status else "some targets MISSED"
    if args.dry_run:
        summary = "dry run (logic only; timings are meaningless)"
        status = 1 if any(r["rel_err"] > 2e-2 for r in results) else 0
    print(f"gpu_bench_mixed: {summary}")
    if args.out:
        meta = {"device": name, "torch": torch.__version__, "triton": tv,
                "python": platform.python_version(), "git_sha": git_sha(ROOT) or "unknown",
                "dry_run": args.dry_run, "hbm_bytes_per_s": HBM_BPS, "tc_flops": TC_FLOPS}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"gpu_bench_mixed: wrote {args.out}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
