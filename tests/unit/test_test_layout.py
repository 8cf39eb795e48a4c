"""The tests' own layout: shared helpers live in tests/helpers.py, the helper modules beside
the tests, the lab package or conftest.py fixtures, never in a test module -- so no file
under tests/ imports a ``test_*`` module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def imported_modules(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, dotted name) of every module an import statement names, relative ones with
    their leading dots; ``from X import a, b`` names X.a and X.b as well (a may be a module)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def named_test_modules(name: str) -> list[str]:
    return [part for part in name.split(".") if part.startswith("test_")]


def test_no_file_under_tests_imports_a_test_module() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for line, name in imported_modules(tree):
            if named_test_modules(name):
                offenders.append(f"{path.relative_to(TESTS.parent)}:{line}: imports {name}")
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_every_spelling() -> None:
    source = (
        "import tests.unit.test_a\n"
        "from tests.integration.test_b import helper\n"
        "from .test_c import helper\n"
        "from . import test_d\n"
        "def f():\n    from tests.unit import test_e\n"
        "from tests.helpers import run_async\n"
        "from tests.lab import runner\n"
    )
    hits = [named_test_modules(name) for _line, name in imported_modules(ast.parse(source))]
    assert sorted({m for found in hits for m in found}) == [
        "test_a",
        "test_b",
        "test_c",
        "test_d",
        "test_e",
    ]
