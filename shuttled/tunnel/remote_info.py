"""What the remote tells us about its networks and names, read without code on the remote.

Over exec channels of the tunnel's own ssh connection, each fact from the first
source the remote has: routes from `ip -j route show table main` (and `-6`),
else `ip route` as text (BusyBox, iproute2 without JSON), else /proc/net/route
and /proc/net/ipv6_route; files (/etc/hosts, /etc/resolv.conf) with `cat`, else
the shell's own `read` (a BusyBox without the cat applet). What no source gave
is one line in `Learnt.missing`, for the log, `status` and `doctor`.

Everything the remote sends is input from another machine: sizes are bounded,
every field is checked, and what does not parse or make sense is left out with
one log line per source (never an exception). A route is left out when it is a
default route in disguise: one covering loopback, link-local or multicast
addresses (0.0.0.0/0, but also OpenVPN's 0.0.0.0/1 + 128.0.0.0/1), and when it
is not a plain unicast route (local, blackhole, unreachable, ...).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from shuttled.net import IPAddress, IPNetwork, is_address, valid_host_name

log = logging.getLogger(__name__)

# (command) -> (exit status, stdout, stderr): SshSession.run
Runner = Callable[[str], Awaitable[tuple[int | None, bytes, bytes]]]

MAX_OUTPUT = 1 << 20  # bytes of a route table or hosts file we look at, at most
MAX_ROUTES = 1024  # per family: more is a router's full table, not a set of sites
MAX_HOST_NAMES = 4096
MAX_ADDRESSES_PER_NAME = 16
SAMPLE_LENGTH = 80  # of the first ignored entry, in the log line

# Per family: iproute2's JSON, `ip route` as text, the kernel's own table.
ROUTE_SOURCES = {
    4: ("ip -j route show table main", "ip route show table main", "/proc/net/route"),
    6: ("ip -j -6 route show table main", "ip -6 route show table main", "/proc/net/ipv6_route"),
}
HOSTS_FILE = "/etc/hosts"
COMMAND_NOT_FOUND = 127  # the exit status of a POSIX shell for a missing command
# A file through the shell alone, where there is no `cat`: sh, bash, dash, ash, zsh.
_READ_LOOP = 'while IFS= read -r l || [ -n "$l" ]; do printf \'%s\\n\' "$l"; done < '
# `ip route` text: the route types that come first on their line (ip-route(8)).
_ROUTE_TYPES = frozenset(
    [
        "unicast",
        "local",
        "broadcast",
        "multicast",
        "blackhole",
        "unreachable",
        "prohibit",
        "throw",
        "nat",
        "anycast",
    ]
)

T = TypeVar("T")


@dataclass(frozen=True)
class Learnt(Generic[T]):
    """A fact read from the remote: its value, where it came from, what is missing."""

    value: T
    sources: tuple[str, ...] = ()  # the commands that gave it
    missing: tuple[str, ...] = ()  # one line each: what was not learned, and why


# Ranges whose presence inside a route makes it a default route in disguise.
_NOT_NETWORKS: dict[int, tuple[IPNetwork, ...]] = {
    4: tuple(
        ipaddress.IPv4Network(n)
        for n in ("127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "0.0.0.0/8", "240.0.0.0/4")
    ),
    6: tuple(ipaddress.IPv6Network(n) for n in ("::1/128", "fe80::/10", "ff00::/8", "::/128")),
}
RTF_UP = 0x0001
RTF_REJECT = 0x0200
RTF_CACHE = 0x01000000
RTF_LOCAL = 0x80000000
_HEX8 = re.compile(r"[0-9A-Fa-f]{8}")
_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
_HEX2 = re.compile(r"[0-9a-fA-F]{2}")
_IFNAME = re.compile(r"[^\s/]{1,15}")


class _Ignored:
    """Counts what a parser left out, and logs it once with the first example."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self.first = ""

    def add(self, item: object, why: str) -> None:
        self.count += 1
        if self.count == 1:
            self.first = f"{why}: {str(item)[:SAMPLE_LENGTH]!r}"

    def report(self) -> None:
        if self.count:
            log.warning(
                "ignored %d %s from the remote (first: %s)", self.count, self.what, self.first
            )


