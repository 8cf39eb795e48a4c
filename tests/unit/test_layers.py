"""The packages are layers: every import of shuttled code points down this list.

The order is the one README.md's "Working on shuttled" section draws. A module may
import its own layer and any layer below it, never one above; imports made only for
type checking and imports inside functions count too (a late import is still a
dependency). shuttlectl may use only the protocol (and its schema) and what they rest on.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Top to bottom. A module belongs to the layer of the longest prefix it has.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "entry",
        (
            "shuttled.__main__",
            "shuttled.cli",
            "shuttled.run",
            "shuttled.trust",
            "shuttled.manpages",
            "shuttled.install",
        ),
    ),
    ("daemon", ("shuttled.daemon",)),
    ("doctor", ("shuttled.doctor",)),
    ("control", ("shuttled.control",)),
    ("supervisor", ("shuttled.supervisor",)),
    ("router", ("shuttled.router",)),
    ("config", ("shuttled.config",)),
    ("dns", ("shuttled.dns",)),
    ("tunnel", ("shuttled.tunnel",)),
    ("firewall", ("shuttled.firewall",)),
    ("remote", ("shuttled.remote",)),
    ("state", ("shuttled.instance", "shuttled.durable", "shuttled.journal")),
    ("net", ("shuttled.net",)),
    # The types of the control results: a leaf (stdlib and errors) that every producer
    # below the control layer builds its part of a result in, and the CLI checks.
    ("schema", ("shuttled.control.schema", "shuttled.control.tables")),
    ("base", ("shuttled.errors", "shuttled.const", "shuttled.data", "shuttled")),
]
# They render man pages and completion from shuttlectl's parser, which they import.
GENERATORS = ("shuttled.manpages", "shuttled.install")
# What the CLI shares with the daemon: the one schema, and what that schema rests on.
CLI_MAY_IMPORT = (
    "shuttled.control.protocol",
    "shuttled.control.schema",
    "shuttled.control.tables",
    "shuttled.const",
    "shuttled.errors",
    "shuttled",
)


def layer_of(module: str) -> int:
    found = [
        (len(p), index)
        for index, (_, prefixes) in enumerate(LAYERS)
        for p in prefixes
        if module == p or module.startswith(p + ".")
    ]
    assert found, f"{module} is in no layer: add it to LAYERS"
    return max(found)[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import of shuttled or shuttlectl code."""
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from shuttled.x import y` may name a submodule y: judge the deepest.
            names = [f"{base}.{alias.name}" for alias in node.names] or [base]
            names = [n if _is_module(n) else base for n in names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("shuttled", "shuttlectl"):
                yield node.lineno, name


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", sources("shuttled"), ids=lambda p: module_name(p))
def test_daemon_modules_import_only_their_layer_or_below(path: Path) -> None:
    mine = layer_of(module_name(path))
    upward = [
        f"{path.relative_to(ROOT)}:{line}: {name} ({LAYERS[layer_of(name)][0]})"
        for line, name in imports(path)
        if not name.startswith("shuttlectl") and layer_of(name) < mine
    ]
    upward += [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for line, name in imports(path)
        if name.startswith("shuttlectl") and module_name(path) not in GENERATORS
    ]
    assert not upward, f"{LAYERS[mine][0]} layer imports upward:\n" + "\n".join(upward)


@pytest.mark.parametrize("path", sources("shuttlectl"), ids=lambda p: module_name(p))
def test_the_cli_shares_only_the_protocol_with_the_daemon(path: Path) -> None:
    foreign = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for line, name in imports(path)
        if name.startswith("shuttled") and name not in CLI_MAY_IMPORT
    ]
    assert not foreign, "shuttlectl imports daemon code:\n" + "\n".join(foreign)


def test_every_module_has_a_layer() -> None:
    for path in sources("shuttled"):
        layer_of(module_name(path))


def test_the_readme_draws_the_same_layers() -> None:
    text = (ROOT / "README.md").read_text()
    table = text.split("### Modules and their layers", 1)[1].split("\n\n| layer |", 1)[1]
    rows = [line for line in table.split("\n\n", 1)[0].splitlines() if line.startswith("| ")]
    drawn = [row.split("|")[1].strip() for row in rows]
    assert drawn == [name for name, _ in LAYERS]
