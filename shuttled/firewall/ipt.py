"""iptables mechanics, once for every table we use (nat, mangle, filter).

What iptables.py's rule sets are installed with: which tool per family, legacy
or iptables-nft, our chain names, reading our part of a table back from
iptables-save, the `iptables-restore --noflush` text that turns what the kernel
holds into what we want, an all-or-nothing commit over several (family, table)
pairs, and the nft tables iptables-nft makes on first use.

An instance is a top chain T (`SHUTTLED`, `SHUTTLED_run_<pid>`); every chain
it owns is T or T-*, in whichever table. A transaction declares each of our
chains (`:CHAIN - [0:0]` creates or flushes it), deletes each jump from a
built-in chain as often as it exists and inserts the wanted ones once, adds
the rules, and deletes chains no longer wanted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shuttled.const import IPT_CHAIN_PREFIX, NFT_TABLE, RUN_DIR
from shuttled.errors import FirewallError
from shuttled.net import run_tool, tool_path, which_tool

log = logging.getLogger(__name__)

MAX_CHAIN = 28  # iptables refuses longer chain names
TABLES = ("nat", "mangle", "filter")
TOOLS = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}
_LEGACY_TABLES = {4: "/proc/net/ip_tables_names", 6: "/proc/net/ip6_tables_names"}
_NFT_FAMILY = {4: "ip", 6: "ip6"}

BuiltinJump = tuple[str, str]  # (built-in chain, our chain)
Key = tuple[int, str]  # (family, table)
Undo = Callable[[], str]


@dataclass(frozen=True)
class ChainSet:
    """Our part of one family's table, in iptables-save spelling."""

    chains: tuple[str, ...] = ()  # the top chain first, when it is ours here
    rules: tuple[str, ...] = ()  # "-A <one of chains> ..."
    jumps: tuple[BuiltinJump, ...] = ()  # "-A <built-in> -j <ours>", as often as they exist

    def lines(self) -> list[str]:
        """As iptables-save would list it (for snapshots)."""
        declared = [f":{chain} - [0:0]" for chain in self.chains]
        return declared + [f"-A {b} -j {c}" for b, c in self.jumps] + list(self.rules)


# --- names ---------------------------------------------------------------------------


def top_chain(table: str) -> str:
    """`shuttled` -> `SHUTTLED`, `shuttled_run_42` -> `SHUTTLED_run_42` (and back by prefix)."""
    return IPT_CHAIN_PREFIX + table.removeprefix(NFT_TABLE)


def instance_table(top: str) -> str:
    """The other way: `SHUTTLED_run_42` -> `shuttled_run_42`."""
    return NFT_TABLE + top.removeprefix(IPT_CHAIN_PREFIX)


def chain_name(top: str, name: str) -> str:
    """`<top>-<name>`; too long for iptables: a prefix of name plus a hash of it."""
    full = f"{top}-{name}"
    if len(full) <= MAX_CHAIN:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{top}-{name[: MAX_CHAIN - len(top) - 1 - len(digest)]}{digest}"


def owned(chain: str, top: str) -> bool:
    return chain == top or chain.startswith(f"{top}-")


def families() -> tuple[int, ...]:
    # Without IPv6 in the kernel there is no IPv6 traffic to capture, and no
    # ip6tables table to put rules in.
    return (4, 6) if os.path.exists("/proc/net/if_inet6") else (4,)


# --- text ----------------------------------------------------------------------------


def chain_names(save: str) -> list[str]:
    return [ln[1:].split()[0] for ln in save.splitlines() if ln.startswith(":")]


def parse(save: str, top: str) -> ChainSet:
    """Our chains, rules and built-in jumps, from `iptables-save -t <table>`."""
    chains = [c for c in chain_names(save) if owned(c, top)]
    chains.sort(key=lambda c: c != top)
    rules: list[str] = []
    jumps: list[BuiltinJump] = []
    for line in save.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0] != "-A":
            continue
        if owned(parts[1], top):
            rules.append(line)
        elif len(parts) == 4 and parts[2] == "-j" and owned(parts[3], top):
            jumps.append((parts[1], parts[3]))  # a bare jump: ours (a matched one is not)
    return ChainSet(tuple(chains), tuple(rules), tuple(jumps))


def transaction(table: str, current: ChainSet, target: ChainSet) -> str:
    """Restore input turning `current` into `target`; "" when both are empty."""
    if not (current.chains or current.jumps or target.chains):
        return ""
    declared = dict.fromkeys(current.chains + target.chains)  # creates or flushes each
    lines = [f"*{table}", *(f":{chain} - [0:0]" for chain in declared)]
    lines += [f"-D {builtin} -j {chain}" for builtin, chain in current.jumps]
    lines += [f"-I {builtin} -j {chain}" for builtin, chain in target.jumps]  # never doubled
    lines += target.rules
    lines += [f"-X {chain}" for chain in reversed(current.chains) if chain not in target.chains]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def restore_text(family: int, text: str) -> str:
    """One transaction as render() shows it: the command it is fed to, then the text."""
    return f"# {TOOLS[family][1]} -w --noflush\n{text}" if text else ""


# --- the kernel ----------------------------------------------------------------------


def is_legacy(family: int = 4) -> bool:
    tool = TOOLS[family][0]
    return _is_legacy_binary(shutil.which(tool, path=tool_path()) or tool)


