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

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from shuttled.const import DNS_PORT, TPROXY_MARK
from shuttled.firewall.base import Capture, IPNetwork, LanMatch, Rule, capture_rules

Verdict = Literal["return", "tproxy", "mark", "reset", "reject"]
LISTEN = {4: "127.0.0.1", 6: "::1"}
_MULTICAST: dict[int, IPNetwork] = {4: ipaddress.IPv4Network("224.0.0.0/4"),
                                    6: ipaddress.IPv6Network("ff00::/8")}


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
        """Whether TPROXY is in use, so the fwmark policy routing must exist."""
        return bool(self.tproxy)

    @property
    def empty(self) -> bool:
        return not (self.tproxy or self.marks or self.holds)


def needs_tproxy(capture: Capture) -> bool:
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
    return RouterRules(tuple(pre), tuple(out), tuple(hold_out), tuple(hold_fwd),
                       tproxy, marks, holds)


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
    return [RRule(4, "return", local_dst=True), RRule(6, "return", local_dst=True),
            RRule(4, "return", broadcast_dst=True),
            RRule(4, "return", daddrs=(_MULTICAST[4],)),
            RRule(6, "return", daddrs=(_MULTICAST[6],))]


def _lan_dns(capture: Capture) -> list[RRule]:
    if capture.lan is None or capture.lan_dns_port is None:
        return []
    return [RRule(family, "tproxy", capture.lan_dns_port, protos=("tcp", "udp"),
                  ports=(DNS_PORT, DNS_PORT), local_dst=not capture.lan_dns_all, not_lo=True)
            for family in (4, 6)]


def _subnet_rules(capture: Capture, sub: Rule) -> list[RRule]:
    if sub.verdict == "return":
        return [_exclude(sub)]
    out = []
    if capture.lan is not None:
        # Local TCP is the nat chain's; only forwarded TCP comes here.
        out.append(RRule(sub.family, "tproxy", capture.tcp_port, sub.daddrs, ("tcp",),
                         sub.ports, not_lo=True))
    if capture.udp_port is not None:
        out.append(RRule(sub.family, "tproxy", capture.udp_port, sub.daddrs, ("udp",),
                         sub.ports))
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
            body.append(RRule(sub.family, "mark", daddrs=sub.daddrs, protos=("udp",),
                              ports=sub.ports))
    return body


def hold_chain(capture: Capture) -> list[RRule]:
    """While the kill switch holds: reset TCP, refuse the rest, to the subnets only."""
    rules = capture_rules(capture)
    body = [RRule(r.family, "return", daddrs=r.daddrs, protos=("udp", "tcp"), ports=r.ports)
            for r in rules.dns]  # local DNS still reaches our listener (SERVFAIL meanwhile)
    body += never_captured()
    for sub in rules.subnets:
        if sub.verdict == "return":
            body.append(_exclude(sub))
            continue
        body.append(RRule(sub.family, "reset", daddrs=sub.daddrs, protos=("tcp",),
                          ports=sub.ports))
        protos = ("udp",) if sub.ports else ()
        body.append(RRule(sub.family, "reject", daddrs=sub.daddrs, protos=protos,
                          ports=sub.ports))
    return body


# --- nft ---------------------------------------------------------------------------


def nft_chains(rules: RouterRules, hooks: NftHooks) -> list[str]:
    """Chain blocks (as nft.py's _chain formats them) for our table; [] when unused."""
    chains: list[str] = []
    if rules.pre_jumps:
        chains.append(hooks.base("prerouting", "filter", "prerouting", hooks.mangle,
                                 [nft_jump(j, "tp_") for j in rules.pre_jumps]))
    if rules.out_jumps:
        chains.append(hooks.base("mark_out", "route", "output", hooks.mangle,
                                 [nft_jump(j, "mk_") for j in rules.out_jumps]))
    if rules.hold_out_jumps:
        chains.append(hooks.base("hold_out", "filter", "output", hooks.hold,
                                 [nft_jump(j, "ks_") for j in rules.hold_out_jumps]))
    if rules.hold_fwd_jumps:
        chains.append(hooks.base("hold_fwd", "filter", "forward", hooks.hold,
                                 [nft_jump(j, "ks_") for j in rules.hold_fwd_jumps]))
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

    def base(self, name: str, kind: str, hook: str, priority: int,
             lines: Iterable[str]) -> str:
        head = f"type {kind} hook {hook} priority {priority}; policy accept;"
        return self.chain(name, [head, *lines])


def nft_jump(jump: Jump, prefix: str) -> str:
    parts = []
    if jump.uid is not None:
        parts.append(f"meta skuid {jump.uid}")
    if jump.interface is not None:
        parts.append(f'iifname "{jump.interface}"')
    if jump.source is not None:
        parts.append(f"{_nft_family(jump.source.version)} saddr {_net(jump.source)}")
    if jump.not_lo:
        parts.append('iif != "lo"')
    if jump.lo_marked:
        parts.append(f'iif "lo" meta mark & {TPROXY_MARK:#010x} == {TPROXY_MARK:#010x}')
    return " ".join([*parts, f"jump {prefix}{jump.chain}"])


