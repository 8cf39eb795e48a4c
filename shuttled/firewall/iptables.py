"""iptables backend (legacy or iptables-nft): the capture and router rule sets as chains.

Names: one top chain per instance, `SHUTTLED` for the daemon's table `shuttled`
and `SHUTTLED_run_<pid>` for `shuttled_run_<pid>`; every chain it owns is
`<top>` or `<top>-*` (names longer than iptables' 28 characters keep a prefix
plus a hash). The capture rule set lives in the nat table: the first rule of
OUTPUT jumps to the top chain, which jumps to one chain per capture,
`<top>-<profile>`. Router mode's (firewall.tproxy) lives in mangle and filter,
with names the nat layout cannot produce (a profile name has no "."):

    mangle  T          <- PREROUTING   jumps to T-<profile>: TPROXY (LAN, UDP)
            T-.out     <- OUTPUT       jumps to T-.m.<profile>: mark local UDP
    filter  T          <- OUTPUT       jumps to T-<profile>: kill switch rejects
            T-.fwd     <- FORWARD      (the same chains, for the LAN)

TPROXY is only valid in mangle PREROUTING and REJECT only in filter, hence two
tables, and two top chains each (an owner match is refused where FORWARD
reaches). This module says which chains hold which lines; installing them is
firewall.ipt's, one `iptables-restore --noflush` per (family, table), computed
from what the kernel holds, all put back when a later one fails: apply()
changes every table of both families or none.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from shuttled.const import NFT_TABLE
from shuttled.errors import FirewallError
from shuttled.firewall import ipt, policy
from shuttled.firewall.base import (
    Backend,
    Capture,
    Rule,
    capture_rules,
    check_captures,
    is_instance_table,
    port_range,
)
from shuttled.firewall.ipt import ChainSet, Key
from shuttled.firewall.tproxy import Jump, RouterRules, RRule, ipt_jump, ipt_rules, router_rules
from shuttled.net import which_tool

ROUTER_TABLES = ("mangle", "filter")
_LOCAL_RETURN = "-m addrtype --dst-type LOCAL -j RETURN"


class IptablesBackend(Backend):
    name = "iptables"
    tools = tuple(tool for pair in ipt.TOOLS.values() for tool in pair)

    def __init__(self, table: str = NFT_TABLE, *, persistent: bool = False) -> None:
        super().__init__(table, persistent=persistent)
        self.top = ipt.top_chain(table)
        if len(self.top) > ipt.MAX_CHAIN - 8:  # leave room for "-" and a profile
            raise ValueError(f"table name {table!r} is too long for iptables chain names")

    @classmethod
    def unsupported_reason(cls) -> str | None:
        missing = [tool for tool in cls.tools if not which_tool(tool)]
        if missing:
            return f"{', '.join(missing)} not installed"
        before = ipt.nft_tables()
        try:
            for family in ipt.families():
                try:
                    ipt.restore(family, _probe_input(family))
                except FirewallError as e:
                    return f"the kernel refused an iptables nat probe: {e}"
        finally:
            ipt.drop_tables_made(before, ("nat",))
        return None

    @classmethod
    def instances(cls) -> list[str]:
        tables = {ipt.instance_table(top) for top in ipt.instance_tops()}
        return sorted(t for t in tables if is_instance_table(t))

    def render(self, captures: Sequence[Capture]) -> str:
        check_captures(captures)
        nat, router = _keys((4, 6))
        wanted = self._wanted(captures, (4, 6))
        return "".join(
            ipt.restore_text(family, ipt.transaction(table, ChainSet(), wanted[family, table]))
            for family, table in nat + router
        )

    def apply(self, captures: Sequence[Capture]) -> None:
        check_captures(captures)
        wanted = self._wanted(captures, ipt.families())
        # Policy routing before any TPROXY rule, taken away after the last. commit()
        # changes router mode's mangle/filter chains before nat's, as before the merge.
        rules = router_rules(captures)
        if rules.needs_policy:
            policy.ensure(self.table)
        ipt.commit(self.top, wanted)
        if not rules.needs_policy:
            policy.release(self.table, only_if_made=True)
        unused = [] if captures or self.persistent else ["nat"]
        ipt.drop_tables_made_by(self.top, [*unused, *(ROUTER_TABLES if rules.empty else ())])

    def remove(self) -> None:
        nat, router = _keys(ipt.families())
        ipt.commit(self.top, {key: ChainSet() for key in nat + router})
        ipt.drop_tables_made_by(self.top, ipt.TABLES)
        ipt.forget(self.top)
        policy.release(self.table)

    def snapshot(self) -> str:
        parts = []
        nat, router = _keys(ipt.families())
        for family, table in nat + router:
            state = ipt.state(self.top, (family, table))
            if state.chains or state.jumps:
                lines = "\n".join(state.lines())
                parts.append(f"# {ipt.TOOLS[family][0]} -t {table}\n{lines}\n")
        return "".join(parts)

    # --- internals --------------------------------------------------------------

    def _wanted(self, captures: Sequence[Capture], families: Sequence[int]) -> dict[Key, ChainSet]:
        """Every (family, table)'s chains, in the order apply() changes them."""
        rules = router_rules(captures)
        nat, router = _keys(families)
        wanted = {(f, t): _router_chains(self.top, f, t, rules) for f, t in router}
        return wanted | {(f, t): self._capture_chains(f, captures) for f, t in nat}

    def _capture_chains(self, family: int, captures: Sequence[Capture]) -> ChainSet:
        chains: list[str] = []
        jumps: list[str] = []
        bodies: list[str] = []
        for capture in captures:
            body = _chain_body(family, capture)
            if not body:  # nothing of this family: no chain at all
                continue
            chain = ipt.chain_name(self.top, capture.name)
            if chain in chains:
                raise FirewallError(f"captures share the iptables chain name {chain}")
            uid = "" if capture.uid is None else f"-m owner --uid-owner {capture.uid} "
            chains.append(chain)
            jumps.append(f"-A {self.top} {uid}-j {chain}")
            bodies += [f"-A {chain} {spec}" for spec in body]
        if not chains and not self.persistent:
            return ChainSet()
        return ChainSet((self.top, *chains), (*jumps, *bodies), (("OUTPUT", self.top),))


