"""The installed distribution: kernels ship inside tinytune, never as top-level `kernels`."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

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


def test_top_level_kernels_folder_does_not_hide_hugging_faces_kernels():
    """``python -m pytest`` and ``python -c`` put the repository root first on sys.path;
    transformers imports the PyPI package ``kernels`` and must get that one, not our folder."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    assert not (ROOT / "kernels" / "__init__.py").exists(), "a regular package would shadow"
    code = (
        "import sys, pathlib\n"
        "import transformers, kernels, tinytune.kernels.lora_linear as ours\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "assert pathlib.Path(ours.__file__).resolve().parent == pathlib.Path('kernels').resolve()\n"
        "print(getattr(kernels, '__file__', None))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    found = result.stdout.strip()
    try:
        importlib.metadata.distribution("kernels")  # Hugging Face's, a transformers dependency
    except importlib.metadata.PackageNotFoundError:
        return
    assert found != "None" and not found.startswith(str(ROOT)), found