# --- routes ---------------------------------------------------------------------------


def usable_route(net: IPNetwork) -> bool:
    """A network worth capturing: not a default route, nor holding loopback,
    link-local or multicast addresses."""
    return not any(net.overlaps(bad) for bad in _NOT_NETWORKS[net.version])  # type: ignore[arg-type]


def _text_of(data: bytes | str, ignored: _Ignored) -> str | None:
    if len(data) > MAX_OUTPUT:
        ignored.add(f"{len(data)} bytes", "output too large")
        return None
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _finish(nets: Iterable[IPNetwork], ignored: _Ignored) -> list[IPNetwork]:
    unique = list(dict.fromkeys(nets))
    if len(unique) > MAX_ROUTES:
        ignored.add(f"{len(unique) - MAX_ROUTES} more routes", f"more than {MAX_ROUTES}")
        unique = unique[:MAX_ROUTES]
    ignored.report()
    return unique


def parse_ip_route_json(data: bytes | str, family: int) -> list[IPNetwork] | None:
    """`ip -j route` output as networks; None when it is not JSON at all (old iproute2)."""
    ignored = _Ignored(f"IPv{family} routes")
    text = _text_of(data, ignored)
    try:
        routes = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        routes = None
    if not isinstance(routes, list):
        ignored.report()
        return None
    nets = [net for route in routes if (net := _json_route(route, family, ignored))]
    return _finish(nets, ignored)


def _json_route(route: Any, family: int, ignored: _Ignored) -> IPNetwork | None:
    if not isinstance(route, dict) or not isinstance(route.get("dst"), str):
        ignored.add(route, "not a route")
        return None
    kind, dev = route.get("type", "unicast"), route.get("dev", "")
    if not isinstance(kind, str) or not isinstance(dev, str):
        ignored.add(route, "bad type or dev")
        return None
    if kind != "unicast" or dev == "lo" or route["dst"] == "default":
        return None  # not a network reached through the remote: left out quietly
    return _checked(route["dst"], family, ignored)


def _checked(text: str, family: int, ignored: _Ignored) -> IPNetwork | None:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        ignored.add(text, "not a network")
        return None
    if net.version != family:
        ignored.add(text, f"not IPv{family}")
        return None
    return net if usable_route(net) else None


def parse_proc_route(data: bytes | str) -> list[IPNetwork]:
    """/proc/net/route: hex addresses in the remote's byte order, found from the masks."""
    ignored = _Ignored("IPv4 routes")
    text = _text_of(data, ignored)
    rows = []
    for line in (text or "").splitlines()[1:]:  # the first line is the header
        fields = line.split()
        if (
            len(fields) < 8
            or not _IFNAME.fullmatch(fields[0])
            or not all(_HEX8.fullmatch(f) for f in (fields[1], fields[7]))
            or not re.fullmatch(r"[0-9A-Fa-f]{1,8}", fields[3])
        ):
            ignored.add(line, "not a route line")
            continue
        rows.append((fields[0], int(fields[1], 16), int(fields[3], 16), int(fields[7], 16)))
    order = _byte_order(mask for _, _, _, mask in rows)
    nets = [net for row in rows if (net := _proc_v4(row, order, ignored))]
    return _finish(nets, ignored)


def _prefix(mask: bytes) -> int | None:
    bits = int.from_bytes(mask, "big")
    ones = bin(bits).count("1")
    return ones if bits == (0xFFFFFFFF << (32 - ones)) & 0xFFFFFFFF else None


