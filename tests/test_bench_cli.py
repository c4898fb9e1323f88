"""tinytune-bench: argument handling, the timing arithmetic, and one very small run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinytune import TinytuneError
from tinytune.benchmark import BenchmarkError, parse_args, summarize, time_cases

ROOT = Path(__file__).resolve().parents[1]


def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout


def test_defaults_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU defaults")
    s = parse_args([])
    assert (s.device, s.dtype, s.threads, s.compile) == ("cpu", "float32", 1, True)
    assert s.distinct == [1, 4, 16, 64] and s.rows == 64 and s.adapters == 64
    assert s.tokens[0] == 1 and len(s.tokens) >= 3  # decode size up to prefill size
    assert s.out is None


def test_flags_parse(tmp_path):
    s = parse_args([
        "--quick", "--device", "cpu", "--dtype", "bf16", "--rank", "2", "--hidden", "32",
        "--layers", "3", "--adapters", "4", "--tokens", "8,1", "--no-compile", "--threads", "2",
        "--rounds", "3", "--no-peft", "--out", str(tmp_path / "o"),
    ])
    assert (s.device, s.dtype, s.rank, s.hidden, s.layers) == ("cpu", "bfloat16", 2, 32, 3)
    assert s.distinct == [1, 4] and s.rows == 4 and s.tokens == [1, 8]
    assert (s.compile, s.threads, s.rounds, s.peft, s.quick) == (False, 2, 3, False, True)
    assert parse_args(["--quick"]).compile is True
    assert s.out == str(tmp_path / "o")
    assert not (tmp_path / "o").exists()  # parsing writes nothing


@pytest.mark.parametrize("argv, needle", [
    (["--device", "tpu"], "device"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "CUDA"),
    (["--dtype", "int8"], "dtype"),
    (["--rank", "0"], "--rank"),
    (["--hidden", "-4"], "--hidden"),
    (["--layers", "two"], "--layers"),
    (["--adapters", "0"], "--adapters"),
    (["--tokens", "1,0"], "--tokens"),
    (["--threads", "0"], "--threads"),
    (["--adapters", "16", "--rows", "8"], "--rows"),
    (["--bogus"], "unrecognized"),
])
def test_bad_input_is_one_line_and_exit_status_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tinytune-bench: error:"), err
    assert needle in err
    assert "Traceback" not in err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as exc:
        parse_args(["--out", str(tmp_path / "f")])
    assert exc.value.code == 2
    assert "not a directory" in capsys.readouterr().err


def test_benchmark_error_is_a_tinytune_value_error():
    assert issubclass(BenchmarkError, TinytuneError) and issubclass(BenchmarkError, ValueError)


def test_ratios_are_medians_of_per_round_ratios():
    times = {"a": [1.0, 4.0, 3.0], "ref": [1.0, 2.0, 6.0]}
    out = summarize(times, {"ref": "ref"})
    # per-round ratios 1, 2, 0.5: median 1 (the ratio of the medians would be 3/2)
    assert out["a"]["ratio"]["ref"]["median"] == 1.0
    assert out["a"]["ratio"]["ref"]["samples"] == [1.0, 2.0, 0.5]
    assert out["a"]["median_ms"] == 3000.0
    assert out["ref"]["ratio"]["ref"]["median"] == 1.0


def test_time_cases_interleaves_and_returns_one_sample_per_round():
    calls = []
    cases = {"x": lambda: calls.append("x"), "y": lambda: calls.append("y")}
    labels = []
    times = time_cases(cases, rounds=4, warmup=1, min_time=0.0, progress=lambda *a: labels.append(a[0]))
    assert labels[-1] == "round 4/4"
    assert {k: len(v) for k, v in times.items()} == {"x": 4, "y": 4}
    assert all(t > 0 for v in times.values() for t in v)
    assert calls.count("x") >= 4 + 1 and calls.count("y") >= 4 + 1


def test_command_line_error_from_the_module_is_one_line():
    result = subprocess.run([sys.executable, "-m", "tinytune.benchmark", "--rank", "0"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--rank" in result.stderr
    assert result.stdout == ""


def test_tiny_run_writes_results_and_plots_and_nothing_in_the_repo(tmp_path):
    before = _git_status()
    out = tmp_path / "bench-out"
    # Through ci/declared_deps.py: the run sees only what pyproject.toml declares for
    # `pip install tinytune[bench]`, as in a fresh venv.
    argv = [sys.executable, str(ROOT / "ci" / "declared_deps.py"), "--extras", "bench",
            "-m", "tinytune.benchmark", "--device", "cpu", "--hidden", "32", "--layers", "1",
            "--rank", "2", "--adapters", "4", "--tokens", "1,2", "--rounds", "1", "--no-compile",
            "--out", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _git_status() == before  # wrote nothing inside the repository
    res = json.loads((out / "results.json").read_text())
    assert sorted(p.name for p in out.glob("*.png")) == ["latency_vs_adapters.png", "latency_vs_tokens.png"]
    assert res["environment"]["versions"]["torch"] == torch.__version__
    assert "git_sha" in res["environment"] and res["environment"]["device"] == "cpu"
    assert [sh["tokens_per_row"] for sh in res["shapes"]] == [1, 2]
    blocks = result.stdout.split(" token(s) = ")[1:]  # the table's block of each token count
    assert len(blocks) == len(res["shapes"])
    for shape, block in zip(res["shapes"], blocks):
        names = set(shape["variants"])
        assert {"bare", "merged", "unmerged torch", "mixed 1", "mixed 4"} <= names
        if res["settings"]["peft"]:
            assert {"PEFT unmerged", "PEFT mixed 1", "PEFT mixed 4"} <= names
            assert "PEFT mixed 4 == mixed 4" in shape["checks_max_abs_diff"]
        for name, v in shape["variants"].items():
            assert len(v["samples_ms"]) == 1 and v["median_ms"] > 0
            assert set(v["ratio"]) == {"bare", "merged"}
            # the printed table shows the same medians and ratios as the file
            line = next(ln for ln in block.splitlines() if ln.startswith(name + "  "))
            assert f"{v['median_ms']:.3f}" in line and f"{v['ratio']['bare']['median']:.3f}" in line
    assert "unmerged fused" in res["skipped"]  # CPU: said, not silently dropped
    assert "tinytune-bench" in result.stdout and "torch threads: 1" in result.stdout


def test_tiny_compiled_run_checks_compiled_against_eager(tmp_path):
    # Two token counts: the second recompiles with dynamic shapes, where a graph break
    # inside the model once let the compiled wrapper run the bare model's graph.
    argv = [sys.executable, "-m", "tinytune.benchmark", "--device", "cpu", "--hidden", "16", "--layers", "1",
            "--rank", "2", "--adapters", "4", "--tokens", "1,2", "--rounds", "1", "--compile", "--no-peft",
            "--out", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    for shape in res["shapes"]:
        checks = shape["checks_max_abs_diff"]
        for name in ("bare", "merged", "unmerged torch", "mixed 1", "mixed 4"):
            assert f"{name} compiled == {name}" in checks
            assert shape["variants"][f"{name} compiled"]["compiled"] is True
        assert shape["compiled_bare_over_eager_bare"]["median"] > 0


def test_variants_that_must_agree_are_checked_before_timing():
    from tinytune.benchmark import OutputMismatchError, Variant, check_outputs

    s = parse_args(["--device", "cpu", "--no-peft", "--adapters", "4"])
    x = torch.zeros(2, 1, 3)

    def variant(name, value):
        return Variant(name, name, False, None, "-", lambda ids, v=value: x + v)

    ok = [variant("bare", 0.0), variant("merged", 1.0), variant("unmerged torch", 1.0)]
    assert check_outputs(ok, s, x)["merged == unmerged torch"] == 0.0
    with pytest.raises(OutputMismatchError, match="merged and unmerged torch"):
        check_outputs([variant("bare", 0.0), variant("merged", 1.0), variant("unmerged torch", 1.5)], s, x)
    with pytest.raises(OutputMismatchError, match="do not change the logits"):
        check_outputs([variant("bare", 1.0), variant("merged", 1.0), variant("unmerged torch", 1.0)], s, x)


# --------------------------------------------------------------------------- --model

_FACTORY = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 50))

def not_a_model():
    return 5

def no_ids():
    return nn.Linear(4, 4)
'''


def _tiny(*extra: str) -> list[str]:
    return ["--device", "cpu", "--rank", "2", "--adapters", "4", "--tokens", "1,2", "--rounds", "1",
            "--no-compile", *extra]


def test_model_from_a_file_and_function_is_timed_and_checked_against_peft(tmp_path, capsys):
    from tinytune.benchmark import main

    (tmp_path / "mine.py").write_text(_FACTORY)
    assert main(_tiny("--model", f"{tmp_path / 'mine.py'}:build", "--out", str(tmp_path / "out"))) == 0
    printed = capsys.readouterr().out
    assert f"--model {tmp_path / 'mine.py'}:build (vocab 50); LoRA r=2 on all-linear" in printed
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["settings"]["model"] == f"{tmp_path / 'mine.py'}:build" and res["settings"]["vocab"] == 50
    for shape in res["shapes"]:
        checks = shape["checks_max_abs_diff"]
        assert "merged == unmerged torch" in checks
        if res["settings"]["peft"]:  # PEFT got the same modules and weights
            assert "PEFT mixed 4 == mixed 4" in checks


def test_model_from_a_module_on_the_current_directory_and_explicit_targets(tmp_path, monkeypatch, capsys):
    from tinytune.benchmark import main

    (tmp_path / "mine.py").write_text(_FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mine", raising=False)
    assert main(_tiny("--model", "mine:build", "--targets", "1", "--no-peft")) == 0
    assert "--model mine:build (vocab 50); LoRA r=2 on 1;" in capsys.readouterr().out


def test_model_from_a_transformers_config_directory(tmp_path, capsys):
    from conftest import tiny_llama

    from tinytune.benchmark import main

    tiny_llama(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=2).config.save_pretrained(tmp_path / "cfg")
    assert main(_tiny("--model", str(tmp_path / "cfg"), "--no-peft")) == 0
    assert "(vocab 64); LoRA r=2 on all-linear" in capsys.readouterr().out


@pytest.mark.parametrize("spec, needle", [
    ("{tmp}/mine.py:missing", "has no function 'missing'"),
    ("{tmp}/absent.py:build", "cannot import"),
    ("no_such_module_here:build", "cannot import no_such_module_here"),
    ("{tmp}/mine.py:not_a_model", "returned int, not an nn.Module"),
    ("{tmp}/mine.py:no_ids", "neither config.vocab_size nor an nn.Embedding"),
    ("{tmp}/not-a-config-dir", "neither module:function nor a transformers config"),
])  # fmt: skip
def test_a_model_that_cannot_be_loaded_is_one_line_and_exit_status_2(spec, needle, tmp_path, capsys):
    from tinytune.benchmark import main

    (tmp_path / "mine.py").write_text(_FACTORY)
    (tmp_path / "not-a-config-dir").mkdir()
    assert main(_tiny("--model", spec.format(tmp=tmp_path))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("tinytune-bench: error: --model") and needle in err, err


def test_model_with_built_in_model_flags_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--model", "x:build", "--hidden", "32"])
    assert exc.value.code == 2 and "leave them out with --model" in capsys.readouterr().err
