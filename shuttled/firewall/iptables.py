"""iptables backend (legacy or iptables-nft): our own chains in the nat table.

Names: one top chain per instance, `SHUTTLED` for the daemon's table `shuttled`
and `SHUTTLED_run_<pid>` for `shuttled_run_<pid>`, jumped to from the first rule
of OUTPUT; it jumps to one chain per capture, `<top>-<profile>` (names longer
than iptables' 28 characters keep a prefix plus a hash of the profile name).

Each family is changed by one `iptables-restore --noflush` transaction computed
from what the kernel holds now: declaring `:CHAIN - [0:0]` creates or flushes a
chain, the OUTPUT jump is deleted as often as it exists and inserted once, and
chains no longer wanted are deleted. IPv4 and IPv6 are two transactions; when
the second fails the first is put back, so apply() changes both or neither.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shuttled.const import IPT_CHAIN_PREFIX, NFT_TABLE
from shuttled.errors import FirewallError
from shuttled.firewall import ipt_router, policy
from shuttled.firewall.base import (
    Backend,
    Capture,
    Rule,
    capture_rules,
    check_captures,
    is_instance_table,
    port_range,
)
from shuttled.firewall.tproxy import router_rules
from shuttled.net import run_tool, tool_path, which_tool

IPT_MAX_CHAIN = 28  # iptables refuses longer chain names
_TOOLS = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}
_LEGACY_TABLES = {4: "/proc/net/ip_tables_names", 6: "/proc/net/ip6_tables_names"}
_LOCAL_RETURN = "-m addrtype --dst-type LOCAL -j RETURN"


@dataclass(frozen=True)
class ChainSet:
    """Our part of one family's nat table, in iptables-save spelling."""

    chains: tuple[str, ...] = ()  # the top chain first
    rules: tuple[str, ...] = ()  # "-A <one of chains> ..."
    jumps: int = 0  # how many "-A OUTPUT -j <top>" rules exist (want: 1 or 0)


