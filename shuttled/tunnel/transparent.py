"""Transparent sockets (TPROXY): listeners, original destinations, answers from them.

A TPROXY rule hands a packet to a socket with IP_TRANSPARENT without rewriting
it. For TCP the accepted socket's own address is the original destination;
for UDP each datagram carries it in an IP_ORIGDSTADDR / IPV6_ORIGDSTADDR cmsg
(asked for with IP_RECVORIGDSTADDR). An answer must come FROM that
destination, so it leaves through a transparent socket bound to it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import TYPE_CHECKING, Literal

from shuttled.control.schema import ConnectionRow

if TYPE_CHECKING:
    from shuttled.tunnel.channels import Channel

# linux/in.h, linux/in6.h (Python has only IP_TRANSPARENT)
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_RECVORIGDSTADDR = 20  # the cmsg type of the answer is the same number (IP_ORIGDSTADDR)
IPV6_RECVORIGDSTADDR = 74
_SOL: dict[int, int] = {socket.AF_INET: socket.SOL_IP, socket.AF_INET6: socket.IPPROTO_IPV6}
_TRANSPARENT: dict[int, int] = {socket.AF_INET: IP_TRANSPARENT, socket.AF_INET6: IPV6_TRANSPARENT}
_ORIGDST: dict[int, int] = {
    socket.AF_INET: IP_RECVORIGDSTADDR,
    socket.AF_INET6: IPV6_RECVORIGDSTADDR,
}
CMSG_SIZE = socket.CMSG_SPACE(28)  # room for a sockaddr_in6
MAX_DATAGRAM = 65535

Address = tuple[str, int]


def endpoint_text(address: Address) -> str:
    """host:port, with an IPv6 host in brackets ([fd00::2]:80)."""
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connection_row(
    proto: Literal["tcp", "udp"],
    src: Address,
    dst: str,
    channel: Channel | None,
    age: float,
    opening: bool = False,
) -> ConnectionRow:
    """One TCP connection or UDP flow as a `connections` row; `opening`: its SYN
    waits for the remote (true connect())."""
    return {
        "proto": proto,
        "src": endpoint_text(src),
        "dst": dst,
        "tx": channel.bytes_up if channel else 0,
        "rx": channel.bytes_down if channel else 0,
        "age": round(age, 3),
        "state": "opening" if opening else "open",
    }


def set_transparent(sock: socket.socket) -> None:
    """IP_TRANSPARENT (needs CAP_NET_ADMIN): TPROXY may deliver here, and we may bind
    to an address that is not ours."""
    sock.setsockopt(_SOL[sock.family], _TRANSPARENT[sock.family], 1)


def recv_original_dst(sock: socket.socket) -> None:
    """Ask for each datagram's original destination as a cmsg."""
    sock.setsockopt(_SOL[sock.family], _ORIGDST[sock.family], 1)


def original_dst(ancdata: list[tuple[int, int, bytes]], family: int) -> Address | None:
    """The original destination from recvmsg's ancillary data, or None when absent."""
    for level, kind, data in ancdata:
        if level == _SOL[family] and kind == _ORIGDST[family]:
            return parse_sockaddr(data, family)
    return None


def parse_sockaddr(data: bytes, family: int) -> Address | None:
    """A struct sockaddr_in / sockaddr_in6 as (host, port)."""
    if family == socket.AF_INET and len(data) >= 8:
        return socket.inet_ntop(socket.AF_INET, data[4:8]), struct.unpack_from("!H", data, 2)[0]
    if family == socket.AF_INET6 and len(data) >= 24:
        return socket.inet_ntop(socket.AF_INET6, data[8:24]), struct.unpack_from("!H", data, 2)[0]
    return None


def recv_batch(sock: socket.socket, limit: int) -> list[tuple[bytes, Address, Address | None]]:
    """Up to `limit` waiting datagrams: (payload, source, original destination)."""
    out: list[tuple[bytes, Address, Address | None]] = []
    for _ in range(limit):
        try:
            data, ancdata, _flags, src = sock.recvmsg(MAX_DATAGRAM, CMSG_SIZE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:  # an ICMP error reported on the socket: it stays usable
            continue
        out.append((data, (src[0], src[1]), original_dst(ancdata, sock.family)))
    return out


def reply_socket(local: Address, peer: Address) -> socket.socket:
    """A UDP socket bound to `local` (someone else's address) and connected to `peer`.

    Connected, it matches only that one peer: TPROXY's established-socket lookup
    then hands it the peer's next datagrams to `local` too, and it can never take
    datagrams meant for anybody else who listens on that address (a local resolver
    on the router's own :53). SO_REUSEADDR lets many peers' sockets share `local`.
    """
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        set_transparent(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(local)
        sock.connect(peer)
    except BaseException:
        sock.close()
        raise
    return sock


def send_from(local: Address, peer: Address, payload: bytes) -> None:
    """One datagram to `peer` that appears to come from `local` (e.g. a DNS answer)."""
    sock = reply_socket(local, peer)
    with contextlib.closing(sock):
        sock.send(payload)
