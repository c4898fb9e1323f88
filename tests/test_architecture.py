"""The floors of tinytune/ (issue 18): imports point down, no private name crosses a file.

``lint-imports`` enforces the layers contract in pyproject.toml; the AST checks here
also see what it cannot: imports written inside functions (listed separately), private
names imported or read from another tinytune module, and the wrapper's private state
read from elsewhere.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tinytune"

# Imports inside functions that are allowed: each one gates an optional third-party
# package (importing the module imports it), and each points down.
LAZY_OK = {
    ("tinytune.training", "tinytune.hf_trainer"),  # transformers
}


def _modules() -> dict[str, Path]:
    found = {f"tinytune.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    found["tinytune"] = PACKAGE / "__init__.py"
    for p in (ROOT / "kernels").glob("*.py"):
        found[f"tinytune.kernels.{p.stem}"] = p
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def _imports(module: str) -> list[tuple[str, str, bool, int]]:
    """``(target module, imported name or "", inside a function, line)`` per import."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if module == "tinytune" else module.rsplit(".", 1)[0]
    out: list[tuple[str, str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = package + ("." + base if base else "")
                for alias in child.names:
                    target = _resolve(f"{base}.{alias.name}")
                    if target is not None and target != _resolve(base):
                        out.append((target, "", inner, child.lineno))  # a submodule
                    elif _resolve(base) is not None:
                        out.append((_resolve(base), alias.name, inner, child.lineno))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if _resolve(alias.name) is not None:
                        out.append((_resolve(alias.name), "", inner, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return [entry for entry in out if entry[0] != module]


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _, _ in _imports(m)} for m in MODULES}


def test_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                walk(nxt, path + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [])


def test_no_lazy_imports_of_tinytune_modules():
    lazy = sorted(
        (m, t, line)
        for m in MODULES
        for t, _, inner, line in _imports(m)
        if inner and (m, t) not in LAZY_OK
    )
    assert not lazy, f"imports of tinytune modules inside functions (module, target, line): {lazy}"


def test_kernels_import_no_tinytune_module():
    bad = [
        (m, t)
        for m in MODULES
        if m.startswith("tinytune.kernels.")
        for t, _, _, _ in _imports(m)
        if not t.startswith("tinytune.kernels.")
    ]
    assert not bad


def test_no_private_name_crosses_a_file():
    bad = sorted(
        (m, t, name, line)
        for m in MODULES
        for t, name, _, line in _imports(m)
        if name.startswith("_")
    )
    assert not bad, f"private names imported from another module: {bad}"


def _module_aliases(module: str) -> dict[str, str]:
    """Local names bound to tinytune modules (``from . import io as tio``)."""
    aliases = {}
    tree = ast.parse(MODULES[module].read_text())
    package = module if module == "tinytune" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = package + ("." + base if base else "")
            for alias in node.names:
                target = MODULES.get(f"{base}.{alias.name}") and f"{base}.{alias.name}"
                if target:
                    aliases[alias.asname or alias.name] = target
    return aliases


def test_no_private_attribute_of_another_module_or_the_wrapper():
    bad = []
    for module, path in MODULES.items():
        aliases = _module_aliases(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")):
                continue
            if node.attr.startswith("__") or not isinstance(node.value, ast.Name):
                continue
            owner = node.value.id
            # another module's private name, or the wrapper's private state read outside it
            if owner in aliases or (owner == "wrapper" and module != "tinytune.wrapper"):
                bad.append((module, f"{owner}.{node.attr}", node.lineno))
    assert not bad, f"private attributes read across files: {sorted(bad)}"


def test_every_module_names_its_floor():
    missing = [
        m for m, p in MODULES.items()
        if m.startswith("tinytune.") and not m.startswith("tinytune.kernels.")
        and "Floor" not in (ast.get_docstring(ast.parse(p.read_text())) or "")
    ]
    assert not missing, f"modules whose docstring names no floor: {missing}"


def _lint_imports() -> str:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    return exe


def test_lint_imports_contracts_are_kept():
    result = subprocess.run([_lint_imports()], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


# kernels/ is a namespace folder (no __init__.py); import-linter analyses it as a root
# package under a name of its own, since ``kernels`` itself is Hugging Face's package.
KERNELS_CONTRACT = """
[importlinter]
root_packages =
    tinytune
    {name}
include_external_packages = False

[importlinter:contract:kernels]
name = kernels/ never imports tinytune
type = forbidden
source_modules = {name}
forbidden_modules = tinytune
"""


def _lint_kernels(kernels_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    name = "tinytune_kernels_folder"
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / name).symlink_to(kernels_dir, target_is_directory=True)
    config = tmp_path / "importlinter.ini"
    config.write_text(KERNELS_CONTRACT.format(name=name))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "path"), str(ROOT)])}
    return subprocess.run(
        [_lint_imports(), "--config", str(config), "--no-cache"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


def test_lint_imports_kernels_never_import_tinytune(tmp_path):
    result = _lint_kernels(ROOT / "kernels", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout, result.stdout[-2000:]


def test_lint_imports_kernels_contract_catches_an_import_of_tinytune(tmp_path):
    bad = tmp_path / "kernels_copy"
    shutil.copytree(ROOT / "kernels", bad)
    (bad / "leak.py").write_text("from tinytune.errors import TinytuneError\n")
    result = _lint_kernels(bad, tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-2000:]