class IptablesBackend(Backend):
    name = "iptables"
    tools = tuple(tool for pair in _TOOLS.values() for tool in pair)

    def __init__(self, table: str = NFT_TABLE, *, persistent: bool = False) -> None:
        super().__init__(table, persistent=persistent)
        self.top = top_chain(table)
        if len(self.top) > IPT_MAX_CHAIN - 8:  # leave room for "-" and a profile
            raise ValueError(f"table name {table!r} is too long for iptables chain names")

    @classmethod
    def unsupported_reason(cls) -> str | None:
        missing = [tool for tool in cls.tools if not which_tool(tool)]
        if missing:
            return f"{', '.join(missing)} not installed"
        _remember_nat_tables()
        try:
            for family in families():
                try:
                    _restore(family, _probe_input(family))
                except FirewallError as e:
                    return f"the kernel refused an iptables nat probe: {e}"
        finally:
            _drop_nat_tables_we_made()
        return None

    @classmethod
    def instances(cls) -> list[str]:
        tables = {
            NFT_TABLE + chain.split("-", 1)[0].removeprefix(IPT_CHAIN_PREFIX)
            for family in families()
            for chain in _chain_names(_save(family))
            if chain.startswith(IPT_CHAIN_PREFIX)
        }
        tables |= {
            NFT_TABLE + top.removeprefix(IPT_CHAIN_PREFIX)
            for top in ipt_router.instances(families())
        }
        return sorted(t for t in tables if is_instance_table(t))

    def render(self, captures: Sequence[Capture]) -> str:
        check_captures(captures)
        parts = []
        for family in (4, 6):
            text = transaction(self.top, ChainSet(), self._wanted(family, captures))
            if text:
                parts.append(f"# {_TOOLS[family][1]} -w --noflush\n{text}")
        return "".join(parts) + ipt_router.render(self.top, captures)

    def apply(self, captures: Sequence[Capture]) -> None:
        check_captures(captures)
        _remember_nat_tables()
        # Router mode's mangle/filter chains first, and put back if nat then fails;
        # policy routing before any TPROXY rule, taken away after the last.
        tproxy = router_rules(captures).needs_policy
        if tproxy:
            policy.ensure(self.table)
        undo = ipt_router.commit(self.top, families(), captures)
        try:
            self._commit({family: self._wanted(family, captures) for family in families()})
        except FirewallError as e:
            raise FirewallError(f"{e}{undo()}") from None
        if not tproxy:
            policy.release(self.table, only_if_made=True)
        if not captures and not self.persistent:
            _drop_nat_tables_we_made()

    def remove(self) -> None:
        self._commit({family: ChainSet() for family in families()})
        ipt_router.remove(self.top, families())
        policy.release(self.table)
        _drop_nat_tables_we_made()

    def snapshot(self) -> str:
        parts = []
        for family in families():
            state = self._state(family)
            if state.chains or state.jumps:
                lines = [f":{c} - [0:0]" for c in state.chains]
                lines += [f"-A OUTPUT -j {self.top}"] * state.jumps + list(state.rules)
                parts.append(f"# {_TOOLS[family][0]} -t nat\n" + "\n".join(lines) + "\n")
        return "".join(parts) + ipt_router.snapshot(self.top, families())

    # --- internals --------------------------------------------------------------

    def _wanted(self, family: int, captures: Sequence[Capture]) -> ChainSet:
        chains: list[str] = []
        jumps: list[str] = []
        bodies: list[str] = []
        for capture in captures:
            body = _chain_body(family, capture)
            if not body:  # nothing of this family: no chain at all
                continue
            chain = capture_chain(self.top, capture.name)
            if chain in chains:
                raise FirewallError(f"captures share the iptables chain name {chain}")
            uid = "" if capture.uid is None else f"-m owner --uid-owner {capture.uid} "
            chains.append(chain)
            jumps.append(f"-A {self.top} {uid}-j {chain}")
            bodies += [f"-A {chain} {spec}" for spec in body]
        if not chains and not self.persistent:
            return ChainSet()
        return ChainSet((self.top, *chains), (*jumps, *bodies), jumps=1)

    def _state(self, family: int) -> ChainSet:
        return parse_state(_save(family), self.top)

    def _commit(self, wanted: dict[int, ChainSet]) -> None:
        done: list[tuple[int, ChainSet]] = []
        for family, target in wanted.items():
            before = self._state(family)
            try:
                _change(family, self.top, before, target)
            except FirewallError as e:
                raise FirewallError(f"chain {self.top}: {e}{self._undo(done)}") from None
            done.append((family, before))

    def _undo(self, done: Iterable[tuple[int, ChainSet]]) -> str:
        """Put back the families already changed; a note for the error message if that fails."""
        for family, before in done:
            try:
                _change(family, self.top, self._state(family), before)
            except FirewallError as e:
                return f" (and putting back the IPv{family} rules failed too: {e})"
        return ""


def top_chain(table: str) -> str:
    """`shuttled` -> `SHUTTLED`, `shuttled_run_42` -> `SHUTTLED_run_42` (and back by prefix)."""
    return IPT_CHAIN_PREFIX + table.removeprefix(NFT_TABLE)


def capture_chain(top: str, name: str) -> str:
    full = f"{top}-{name}"
    if len(full) <= IPT_MAX_CHAIN:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{top}-{name[: IPT_MAX_CHAIN - len(top) - 1 - len(digest)]}{digest}"


def families() -> tuple[int, ...]:
    # Without IPv6 in the kernel there is no IPv6 traffic to capture, and no
    # ip6tables nat table to put rules in.
    return (4, 6) if os.path.exists("/proc/net/if_inet6") else (4,)


def parse_state(save: str, top: str) -> ChainSet:
    """Our chains, their rules and the OUTPUT jumps, from `iptables-save -t nat`."""
    chains = [c for c in _chain_names(save) if _owned(c, top)]
    rules = [ln for ln in save.splitlines() if ln.startswith("-A ") and _owned(ln.split()[1], top)]
    jumps = save.splitlines().count(f"-A OUTPUT -j {top}")
    chains.sort(key=lambda c: c != top)
    return ChainSet(tuple(chains), tuple(rules), jumps)


