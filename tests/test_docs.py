"""The documentation site: every page's code runs, and the site builds with warnings as errors."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from doc_blocks import ROOT, python_blocks, run_blocks

DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


@pytest.mark.parametrize("page", PAGES)
def test_page_code_blocks_run_in_order(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    run_blocks(python_blocks((DOCS / page).read_text()), f"docs/{page}")


def test_illustrations_name_the_test_that_runs_them():
    """A block marked not-run names a test (``tests/<file>.py::<test>``) that exists."""
    named = 0
    for page in PAGES:
        for block in python_blocks((DOCS / page).read_text()):
            if block.not_run is None:
                continue
            found = re.findall(r"(tests/\w+\.py)::(\w+)", block.not_run)
            assert found, f"docs/{page}: the not-run reason {block.not_run!r} names no test"
            for path, test in found:
                assert f"def {test}(" in (ROOT / path).read_text(), f"docs/{page}: {path}::{test} does not exist"
                named += 1
    assert named >= 2  # FSDP2 and tensor parallelism, at least


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p for p in PAGES if f": {p}" not in nav]
    assert not missing, f"pages missing from mkdocs.yml's nav: {missing}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (the test extra)")
def test_site_builds_with_warnings_as_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's banner about MkDocs 2
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()


def test_every_example_takes_help_and_is_on_the_examples_page():
    page = (DOCS / "examples.md").read_text()
    examples = sorted((ROOT / "examples").glob("*.py"))
    assert len(examples) >= 8
    for path in examples:
        assert f"`{path.name}`" in page, f"docs/examples.md does not list examples/{path.name}"
        assert "argparse.ArgumentParser(" in path.read_text(), f"examples/{path.name} has no --help"
