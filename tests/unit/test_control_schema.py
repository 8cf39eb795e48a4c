"""The result types of shuttled.control.schema: what the daemon's real producers build
type-checks against them after a trip through the wire, and shuttlectl renders it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shuttlectl import render
from shuttled.control.protocol import decode_reply, encode_event, ok_reply
from shuttled.control.schema import (
    ConnectionRow,
    DnsCounters,
    ProfileStats,
    ProfileStatus,
    ReloadResult,
    UdpCounters,
    VersionInfo,
    check,
    check_event,
    json_reference,
)
from shuttled.daemon import Daemon
from shuttled.dns.forwarder import DnsStats
from shuttled.dns.resolver import ProfileResolver
from shuttled.errors import ProtocolError
from shuttled.supervisor import CaptureSet, State
from shuttled.tunnel.nodelay import TcpInfo
from shuttled.tunnel.session import SshSession
from shuttled.tunnel.transparent import connection_row
from shuttled.tunnel.udp import UdpStats
from tests.helpers import RecordingBackend

REPO = Path(__file__).resolve().parents[2]

PROFILES = """\
work:
  remote: alice@bastion
  subnets: [10.0.0.0/8]
  exclude: [10.0.5.0/24]
  dns: {mode: split, domains: [corp.example]}
"""


class FakeLink:
    """An ssh connection as SshSession's stats read it."""

    def __init__(self, load: int) -> None:
        self.load = load
        tcp = TcpInfo(state=1, heard=0.1, unacked=0, backoff=0, rtt=0.004, retrans=2)
        self.master = SimpleNamespace(pid=os.getpid(), tcp_info=lambda: tcp)


class FakeSession:
    """A connected session: SshSession's own stats methods over two fake links."""

    stream_stats = SshSession.stream_stats
    link_stats = SshSession.link_stats
    master_pids = SshSession.master_pids
    live_links = SshSession.live_links

    def __init__(self) -> None:
        self.links = [FakeLink(3), FakeLink(1)]
        self.primary = self.links[0]
        self.streams = 2
        self.rtt = 0.012
        self.mode = "direct"


def through_the_wire(result: Any) -> object:
    """What the client gets: the daemon's encoding, decoded."""
    return decode_reply(ok_reply(1, result)).unwrap()


async def connected_daemon(tmp_path: Path) -> Daemon:
    """A daemon whose profile `work` is up, with no ssh and no kernel behind it."""
    (tmp_path / "profiles.yaml").write_text(PROFILES)
    daemon = Daemon(tmp_path, tmp_path, None)
    daemon.captures = CaptureSet(RecordingBackend())
    reload = await daemon.reload()
    assert reload == {"added": ["work"], "removed": [], "changed": [], "unchanged": []}
    tunnel = daemon.tunnel_for("work")
    tunnel.state, tunnel.up_since, tunnel.reconnects = State.UP, time.time() - 65, 1
    tunnel.session = FakeSession()  # type: ignore[assignment]
    plan = tunnel.spec.dns_plan()
    assert plan is not None
    tunnel.resolver = ProfileResolver("work", "shuttled", plan, opener=None)  # type: ignore[arg-type]
    return daemon


def test_daemon_results_type_check_and_render(tmp_path: Path) -> None:
    async def scenario() -> tuple[Daemon, object, object]:
        daemon = await connected_daemon(tmp_path)
        events = daemon.subscribe()
        daemon.on_state("work", State.UP, None)
        reload = through_the_wire(await daemon.reload())
        return daemon, events.get_nowait(), reload

    daemon, event, reload = asyncio.run(scenario())
    status = check(ProfileStatus, through_the_wire(daemon.status("work")), "status")
    every = check(list[ProfileStatus], through_the_wire(daemon.status(None)), "status")
    assert [s["name"] for s in every] == ["work"]
    stats = check(ProfileStats, through_the_wire(daemon.stats("work")), "stats")
    version = check(VersionInfo, through_the_wire(daemon.version()), "version")
    summary = render.reload_summary(check(ReloadResult, reload, "reload"))
    row = connection_row("tcp", ("127.0.0.1", 50000), "10.1.2.3:443", None, 3.5)
    conns = check(list[ConnectionRow], through_the_wire([row]), "connections")

    assert render.status_table([status]).splitlines()[1].split()[:4] == [
        "work",
        "up",
        "alice@bastion",
        "1m05s",
    ]
    assert "subnets: 10.0.0.0/8 (profile), !10.0.5.0/24 (profile)" in render.status_detail(status)
    assert status["dns"] is not None and status["dns"]["mode"] == "split"
    shown = render.stats("work", stats).splitlines()
    assert "  state: up (direct)" in shown and "  stream channels: 3, 1" in shown
    assert "  ssh connection (kernel): 4.0 ms round trip, 2 retransmitted" in shown
    assert stats["streams"] == 2 and stats.get("rules_restored") == 0
    assert render.connections_table(conns).splitlines()[1].split()[:3] == [
        "tcp",
        "127.0.0.1:50000",
        "10.1.2.3:443",
    ]
    assert summary == "configuration reloaded: no changes\nunchanged: work"
    assert render.daemon_version(version).startswith("shuttled ")
    decoded = decode_reply(encode_event(event))  # type: ignore[arg-type]
    assert render.event(check_event(getattr(decoded, "event", None))).endswith(" work: up")


def test_the_counters_mirror_their_dataclasses() -> None:
    # The producers cast vars() of these dataclasses to the TypedDicts.
    for typed, counted in ((DnsCounters, DnsStats), (UdpCounters, UdpStats)):
        fields = {f.name: f.type for f in dataclasses.fields(counted)}
        assert fields == dict.fromkeys(typed.__annotations__, "int")


def test_check_names_the_first_field_that_is_wrong() -> None:
    row = {"proto": "tcp", "src": "a", "dst": "b", "tx": 1, "rx": 2, "age": 1, "state": "open"}
    assert check(ConnectionRow, row, "row") is row  # 1 is a fine number for `age`
    assert check(ConnectionRow, {**row, "new": 1}, "row")  # a newer daemon's extra
    with pytest.raises(ProtocolError, match=r"row has no 'age'"):
        check(ConnectionRow, {k: v for k, v in row.items() if k != "age"}, "row")
    with pytest.raises(ProtocolError, match=r"rows\[0\]\.tx is a boolean, not integer"):
        check(list[ConnectionRow], [{**row, "tx": True}], "rows")
    with pytest.raises(ProtocolError, match=r"row\.proto is a string, not \"tcp\" or \"udp\""):
        check(ConnectionRow, {**row, "proto": "sctp"}, "row")


def test_an_event_of_an_unknown_type_still_gets_through() -> None:
    assert check_event({"type": "future", "x": 1}) == {"type": "future", "x": 1}
    with pytest.raises(ProtocolError):
        check_event({"type": "state", "profile": "work"})


def test_the_readme_lists_the_json_documents_as_the_schema_says() -> None:
    readme = (REPO / "README.md").read_text()
    assert json_reference() in readme, "regenerate it: python3 -m shuttled.control.schema"
