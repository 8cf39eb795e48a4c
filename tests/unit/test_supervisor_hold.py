"""The kill switch across a reload that changes a profile: the old tunnel hands its held
capture to the new one, and no transaction in between lets the subnets out."""

from __future__ import annotations

import asyncio
import ipaddress

from shuttled.firewall.base import Capture
from shuttled.net import Subnet
from shuttled.router import RouterSettings
from shuttled.supervisor import CaptureSet, Tunnel, TunnelSpec
from shuttled.tunnel.ssh import SshTarget
from tests.helpers import RecordingBackend


def spec(subnet: str, kill_switch: bool = True) -> TunnelSpec:
    return TunnelSpec(
        name="work",
        target=SshTarget("srv"),
        subnets=(Subnet(ipaddress.ip_network(subnet)),),
        router=RouterSettings(kill_switch=kill_switch),
    )


async def held(tunnel: Tunnel) -> None:
    """As a connect attempt holds: listener up, ssh -G answered (nothing to exclude)."""
    await tunnel.proxy.start(0)
    tunnel.hold(excludes=())


def test_a_changed_profile_stays_held_until_its_successor_holds() -> None:
    async def scenario() -> tuple[list[list[Capture]], Capture]:
        captures = CaptureSet(RecordingBackend())
        old = Tunnel(spec("10.1.0.0/16"), captures)
        await held(old)
        await old.down(keep_hold=True)
        new = Tunnel(spec("10.2.0.0/16"), captures)
        await held(new)
        assert isinstance(captures.backend, RecordingBackend)
        applied, final = list(captures.backend.applied), captures.captures["work"]
        await new.down()
        return applied, final

    applied, final = asyncio.run(scenario())
    assert all(any(c.name == "work" and c.hold for c in step) for step in applied), applied
    assert final.hold and [str(s.network) for s in final.subnets] == ["10.2.0.0/16"]


def test_without_keep_hold_down_lifts_the_kill_switch() -> None:
    async def scenario() -> dict[str, Capture]:
        captures = CaptureSet(RecordingBackend())
        tunnel = Tunnel(spec("10.1.0.0/16"), captures)
        await held(tunnel)
        await tunnel.down()
        return captures.captures

    assert asyncio.run(scenario()) == {}


def test_keep_hold_is_ignored_without_a_kill_switch() -> None:
    async def scenario() -> dict[str, Capture]:
        captures = CaptureSet(RecordingBackend())
        tunnel = Tunnel(spec("10.1.0.0/16", kill_switch=False), captures)
        captures.put(Capture(name="work", subnets=tunnel.spec.subnets, tcp_port=1))
        await tunnel.down(keep_hold=True)
        return captures.captures

    assert asyncio.run(scenario()) == {}
