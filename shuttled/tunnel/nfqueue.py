"""nfnetlink_queue spoken directly: the SYNs a capture holds, and our verdicts on them.

A rule `queue num N bypass` (nft) or `-j NFQUEUE --queue-num N --queue-bypass`
(iptables) hands each first SYN of a captured connection to the process bound to
queue N; the packet waits in the kernel until that process gives a verdict. While
no process is bound, `bypass` lets it through (to our nat redirect and a listener
that is gone: a reset, never a stall); a full queue lets it through too (FAIL_OPEN),
so a flood of SYNs degrades to connect-at-accept, it does not drop.

Why a netlink socket of our own and not a library: the protocol we need is four
messages (bind, parameters, packet, verdict) of fixed layout; python-netfilterqueue
needs libnetfilter_queue and a C build, runs its own blocking loop per queue, and
gives no way to set the mark on a verdict with NF_REPEAT. Measured here: 4 us to
parse a packet message, 1 us to build a verdict (tests/unit/test_nfqueue.py pins
the wire format; tests/integration ones run it against the kernel).

Layouts (include/uapi/linux/netfilter/nfnetlink_queue.h): a netlink header, a
`struct nfgenmsg` (family, version, queue number big-endian), then attributes,
whose payloads are big-endian.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

# attributes
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_PAYLOAD = 10
NFQA_UID = 16
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN = 0x1
NFQA_CFG_F_UID_GID = 0x8

# verdicts (linux/netfilter.h)
NF_DROP = 0
NF_ACCEPT = 1
NF_REPEAT = 4

# An IPv6 header and a TCP header without options: the addresses, ports and flags.
COPY_RANGE = 40 + 20
QUEUE_MAXLEN = 4096  # SYNs held at once; past it FAIL_OPEN lets the next ones through
RCVBUF = 4 << 20

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")
_NLATTR = struct.Struct("=HH")
_PACKET_HDR = struct.Struct("!IHB")
_VERDICT_HDR = struct.Struct("!II")
_CFG_CMD = struct.Struct("!BxH")
_CFG_PARAMS = struct.Struct("!IB")
_U32 = struct.Struct("!I")
_ERRNO = struct.Struct("=i")
_PORTS = struct.Struct("!HH")

Address = tuple[str, int]


@dataclass(frozen=True)
class Syn:
    """One queued SYN: its packet id (for the verdict), the connection's two ends,
    and the local user whose socket sent it (None: forwarded, from a LAN host)."""

    packet_id: int
    src: Address
    dst: Address
    uid: int | None


def _align(size: int) -> int:
    return (size + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    head = _NLATTR.pack(_NLATTR.size + len(payload), kind)
    return head + payload + b"\0" * (_align(len(payload)) - len(payload))


def message(
    msg: int, queue: int, attrs: bytes, *, flags: int = NLM_F_REQUEST, seq: int = 0
) -> bytes:
    """A whole nfnetlink_queue message for queue `queue`."""
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, queue) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def verdict_message(queue: int, packet_id: int, verdict: int, mark: int | None = None) -> bytes:
    """NFQNL_MSG_VERDICT: `verdict` for one packet, optionally setting its mark."""
    attrs = attr(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(verdict, packet_id))
    if mark is not None:
        attrs += attr(NFQA_MARK, _U32.pack(mark))
    return message(NFQNL_MSG_VERDICT, queue, attrs)


def config_messages(queue: int) -> list[bytes]:
    """Bind `queue`, copy the headers we read, hold up to QUEUE_MAXLEN, fail open."""
    flags = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_UID_GID
    return [
        message(
            NFQNL_MSG_CONFIG,
            queue,
            attr(NFQA_CFG_CMD, _CFG_CMD.pack(NFQNL_CFG_CMD_BIND, 0)),
            flags=NLM_F_REQUEST | NLM_F_ACK,
            seq=1,
        ),
        message(
            NFQNL_MSG_CONFIG,
            queue,
            attr(NFQA_CFG_PARAMS, _CFG_PARAMS.pack(COPY_RANGE, NFQNL_COPY_PACKET))
            + attr(NFQA_CFG_QUEUE_MAXLEN, _U32.pack(QUEUE_MAXLEN))
            + attr(NFQA_CFG_MASK, _U32.pack(flags))
            + attr(NFQA_CFG_FLAGS, _U32.pack(flags)),
            flags=NLM_F_REQUEST | NLM_F_ACK,
            seq=2,
        ),
    ]


def parse_messages(data: bytes | memoryview) -> tuple[list[Syn], list[int]]:
    """The SYNs in one read of the socket, and the errnos of any netlink errors in it
    (0 is an acknowledgement). A packet we cannot read is returned with an empty
    address, so that the caller can still let it pass."""
    view = memoryview(data)
    syns: list[Syn] = []
    errors: list[int] = []
    at = 0
    while at + _NLMSGHDR.size <= len(view):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(view, at)
        if length < _NLMSGHDR.size or at + length > len(view):
            break
        body = view[at + _NLMSGHDR.size : at + length]
        if kind == NLMSG_ERROR and len(body) >= _ERRNO.size:
            errors.append(-_ERRNO.unpack_from(body)[0])
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            syn = _packet(body[_NFGENMSG.size :])
            if syn is not None:
                syns.append(syn)
        at += _align(length)
    return syns, errors


def _attributes(view: memoryview) -> dict[int, memoryview]:
    found: dict[int, memoryview] = {}
    at = 0
    while at + _NLATTR.size <= len(view):
        length, kind = _NLATTR.unpack_from(view, at)
        if length < _NLATTR.size or at + length > len(view):
            break
        found[kind & NLA_TYPE_MASK] = view[at + _NLATTR.size : at + length]
        at += _align(length)
    return found


def _packet(view: memoryview) -> Syn | None:
    attrs = _attributes(view)
    head = attrs.get(NFQA_PACKET_HDR)
    if head is None or len(head) < _PACKET_HDR.size:
        return None  # no id: nothing we could give a verdict on
    packet_id = _PACKET_HDR.unpack_from(head)[0]
    uid_attr = attrs.get(NFQA_UID)
    uid = _U32.unpack_from(uid_attr)[0] if uid_attr is not None and len(uid_attr) >= 4 else None
    ends = tcp_ends(bytes(attrs.get(NFQA_PAYLOAD, b"")))
    src, dst = ends if ends is not None else (("", 0), ("", 0))
    return Syn(packet_id, src, dst, uid)


def tcp_ends(packet: bytes) -> tuple[Address, Address] | None:
    """(source, destination) of an IPv4 or IPv6 TCP packet; None for anything else
    (an IPv6 extension header, a truncated copy). inet_ntop spells the addresses as
    accept() and getpeername() do, so they match the accepted socket's."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        header = (packet[0] & 0x0F) * 4
        if packet[9] != socket.IPPROTO_TCP or len(packet) < header + 4:
            return None
        family, saddr, daddr = socket.AF_INET, packet[12:16], packet[16:20]
    elif version == 6 and len(packet) >= 44:
        header = 40
        if packet[6] != socket.IPPROTO_TCP:
            return None
        family, saddr, daddr = socket.AF_INET6, packet[8:24], packet[24:40]
    else:
        return None
    sport, dport = _PORTS.unpack_from(packet, header)
    return (
        (socket.inet_ntop(family, saddr), sport),
        (socket.inet_ntop(family, daddr), dport),
    )


