"""Router mode, UDP and the kill switch as firewall data: TPROXY, marks and rejects.

Local TCP keeps the nat `redirect` of the capture chains. Everything else
here is TPROXY, for three reasons that matter on a router:

- nothing is rewritten: the listener stays on 127.0.0.1/::1 (a LAN host can
  never connect to it directly, and no LAN address has to be tracked as DHCP
  or hotplug change it), the accepted socket's own address is the original
  destination, and IPv6 needs no guess of which interface address a
  prerouting `redirect` would pick;
- UDP has no SO_ORIGINAL_DST; a transparent socket gets the original
  destination per datagram (IP_RECVORIGDSTADDR) and can answer from it;
- conntrack NAT is not needed for forwarded traffic at all.

A TPROXY rule sets the mark bit const.TPROXY_MARK, which policy routing
(shuttled.firewall.policy) sends to a local table, so the packet is delivered
to the transparent socket instead of being forwarded. Local UDP gets the same
bit in the output (route) hook, is re-routed through lo, and meets the same
TPROXY rules in prerouting.

Per capture that needs any of it, three chains (names below are nft's;
iptables uses `<top>-<profile>` and `<top>-.m.<profile>` in mangle, and
`<top>-<profile>` in filter):

- tp_<name> (prerouting, mangle priority): LAN DNS to the DNS front; this
  host's own addresses pass; excludes pass; includes: TCP from the LAN and UDP
  to the listeners. Jumped to for the LAN interfaces/sources, and for packets
  that come back through lo with our mark (local UDP).
- mk_<name> (output, route type): marks local UDP to the subnets.
- ks_<name> (output and forward, filter, before our nat chain): only while the
  kill switch holds: TCP to the subnets is reset, the rest gets ICMP
  unreachable; the tp/mk capture of the subnets is left out meanwhile.
"""

from __future__ import annotations

import abc
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from shuttled.const import DNS_PORT, TPROXY_MARK
from shuttled.firewall.base import Capture, LanMatch, Rule, address_set, capture_rules, port_range
from shuttled.net import IPNetwork

Verdict = Literal["return", "tproxy", "mark", "reset", "reject"]
LISTEN = {4: "127.0.0.1", 6: "::1"}
_MULTICAST: dict[int, IPNetwork] = {
    4: ipaddress.IPv4Network("224.0.0.0/4"),
    6: ipaddress.IPv6Network("ff00::/8"),
}


@dataclass(frozen=True)
class RRule:
    """One router rule: all of its matches must hold; then its verdict."""

    family: int  # 4 or 6
    verdict: Verdict
    to_port: int = 0  # for "tproxy"
    daddrs: tuple[IPNetwork, ...] = ()  # () = any destination
    protos: tuple[str, ...] = ()  # () = any protocol
    ports: tuple[int, int] | None = None  # destination ports (needs protos)
    local_dst: bool = False  # the destination is one of this host's addresses
    broadcast_dst: bool = False  # the destination is a (v4) broadcast address
    foreign_src: bool = False  # the source is NOT one of this host's addresses
    not_lo: bool = False  # did not arrive through lo (LAN traffic only)
    mark: int | None = None  # the packet carries exactly this mark
    marked: bool = False  # the packet carries TPROXY_MARK (among other bits)


@dataclass(frozen=True)
class Jump:
    """A jump from a base chain into a capture's chain, with its condition."""

    family: int  # 0 = both
    chain: str  # the capture name; each backend makes its chain name of it
    interface: str | None = None
    source: IPNetwork | None = None
    not_lo: bool = False  # every interface but lo
    lo_marked: bool = False  # came back through lo carrying TPROXY_MARK
    uid: int | None = None