def _owned(chain: str, top: str) -> bool:
    return chain == top or chain.startswith(f"{top}-")


def _chain_names(save: str) -> list[str]:
    return [ln[1:].split()[0] for ln in save.splitlines() if ln.startswith(":")]


def transaction(top: str, current: ChainSet, target: ChainSet) -> str:
    """Restore input turning `current` into `target`; "" when both are empty."""
    if not (current.chains or current.jumps or target.chains):
        return ""
    declared = dict.fromkeys(current.chains + target.chains)  # creates or flushes each
    lines = ["*nat", *(f":{chain} - [0:0]" for chain in declared)]
    lines += [f"-D OUTPUT -j {top}"] * current.jumps  # re-inserted below: never doubled
    lines += [f"-I OUTPUT -j {top}"] * target.jumps
    lines += target.rules
    lines += [f"-X {chain}" for chain in reversed(current.chains) if chain not in target.chains]
    return "\n".join([*lines, "COMMIT"]) + "\n"


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


def _may_hold_rules(family: int) -> bool:
    """Whether this family's nat table can hold our chains, found without creating it.

    Legacy iptables instantiates a table just by listing it; where the kernel has
    no legacy nat table, none of our chains exist, and cleanup (run at every
    daemon start) or a remove() must not conjure one up. iptables-nft lists
    without creating anything.
    """
    tool = _TOOLS[family][0]
    if not _is_legacy(shutil.which(tool, path=tool_path()) or tool):
        return True
    try:
        return "nat" in Path(_LEGACY_TABLES[family]).read_text().split()
    except OSError:
        return False


# iptables-nft creates the nft tables `ip nat` / `ip6 nat` on first use and
# never removes them; we note which existed before we first touched iptables so
# that leaving puts the ruleset back exactly as it was (legacy tables are
# kernel built-ins and cannot be removed, so this is only for the nft variant).
log = logging.getLogger(__name__)
_NFT_NAT_TABLES = {4: "ip nat", 6: "ip6 nat"}
_nat_tables_before: set[str] | None = None


def _nft_nat_tables() -> set[str]:
    if _is_legacy(shutil.which(_TOOLS[4][0], path=tool_path()) or _TOOLS[4][0]):
        return set(_NFT_NAT_TABLES.values())  # nothing to manage: report all present
    if not which_tool("nft"):
        return set(_NFT_NAT_TABLES.values())
    listed = {
        line.removeprefix("table ").strip()
        for line in run_tool(["nft", "list", "tables"]).splitlines()
    }
    return listed & set(_NFT_NAT_TABLES.values())


def _remember_nat_tables() -> None:
    global _nat_tables_before
    if _nat_tables_before is None:
        _nat_tables_before = _nft_nat_tables()


def _drop_nat_tables_we_made() -> None:
    """Delete an `ip[6] nat` table iptables-nft made for us, if nothing else uses it."""
    if _nat_tables_before is None:
        return
    for family, table in _NFT_NAT_TABLES.items():
        if table in _nat_tables_before or table not in _nft_nat_tables():
            continue
        if any(line.startswith("-A ") for line in _save(family).splitlines()):
            continue  # someone else's rules arrived meanwhile: theirs now
        try:
            run_tool(["nft", "delete", "table", *table.split()])
        except FirewallError as e:
            log.warning("could not remove the empty %s table: %s", table, e)


@functools.cache  # per binary: PATH (and with it the variant) may differ between calls
def _is_legacy(save_binary: str) -> bool:
    return "(legacy)" in run_tool([save_binary, "--version"])


def _save(family: int) -> str:
    """`iptables-save -t nat`, or "" where that table does not exist (and must not)."""
    return run_tool([_TOOLS[family][0], "-t", "nat"]) if _may_hold_rules(family) else ""


def _change(family: int, top: str, current: ChainSet, target: ChainSet) -> None:
    text = transaction(top, current, target)
    if text:
        _restore(family, text)


def _restore(family: int, text: str) -> None:
    run_tool([_TOOLS[family][1], "-w", "--noflush"], text)


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
