"""A Griffe extension for the API reference: the docstrings' Sphinx habits, in Markdown.

The library's docstrings are Google style, but cross-references use Sphinx roles
(``:meth:`unload```), which Markdown shows literally, and a few examples sit under a
singular ``Example:`` heading, which Griffe reads as an admonition (its ``>>>`` lines then
render as nested quotes). This rewrites both in the loaded docstrings, never in the code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:meth|func|class|attr|mod|data|exc|obj):`~?([^`]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", flags=re.M)


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`name``` as ``name`` in code, and ``Example:`` as ``Examples:``."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:  # Griffe 2
        self._walk(pkg, set())

    def on_package_loaded(self, *, pkg: griffe.Module, **kwargs: Any) -> None:  # Griffe 1
        self._walk(pkg, set())

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            text = _ROLE.sub(r"`\1`", obj.docstring.value)
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", text)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)
