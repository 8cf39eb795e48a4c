"""`shuttled run` as a command: start, stop, bad arguments; the ruleset before
and after. A module of its own so that no other tunnel is up meanwhile."""

from __future__ import annotations

import signal
import sys

import pytest

from tests.integration.test_tunnel import start_run, stop_run
from tests.lab import Lab, clients

pytestmark = pytest.mark.integration


def test_target_is_unreachable_without_a_tunnel(lab: Lab) -> None:
    with lab.netns("cli"):
        outcome, _ = clients.probe_tcp(lab.tgt_v4, lab.ports.http, timeout=1.0)
    assert outcome in ("timeout", "unreachable")


@pytest.mark.parametrize("method", ["nft", "iptables"])
def test_sigint_exit_restores_the_ruleset(lab: Lab, method: str) -> None:
    before = lab.firewall_snapshot()
    proc = start_run(lab, lab.target_net_v4, method=method, name=f"sigint-{method}")
    assert lab.firewall_snapshot() != before
    assert stop_run(lab, proc, signal.SIGINT) == 0
    assert lab.firewall_snapshot() == before


def test_bad_subnet_is_one_line_error_and_leaves_rules(lab: Lab) -> None:
    before = lab.firewall_snapshot()
    result = lab.run("cli", [sys.executable, "-m", "shuttled", "run", "-r", lab.remote,
                             "10.0.0.0/33"], check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "10.0.0.0/33" in result.stderr
    assert lab.firewall_snapshot() == before
