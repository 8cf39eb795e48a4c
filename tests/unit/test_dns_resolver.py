"""A profile's resolver on the firewall path: what it asks the firewall to catch, and the
names it answers itself (the remote's hosts, the ssh server's pinned name)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from shuttled.const import DNS_BYPASS_MARK
from shuttled.dns import resolver, wire
from shuttled.dns.resolver import DnsPlan, ProfileResolver
from tests.helpers import run_async
from tests.unit.dns_fakes import BODY_TIMEOUT, direct, make_query

SERVER = {"bastion.example.com": (ipaddress.ip_address("198.51.100.7"),)}


@pytest.fixture(autouse=True)
def no_resolved(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 10.9.3.53\nnameserver fd00::53\n")
    monkeypatch.setattr(resolver, "RESOLV_CONF", conf)


async def nameservers() -> list[str]:
    return ["10.0.0.53"]


async def started(plan: DnsPlan, **refresh: Any) -> tuple[ProfileResolver, Any]:
    profile = ProfileResolver("work", "shuttled", plan, direct)
    await profile.refresh(refresh.get("networks", []), refresh.get("hosts"), refresh.get("pinned"))
    return profile, await profile.start(nameservers)


def test_mode_all_catches_every_resolver_without_a_bypass() -> None:
    async def main() -> None:
        profile, capture = await started(DnsPlan("all", listen=("127.0.0.1",)))
        assert capture.every_server and capture.bypass_mark is None and capture.port
        assert profile.status() == {
            "mode": "all",
            "path": "firewall",
            "domains": ["."],
            "resolvers": ["10.9.3.53", "fd00::53"],
            "nameservers": [
                {"address": "10.0.0.53", "transport": "untried", "health": "untried", "error": None}
            ],
        }
        await profile.close()

    run_async(main(), BODY_TIMEOUT)


def test_split_without_resolved_catches_resolv_conf_and_marks_its_own_queries() -> None:
    async def main() -> None:
        profile, capture = await started(
            DnsPlan("split", ("corp.example",), listen=("127.0.0.1",)),
            networks=[ipaddress.ip_network("10.1.0.0/16")],
        )
        assert not capture.every_server and capture.bypass_mark == DNS_BYPASS_MARK
        assert [str(a) for a in capture.servers] == ["10.9.3.53", "fd00::53"]
        assert profile.status()["domains"] == ["corp.example", "1.10.in-addr.arpa"]
        await profile.close()

    run_async(main(), BODY_TIMEOUT)


def test_the_ssh_servers_name_is_answered_when_the_tunnel_would_take_it() -> None:
    async def main() -> tuple[bytes, bytes | None]:
        everything, _ = await started(DnsPlan("all", listen=("127.0.0.1",)), pinned=SERVER)
        split, _ = await started(
            DnsPlan("split", ("corp.example",), listen=("127.0.0.1",)), pinned=SERVER
        )
        assert everything.forwarder is not None and split.forwarder is not None
        query = make_query("bastion.example.com")
        pinned = await everything.forwarder.resolve(query)
        # Not the tunnel's name in split mode: the local resolvers answer it, not us.
        local = split.forwarder.hosts
        await everything.close()
        await split.close()
        return pinned, local.answer(query, wire.read_questions(query)[0]) if local else None

    pinned, local = run_async(main(), BODY_TIMEOUT)
    assert pinned.endswith(bytes([198, 51, 100, 7])) and local is None
