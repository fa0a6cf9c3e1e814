"""Tests use only the public names of the project's modules, and helpers come from helper modules.

A private name (``_x``) is free to change with its module; a test that needs one is a sign the
module should make it public. A test module imported by another test module runs its tests twice
and hides shared helpers: shared ones live in tests/helpers.py or a helper module beside the tests.
"""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PROJECT = ("tangent", "server", "client", "simulations", "deploy", "benchmarks")


def python_files():
    return sorted(TESTS.rglob("*.py"))


def private_uses(path: Path) -> list[str]:
    """``from project.module import _x`` and ``project_module._x`` in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in PROJECT:
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{node.module}.{alias.name}")
                modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PROJECT:
                    modules[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{modules[node.value.id]}.{node.attr}")
    return found


def test_no_test_uses_a_private_name_of_a_project_module():
    offenders = {str(p.relative_to(TESTS)): uses for p in python_files() if (uses := private_uses(p))}
    assert not offenders


def test_no_test_module_imports_another_test_module():
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests.") \
                    and node.module.rsplit(".", 1)[-1].startswith("test_"):
                offenders.append(f"{path.relative_to(TESTS)} imports {node.module}")
    assert not offenders
