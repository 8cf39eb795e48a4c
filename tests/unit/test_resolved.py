"""The systemd-resolved path: link names and ownership, and the D-Bus calls it makes
(against a recorder that owns org.freedesktop.resolve1 on a private bus)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
from typing import Any

import pytest

from shuttled import const
from shuttled.dns import resolved
from shuttled.dns.resolved import DnsLink, Resolved, ResolvedError, link_name, stale_link_names
from tests.unit.resolve1_recorder import Resolve1Recorder, private_bus, serve_recorder

LINK = DnsLink("shuttled-work", 7, ipaddress.IPv4Address("169.254.53.9"))


def test_link_names_fit_ifnamsiz_and_tell_owners_apart() -> None:
    assert link_name("work", "shuttled") == "shuttled-work"
    long = link_name("a-very-long-profile-name", "shuttled")
    run = link_name("work", "shuttled_run_4242")
    for name in (long, run):
        assert len(name) <= 15 and name.startswith(const.DNS_LINK_PREFIX)
    assert run != "shuttled-work" and run != link_name("work", "shuttled_run_4243")


def test_stale_links_are_ours_whose_owner_is_gone() -> None:
    dead = "shuttled_run_999999999"
    alive = f"shuttled_run_{os.getpid()}"
    links = [
        {"ifname": "lo"},
        {"ifname": "shuttled-work", "ifalias": "shuttled shuttled work"},
        {"ifname": "shuttled-ru1234", "ifalias": f"shuttled {dead} run"},
        {"ifname": "shuttled-ru5678", "ifalias": f"shuttled {alive} run"},
        {"ifname": "shuttled-x"},  # ours by name, no alias: the daemon's
        {"ifname": "eth0", "ifalias": "shuttled shuttled work"},
        "junk",
    ]
    assert stale_link_names(links) == ["shuttled-work", "shuttled-ru1234", "shuttled-x"]
    assert stale_link_names({"not": "a list"}) == []


def test_free_address_skips_addresses_in_use() -> None:
    listed: list[dict[str, Any]] = [
        {"addr_info": [{"local": str(a)}]}
        for a in ipaddress.IPv4Network(const.DNS_LINK_NET).hosts()
    ][:-1]
    assert resolved._free_address(listed, "shuttled-x") == ipaddress.IPv4Address("169.254.53.254")
    with pytest.raises(ResolvedError):
        resolved._free_address([*listed, {"addr_info": [{"local": "169.254.53.254"}]}], "x")


@pytest.fixture
def bus_address(monkeypatch: pytest.MonkeyPatch) -> Any:
    if shutil.which("dbus-daemon") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dbus-daemon is missing in CI")
        pytest.skip("dbus-daemon is not installed")
    with private_bus() as address:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
        yield address


def test_configure_and_revert_make_exactly_these_calls(bus_address: str) -> None:
    async def main() -> list[tuple[str, list[Any]]]:
        recorder = Resolve1Recorder(no_such_link=2)  # resolved has not seen the link yet, twice
        service = await serve_recorder(bus_address, recorder)
        client = await Resolved.connect()
        assert client is not None
        await client.configure(LINK, ["corp.example", "2.1.10.in-addr.arpa"])
        await client.set_domains(LINK, ["other.example"])
        await client.revert(LINK)
        client.close()
        service.disconnect()
        return recorder.calls

    calls = asyncio.run(asyncio.wait_for(main(), 30))
    assert calls == [
        ("SetLinkDNS", [7, [[2, bytes([169, 254, 53, 9])]]]),
        ("SetLinkDomains", [7, [["corp.example", True], ["2.1.10.in-addr.arpa", True]]]),
        ("SetLinkDefaultRoute", [7, False]),
        ("SetLinkDomains", [7, [["other.example", True]]]),
        ("RevertLink", [7]),
    ]


def test_no_resolved_on_the_bus_means_the_firewall_path(bus_address: str) -> None:
    assert asyncio.run(asyncio.wait_for(Resolved.connect(), 30)) is None


def test_no_bus_at_all_means_the_firewall_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
    assert asyncio.run(asyncio.wait_for(Resolved.connect(), 30)) is None


def test_resolved_in_another_network_namespace_is_not_used(
    bus_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolved, "_same_netns", lambda pid: False)

    async def main() -> Resolved | None:
        service = await serve_recorder(bus_address, Resolve1Recorder())
        client = await Resolved.connect()
        service.disconnect()
        return client

    assert asyncio.run(asyncio.wait_for(main(), 30)) is None


def test_a_refused_call_is_an_error(bus_address: str) -> None:
    async def main() -> None:
        service = await serve_recorder(bus_address, Resolve1Recorder(no_such_link=1000))
        client = await Resolved.connect()
        assert client is not None
        try:
            with pytest.raises(ResolvedError, match="NoSuchLink"):
                await client.configure(LINK, ["corp.example"])
        finally:
            client.close()
            service.disconnect()

    asyncio.run(asyncio.wait_for(main(), 30))
