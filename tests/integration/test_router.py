"""Router mode end to end, the daemon as the router: lan-host -> cli (runs shuttled) ->
srv (sshd) -> tgt. The LAN host has no software of its own: only a default route and a
resolver pointing at cli. The suite runs on both firewall backends; each checks on the
way out that the router's ruleset, `ip rule` and routing tables are exactly as before.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.integration.daemon_util import Daemon, DaemonSet, wait_for
from tests.integration.router_util import (
    METHODS,
    PROFILE,
    block_ssh,
    http_from,
    kernel_state,
    router_profile,
    start_daemon,
    tcp_connections,
    timed,
    udp_flows,
    udp_from,
)
from tests.lab import Lab, clients

pytestmark = pytest.mark.integration

FLOWS = 500
TCP_CONNECTIONS = 200
LOW_FLOW_LIMIT = 100


@pytest.fixture(scope="module", params=METHODS)
def router(request: pytest.FixtureRequest, rlab: Lab) -> Iterator[Daemon]:
    """The daemon in cli with one router-mode profile up (kill switch on)."""
    before = kernel_state(rlab)
    with DaemonSet(rlab) as daemons:
        d = start_daemon(daemons, request.param, router_profile(rlab, kill_switch=True))
        d.up(PROFILE)
        yield d
    assert kernel_state(rlab) == before


def test_lan_host_fetches_http_and_gets_udp_echo_over_ipv4_and_ipv6(
    router: Daemon, rlab: Lab
) -> None:
    for host in (rlab.tgt_v4, rlab.tgt_v6):
        assert http_from(rlab, host) == "ok", router.log()
        assert udp_from(rlab, host) == "ok", router.log()
    stats = router.stats(PROFILE)
    assert stats["udp"]["datagrams_down"] >= 2 and stats["total"] >= 2, stats


def test_lan_host_resolves_a_name_only_the_remote_knows(router: Daemon, rlab: Lab) -> None:
    with rlab.netns("lan"):
        for server in (rlab.router_lan_v4, rlab.router_lan_v6):
            assert rlab.tgt_v4 in clients.dns_query(server, rlab.dns_name, "A").addresses
            assert (
                rlab.tgt_v6 in clients.dns_query(server, rlab.dns_name, "AAAA", tcp=True).addresses
            )
    # The LAN host's own resolver library, told only "nameserver <router>".
    resolved = rlab.run("lan", ["getent", "ahosts", rlab.dns_name]).stdout
    assert rlab.tgt_v4 in resolved and rlab.tgt_v6 in resolved


def test_quic_sized_datagrams_and_dns_to_any_server_travel_as_udp_flows(
    router: Daemon, rlab: Lab
) -> None:
    before = router.stats(PROFILE)["udp"]["opened"]
    for host in (rlab.tgt_v4, rlab.tgt_v6):
        assert udp_from(rlab, host, size=1350) == "ok"  # a QUIC Initial is >= 1200 bytes
    with rlab.netns("lan"):  # the remote resolver itself, asked over UDP: not the box
        for server in (rlab.dns_v4, rlab.dns_v6):
            assert rlab.tgt_v4 in clients.dns_query(server, rlab.dns_name, "A").addresses
    assert ("udp", rlab.dns_name, "A") in rlab.dns_queries()  # it did arrive as UDP
    assert router.stats(PROFILE)["udp"]["opened"] >= before + 4


def test_source_not_in_lan_is_not_captured(router: Daemon, rlab: Lab) -> None:
    for host, other in ((rlab.tgt_v4, rlab.lan_v4_other), (rlab.tgt_v6, rlab.lan_v6_other)):
        # Forwarded as usual: srv does not forward, so it goes nowhere.
        assert http_from(rlab, host, source=other, timeout=1.0) == "timeout"
        assert udp_from(rlab, host, source=other, timeout=1.0) == "timeout"
    assert http_from(rlab, rlab.tgt_v4, source=rlab.lan_v4) == "ok"


def test_200_tcp_connections_and_500_udp_flows_at_once(router: Daemon, rlab: Lab) -> None:
    tcp_connections(rlab, TCP_CONNECTIONS)
    assert udp_flows(rlab, FLOWS) == FLOWS, router.stats(PROFILE)
    udp = router.stats(PROFILE)["udp"]
    assert udp["refused"] == 0 and udp["flows"] >= FLOWS, udp
    # Flows of the module's earlier tests (DNS, other echoes) may still be listed.
    rows = router.ctl_json("connections", PROFILE)["connections"]
    echoes = [
        r for r in rows if r["proto"] == "udp" and r["dst"].endswith(f":{rlab.ports.udp_echo}")
    ]
    assert len(echoes) >= FLOWS, rows[:3]


def test_udp_flow_limit_holds_and_refusals_are_counted(router: Daemon, rlab: Lab) -> None:
    router.write_profile(PROFILE, router_profile(rlab, kill_switch=True, udp_flows=LOW_FLOW_LIMIT))
    try:
        assert router.ctl("reload").returncode == 0, router.log()
        router.wait_state(PROFILE, "up")
        answered = udp_flows(rlab, FLOWS, timeout=6.0)
        udp = router.stats(PROFILE)["udp"]
        assert answered <= LOW_FLOW_LIMIT and udp["flows"] <= LOW_FLOW_LIMIT, udp
        assert answered >= LOW_FLOW_LIMIT * 0.9, udp  # the ones let in do work
        assert udp["refused"] >= FLOWS - LOW_FLOW_LIMIT, udp
    finally:
        router.write_profile(PROFILE, router_profile(rlab, kill_switch=True))
        router.ctl("reload")
        router.wait_state(PROFILE, "up")


def test_kill_switch_refuses_promptly_while_reconnecting_then_recovers(
    router: Daemon, rlab: Lab
) -> None:
    assert http_from(rlab, rlab.tgt_v4) == "ok"
    block_ssh(rlab, True)
    try:
        os.kill(router.ssh_pid(PROFILE), signal.SIGKILL)
        router.wait_state(PROFILE, "reconnecting", "connecting", timeout=10)
        wait_for("the kill switch", lambda: router.status(PROFILE).get("holding"), 5)
        for host in (rlab.tgt_v4, rlab.tgt_v6):
            outcome, seconds = timed(http_from, rlab, host, timeout=5.0)
            assert outcome in ("refused", "reset") and seconds < 1.5, (host, outcome, seconds)
            outcome, seconds = timed(udp_from, rlab, host, timeout=5.0)
            assert outcome == "refused" and seconds < 1.5, (host, outcome, seconds)
        with rlab.netns("cli"):  # the router's own connections too
            outcome, seconds = clients.probe_tcp(rlab.tgt_v4, rlab.ports.http, timeout=5.0)
        # (iptables' tcp-reset in OUTPUT reaches connect() as a reset, nft's as a refusal)
        assert outcome in ("refused", "reset") and seconds < 1.5, outcome
        assert "kill switch" in router.ctl("status", PROFILE).stdout
    finally:
        block_ssh(rlab, False)
    router.wait_state(PROFILE, "up", timeout=60)
    assert not router.status(PROFILE)["holding"]
    wait_for("HTTP from the LAN again", lambda: http_from(rlab, rlab.tgt_v4) == "ok", 10)
    assert udp_from(rlab, rlab.tgt_v6) == "ok"


def test_policy_routing_flushed_by_someone_else_is_restored_within_two_seconds(
    router: Daemon, rlab: Lab
) -> None:
    restored = router.stats(PROFILE).get("rules_restored", 0)
    for family in ("-4", "-6"):
        # `ip rule flush`, then the main and default lookups put back (as a network
        # manager resetting its rules would): only ours is missing now.
        rlab.run("cli", ["ip", family, "rule", "flush"])
        rlab.run("cli", ["ip", family, "rule", "add", "priority", "32766", "lookup", "main"])
        if family == "-4":
            rlab.run("cli", ["ip", family, "rule", "add", "priority", "32767", "lookup", "default"])
    t0 = time.monotonic()
    wait_for(
        "UDP from the LAN again",
        lambda: udp_from(rlab, rlab.tgt_v4, timeout=0.5) == "ok",
        10,
        interval=0.05,
    )
    assert time.monotonic() - t0 < 2.5
    stats = router.stats(PROFILE)
    assert stats["rules_restored"] > restored and "changed" in stats["rules_last_loss"], stats
