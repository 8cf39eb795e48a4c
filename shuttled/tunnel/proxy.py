"""Transparent listeners: accept redirected connections, recover where they were
going, and pair each one with a direct-tcpip channel.

Admission happens on the raw socket, before any transport exists: a connection
beyond the profile's limits (in all, per local user, the process's descriptors)
is reset at once, which costs a flood little and lets no user starve root, the
control socket or the tunnel itself (README, "Not starvable").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from shuttled import const
from shuttled.control.schema import LimitStats
from shuttled.tunnel import faults, sshmsg
from shuttled.tunnel.accept import BUDGET, Acceptor, Throttled
from shuttled.tunnel.channels import Channel, ChannelMux, State
from shuttled.tunnel.connect import SynGate
from shuttled.tunnel.faults import Faults, contained
from shuttled.tunnel.origdst import original_dst
from shuttled.tunnel.sockdiag import DIAG
from shuttled.tunnel.transparent import endpoint_text, set_transparent

log = logging.getLogger(__name__)

_LINGER_RESET = struct.pack("ii", 1, 0)

MuxSource = Callable[[], ChannelMux | None]

_REASONS = {
    sshmsg.OPEN_ADMINISTRATIVELY_PROHIBITED: "prohibited by the server",
    sshmsg.OPEN_CONNECT_FAILED: "connect failed",
    sshmsg.OPEN_UNKNOWN_CHANNEL_TYPE: "unknown channel type",
    sshmsg.OPEN_RESOURCE_SHORTAGE: "resource shortage",
}


@dataclass
class ProxyCounters:
    accepted: int = 0
    failed: int = 0  # open failures and tunnel-down refusals
    bytes_up: int = 0
    bytes_down: int = 0
    refused: int = 0  # reset at accept: over a connection limit


@dataclass(frozen=True)
class ConnLimits:
    """Captured connections one profile holds at once: in all, and per local user
    (by the uid owning the app's socket). Root is held to neither."""

    total: int = const.MAX_CONNECTIONS
    per_user: int = const.MAX_CONNECTIONS_PER_USER


class LocalConnection(asyncio.Protocol):
    """One app connection; the channel's Endpoint.

    Made at accept (`connect: fast`), or at its first SYN when that SYN waits for
    the remote (shuttled.tunnel.connect): then the channel is opened before there
    is any socket, and what the remote sends before the accept waits (`_deferred`).

    Its asyncio callbacks run inside the fault boundary (@contained), its channel
    callbacks inside the mux's: an app that resets at any moment ends this
    connection only."""

    fault_kind = faults.TCP

    def __init__(
        self,
        proxy: TransparentProxy,
        src: tuple[str, int] = ("", 0),
        dst: tuple[str, int] = ("", 0),
        uid: int | None = None,
    ) -> None:
        self.proxy = proxy
        self.faults = proxy.faults
        self.transport: asyncio.Transport | None = None
        self.channel: Channel | None = None
        self.src = src
        self.dst = dst
        self.uid = uid  # the app's local user; None: unknown (a LAN host's connection)
        self.admitted = False  # counted against the limits until forgotten
        self.started = 0.0
        # What arrived before the channel opened (see data_received); b"" marks EOF.
        self._early: list[bytes] = []
        self.gate: SynGate | None = None  # set while its SYN is held (true connect())
        # The channel's events before the socket was accepted: ("data", bytes),
        # ("eof", b""), ("close", b""); replayed in order at accept.
        self._deferred: list[tuple[str, bytes]] = []

    @property
    def key(self) -> tuple[tuple[str, int], tuple[str, int]]:
        return self.src, self.dst

    @property
    def opening(self) -> bool:
        """Not yet accepted: its SYN waits for the remote, or for our listener."""
        return self.transport is None

    # --- asyncio side ---------------------------------------------------------------

    @contained
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are not subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()  # nothing to send it to until the channel opens
        if not self.started:  # a held connection counts from its SYN
            self.started = asyncio.get_running_loop().time()
        self.proxy.accepted(self)

    def open_channel(self, mux: ChannelMux) -> None:
        """Open this connection's channel (before its socket exists, when held)."""
        self.channel = mux.open_direct_tcpip(
            self.dst[0], self.dst[1], self.src[0], self.src[1], self
        )

    def tune_socket(self) -> None:
        assert self.transport is not None
        self.transport.set_write_buffer_limits(
            high=const.LOCAL_WRITE_HIGH, low=const.LOCAL_WRITE_LOW
        )
        sock: socket.socket = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def attach(self) -> None:
        """The held connection's socket was accepted: replay what the channel did
        meanwhile, and start reading the app once the channel is open."""
        deferred, self._deferred = self._deferred, []
        for event, data in deferred:
            if event == "data":
                self.on_data(memoryview(data))
            elif event == "eof":
                self.on_eof()
            else:
                self.on_close()
        channel = self.channel
        if channel is not None and channel.state is State.OPEN and not channel.close_received:
            self.resume_reading()

    def abandon(self) -> None:
        """Its SYN never became a connection (the app gave up): close the channel."""
        self.gate = None
        self._close_channel()
        self.proxy.forget(self)

    @contained
    def data_received(self, data: bytes) -> None:
        if self._opening():
            # Python before 3.11.3 (Debian 12 ships 3.11.2) starts reading even when
            # connection_made paused it: keep the bytes for on_open, and stop the reader
            # (pause_reading alone is a no-op there, the transport thinks it is paused).
            self._early.append(data)
            assert self.transport is not None
            self.transport.resume_reading()
            self.transport.pause_reading()
        elif self.channel is not None:
            self.channel.send(data)

    def eof_received(self) -> bool:
        self._half_closed()
        return True  # keep our write side open: half-close

    @contained
    def _half_closed(self) -> None:
        if self._opening():
            self._early.append(b"")
        elif self.channel is not None:
            self.channel.send_eof()

    def _opening(self) -> bool:
        return self.channel is None or self.channel.state is State.OPENING

    @contained
    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.forget(self)
        self._close_channel()

    def _close_channel(self) -> None:
        channel = self.channel
        if channel is not None and not channel.close_sent:
            channel.close()

    @contained
    def pause_writing(self) -> None:
        if self.channel is not None:
            self.channel.set_hold_window(True)

    @contained
    def resume_writing(self) -> None:
        if self.channel is not None:
            self.channel.set_hold_window(False)

    # --- channel side (Endpoint) -----------------------------------------------------

    def on_open(self, channel: Channel) -> None:
        if self.transport is None:
            if self.gate is not None:
                self.gate.confirmed(self)  # the SYN goes on; attach() follows at accept
            return
        early, self._early = self._early, []
        for data in early:
            channel.send(data) if data else channel.send_eof()
        if self.transport is not None and not self.transport.is_closing() and b"" not in early:
            self.transport.resume_reading()

    def on_open_failed(self, reason: int, description: str) -> None:
        self.channel = None
        self.proxy.counters.failed += 1
        log.info(
            "%s:%d -> %s:%d refused: %s (%s)",
            *self.src,
            *self.dst,
            _REASONS.get(reason, f"reason {reason}"),
            description,
        )
        self.proxy.open_failed(self, reason)
        if self.transport is None:  # held: its SYN gets the remote's answer
            if self.gate is not None:
                self.gate.failed(self, reason, description)
            self.proxy.forget(self)
            return
        self.reset()

    def on_data(self, data: memoryview) -> None:
        assert self.channel is not None
        if self.transport is None:  # not accepted yet: the window bounds what waits
            self._deferred.append(("data", bytes(data)))
            return
        if self.transport.is_closing():
            self.channel.consumed(len(data))
            return
        self.transport.write(data)
        self.channel.consumed(len(data))

    def on_extended_data(self, code: int, data: bytes) -> None:
        pass

    def on_eof(self) -> None:
        if self.transport is None:
            self._deferred.append(("eof", b""))
            return
        if not self.transport.is_closing():
            # asyncio's write_eof() is a bare shutdown(): an app that already reset
            # (it closed, then our data met its closed socket) raises ENOTCONN here.
            self.transport.write_eof()

    def on_close(self) -> None:
        if self.transport is None and self.gate is not None:
            self._deferred.append(("close", b""))
            return
        channel = self.channel
        if channel is not None:
            self.proxy.counters.bytes_up += channel.bytes_up
            self.proxy.counters.bytes_down += channel.bytes_down
        if self.transport is None or self.transport.is_closing():
            return
        if channel is not None and not channel.eof_received:
            self.reset()  # the tunnel died under us: the app must not see a clean end
        else:
            self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def abort_connection(self) -> None:
        """The fault boundary's way out: reset the app, close the channel, forget us."""
        self.reset()
        self._close_channel()
        self.proxy.forget(self)

    def reset(self) -> None:
        """Close with RST so the app sees a refusal at once, not an empty reply."""
        if self.transport is None:
            return
        sock: socket.socket | None = self.transport.get_extra_info("socket")
        if sock is not None:
            _rst_on_close(sock)
        self.transport.abort()


class TransparentProxy:
    """Listeners on 127.0.0.1 and ::1 (one port for both) for one tunnel."""

    def __init__(
        self,
        mux_source: MuxSource,
        fault_log: Faults | None = None,
        *,
        addresses: tuple[str, ...] = ("127.0.0.1", "::1"),
        on_prohibited: Callable[[LocalConnection], bool] | None = None,
        transparent: bool = False,
        limits: ConnLimits | None = None,
        connect: const.ConnectMode = const.ConnectMode.REMOTE,
    ) -> None:
        self.mux_source = mux_source
        self.addresses = addresses
        # Router mode: LAN connections arrive by TPROXY, so the listener needs
        # IP_TRANSPARENT; local ones still arrive by the nat redirect.
        self.transparent = transparent
        self.limits = limits if limits is not None else ConnLimits()
        self.port = 0
        self.counters = ProxyCounters()
        self.faults = fault_log if fault_log is not None else Faults()
        self.connections: set[LocalConnection] = set()
        self.admitted = 0  # connections counted against the limits (accept to close)
        self._per_user: collections.Counter[int] = collections.Counter()
        self._acceptors: list[Acceptor] = []
        self._attaching: set[asyncio.Task[None]] = set()
        self._closed = False
        self._on_prohibited = on_prohibited
        self._shortage_told = False
        self._refusals = Throttled(log)
        self.gate = SynGate(self.open_held, wanted=connect is const.ConnectMode.REMOTE)

    async def start(self, port: int = 0) -> int:
        for sock in bind_listeners(
            self.addresses, port, socket.SOCK_STREAM, transparent=self.transparent
        ):
            sock.listen(const.LISTEN_BACKLOG)
            self.port = sock.getsockname()[1]
            acceptor = Acceptor(
                sock,
                self._on_accept,
                what=f"the proxy listener {sock.getsockname()[0]}:{self.port}",
            )
            acceptor.start()
            self._acceptors.append(acceptor)
        self.gate.start()
        return self.port

    @property
    def syn_queue(self) -> int | None:
        """The NFQUEUE our capture's SYNs go to; None: connect() answers at once."""
        return self.gate.number if self.gate.holding else None

    @property
    def listening(self) -> list[str]:
        """Where the listeners are bound, as host:port ([::1]:12300 for IPv6)."""
        return [endpoint_text(a.sock.getsockname()) for a in self._acceptors]

    def destination(self, sock: socket.socket) -> tuple[str, int]:
        """Where the connection was going. TPROXY leaves the packets alone, so a
        connection it delivered has the original destination as its own address;
        one our nat redirect delivered has ours and asks conntrack."""
        local: tuple[str, int] = sock.getsockname()[:2]
        if self.transparent and (local[1] != self.port or local[0] not in self.addresses):
            return local
        return original_dst(sock)

    # --- admission: on the raw socket, before any transport -----------------------------

    def _on_accept(self, sock: socket.socket, _address: Any) -> None:
        """The accept path's fault boundary: whatever goes wrong for this connection
        (an app that reset already makes getpeername and SO_ORIGINAL_DST raise
        ENOTCONN; a bug raises anything) ends it, counted, and the listener goes on."""
        try:
            self._admission(sock)
        except Exception as exc:
            self.faults.record(faults.TCP, exc, "accept")
            _reset_socket(sock)

    def _admission(self, sock: socket.socket) -> None:
        dst = self.destination(sock)
        src: tuple[str, int] = sock.getpeername()[:2]
        if self._closed or (dst[1] == self.port and dst[0] in ("127.0.0.1", "::1")):
            _reset_socket(sock)  # a direct connect to our listener, not a redirect: refuse
            return
        held = self.gate.claim(src, dst)
        if held is not None:
            self._start_attach(held, sock)  # admitted at its SYN, channel open
            return
        if self.gate.holding:
            self.gate.counters.passed += 1
        uid = DIAG.uid(src, dst)
        if not self._admissible(src, dst, uid):
            _reset_socket(sock)
            return
        conn = LocalConnection(self, src, dst, uid)
        self.admit(conn)  # counted from here until forget() or a failed _attach
        self._start_attach(conn, sock)

    def _admissible(self, src: tuple[str, int], dst: tuple[str, int], uid: int | None) -> bool:
        """Whether a new connection is within the limits; counted and told when not."""
        refusal = self.refusal(uid)
        if refusal is None:
            return True
        self.counters.refused += 1
        self._refusals(
            "refused connections over %s (the last: uid %s, %s:%d -> %s:%d)",
            refusal,
            "unknown" if uid is None else uid,
            *src,
            *dst,
        )
        return False

    def _start_attach(self, conn: LocalConnection, sock: socket.socket) -> None:
        task = asyncio.get_running_loop().create_task(self._attach(conn, sock))
        self._attaching.add(task)
        task.add_done_callback(self._attaching.discard)

    def open_held(
        self, src: tuple[str, int], dst: tuple[str, int], uid: int | None
    ) -> LocalConnection | None:
        """A held SYN (true connect()): admit its connection and open its channel
        now; None to refuse it (over a limit, no tunnel, a connect to us)."""
        mux = self.mux_source()
        if self._closed or (dst[1] == self.port and dst[0] in self.addresses):
            return None
        if not self._admissible(src, dst, uid):
            return None
        if mux is None or mux.closed:
            self.counters.failed += 1
            return None
        conn = LocalConnection(self, src, dst, uid)
        conn.started = asyncio.get_running_loop().time()
        self.admit(conn)
        self.connections.add(conn)
        conn.open_channel(mux)
        return conn

    def refusal(self, uid: int | None) -> str | None:
        """Which limit a new connection of `uid` is over; None to take it."""
        if BUDGET.live >= BUDGET.limit(root=uid == 0):
            return f"the file descriptors left to connections ({BUDGET.limit(uid == 0)})"
        if uid == 0:
            return None  # root is never limited, but by what is left of the descriptors
        if self.admitted >= self.limits.total:
            return f"the profile's limit ({self.limits.total})"
        # One user never gets more than half of what the descriptors allow.
        share = min(self.limits.per_user, BUDGET.limit(root=False) // 2)
        if uid is not None and self._per_user[uid] >= share:
            return f"the limit per user ({share})"
        return None

    def admit(self, conn: LocalConnection) -> None:
        """Count `conn` against the limits `refusal` checks, until it is released."""
        conn.admitted = True
        self.admitted += 1
        BUDGET.live += 1
        if conn.uid is not None:
            self._per_user[conn.uid] += 1

    def _release(self, conn: LocalConnection) -> None:
        if not conn.admitted:
            return
        conn.admitted = False
        self.admitted -= 1
        BUDGET.live -= 1
        if conn.uid is not None:
            self._per_user[conn.uid] -= 1
            if self._per_user[conn.uid] <= 0:
                del self._per_user[conn.uid]

    async def _attach(self, conn: LocalConnection, sock: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, sock)
        except Exception as exc:  # the transport could not be made: end this one only
            self.faults.record(faults.TCP, exc, "accept")
            if conn.channel is not None:
                conn.abandon()
            self._release(conn)
            sock.close()

    # --- live connections ---------------------------------------------------------------

    def accepted(self, conn: LocalConnection) -> None:
        self.counters.accepted += 1
        if conn.channel is not None:  # opened at its SYN
            conn.tune_socket()
            conn.attach()
            return
        mux = self.mux_source()
        if self._closed or mux is None or mux.closed:
            self.counters.failed += 1
            conn.reset()  # tunnel down: refuse fast rather than hang (kill switch)
            return
        self.connections.add(conn)
        conn.tune_socket()
        conn.open_channel(mux)

    def open_failed(self, conn: LocalConnection, reason: int) -> None:
        if reason == sshmsg.OPEN_ADMINISTRATIVELY_PROHIBITED and self._on_prohibited:
            self._on_prohibited(conn)
        elif reason == sshmsg.OPEN_RESOURCE_SHORTAGE and not self._shortage_told:
            # Dropbear holds at most 1000 channels per ssh connection (MAX_CHANNELS;
            # measured: 999 app connections beside our own session channel); sshd
            # has no such limit. Each connection past it says only "resource
            # shortage" at INFO: say once what to change.
            self._shortage_told = True
            log.warning(
                "the server refuses more channels on one ssh connection (resource "
                "shortage; Dropbear allows 1000): raise `streams` to spread connections "
                "over more ssh connections, or use `forward: helper`"
            )

    def forget(self, conn: LocalConnection) -> None:
        self.gate.forget(conn)
        self.connections.discard(conn)
        self._release(conn)

    def limit_stats(self) -> LimitStats:
        """For stats: connections refused by a limit, and listener pauses at EMFILE."""
        return {
            "refused": self.counters.refused,
            "deferred": sum(a.deferred for a in self._acceptors),
        }

    def close(self) -> None:
        self._closed = True
        self.gate.close()
        for acceptor in self._acceptors:
            acceptor.close()
        for conn in list(self.connections):
            conn.reset()


def _rst_on_close(sock: socket.socket) -> None:
    """Closing `sock` will send RST: the app sees a refusal at once, not an empty reply."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _reset_socket(sock: socket.socket) -> None:
    """Close a socket with RST."""
    _rst_on_close(sock)
    sock.close()


def bind_listeners(
    addresses: tuple[str, ...], port: int, kind: int, *, transparent: bool = False
) -> list[socket.socket]:
    """Bind every address on one port number; skip a family the host lacks.

    `transparent`: IP_TRANSPARENT, so TPROXY rules may deliver here (router mode, UDP).

    The first bind picks the port (when 0); the rest must get the same number,
    so we retry a few times if another program holds it on a later address.
    """
    for _attempt in range(20):
        socks: list[socket.socket] = []
        chosen = port
        try:
            for address in addresses:
                sock = _bind_one(address, chosen, kind, transparent)
                if sock is None:
                    continue
                socks.append(sock)
                chosen = sock.getsockname()[1]
            if socks:
                return socks
            raise OSError(errno.EADDRNOTAVAIL, f"none of {', '.join(addresses)} can be bound")
        except OSError as exc:
            for sock in socks:
                sock.close()
            if port or exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, "no free port common to all listen addresses")


def _bind_one(address: str, port: int, kind: int, transparent: bool) -> socket.socket | None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        sock = socket.socket(family, kind)
    except OSError as exc:
        if exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            return None  # IPv6 disabled on this host: run IPv4-only (sshuttle #738)
        raise
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            set_transparent(sock)
        sock.setblocking(False)
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        if family == socket.AF_INET6 and exc.errno == errno.EADDRNOTAVAIL:
            return None
        raise
    return sock
