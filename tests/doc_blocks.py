"""The code blocks of a Markdown page, as tests/test_readme.py and tests/test_docs.py run them.

A ```python block runs unless the line before it is ``<!-- not-run: REASON -->``: an
illustration (a multi-process launch, GPU-only code) whose REASON names the test that runs
it. A line ``--8<-- "PATH"`` inside a block (pymdownx.snippets, which the site uses) stands
for the file at PATH, relative to the repository root.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A block may be indented (inside a folded admonition): its fence's indentation is removed.
_BLOCK = re.compile(r"(?:<!--\s*not-run:\s*(.*?)\s*-->\n)?^( *)```python\n(.*?)^\2```", flags=re.S | re.M)
_SNIPPET = re.compile(r'^--8<-- "(.+)"$', flags=re.M)


@dataclasses.dataclass
class Block:
    code: str
    not_run: str | None  # the reason, for an illustration


def python_blocks(text: str) -> list[Block]:
    """Every ```python block of ``text``, in order, with snippet lines expanded."""
    return [
        Block(_SNIPPET.sub(lambda m: (ROOT / m.group(1)).read_text(), textwrap.dedent(code)), reason or None)
        for reason, _, code in _BLOCK.findall(text)
    ]


def run_blocks(blocks: list[Block], label: str) -> None:
    """Run the runnable blocks in order in one namespace, failing with the block's text.

    Each page runs as a new program would: compiled code that an earlier page left on
    shared functions (the wrapper's ``forward``) is dropped first, so that a page's
    ``error_on_recompile`` sees only its own compilations.
    """
    import torch

    torch._dynamo.reset()
    namespace: dict = {"__name__": label}
    for i, block in enumerate(blocks):
        if block.not_run is not None:
            continue
        try:
            exec(compile(block.code, f"{label} block {i}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"{label} python block {i} failed: {exc!r}\n{block.code}")
