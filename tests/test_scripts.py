"""Every script under bench/, ci/ and examples/ runs (issue 17, section 4).

The scripts are discovered by globbing those folders, so a new script without a smoke case
here fails ``test_every_script_has_a_smoke_case``. Each case runs the script in a
subprocess from the repository root, as the README shows it, with TRITON_INTERPRET=1 (as
the test command runs), the smallest arguments it has and a timeout; the results go to a
temporary directory, never into the checkout. A script that another test (or another
script's smoke case: ci/gpu_check.sh runs both GPU benchmarks) already runs is listed in
COVERED with that file, which must name it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("bench", "ci", "examples")
PY = sys.executable


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# path -> (argv with {tmp} for the temporary directory, extra environment); the smallest
# arguments each script has, so the whole file stays within about a minute.
SMOKE: dict[str, tuple[list[str], dict[str, str]]] = {
    "bench/bench_compile.py": (
        [PY, "bench/bench_compile.py", "--quick", "--compiled", "unmerged", "--rounds", "1", "--reps", "1",
         "--batch", "1", "--seq", "2", "--out", "{tmp}/compile.json"], {}),
    "bench/bench_compiled_mixed.py": (
        [PY, "bench/bench_compiled_mixed.py", "--quick", "--rounds", "1", "--distinct", "2"], {}),
    "bench/bench_dispatch.py": ([PY, "bench/bench_dispatch.py", "--rounds", "2", "--inner", "2"], {}),
    "bench/bench_merge_memory.py": ([PY, "bench/bench_merge_memory.py", "--layers", "1", "--dim", "64"], {}),
    "bench/bench_mixed.py": ([PY, "bench/bench_mixed.py", "--smoke"], {}),
    "bench/bench_serving.py": ([PY, "bench/bench_serving.py", "--smoke", "--out", "{tmp}/serving.json"], {}),
    "bench/measure_mixed_ulp.py": ([PY, "bench/measure_mixed_ulp.py", "--seeds", "1"], {}),
    "bench/test_bench_layers.py": (
        [PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--benchmark-disable",
         "bench/test_bench_layers.py"], {}),
    "ci/declared_deps.py": ([PY, "ci/declared_deps.py", "-c", "import tinytune; print(tinytune.__version__)"], {}),
    "ci/fresh_venv.sh": (["bash", "ci/fresh_venv.sh", "--help"], {}),  # a real run installs for minutes
    # Its --smoke steps run ci/gpu_bench.py --dry-run --quick and ci/gpu_bench_mixed.py
    # --dry-run --rounds 1 (their smoke arguments), and it fails when either does.
    "ci/gpu_check.sh": (["bash", "ci/gpu_check.sh", "--smoke", "{tmp}/gpu_check"], {"GPU_CHECK_DRY_RUN": "1"}),
    # A one-process FSDP run, started as torchrun would start it.
    "examples/fsdp_finetune.py": (
        [PY, "examples/fsdp_finetune.py", "--steps", "2", "--rows", "2", "--seq", "4", "--save-every", "1",
         "--out", "{tmp}/fsdp"],
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "{port}"}),
    # The examples of docs/examples.md.
    "examples/quickstart.py": ([PY, "examples/quickstart.py", "--steps", "2", "--out", "{tmp}"], {}),
    "examples/peft_adapter_generate.py": ([PY, "examples/peft_adapter_generate.py", "--new-tokens", "2"], {}),
    "examples/mixed_batch_generate.py": (
        [PY, "examples/mixed_batch_generate.py", "--adapters", "2", "--new-tokens", "2"], {}),
    "examples/serving_slots.py": (
        [PY, "examples/serving_slots.py", "--adapters", "5", "--slots", "2", "--requests", "3", "--rows", "3",
         "--no-compile"], {}),
    "examples/custom_adapter_layer.py": ([PY, "examples/custom_adapter_layer.py", "--steps", "2"], {}),
    "examples/trainer_finetune.py": (
        [PY, "examples/trainer_finetune.py", "--steps", "2", "--batch", "2", "--seq", "4", "--out", "{tmp}"], {}),
    "examples/compile_switching.py": ([PY, "examples/compile_switching.py", "--adapters", "2"], {}),
    "examples/bench_your_model.py": (
        [PY, "examples/bench_your_model.py", "--rounds", "1", "--adapters", "4", "--tokens", "1"], {}),
    # One process, started as torchrun would start it.
    "examples/tensor_parallel.py": (
        [PY, "examples/tensor_parallel.py", "--steps", "1", "--rows", "2", "--seq", "4", "--out", "{tmp}/tp"],
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "{port}"}),
}  # fmt: skip

# Scripts that another test file, or a script with a smoke case here, runs (it must name
# the script): running them twice would only double the time.
COVERED = {
    "ci/check_wheel.py": "tests/test_packaging.py",
    "ci/gpu_bench.py": "ci/gpu_check.sh",
    "ci/gpu_bench_mixed.py": "ci/gpu_check.sh",
    "ci/gpu_summary.py": "tests/test_gpu_summary.py",
    "ci/kernel_report.py": "tests/test_kernel_report.py",
    "examples/serving_decode_loop.py": "tests/test_row_adapters.py",
    "examples/qlora_finetune.py": "tests/test_example_qlora.py",
}


def discovered() -> list[str]:
    found = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).iterdir()):
            if path.is_file() and path.suffix in (".py", ".sh"):
                found.append(path.relative_to(ROOT).as_posix())
    return found


def test_every_script_has_a_smoke_case():
    scripts = discovered()
    missing = [s for s in scripts if s not in SMOKE and s not in COVERED]
    assert not missing, f"scripts without a smoke case in tests/test_scripts.py: {missing}"
    stale = [s for s in [*SMOKE, *COVERED] if s not in scripts]
    assert not stale, f"smoke cases for scripts that no longer exist: {stale}"
    assert not set(SMOKE) & set(COVERED)
    for script, test in COVERED.items():
        assert Path(script).name in (ROOT / test).read_text(), f"{test} does not run {script}"
        assert test.startswith("tests/") or test in SMOKE, f"{test} (runs {script}) is not run by the tests"


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_script_runs(script, tmp_path):
    argv, extra = SMOKE[script]
    port = _free_port()
    argv = [a.format(tmp=tmp_path) for a in argv]
    env = dict(os.environ, TRITON_INTERPRET="1", **{k: v.format(port=port) for k, v in extra.items()})
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_bash_scripts_parse():
    for script in discovered():
        if script.endswith(".sh"):
            proc = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
            assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_gpu_check_finds_python3_where_python_is_missing(tmp_path):
    """A machine with python3 only: gpu_check.sh says which interpreter it took, and on a
    CPU machine stops with 'no CUDA device' only after torch was imported."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "tee", "mkdir", "rm", "sed", "grep", "tail", "cat", "git"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "GPU_CHECK_DRY_RUN")}
    env.update(PATH=str(bin_dir), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([str(bin_dir / "bash"), "ci/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    log = proc.stdout + proc.stderr
    assert f"interpreter {bin_dir / 'python3'} (no python on PATH; python3)" in log, log
    assert proc.returncode == 2 and "no CUDA device visible to torch" in log, log
