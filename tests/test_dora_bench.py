"""``tinytune-bench --dora``: DoRA unmerged and in mixed batches, against PEFT's
unmerged DoRA (checked for equal outputs before anything is timed)."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

from tinytune.benchmark import format_table, parse_args, run  # noqa: E402


def test_dora_variants_are_checked_and_timed_against_peft():
    s = parse_args(["--device", "cpu", "--quick", "--dora", "--adapters", "2", "--tokens", "2",
                    "--rounds", "1", "--no-compile", "--peft"])
    res = run(s, progress=False)
    (shape,) = res["shapes"]
    variants = shape["variants"]
    for name in ("DoRA unmerged", "DoRA mixed 1", "DoRA mixed 2", "PEFT DoRA unmerged"):
        assert variants[name]["median_ms"] > 0, name
    assert variants["DoRA unmerged"]["ratio"]["PEFT DoRA unmerged"]["median"] > 0
    assert "PEFT DoRA unmerged == DoRA unmerged" in shape["checks_max_abs_diff"]
    assert "PEFT DoRA mixed" in res["skipped"] and "adapter_names" in res["skipped"]["PEFT DoRA mixed"]
    assert "DoRA unmerged / PEFT DoRA unmerged:" in format_table(res)


def test_without_dora_no_dora_variants():
    s = parse_args(["--device", "cpu", "--quick", "--adapters", "2", "--tokens", "1", "--rounds", "1",
                    "--no-compile", "--no-peft"])
    assert s.dora is False
    res = run(s, progress=False)
    assert not any("DoRA" in name for name in res["shapes"][0]["variants"])