def _byte_order(masks: Iterable[int]) -> str:
    """The byte order under which the masks are prefixes; little-endian when undecided."""
    votes = {"little": 0, "big": 0}
    for mask in masks:
        for order in votes:
            votes[order] += _prefix(mask.to_bytes(4, order)) is not None  # type: ignore[arg-type]
    return "big" if votes["big"] > votes["little"] else "little"


def _proc_v4(row: tuple[str, int, int, int], order: str, ignored: _Ignored) -> IPNetwork | None:
    dev, dst, flags, mask = row
    # "*": no device, how the kernel shows blackhole, unreachable and prohibit routes.
    if dev in ("lo", "*") or not flags & RTF_UP or flags & RTF_REJECT:
        return None
    prefix = _prefix(mask.to_bytes(4, order))  # type: ignore[arg-type]
    if prefix is None:
        ignored.add(f"{dev} {dst:08X}/{mask:08X}", "mask is not a prefix")
        return None
    address = ipaddress.IPv4Address(dst.to_bytes(4, order))  # type: ignore[arg-type]
    return _checked(f"{address}/{prefix}", 4, ignored)


def parse_proc_ipv6_route(data: bytes | str) -> list[IPNetwork]:
    """/proc/net/ipv6_route: every table's routes; local, rejecting, cached and
    source-specific ones left out."""
    ignored = _Ignored("IPv6 routes")
    text = _text_of(data, ignored)
    nets = [net for line in (text or "").splitlines() if (net := _proc_v6(line, ignored))]
    return _finish(nets, ignored)


def _proc_v6(line: str, ignored: _Ignored) -> IPNetwork | None:
    fields = line.split()
    if (
        len(fields) != 10
        or not _HEX32.fullmatch(fields[0])
        or not _HEX2.fullmatch(fields[1])
        or not _HEX2.fullmatch(fields[3])
        or not _HEX8.fullmatch(fields[8])
        or not _IFNAME.fullmatch(fields[9])
    ):
        ignored.add(line, "not a route line")
        return None
    flags, prefix = int(fields[8], 16), int(fields[1], 16)
    if (
        fields[9] == "lo"
        or int(fields[3], 16)
        or not flags & RTF_UP
        or flags & (RTF_REJECT | RTF_CACHE | RTF_LOCAL)
    ):
        return None
    if prefix > 128:
        ignored.add(line, "prefix longer than 128")
        return None
    return _checked(f"{ipaddress.IPv6Address(int(fields[0], 16))}/{prefix}", 6, ignored)


def parse_ip_route_text(data: bytes | str, family: int) -> list[IPNetwork]:
    """`ip route show` as text (BusyBox's applet, iproute2 without -j): unicast
    routes through a device other than lo; nexthop lines (indented) are skipped."""
    ignored = _Ignored(f"IPv{family} routes")
    text = _text_of(data, ignored)
    nets = [
        net for line in (text or "").splitlines() if (net := _text_route(line, family, ignored))
    ]
    return _finish(nets, ignored)


def _text_route(line: str, family: int, ignored: _Ignored) -> IPNetwork | None:
    if not line.strip() or line[0].isspace():
        return None
    fields = line.split()
    kind = fields.pop(0) if fields[0] in _ROUTE_TYPES else "unicast"
    if not fields:
        ignored.add(line, "not a route line")
        return None
    dev = fields[fields.index("dev") + 1] if "dev" in fields[:-1] else ""
    if kind != "unicast" or dev == "lo" or fields[0] == "default":
        return None  # not a network reached through the remote: left out quietly
    return _checked(fields[0], family, ignored)


async def read_remote_file(run: Runner, path: str) -> tuple[bytes | None, str, str]:
    """(contents or None, the command that read it, why not): `cat`, else the
    shell's own `read` where there is no cat."""
    status, out, err = await run(f"cat {path}")
    if status == 0:
        return out, f"cat {path}", ""
    if status == COMMAND_NOT_FOUND:
        status, out, err = await run(_READ_LOOP + path)
        if status == 0:
            return out, f"the shell's read < {path}", ""
    text = err.decode(errors="replace").strip()
    if "no such file" in text.lower() or "nonexistent" in text.lower():
        return None, "", f"no {path}"
    detail = text.splitlines()[-1][:200] if text else f"status {status}"
    return None, "", f"an unreadable {path} ({detail})"


