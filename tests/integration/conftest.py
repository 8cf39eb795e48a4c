"""Integration-only plumbing: on a failing test that used a lab, attach the lab's logs
(sshd, target services, HTTP server, and every child started with lab.popen) to the report,
since the lab's temp dir is gone by the time anyone reads the failure; and the fixtures
the daemon and router modules share (`daemons`, `rlab`, `lab_user`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.daemon_util import DaemonSet
from tests.lab import Lab, LabUser, require_root_tools


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome: Any = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    labs = [v for v in funcargs.values() if isinstance(v, Lab) and v.is_open]
    for lab in labs:
        for name, tail in lab.logs(lines=30).items():
            if tail.strip():
                report.sections.append((f"lab {lab.prefix} log {name}", tail))


@pytest.fixture
def lab_user(lab: Lab) -> Iterator[LabUser]:
    """An unprivileged local user whose key the lab's sshd accepts (``ssh srv`` as them);
    deleted (with its processes) after the test."""
    user = lab.add_user()
    yield user
    if user in lab.users:
        lab.remove_user(user)


@pytest.fixture
def daemons(lab: Lab) -> Iterator[DaemonSet]:
    """The test's daemons (on the module's `lab`), stopped by PID after, ruleset checked."""
    with DaemonSet(lab) as ds:
        yield ds


@pytest.fixture(scope="module")
def rlab() -> Iterator[Lab]:
    """A lab with a LAN host behind cli (cli forwards, like a router)."""
    require_root_tools("ip", "sshd", "ssh", "ssh-keygen", "nft", "iptables")
    with Lab(lan=True) as lab:
        yield lab