@dataclass(frozen=True)
class RouterRules:
    """Everything router mode adds for a set of captures, backend-neutral."""

    pre_jumps: tuple[Jump, ...] = ()
    out_jumps: tuple[Jump, ...] = ()  # mark local UDP (route hook)
    hold_out_jumps: tuple[Jump, ...] = ()
    hold_fwd_jumps: tuple[Jump, ...] = ()
    tproxy: dict[str, tuple[RRule, ...]] = field(default_factory=dict)
    marks: dict[str, tuple[RRule, ...]] = field(default_factory=dict)
    holds: dict[str, tuple[RRule, ...]] = field(default_factory=dict)

    @property
    def needs_policy(self) -> bool:
        """Whether TPROXY is in use, so the fwmark policy routing must exist. A chain
        without a TPROXY rule (a held LAN capture) needs none: policy.tproxy_users,
        which decides when another instance may remove it, counts the same way."""
        return any(r.verdict == "tproxy" for body in self.tproxy.values() for r in body)

    @property
    def empty(self) -> bool:
        return not (self.tproxy or self.marks or self.holds)


def needs_tproxy(capture: Capture) -> bool:
    if capture.lockdown:
        return False
    return capture.lan is not None or (capture.udp_port is not None and not capture.hold)


def router_rules(captures: Sequence[Capture]) -> RouterRules:
    """The router-mode rules of these captures (nothing for plain local TCP captures)."""
    pre: list[Jump] = []
    out: list[Jump] = []
    hold_out: list[Jump] = []
    hold_fwd: list[Jump] = []
    tproxy: dict[str, tuple[RRule, ...]] = {}
    marks: dict[str, tuple[RRule, ...]] = {}
    holds: dict[str, tuple[RRule, ...]] = {}
    for capture in captures:
        name = capture.name
        if needs_tproxy(capture):
            tproxy[name] = tuple(tproxy_chain(capture))
            pre += lan_jumps(capture.lan, name)
            if capture.udp_port is not None and not capture.hold:
                pre.append(Jump(0, name, lo_marked=True))
                marks[name] = tuple(mark_chain(capture))
                out.append(Jump(0, name, uid=capture.uid))
        if capture.hold:
            holds[name] = tuple(hold_chain(capture))
            hold_out.append(Jump(0, name, uid=capture.uid))
            hold_fwd += lan_jumps(capture.lan, name)
    return RouterRules(
        tuple(pre), tuple(out), tuple(hold_out), tuple(hold_fwd), tproxy, marks, holds
    )


def lan_jumps(lan: LanMatch | None, chain: str) -> list[Jump]:
    if lan is None:
        return []
    if lan.every_interface:
        return [Jump(0, chain, not_lo=True)]
    jumps = [Jump(0, chain, interface=i) for i in lan.interfaces]
    jumps += [Jump(s.version, chain, source=s) for s in lan.sources]
    return jumps


# --- chain bodies ----------------------------------------------------------------


def tproxy_chain(capture: Capture) -> list[RRule]:
    rules = capture_rules(capture)
    body = _lan_dns(capture)
    if not rules.subnets:
        return body
    body += never_captured()
    if capture.hold:
        return body  # the kill switch rejects the subnets in the forward hook
    for sub in rules.subnets:
        body += _subnet_rules(capture, sub)
    return body


def never_captured() -> list[RRule]:
    """This host's own addresses, broadcasts and multicast: never the tunnel's, whatever
    the subnets say (0/0 would otherwise take DHCP, mDNS and the router's own services)."""
    return [
        RRule(4, "return", local_dst=True),
        RRule(6, "return", local_dst=True),
        RRule(4, "return", broadcast_dst=True),
        RRule(4, "return", daddrs=(_MULTICAST[4],)),
        RRule(6, "return", daddrs=(_MULTICAST[6],)),
    ]


def _lan_dns(capture: Capture) -> list[RRule]:
    if capture.lan is None or capture.lan_dns_port is None:
        return []
    return [
        RRule(
            family,
            "tproxy",
            capture.lan_dns_port,
            protos=("tcp", "udp"),
            ports=(DNS_PORT, DNS_PORT),
            local_dst=not capture.lan_dns_all,
            not_lo=True,
        )
        for family in (4, 6)
    ]


def _subnet_rules(capture: Capture, sub: Rule) -> list[RRule]:
    if sub.verdict == "return":
        return [_exclude(sub)]
    out = []
    if capture.lan is not None:
        # Local TCP is the nat chain's; only forwarded TCP comes here.
        out.append(
            RRule(
                sub.family, "tproxy", capture.tcp_port, sub.daddrs, ("tcp",), sub.ports, not_lo=True
            )
        )
    if capture.udp_port is not None:
        out.append(RRule(sub.family, "tproxy", capture.udp_port, sub.daddrs, ("udp",), sub.ports))
    return out


