"""Dropbear as the remote: our OpenSSH client (ControlMaster in proxy mode) against a real
Dropbear on srv, beside the lab's sshd (tests/lab/dropbear.py).

What was measured against Dropbear 2022.83 (and is pinned here):
- keepalive@openssh.com as a channel request on our own session channel gets
  CHANNEL_FAILURE back, as from sshd (svr-chansession.c answers every unknown
  request that wants a reply): round trip 100-380 us in the lab, so liveness and
  the RTT in stats work unchanged.
- Our session's pty-req and `exec cat` are granted: `cat` runs on a pty there.
- direct-tcpip to a closed port: OPEN_FAILURE "connect failed"; with `-j`:
  "administratively prohibited", so `forward: auto` picks the helper, which runs
  in the remote's python3 like with sshd.
- At most 1000 channels per ssh connection (MAX_CHANNELS, our session channel
  included): the 1000th app connection gets "resource shortage".
- Dropbear's default receive window (-W 24576) makes uploads slower than downloads
  (100 MB: ~250 Mbit/s up, ~500 down; with -W 1048576 ~560 up), a server setting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon_util import Daemon, DaemonSet, http_ok, http_works_soon, wait_for
from tests.integration.router_util import http_from, udp_from
from tests.lab import Lab, LabUser, clients, require_root_tools
from tests.lab.dropbear import DropbearServer, restart_dropbear
from tests.lab.netns import pids_of_uid
from tests.lab.runner import start_run, stop_run

pytestmark = pytest.mark.integration

NOFWD_PORT = 2023
DROPBEAR_MAX_CHANNELS = 1000  # per ssh connection, our own session channel included
KEEPALIVE = 1  # "no answer" after 3 s: an unanswered ping would show within the test


@dataclasses.dataclass
class DropbearLab:
    lab: Lab
    user: LabUser
    fwd: DropbearServer  # forwarding allowed
    nofwd: DropbearServer  # -j: direct-tcpip refused


@pytest.fixture(scope="module")
def dlab() -> Iterator[DropbearLab]:
    """A lab with a LAN host (for UDP) and two Dropbears on srv, logging in one user."""
    require_root_tools("ip", "sshd", "ssh", "ssh-keygen", "nft", "dropbear", "dropbearkey")
    with Lab(lan=True) as lab:
        user = lab.add_user()
        fwd = lab.start_dropbear(user)
        nofwd = lab.start_dropbear(user, port=NOFWD_PORT, forwarding=False)
        yield DropbearLab(lab, user, fwd, nofwd)


def dropbear_profile(d: DropbearLab, server: DropbearServer, **keys: Any) -> dict[str, Any]:
    """Router mode to the target networks through ``server``: TCP and DNS from cli and
    the LAN host, UDP from the LAN host (carried by the helper, also in direct mode)."""
    lab = d.lab
    options = {
        "UserKnownHostsFile": lab.known_hosts,
        "User": d.user.name,
        "Port": server.port,
        "ConnectTimeout": 5,
    }
    return {
        "remote": lab.srv_v4,
        "identity": lab.identity,
        "ssh_options": options,
        "subnets": list(lab.target_nets),
        "dns": {"mode": "all"},
        "lan": [f"{lab.lan_v4}/32", f"{lab.lan_v6}/128"],
        "keepalive": KEEPALIVE,
        **keys,
    }


@pytest.fixture(scope="module")
def daemon(dlab: DropbearLab) -> Iterator[Daemon]:
    """The daemon in cli with profile "direct" (Dropbear forwards) and "helper" (it does
    not: `forward: auto` must find that out); "direct" is up."""
    with DaemonSet(dlab.lab) as daemons:
        d = daemons.new("dropbear")
        d.write_profile("direct", dropbear_profile(dlab, dlab.fwd))
        d.write_profile("helper", dropbear_profile(dlab, dlab.nofwd))
        d.start()
        d.up("direct")
        yield d


def test_shuttled_run_with_dns_through_dropbear(dlab: DropbearLab) -> None:
    """The one-shot path, `shuttled run --dns -r user@dropbear` with the lab's ssh
    (first in the module: one daemon per namespace, and the module's is not up yet)."""
    lab = dlab.lab
    proc = start_run(lab, "--dns", *lab.target_nets, remote=dlab.fwd.remote, name="run-dropbear")
    try:
        assert "direct mode" in lab.log_tail("run-dropbear", 100)
        with lab.netns("cli"):
            response = clients.http_get(lab.tgt_v6)
            answer = clients.dns_query(lab.fake_dns_v4, lab.dns_name, "A")
        assert response.status == 200 and lab.tgt_v4 in answer.addresses
    finally:
        assert stop_run(lab, proc) == 0, lab.log_tail("run-dropbear", 60)


def test_dropbears_channel_limit_is_named_once_and_more_streams_lift_it(
    dlab: DropbearLab,
) -> None:
    """Dropbear holds 1000 channels per ssh connection: past that each open fails with
    "resource shortage" (a reset for the app), the log says once what to change, and
    `--streams 2` carries them all."""
    lab = dlab.lab
    over = DROPBEAR_MAX_CHANNELS + 100
    proc = start_run(lab, *lab.target_nets, remote=dlab.fwd.remote, name="run-limit")
    try:
        with lab.netns("cli"):
            answered = asyncio.run(_echoes_held_open(lab.tgt_v4, lab.ports.echo, over))
        log = lab.log_tail("run-limit", 5000)
    finally:
        assert stop_run(lab, proc) == 0, lab.log_tail("run-limit", 60)
    assert DROPBEAR_MAX_CHANNELS - 10 <= answered < over, answered
    assert log.count("Dropbear allows 1000") == 1, log[-3000:]

    proc = start_run(
        lab, "--streams", "2", *lab.target_nets, remote=dlab.fwd.remote, name="run-streams"
    )
    try:
        with lab.netns("cli"):
            answered = asyncio.run(_echoes_held_open(lab.tgt_v4, lab.ports.echo, over))
    finally:
        assert stop_run(lab, proc) == 0, lab.log_tail("run-streams", 60)
    assert answered == over


def test_tcp_dns_and_ipv6_through_dropbears_direct_tcpip(dlab: DropbearLab, daemon: Daemon) -> None:
    lab = dlab.lab
    assert daemon.status("direct")["mode"] == "direct", daemon.log()
    assert http_ok(lab, lab.tgt_v4) and http_ok(lab, lab.tgt_v6)
    payload = os.urandom(200_000)
    with lab.netns("cli"):
        assert clients.echo(lab.tgt_v4, payload) == payload
        assert clients.echo(lab.tgt_v6, payload, half_close=True) == payload
        answer = clients.dns_query(lab.fake_dns_v4, lab.dns_name, "AAAA", tcp=True)
    assert lab.tgt_v6 in answer.addresses
    for host in (lab.tgt_v4, lab.tgt_v6):
        assert http_from(lab, host) == "ok", daemon.log()


def test_udp_through_the_helper_dropbear_runs_in_its_python3(
    dlab: DropbearLab, daemon: Daemon
) -> None:
    lab = dlab.lab
    for host in (lab.tgt_v4, lab.tgt_v6):
        assert udp_from(lab, host) == "ok", daemon.log()
    assert daemon.stats("direct")["udp"]["datagrams_down"] >= 2


def test_health_check_gets_dropbears_answer_and_an_idle_link_stays_up(
    dlab: DropbearLab, daemon: Daemon
) -> None:
    """Dropbear answers our keepalive@openssh.com with CHANNEL_FAILURE: a round trip
    shows in stats, and idling past keepalive x 3 (3 s) is no reason to reconnect."""
    before = daemon.stats("direct")["reconnects"]
    rtt = wait_for("a health check's round trip", lambda: daemon.stats("direct")["rtt"], 10.0)
    assert 0 < rtt < 5.0
    time.sleep(KEEPALIVE * 3 + 3)
    stats = daemon.stats("direct")
    assert stats["reconnects"] == before and daemon.state("direct") == "up", daemon.log()
    assert stats["rtt"] is not None


def test_our_session_channel_gets_a_pty_from_dropbear(dlab: DropbearLab, daemon: Daemon) -> None:
    """The pty turns Nagle off on the server (README, "Why a pty on our own session?"):
    Dropbear grants it, and the `cat` our session execs runs on it."""
    ttys = [
        os.readlink(f"/proc/{pid}/fd/0")
        for pid in pids_of_uid(dlab.user.uid)
        if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"cat"
    ]
    assert any(t.startswith("/dev/pts/") for t in ttys), ttys


def test_killed_dropbear_connection_child_reconnects(dlab: DropbearLab, daemon: Daemon) -> None:
    lab = dlab.lab
    before = daemon.stats("direct")["reconnects"]
    children = dlab.fwd.connection_pids()
    assert children, "the tunnel's connection has no Dropbear child"
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    daemon.wait_state("direct", "reconnecting", "connecting", timeout=15.0)
    daemon.wait_state("direct", "up", timeout=30.0)
    http_works_soon(lab, lab.tgt_v4, timeout=10.0)
    assert daemon.stats("direct")["reconnects"] > before


def test_restarted_dropbear_brings_the_tunnel_back(dlab: DropbearLab, daemon: Daemon) -> None:
    lab = dlab.lab
    before = daemon.stats("direct")["reconnects"]
    dlab.fwd = restart_dropbear(lab, dlab.fwd)
    daemon.wait_state("direct", "up", timeout=60.0)
    http_works_soon(lab, lab.tgt_v6, timeout=30.0)
    assert daemon.stats("direct")["reconnects"] > before, daemon.log()
    assert dlab.fwd.connection_pids()


def test_dropbear_refusing_forwarding_gets_the_helper(dlab: DropbearLab, daemon: Daemon) -> None:
    """`-j` makes Dropbear answer "administratively prohibited": auto mode switches to
    the helper, which carries TCP (both families) and UDP."""
    lab = dlab.lab
    daemon.ctl("down", "direct")
    try:
        daemon.up("helper")
        assert daemon.status("helper")["mode"] == "helper", daemon.log()
        for host in (lab.tgt_v4, lab.tgt_v6):
            assert http_from(lab, host) == "ok", daemon.log()
            assert udp_from(lab, host) == "ok", daemon.log()
        with lab.netns("cli"):
            assert clients.dns_query(lab.fake_dns_v4, lab.dns_name, "A").addresses
    finally:
        daemon.ctl("down", "helper")


async def _echoes_held_open(host: str, port: int, count: int) -> int:
    """Open ``count`` echo connections and keep each open once answered: how many were."""
    held: list[asyncio.StreamWriter] = []

    async def one() -> bool:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            held.append(writer)
            writer.write(b"ping")
            return await reader.readexactly(4) == b"ping"
        except (OSError, asyncio.IncompleteReadError):
            return False

    try:
        results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 120)
    finally:
        for writer in held:
            writer.close()
    return sum(results)
