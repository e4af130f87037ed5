"""Dependencies point one way (README → Layout): command line → workflows → losses/data/config/features → models → base.

Every module is imported (so the table below covers the whole package) and its `dinoforge` imports, including the
ones inside functions, are read from the source: a module may import its own package and any lower layer, never a
higher layer or a sibling package of the same layer.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import dinoforge

LAYERS = {
    "utils": 0,
    "distributed": 1,
    "models": 2,
    "losses": 3,
    "data": 3,
    "config": 3,
    "features": 3,
    "train": 4,
    "curate": 4,
    "eval": 4,
    "viz": 4,
    "export": 4,
}
COMMAND_LINE = 5  # dinoforge.cli, every */cli.py, cli_common, demo, __main__, the package's own __init__


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(dinoforge.__path__, "dinoforge."))


def _home(module: str) -> tuple[str, int]:
    """The package a module belongs to and that package's layer."""
    parts = module.split(".")
    if parts[-1] in ("cli", "cli_common", "demo", "__main__") or module == "dinoforge":
        return "cli", COMMAND_LINE
    top = parts[1]
    if top not in LAYERS:
        raise AssertionError(f"{module}: its package {top!r} has no layer in tests/test_layering.py")
    return top, LAYERS[top]


def _imports(module: str) -> set[str]:
    """The dinoforge modules that `module`'s source imports, wherever in the file."""
    spec = importlib.util.find_spec(module)
    path = Path(spec.origin)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            found.update(f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "dinoforge" or m.startswith("dinoforge.")}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_every_module_imports_and_has_a_layer():
    modules = _modules()
    assert len(modules) > 50
    for module in modules:
        if not module.endswith("__main__"):  # importing it runs the command line
            importlib.import_module(module)
        _home(module)


@pytest.mark.parametrize("module", _modules())
def test_imports_point_down(module):
    home, layer = _home(module)
    wrong = []
    for target in sorted(_imports(module) - {"dinoforge"}):
        target_home, target_layer = _home(target)
        if target_home != home and target_layer >= layer:
            wrong.append(f"{target} ({target_home}, layer {target_layer})")
    assert not wrong, f"{module} ({home}, layer {layer}) imports up or sideways: {', '.join(wrong)}"


@pytest.mark.parametrize("module", [m for m in _modules() if _home(m)[0] != "cli"])
def test_libraries_know_no_command_line(module):
    """Typer options and the shared CLI options live only in the command-line modules."""
    path = Path(importlib.util.find_spec(module).origin)
    tree = ast.parse(path.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {"typer", "click"} & imported, f"{module} imports a command-line library"
