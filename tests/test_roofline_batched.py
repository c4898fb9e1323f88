"""The roofline model's batched-decode rows and CTA counting (issue 20, targets 4 and 5).

``ci/kernel_report.py`` predicts each fused path on an H200 with the tiles
``pick_config`` chooses; these tests hold the chosen path to the target and check that
a grid with fewer CTAs than SMs is predicted slower. No kernel runs here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))
import kernel_report  # noqa: E402


@pytest.mark.parametrize("k,n", kernel_report.BENCH_SHAPES)
@pytest.mark.parametrize("r", kernel_report.BENCH_RANKS)
@pytest.mark.parametrize("m", [64, 128])
def test_batched_decode_within_target_and_the_cheaper_path(k, n, r, m):
    p = kernel_report.roofline(m, k, n, r)
    assert p["path"] == "one"  # the shrink fused in the K-loop: a single launch
    assert p["fused_l"] / p["merged_l"] <= 1.10
    assert p["one_l"] <= p["two_l"]


def test_batched_rows_are_printed(capsys):
    rows = kernel_report.print_roofline()
    assert {32, 64, 128, 256} <= {row["m"] for row in rows}
    assert "path" in capsys.readouterr().out


def test_ctas_per_sm_count():
    # A kernel on one CTA streams at 2/132 of HBM; on 66 or more CTAs, at all of it.
    one_cta = kernel_report._tk(1e6, 0, 1)
    assert one_cta == pytest.approx(1e6 / (kernel_report.H200_BW * 2 / 132))
    assert kernel_report._tk(1e6, 0, 66) == pytest.approx(1e6 / kernel_report.H200_BW)
    # FLOPs: a CTA has one SM's tensor cores.
    assert kernel_report._tk(0, 1e9, 33) == pytest.approx(4 * 1e9 / kernel_report.H200_FLOPS)
