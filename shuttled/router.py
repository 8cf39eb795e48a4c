"""A tunnel's router-mode side: UDP, DNS for LAN hosts, the kill switch's settings.

The supervisor's Tunnel owns one RouterSide. Its listeners live as long as
the tunnel is wanted (like the TCP proxy), so a reconnect changes nothing the
firewall points at; `decorate` adds their ports and the LAN match to the
profile's Capture, and shuttled.firewall.tproxy turns that into rules.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from shuttled import const
from shuttled.control.schema import ConnectionRow, RouterStats, UdpCounters
from shuttled.dns.lan import LanDns
from shuttled.dns.listeners import Resolver
from shuttled.errors import ConfigError, UsageError
from shuttled.firewall.base import Capture, LanMatch
from shuttled.net import is_address, parse_subnet
from shuttled.tunnel.channels import ChannelMux
from shuttled.tunnel.faults import Faults
from shuttled.tunnel.udp import UdpProxy

if TYPE_CHECKING:
    from shuttled.config import Profile

log = logging.getLogger(__name__)

# Where the TPROXY rules deliver (shuttled.firewall.tproxy.LISTEN).
TPROXY_LISTEN = ("127.0.0.1", "::1")
FORWARDING_SYSCTLS = (
    ("net.ipv4.ip_forward", Path("/proc/sys/net/ipv4/ip_forward")),
    ("net.ipv6.conf.all.forwarding", Path("/proc/sys/net/ipv6/conf/all/forwarding")),
)


@dataclasses.dataclass(frozen=True)
class RouterSettings:
    """Router mode, UDP and kill switch settings of one tunnel (profile or `run` flags)."""

    lan: LanMatch | None = None  # capture traffic arriving from these interfaces/sources
    udp: bool = False  # carry UDP to the subnets (through the remote helper)
    udp_flows: int = const.UDP_MAX_FLOWS
    udp_idle: float = const.UDP_IDLE
    lan_dns_all: bool = False  # all port-53 traffic from the LAN, not only to this host
    kill_switch: bool = False  # while not up: reject traffic to the subnets


def _linux_only(settings: RouterSettings) -> RouterSettings:
    """Router mode and UDP are TPROXY and policy routing: Linux's, nowhere else."""
    if sys.platform != "linux" and (settings.lan or settings.udp or settings.kill_switch):
        raise UsageError("router mode (lan), udp and kill_switch need Linux")
    return settings


def forwarding_problems() -> list[str]:
    """What a router needs but does not have: IP forwarding off, said plainly."""
    problems = []
    for name, path in FORWARDING_SYSCTLS:
        try:
            value = path.read_text().strip()
        except OSError:
            continue  # no IPv6 in this kernel: nothing to forward there
        if value == "0":
            problems.append(
                f"{name} is 0: LAN hosts reach the tunnel's subnets through "
                f"this host but nothing else; set {name}=1 "
                f"(sysctl -w {name}=1, and in /etc/sysctl.d/)"
            )
    return problems


class RouterSide:
    """The UDP proxy and the LAN DNS front of one tunnel, and their counters."""

    def __init__(
        self,
        name: str,
        settings: RouterSettings,
        udp_mux: Callable[[], Awaitable[ChannelMux]],
        fault_log: Faults | None = None,
    ) -> None:
        self.name = name
        self.faults = fault_log if fault_log is not None else Faults()
        self.settings = settings
        self._udp_mux = udp_mux
        self.udp: UdpProxy | None = None
        self.lan_dns: LanDns | None = None
        self.health: list[str] = []

    async def start(self) -> None:
        """Listen for UDP (raises OSError); check what router mode needs from the host."""
        if self.settings.lan is not None:
            self.health = forwarding_problems()
            for problem in self.health:
                log.warning("router mode: %s", problem)
        if self.settings.udp and self.udp is None:
            self.udp = UdpProxy(
                self._udp_mux,
                self.faults,
                addresses=TPROXY_LISTEN,
                max_flows=self.settings.udp_flows,
                idle=self.settings.udp_idle,
            )
            await self.udp.start()

    async def decorate(self, capture: Capture, resolver: Resolver | None) -> Capture:
        """The capture with router mode's parts; starts the LAN DNS front when needed."""
        if self.settings.lan is not None and resolver is not None and self.lan_dns is None:
            self.lan_dns = LanDns(resolver, TPROXY_LISTEN, self.faults)
            await self.lan_dns.start()
        return self.fields(capture)

    def fields(self, capture: Capture) -> Capture:
        return dataclasses.replace(
            capture,
            lan=self.settings.lan,
            udp_port=self.udp.port if self.udp is not None else None,
            lan_dns_port=self.lan_dns.port if self.lan_dns is not None else None,
            lan_dns_all=self.settings.lan_dns_all,
        )

    def session_lost(self) -> None:
        """The flows' channels died with the session: forget them now."""
        if self.udp is not None:
            self.udp.close_flows()

    def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
            self.udp = None
        if self.lan_dns is not None:
            self.lan_dns.close()
            self.lan_dns = None

    def flows(self) -> list[ConnectionRow]:
        """The UDP flows as `connections` rows."""
        return self.udp.describe() if self.udp is not None else []

    def stats(self) -> RouterStats:
        out: RouterStats = {}
        if self.udp is not None:
            # UdpCounters is UdpStats field for field (a unit test pins it).
            out["udp"] = cast(UdpCounters, vars(self.udp.stats).copy())
        if self.lan_dns is not None:
            out["lan_dns"] = {"queries": self.lan_dns.queries, "dropped": self.lan_dns.dropped}
        return out


