"""`shuttled run` as a command: start, stop, bad arguments; the ruleset before
and after. A module of its own so that no other tunnel is up meanwhile."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from typing import Any

import psutil
import pytest

from tests.lab import Lab, clients
from tests.lab.runner import start_run, stop_run

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


_STAMPED = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d shuttled: ")


@pytest.mark.parametrize("forward", ["direct", "helper"])
def test_foreground_run_says_where_it_listens_and_that_it_cleaned_up(
    lab: Lab, forward: str
) -> None:
    """What a user reads: stamped lines, the listeners, and after Ctrl-C the rules gone
    (exit 0), without ssh's bookkeeping (`chan_send_close2: ... no remote_id`)."""
    remote = lab.remote_nofwd if forward == "helper" else lab.remote
    name = f"foreground-{forward}"
    proc = start_run(lab, lab.target_net_v4, remote=remote, name=name)
    with lab.netns("cli"):
        assert clients.http_get(lab.tgt_v4).status == 200
    assert stop_run(lab, proc, signal.SIGINT) == 0
    lines = lab.log_tail(name, 200).splitlines()
    assert lines and all(_STAMPED.match(line) for line in lines), lines
    assert any(re.search(r"listening on 127\.0\.0\.1:\d+, \[::1\]:\d+$", x) for x in lines)
    assert lines[-1].endswith("shuttled: INFO stopped: rules removed, tunnel closed"), lines
    assert not any("no remote_id" in x or "ssh: ssh:" in x for x in lines), lines


def test_bad_subnet_is_one_line_error_and_leaves_rules(lab: Lab) -> None:
    before = lab.firewall_snapshot()
    result = lab.run(
        "cli",
        [sys.executable, "-m", "shuttled", "run", "-r", lab.remote, "10.0.0.0/33"],
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "10.0.0.0/33" in result.stderr
    assert lab.firewall_snapshot() == before


def test_missing_remote_python_names_what_was_tried(lab: Lab) -> None:
    result = lab.run(
        "cli",
        [
            sys.executable,
            "-m",
            "shuttled",
            "run",
            "-e",
            lab.ssh_cmd,
            "-r",
            lab.remote_nofwd,
            "--python",
            "python-nowhere-3",
            lab.target_net_v4,
        ],
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no python 3.8 or newer" in result.stderr.lower()
    assert "python-nowhere-3" in result.stderr


def test_master_runs_as_the_sudo_user_with_their_ssh_config(lab: Lab, lab_user: Any) -> None:
    """Under sudo the master uses the invoking user's identity, never root's."""
    before = lab.firewall_snapshot()
    env = {**os.environ, "SUDO_UID": str(lab_user.uid), "SUDO_GID": str(lab_user.gid)}
    proc = lab.popen(
        "cli",
        [sys.executable, "-m", "shuttled", "run", "-r", lab_user.remote, lab.target_net_v4],
        name="sudo-run",
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while "is up" not in lab.log_tail("sudo-run", 100):
            assert proc.poll() is None and time.monotonic() < deadline, lab.log_tail("sudo-run")
            time.sleep(0.05)
        masters = [
            p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "ssh"
        ]
        assert masters and all(p.uids().real == lab_user.uid for p in masters)
        with lab.netns("cli"):
            assert clients.http_get(lab.tgt_v4).status == 200
    finally:
        assert stop_run(lab, proc) == 0
    assert lab.firewall_snapshot() == before
