"""The installed distribution: kernels ship inside tinytune, never as top-level `kernels`."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_installs_in_a_fresh_venv_with_kernels_inside_tinytune():
    result = subprocess.run(
        [sys.executable, str(ROOT / "ci" / "check_wheel.py")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok:")


def test_pyproject_pins_a_torch_range_the_cpu_wheel_and_the_gpu_box_satisfy():
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_req,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert str(torch_req.specifier), "torch must be pinned to a range"
    for version in ("2.13.0", "2.11.0"):
        assert torch_req.specifier.contains(version), version
    assert not torch_req.specifier.contains("2.15.0")