# --- `shuttled run` flags -----------------------------------------------------------


def add_run_arguments(p: argparse._ActionsContainer) -> None:
    """Router mode, UDP and kill switch flags of `shuttled run`."""
    p.add_argument(
        "--lan",
        action="append",
        default=[],
        metavar="IFACE|SUBNET",
        help="router mode: also capture traffic arriving on this interface or from "
        "this source subnet (repeatable); implies --udp",
    )
    p.add_argument(
        "--udp",
        action="store_true",
        help="carry UDP to the subnets too (through the remote helper)",
    )
    p.add_argument("--no-udp", action="store_true", help="with --lan: TCP and DNS only")
    p.add_argument(
        "--lan-dns",
        choices=("box", "all"),
        default="box",
        help="with --lan and --dns: answer DNS the LAN sends to this host (box, "
        "the default) or all port-53 traffic from the LAN (all)",
    )
    p.add_argument(
        "--udp-flows",
        type=int,
        default=const.UDP_MAX_FLOWS,
        metavar="N",
        help=f"most UDP flows at once (default {const.UDP_MAX_FLOWS}); "
        "beyond it new flows are refused and counted",
    )
    p.add_argument(
        "--udp-idle",
        type=float,
        default=const.UDP_IDLE,
        metavar="SECONDS",
        help=f"a UDP flow ends after this long without traffic (default {const.UDP_IDLE:g})",
    )
    p.add_argument(
        "--kill-switch",
        action="store_true",
        help="until the tunnel is up, reject traffic to the subnets instead of "
        "letting it out directly",
    )


def lan_match(items: Sequence[str]) -> LanMatch | None:
    """`--lan` values (or a profile's list): interface names and source subnets."""
    if not items:
        return None
    interfaces, sources = [], []
    for item in items:
        if "/" in item or is_address(item):
            try:
                sources.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise UsageError(f"--lan: {item!r} is not a subnet") from None
        else:
            interfaces.append(item)
    try:
        return LanMatch(tuple(interfaces), tuple(sources))
    except ConfigError as exc:
        raise UsageError(f"--lan: {exc}") from None


def settings_from_args(args: argparse.Namespace) -> RouterSettings:
    lan = lan_match(args.lan)
    if not 1 <= args.udp_flows <= 1_000_000:
        raise UsageError("--udp-flows: expected 1 to 1000000")
    if not 1.0 <= args.udp_idle <= 3600.0:
        raise UsageError("--udp-idle: expected 1 to 3600 seconds")
    return _linux_only(
        RouterSettings(
            lan=lan,
            udp=args.udp or (lan is not None and not args.no_udp),
            udp_flows=args.udp_flows,
            udp_idle=args.udp_idle,
            lan_dns_all=args.lan_dns == "all",
            kill_switch=args.kill_switch,
        )
    )


def settings_from_profile(profile: Profile) -> RouterSettings:
    """A daemon profile's router-mode keys (lan, udp, udp_flows, udp_idle, lan_dns,
    kill_switch) as RouterSettings."""
    lan = profile.lan
    match = None
    if lan.enabled:
        sources = tuple(
            s.network for text in lan.sources for s in parse_subnet(text, resolve=False)
        )
        match = LanMatch(lan.interfaces, sources, every_interface=lan.all_interfaces)
    udp = profile.udp if profile.udp is not None else match is not None
    return _linux_only(
        RouterSettings(
            lan=match,
            udp=udp,
            udp_flows=profile.udp_flows,
            udp_idle=profile.udp_idle,
            lan_dns_all=profile.lan_dns == "all",
            kill_switch=profile.kill_switch,
        )
    )