def _exclude(sub: Rule) -> RRule:
    # An exclude with ports (the ssh server's) covers UDP too; without, everything.
    protos = ("tcp", "udp") if sub.ports else ()
    return RRule(sub.family, "return", daddrs=sub.daddrs, protos=protos, ports=sub.ports)


def mark_chain(capture: Capture) -> list[RRule]:
    """Local UDP to the subnets: mark it, so it is re-routed through lo to TPROXY."""
    rules = capture_rules(capture)
    body: list[RRule] = []
    for family in (4, 6):
        if capture.bypass_mark is not None:
            body.append(RRule(family, "return", mark=capture.bypass_mark))
        # Our own transparent sockets answer FROM a foreign address: never mark those.
        body.append(RRule(family, "return", foreign_src=True))
    body += never_captured()
    for sub in rules.subnets:
        if sub.verdict == "return":
            body.append(_exclude(sub))
        else:
            body.append(
                RRule(sub.family, "mark", daddrs=sub.daddrs, protos=("udp",), ports=sub.ports)
            )
    return body


def _refused_dns(dns: Rule) -> list[RRule]:
    return [
        RRule(dns.family, "reset", daddrs=dns.daddrs, protos=("tcp",), ports=dns.ports),
        RRule(dns.family, "reject", daddrs=dns.daddrs, protos=("udp",), ports=dns.ports),
    ]


def hold_chain(capture: Capture) -> list[RRule]:
    """While the kill switch holds: reset TCP, refuse the rest, to the subnets only."""
    rules = capture_rules(capture)
    # What is on its way to our listeners passes: local UDP marked for TPROXY, and our
    # own queries to the original resolvers (split DNS) carrying the bypass mark.
    body = [RRule(family, "return", marked=True) for family in (4, 6)]
    if capture.bypass_mark is not None:
        body += [RRule(family, "return", mark=capture.bypass_mark) for family in (4, 6)]
    # DNS still reaches our listener while held (it answers SERVFAIL meanwhile); before
    # the listener exists it is refused here, so no query ever leaves in the clear.
    body += [
        RRule(r.family, "return", daddrs=r.daddrs, protos=("udp", "tcp"), ports=r.ports)
        for r in rules.dns
    ]
    body += [rule for r in rules.refused_dns for rule in _refused_dns(r)]
    body += never_captured()
    for sub in rules.subnets:
        if sub.verdict == "return":
            body.append(_exclude(sub))
            continue
        body.append(RRule(sub.family, "reset", daddrs=sub.daddrs, protos=("tcp",), ports=sub.ports))
        protos = ("udp",) if sub.ports else ()
        body.append(RRule(sub.family, "reject", daddrs=sub.daddrs, protos=protos, ports=sub.ports))
    return body


# --- nft ---------------------------------------------------------------------------


def nft_chains(rules: RouterRules, hooks: NftHooks) -> list[str]:
    """Chain blocks (as nft.py's _chain formats them) for our table; [] when unused."""
    chains: list[str] = []
    for name, kind, hook, priority, jumps, prefix in (
        ("prerouting", "filter", "prerouting", hooks.mangle, rules.pre_jumps, "tp_"),
        ("mark_out", "route", "output", hooks.mangle, rules.out_jumps, "mk_"),
        ("hold_out", "filter", "output", hooks.hold, rules.hold_out_jumps, "ks_"),
        ("hold_fwd", "filter", "forward", hooks.hold, rules.hold_fwd_jumps, "ks_"),
    ):
        if jumps:
            chains.append(
                hooks.base(name, kind, hook, priority, [nft_jump(j, prefix) for j in jumps])
            )
    for prefix, bodies in (("tp_", rules.tproxy), ("mk_", rules.marks), ("ks_", rules.holds)):
        for name, body in bodies.items():
            chains.append(hooks.chain(prefix + name, [nft_rule(r) for r in body]))
    return chains


@dataclass(frozen=True)
class NftHooks:
    """How nft.py formats chains, so this module emits the same layout."""

    chain: Callable[[str, Sequence[str]], str]
    mangle: int
    hold: int

    def base(self, name: str, kind: str, hook: str, priority: int, lines: Iterable[str]) -> str:
        head = f"type {kind} hook {hook} priority {priority}; policy accept;"
        return self.chain(name, [head, *lines])


