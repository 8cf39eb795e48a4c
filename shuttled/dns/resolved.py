"""Split DNS through systemd-resolved: a link per profile, configured over D-Bus.

This is how NetworkManager, wg-quick and Tailscale hand resolved a VPN's names:
the profile gets a link of its own (`shuttled-<short>`, kind dummy, or ifb on
kernels built without dummy), resolved is told over its D-Bus API
(org.freedesktop.resolve1.Manager) that the link's DNS server is our listener,
that the profile's domains are routing-only domains of that link (`~domain`),
and that the link is not a default route for other names. Every other name
stays with the user's own resolvers, untouched.

Why a link with an address of its own (out of DNS_LINK_NET) and not 127.0.0.x:
resolved sends a link's queries from a socket bound to that link, and the
kernel routes a loopback destination only over lo, so a loopback server on any
other link is unreachable. A /32 on the link itself is "local" through that
very link. resolved also ignores links without an address, and links that are
down.

Used only when resolved owns its bus name AND runs in our network namespace:
in a namespace of its own (a container, the test lab) resolved would apply our
interface index to one of ITS links.

Undone by RevertLink and by deleting the link (resolved forgets a link that
goes away), on down, and by `shuttled cleanup` after a crash: our links carry
the owner in their alias (`shuttled <table> <profile>`), so a cleanup removes
the daemon's and those of one-shot runs whose process is gone, like the
firewall tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shuttled import const
from shuttled.errors import ShuttledError
from shuttled.instance import is_cleanup_target
from shuttled.net import communicate, run_tool, tool_env, which_tool

log = logging.getLogger(__name__)

RESOLVE1_PATH = "/org/freedesktop/resolve1"
RESOLVE1_MANAGER = "org.freedesktop.resolve1.Manager"
NO_SUCH_LINK = "org.freedesktop.resolve1.NoSuchLink"
CALL_TIMEOUT = 5.0
LINK_KNOWN_TIMEOUT = 3.0  # resolved learns about a new link from rtnetlink, soon after
LINK_KINDS = ("dummy", "ifb")  # ifb where the kernel has no dummy driver
IP_TIMEOUT = 10.0
IFNAMSIZ = 15
_OWNER_CHANGES = (
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    f"member='NameOwnerChanged',arg0='{const.RESOLVED_BUS_NAME}'"
)
_SHORT_RE = re.compile(r"[A-Za-z0-9_-]{1,6}")


class ResolvedError(ShuttledError):
    """systemd-resolved refused a call, or a link could not be made."""

    code = "resolved"


def _ip_now(*args: str) -> str:
    """`ip` run synchronously (cleanup, no event loop); ResolvedError when it fails."""
    return run_tool(["ip", *args], error=ResolvedError, timeout=IP_TIMEOUT)


# --- links -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DnsLink:
    name: str
    ifindex: int
    address: ipaddress.IPv4Address


def link_name(profile: str, owner: str) -> str:
    """`shuttled-work` for the daemon's profile `work`; a name too long for IFNAMSIZ, or
    one of a one-shot run, keeps two letters and a hash of owner and profile."""
    room = IFNAMSIZ - len(const.DNS_LINK_PREFIX)
    if owner == const.NFT_TABLE and len(profile) <= room and _SHORT_RE.fullmatch(profile):
        return const.DNS_LINK_PREFIX + profile
    digest = hashlib.sha256(f"{owner}/{profile}".encode()).hexdigest()
    return const.DNS_LINK_PREFIX + profile[:2] + digest[: room - len(profile[:2])]


def link_alias(profile: str, owner: str) -> str:
    return f"shuttled {owner} {profile}"


async def _ip(*args: str) -> str:
    """Run `ip` (iproute2); its stdout, or ResolvedError with its stderr."""
    proc = await asyncio.create_subprocess_exec(
        "ip",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=tool_env(),
    )
    try:
        out, err = await communicate(proc, IP_TIMEOUT)
    except TimeoutError:
        raise ResolvedError(f"ip {' '.join(args)}: no answer in {IP_TIMEOUT:g} s") from None
    if proc.returncode != 0:
        raise ResolvedError(f"ip {' '.join(args)}: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


async def create_link(profile: str, owner: str) -> DnsLink:
    """Our link for a profile, up, with a free address out of DNS_LINK_NET."""
    name = link_name(profile, owner)
    with contextlib.suppress(ResolvedError):
        await _ip("link", "del", "dev", name)  # a leftover of ours after a crash
    await _add_link(name)
    try:
        await _ip("link", "set", "dev", name, "alias", link_alias(profile, owner))
        address = _free_address(json.loads(await _ip("-j", "addr", "show")), name)
        await _ip("addr", "add", f"{address}/32", "dev", name)
        await _ip("link", "set", "dev", name, "up")
        return DnsLink(name, socket.if_nametoindex(name), address)
    except (ResolvedError, OSError, ValueError) as exc:
        await delete_link(name)
        raise ResolvedError(f"link {name}: {exc}") from None


async def _add_link(name: str) -> None:
    problems = []
    for kind in LINK_KINDS:
        try:
            await _ip("link", "add", "name", name, "type", kind)
            return
        except ResolvedError as exc:
            problems.append(str(exc))
    raise ResolvedError(f"cannot make link {name}: {'; '.join(problems)}")


def _free_address(addresses: Any, name: str) -> ipaddress.IPv4Address:
    """The first address of DNS_LINK_NET no interface has, starting from a spot the
    link name picks (two processes rarely race for the same one)."""
    used = {
        info.get("local")
        for link in addresses
        if isinstance(link, dict)
        for info in link.get("addr_info", [])
        if isinstance(info, dict)
    }
    hosts = list(ipaddress.IPv4Network(const.DNS_LINK_NET).hosts())
    start = int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(hosts)
    for step in range(len(hosts)):
        candidate = hosts[(start + step) % len(hosts)]
        if str(candidate) not in used:
            return candidate
    raise ResolvedError(f"no free address left in {const.DNS_LINK_NET}")


async def delete_link(name: str) -> None:
    try:
        await _ip("link", "del", "dev", name)
    except ResolvedError as exc:
        if "Cannot find device" not in str(exc):
            log.warning("could not delete link %s: %s", name, exc)


def stale_link_names(links: Any) -> list[str]:
    """Our links (by name prefix) whose owner is gone: the daemon's (its start and
    `shuttled cleanup` run when it is not), and dead one-shot runs' (owner in the alias)."""
    names = []
    for link in links if isinstance(links, list) else []:
        name = link.get("ifname") if isinstance(link, dict) else None
        if not isinstance(name, str) or not name.startswith(const.DNS_LINK_PREFIX):
            continue
        alias = str(link.get("ifalias", "")).split()
        owner = alias[1] if len(alias) == 3 and alias[0] == "shuttled" else const.NFT_TABLE
        if is_cleanup_target(owner):
            names.append(name)
    return names


