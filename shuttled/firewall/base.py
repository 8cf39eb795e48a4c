"""What a firewall backend captures, as data, and the seam every backend implements.

A profile's capture (subnets, excludes, listener ports, DNS, uid) is turned into
plain `Rule` records once, here; each backend only formats those records for its
tool and applies the result as one kernel transaction.
"""

from __future__ import annotations

import abc
import functools
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from shuttled.const import DNS_PORT, LOCKDOWN_TABLE, NFT_TABLE, RUN_TABLE_PREFIX
from shuttled.errors import ConfigError, FirewallError

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

TOOL_TIMEOUT = 60.0  # seconds; iptables -w may queue behind another xtables user
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_TABLE_RE = re.compile(rf"{re.escape(NFT_TABLE)}(_[A-Za-z0-9_]+)?")
_PORTS_RE = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")
_SHORT_V4_RE = re.compile(r"\d{1,3}(\.\d{1,3}){0,2}")  # "10", "192.168": iproute2 shorthand
_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
# The kernel's dev_valid_name(): under IFNAMSIZ, no "/", ":" or space, not "." or "..";
# narrower still, so that a name is always safe inside nft and iptables arguments.
_IFACE_RE = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.@+-]{1,15}")


# --- subnets ------------------------------------------------------------------


@functools.total_ordering
@dataclass(frozen=True)
class Subnet:
    """Destinations one include/exclude rule matches: a network and maybe a port range.

    Sorting subnets puts the most specific first, which is the order the rules
    must be evaluated in (first match wins); see `order_subnets`.
    """

    network: IPNetwork
    ports: tuple[int, int] | None = None  # inclusive range; None = every port
    exclude: bool = False

    def __post_init__(self) -> None:
        if self.ports is not None:
            first, last = self.ports
            if not 1 <= first <= last <= 65535:
                raise ValueError(f"bad port range {first}-{last} for {self.network}")

    @property
    def family(self) -> int:
        return self.network.version

    def _specificity(self) -> tuple[int, int, bool, int, int, tuple[int, int]]:
        # sshuttle's subnet_weight: narrower port range, then longer prefix, then
        # excludes before includes; the rest only makes the order total.
        first, last = self.ports or (0, 65535)
        return (
            last - first,
            -self.network.prefixlen,
            not self.exclude,
            self.family,
            int(self.network.network_address),
            self.ports or (0, 0),
        )

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Subnet):
            return NotImplemented
        return self._specificity() < other._specificity()


def order_subnets(subnets: Iterable[Subnet]) -> list[Subnet]:
    """Most specific first: the order in which first-match rules give each subnet its say."""
    return sorted(subnets)


def parse_subnet(text: str, *, exclude: bool = False, resolve: bool = True) -> list[Subnet]:
    """Parse sshuttle's subnet syntax into one Subnet per network.

    "10.0.0.0/8", "10.1.2.3", "10/8" (= 10.0.0.0/8), "0/0" (= 0.0.0.0/0 AND ::/0,
    so "everything" never leaks IPv6), "fd00::/8", "10.0.0.0/8:80",
    "10.0.0.0/8:8000-9000", "[fd00::/8]:443", "host.example:22". A host name
    becomes one /32 or /128 per address; with resolve=False it is only checked
    for syntax and yields nothing (resolve again when the capture is built).
    """
    host, port_text = _split_ports(text)
    ports = None if port_text is None else _parse_ports(text, port_text)
    return [Subnet(net, ports, exclude) for net in _parse_host(text, host, resolve)]


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"subnet {text!r}: {why}")


def _split_ports(text: str) -> tuple[str, str | None]:
    if not text.strip():
        raise _bad(text, "empty")
    if text.startswith("["):
        m = re.fullmatch(r"\[([^\[\]]+)\](?::(.*))?", text)
        if not m:
            raise _bad(text, "expected [address]:ports")
        return m[1], m[2]
    if text.count(":") > 1:  # bare IPv6: ports need the [address]:ports form
        return text, None
    host, sep, ports = text.partition(":")
    return host, (ports if sep else None)


def _parse_ports(text: str, ports: str) -> tuple[int, int]:
    m = _PORTS_RE.fullmatch(ports)
    if not m:
        raise _bad(text, f"bad port {ports!r} (expected PORT or FIRST-LAST)")
    first = int(m[1])
    last = int(m[2] or m[1])
    if not 1 <= first <= 65535 or not 1 <= last <= 65535:
        raise _bad(text, "ports must be within 1-65535")
    if first > last:
        raise _bad(text, f"port range {first}-{last} is reversed")
    return first, last