def nft_jump(jump: Jump, prefix: str) -> str:
    return _NFT.jump(jump, f"jump {prefix}{jump.chain}")


def nft_rule(rule: RRule) -> str:
    """One nft rule: sets hold all the destinations and protocols."""
    return _NFT.rule(rule, rule.daddrs, rule.protos)


def nft_family(version: int) -> str:
    return "ip" if version == 4 else "ip6"


def nft_l4(protos: Sequence[str], ports: tuple[int, int] | None) -> list[str]:
    """nft's protocol and destination port matches ([] for any protocol)."""
    if not protos:
        return []
    dports = "" if ports is None else port_range(ports, "-")
    if len(protos) == 1:
        return [f"{protos[0]} dport {dports}"] if dports else [f"meta l4proto {protos[0]}"]
    l4proto = "meta l4proto { " + ", ".join(protos) + " }"
    return [l4proto, f"th dport {dports}"] if dports else [l4proto]


# --- iptables ------------------------------------------------------------------------


def ipt_jump(jump: Jump, family: int, target: str) -> str | None:
    """An iptables rule spec for a jump, or None when it is for the other family."""
    if jump.family not in (0, family):
        return None
    return _IPT.jump(jump, f"-j {target}")


def ipt_rules(rule: RRule) -> list[str]:
    """iptables rule specs for one router rule: one per destination and protocol."""
    each_daddr: list[tuple[IPNetwork, ...]] = [(d,) for d in rule.daddrs] or [()]
    each_proto: list[tuple[str, ...]] = [(p,) for p in rule.protos] or [()]
    return [_IPT.rule(rule, daddr, proto) for daddr in each_daddr for proto in each_proto]


# --- the matches of a jump and a rule, in order; each backend spells them ---------------


class _Spelling(abc.ABC):
    """How one backend writes each match and verdict. Which matches a jump or a rule
    carries, and in what order, is decided once here, for nft and iptables alike."""

    uid: ClassVar[str]  # str.format templates of one value
    interface: ClassVar[str]
    mark: ClassVar[str]
    marked: ClassVar[str]  # constant matches
    not_lo: ClassVar[str]
    lo_marked: ClassVar[str]
    local_dst: ClassVar[str]
    broadcast_dst: ClassVar[str]
    foreign_src: ClassVar[str]
    verdicts: ClassVar[dict[Verdict, str]]  # all but "tproxy"

    def jump(self, jump: Jump, target: str) -> str:
        parts = []
        if jump.uid is not None:
            parts.append(self.uid.format(jump.uid))
        if jump.interface is not None:
            parts.append(self.interface.format(jump.interface))
        if jump.source is not None:
            parts.append(self.source(jump.source))
        if jump.not_lo:
            parts.append(self.not_lo)
        if jump.lo_marked:
            parts.append(self.lo_marked)
        return " ".join([*parts, target])

    def rule(self, rule: RRule, daddrs: Sequence[IPNetwork], protos: Sequence[str]) -> str:
        """`rule` for these of its destinations and protocols (() = any)."""
        parts = self.family(rule.family, daddrs)
        if rule.mark is not None:
            parts.append(self.mark.format(rule.mark))
        if rule.marked:
            parts.append(self.marked)
        if rule.not_lo:
            parts.append(self.not_lo)
        parts += self.daddrs(rule.family, daddrs)
        parts += self.protos(protos)
        if rule.local_dst:
            parts.append(self.local_dst)
        if rule.broadcast_dst:
            parts.append(self.broadcast_dst)
        if rule.foreign_src:
            parts.append(self.foreign_src)
        parts += self.dports(protos, rule.ports)
        if rule.verdict == "tproxy":
            return " ".join([*parts, self.tproxy(rule.family, rule.to_port)])
        return " ".join([*parts, self.verdicts[rule.verdict]])

    @abc.abstractmethod
    def source(self, net: IPNetwork) -> str:
        """A jump's source match."""

    def family(self, family: int, daddrs: Sequence[IPNetwork]) -> list[str]:
        """A match of the address family, where nothing else implies it."""
        return []

    @abc.abstractmethod
    def daddrs(self, family: int, daddrs: Sequence[IPNetwork]) -> list[str]:
        """The destination match ([] for any destination)."""

    def protos(self, protos: Sequence[str]) -> list[str]:
        """The protocol match, where it stands apart from the ports."""
        return []

    @abc.abstractmethod
    def dports(self, protos: Sequence[str], ports: tuple[int, int] | None) -> list[str]:
        """The destination port match."""

    @abc.abstractmethod
    def tproxy(self, family: int, port: int) -> str:
        """The "tproxy" verdict: to our listener of this family, setting TPROXY_MARK."""


