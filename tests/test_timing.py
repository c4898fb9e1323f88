"""tinytune.timing, the one timing harness: interleaving, the statistics, and that the
scripts under bench/, ci/ and examples/ use public names only and nothing from tests/.

Fake timers only: nothing here asserts a real time.
"""

from __future__ import annotations

import ast
import itertools
import math
from pathlib import Path

import pytest

import tinytune.benchmark as benchmark
from tinytune import timing

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# interleaved rounds
# ----------------------------------------------------------------------------------------
def test_interleave_measures_every_case_once_per_round_in_shuffled_orders():
    calls = []
    counter = itertools.count()

    def measure(name):
        calls.append(name)
        return next(counter)

    names = ["a", "b", "c", "d", "e"]
    times = timing.interleave(names, 6, measure, seed=1)
    rounds = [calls[i : i + 5] for i in range(0, 30, 5)]
    assert all(sorted(r) == names for r in rounds)  # each case once per round
    assert len({tuple(r) for r in rounds}) > 1  # the order changes between rounds
    # round i's measurement of a case sits at index i, whatever its place in the round
    for i, r in enumerate(rounds):
        for place, name in enumerate(r):
            assert times[name][i] == 5 * i + place
    # the same seed gives the same orders
    again = []
    timing.interleave(names, 6, lambda n: again.append(n) or 0.0, seed=1)
    assert again == calls


def test_time_cases_warms_up_calibrates_and_keeps_the_fastest_repeat():
    seen = []
    per_call = {"fast": 0.001, "slow": 0.004}
    noise = itertools.cycle([3.0, 1.0, 2.0])  # the second of three repeats is the fastest

    def fake_measure(fn, n):
        name = fn()
        seen.append((name, n))
        return per_call[name] * (1.0 if len(seen) <= 2 else next(noise))

    warm = {"fast": 0, "slow": 0}

    def case(name):
        def fn():
            warm[name] += 1
            return name
        return fn

    cases = {"fast": case("fast"), "slow": case("slow")}
    times = timing.time_cases(cases, 4, warmup=3, min_time=0.01, repeats=3, measure=fake_measure)
    # calibration: one call each, then ceil(min_time / t) calls per measurement
    assert seen[:2] == [("fast", 1), ("slow", 1)]
    calls = {name: n for name, n in seen[2:]}
    assert calls == {"fast": math.ceil(0.01 / 0.001), "slow": math.ceil(0.01 / 0.004)}
    assert len(seen) == 2 + 2 * 4 * 3
    assert warm == {"fast": 3 + 1 + 4 * 3, "slow": 3 + 1 + 4 * 3}
    assert times == {"fast": [0.001] * 4, "slow": [0.004] * 4}


def test_benchmark_keeps_the_names_it_exported():
    assert benchmark.time_cases is timing.time_cases
    assert benchmark.summarize is timing.summarize
    assert benchmark.environment is timing.environment


# ----------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------
def test_ratios_are_medians_of_per_round_ratios_not_ratios_of_medians():
    # Round 2 is slow for both cases: the per-round ratios stay near 2, the ratio of the
    # medians would not.
    times = {"ref": [1.0, 10.0, 1.0, 2.0, 3.0], "x": [2.0, 20.0, 2.2, 3.6, 6.0]}
    out = timing.summarize(times, {"x ref": "ref"})
    r = out["x"]["ratio"]["x ref"]
    assert r["samples"] == pytest.approx([2.0, 2.0, 2.2, 1.8, 2.0])
    assert r["median"] == pytest.approx(2.0)
    assert (r["p25"], r["p75"]) == pytest.approx((2.0, 2.0))
    assert out["x"]["median_ms"] == pytest.approx(3600.0)  # 3.6 s: the ratio of medians is 1.8
    assert (out["x"]["p25_ms"], out["x"]["p75_ms"]) == pytest.approx((2200.0, 6000.0))
    assert out["ref"]["ratio"]["x ref"]["median"] == 1.0
    assert timing.summarize(times, {"gone": "absent"})["x"]["ratio"] == {}


def test_quantiles():
    assert timing.quantiles([5.0]) == (5.0, 5.0, 5.0)
    assert timing.quantiles([4.0, 1.0, 3.0, 2.0, 5.0]) == (2.0, 3.0, 4.0)


def test_ratio_quantiles_refuses_rounds_that_do_not_pair():
    with pytest.raises(ValueError, match="same rounds"):
        timing.ratio_quantiles([1.0, 2.0], [1.0])


def test_environment_records_versions_and_machine():
    env = timing.environment("cpu")
    assert env["device"] == "cpu" and env["device_name"] == timing.cpu_name()
    import tinytune
    import torch

    assert env["versions"]["tinytune"] == tinytune.__version__
    assert env["versions"]["torch"] == torch.__version__
    versions = timing.environment("cpu", packages=("surely_not_a_package",))["versions"]
    assert versions["surely_not_a_package"] is None


# ----------------------------------------------------------------------------------------
# imports: timing is floor 0; scripts use public names and nothing from tests/
# ----------------------------------------------------------------------------------------
def _imports(tree: ast.AST):
    """(module, imported names) for every import statement."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, [alias.name for alias in node.names]


def test_timing_imports_no_other_tinytune_module():
    tree = ast.parse((ROOT / "tinytune" / "timing.py").read_text())
    modules = {m for m, _ in _imports(tree)}
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative and not {m for m in modules if m.split(".")[0] == "tinytune"}
    assert {m.split(".")[0] for m in modules} <= {"__future__", "torch", "math", "os", "platform", "random",
                                                  "statistics", "subprocess", "sys", "time", "pathlib",
                                                  "typing"}  # fmt: skip


TEST_MODULES = {"tests", *(p.stem for p in (ROOT / "tests").glob("*.py"))}

def forbidden_imports(source: str, path: str = "<source>") -> list[str]:
    """Imports from tests/ and private tinytune names in ``source``, as messages."""
    found = []
    for module, names in _imports(ast.parse(source)):
        parts = module.split(".")
        if parts[0] in TEST_MODULES:
            found.append(f"{path}: imports {module} from tests/")
        if parts[0] == "tinytune":
            private = {p for p in parts if p.startswith("_")} | {n for n in names if n.startswith("_")}
            if private:
                found.append(f"{path}: imports private {sorted(private)} from {module}")
    return found


def test_the_scan_finds_what_it_looks_for():
    assert forbidden_imports("from test_mixed_batch import NAMES")
    assert forbidden_imports("import conftest")
    assert forbidden_imports("from tinytune.benchmark import _cpu_name as cpu_name")
    assert forbidden_imports("import tinytune._private")
    assert not forbidden_imports("from tinytune.timing import time_cases\nimport tinytune.dispatch as d")


def test_scripts_import_no_private_names_and_nothing_from_tests():
    found = []
    for folder in ("bench", "ci", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += forbidden_imports(path.read_text(), path.relative_to(ROOT).as_posix())
    assert found == []