def cleanup_links() -> list[str]:
    """Delete stale links of ours (resolved forgets their settings with them)."""
    if not which_tool("ip"):
        return []  # no iproute2 (macOS, FreeBSD): we never made a link here
    try:
        links = json.loads(_ip_now("-j", "link", "show"))
    except (ShuttledError, ValueError) as exc:
        log.warning("cannot list links to clean up: %s", exc)
        return []
    removed = []
    for name in stale_link_names(links):
        try:
            _ip_now("link", "del", "dev", name)
        except ShuttledError as exc:
            log.warning("could not delete link %s: %s", name, exc)
        else:
            removed.append(f"link {name}")
    return removed


# --- resolved over D-Bus --------------------------------------------------------------------


def _same_netns(pid: int) -> bool:
    try:
        theirs, ours = os.stat(f"/proc/{pid}/ns/net"), os.stat("/proc/self/ns/net")
    except OSError:  # another pid namespace, or gone: cannot tell, so not ours
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


class Resolved:
    """systemd-resolved's Manager object, over one system-bus connection."""

    def __init__(self, bus: Any) -> None:
        self._bus = bus
        self._tasks: set[asyncio.Future[None]] = set()

    @classmethod
    async def connect(cls) -> Resolved | None:
        """resolved on the system bus, running in this network namespace; else None."""
        try:
            from dbus_fast import BusType
            from dbus_fast.aio import MessageBus

            async with asyncio.timeout(CALL_TIMEOUT):
                bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        except Exception as exc:  # no bus, no dbus-fast: the firewall path will do
            log.debug("no system bus for systemd-resolved: %s", exc)
            return None
        client = cls(bus)
        try:
            if await client._usable():
                return client
        except (ResolvedError, TimeoutError) as exc:
            log.debug("systemd-resolved not usable: %s", exc)
        client.close()
        return None

    async def _usable(self) -> bool:
        bus_name = const.RESOLVED_BUS_NAME
        if not (await self._call_bus("NameHasOwner", "s", bus_name))[0]:
            return False
        pid = (await self._call_bus("GetConnectionUnixProcessID", "s", bus_name))[0]
        if not _same_netns(int(pid)):
            log.info(
                "systemd-resolved (pid %s) runs in another network namespace: "
                "split DNS goes through the firewall instead",
                pid,
            )
            return False
        return True

    async def _call_bus(self, member: str, signature: str, *body: Any) -> list[Any]:
        return await self._call(
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            member,
            signature,
            body,
        )

    async def _manager(self, member: str, signature: str, *body: Any) -> list[Any]:
        return await self._call(
            const.RESOLVED_BUS_NAME, RESOLVE1_PATH, RESOLVE1_MANAGER, member, signature, body
        )

    async def _call(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str,
        body: Sequence[Any],
    ) -> list[Any]:
        from dbus_fast import Message, MessageType

        message = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
        )
        async with asyncio.timeout(CALL_TIMEOUT):
            reply = await self._bus.call(message)
        if reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply.body else ""
            raise ResolvedError(
                f"{member}: {reply.error_name}: {detail}",
            ) from None
        return list(reply.body)

    async def configure(self, link: DnsLink, domains: Sequence[str]) -> None:
        """Our listener as the link's DNS server, domains routed to it, nothing else."""
        await self._when_known(
            self._manager,
            "SetLinkDNS",
            "ia(iay)",
            link.ifindex,
            [[socket.AF_INET, link.address.packed]],
        )
        await self.set_domains(link, domains)
        await self._manager("SetLinkDefaultRoute", "ib", link.ifindex, False)

    async def set_domains(self, link: DnsLink, domains: Sequence[str]) -> None:
        await self._manager(
            "SetLinkDomains", "ia(sb)", link.ifindex, [[domain, True] for domain in domains]
        )

    async def revert(self, link: DnsLink) -> None:
        try:
            await self._manager("RevertLink", "i", link.ifindex)
        except (ResolvedError, TimeoutError) as exc:
            log.debug("RevertLink %s: %s", link.name, exc)

    async def _when_known(self, call: Any, *args: Any) -> None:
        """Retry while resolved has not seen the new link yet (NoSuchLink)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINK_KNOWN_TIMEOUT
        while True:
            try:
                await call(*args)
                return
            except ResolvedError as exc:
                if NO_SUCH_LINK not in str(exc) or loop.time() > deadline:
                    raise
            await asyncio.sleep(0.05)

    async def watch_restarts(self, on_restart: Callable[[], Awaitable[None]]) -> None:
        """Call `on_restart` each time resolved's bus name gets a new owner: a
        restarted resolved may have forgotten what we told it about our link."""
        from dbus_fast import Message

        def handler(msg: Message) -> None:
            if (
                msg.member == "NameOwnerChanged"
                and msg.path == "/org/freedesktop/DBus"
                and len(msg.body) == 3
                and msg.body[0] == const.RESOLVED_BUS_NAME
                and msg.body[2]
            ):
                task = asyncio.ensure_future(on_restart())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        self._bus.add_message_handler(handler)
        await self._call_bus("AddMatch", "s", _OWNER_CHANGES)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            self._bus.disconnect()
