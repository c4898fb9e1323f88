"""ci/gpu_summary.py: the table that ci/gpu_check.sh prints last, from the files it leaves.

No GPU involved: the inputs are written here in the formats of pytest's JUnit XML,
ci/gpu_bench.py and ci/gpu_bench_mixed.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "ci" / "gpu_summary.py")
gpu_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_summary)

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="5">
<testcase classname="tests.test_kernel_lora_linear" name="test_a[x-1]" time="0.1" />
<testcase classname="tests.test_kernel_lora_linear" name="test_b" time="0.1"><failure message="m">E</failure></testcase>
<testcase classname="tests.test_dispatch" name="test_c" time="0.1"><skipped message="s">s</skipped></testcase>
<testcase classname="tests.test_dispatch" name="test_d" time="0.1"><error message="e">e</error></testcase>
<testcase time="0.000" />
</testsuite></testsuites>"""


def _bench_row(m, fm, uf, targets, rel_err=1e-3):
    return dict(k=4096, n=4096, r=16, m=m, merged_us=10.0, unmerged_us=10.0 * uf * fm, fused_us=10.0 * fm,
                fused_over_merged=fm, unmerged_over_fused=uf, predicted_fused_over_merged=1.01,
                rel_err=rel_err, targets=targets)  # fmt: skip


def _write_run(out: Path, root: str, mixed: bool = True, cut: bool = False) -> None:
    """A finished run's files (the shards' JUnit files merged into tests.xml, the ids in
    test_ids.txt), or with ``cut`` those of a run cut short during the tests (shards/)."""
    (out / "env.json").write_text(json.dumps(
        {"device": "NVIDIA H200, sm_90", "torch": "2.11.0", "triton": "3.6.0", "python": "3.12",
         "git": "0123456789abcdef", "root": root, "dry_run": False, "date": "2026-12-01 10:00 UTC"}))  # fmt: skip
    (out / "steps.json").write_text(json.dumps(
        {"tests": 1, "gpu_bench": 1, "gpu_bench_mixed": 0 if mixed else "absent", "status": 1, "seconds": 250}))  # fmt: skip
    ids = ["tests/test_kernel_lora_linear.py::test_a[x-1]", "tests/test_kernel_lora_linear.py::test_b",
           "tests/test_dispatch.py::test_c", "tests/test_dispatch.py::test_d",
           "tests/test_dispatch.py::test_e[cpu-CPU tensor]"]  # fmt: skip
    # test_f: its shard timed out before writing its JUnit file.
    timed_out = f"{root}/tests/test_kernel_lora_mixed.py::test_f\n"
    if cut:
        (out / "shards").mkdir()
        (out / "shards" / "tests_0.xml").write_text(JUNIT)
        (out / "shards" / "shard_0.txt").write_text("".join(f"{root}/{i}\n" for i in ids))
        (out / "shards" / "shard_1.txt").write_text(timed_out)
    else:
        (out / "tests.xml").write_text(JUNIT)
        (out / "test_ids.txt").write_text("".join(f"{root}/{i}\n" for i in ids) + timed_out)
    rows = [
        _bench_row(1, 1.03, 1.5, ["ok fused/merged<=1.05", "ok unmerged/fused>=1.3"]),
        _bench_row(16, 1.07, 1.2, ["MISS fused/merged<=1.05", "MISS unmerged/fused>=1.3"]),
        _bench_row(256, 1.20, 1.1, []),
        _bench_row(4096, 1.08, 1.0, ["ok fused/merged<=1.1"], rel_err=5e-3),
    ]
    (out / "gpu_bench.json").write_text(json.dumps(
        {"meta": {"dry_run": False}, "rows": rows, "errors": [], "skipped": ["4096->14336 r=64 M=8192"]}))  # fmt: skip
    if mixed:
        res = [dict(rows=64, tokens=1, distinct=d, d=4096, r=16, merged_us=10.0, pytorch_us=30.0, fused_us=11.0,
                    fused_over_merged=1.1, pytorch_over_fused=p, predicted_fused_over_merged=1.05,
                    predicted_pytorch_over_fused=3.0, rel_err=2e-3,
                    targets=(["ok fused/merged<=1.25"] if d == 16 else [])
                    + [("ok" if p >= 2 else "MISS") + " pytorch/fused>=2.0"])
               for d, p in ((1, 2.5), (16, 2.2), (64, 1.9))]  # fmt: skip
        (out / "gpu_bench_mixed.json").write_text(json.dumps({"meta": {"dry_run": False}, "results": res}))


def _rows(text: str, first_cell: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| " + first_cell)
    ]


@pytest.mark.parametrize("cut", [False, True], ids=["finished", "cut during the tests"])
def test_summary_tables(tmp_path, capsys, cut):
    root = "/src/tinytune"
    _write_run(tmp_path, root, cut=cut)
    assert gpu_summary.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "summary.md").read_text() == text
    assert text.startswith("### GPU check: NVIDIA H200, sm_90; torch 2.11.0, triton 3.6.0")
    assert "DRY RUN" not in text
    # Tests per file: passed, failed, errors, skipped, no result (the interrupted
    # testcase without a name counts as no result, like the timed-out shard's test).
    assert _rows(text, "tests/") == [
        ["tests/test_dispatch.py", "0", "0", "1", "1", "1"],
        ["tests/test_kernel_lora_linear.py", "1", "1", "0", "0", "0"],
        ["tests/test_kernel_lora_mixed.py", "0", "0", "0", "0", "1"],
    ]
    assert _rows(text, "**all**") == [["**all**", "1", "1", "1", "1", "2"]]
    assert "2 tests have no result" in text
    # Targets: the worst ratio (max for <=, min for >=), where, and whether met.
    assert _rows(text, "fused/merged<=1.05") == [["fused/merged<=1.05", "M 1-16", "2", "1.070x", "4096->4096 r=16 M=16", "NO (1 missed)"]]
    assert _rows(text, "unmerged/fused>=1.3") == [["unmerged/fused>=1.3", "M 1-16", "2", "1.200x", "4096->4096 r=16 M=16", "NO (1 missed)"]]
    assert _rows(text, "fused/merged<=1.1 ") == [["fused/merged<=1.1", "M 4096", "1", "1.080x", "4096->4096 r=16 M=4096", "yes"]]
    assert _rows(text, "fused/merged<=1.25") == [["fused/merged<=1.25", "64x1 tok, 16 adapters", "1", "1.100x", "64x1 tok, 16 adapters", "yes"]]
    assert _rows(text, "pytorch/fused>=2.0") == [["pytorch/fused>=2.0", "64x1 tok, 1-64 adapters", "3", "1.900x", "64x1 tok, 64 adapters", "NO (1 missed)"]]  # fmt: skip
    acc = _rows(text, "accuracy")
    assert [r[3] for r in acc] == ["0.005", "0.002"] and all(r[-1] == "yes" for r in acc)
    assert "skipped at the deadline: 1 points (4096->14336 r=64 M=8192)" in text
    assert "gpu_check exit status: 1 (something failed or missed); 250 s" in text


def test_summary_reports_missing_results(tmp_path, capsys):
    _write_run(tmp_path, "/src/tinytune", mixed=False)
    (tmp_path / "gpu_bench.json").unlink()
    (tmp_path / "tests.xml").write_text("<testsuites><testsuite")  # truncated
    assert gpu_summary.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "unreadable JUnit file tests.xml" in text
    assert _rows(text, "**all**") == [["**all**", "0", "0", "0", "0", "6"]]
    assert "no results file: the step did not run or did not finish" in text
    assert "Per-row adapters" not in text  # gpu_bench_mixed.py absent from the checkout