@functools.cache  # per binary: PATH (and with it the variant) may differ between calls
def _is_legacy_binary(save_binary: str) -> bool:
    return "(legacy)" in run_tool([save_binary, "--version"])


def may_hold_rules(family: int, table: str) -> bool:
    """Whether this family's table can hold our chains, found without creating it.

    Legacy iptables instantiates a table just by listing it; where the kernel has
    no such legacy table, none of our chains exist, and cleanup (run at every
    daemon start) or a remove() must not conjure one up. iptables-nft lists
    without creating anything.
    """
    if not which_tool(TOOLS[family][0]):
        return False
    if not is_legacy(family):
        return True
    try:
        return table in Path(_LEGACY_TABLES[family]).read_text().split()
    except OSError:
        return False


def save(family: int, table: str) -> str:
    """`iptables-save -t <table>`, or "" where that table does not exist (and must not)."""
    return run_tool([TOOLS[family][0], "-t", table]) if may_hold_rules(family, table) else ""


def restore(family: int, text: str) -> None:
    run_tool([TOOLS[family][1], "-w", "--noflush"], text)


def state(top: str, key: Key) -> ChainSet:
    family, table = key
    return parse(save(family, table), top)


def change(key: Key, current: ChainSet, target: ChainSet) -> None:
    family, table = key
    text = transaction(table, current, target)
    if text:
        restore(family, text)


def commit(top: str, wanted: Mapping[Key, ChainSet]) -> Undo:
    """Make our chains in each (family, table) exactly `wanted`'s, in that order, all or
    nothing. Returns a function that puts back what was there before (it returns ""
    or a note of what it could not).

    The tables iptables-nft may create on the way are recorded first (see remember).
    """
    remember(top)
    done: list[tuple[Key, ChainSet]] = []
    for key, target in wanted.items():
        before = state(top, key)
        try:
            change(key, before, target)
        except FirewallError as e:
            raise FirewallError(f"{key[1]} chains of {top}: {e}{_undo(top, done)}") from None
        done.append((key, before))
    return lambda: _undo(top, done)


def _undo(top: str, done: Iterable[tuple[Key, ChainSet]]) -> str:
    """Put back the tables already changed; a note for the error message if that fails."""
    for key, before in done:
        try:
            change(key, state(top, key), before)
        except FirewallError as e:
            return f" (and putting back the IPv{key[0]} {key[1]} rules failed too: {e})"
    return ""


def instance_tops() -> set[str]:
    """Top chains with chains in any of our tables (SHUTTLED, SHUTTLED_run_9)."""
    return {
        chain.split("-", 1)[0]
        for family in families()
        for table in TABLES
        for chain in chain_names(save(family, table))
        if chain.startswith(IPT_CHAIN_PREFIX)
    }


# --- the nft tables iptables-nft makes -----------------------------------------------
#
# iptables-nft creates `ip nat`, `ip mangle`, `ip filter` ... on first use and never
# removes them: remember which existed before an instance touched them (in memory, and
# in a file per network namespace and instance, for a cleanup after SIGKILL), and drop
# the ones it made once nothing is in them. Per instance (top chain): the daemon runs
# two (its own and the lockdown), and the lockdown may have been made by another
# process (at boot), whose record is the one that counts. Legacy tables are kernel
# built-ins and cannot be removed: this is only for the nft variant.

_tables_before: dict[str, set[str]] = {}


def nft_tables() -> set[str]:
    """Which of the nft tables iptables-nft would use for ours exist now."""
    names = {f"{_NFT_FAMILY[f]} {t}" for f in (4, 6) for t in TABLES}
    if not which_tool("nft") or is_legacy():
        return names  # nothing to manage: report all present
    listed = {
        line.removeprefix("table ").strip()
        for line in run_tool(["nft", "list", "tables"]).splitlines()
    }
    return listed & names


def _record_path(top: str) -> Path:
    netns = os.stat("/proc/self/ns/net").st_ino
    return RUN_DIR / f"iptables-tables-{netns}-{top}.json"


def remember(top: str) -> None:
    """What existed before this instance first touched iptables: its record if one was
    left (a crashed run of it), else what exists now, recorded before any rule goes in."""
    recorded = _recorded(top)
    if top not in _tables_before and which_tool(TOOLS[4][0]):
        _tables_before[top] = recorded if recorded is not None else nft_tables()
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


def forget(top: str) -> None:
    """The instance's rules are gone: its record with them (the memory stays, for
    tables that could not be dropped yet)."""
    _record_path(top).unlink(missing_ok=True)


def drop_tables_made_by(top: str, tables: Sequence[str]) -> None:
    before = _tables_before.get(top)
    if before is None:
        before = _recorded(top)  # `shuttled cleanup`: another process made them
    if before is not None:
        drop_tables_made(before, tables)


def drop_tables_made(before: set[str], tables: Sequence[str]) -> None:
    """Delete each nft table of `tables` not in `before`, if nothing is in it."""
    present = nft_tables()
    for family in (4, 6):
        for table in tables:
            name = f"{_NFT_FAMILY[family]} {table}"
            if name in before or name not in present:
                continue
            if any(ln.startswith("-A ") for ln in save(family, table).splitlines()):
                continue  # someone else's rules arrived meanwhile: theirs now
            try:
                run_tool(["nft", "delete", "table", *name.split()])
            except FirewallError as e:
                log.warning("could not remove the empty %s table: %s", name, e)