def nft_rule(rule: RRule) -> str:
    fam = _nft_family(rule.family)
    parts = [] if rule.daddrs else [f"meta nfproto ipv{rule.family}"]
    if rule.mark is not None:
        parts.append(f"meta mark {rule.mark:#x}")
    if rule.not_lo:
        parts.append('iif != "lo"')
    if rule.daddrs:
        parts.append(f"{fam} daddr {_nft_addrs(rule.daddrs)}")
    if rule.local_dst:
        parts.append("fib daddr type local")
    if rule.broadcast_dst:
        parts.append("fib daddr type broadcast")
    if rule.foreign_src:
        parts.append("fib saddr type != local")
    parts += _nft_l4(rule)
    return " ".join([*parts, _nft_verdict(rule)])


def _nft_family(version: int) -> str:
    return "ip" if version == 4 else "ip6"


def _net(net: IPNetwork) -> str:
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _nft_addrs(nets: Sequence[IPNetwork]) -> str:
    items = [_net(n) for n in nets]
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _nft_l4(rule: RRule) -> list[str]:
    if not rule.protos:
        return []
    ports = "" if rule.ports is None else _range(rule.ports, "-")
    if len(rule.protos) == 1:
        proto = rule.protos[0]
        return [f"{proto} dport {ports}"] if ports else [f"meta l4proto {proto}"]
    protos = "meta l4proto { " + ", ".join(rule.protos) + " }"
    return [protos, f"th dport {ports}"] if ports else [protos]


def _range(ports: tuple[int, int], sep: str) -> str:
    first, last = ports
    return str(first) if first == last else f"{first}{sep}{last}"


def _nft_verdict(rule: RRule) -> str:
    mark = f"meta mark set meta mark | {TPROXY_MARK:#010x}"
    if rule.verdict == "tproxy":
        to = LISTEN[4] if rule.family == 4 else f"[{LISTEN[6]}]"
        return f"tproxy {_nft_family(rule.family)} to {to}:{rule.to_port} {mark} accept"
    if rule.verdict == "mark":
        return mark
    if rule.verdict == "reset":
        return "reject with tcp reset"
    return rule.verdict  # return, reject


# --- iptables ------------------------------------------------------------------------


def ipt_jump(jump: Jump, family: int, target: str) -> str | None:
    """An iptables rule spec for a jump, or None when it is for the other family."""
    if jump.family not in (0, family):
        return None
    parts = []
    if jump.uid is not None:
        parts.append(f"-m owner --uid-owner {jump.uid}")
    if jump.interface is not None:
        parts.append(f"-i {jump.interface}")
    if jump.source is not None:
        parts.append(f"-s {jump.source}")
    if jump.not_lo:
        parts.append("! -i lo")
    if jump.lo_marked:
        parts.append(f"-i lo -m mark --mark {TPROXY_MARK:#x}/{TPROXY_MARK:#x}")
    return " ".join([*parts, f"-j {target}"])


def ipt_rules(rule: RRule) -> list[str]:
    """iptables rule specs for one router rule: one per destination and protocol."""
    specs = []
    for dest in rule.daddrs or (None,):
        for proto in rule.protos or (None,):
            parts = []
            if rule.mark is not None:
                parts.append(f"-m mark --mark {rule.mark:#x}")
            if rule.not_lo:
                parts.append("! -i lo")
            if dest is not None and dest.prefixlen:
                parts.append(f"-d {dest}")
            if proto is not None:
                parts.append(f"-p {proto}")
            if rule.local_dst:
                parts.append("-m addrtype --dst-type LOCAL")
            if rule.broadcast_dst:
                parts.append("-m addrtype --dst-type BROADCAST")
            if rule.foreign_src:
                parts.append("-m addrtype ! --src-type LOCAL")
            if proto is not None and rule.ports is not None:
                parts.append(f"-m {proto} --dport {_range(rule.ports, ':')}")
            specs.append(" ".join([*parts, _ipt_verdict(rule)]))
    return specs


def _ipt_verdict(rule: RRule) -> str:
    mark = f"{TPROXY_MARK:#x}/{TPROXY_MARK:#x}"
    if rule.verdict == "tproxy":
        return f"-j TPROXY --on-port {rule.to_port} --on-ip {LISTEN[rule.family]} " \
               f"--tproxy-mark {mark}"
    if rule.verdict == "mark":
        return f"-j MARK --set-xmark {mark}"
    if rule.verdict == "reset":
        return "-j REJECT --reject-with tcp-reset"
    if rule.verdict == "reject":
        return "-j REJECT"
    return "-j RETURN"