def _keys(families: Sequence[int]) -> tuple[list[Key], list[Key]]:
    """The nat tables, then router mode's: each family's mangle and filter."""
    nat = [(family, "nat") for family in families]
    return nat, [(family, table) for family in families for table in ROUTER_TABLES]


# --- the capture rule set (nat) --------------------------------------------------------


def _chain_body(family: int, capture: Capture) -> list[str]:
    rules = capture_rules(capture).family(family)
    specs = [spec for rule in rules.dns for spec in _specs(rule)]
    if rules.bypass_mark is not None and (specs or rules.subnets):
        # As iptables-save spells it (hex), so what we write is what we read back.
        specs.insert(0, f"-m mark --mark {rules.bypass_mark:#x} -j RETURN")
    # While the kill switch holds, the subnets are rejected (firewall.tproxy), not
    # redirected: iptables' filter OUTPUT runs after nat and would see only our port.
    if rules.subnets and not capture.hold:
        # Connections to this host's own addresses are never tunnelled; sshuttle
        # appended this rule last, where it could never match first.
        specs.append(_LOCAL_RETURN)
        specs += [spec for rule in rules.subnets for spec in _specs(rule)]
    return specs


def _specs(rule: Rule) -> list[str]:
    """One iptables rule per destination and protocol, as iptables-save spells it."""
    verdict = "-j RETURN" if rule.verdict == "return" else f"-j REDIRECT --to-ports {rule.to_port}"
    specs = []
    for net in rule.daddrs:
        dest = f"-d {net} " if net.prefixlen else ""
        for proto in rule.protos:
            dport = f"-m {proto} --dport {port_range(rule.ports, ':')} " if rule.ports else ""
            specs.append(f"{dest}-p {proto} {dport}{verdict}")
    return specs


# --- the router rule set (mangle, filter) ----------------------------------------------


def _router_chains(top: str, family: int, table: str, rules: RouterRules) -> ChainSet:
    if table == "mangle":
        out = ipt.chain_name(top, ".out")
        parts = [
            _part(top, top, "PREROUTING", rules.pre_jumps, family, rules.tproxy, ""),
            _part(top, out, "OUTPUT", rules.out_jumps, family, rules.marks, ".m."),
        ]
    else:
        fwd = ipt.chain_name(top, ".fwd")
        parts = [
            _part(top, top, "OUTPUT", rules.hold_out_jumps, family, rules.holds, ""),
            _part(top, fwd, "FORWARD", rules.hold_fwd_jumps, family, {}, ""),
        ]
    chains: list[str] = []
    body: list[str] = []
    jumps: list[ipt.BuiltinJump] = []
    for p_chains, p_rules, p_jumps in parts:
        chains += [c for c in p_chains if c not in chains]
        body += p_rules
        jumps += p_jumps
    return ChainSet(tuple(chains), tuple(body), tuple(jumps))


def _part(
    top: str,
    base: str,
    builtin: str,
    jumps: Sequence[Jump],
    family: int,
    bodies: dict[str, tuple[RRule, ...]],
    infix: str,
) -> tuple[list[str], list[str], list[ipt.BuiltinJump]]:
    """One base chain (jumped to from `builtin`) and the per-capture chains it jumps to."""
    if not jumps:
        return [], [], []
    chains, rules = [base], []
    for jump in jumps:
        spec = ipt_jump(jump, family, ipt.chain_name(top, infix + jump.chain))
        if spec is not None:
            rules.append(f"-A {base} {spec}")
    for name, body in bodies.items():
        chain = ipt.chain_name(top, infix + name)
        chains.append(chain)
        rules += [
            f"-A {chain} {spec}"
            for rule in body
            if rule.family == family
            for spec in ipt_rules(rule)
        ]
    return chains, rules, [(builtin, base)]


def _probe_input(family: int) -> str:
    """A chain using every match and target we emit, created and deleted in one commit.

    Its lower-case name is outside our SHUTTLED namespace, so it can never flush
    one of our chains.
    """
    chain = f"shuttled-probe-{os.getpid()}"
    dest = "127.0.0.1/32" if family == 4 else "::1/128"
    return (
        "\n".join(
            [
                "*nat",
                f":{chain} - [0:0]",
                f"-A {chain} -m owner --uid-owner 0 {_LOCAL_RETURN}",
                f"-A {chain} -d {dest} -p udp -m udp --dport 1:2 -j REDIRECT --to-ports 1",
                f"-F {chain}",
                f"-X {chain}",
                "COMMIT",
            ]
        )
        + "\n"
    )
