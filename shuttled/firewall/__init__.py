"""The firewall layer: what to capture, as data, and one backend a file to install it.

    backend = detect()                       # nft, else iptables
    backend.apply([Capture("work", tuple(subnets), tcp_port=12300)])
    backend.remove()

Each apply() is one kernel transaction that makes our rules exactly the given
captures; rules live only in our own table (nft) or chains (iptables).
"""

from __future__ import annotations

import contextlib
import logging
import sys

from shuttled.const import NFT_TABLE, RUN_TABLE_PREFIX
from shuttled.errors import ConfigError, FirewallError
from shuttled.firewall import policy
from shuttled.firewall.base import Backend, Capture, Rule, capture_rules
from shuttled.firewall.iptables import IptablesBackend
from shuttled.firewall.nft import NftBackend
from shuttled.firewall.pf import PfBackend
from shuttled.instance import is_cleanup_target
from shuttled.net import Subnet, order_subnets, parse_subnet

__all__ = [
    "BACKENDS",
    "Backend",
    "Capture",
    "IptablesBackend",
    "NftBackend",
    "PfBackend",
    "Rule",
    "Subnet",
    "capture_rules",
    "cleanup_all",
    "detect",
    "order_subnets",
    "parse_subnet",
]

log = logging.getLogger(__name__)

# In the order "auto" tries them: nft is atomic across families and owns a whole table;
# pf (macOS, FreeBSD) first where it is the platform's firewall.
_LINUX: dict[str, type[Backend]] = {"nft": NftBackend, "iptables": IptablesBackend}
BACKENDS: dict[str, type[Backend]] = (
    {"pf": PfBackend, **_LINUX}
    if sys.platform == "darwin" or sys.platform.startswith("freebsd")
    else {**_LINUX, "pf": PfBackend}
)


def detect(
    method: str | None = None, table: str = NFT_TABLE, *, persistent: bool = False
) -> Backend:
    """The backend for `method` ("auto"/None: the first usable one) or FirewallError why not."""
    if method in (None, "auto"):
        reasons = []
        for cls in BACKENDS.values():
            reason = cls.unsupported_reason()
            if reason is None:
                return cls(table, persistent=persistent)
            reasons.append(f"{cls.name}: {reason}")
        raise FirewallError(f"no usable firewall backend ({'; '.join(reasons)})")
    forced = BACKENDS.get(method)
    if forced is None:
        raise ConfigError(f"firewall method {method!r}: expected auto, {', '.join(BACKENDS)}")
    reason = forced.unsupported_reason()
    if reason is not None:
        raise FirewallError(f"firewall method {method}: {reason}")
    return forced(table, persistent=persistent)


def live_owners() -> list[str]:
    """Who runs and owns rules here now: the daemon, one-shot runs (by pid)."""
    from shuttled.instance import owner

    found = []
    pid = owner()
    if pid is not None:
        found.append(f"the daemon (pid {pid})" if pid > 0 else "the daemon")
    for cls in BACKENDS.values():
        if not cls.present():
            continue
        with contextlib.suppress(FirewallError):
            found += [
                f"shuttled run (pid {t.removeprefix(RUN_TABLE_PREFIX)}, {cls.name})"
                for t in cls.instances()
                if t.startswith(RUN_TABLE_PREFIX) and not is_cleanup_target(t)
            ]
    return found


def cleanup_all(*, live: bool = False, lockdown: bool = False) -> list[str]:
    """Remove the daemon's rules and those of dead one-shot runs, in every backend present;
    with `live`, those of running ones too; with `lockdown`, the kill switch's lockdown.

    Returns what was removed ("nft shuttled", "iptables shuttled_run_42", ...).
    Every backend and table is tried even when one fails; failures are then
    raised together as one FirewallError.
    """
    removed: list[str] = []
    errors: list[str] = []
    for cls in BACKENDS.values():
        if not cls.present():
            continue
        try:
            stale = [
                t for t in cls.instances() if is_cleanup_target(t, live=live, lockdown=lockdown)
            ]
        except FirewallError as e:
            errors.append(f"{cls.name}: {e}")
            continue
        for table in stale:
            try:
                cls(table).remove()
            except FirewallError as e:
                errors.append(f"{cls.name} {table}: {e}")
                continue
            log.info("removed %s rules of %s", cls.name, table)
            removed.append(f"{cls.name} {table}")
    try:  # router mode's policy routing, unless a live instance still uses it
        policy.release("")
    except FirewallError as e:
        errors.append(f"policy routing: {e}")
    if errors:
        raise FirewallError(f"cleanup incomplete: {'; '.join(errors)}")
    return removed
