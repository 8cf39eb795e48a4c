"""Router mode for the iptables backend: our chains in the mangle and filter tables.

The nat chains stay iptables.py's. Here, per instance top chain T
(`SHUTTLED`, `SHUTTLED_run_<pid>`), with names the nat layout cannot produce
(a profile name has no "."), so every chain is still T or T-*:

    mangle  T          <- PREROUTING   jumps to T-<profile>: TPROXY (LAN, UDP)
            T-.out     <- OUTPUT       jumps to T-.m.<profile>: mark local UDP
    filter  T          <- OUTPUT       jumps to T-<profile>: kill switch rejects
            T-.fwd     <- FORWARD      (the same chains, for the LAN)

TPROXY is only valid in mangle PREROUTING and REJECT only in filter, hence two
tables, and two top chains each (an owner match is refused where FORWARD
reaches). Each (family, table) changes by one `iptables-restore --noflush`
computed from what the kernel holds, exactly like the nat table; `commit`
returns how to put everything back, for the caller's all-or-nothing apply.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shuttled.const import RUN_DIR
from shuttled.errors import FirewallError
from shuttled.firewall.base import Capture
from shuttled.firewall.tproxy import Jump, RouterRules, RRule, ipt_jump, ipt_rules, router_rules
from shuttled.net import run_tool, tool_path, which_tool

log = logging.getLogger(__name__)

TABLES = ("mangle", "filter")
MAX_CHAIN = 28
_TOOLS = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}
_LEGACY_TABLES = {4: "/proc/net/ip_tables_names", 6: "/proc/net/ip6_tables_names"}
_NFT_FAMILY = {4: "ip", 6: "ip6"}

BuiltinJump = tuple[str, str]  # (built-in chain, our chain)


@dataclass(frozen=True)
class TableSet:
    """Our part of one family's table, in iptables-save spelling."""

    chains: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()  # "-A <one of chains> ..."
    jumps: tuple[BuiltinJump, ...] = ()  # "-A <built-in> -j <ours>", as often as they exist


def chain_name(top: str, name: str) -> str:
    """`<top>-<name>`; too long for iptables: a prefix of name plus a hash of it."""
    full = f"{top}-{name}"
    if len(full) <= MAX_CHAIN:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{top}-{name[: MAX_CHAIN - len(top) - 1 - len(digest)]}{digest}"


def wanted(top: str, family: int, table: str, rules: RouterRules) -> TableSet:
    if table == "mangle":
        parts = [
            _part(top, top, "PREROUTING", rules.pre_jumps, family, rules.tproxy, ""),
            _part(
                top, chain_name(top, ".out"), "OUTPUT", rules.out_jumps, family, rules.marks, ".m."
            ),
        ]
    else:
        parts = [
            _part(top, top, "OUTPUT", rules.hold_out_jumps, family, rules.holds, ""),
            _part(top, chain_name(top, ".fwd"), "FORWARD", rules.hold_fwd_jumps, family, {}, ""),
        ]
    chains: list[str] = []
    body: list[str] = []
    jumps: list[BuiltinJump] = []
    for p_chains, p_rules, p_jumps in parts:
        chains += [c for c in p_chains if c not in chains]
        body += p_rules
        jumps += p_jumps
    return TableSet(tuple(chains), tuple(body), tuple(jumps))


def _part(
    top: str,
    base: str,
    builtin: str,
    jumps: Sequence[Jump],
    family: int,
    bodies: dict[str, tuple[RRule, ...]],
    infix: str,
) -> tuple[list[str], list[str], list[BuiltinJump]]:
    """One base chain (jumped to from `builtin`) and the per-capture chains it jumps to."""
    if not jumps:
        return [], [], []
    chains, rules = [base], []
    for jump in jumps:
        spec = ipt_jump(jump, family, chain_name(top, infix + jump.chain))
        if spec is not None:
            rules.append(f"-A {base} {spec}")
    for name, body in bodies.items():
        chain = chain_name(top, infix + name)
        chains.append(chain)
        rules += [
            f"-A {chain} {spec}"
            for rule in body
            if rule.family == family
            for spec in ipt_rules(rule)
        ]
    return chains, rules, [(builtin, base)]


