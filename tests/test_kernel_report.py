"""ci/kernel_report.py --quick: ahead-of-time compiles for sm_80 and sm_90a, checked.

Runs on a CPU-only machine (Triton's compiler and ptxas need no GPU). The full report
(`python ci/kernel_report.py --out DIR`) covers every configuration; this runs the
quick subset, which includes a decode and both prefill tiles.
"""

from __future__ import annotations

import json
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
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ci" / "kernel_report.py"), "--out", str(out), "--quick"],
        capture_output=True, text=True, timeout=600,
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
