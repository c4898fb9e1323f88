"""The split-K reductions' memory ordering, checked in the compiled code (issue 20, target 6).

Two kernels reduce split-K partial tiles with a semaphore (CUTLASS's pattern): every
program stores its fp32 partial, a barrier makes all of its threads' stores happen
before one thread's ``acq_rel`` atomic publishes the arrival, and the last program to
arrive (after another barrier) reads the others' partials from L2 (``.cg``):
``lora_mixed``'s decode GEMM (``_mixed_rows_kernel``) and ``lora_linear``'s shrink
(``_lora_shrink_kernel``). Triton's interpreter runs programs one after another, so a
relaxed atomic or a missing barrier cannot fail a test at run time on a CPU; this file
compiles both kernels ahead of time for sm_90a and sm_80 (as ``ci/kernel_report.py``
does, no GPU needed) and reads the ordering from the TTGIR and the PTX. One subprocess
(the test command sets ``TRITON_INTERPRET=1``, under which the kernels cannot be
compiled) builds the four, once per session.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tinytune.kernels import report_configs

def pick(records, kernel, want):
    for rec in records:
        if rec["kernel"] == kernel and want(rec):
            return rec
    raise SystemExit(f"no {kernel} record")

lin = report_configs.lora_linear_configs()
mixed = report_configs.lora_mixed_configs()
out = {}
for arch in (90, 80):
    recs = {
        "lora_linear_shrink": pick(lin, "lora_shrink", lambda r: r["constexprs"]["REDUCE"]
                                   and r["archs"] == [arch] and r["variant"].startswith("bf16")),
        "lora_mixed_rows": pick(mixed, "_mixed_rows_kernel", lambda r: r["constexprs"]["SPLIT_K"] > 1
                                and r["variant"].startswith("bf16")),
    }
    for name, rec in recs.items():
        fn = rec["fn"]
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in rec["divisible_by_16"]}
        c = triton.compile(ASTSource(fn, rec["signature"], rec["constexprs"], attrs),
                           target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": rec["config"]["num_warps"],
                                    "num_stages": rec["config"]["num_stages"]})
        out[f"{name}/sm_{arch}"] = {"ttgir": c.asm["ttgir"], "ptx": c.asm["ptx"]}
json.dump(out, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("split_k") / "asm.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and path.exists(), proc.stderr[-3000:]
    return json.loads(path.read_text())


def _ops(ttgir: str) -> list[str]:
    """The TTGIR lines that matter for the ordering, in program order."""
    keep = ("tt.store", "ttg.barrier", "tt.atomic_rmw", "tt.load")
    return [line.strip() for line in ttgir.splitlines() if any(k in line for k in keep)]


def ordering_problems(ttgir: str, ptx: str) -> list[str]:
    """What is wrong with a split-K semaphore in this compiled kernel (empty: nothing)."""
    ops = _ops(ttgir)
    atomics = [i for i, op in enumerate(ops) if "tt.atomic_rmw" in op]
    if len(atomics) != 1:
        return [f"expected one arrival atomic, found {len(atomics)}"]
    (i,) = atomics
    bad = []
    if not re.search(r"tt\.atomic_rmw add, acq_rel, gpu", ops[i]):
        bad.append(f"arrival atomic is not acq_rel at gpu scope: {ops[i][:120]}")
    if not re.search(r"atom\.global\.gpu\.acq_rel\.add", ptx):
        bad.append("no atom.global.gpu.acq_rel.add in the PTX")
    before = [op for op in ops[:i] if "tt.store" in op or "ttg.barrier" in op]
    if not before or "ttg.barrier" not in before[-1]:
        bad.append("no barrier between the partial tile's store and the arrival atomic")
    if not any("tt.store" in op for op in before):
        bad.append("no partial tile stored before the arrival atomic")
    after = ops[i + 1:]
    cg = [j for j, op in enumerate(after) if "tt.load" in op and "cache_modifier = cg" in op]
    if not cg:
        bad.append("the last program does not read the partials with .cg (L2)")
    elif not any("ttg.barrier" in op for op in after[: cg[0]]):
        bad.append("no barrier between the arrival atomic and the reads of the partials")
    if "ld.global.cg" not in ptx:
        bad.append("no ld.global.cg in the PTX")
    return bad


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("kernel", ["lora_linear_shrink", "lora_mixed_rows"])
def test_split_k_semaphore_is_ordered(compiled, kernel, arch):
    asm = compiled[f"{kernel}/{arch}"]
    assert ordering_problems(asm["ttgir"], asm["ptx"]) == []


def test_the_check_flags_a_relaxed_atomic_and_a_missing_barrier(compiled):
    """The checker itself: the problems it must see, on edited copies of real TTGIR."""
    asm = compiled["lora_mixed_rows/sm_90"]
    ttgir, ptx = asm["ttgir"], asm["ptx"]
    relaxed = ttgir.replace("add, acq_rel, gpu", "add, relaxed, gpu")
    assert any("acq_rel" in p for p in ordering_problems(relaxed, ptx))
    lines = ttgir.splitlines()
    atomic = next(i for i, line in enumerate(lines) if "tt.atomic_rmw" in line)
    before = max(i for i, line in enumerate(lines[:atomic]) if "ttg.barrier" in line)
    no_barrier = "\n".join(lines[:before] + lines[before + 1:])
    assert any("barrier between the partial" in p for p in ordering_problems(no_barrier, ptx))