def _parse_host(text: str, host: str, resolve: bool) -> list[IPNetwork]:
    if host == "0/0":  # sshuttle's "everything": here it means both families (#45)
        return [ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0")]
    addr, slash, prefix = host.partition("/")
    if slash and _SHORT_V4_RE.fullmatch(addr):
        addr = ".".join([*addr.split("."), "0", "0", "0"][:4])
    try:
        return [ipaddress.ip_network(f"{addr}/{prefix}" if slash else addr, strict=False)]
    except ValueError as e:
        if ":" in addr or re.fullmatch(r"[\d.]+", addr):  # meant as an address
            raise _bad(text, str(e)) from None
    if slash:
        raise _bad(text, "a host name takes no /prefix")
    _check_hostname(text, addr)
    return _resolve(text, addr) if resolve else []


def _check_hostname(text: str, name: str) -> None:
    labels = name.removesuffix(".").split(".")
    if len(name) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
        raise _bad(text, "not an IP address, network or host name")


def _resolve(text: str, name: str) -> list[IPNetwork]:
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise _bad(text, f"cannot resolve {name!r}: {getattr(e, 'strerror', e)}") from None
    addrs = {str(info[4][0]).partition("%")[0] for info in infos}  # drop any %scope
    nets = [ipaddress.ip_network(a) for a in addrs]
    return sorted(nets, key=lambda n: (n.version, int(n.network_address)))


# --- captures -------------------------------------------------------------------


@dataclass(frozen=True)
class LanMatch:
    """Router mode: which arriving traffic is "from the LAN" (any one of these matches)."""

    interfaces: tuple[str, ...] = ()
    sources: tuple[IPNetwork, ...] = ()
    every_interface: bool = False  # every interface but lo

    def __post_init__(self) -> None:
        bad = [i for i in self.interfaces if not _IFACE_RE.fullmatch(i)]
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
    # Router mode and UDP, all by TPROXY (shuttled.firewall.router): listeners
    # with IP_TRANSPARENT, and the policy routing of shuttled.firewall.policy.
    lan: LanMatch | None = None  # also capture traffic arriving from the LAN
    udp_port: int | None = None  # transparent UDP listener; None: UDP is not captured
    lan_dns_port: int | None = None  # DNS from the LAN (udp and tcp), transparent
    lan_dns_all: bool = False  # all port-53 traffic from the LAN, not only to this host
    hold: bool = False  # kill switch holding: reject what this capture would carry
    # The lockdown table's form of a held capture (shuttled.firewall.lockdown): it only
    # refuses, after our redirect, so nothing goes to a listener and no TPROXY is used.
    lockdown: bool = False

    def __post_init__(self) -> None:
        for what, port in (("udp_port", self.udp_port), ("lan_dns_port", self.lan_dns_port)):
            if port is not None and not 1 <= port <= 65535:
                raise ConfigError(f"profile {self.name}: {what} {port} is not within 1-65535")
        if not _NAME_RE.fullmatch(self.name):
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


def tool_path() -> str:
    """PATH plus the sbin directories: systemd units and sudo may leave those out."""
    return os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/local/sbin:/usr/sbin:/sbin"


def which_tool(tool: str) -> bool:
    """The tool is installed (says nothing about whether the kernel takes its rules)."""
    return shutil.which(tool, path=tool_path()) is not None


def run_tool(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run a firewall tool; its stdout, or FirewallError with its stderr on one line."""
    log.debug("running %s%s", " ".join(argv), f" with input:\n{stdin}" if stdin else "")
    env = {**os.environ, "LC_ALL": "C", "PATH": tool_path()}
    try:
        proc = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FirewallError(f"{argv[0]}: {e}") from None
    if proc.returncode != 0:
        raise FirewallError(f"{argv[0]} failed: {one_line(proc.stderr or proc.stdout)}")
    return proc.stdout


def one_line(text: str, limit: int = 400) -> str:
    """A tool's error output on one line, without nft's ^^^ markers or usage hints."""
    lines = [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip().strip("^~") and not ln.startswith("Try `")
    ]
    summary = " | ".join(lines) or "no error output"
    return summary if len(summary) <= limit else summary[: limit - 3] + "..."


def is_cleanup_target(table: str, *, live: bool = False, lockdown: bool = False) -> bool:
    """The daemon's table, or a one-shot run's table whose process is gone (`live`:
    running or not); the kill switch's lockdown table only with `lockdown`."""
    if table == NFT_TABLE:
        return True
    if table == LOCKDOWN_TABLE:
        return lockdown
    pid = table.removeprefix(RUN_TABLE_PREFIX)
    return table.startswith(RUN_TABLE_PREFIX) and pid.isdigit() and (live or not _alive(int(pid)))


def _alive(pid: int) -> bool:
    # A reused pid keeps a stale run table until that process ends too: rare,
    # and the rules only redirect to a dead port (fail closed), never leak.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, it just isn't ours to signal
    return True
