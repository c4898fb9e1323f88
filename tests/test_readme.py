"""The README's promises: its code blocks run as written, its test command is CI's."""

from __future__ import annotations

import pathlib
import re

from doc_blocks import python_blocks, run_blocks

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_has_code_to_run():
    # The quick start; the guides' blocks run in tests/test_docs.py.
    assert [b for b in python_blocks(README) if b.not_run is None]


def test_readme_code_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    run_blocks(python_blocks(README), "README.md")


def test_ci_runs_exactly_the_readme_test_command():
    bash = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    test_cmds = [b.strip() for b in bash if "pytest" in b]
    assert len(test_cmds) == 1
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == test_cmds[0]
