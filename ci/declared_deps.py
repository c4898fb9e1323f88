"""Run Python code in an environment that shows only tinytune's *declared* dependencies.

A brand-new virtual environment holds exactly what ``pyproject.toml`` asks for (and what
those packages ask for in turn). A developer's environment usually holds more, so an
undeclared import (``safetensors`` needing ``numpy`` to save, say) passes every test here
and fails for a new user. This script closes the gap cheaply: it computes the closure of
the declared requirements (with the extras you name) over the installed distributions,
then hides every other installed distribution's top-level modules behind an import hook
(they raise ``ModuleNotFoundError`` as if not installed) and runs the code.

    python ci/declared_deps.py --extras bench -c "import tinytune; ..."
    python ci/declared_deps.py --extras bench -m tinytune.benchmark --quick

Exit status: that of the code run (1 on an exception).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.metadata as md
import importlib.util
import runpy
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def declared_closure(extras: list[str]) -> set[str]:
    """Canonical names of tinytune's declared requirements (with ``extras``), recursively.

    Args:
        extras: Extras of tinytune to include (``"bench"``, ``"test"``).

    Returns:
        Distribution names (canonical), tinytune's own included.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo: list[Requirement] = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        todo += [Requirement(r) for r in project["optional-dependencies"][extra]]
    seen = {canonicalize_name(project["name"])}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue  # not installed: its imports fail anyway
        for spec in requires:
            sub = Requirement(spec)
            envs = [{"extra": ""}] + [{"extra": e} for e in req.extras]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    return seen


def hidden_modules(allowed: set[str]) -> set[str]:
    """Top-level modules that only distributions outside ``allowed`` provide."""
    hidden = set()
    for module, dists in md.packages_distributions().items():
        if not any(canonicalize_name(d) in allowed for d in dists):
            hidden.add(module)
    return hidden


class _Hide(importlib.abc.MetaPathFinder):
    def __init__(self, hidden: set[str]) -> None:
        self.hidden = hidden

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in self.hidden:
            raise ModuleNotFoundError(
                f"No module named {top!r} (installed here, but not a declared dependency "
                "of tinytune: a fresh venv would not have it)", name=top,
            )
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="", help="comma-separated extras of tinytune")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("-c", dest="code")
    group.add_argument("-m", dest="module")
    args, rest = parser.parse_known_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    hidden = hidden_modules(declared_closure(extras))
    # Drop anything already imported from a hidden distribution (site hooks), then hide.
    for name in list(sys.modules):
        if name.partition(".")[0] in hidden:
            del sys.modules[name]
    sys.meta_path.insert(0, _Hide(hidden))
    # Libraries probe optional packages with find_spec(...) is None: answer as a fresh venv.
    real_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        if name.partition(".")[0] in hidden:
            return None
        return real_find_spec(name, package)

    importlib.util.find_spec = find_spec
    if args.code is not None:
        sys.argv = ["-c", *rest]
        exec(compile(args.code, "<declared_deps -c>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = [args.module, *rest]
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