def parse(save: str, top: str) -> TableSet:
    """Our chains, rules and built-in jumps, from `iptables-save -t <table>`."""
    names = [ln[1:].split()[0] for ln in save.splitlines() if ln.startswith(":")]
    chains = tuple(c for c in names if _owned(c, top))
    rules: list[str] = []
    jumps: list[BuiltinJump] = []
    for line in save.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0] != "-A":
            continue
        if _owned(parts[1], top):
            rules.append(line)
        elif parts[2:] and parts[-2] == "-j" and _owned(parts[-1], top) and len(parts) == 4:
            jumps.append((parts[1], parts[-1]))
    return TableSet(chains, tuple(rules), tuple(jumps))


def _owned(chain: str, top: str) -> bool:
    return chain == top or chain.startswith(f"{top}-")


def transaction(table: str, current: TableSet, target: TableSet) -> str:
    """Restore input turning `current` into `target`; "" when both are empty."""
    if not (current.chains or current.jumps or target.chains):
        return ""
    declared = dict.fromkeys(current.chains + target.chains)  # creates or flushes each
    lines = [f"*{table}", *(f":{chain} - [0:0]" for chain in declared)]
    lines += [f"-D {builtin} -j {chain}" for builtin, chain in current.jumps]
    lines += [f"-I {builtin} -j {chain}" for builtin, chain in target.jumps]
    lines += target.rules
    lines += [f"-X {chain}" for chain in reversed(current.chains) if chain not in target.chains]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def render(top: str, captures: Sequence[Capture]) -> str:
    """The transactions that install these captures' router rules from nothing (pure)."""
    rules = router_rules(captures)
    parts = []
    for family in (4, 6):
        for table in TABLES:
            text = transaction(table, TableSet(), wanted(top, family, table, rules))
            if text:
                parts.append(f"# {_TOOLS[family][1]} -w --noflush\n{text}")
    return "".join(parts)


Undo = Callable[[], str]


def commit(top: str, families: Sequence[int], captures: Sequence[Capture]) -> Undo:
    """Make our mangle/filter chains exactly these captures' (all or nothing).

    Returns a function that puts back what was there before (for when the nat
    change after this one fails); it returns "" or a note of what it could not.
    """
    rules = router_rules(captures)
    _remember_tables(top)
    done: list[tuple[int, str, TableSet]] = []
    for family in families:
        for table in TABLES:
            target = wanted(top, family, table, rules)
            before = _state(family, table, top)
            try:
                _change(family, table, before, target)
            except FirewallError as e:
                raise FirewallError(f"{table} chains of {top}: {e}{_undo(top, done)}") from None
            done.append((family, table, before))
    if rules.empty:
        _drop_tables_we_made(TABLES, top)
    return lambda: _undo(top, done)


def remove(top: str, families: Sequence[int]) -> None:
    """Remove our mangle/filter chains, then every iptables-nft table made for this
    instance (nat too: after a SIGKILL, `shuttled cleanup` is another process that
    only knows what the instance recorded)."""
    commit(top, families, [])
    _drop_tables_we_made(ALL_TABLES, top)
    _record_path(top).unlink(missing_ok=True)


def _undo(top: str, done: Sequence[tuple[int, str, TableSet]]) -> str:
    for family, table, before in done:
        try:
            _change(family, table, _state(family, table, top), before)
        except FirewallError as e:
            return f" (and putting back the IPv{family} {table} rules failed too: {e})"
    return ""


def instances(families: Sequence[int]) -> set[str]:
    """Top chain names with chains in mangle or filter (SHUTTLED, SHUTTLED_run_9)."""
    tops = set()
    for family in families:
        for table in TABLES:
            for line in _save(family, table).splitlines():
                if line.startswith(":SHUTTLED"):
                    tops.add(line[1:].split()[0].split("-", 1)[0])
    return tops


