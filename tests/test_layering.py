"""The packages depend downward only, read from the source (every import, function-local ones too).

tangent/ is pure PyTorch and imports no Flower; server/ and client/ never import each other; no
two top-level packages import each other, so there is no import circle between them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tangent", "server", "client", "simulations", "deploy", "benchmarks")

#: what each package may import from the project (anything not listed is refused)
ALLOWED = {
    "tangent": set(),
    "server": {"tangent"},
    "client": {"tangent"},
    "deploy": {"tangent", "server", "client"},
    "benchmarks": {"tangent", "server", "simulations"},
    "simulations": {"tangent", "server", "client", "deploy"},
}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name that ``path`` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def package_imports(package: str) -> dict[str, set[str]]:
    """Top-level project package -> the files of ``package`` that import it."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in PACKAGES and top != package:
                found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_packages_below_it(package):
    upward = {top: files for top, files in package_imports(package).items() if top not in ALLOWED[package]}
    assert not upward, f"{package}/ imports {upward}"


def test_tangent_imports_no_flower():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "tangent").rglob("*.py")
                 if any(name.split(".")[0] == "flwr" for name in imported_modules(p))]
    assert not offenders


def test_the_allowed_imports_have_no_circle():
    # depth-first search over ALLOWED: a circle there would let two packages import each other
    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt}))
                   for nxt in ALLOWED[start])

    assert not [p for p in PACKAGES if reaches(p, p, {p})]
