"""The summary of a ``ci/gpu_check.sh`` run, as Markdown tables to paste into the README.

    python ci/gpu_summary.py OUT_DIR        # gpu_check.sh runs it last

Reads what gpu_check.sh left in OUT_DIR (``env.json``, ``steps.json``, the tests' JUnit
file ``tests.xml`` (the shards' merged) and the ids of every test it ran
``test_ids.txt``, ``gpu_bench.json``, ``gpu_bench_mixed.json``; a run cut short during the
tests leaves per-shard ``shards/tests_*.xml`` and ``shards/shard_*.txt`` instead, read as
well), prints the summary and writes it to ``OUT_DIR/summary.md``.
Standard library only; a missing or broken file is reported as such, never skipped
silently. Exit status 0 (the verdict is gpu_check.sh's).
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a truncated file is reported, not fatal
        return {"_error": f"{type(exc).__name__}: {exc}"}


def _file_of(nodeid_or_classname: str) -> str:
    """'tests/test_x.py::t[..]' or JUnit's 'tests.test_x[.Class]' -> 'tests/test_x.py'."""
    if "::" in nodeid_or_classname:
        return nodeid_or_classname.split("::")[0]
    parts = nodeid_or_classname.split(".")
    mods = [p for p in parts if not p[:1].isupper()]  # drop test classes
    return "/".join(mods) + ".py"


def test_table(out: Path, steps: dict, root: str, native: bool) -> list[str]:
    """Per test file: passed / failed / errors / skipped, and tests left without a result."""
    counts: dict[str, dict[str, int]] = {}
    seen: set[tuple[str, str]] = set()

    def bump(f: str, key: str) -> None:
        counts.setdefault(f, dict(passed=0, failed=0, errors=0, skipped=0, no_result=0))[key] += 1

    broken = []
    for xml in [*sorted(out.glob("tests.xml")), *sorted(out.glob("shards/tests_*.xml"))]:
        try:
            tree = ET.parse(xml).getroot()
        except Exception as exc:  # noqa: BLE001
            broken.append(f"{xml.name}: {type(exc).__name__}")
            continue
        for case in tree.iter("testcase"):
            if not case.get("name"):  # the test running when pytest was interrupted
                continue
            f = _file_of(case.get("classname", "?"))
            seen.add((f, case.get("name", "")))
            tags = {child.tag for child in case}
            if "error" in tags:
                bump(f, "errors")
            elif "failure" in tags:
                bump(f, "failed")
            elif "skipped" in tags:
                bump(f, "skipped")
            else:
                bump(f, "passed")
    # Tests of a shard that timed out or crashed have no JUnit record.
    for ids in [*sorted(out.glob("test_ids.txt")), *sorted(out.glob("shards/shard_*.txt"))]:
        for line in ids.read_text().splitlines():
            if "::" not in line:
                continue
            nodeid = line[len(root) + 1 :] if root and line.startswith(root + "/") else line
            f, name = _file_of(nodeid), nodeid.split("::")[-1]
            if (f, name) not in seen:
                seen.add((f, name))  # listed twice when a cut run left both files
                bump(f, "no_result")
    lines = [f"| tests ({'native' if native else 'interpreter'}) | passed | failed | errors | skipped | no result |", "|---|---:|---:|---:|---:|---:|"]
    total = dict(passed=0, failed=0, errors=0, skipped=0, no_result=0)
    for f in sorted(counts):
        c = counts[f]
        for k in total:
            total[k] += c[k]
        lines.append(f"| {f} | {c['passed']} | {c['failed']} | {c['errors']} | {c['skipped']} | {c['no_result']} |")
    lines.append(f"| **all** | {total['passed']} | {total['failed']} | {total['errors']} | {total['skipped']} | {total['no_result']} |")
    if not counts:
        lines.append("| (no test results found) | | | | | |")
    notes = []
    if total["no_result"]:
        notes.append(f"{total['no_result']} tests have no result: their shard timed out or crashed (see gpu_check.log).")
    for b in broken:
        notes.append(f"unreadable JUnit file {b}")
    if "tests" in steps:
        after = steps.get("seconds_after_tests")
        notes.append(f"test step exit status {steps['tests']}" + (f"; tests done {after} s into the script" if after is not None else ""))
    return lines + [""] + [f"- {n}" for n in notes]


_TARGET = re.compile(r"^(ok|MISS) (\S+)(<=|>=)([0-9.]+)$")
_METRIC = {
    "fused/merged": "fused_over_merged",
    "unmerged/fused": "unmerged_over_fused",
    "pytorch/fused": "pytorch_over_fused",
}


def _point(row: dict) -> str:
    if "k" in row:
        return f"{row['k']}->{row['n']} r={row['r']} M={row['m']}"
    return f"{row['rows']}x{row['tokens']} tok, {row['distinct']} adapters"


def _span(values) -> str:
    v = sorted(set(values))
    return str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"


def _applies(rows) -> str:
    """The range of points a target was checked on, e.g. 'M 1-16' or '64x1 tok, 1-64 adapters'."""
    rows = list(rows)
    if "k" in rows[0]:
        return f"M {_span(r['m'] for r in rows)}"
    return (f"{_span(r['rows'] for r in rows)}x{_span(r['tokens'] for r in rows)} tok, "
            f"{_span(r['distinct'] for r in rows)} adapters")  # fmt: skip