def snapshot(top: str, families: Sequence[int]) -> str:
    """Our mangle and filter chains as the kernel lists them now."""
    parts = []
    for family in families:
        for table in TABLES:
            state = _state(family, table, top)
            if state.chains or state.jumps:
                parts.append(f"# {_TOOLS[family][0]} -t {table}\n{state}\n")
    return "".join(parts)


def _state(family: int, table: str, top: str) -> TableSet:
    return parse(_save(family, table), top)


def _change(family: int, table: str, current: TableSet, target: TableSet) -> None:
    text = transaction(table, current, target)
    if text:
        run_tool([_TOOLS[family][1], "-w", "--noflush"], text)


def _save(family: int, table: str) -> str:
    """`iptables-save -t <table>`, or "" where that table does not exist (and must not)."""
    if not _may_hold_rules(family, table):
        return ""
    return run_tool([_TOOLS[family][0], "-t", table])


def _may_hold_rules(family: int, table: str) -> bool:
    # Legacy iptables instantiates a table just by listing it; iptables-nft does not.
    tool = _TOOLS[family][0]
    if not which_tool(tool):
        return False
    if not _is_legacy(shutil.which(tool, path=tool_path()) or tool):
        return True
    try:
        return table in Path(_LEGACY_TABLES[family]).read_text().split()
    except OSError:
        return False


@functools.cache
def _is_legacy(save_binary: str) -> bool:
    return "(legacy)" in run_tool([save_binary, "--version"])


# iptables-nft creates `ip nat`, `ip mangle`, `ip filter` ... on first use and never
# removes them: remember which existed before we touched them (in memory, and in a
# file per network namespace and instance, for a cleanup after SIGKILL), and drop
# the ones we made once nothing is in them. Per instance (top chain): the daemon runs
# two (its own and the lockdown), and the lockdown may have been made by another
# process (at boot), whose record is the one that counts.
ALL_TABLES = ("nat", *TABLES)
_tables_before: dict[str, set[str]] = {}


def _record_path(top: str) -> Path:
    netns = os.stat("/proc/self/ns/net").st_ino
    return RUN_DIR / f"iptables-tables-{netns}-{top}.json"


def _nft_tables() -> set[str]:
    wanted_names = {f"{_NFT_FAMILY[f]} {t}" for f in (4, 6) for t in ALL_TABLES}
    if not which_tool("nft") or _is_legacy(
        shutil.which(_TOOLS[4][0], path=tool_path()) or _TOOLS[4][0]
    ):
        return wanted_names  # nothing to manage: report all present
    listed = {
        line.removeprefix("table ").strip()
        for line in run_tool(["nft", "list", "tables"]).splitlines()
    }
    return listed & wanted_names


def _remember_tables(top: str) -> None:
    """What existed before this instance first touched iptables: its record if one was
    left (a crashed run of it), else what exists now, recorded."""
    recorded = _recorded(top)
    if top not in _tables_before and which_tool(_TOOLS[4][0]):
        _tables_before[top] = recorded if recorded is not None else _nft_tables()
    if recorded is None and top in _tables_before:
        path = _record_path(top)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(sorted(_tables_before[top])))
        except OSError as e:  # only a cleanup after a crash needs it
            log.debug("cannot record the iptables-nft tables: %s", e)


def _recorded(top: str) -> set[str] | None:
    try:
        return set(json.loads(_record_path(top).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _drop_tables_we_made(tables: Sequence[str], top: str) -> None:
    before = _tables_before.get(top)
    if before is None:
        before = _recorded(top)  # `shuttled cleanup`: another process made them
    if before is None:
        return
    present = _nft_tables()
    for family in (4, 6):
        for table in tables:
            name = f"{_NFT_FAMILY[family]} {table}"
            if name in before or name not in present:
                continue
            if any(ln.startswith("-A ") for ln in _save(family, table).splitlines()):
                continue  # someone else's rules arrived meanwhile: theirs now
            try:
                run_tool(["nft", "delete", "table", *name.split()])
            except FirewallError as e:
                log.warning("could not remove the empty %s table: %s", name, e)


def families() -> tuple[int, ...]:
    return (4, 6) if os.path.exists("/proc/net/if_inet6") else (4,)