async def remote_routes(run: Runner) -> Learnt[list[IPNetwork]]:
    """The remote's routes, IPv4 then IPv6, usable ones only."""
    both = [await _family_routes(run, family) for family in (4, 6)]
    return Learnt(
        [net for learnt in both for net in learnt.value],
        tuple(source for learnt in both for source in learnt.sources),
        tuple(line for learnt in both for line in learnt.missing),
    )


async def _family_routes(run: Runner, family: int) -> Learnt[list[IPNetwork]]:
    json_command, text_command, proc_path = ROUTE_SOURCES[family]
    status, out, err = await run(json_command)
    if status == 0 and (nets := parse_ip_route_json(out, family)) is not None:
        return Learnt(nets, (json_command,))
    no_ip = "no `ip`"
    if status != COMMAND_NOT_FOUND:  # an ip without -j (BusyBox, old iproute2)
        status, out, err = await run(text_command)
        if status == 0:
            return Learnt(parse_ip_route_text(out, family), (text_command,))
        detail = err.decode(errors="replace").strip().splitlines()
        no_ip = f"an `ip route` that fails ({detail[-1][:120] if detail else f'status {status}'})"
    data, source, why = await read_remote_file(run, proc_path)
    if data is not None:
        nets = parse_proc_route(data) if family == 4 else parse_proc_ipv6_route(data)
        return Learnt(nets, (source,))
    missing = f"auto_nets: the remote has {no_ip} and {why}: no IPv{family} routes learned"
    log.warning("%s", missing)
    return Learnt([], (), (missing,))


# --- /etc/hosts -------------------------------------------------------------------------


def _host_address(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # The remote's own loopback, link-local or multicast names mean nothing here.
    if (
        address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
    ):
        return None
    return address


def parse_hosts(data: bytes | str) -> dict[str, tuple[IPAddress, ...]]:
    """An /etc/hosts file as {lower-case name: addresses, in file order}."""
    ignored = _Ignored("/etc/hosts entries")
    text = _text_of(data, ignored)
    table: dict[str, list[IPAddress]] = {}
    for line in (text or "").splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            _hosts_line(fields, table, ignored)
    ignored.report()
    return {name: tuple(addresses) for name, addresses in table.items()}


def _hosts_line(fields: list[str], table: dict[str, list[IPAddress]], ignored: _Ignored) -> None:
    if "%" in fields[0] or not fields[0].isascii():
        ignored.add(fields[0], "not an address")
        return
    address = _host_address(fields[0])
    if address is None or len(fields) < 2:
        if address is None and is_address(fields[0]):
            return  # 127.0.0.1 localhost and friends: left out quietly
        ignored.add(" ".join(fields), "not an address with names")
        return
    for raw in fields[1:]:
        name = raw.lower().rstrip(".")
        if not name.isascii() or not valid_host_name(name):
            ignored.add(raw, "not a host name")
        elif name not in table and len(table) >= MAX_HOST_NAMES:
            ignored.add(raw, f"more than {MAX_HOST_NAMES} names")
        elif (
            address not in (known := table.setdefault(name, []))
            and len(known) < MAX_ADDRESSES_PER_NAME
        ):
            known.append(address)


async def remote_hosts(run: Runner) -> Learnt[dict[str, tuple[IPAddress, ...]]]:
    data, source, why = await read_remote_file(run, HOSTS_FILE)
    if data is None:
        missing = f"remote_hosts: the remote has {why}: no host names learned"
        log.warning("%s", missing)
        return Learnt({}, (), (missing,))
    return Learnt(parse_hosts(data), (source,))
