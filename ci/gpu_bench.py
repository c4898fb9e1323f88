"""Benchmark the fused LoRA linear kernel against merged and unmerged PyTorch on a GPU.

    python ci/gpu_bench.py [--out FILE.json] [--quick]
    TRITON_INTERPRET=1 python ci/gpu_bench.py --dry-run     # CPU: check the script's logic

For ``K -> N`` in {4096 -> 4096, 4096 -> 14336}, ranks 16 and 64, bf16, and M from 1
to 8192 rows it times three ways to compute one adapted layer:

* merged: ``F.linear(x, W + s B A)`` (torch's GEMM; the floor a fused kernel aims at),
* unmerged: ``F.linear(x, W)``, ``h = x Aᵀ``, ``addmm(y, h, Bᵀ)`` (three kernels),
* fused: ``torch.ops.tinytune.lora_linear`` (one or two Triton kernels).

Each method is captured once in a CUDA graph that calls it on several copies of the
weights (enough to exceed L2, so W really comes from HBM), replayed and timed with CUDA
events. Methods run interleaved in shuffled order for several rounds; ratios are
medians of per-round ratios. Achieved bytes/s and FLOP/s are shown against the device's
peak, with the roofline prediction (ci/kernel_report.py) beside the measurement.

Targets (issue 8): fused <= 1.05x merged at M <= 16, <= 1.10x at M >= 2048, and at
least 1.3x faster than unmerged at M <= 16; (issue 20) <= 1.10x at M = 64 and 128
(batched decode). The full run also covers ranks 128 and 256, M = 17 to 256, the
``down_proj`` shape 14336 -> 4096 and pure IA³ (``l_in``/``l_out``, no LoRA; merged is
then ``l_out ⊙ W ⊙ l_in``, unmerged the scaled input, the GEMM and the scaled output). Exit status 0 when all are met, 1 if not
(or a point failed or was skipped at the deadline), 2 without a usable GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's tinytune, not an installed one
    sys.path.insert(1, str(ROOT))
from kernel_report import BENCH_SHAPES, PEAKS, roofline, _kernel_package  # noqa: E402
from tinytune.timing import GraphTimer, cpu_name, git_sha, interleave, ratio_quantiles  # noqa: E402

TARGET_DECODE = 1.05
TARGET_PREFILL = 1.10
TARGET_UNMERGED = 1.30
TARGET_BATCHED = 1.10  # at M = 64 and 128 (issue 20, target 4)
BATCHED_TARGET_MS = (64, 128)
DOWN_PROJ = (14336, 4096)


def _peaks(name: str):
    for key, v in PEAKS.items():
        if key in name:
            return v
    return None


def bench_points(quick: bool, dry_run: bool) -> list[tuple]:
    """The ``(k, n, r, m)`` points to time, in order; ``r = 0`` is pure IA³."""
    if dry_run:
        return [(64, 96, r, m) for r in (16, 128) for m in (1, 17)] + [(64, 96, 0, 17)]
    pts = []
    ms = [1, 16, 64, 128, 256, 2048, 8192] if quick else [1, 4, 16, 17, 32, 64, 128, 256, 1024, 2048, 4096, 8192]
    for k, n in BENCH_SHAPES:
        for r in (16, 64):
            pts += [(k, n, r, m) for m in ms]
    if not quick:
        batched = [1, 17, 32, 64, 128, 256]
        for k, n in [*BENCH_SHAPES, DOWN_PROJ]:
            for r in (128, 256):
                pts += [(k, n, r, m) for m in batched]
            pts += [(k, n, 0, m) for m in batched]
        pts += [(*DOWN_PROJ, r, m) for r in (16, 64) for m in ms]
    return pts


def bench_point(L, timer: GraphTimer, device, dtype, m, k, n, r, rounds, l2_bytes, budget_s):
    """Times merged / unmerged / fused for one shape (``r = 0``: pure IA³); returns a
    result dict."""
    g = torch.Generator(device="cpu").manual_seed(m * 7 + r)
    w_bytes = n * k * torch.finfo(dtype).bits // 8
    copies = max(1, min(8, math.ceil(2 * l2_bytes / w_bytes))) if timer.cuda else 1

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = rnd(m, k)
    scale = 2.0
    ia3 = r == 0
    l_in = rnd(k, std=0.1) + 1 if ia3 else None
    l_out = rnd(n, std=0.1) + 1 if ia3 else None
    layers = []
    for _ in range(copies):
        w = rnd(n, k, std=k**-0.5)
        if ia3:
            a = b = None
            merged_w = (l_out.float()[:, None] * w.float() * l_in.float()).to(dtype)
        else:
            a = rnd(r, k, std=k**-0.5)
            b = rnd(n, r, std=r**-0.5)
            merged_w = (w.float() + scale * (b.float() @ a.float())).to(dtype)
        layers.append((w, a, b, merged_w))
    s_vec = None if ia3 else torch.full((r,), scale, device=device, dtype=torch.float32)

    # Correctness of the fused result on this shape before timing it.
    w, a, b, _ = layers[0]
    got = L.lora_linear(x, w, None, a, b, s_vec, l_in, l_out, False).float()
    want = L.torch_lora_linear(x, w, None, a, b, s_vec, l_in, l_out, False).float()
    rel_err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    del got, want

    def merged():
        for _, _, _, mw in layers:
            F.linear(x, mw)

    def unmerged():
        for w, a, b, _ in layers:
            if ia3:
                F.linear(x * l_in, w) * l_out
                continue
            y = F.linear(x, w)
            h = F.linear(x, a)
            torch.addmm(y, h, b.t(), alpha=scale)

    def fused():
        for w, a, b, _ in layers:
            torch.ops.tinytune.lora_linear(x, w, None, a, b, s_vec, l_in, l_out, False)

    names = ["merged", "unmerged", "fused"]
    replays = dict(zip(names, timer.prepare([merged, unmerged, fused])))
    # Iterations so that one measurement takes ~budget_s / (rounds * 3).
    probe = timer.time(replays["merged"], 1)
    iters = max(1, min(200, int(budget_s / (rounds * 3) / max(probe, 1e-7))))
    per = interleave(names, rounds, lambda nm: timer.time(replays[nm], iters) / copies, seed=m * 7 + r)
    del replays
    fm = ratio_quantiles(per["fused"], per["merged"])
    ratio_fm = fm["median"]
    ratio_uf = ratio_quantiles(per["unmerged"], per["fused"])["median"]
    med = {nm: statistics.median(v) for nm, v in per.items()}
    e = torch.finfo(dtype).bits // 8
    fused_bytes = (n * k + r * (k + n) + m * (k + n)) * e
    fused_flops = 2 * m * n * k + 2 * m * r * (k + n)
    pred = roofline(m, k, n, r, e)
    return {
        "k": k, "n": n, "r": r, "m": m, "copies": copies, "iters": iters, "rounds": rounds,
        "merged_us": med["merged"] * 1e6, "unmerged_us": med["unmerged"] * 1e6, "fused_us": med["fused"] * 1e6,
        "fused_over_merged": ratio_fm, "unmerged_over_fused": ratio_uf,
        "spread_fused_over_merged": [min(fm["samples"]), max(fm["samples"])],
        "fused_bytes_per_s": fused_bytes / med["fused"], "fused_flops_per_s": fused_flops / med["fused"],
        "predicted_fused_over_merged": pred["fused_l"] / pred["merged_l"],
        "rel_err": rel_err,
    }  # fmt: skip


def verdict(row) -> list[str]:
    """Targets this row is subject to, each as 'ok ...' or 'MISS ...'."""
    out = []
    if row["rel_err"] > 2e-2:
        out.append(f"MISS accuracy rel_err={row['rel_err']:.2g}")
    if row["m"] <= 16:
        fm, uf = row["fused_over_merged"], row["unmerged_over_fused"]
        out.append(("ok" if fm <= TARGET_DECODE else "MISS") + f" fused/merged<={TARGET_DECODE}")
        if row["r"] > 0:  # issue 8's target is about LoRA's two extra kernels
            out.append(("ok" if uf >= TARGET_UNMERGED else "MISS") + f" unmerged/fused>={TARGET_UNMERGED}")
    elif row["m"] in BATCHED_TARGET_MS:
        fm = row["fused_over_merged"]
        out.append(("ok" if fm <= TARGET_BATCHED else "MISS") + f" fused/merged<={TARGET_BATCHED}")
    elif row["m"] >= 2048:
        fm = row["fused_over_merged"]
        out.append(("ok" if fm <= TARGET_PREFILL else "MISS") + f" fused/merged<={TARGET_PREFILL}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="fewer M values and rounds")
    ap.add_argument("--deadline-s", type=float, default=100.0,
                    help="start no new point after this many seconds (the rest are listed as skipped)")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU tensors and tiny shapes (use with TRITON_INTERPRET=1): checks the logic only")  # fmt: skip
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print(
            "gpu_bench: no CUDA device is visible to torch (torch.cuda.is_available() is False); "
            "run it on a GPU machine (ci/gpu_check.sh), or pass --dry-run with TRITON_INTERPRET=1 "
            "to check the script on the CPU.",
            file=sys.stderr,
        )
        return 2
    try:
        L = importlib.import_module(f"{_kernel_package()}.lora_linear")
    except Exception as exc:
        print(f"gpu_bench: cannot import kernels/lora_linear.py: {exc!r}", file=sys.stderr)
        return 2
    if cuda and not L.HAS_TRITON:
        print("gpu_bench: Triton is not installed; the fused kernel cannot run.", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16
    if cuda:
        props = torch.cuda.get_device_properties(0)
        name = props.name
        l2 = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
    else:
        name, l2 = f"cpu ({cpu_name()}, dry run)", 0
    peaks = _peaks(name)
    if args.dry_run:
        rounds, budget = 2, 0.01
    else:
        rounds, budget = (3, 0.15) if args.quick else (5, 0.3)
    print(f"device: {name}; torch {torch.__version__}; triton "
          f"{getattr(sys.modules.get('triton'), '__version__', 'n/a')}; git {(git_sha(ROOT) or 'unknown')[:12]}")  # fmt: skip
    if peaks is None:
        print("(unknown device: no peak figures; percentages omitted)")
    timer = GraphTimer(cuda)
    rows = []
    hdr = (f"{'K->N':<11} {'r':>3} {'M':>5} {'merged us':>10} {'unmerged us':>11} {'fused us':>9} "
           f"{'f/m':>6} {'pred f/m':>8} {'u/f':>6} {'TB/s':>6} {'%BW':>5} {'TFLOP/s':>8} {'%FLOP':>6}  targets")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    failures, skipped = [], []
    t_start = time.perf_counter()
    for k, n, r, m in bench_points(args.quick, args.dry_run):
        if time.perf_counter() - t_start > args.deadline_s:
            skipped.append(f"{k}->{n} r={r} M={m}")
            continue
        try:
            row = bench_point(L, timer, device, dtype, m, k, n, r, rounds, l2, budget)
        except Exception as exc:  # keep going: one broken point must not hide the rest
            msg = f"{k}->{n} r={r} M={m}: {type(exc).__name__}: {exc}"
            print("ERROR " + msg)
            failures.append(msg)
            if cuda:
                torch.cuda.empty_cache()
            continue
        v = verdict(row)
        row["targets"] = v
        rows.append(row)
        bw, fl = row["fused_bytes_per_s"], row["fused_flops_per_s"]
        pbw = f"{100 * bw / peaks[0]:>5.1f}" if peaks else f"{'-':>5}"
        pfl = f"{100 * fl / peaks[1]:>6.1f}" if peaks else f"{'-':>6}"
        print(
            f"{f'{k}->{n}':<11} {r:>3} {m:>5} {row['merged_us']:>10.2f} {row['unmerged_us']:>11.2f} "
            f"{row['fused_us']:>9.2f} {row['fused_over_merged']:>6.3f} "
            f"{row['predicted_fused_over_merged']:>8.3f} {row['unmerged_over_fused']:>6.2f} "
            f"{bw / 1e12:>6.2f} {pbw} {fl / 1e12:>8.1f} {pfl}  {', '.join(v)}",
            flush=True,
        )
        if cuda:
            torch.cuda.empty_cache()
    misses = [f"{r['k']}->{r['n']} r={r['r']} M={r['m']}: {t}" for r in rows for t in r["targets"] if t.startswith("MISS")]
    print()
    print(f"{len(rows)} points measured, {len(failures)} errors, {len(misses)} target misses, "
          f"{len(skipped)} skipped (deadline {args.deadline_s:.0f} s)")  # fmt: skip
    for line in failures + misses:
        print("  " + line)
    if skipped:
        print("  skipped: " + ", ".join(skipped))
    if args.out:
        meta = {"device": name, "torch": torch.__version__,
                "triton": getattr(sys.modules.get("triton"), "__version__", None), "git": git_sha(ROOT) or "unknown",
                "dtype": str(dtype), "dry_run": args.dry_run}  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "errors": failures, "skipped": skipped}, indent=1))
        print(f"results: {args.out}")
    if failures:
        return 1
    return 1 if (misses or skipped) and not args.dry_run else 0


if __name__ == "__main__":
    sys.exit(main())
