"""The policy routing TPROXY needs: marked packets are delivered locally.

    ip rule add fwmark M/M lookup T priority P        (IPv4 and IPv6)
    ip route replace local default dev lo table T

M, T and P are const.TPROXY_MARK, POLICY_TABLE and POLICY_PRIORITY: a rule and
a table that are ours alone, so finding them by those numbers finds only
ours. The firewall backends make them together with rules that use TPROXY and
take them away with the last such rule of any shuttled instance (the daemon
and one-shot runs share them); `shuttled cleanup` does the same.
"""

from __future__ import annotations

import json
import logging
import os
import re

from shuttled.const import (
    IPT_CHAIN_PREFIX,
    NFT_TABLE,
    POLICY_PRIORITY,
    POLICY_TABLE,
    TPROXY_MARK,
)
from shuttled.errors import FirewallError
from shuttled.net import run_tool, which_tool

log = logging.getLogger(__name__)

IP = "ip"
_MARK = f"{TPROXY_MARK:#x}/{TPROXY_MARK:#x}"
_made: set[str] = set()  # instances (tables) of this process that made them
_DEFAULT = {4: "0.0.0.0/0", 6: "::/0"}


def families() -> tuple[int, ...]:
    return (4, 6) if os.path.exists("/proc/net/if_inet6") else (4,)


def _rules(family: int) -> list[dict[str, object]]:
    out = run_tool([IP, "-j", f"-{family}", "rule", "show"])
    try:
        rules = json.loads(out or "[]")
    except ValueError as exc:
        raise FirewallError(f"ip -j rule show: unreadable output ({exc})") from None
    return [r for r in rules if isinstance(r, dict)]


def _ours(rule: dict[str, object]) -> bool:
    return rule.get("priority") == POLICY_PRIORITY and str(rule.get("table")) == str(POLICY_TABLE)


def rule_present(family: int) -> bool:
    return any(_ours(r) for r in _rules(family))


def route_present(family: int) -> bool:
    try:
        out = run_tool([IP, f"-{family}", "route", "show", "table", str(POLICY_TABLE)])
    except FirewallError as exc:
        if "does not exist" in str(exc):  # a table never used is no table at all
            return False
        raise
    return bool(out.strip())


def describe() -> str:
    """Our rule and route, per family, as present or not (for change detection)."""
    return "".join(
        f"# policy ipv{f}: rule {rule_present(f)}, route {route_present(f)}\n" for f in families()
    )


def ensure(owner: str) -> None:
    """Make the rule and route for every family (idempotent), for `owner` (a table)."""
    _made.add(owner)
    for family in families():
        run_tool(
            [
                IP,
                f"-{family}",
                "route",
                "replace",
                "local",
                _DEFAULT[family],
                "dev",
                "lo",
                "table",
                str(POLICY_TABLE),
            ]
        )
        if not rule_present(family):
            run_tool(
                [
                    IP,
                    f"-{family}",
                    "rule",
                    "add",
                    "fwmark",
                    _MARK,
                    "lookup",
                    str(POLICY_TABLE),
                    "priority",
                    str(POLICY_PRIORITY),
                ]
            )


def remove() -> None:
    """Delete our rules (however many) and flush our table, in every family."""
    for family in families():
        for _ in range(sum(1 for r in _rules(family) if _ours(r))):
            run_tool(
                [
                    IP,
                    f"-{family}",
                    "rule",
                    "del",
                    "priority",
                    str(POLICY_PRIORITY),
                    "table",
                    str(POLICY_TABLE),
                ]
            )
        if route_present(family):
            run_tool([IP, f"-{family}", "route", "flush", "table", str(POLICY_TABLE)])


def release(owner: str, *, only_if_made: bool = False) -> None:
    """`owner` (a table name) no longer uses TPROXY: remove ours unless another instance does.

    `only_if_made`: skip the kernel queries when this instance never made them (every
    apply of a plain local capture would otherwise pay for them).
    """
    if only_if_made and owner not in _made:
        return
    _made.discard(owner)
    if not any(rule_present(f) or route_present(f) for f in families()):
        return  # the common case, and cheap: nothing of ours to take away
    users = [t for t in tproxy_users() if t != owner]
    if users:
        log.debug("policy routing kept: still used by %s", ", ".join(users))
        return
    remove()


_NFT_TABLE_RE = re.compile(rf"^table inet ({re.escape(NFT_TABLE)}\S*) \{{", re.M)


def tproxy_users() -> list[str]:
    """Instance tables that hold TPROXY rules now, in nft or iptables (mangle)."""
    users: set[str] = set()
    if which_tool("nft"):
        users |= _nft_users(run_tool(["nft", "list", "ruleset"]))
    for family, tool in ((4, "iptables-save"), (6, "ip6tables-save")):
        if family in families() and which_tool(tool):
            users |= ipt_users(run_tool([tool, "-t", "mangle"]))
    return sorted(users)


def _nft_users(ruleset: str) -> set[str]:
    users = set()
    blocks = _NFT_TABLE_RE.split(ruleset)
    # split() alternates: text before, name, body, name, body ...
    for name, body in zip(blocks[1::2], blocks[2::2], strict=True):
        head = body.split("\ntable ", 1)[0]
        if " tproxy " in head:
            users.add(name)
    return users


def ipt_users(save: str) -> set[str]:
    users = set()
    for line in save.splitlines():
        parts = line.split()
        if (
            len(parts) > 1
            and parts[0] == "-A"
            and parts[1].startswith(IPT_CHAIN_PREFIX)
            and "-j TPROXY" in line
        ):
            top = parts[1].split("-", 1)[0]
            users.add(NFT_TABLE + top.removeprefix(IPT_CHAIN_PREFIX))
    return users
