"""ci/kernel_report.py --quick: ahead-of-time compiles for sm_80 and sm_90a, checked.

Runs on a CPU-only machine (Triton's compiler and ptxas need no GPU). The full report
(`python ci/kernel_report.py --out DIR`) covers every configuration; this runs the
quick subset, which includes a decode and both prefill tiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))
import kernel_report  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel_report")
    # Run as the README's test command does: with TRITON_INTERPRET=1 in the environment
    # (the script compiles anyway).
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ci" / "kernel_report.py"), "--out", str(out), "--quick"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    path = out / "kernel_report.json"
    assert path.exists(), f"no report written:\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(path.read_text())


def test_quick_report_meets_the_targets(report):
    proc, records = report
    assert proc.returncode == 0, f"targets missed:\n{proc.stdout}\n{proc.stderr}"
    keys = {"kernel", "arch", "config", "registers", "spill_bytes", "shared_bytes", "mma"}
    assert records and all(keys <= set(r) for r in records)
    assert {r["arch"] for r in records} == {"sm_80", "sm_90a"}
    for r in records:
        assert r["spill_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r
        assert 0 < r["shared_bytes"] <= kernel_report.SHARED_LIMIT[80 if r["arch"] == "sm_80" else 90], r
        assert set(r["config"]) >= {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}
        if r["arch"] == "sm_80":
            assert r["mma"] in ("mma.sync", "none"), r  # no wgmma before Hopper
    gemm90 = [r for r in records if r["arch"] == "sm_90a" and r["kernel"].startswith("lora_linear_fwd")]
    prefill = [r for r in gemm90 if r["case"].startswith("prefill")]
    assert prefill and all(r["mma"] == "wgmma" for r in prefill), prefill
    assert any(r["case"].startswith("decode") for r in gemm90)
    # The table and the roofline prediction are printed.
    assert "H200 roofline PREDICTION" in proc.stdout
    assert "4096->14336" in proc.stdout


def test_problems_flags_misses():
    ok = {"spill_bytes": 0, "shared_bytes": 1000, "shared_limit": 2000, "registers": 128,
          "config": {"num_warps": 4}, "variant": "bf16", "arch": "sm_90a", "case": "prefill", "mma": "wgmma"}  # fmt: skip
    assert kernel_report.problems(ok) == []
    assert kernel_report.problems(dict(ok, spill_bytes=8))
    assert kernel_report.problems(dict(ok, shared_bytes=4000))
    assert kernel_report.problems(dict(ok, mma="mma.sync"))
    assert kernel_report.problems(dict(ok, mma="mma.sync", variant="fp32")) == []


def test_roofline_model():
    # Decode on 4096x4096 bf16: W (32 MiB) at 4.8 TB/s is ~7 us; a rank-16 LoRA adds <1%.
    p = kernel_report.roofline(1, 4096, 4096, 16)
    assert 6.5e-6 < p["merged"] < 7.5e-6
    assert 1.0 < p["fused"] / p["merged"] < 1.01
    # Prefill is compute-bound: 2*M*N*K / 989 TFLOP/s.
    p = kernel_report.roofline(8192, 4096, 4096, 16)
    assert abs(p["merged"] - 2 * 8192 * 4096 * 4096 / 989e12) < 1e-9
    # The shrink pass reads x once more: (2*M*K / BW) / (2*M*N*K / peak) = peak / (BW * N),
    # 206 / 4096 = 5% at N = 4096 (1.4% at N = 14336); the epilogue's h Bᵀ adds ~0.4%.
    assert 1.04 < p["fused"] / p["merged"] < 1.06
    p = kernel_report.roofline(8192, 4096, 14336, 16)
    assert 1.01 < p["fused"] / p["merged"] < 1.025


def _fake_ok(rec, arch):
    """A compiled record without compiling (the measurements of a met target)."""
    return {"kernel": rec["kernel"], "module": "", "case": rec["case"], "variant": rec["variant"],
            "arch": "sm_90a" if arch == 90 else f"sm_{arch}", "config": dict(rec["config"]),
            "registers": 100, "spill_bytes": 0, "shared_bytes": 4096, "shared_limit": 232448,
            "mma": "wgmma", "compile_s": 0.0}  # fmt: skip


def test_a_failing_compile_is_recorded_and_the_run_goes_on(capsys):
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    # A real kernel (the registry itself is empty under the interpreter, whose kernels
    # cannot be compiled for a GPU) with a signature that lacks its arguments:
    # compile_record raises before compiling.
    from tinytune.kernels import lora_linear

    fn = next(iter(lora_linear.triton_kernels().values()))
    bad = {"kernel": "broken", "fn": fn, "case": "prefill", "variant": "bf16", "config": cfg,
           "signature": {}, "constexprs": {}, "divisible_by_16": [], "archs": [90]}
    good = {"kernel": "good", "case": "prefill", "variant": "bf16", "config": cfg}

    def compile_fn(rec, arch):
        return _fake_ok(rec, arch) if rec["kernel"] == "good" else kernel_report.compile_record(rec, arch)

    results = kernel_report.compile_all([bad, good], [80, 90], compile_fn)
    # bad compiles only for its archs (90); good for both; good comes after the failure.
    assert [(r["kernel"], r["arch"]) for r in results] == [("broken", "sm_90a"), ("good", "sm_80"), ("good", "sm_90a")]
    err = results[0]
    assert err["error"].startswith("ValueError: broken: signature lacks") and "registers" not in err
    assert err["config"] == cfg and err["triton"] and all(r["triton"] == err["triton"] for r in results)
    assert kernel_report.problems(err) == [f"compile failed: {err['error']}"]
    assert all(kernel_report.problems(r) == [] for r in results[1:])
    t = kernel_report.totals(results)
    assert (t["compiled"], t["failed to compile"], t["missing a target"], t["mma wgmma"]) == (2, 1, 1, 2)
    capsys.readouterr()
    kernel_report.print_report(results)
    out = capsys.readouterr().out
    assert "compile failed: ValueError: broken" in out
    assert "| sm_90a | broken | prefill | bf16 | 64x64x64 w4 s3 | 1 | - | - | - | - | 1 FAILED to compile |" in out


def test_summarize_two_reports_side_by_side(tmp_path, capsys):
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    rec = {"kernel": "k", "case": "prefill", "variant": "bf16", "config": cfg}
    new = [dict(_fake_ok(rec, 90), triton="9.9.0")]
    old = [dict(kernel_report.error_record(rec, 90, RuntimeError("PassManager::run\nfailed")), triton="3.6.0")]
    paths = []
    for name, rs in (("new", new), ("old", old)):
        paths += ["--summarize", str(tmp_path / f"{name}.json")]
        (tmp_path / f"{name}.json").write_text(json.dumps(rs))
    before = os.environ.get("TRITON_INTERPRET")
    assert kernel_report.main(paths) == 1  # the old report's failure misses a target
    assert os.environ.get("TRITON_INTERPRET") == before  # later tests still interpret
    out = capsys.readouterr().out
    assert "| | Triton 9.9.0 | Triton 3.6.0 |" in out
    assert "| compiled | 1 | 0 |" in out and "| failed to compile | 0 | 1 |" in out
    assert "Triton 3.6.0: k prefill bf16 sm_90a 64x64x64 w4 s3: RuntimeError: PassManager::run failed" in out
