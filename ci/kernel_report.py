"""Compile every fused-kernel configuration for sm_80 and sm_90a on this machine (no GPU).

    python ci/kernel_report.py --out DIR [--quick] [--arch 80,90] [--also-with PYTHON]
    python ci/kernel_report.py --summarize REPORT.json [--summarize OTHER.json]

Triton's own compiler produces PTX and a cubin for a GPU target without a GPU
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, the third field being the warp size). For each
configuration the launchers can choose, this script records the registers and spills
(``cuobjdump --dump-resource-usage`` on the cubin, the tool shipped in Triton's nvidia
backend ``bin/``), the shared memory the kernel needs (``metadata.shared``) and whether
the PTX uses ``wgmma`` (sm_90 warpgroup tensor cores), ``mma.sync`` or no tensor cores.
It writes ``DIR/kernel_report.json``, prints a table, and prints the H200 roofline
prediction of merged / fused / unmerged layers for the GPU benchmark shapes.

A configuration that fails to compile is recorded with its error (and misses its
targets) instead of stopping the run. ``--also-with PYTHON`` runs the same report under
another interpreter (e.g. a venv with an older Triton) into ``DIR/also-with/`` and
prints both reports' totals side by side, one column per Triton version;
``--summarize`` given two reports prints the same comparison without compiling.

Registry contract: every module ``kernels/<name>.py`` may define ``report_configs()``
returning a list of dicts with these keys:

* ``kernel`` (str): a short name for the table.
* ``fn``: the ``@triton.jit`` function.
* ``signature`` (dict): every argument of ``fn`` -> a Triton type string (``"*bf16"``,
  ``"*fp32"``, ``"i32"``, ``"i64"``, ``"fp32"``) or ``"constexpr"``.
* ``constexprs`` (dict): argument name -> value, for every ``"constexpr"`` entry
  (including unit strides, which the JIT specializes to the constant 1).
* ``divisible_by_16`` (list of str): arguments the JIT would hint as multiples of 16
  (pointers of fresh allocations, sizes and row strides that are multiples of 16).
* ``config`` (dict): ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``num_warps``, ``num_stages``
  (``num_warps``/``num_stages`` are passed to the compiler; the blocks are for the table).
* ``case`` (str): ``"decode"``, ``"prefill"``, ... (``prefill*`` cases on sm_90a are
  expected to use ``wgmma``, except fp32 ones: IEEE fp32 products have no tensor-core path).
* optional ``variant`` (str): dtype / rank / layout, for the table.
* optional ``archs`` (list of int): the compute capabilities whose dispatch chooses this
  configuration (default: every ``--arch``); a config is compiled only for those.
* optional ``quick`` (bool): part of the ``--quick`` subset (the test command's run).
* optional ``module`` (str): the op's file stem for the table (default: the module that
  returned the record; ``kernels/report_configs.py`` holds every op's records).

Records in ``kernel_report.json``: ``kernel``, ``case``, ``variant``, ``arch``
(``"sm_80"``/``"sm_90a"``), ``config``, ``registers``, ``spill_bytes`` (the stack frame
from cuobjdump: Triton kernels make no calls, so a stack frame means spilled registers),
``shared_bytes``, ``shared_limit``, ``mma``, ``compile_s``, ``module``, ``triton`` (the
version that compiled it). A failed compile keeps ``kernel`` to ``config``, ``module``
and ``triton`` and has ``error`` (the exception's type and message) instead of the measurements.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path



ROOT = Path(__file__).resolve().parents[1]
KERNELS_DIR = ROOT / "kernels"

# Max dynamic shared memory per block (opt-in): A100 163 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
REGISTER_FILE = 65536  # 32-bit registers per SM (and per block) on both

# Peaks per GPU (name substring -> (HBM bytes/s, dense bf16 tensor-core FLOP/s)): the
# one table every script in ci/ reads (gpu_bench.py, gpu_bench_mixed.py).
PEAKS = {
    "H200": (4.8e12, 989e12),
    "H100": (3.35e12, 989e12),
    "A100": (2.0e12, 312e12),
}
# H200 roofline (SXM): HBM3e bandwidth and dense bf16 tensor-core peak.
H200_BW, H200_FLOPS = PEAKS["H200"]
LAUNCH_S = 2e-6  # assumed cost of each extra dependent kernel in a CUDA graph (not in the roofline)


def _kernel_package():
    """The kernels package of this checkout (installed as tinytune.kernels, or loaded by path).

    ``kernels/`` has no ``__init__.py`` (see ``kernels/triton_support.py``): loaded by path,
    it becomes a package object whose ``__path__`` is the folder.
    """
    try:
        pkg = importlib.import_module("tinytune.kernels")
        if KERNELS_DIR in [Path(p).resolve() for p in pkg.__path__]:
            return pkg.__name__
    except Exception:
        pass
    name = "_tinytune_kernels_checkout"
    mod = types.ModuleType(name)
    mod.__path__ = [str(KERNELS_DIR)]
    sys.modules[name] = mod
    return name


def discover() -> list[dict]:
    """Every record of every ``kernels/*.py`` module's ``report_configs()``."""
    pkg = _kernel_package()
    records = []
    for path in sorted(KERNELS_DIR.glob("*.py")):
        if path.stem == "triton_support":
            continue
        mod = importlib.import_module(f"{pkg}.{path.stem}")
        fn = getattr(mod, "report_configs", None)
        if fn is None:
            continue
        for rec in fn():
            rec = dict(rec)
            rec.setdefault("module", path.stem)  # a registry module names each record's op
            records.append(rec)
    return records


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else "cuobjdump"


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the cubin's kernel, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        p = f.name
    try:
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", p], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(p)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"could not parse cuobjdump output:\n{out}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(4))


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "none"


def compile_record(rec: dict, arch: int) -> dict:
    """Compile one registry record for ``sm_<arch>`` and return its report record."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = rec["fn"]
    missing = set(fn.arg_names) - set(rec["signature"])
    if missing:
        raise ValueError(f"{rec['kernel']}: signature lacks {sorted(missing)}")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in rec["divisible_by_16"]}
    src = ASTSource(fn, rec["signature"], rec["constexprs"], attrs)
    cfg = rec["config"]
    t0 = time.perf_counter()
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),  # CUDA warps are 32 threads on every arch
        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
    )
    dt = time.perf_counter() - t0
    regs, spill = _resource_usage(compiled.asm["cubin"])
    return {
        "kernel": rec["kernel"],
        "module": rec.get("module", ""),
        "case": rec.get("case", ""),
        "variant": rec.get("variant", ""),
        "arch": "sm_90a" if arch == 90 else f"sm_{arch}",
        "config": dict(cfg),
        "registers": regs,
        "spill_bytes": spill,
        "shared_bytes": int(compiled.metadata.shared),
        "shared_limit": SHARED_LIMIT[arch],
        "mma": _mma_kind(compiled.asm["ptx"]),
        "compile_s": round(dt, 2),
    }


def error_record(rec: dict, arch: int, exc: BaseException) -> dict:
    """The report record of a configuration whose compile raised ``exc``."""
    msg = " ".join(str(exc).split())  # compiler errors span lines; the table needs one
    return {
        "kernel": rec["kernel"],
        "module": rec.get("module", ""),
        "case": rec.get("case", ""),
        "variant": rec.get("variant", ""),
        "arch": "sm_90a" if arch == 90 else f"sm_{arch}",
        "config": dict(rec["config"]),
        "error": f"{type(exc).__name__}: {msg[:500]}",
    }


def compile_all(records: list[dict], archs: list[int], compile_fn=None) -> list[dict]:
    """Compile every record for its archs; a failing compile becomes an error record.

    Args:
        records: registry records (see the module docstring).
        archs: compute capabilities to compile for (a record's ``archs`` narrows them).
        compile_fn: ``(record, arch) -> report record``; ``compile_record`` by default.

    Returns:
        One report record per (record, arch), each tagged with the Triton version.
    """
    import triton

    compile_fn = compile_fn or compile_record
    results = []
    t0 = time.perf_counter()
    for i, rec in enumerate(records):
        for arch in archs:
            if arch in rec.get("archs", archs):
                try:
                    out = compile_fn(rec, arch)
                except Exception as exc:  # one bad configuration must not hide the others
                    out = error_record(rec, arch, exc)
                    print(f"  sm_{arch}: {out['error'][:200]}", file=sys.stderr, flush=True)
                results.append(dict(out, triton=triton.__version__))
        print(f"[{i + 1}/{len(records)}] {rec['kernel']} {rec.get('case', '')} {rec.get('variant', '')} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    return results


def problems(r: dict) -> list[str]:
    """Targets a report record misses (empty when all are met)."""
    if "error" in r:
        return [f"compile failed: {r['error']}"]
    out = []
    if r["spill_bytes"]:
        out.append(f"spills {r['spill_bytes']} B")
    if r["shared_bytes"] > r["shared_limit"]:
        out.append(f"shared {r['shared_bytes']} > {r['shared_limit']}")
    if r["registers"] * r["config"]["num_warps"] * 32 > REGISTER_FILE:
        out.append("registers exceed the register file")
    fp32 = r["variant"].startswith("fp32")
    if r["arch"] == "sm_90a" and r["case"].startswith("prefill") and "shrink" not in r["case"]:
        if not fp32 and r["mma"] != "wgmma":
            out.append(f"prefill uses {r['mma']}, not wgmma")
    return out


def print_table(results: list[dict]) -> None:
    hdr = f"{'kernel':<20} {'case':<16} {'variant':<20} {'arch':<7} {'BMxBNxBK':<12} {'w':>2} {'s':>2} {'regs':>5} {'spill':>5} {'smem KiB':>8} {'mma':<8} ok"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        c = r["config"]
        tile = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"
        bad = problems(r)
        if "error" in r:
            print(f"{r['kernel']:<20} {r['case']:<16} {r['variant']:<20} {r['arch']:<7} {tile:<12} "
                  f"{c['num_warps']:>2} {c['num_stages']:>2} {bad[0]}")  # fmt: skip
            continue
        print(
            f"{r['kernel']:<20} {r['case']:<16} {r['variant']:<20} {r['arch']:<7} {tile:<12} "
            f"{c['num_warps']:>2} {c['num_stages']:>2} {r['registers']:>5} {r['spill_bytes']:>5} "
            f"{r['shared_bytes'] / 1024:>8.1f} {r['mma']:<8} {'yes' if not bad else '; '.join(bad)}"
        )


def print_summary(results: list[dict]) -> None:
    """One line per (arch, kernel, case, dtype, tile): ranges over ranks and layouts."""
    groups: dict = {}
    for r in results:
        c = r["config"]
        tile = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"
        kern = r["kernel"].removesuffix("_kn")
        key = (r["arch"], kern, r["case"], r["variant"].split()[0], tile)
        groups.setdefault(key, []).append(r)
    hdr = f"| arch | kernel | case | dtype | tile (BMxBNxBK, warps, stages) | configs | registers | spills (B) | shared KiB | mma | targets |"
    print(hdr)
    print("|" + "---|" * 11)
    for (arch, kern, case, dt, tile), all_rs in groups.items():
        rs = [r for r in all_rs if "error" not in r]
        if not rs:
            print(f"| {arch} | {kern} | {case} | {dt} | {tile} | {len(all_rs)} | - | - | - | - | "
                  f"{len(all_rs)} FAILED to compile |")  # fmt: skip
            continue
        regs = sorted(r["registers"] for r in rs)
        smem = max(r["shared_bytes"] for r in rs) / 1024
        mma = "/".join(sorted({r["mma"] for r in rs}))
        ok = "met" if not any(problems(r) for r in rs) else "MISSED"
        if len(rs) < len(all_rs):
            ok = f"{len(all_rs) - len(rs)} FAILED to compile"
        rng = f"{regs[0]}-{regs[-1]}" if regs[0] != regs[-1] else f"{regs[0]}"
        print(f"| {arch} | {kern} | {case} | {dt} | {tile} | {len(all_rs)} | {rng} | "
              f"{max(r['spill_bytes'] for r in rs)} | {smem:.1f} | {mma} | {ok} |")  # fmt: skip


# ---------------------------------------------------------------------------------------
# Roofline prediction (H200): each kernel costs max(bytes / BW, FLOPs / peak).
# ---------------------------------------------------------------------------------------


def _t(bytes_, flops):
    return max(bytes_ / H200_BW, flops / H200_FLOPS)


H200_SMS = 132
# A CTA streams at most this share of HBM bandwidth: an SM sustains about twice its
# fair share (1/132), so ~66 CTAs saturate HBM; tensor cores are per SM (1/132 each).
# An assumption of the model, like LAUNCH_S.
CTA_BW_SHARE = 2 / H200_SMS


def _tk(bytes_, flops, ctas):
    """One kernel of ``ctas`` programs: bytes at the bandwidth its CTAs can draw, FLOPs
    on the SMs it occupies."""
    return max(bytes_ / (H200_BW * min(1.0, ctas * CTA_BW_SHARE)),
               flops / (H200_FLOPS * min(1.0, ctas / H200_SMS)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _lora_linear():
    return importlib.import_module(f"{_kernel_package()}.lora_linear")


def _shrink_time(m: int, k: int, r: int, e: int, sc: dict) -> tuple:
    """The shrink kernel on ``sc``'s grid: ``(seconds, programs, memsets)``.

    Programs: M-tiles x rank blocks x K-splits, each at its share of the GPU (``_tk``).
    Bytes: x and A once (the rank blocks of an M-tile are neighbours in the grid and
    share x in L2; every M-tile reads the same A: L2 re-reads are outside the model, as
    for the one-launch path's A), h written, and with a K-split the fp32 partial tiles
    written and read back (counted as HBM traffic), plus the memset of the arrival
    counters (one more dependent launch, counted in the ``*_l`` figures).
    """
    if r == 0:
        return 0.0, 0, 0
    bm, br = sc["BLOCK_M"], sc["BLOCK_R"]
    tiles_m, tiles_r = _cdiv(m, bm), _cdiv(r, br)
    chunk = _cdiv(_cdiv(k, sc["SPLIT_K"]), sc["BLOCK_K"]) * sc["BLOCK_K"]
    split = _cdiv(k, chunk)
    r_pad = tiles_r * br
    bytes_ = m * k * e + r * k * e + m * r * 4
    if split > 1:
        bytes_ += 2 * split * tiles_m * tiles_r * bm * br * 4
    programs = tiles_m * tiles_r * split
    return _tk(bytes_, 2 * tiles_m * bm * k * r_pad, programs), programs, int(split > 1)


def roofline(m: int, k: int, n: int, r: int, e: int = 2) -> dict:
    """Predicted seconds of one bf16 layer: merged, fused (both paths) and unmerged PyTorch.

    ``e`` bytes per element. Each kernel costs max(bytes / BW, FLOPs / peak) scaled by
    the share of the GPU its grid fills (``_tk``: CTAs per SM); merged and unmerged are
    cuBLAS GEMMs, assumed to fill it. The fused op has two paths, with the tiles
    ``pick_config`` gives (sm_90): ``one`` (the shrink fused in the GEMM's K-loop,
    repeated per N-tile: decode and batched decode) and ``two`` (shrink kernel, then the
    GEMM reading ``h`` in its epilogue; the shrink split over rank and K as
    ``shrink_config`` splits it, ``two_unsplit_l`` without that split: issue 20's
    target 5). ``fused`` is the path ``pick_config`` takes (``path``). Launch gaps are
    outside the roofline; ``*_l`` adds ``LAUNCH_S`` per kernel beyond the first (the
    split-K shrink's counter memset counts as one).
    """
    L = _lora_linear()
    bf16 = importlib.import_module("torch").bfloat16
    cfg = L.pick_config(m, n, k, r, bf16, 90)
    r_pad = cfg["R_PAD"]
    w, x, y, a, b = n * k * e, m * k * e, m * n * e, r * k * e, n * r * e
    base_flops = 2 * m * n * k
    merged = _t(w + x + y, base_flops)
    # One launch: A re-reads per N-tile come from L2; the shrink runs once per N-tile,
    # on the tile's padded rows. Without a fused tile at this shape (large rank, fp32
    # tiles, M > 128) the decode-sized 32x128 tile stands in for it.
    bm, bn = (cfg["BLOCK_M"], cfg["BLOCK_N"]) if cfg["shrink_in_loop"] else (32, 128)
    tiles_m, tiles_n = _cdiv(m, bm), _cdiv(n, bn)
    one = _tk(w + x + y + a + b, base_flops + 2 * tiles_m * bm * k * r_pad * tiles_n + 2 * m * n * r_pad,
              tiles_m * tiles_n)
    # Two launches: the shrink (split as shrink_config splits it), then the GEMM, with the
    # tiles pick_config gives where the shrink is not fused.
    two_cfg = cfg if not cfg["shrink_in_loop"] else L.pick_config(m, n, k, max(r, L.DECODE_FUSED_MAX_RANK + 1), bf16, 90)
    sc = L.shrink_config(r_pad, m <= L.DECODE_MAX_M, False, m, k, H200_SMS)
    shrink, shrink_programs, memset = _shrink_time(m, k, r, e, sc)
    unsplit = dict(L.shrink_config(r_pad, m <= L.DECODE_MAX_M, False), BLOCK_R=r_pad, SPLIT_K=1)
    shrink_unsplit, unsplit_programs, _ = _shrink_time(m, k, r, e, unsplit)
    gemm2 = _tk(w + x + y + b + m * r * 4, base_flops + 2 * m * n * r_pad,
                _cdiv(m, two_cfg["BLOCK_M"]) * _cdiv(n, two_cfg["BLOCK_N"]))
    two = shrink + gemm2
    if r == 0:  # no LoRA (pure IA³): the GEMM alone, one launch
        one = two = _tk(w + x + y, base_flops, _cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"]))
    path = "one" if cfg["shrink_in_loop"] or r == 0 else "two"
    fused = one if path == "one" else two
    unmerged = (
        merged
        + _t(x + a + m * r * e, 2 * m * k * r)  # h = x Aᵀ
        + _t(m * r * e + b + 2 * y, 2 * m * n * r)  # y += h Bᵀ (addmm reads and writes y)
    )
    return {
        "path": path,
        "merged": merged,
        "fused": fused,
        "unmerged": unmerged,
        "one": one,
        "two": two,
        "merged_l": merged,
        "fused_l": fused + (0 if path == "one" else LAUNCH_S * (1 + memset)),
        "one_l": one,
        "two_l": two + LAUNCH_S * (1 + memset),
        "unmerged_l": unmerged + 2 * LAUNCH_S,
        # the shrink alone, split (as launched) and as one program per BLOCK_M rows
        "shrink": shrink,
        "shrink_unsplit": shrink_unsplit,
        "two_unsplit_l": shrink_unsplit + gemm2 + LAUNCH_S,
        "shrink_programs": shrink_programs,
        "shrink_unsplit_programs": unsplit_programs,
    }


BENCH_SHAPES = [(4096, 4096), (4096, 14336)]
BENCH_RANKS = [16, 64]
BENCH_MS = [1, 4, 16, 32, 64, 128, 256, 1024, 2048, 4096, 8192]


def print_roofline() -> list[dict]:
    print()
    print(
        "H200 roofline PREDICTION (not a measurement): 4.8 TB/s, 989 TFLOP/s bf16, 132 SMs "
        f"(a CTA draws at most 2/132 of HBM); '+launch' adds {LAUNCH_S * 1e6:.0f} us per extra dependent kernel; "
        "path: one = shrink fused in the GEMM (one launch), two = shrink + GEMM"
    )
    hdr = (f"{'K->N':<12} {'r':>3} {'M':>5} {'path':>4} {'merged us':>10} {'fused us':>9} {'unmerged us':>11} "
           f"{'fused/merged':>12} {'unmerged/fused':>14} {'+launch f/m':>11} {'+launch u/f':>11} "
           f"{'+l one/m':>9} {'+l two/m':>9}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for k, n in BENCH_SHAPES:
        for r in BENCH_RANKS:
            for m in BENCH_MS:
                p = roofline(m, k, n, r)
                row = {"k": k, "n": n, "r": r, "m": m, "path": p["path"],
                       **{key: v * 1e6 for key, v in p.items() if key != "path"}}
                rows.append(row)
                print(
                    f"{f'{k}->{n}':<12} {r:>3} {m:>5} {p['path']:>4} {row['merged']:>10.2f} {row['fused']:>9.2f} "
                    f"{row['unmerged']:>11.2f} {p['fused'] / p['merged']:>12.3f} "
                    f"{p['unmerged'] / p['fused']:>14.3f} {p['fused_l'] / p['merged_l']:>11.3f} "
                    f"{p['unmerged_l'] / p['fused_l']:>11.3f} {p['one_l'] / p['merged']:>9.3f} "
                    f"{p['two_l'] / p['merged']:>9.3f}"
                )
    return rows


SPLIT_SHAPES = [*BENCH_SHAPES, (14336, 4096)]  # the benchmark's shapes and down_proj
SPLIT_RANKS = [16, 128, 256]
SPLIT_MS = [1, 16, 17, 64, 128, 256, 1024, 2048]


def print_shrink_split() -> list[dict]:
    """The two-launch path's shrink, split (as launched) and unsplit (one program per
    BLOCK_M rows, before issue 20's target 5), in the model."""
    print()
    print("Shrink split (H200 roofline PREDICTION): programs and us of the shrink kernel unsplit -> split, "
          "and the two-launch path (+launch, the split-K memset counted as one) over merged")
    hdr = (f"{'K->N':<12} {'r':>3} {'M':>5} {'path':>4} {'programs':>11} {'shrink us':>13} "
           f"{'+l two/m':>15}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for k, n in SPLIT_SHAPES:
        for r in SPLIT_RANKS:
            for m in SPLIT_MS:
                p = roofline(m, k, n, r)
                row = {"k": k, "n": n, "r": r, "m": m, "path": p["path"],
                       "programs": p["shrink_unsplit_programs"], "programs_split": p["shrink_programs"],
                       "shrink_us": p["shrink_unsplit"] * 1e6, "shrink_split_us": p["shrink"] * 1e6,
                       "two_l_over_merged": p["two_unsplit_l"] / p["merged"],
                       "two_split_l_over_merged": p["two_l"] / p["merged"]}
                rows.append(row)
                print(f"{f'{k}->{n}':<12} {r:>3} {m:>5} {p['path']:>4} "
                      f"{row['programs']:>4} -> {row['programs_split']:>4} "
                      f"{row['shrink_us']:>5.2f} -> {row['shrink_split_us']:>5.2f} "
                      f"{row['two_l_over_merged']:>6.3f} -> {row['two_split_l_over_merged']:>5.3f}")
    return rows


def totals(results: list[dict]) -> dict:
    """One report's totals (the rows of the side-by-side comparison)."""
    ok = [r for r in results if "error" not in r]
    out = {
        "triton": "/".join(sorted({r.get("triton", "?") for r in results})) or "?",
        "compiled": len(ok),
        "failed to compile": len(results) - len(ok),
        "missing a target": sum(1 for r in results if problems(r)),
        "configs with spills": sum(1 for r in ok if r["spill_bytes"]),
        "max spill (B)": max((r["spill_bytes"] for r in ok), default=0),
        "max registers": max((r["registers"] for r in ok), default=0),
    }
    for arch in sorted({r["arch"] for r in results}):
        out[f"max shared KiB {arch}"] = round(max((r["shared_bytes"] for r in ok if r["arch"] == arch), default=0) / 1024, 1)
    for mma in ("wgmma", "mma.sync", "none"):
        out[f"mma {mma}"] = sum(1 for r in ok if r["mma"] == mma)
    return out


def print_comparison(reports: list[list[dict]]) -> list[dict]:
    """Print the totals of several reports side by side (a column per Triton version)."""
    cols = [totals(r) for r in reports]
    rows = list(dict.fromkeys(k for c in cols for k in c if k != "triton"))
    print("| | " + " | ".join(f"Triton {c['triton']}" for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for k in rows:
        print(f"| {k} | " + " | ".join(str(c.get(k, "-")) for c in cols) + " |")
    failed = [r for rs in reports for r in rs if "error" in r]
    for r in failed:
        c = r["config"]
        print(f"Triton {r.get('triton', '?')}: {r['kernel']} {r['case']} {r['variant']} {r['arch']} "
              f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}: {r['error']}")  # fmt: skip
    return cols


def print_report(results: list[dict]) -> None:
    print_table(results)
    print()
    print("Summary (ranges over ranks and weight layouts):")
    print_summary(results)


def run_also_with(python: str, out: Path, argv: list[str]) -> list[dict]:
    """Run this script under ``python`` (another Triton) with ``--out out/also-with``.

    Returns its records; raises RuntimeError when it wrote no report.
    """
    sub = out / "also-with"
    sub.mkdir(parents=True, exist_ok=True)
    report = sub / "kernel_report.json"
    report.unlink(missing_ok=True)  # a stale report must not pass for this run's
    print(f"kernel_report: running the report under {python} into {sub}", file=sys.stderr, flush=True)
    with open(sub / "stdout.txt", "w") as log:
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--out", str(sub), *argv], stdout=log)
    if not report.exists():
        raise RuntimeError(f"{python} wrote no report (exit {proc.returncode}); see {sub / 'stdout.txt'}")
    return json.loads(report.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="directory for kernel_report.json (required unless --summarize)")
    ap.add_argument("--quick", action="store_true", help="only the records marked quick (fast subset)")
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (80,90)")
    ap.add_argument("--summarize", metavar="JSON", action="append",
                    help="print the tables of an existing kernel_report.json; compile nothing. "
                         "Given twice, also print both reports' totals side by side")  # fmt: skip
    ap.add_argument("--also-with", metavar="PYTHON",
                    help="also run the report under this interpreter (another Triton, e.g. a venv's "
                         "bin/python) into OUT/also-with/ and print both side by side")  # fmt: skip
    args = ap.parse_args(argv)
    if not args.summarize and not args.out:
        ap.error("--out is required (or --summarize JSON)")
    if args.summarize:
        reports = [json.loads(Path(p).read_text()) for p in args.summarize]
        for results in reports:
            print_report(results)
        print_roofline()
        print_shrink_split()
        if len(reports) > 1:
            print()
            print_comparison(reports)
        return 1 if any(problems(r) for rs in reports for r in rs) else 0
    # Only when compiling (importing this module or --summarize changes nothing): the kernels
    # must be JIT functions, not the interpreter's wrappers, to be compiled, and the test
    # command sets TRITON_INTERPRET=1 for everything it runs. Triton 3.9 warns when
    # TRITON_DEFAULT_FP_FUSION is unset; 1 keeps its (and the JIT's) default.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        import triton  # noqa: F401
    except Exception as exc:
        print(f"kernel_report: Triton is not installed ({exc}); pip install triton", file=sys.stderr)
        return 2
    archs = [int(a) for a in args.arch.split(",") if a]
    records = discover()
    if args.quick:
        records = [r for r in records if r.get("quick")]
    if not records:
        print("kernel_report: no report_configs() records found in kernels/", file=sys.stderr)
        return 2
    results = compile_all(records, archs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_report.json").write_text(json.dumps(results, indent=1))
    print_report(results)
    roof = print_roofline()
    (out / "roofline_h200.json").write_text(json.dumps(roof, indent=1))
    (out / "shrink_split_h200.json").write_text(json.dumps(print_shrink_split(), indent=1))
    reports = [results]
    if args.also_with:
        sub_argv = ["--arch", args.arch] + (["--quick"] if args.quick else [])
        try:
            reports.append(run_also_with(args.also_with, out, sub_argv))
        except (OSError, RuntimeError) as exc:
            print(f"kernel_report: --also-with failed: {exc}", file=sys.stderr)
            return 2
        print()
        print(f"Report under {args.also_with}:")
        print_report(reports[1])
        print()
        cols = print_comparison(reports)
        (out / "comparison.json").write_text(json.dumps(cols, indent=1))
    print()
    for rs, path in zip(reports, [out, out / "also-with"]):
        t = totals(rs)
        print(f"Triton {t['triton']}: {len(rs)} compiles, {t['failed to compile']} failed, "
              f"{t['missing a target']} missing a target; report: {path / 'kernel_report.json'}")  # fmt: skip
    return 1 if any(problems(r) for rs in reports for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
