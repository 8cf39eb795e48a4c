"""Shared pytest plumbing: the `integration` marker, root/tool checks, and the lab fixtures.

- Tests under tests/integration/ are marked ``integration`` automatically
  (``pytest -m "not integration"`` runs the rest without root).
- ``require_root_tools(*tools)`` (also a fixture of the same name): skip when not root or a
  tool is missing; under ``CI=true`` the same condition fails the test instead.
- ``lab``: a module-scoped namespace lab (tests/lab), always torn down.
- ``lab_factory``: build extra labs inside one test; all closed at the test's end.
- Every test gets the root logger back as it found it: a test that runs a command's
  ``main()`` installs a handler on the stream pytest captured for it, which is closed
  by the next test.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab import Lab, cleanup_stale, missing_root_tools
from tests.lab import require_root_tools as _require_root_tools

LAB_TOOLS = ("ip", "sshd", "ssh", "ssh-keygen")
INTEGRATION_DIR = Path(__file__).parent / "integration"

require_root_tools = _require_root_tools


def pytest_sessionstart(session: pytest.Session) -> None:
    # Labs whose owner died (SIGKILL, crash) are recorded in /run/shuttled-lab: clean them.
    if not missing_root_tools("ip"):
        cleanup_stale()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(name="require_root_tools")
def require_root_tools_fixture() -> Callable[..., None]:
    """The ``require_root_tools`` function, for tests that prefer a fixture."""
    return _require_root_tools


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """One lab per test module: namespaces cli/srv/tgt, sshd on srv, services in tgt."""
    _require_root_tools(*LAB_TOOLS)
    with Lab() as instance:
        yield instance


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """``lab_factory(**kw)`` opens a fresh Lab; every one is closed after the test."""
    _require_root_tools(*LAB_TOOLS)
    made: list[Lab] = []

    def make(**kw: Any) -> Lab:
        instance = Lab(**kw)
        made.append(instance)
        return instance.open()

    yield make
    for instance in reversed(made):
        instance.close()
