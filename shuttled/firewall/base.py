"""What a firewall backend captures, as data, and the seam every backend implements.

A profile's capture (subnets, excludes, listener ports, DNS, uid) is turned into
plain `Rule` records once, here; each backend only formats those records for its
tool and applies the result as one kernel transaction.
"""

from __future__ import annotations

import abc
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from shuttled.const import DNS_PORT, NFT_TABLE
from shuttled.errors import ConfigError
from shuttled.net import (
    IPAddress,
    IPNetwork,
    Subnet,
    order_subnets,
    valid_interface_name,
    valid_profile_name,
    which_tool,
)

log = logging.getLogger(__name__)


_TABLE_RE = re.compile(rf"{re.escape(NFT_TABLE)}(_[A-Za-z0-9_]+)?")


# --- captures -------------------------------------------------------------------


@dataclass(frozen=True)
class LanMatch:
    """Router mode: which arriving traffic is "from the LAN" (any one of these matches)."""

    interfaces: tuple[str, ...] = ()
    sources: tuple[IPNetwork, ...] = ()
    every_interface: bool = False  # every interface but lo

    def __post_init__(self) -> None:
        bad = [i for i in self.interfaces if not valid_interface_name(i)]
        if bad:
            raise ConfigError(f"interface name {bad[0]!r} is not valid")


@dataclass(frozen=True)
class Capture:
    """What one profile captures: its destinations, its listeners, whose traffic."""

    name: str  # profile name; part of chain names, hence the strict alphabet
    subnets: tuple[Subnet, ...]  # includes and excludes together
    tcp_port: int  # transparent listener on 127.0.0.1 and ::1
    dns_port: int | None = None  # DNS listener (udp and tcp), or None
    dns_servers: tuple[IPAddress, ...] = ()  # resolvers whose port-53 traffic goes to dns_port
    uid: int | None = None  # only sockets of this uid; None = everyone
    dns_all: bool = False  # port-53 traffic to ANY address goes to dns_port (dns mode all)
    # Packets with this SO_MARK (our own queries to the original resolvers) are
    # never captured by this chain: its first rule returns for them.
    bypass_mark: int | None = None
    # Router mode and UDP, all by TPROXY (shuttled.firewall.tproxy): listeners
    # with IP_TRANSPARENT, and the policy routing of shuttled.firewall.policy.
    lan: LanMatch | None = None  # also capture traffic arriving from the LAN
    udp_port: int | None = None  # transparent UDP listener; None: UDP is not captured
    lan_dns_port: int | None = None  # DNS from the LAN (udp and tcp), transparent
    lan_dns_all: bool = False  # all port-53 traffic from the LAN, not only to this host
    hold: bool = False  # kill switch holding: reject what this capture would carry
    # The lockdown table's form of a held capture (shuttled.firewall.lockdown): it only
    # refuses, after our redirect, so nothing goes to a listener and no TPROXY is used.
    lockdown: bool = False
    # True connect(): the first SYN of each connection to the redirected subnets goes
    # to this NFQUEUE (with bypass) and waits there for the remote's answer; a SYN
    # that comes back with a const.CONNECT_MARK_* mark is answered by a reject rule.
    # None: connect() succeeds locally at once (ConnectMode.FAST, or held).
    syn_queue: int | None = None

    def __post_init__(self) -> None:
        for what, port in (("udp_port", self.udp_port), ("lan_dns_port", self.lan_dns_port)):
            if port is not None and not 1 <= port <= 65535:
                raise ConfigError(f"profile {self.name}: {what} {port} is not within 1-65535")
        if not valid_profile_name(self.name):
            raise ConfigError(f"profile name {self.name!r}: must match [A-Za-z0-9_-]{{1,32}}")
        for what, port in (("tcp_port", self.tcp_port), ("dns_port", self.dns_port)):
            if port is not None and not 1 <= port <= 65535:
                raise ConfigError(f"profile {self.name}: {what} {port} is not within 1-65535")
        # Held with no listener yet (the first connect): that DNS is refused instead.
        if (self.dns_servers or self.dns_all) and self.dns_port is None and not self.hold:
            raise ConfigError(f"profile {self.name}: DNS capture given without a dns_port")
        if self.bypass_mark is not None and not 0 < self.bypass_mark <= 0xFFFFFFFF:
            raise ConfigError(f"profile {self.name}: mark {self.bypass_mark} is not 32 bits")
        if self.uid is not None and self.uid < 0:
            raise ConfigError(f"profile {self.name}: uid {self.uid} is negative")


@dataclass(frozen=True)
class Rule:
    """One line of a capture chain: destination match -> return or redirect."""

    family: int  # 4 or 6
    daddrs: tuple[IPNetwork, ...]  # matches when the destination is in any of them
    verdict: Literal["return", "redirect"]
    to_port: int = 0  # local port for "redirect"
    protos: tuple[str, ...] = ("tcp",)
    ports: tuple[int, int] | None = None  # destination port range; None = any


