"""What the lab needs from the machine, and how a test says so (skip locally, fail in CI)."""

from __future__ import annotations

import os
import shutil

SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def which(tool: str) -> str | None:
    """Find ``tool`` on PATH or in the sbin directories (often missing from a user's PATH)."""
    return shutil.which(tool) or shutil.which(tool, path=SBIN_PATH)


def missing_root_tools(*tools: str) -> list[str]:
    """Reasons the lab cannot run here: not root, or tools not installed (empty: all fine)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    missing = [t for t in tools if which(t) is None]
    if missing:
        problems.append("missing tools: " + ", ".join(missing))
    return problems


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_root_tools(*tools: str) -> None:
    """Skip the calling test when not root or a tool is missing; fail instead under CI=true.

    In CI a missing prerequisite is a broken pipeline, not a reason to pass quietly.
    """
    import pytest  # only needed where tests run; the lab itself does not depend on pytest

    problems = missing_root_tools(*tools)
    if not problems:
        return
    msg = "; ".join(problems) + f" (needed: root and {', '.join(tools) or 'nothing else'})"
    if in_ci():
        pytest.fail("CI=true and the integration prerequisites are not met: " + msg, pytrace=False)
    pytest.skip(msg)
