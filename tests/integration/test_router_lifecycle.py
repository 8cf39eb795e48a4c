"""Router mode around the daemon's life and `shuttled run --lan`: the kill switch from
the first connect, `down`, exit and `shuttled cleanup` after SIGKILL leave the router's
kernel (firewall, `ip rule`, routing tables) as it was; forwarding off is said plainly.
A module of its own, so that no other router-mode daemon runs meanwhile."""

from __future__ import annotations

import re
import sys

import pytest

from tests.integration.daemon_util import REPO_ROOT, DaemonSet, wait_for
from tests.integration.router_util import (
    METHODS,
    PROFILE,
    block_ssh,
    http_from,
    kernel_state,
    router_profile,
    start_daemon,
    start_lan_run,
    timed,
    udp_from,
)
from tests.lab import Lab, clients
from tests.lab.runner import start_run, stop_run

pytestmark = pytest.mark.integration


def test_lan_host_reaches_nothing_without_a_tunnel(rlab: Lab) -> None:
    for host in (rlab.tgt_v4, rlab.tgt_v6):
        assert http_from(rlab, host, timeout=1.0) != "ok"
        assert udp_from(rlab, host, timeout=1.0) != "ok"


@pytest.mark.parametrize("method", METHODS)
def test_kill_switch_holds_from_the_first_connect_and_down_lifts_it(rlab: Lab, method: str) -> None:
    before = kernel_state(rlab)
    block_ssh(rlab, True)
    try:
        with DaemonSet(rlab) as daemons:
            d = start_daemon(daemons, method, router_profile(rlab, kill_switch=True))
            assert d.ctl("up", PROFILE, "--no-wait").returncode == 0
            wait_for(
                "the kill switch while connecting",
                lambda: d.status(PROFILE).get("holding"),
                15,
                detail=d.log,
            )
            assert d.state(PROFILE) in ("connecting", "reconnecting")
            outcome, seconds = timed(http_from, rlab, rlab.tgt_v4, timeout=5.0)
            assert outcome in ("refused", "reset") and seconds < 1.5, outcome
            assert timed(udp_from, rlab, rlab.tgt_v6, timeout=5.0)[0] == "refused"
            assert d.ctl("down", PROFILE).returncode == 0
            assert routing(kernel_state(rlab)) == routing(before)
            assert only_the_empty_daemon_table(rlab, method)
            # After down the kill switch is lifted: plain forwarding (which srv drops).
            assert http_from(rlab, rlab.tgt_v4, timeout=1.0) == "timeout"
    finally:
        block_ssh(rlab, False)
    assert kernel_state(rlab) == before


def routing(state: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in state.items() if k.startswith(("rule", "route"))}


def only_the_empty_daemon_table(lab: Lab, method: str) -> bool:
    """What a running daemon keeps with no profile up: its own empty table (nft) or top
    chain (iptables nat), and nothing in mangle or filter."""
    fw = lab.firewall_snapshot()
    if method == "nft":
        table = lab.run("cli", ["nft", "list", "table", "inet", "shuttled"]).stdout
        return re.findall(r"chain (\S+)", table) == ["output"] and "jump" not in table
    ours = [
        ln
        for key in ("iptables-save", "ip6tables-save")
        for ln in fw.get(key, "").splitlines()
        if "SHUTTLED" in ln
    ]
    return all(ln in (":SHUTTLED - [0:0]", "-A OUTPUT -j SHUTTLED") for ln in ours)


@pytest.mark.parametrize("method", METHODS)
def test_exit_and_cleanup_after_sigkill_leave_the_kernel_as_before(rlab: Lab, method: str) -> None:
    before = kernel_state(rlab)
    with DaemonSet(rlab) as daemons:
        d = start_daemon(daemons, method, router_profile(rlab))
        d.up(PROFILE)
        assert http_from(rlab, rlab.tgt_v4) == "ok"
        assert kernel_state(rlab) != before
        assert d.stop() == 0
        assert kernel_state(rlab) == before  # exit (SIGTERM) takes it all away

        d.start()
        d.up(PROFILE)
        assert udp_from(rlab, rlab.tgt_v4) == "ok"
        d.kill()
        assert kernel_state(rlab) != before  # SIGKILL leaves rules and policy routing
        cleanup = rlab.run(
            "cli", [sys.executable, "-m", "shuttled", "cleanup"], cwd=str(REPO_ROOT), check=False
        )
        assert cleanup.returncode == 0, cleanup.stderr
        assert kernel_state(rlab) == before


# --- `shuttled run --lan` ----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_run_with_lan_interface_carries_tcp_udp_and_dns(rlab: Lab, method: str) -> None:
    before = kernel_state(rlab)
    proc = start_lan_run(rlab, f"run-lan-{method}", method)
    try:
        for host in (rlab.tgt_v4, rlab.tgt_v6):
            assert http_from(rlab, host) == "ok"
            assert udp_from(rlab, host) == "ok"
            # Every address of the LAN interface is captured (its second one too).
            assert (
                udp_from(
                    rlab, host, source=rlab.lan_v4_other if ":" not in host else rlab.lan_v6_other
                )
                == "ok"
            )
        with rlab.netns("lan"):  # --lan-dns all: a resolver that exists nowhere answers
            answer = clients.dns_query(rlab.fake_dns_v4, rlab.dns_name, "A")
        assert rlab.tgt_v4 in answer.addresses
        with rlab.netns("cli"):  # local UDP goes through the tunnel as well
            assert clients.udp_echo(rlab.tgt_v6, b"from the router") == b"from the router"
    finally:
        assert stop_run(rlab, proc) == 0, rlab.log_tail(f"run-lan-{method}")
    assert kernel_state(rlab) == before


def test_forwarding_off_is_said_plainly(rlab: Lab) -> None:
    rlab.set_router_forwarding(False)
    try:
        proc = start_run(rlab, "--lan", rlab.if_cli_lan, *rlab.target_nets, name="run-noforward")
        try:
            log = rlab.log_tail("run-noforward", 100)
            assert "net.ipv4.ip_forward is 0" in log, log
            assert "net.ipv6.conf.all.forwarding is 0" in log, log
            # What the tunnel carries is delivered to shuttled, not forwarded.
            assert http_from(rlab, rlab.tgt_v4) == "ok"
            assert udp_from(rlab, rlab.tgt_v6) == "ok"
        finally:
            assert stop_run(rlab, proc) == 0
    finally:
        rlab.set_router_forwarding(True)