_NFT_MARK = f"meta mark set meta mark | {TPROXY_MARK:#010x}"
_IPT_MARK = f"{TPROXY_MARK:#x}/{TPROXY_MARK:#x}"


class _NftSpelling(_Spelling):
    uid = "meta skuid {}"
    interface = 'iifname "{}"'
    mark = "meta mark {:#x}"
    marked = f"meta mark & {TPROXY_MARK:#010x} == {TPROXY_MARK:#010x}"
    not_lo = 'iif != "lo"'
    lo_marked = f'iif "lo" meta mark & {TPROXY_MARK:#010x} == {TPROXY_MARK:#010x}'
    local_dst = "fib daddr type local"
    broadcast_dst = "fib daddr type broadcast"
    foreign_src = "fib saddr type != local"
    verdicts = {
        "mark": _NFT_MARK,
        "reset": "reject with tcp reset",
        "reject": "reject",
        "return": "return",
    }

    def source(self, net: IPNetwork) -> str:
        return f"{nft_family(net.version)} saddr {address_set((net,))}"

    def family(self, family: int, daddrs: Sequence[IPNetwork]) -> list[str]:
        return [] if daddrs else [f"meta nfproto ipv{family}"]

    def daddrs(self, family: int, daddrs: Sequence[IPNetwork]) -> list[str]:
        return [f"{nft_family(family)} daddr {address_set(daddrs)}"] if daddrs else []

    def dports(self, protos: Sequence[str], ports: tuple[int, int] | None) -> list[str]:
        return nft_l4(protos, ports)  # the protocol too: nft names it with the ports

    def tproxy(self, family: int, port: int) -> str:
        to = LISTEN[4] if family == 4 else f"[{LISTEN[6]}]"
        return f"tproxy {nft_family(family)} to {to}:{port} {_NFT_MARK} accept"


class _IptSpelling(_Spelling):
    # No family match: iptables or ip6tables is the family.
    uid = "-m owner --uid-owner {}"
    interface = "-i {}"
    mark = "-m mark --mark {:#x}"
    marked = f"-m mark --mark {_IPT_MARK}"
    not_lo = "! -i lo"
    lo_marked = f"-i lo -m mark --mark {_IPT_MARK}"
    local_dst = "-m addrtype --dst-type LOCAL"
    broadcast_dst = "-m addrtype --dst-type BROADCAST"
    foreign_src = "-m addrtype ! --src-type LOCAL"
    verdicts = {
        "mark": f"-j MARK --set-xmark {_IPT_MARK}",
        "reset": "-j REJECT --reject-with tcp-reset",
        "reject": "-j REJECT",
        "return": "-j RETURN",
    }

    def source(self, net: IPNetwork) -> str:
        return f"-s {net}"

    def daddrs(self, family: int, daddrs: Sequence[IPNetwork]) -> list[str]:
        return [f"-d {net}" for net in daddrs if net.prefixlen]  # 0/0 is any: no match

    def protos(self, protos: Sequence[str]) -> list[str]:
        return [f"-p {proto}" for proto in protos]

    def dports(self, protos: Sequence[str], ports: tuple[int, int] | None) -> list[str]:
        if ports is None:
            return []
        return [f"-m {proto} --dport {port_range(ports, ':')}" for proto in protos]

    def tproxy(self, family: int, port: int) -> str:
        return f"-j TPROXY --on-port {port} --on-ip {LISTEN[family]} --tproxy-mark {_IPT_MARK}"


_NFT = _NftSpelling()
_IPT = _IptSpelling()