def target_table(name: str, data, rows_key: str, exit_status) -> list[str]:
    """One line per target: points subject to it, worst measured ratio, met or not."""
    lines = [f"**{name}** (exit status {exit_status})", ""]
    if data is None:
        return lines + ["- no results file: the step did not run or did not finish", ""]
    if "_error" in data:
        return lines + [f"- results file unreadable: {data['_error']}", ""]
    meta, rows = data.get("meta", {}), data.get(rows_key, [])
    if meta.get("dry_run"):
        lines += ["- DRY RUN on the CPU: the ratios below are not GPU measurements", ""]
    groups: dict[str, list] = {}
    for row in rows:
        for t in row.get("targets", []):
            m = _TARGET.match(t)
            if m:
                groups.setdefault(m.group(2) + m.group(3) + m.group(4), []).append((m.group(1), row))
    lines += ["| target | applies to | points | worst | at | met |", "|---|---|---:|---:|---|---|"]
    for target, hits in groups.items():
        m = _TARGET.match("ok " + target)
        metric, op = _METRIC.get(m.group(2)), m.group(3)
        vals = [(r.get(metric), r) for _, r in hits if r.get(metric) is not None]
        if vals:
            worst_v, worst_r = (max if op == "<=" else min)(vals, key=lambda v: v[0])
            worst = f"{worst_v:.3f}x"
            at = _point(worst_r)
        else:
            worst, at = "?", ""
        misses = sum(1 for ok, _ in hits if ok == "MISS")
        met = "yes" if not misses else f"NO ({misses} missed)"
        lines.append(f"| {target} | {_applies(r for _, r in hits)} | {len(hits)} | {worst} | {at} | {met} |")
    errs = [r.get("rel_err") for r in rows if r.get("rel_err") is not None]
    if errs:
        lines.append(f"| accuracy: rel. error vs torch_<op> <= 0.02 | all points | {len(errs)} | {max(errs):.2g} | | "
                     f"{'yes' if max(errs) <= 2e-2 else 'NO'} |")  # fmt: skip
    if not rows:
        lines.append("| (no points measured) | | 0 | | | NO |")
    lines.append("")
    for e in data.get("errors", []):
        lines.append(f"- error: {e}")
    if data.get("skipped"):
        lines.append(f"- skipped at the deadline: {len(data['skipped'])} points ({', '.join(data['skipped'])})")
    return lines if lines[-1] == "" else lines + [""]


def point_table(data, rows_key: str) -> list[str]:
    """Every measured point: times and ratios (predictions beside)."""
    if not data or "_error" in data or not data.get(rows_key):
        return []
    rows = data[rows_key]
    if "k" in rows[0]:
        lines = ["| K->N | r | M | merged us | unmerged us | fused us | fused/merged (pred) | unmerged/fused |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in rows:
            lines.append(f"| {r['k']}->{r['n']} | {r['r']} | {r['m']} | {r['merged_us']:.2f} | {r['unmerged_us']:.2f} | "
                         f"{r['fused_us']:.2f} | {r['fused_over_merged']:.3f} ({r['predicted_fused_over_merged']:.3f}) | "
                         f"{r['unmerged_over_fused']:.2f} |")  # fmt: skip
    else:
        lines = ["| rows x tokens | adapters | merged us | pytorch us | fused us | fused/merged (pred) | pytorch/fused (pred) |",
                 "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in rows:
            lines.append(f"| {r['rows']} x {r['tokens']} | {r['distinct']} | {r['merged_us']:.2f} | {r['pytorch_us']:.2f} | "
                         f"{r['fused_us']:.2f} | {r['fused_over_merged']:.3f} ({r['predicted_fused_over_merged']:.2f}) | "
                         f"{r['pytorch_over_fused']:.2f} ({r['predicted_pytorch_over_fused']:.2f}) |")  # fmt: skip
    return lines + [""]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python ci/gpu_summary.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    env = _load_json(out / "env.json") or {}
    steps = _load_json(out / "steps.json") or {}
    bench = _load_json(out / "gpu_bench.json")
    mixed = _load_json(out / "gpu_bench_mixed.json")
    head = (f"### GPU check: {env.get('device', '?')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
            f"python {env.get('python', '?')}; git {str(env.get('git', '?'))[:12]}; {env.get('date', '')}")  # fmt: skip
    lines = [head, ""]
    if env.get("dry_run"):
        lines += ["**DRY RUN on the CPU (Triton interpreter, tiny benchmark shapes): nothing here is a GPU measurement.**", ""]
    lines += test_table(out, steps, env.get("root", ""), not env.get("dry_run")) + [""]
    lines += target_table("Fused LoRA linear vs merged / unmerged (ci/gpu_bench.py, bf16, CUDA graphs)",
                          bench, "rows", steps.get("gpu_bench", "?"))  # fmt: skip
    if steps.get("gpu_bench_mixed") != "absent":
        lines += target_table("Per-row adapters (ci/gpu_bench_mixed.py, d=4096, r=16, bf16, CUDA graphs)",
                              mixed, "results", steps.get("gpu_bench_mixed", "?"))  # fmt: skip
    lines += ["<details><summary>all benchmark points</summary>", ""]
    lines += point_table(bench, "rows")
    if steps.get("gpu_bench_mixed") != "absent":
        lines += point_table(mixed, "results")
    lines += ["</details>", ""]
    if "status" in steps:
        if env.get("dry_run"):
            verdict = "dry run: the benchmarks' targets are not enforced"
        else:
            verdict = "all passed, all targets met" if steps["status"] == 0 else "something failed or missed"
        lines.append(f"gpu_check exit status: {steps['status']} ({verdict}); {steps.get('seconds', '?')} s")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    (out / "summary.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
