"""What a brand-new virtual environment would hold is enough to run the README.

``ci/declared_deps.py`` hides every installed distribution that ``pyproject.toml`` does not
ask for (directly or through its requirements), so an undeclared import fails here as it
would for a new user (``safetensors`` imports ``numpy`` only when saving, say). The full
proof (a clean clone, a new venv, the README's commands as written, downloads included)
is ``ci/fresh_venv.sh``, a separate CI step that takes minutes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "ci" / "declared_deps.py"


def run_declared(code: str, cwd: Path, extras: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--extras", extras, "-c", code],
        capture_output=True, text=True, cwd=cwd, timeout=600,
    )


def test_undeclared_distributions_are_hidden(tmp_path):
    # peft is installed here (the test extra) but not a dependency of the base package.
    result = run_declared("import peft", tmp_path)
    assert result.returncode != 0
    assert "not a declared dependency of tinytune" in result.stderr
    assert run_declared("import peft", tmp_path, extras="test").returncode == 0


def test_readme_adapter_files_run_with_only_the_declared_dependencies(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    saving = [b for b in blocks if "save_adapter(" in b]
    assert saving, "the README shows saving an adapter"
    code = "\n".join([blocks[0], saving[0]])
    result = run_declared(code, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out" / "my-lora" / "adapter_model.safetensors").is_file()