class NfQueue:
    """One bound nfnetlink queue, read in the event loop: each SYN goes to `on_syn`,
    which must answer with `verdict()`, at once or later."""

    def __init__(self, on_syn: Callable[[Syn], None]) -> None:
        self.on_syn = on_syn
        self.number: int | None = None
        self.sock: socket.socket | None = None
        self.unreadable = 0  # packets we could not parse (let through)
        self.send_failures = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buf = bytearray(1 << 16)

    def bind(self, first: int, count: int) -> int:
        """Bind the first free queue number in [first, first+count); that number.
        Raises OSError when the kernel has no nfnetlink_queue or all are taken."""
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        try:
            sock.bind((0, 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            with contextlib.suppress(OSError):  # SO_RCVBUFFORCE: root may pass rmem_max
                sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)
            sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            sock.settimeout(2.0)
            last: OSError = OSError(errno.EBUSY, "no free queue number")
            for number in range(first, first + count):
                try:
                    _configure(sock, number)
                except OSError as exc:
                    # EPERM: another process holds that queue (nfqnl_recv_config).
                    if exc.errno not in (errno.EPERM, errno.EBUSY):
                        raise
                    last = exc
                    continue
                sock.setblocking(False)
                self.sock, self.number = sock, number
                return number
            raise last
        except BaseException:
            sock.close()
            raise

    def start(self) -> None:
        assert self.sock is not None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self.sock is not None
        for _ in range(64):  # a batch per wakeup: the loop stays fair
            try:
                size = self.sock.recv_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("nfqueue %s: %s", self.number, exc)
                return
            syns, _errors = parse_messages(memoryview(self._buf)[:size])
            for syn in syns:
                if not syn.src[0]:
                    self.unreadable += 1
                    self.verdict(syn.packet_id, NF_ACCEPT)
                    continue
                self.on_syn(syn)

    def verdict(self, packet_id: int, verdict: int, mark: int | None = None) -> None:
        """Let the packet go on (NF_ACCEPT), drop it, or run our chain again with
        `mark` set (NF_REPEAT: the chain's reject rules for that mark answer the app)."""
        if self.sock is None or self.number is None:
            return
        try:
            self.sock.send(verdict_message(self.number, packet_id, verdict, mark))
        except OSError as exc:
            # Netlink sends do not block; ENOBUFS would leave the packet to the
            # kernel's queue, which the app's SYN retransmission then meets again.
            self.send_failures += 1
            log.debug("nfqueue %s: verdict for %d: %s", self.number, packet_id, exc)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())
        # Closing the socket unbinds the queue; the kernel lets what it still holds
        # go on (bypass), to our rules and whatever listener is left.
        sock.close()


def _configure(sock: socket.socket, number: int) -> None:
    for request in config_messages(number):
        sock.send(request)
        while True:
            _syns, errors = parse_messages(sock.recv(8192))
            if errors:
                break
        if errors[0]:
            raise OSError(errors[0], f"nfqueue {number}: {os.strerror(errors[0])}")