@dataclass(frozen=True)
class CaptureRules:
    """A capture chain's body in evaluation order, backend-neutral.

    Backends emit: "return if the packet carries bypass_mark" (when set), dns,
    then (only when subnets follow) "return if the destination is one of this
    host's own addresses", then subnets. DNS goes first because its resolver is
    often local itself (127.0.0.53, systemd-resolved); the mark goes before it
    because our own queries to that resolver must get past the DNS rule.
    """

    dns: tuple[Rule, ...]
    subnets: tuple[Rule, ...]
    bypass_mark: int | None = None
    # DNS the capture catches while it has no listener for it yet (held at the first
    # connect): nothing redirects it; the kill switch's hold chain refuses it.
    refused_dns: tuple[Rule, ...] = ()

    def family(self, family: int) -> CaptureRules:
        def of(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
            return tuple(r for r in rules if r.family == family)

        return CaptureRules(of(self.dns), of(self.subnets), self.bypass_mark, of(self.refused_dns))


def capture_rules(capture: Capture) -> CaptureRules:
    """Build a capture's rules as data; IPv4 before IPv6, each most-specific-first."""
    dns = tuple(_dns_rule(capture, fam) for fam in (4, 6) if _servers(capture, fam))
    subnets = tuple(rule for fam in (4, 6) for rule in _subnet_rules(capture, fam))
    if capture.dns_port is None:
        return CaptureRules((), subnets, capture.bypass_mark, refused_dns=dns)
    return CaptureRules(dns, subnets, capture.bypass_mark)


_ANY: dict[int, IPNetwork] = {
    4: ipaddress.IPv4Network("0.0.0.0/0"),
    6: ipaddress.IPv6Network("::/0"),
}


def _servers(capture: Capture, family: int) -> tuple[IPNetwork, ...]:
    if capture.dns_all:  # every resolver, so an app with its own cannot leak (mode all)
        return (_ANY[family],)
    addrs = sorted({a for a in capture.dns_servers if a.version == family})
    return tuple(ipaddress.ip_network(a) for a in addrs)


def _dns_rule(capture: Capture, family: int) -> Rule:
    # No port only while held before the listener exists: then it is refused_dns.
    return Rule(
        family,
        _servers(capture, family),
        "redirect",
        capture.dns_port or 0,
        protos=("tcp", "udp"),
        ports=(DNS_PORT, DNS_PORT),
    )


def _subnet_rules(capture: Capture, family: int) -> list[Rule]:
    """Consecutive subnets with the same verdict and ports share one rule.

    Merging neighbours in first-match order never changes which rule decides a
    packet, and gives nft one set lookup instead of a rule per network.
    """
    rules: list[Rule] = []
    for subnet in order_subnets(s for s in capture.subnets if s.family == family):
        verdict: Literal["return", "redirect"] = "return" if subnet.exclude else "redirect"
        to_port = 0 if subnet.exclude else capture.tcp_port
        last = rules[-1] if rules else None
        if last and (last.verdict, last.ports) == (verdict, subnet.ports):
            rules[-1] = Rule(
                family, _merge(last.daddrs, subnet.network), verdict, to_port, ports=subnet.ports
            )
        else:
            rules.append(Rule(family, (subnet.network,), verdict, to_port, ports=subnet.ports))
    return rules


def _merge(daddrs: tuple[IPNetwork, ...], net: IPNetwork) -> tuple[IPNetwork, ...]:
    # Subnets arrive narrowest first, so a later one may cover earlier ones: keep
    # only the covering network (older nft rejects overlapping set elements).
    # Sorted by address, as nft lists set elements.
    kept = [d for d in daddrs if not (d.prefixlen >= net.prefixlen and d.network_address in net)]
    return tuple(sorted([*kept, net], key=lambda n: int(n.network_address)))


# --- backends -------------------------------------------------------------------


def check_captures(captures: Sequence[Capture]) -> None:
    """Profile names become chain names: two captures may not share one."""
    names = [c.name for c in captures]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"capture name {dup[0]!r} used twice")


class Backend(abc.ABC):
    """One firewall tool. An instance owns one table (nft) or chain family (iptables)."""

    name: ClassVar[str]
    tools: ClassVar[tuple[str, ...]]  # binaries this backend runs

    def __init__(self, table: str = NFT_TABLE, *, persistent: bool = False) -> None:
        if not is_instance_table(table):
            raise ValueError(f"table name {table!r} must be {NFT_TABLE} or {NFT_TABLE}_<word>")
        self.table = table
        # A persistent instance (the daemon's) keeps its empty table or top chain
        # while it runs, so "our table exists" means "the daemon holds the firewall";
        # only remove() takes it away.
        self.persistent = persistent

    @classmethod
    def present(cls) -> bool:
        """The tool's binaries are installed (says nothing about the kernel)."""
        return all(which_tool(tool) for tool in cls.tools)

    @classmethod
    @abc.abstractmethod
    def unsupported_reason(cls) -> str | None:
        """None when usable here; else one line saying why not."""

    @classmethod
    @abc.abstractmethod
    def instances(cls) -> list[str]:
        """Table names of every shuttled instance with rules in this backend now."""

    @abc.abstractmethod
    def render(self, captures: Sequence[Capture]) -> str:
        """The transaction text that installs exactly these captures (pure)."""

    @abc.abstractmethod
    def apply(self, captures: Sequence[Capture]) -> None:
        """Atomically make our rules exactly these captures; on error keep the old ones."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Remove everything this instance owns; idempotent."""

    def snapshot(self) -> str:
        """Our own rules as the kernel lists them now ("" when there are none)."""
        return ""

    @classmethod
    def syn_queue_unsupported(cls) -> str | None:
        """None when this backend can hold SYNs in an NFQUEUE here (true connect());
        else one line saying why not, for `status`."""
        return f"the {cls.name} backend cannot queue packets"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.table!r})"


def is_instance_table(name: str) -> bool:
    """A table name one of our instances may use: NFT_TABLE or NFT_TABLE_<word>."""
    return len(name) <= 64 and _TABLE_RE.fullmatch(name) is not None


def port_range(ports: tuple[int, int], sep: str) -> str:
    """A port range in the tool's spelling: "80" for one port, else FIRST<sep>LAST."""
    first, last = ports
    return str(first) if first == last else f"{first}{sep}{last}"


def address_set(nets: Sequence[IPNetwork]) -> str:
    """Destinations as nft and pf spell them: one, or "{ a, b }"; a host without /32, /128."""
    items = [str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n) for n in nets]
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"
