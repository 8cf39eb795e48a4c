"""resolv.conf and nameserver addresses: which resolvers a machine uses, as (address, port)."""

from __future__ import annotations

import ipaddress
import logging

from shuttled.const import DNS_PORT

log = logging.getLogger(__name__)


def parse_resolv_conf(text: str) -> list[str]:
    """The nameserver addresses of a resolv.conf, in order, without duplicates.

    Other lines and addresses that do not parse are ignored, as the C library does.
    IPv6 link-local addresses are left out: they need a zone (`fe80::1%eth0`) that
    means nothing to another host or to a firewall rule. IPv4-mapped IPv6 addresses
    become IPv4. Zones on other addresses are dropped.
    """
    found: list[str] = []
    for line in text.splitlines():
        address = _nameserver_line(line)
        if address is not None and address not in found:
            found.append(address)
    return found


def _nameserver_line(line: str) -> str | None:
    fields = line.split()
    if len(fields) < 2 or fields[0] != "nameserver":
        return None
    try:
        ip = ipaddress.ip_address(fields[1].split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast or (ip.version == 6 and ip.is_link_local):
        return None
    return str(ip)


def parse_nameserver(text: str) -> tuple[str, int]:
    """`ADDRESS` or `ADDRESS@PORT` (sshuttle's --to-ns form) as (address, port)."""
    address, at, port_text = text.partition("@")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"nameserver {text!r} is not an IP address") from None
    if not at:
        return str(ip), DNS_PORT
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) <= 0xFFFF):
        raise ValueError(f"nameserver {text!r} has a bad port")
    return str(ip), int(port_text)
