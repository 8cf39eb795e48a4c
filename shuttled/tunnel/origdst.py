"""Where a redirected connection was going: the original destination, per OS.

Linux: SO_ORIGINAL_DST (IPv4) and IP6T_SO_ORIGINAL_DST (IPv6) on the accepted
socket, from conntrack's record of our nat `redirect`. macOS and FreeBSD: pf's
state table, asked with the DIOCNATLOOK ioctl on /dev/pf, whose request struct
each OS lays out differently (below). TPROXY'd sockets need neither: their own
address is the original destination (shuttled.tunnel.transparent).
"""

from __future__ import annotations

import fcntl
import functools
import os
import socket
import struct
import sys
from dataclasses import dataclass

from shuttled import const
from shuttled.net import pf_flavour

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same number


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where the app meant to connect, before our REDIRECT rule rewrote it."""
    if sys.platform != "linux":  # macOS, FreeBSD: ask pf's state table (DIOCNATLOOK)
        return pf_original_dst(sock)
    if sock.family == socket.AF_INET:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack_from("!H", raw, 2)[0]
    raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]


# --- DIOCNATLOOK: struct pfioc_natlook for each OS ------------------------------------------

IPPROTO_TCP = 6
PF_OUT = 2  # enum { PF_INOUT, PF_IN, PF_OUT } in both pfvar.h
AF_INET = 2  # the same on both
IOC_INOUT = 0xC0000000  # sys/ioccom.h: IOC_IN | IOC_OUT
IOCPARM_MASK = 0x1FFF


@dataclass(frozen=True)
class NatlookLayout:
    """`struct pfioc_natlook` as one OS's pfvar.h declares it.

    Both start with four `struct pf_addr` (a 16-byte union: IPv4 in its first
    4 bytes): saddr, daddr, rsaddr, rdaddr. Then the four ports sport, dport,
    rsport, rdport, in network byte order: FreeBSD has plain u_int16_t, XNU a
    4-byte `union pf_state_xport { u_int16_t port; u_int16_t call_id;
    u_int32_t spi; }` whose port is its first two bytes. Then sa_family_t af
    (one byte on both), u_int8_t proto, [XNU only: u_int8_t proto_variant],
    u_int8_t direction, and padding to the 4-byte alignment of pf_addr.
    """

    os: str
    port_slot: int  # bytes per port field
    proto_variant: bool
    af_inet6: int  # AF_INET6 differs: 28 on FreeBSD, 30 on XNU

    @property
    def struct(self) -> struct.Struct:
        tail = "BBBB" if self.proto_variant else "BBBx"
        return struct.Struct(f"<16s16s16s16s{f'{self.port_slot}s' * 4}{tail}")

    @property
    def size(self) -> int:
        return self.struct.size

    @property
    def ioctl(self) -> int:
        """DIOCNATLOOK = _IOWR('D', 23, struct pfioc_natlook)."""
        return iowr(ord("D"), 23, self.size)

    def af(self, version: int) -> int:
        return AF_INET if version == 4 else self.af_inet6


FREEBSD_NATLOOK = NatlookLayout("freebsd", port_slot=2, proto_variant=False, af_inet6=28)
DARWIN_NATLOOK = NatlookLayout("darwin", port_slot=4, proto_variant=True, af_inet6=30)


def iowr(group: int, number: int, size: int) -> int:
    """_IOC(IOC_INOUT, group, number, size) as BSD's sys/ioccom.h computes it."""
    return IOC_INOUT | ((size & IOCPARM_MASK) << 16) | (group << 8) | number


def _addr(version: int, text: str) -> bytes:
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    return socket.inet_pton(family, text.partition("%")[0]).ljust(16, b"\0")


def _port(layout: NatlookLayout, port: int) -> bytes:
    return port.to_bytes(2, "big").ljust(layout.port_slot, b"\0")


def pack_natlook(
    layout: NatlookLayout, version: int, src: tuple[str, int], dst: tuple[str, int]
) -> bytes:
    """The request: which state has this (peer -> our listener) TCP connection?

    src is the accepted socket's peer, dst its local address (the listener);
    the direction is PF_OUT, as for a connection this host made.
    """
    zero = b"\0" * 16
    fields: list[object] = [
        _addr(version, src[0]),
        _addr(version, dst[0]),
        zero,
        zero,
        _port(layout, src[1]),
        _port(layout, dst[1]),
        _port(layout, 0),
        _port(layout, 0),
        layout.af(version),
        IPPROTO_TCP,
    ]
    fields += [0, PF_OUT] if layout.proto_variant else [PF_OUT]
    return layout.struct.pack(*fields)


def unpack_natlook(layout: NatlookLayout, version: int, raw: bytes) -> tuple[str, int]:
    """The kernel's answer: rdaddr and rdport, the destination before our rdr rule."""
    values = layout.struct.unpack(raw)
    rdaddr: bytes = values[3]
    rdport: bytes = values[7]
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    address = socket.inet_ntop(family, rdaddr[: 4 if version == 4 else 16])
    return address, int.from_bytes(rdport[:2], "big")


def natlook_layout(platform: str | None = None) -> NatlookLayout | None:
    """The DIOCNATLOOK struct of this system (or of `platform`); None where there is no pf."""
    return {"darwin": DARWIN_NATLOOK, "freebsd": FREEBSD_NATLOOK}.get(pf_flavour(platform) or "")


@functools.cache
def _pf_fd() -> int:
    return os.open(const.PF_DEVICE, os.O_RDWR)


def pf_original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a connection redirected by our rdr rule was going (DIOCNATLOOK on /dev/pf)."""
    layout = natlook_layout()
    if layout is None:
        raise OSError(95, f"DIOCNATLOOK is for macOS and FreeBSD, not {sys.platform}")
    version = 4 if sock.family == socket.AF_INET else 6
    buf = bytearray(pack_natlook(layout, version, sock.getpeername()[:2], sock.getsockname()[:2]))
    fcntl.ioctl(_pf_fd(), layout.ioctl, buf, True)
    return unpack_natlook(layout, version, bytes(buf))
