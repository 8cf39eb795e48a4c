"""Who may do what: root, the admin group, and a profile's `allow` list.

The control API (api.authorize) asks these for every mutating call, from the
peer's credentials (SO_PEERCRED on the Unix socket, the bus's own answer on
D-Bus). Names are looked up at each call, so a user or group created after the
configuration was loaded counts without a reload.
"""

from __future__ import annotations

from collections.abc import Sequence

from shuttled import const
from shuttled.net import gid_of, uid_of


def is_admin(uid: int, gids: Sequence[int]) -> bool:
    """Root, or a member of const.ADMIN_GROUP: may reload and up/down any profile."""
    if uid == 0:
        return True
    admin = gid_of(const.ADMIN_GROUP)
    return admin is not None and admin in gids


def may_manage(allow: Sequence[str], uid: int, gids: Sequence[int]) -> bool:
    """May this caller bring a profile with this `allow` list up or down?

    `allow` holds normalized entries, "user:NAME" and "group:NAME" (config.py).
    """
    if is_admin(uid, gids):
        return True
    for entry in allow:
        kind, _, name = entry.partition(":")
        if kind == "user" and uid_of(name) == uid:
            return True
        if kind == "group" and (gid := gid_of(name)) is not None and gid in gids:
            return True
    return False
