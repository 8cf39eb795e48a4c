"""UDP through the tunnel: TPROXY'd datagrams, one udp@shuttled channel per flow.

sshd cannot forward UDP, so datagrams go to the remote helper
(shuttled.remote.helper), which sends them from an ordinary socket there. A
flow is one local source (address, port): its channel carries every datagram
that source sends to the profile's subnets, each framed with its destination
(sshmsg.pack_datagram), and brings the answers back framed with their source.

Answers reach the LAN host (or local app) FROM the address and port it sent
to, through a transparent socket bound there and connected to the source (one
per destination of a flow, see transparent.reply_socket). Being connected, that
socket also receives the source's next datagrams to that destination straight
from TPROXY, so only a flow's first datagram to each destination passes the
shared listener and its IP_RECVORIGDSTADDR cmsg.

Bounded everywhere: at most `max_flows` flows (the rest are refused and
counted), UDP_MAX_DESTINATIONS reply sockets per flow, UDP_OPEN_QUEUE
datagrams held while a channel opens, nothing queued beyond the channel's
window (UDP may drop, so we drop and count), and flows end after `idle`
seconds without a datagram either way (the helper is told the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shuttled import const
from shuttled.control.schema import ConnectionRow
from shuttled.errors import ShuttledError
from shuttled.tunnel import faults, sshmsg
from shuttled.tunnel.channels import Channel, ChannelMux
from shuttled.tunnel.faults import Faults, abort, contained
from shuttled.tunnel.proxy import bind_listeners
from shuttled.tunnel.transparent import (
    Address,
    connection_row,
    endpoint_text,
    recv_batch,
    recv_original_dst,
    reply_socket,
)

log = logging.getLogger(__name__)

RECV_BATCH = 64  # datagrams read per wake-up of one socket
MuxGetter = Callable[[], Awaitable[ChannelMux]]


@dataclass
class UdpStats:
    """Counters for `stats`; every datagram we took is sent, or counted as dropped."""

    flows: int = 0  # open now
    opened: int = 0  # flows ever started
    refused: int = 0  # flows refused: the profile's flow limit was reached
    failed: int = 0  # flows whose channel could not open (no helper, tunnel down)
    datagrams_up: int = 0
    datagrams_down: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    dropped: int = 0  # datagrams dropped: window full, queue full, send failed


def receive_datagram(channel: Channel | None, data: memoryview) -> tuple[str, int, bytes]:
    """One datagram off a udp@shuttled channel: its window given back, then unpacked
    (sshmsg.WireError when the frame is malformed)."""
    assert channel is not None
    channel.consumed(len(data))
    return sshmsg.unpack_datagram(data)


class Flow:
    """One local source's datagrams and their answers; the channel's Endpoint.

    Its socket callbacks run inside the fault boundary (@contained), its channel
    callbacks inside the mux's: a fault ends this flow only."""

    fault_kind = faults.UDP

    def __init__(self, proxy: UdpProxy, src: Address) -> None:
        self.proxy = proxy
        self.faults = proxy.faults
        self.src = src
        self.family = socket.AF_INET6 if ":" in src[0] else socket.AF_INET
        self.channel: Channel | None = None
        self.queue: list[bytes] = []  # frames waiting for the channel to open
        self.replies: dict[Address, socket.socket] = {}
        self.started = self.last = asyncio.get_running_loop().time()
        self.closed = False
        self.paused = False

    def describe(self, now: float) -> ConnectionRow:
        """This flow as a `connections` row: the destinations it has sent to."""
        return connection_row(
            "udp",
            self.src,
            ", ".join(endpoint_text(d) for d in self.replies) or "-",
            self.channel,
            now - self.started,
        )

    # --- towards the remote ---------------------------------------------------------

    @contained
    def send(self, dst: Address, payload: bytes) -> None:
        stats = self.proxy.stats
        self.last = asyncio.get_running_loop().time()
        if self.closed or not self._reply_socket(dst):
            stats.dropped += 1
            return
        frame = sshmsg.pack_datagram(dst[0], dst[1], payload)
        if self.channel is None:
            if len(self.queue) >= const.UDP_OPEN_QUEUE:
                stats.dropped += 1
                return
            self.queue.append(frame)
        elif self.paused or not self.channel.send_whole(frame):
            stats.dropped += 1
            return
        stats.datagrams_up += 1
        stats.bytes_up += len(payload)

    def _reply_socket(self, dst: Address) -> socket.socket | None:
        """The socket answers from `dst` leave by; made on first use, bounded per flow."""
        sock = self.replies.get(dst)
        if sock is not None:
            return sock
        if len(self.replies) >= const.UDP_MAX_DESTINATIONS:
            return None
        try:
            sock = reply_socket(dst, self.src)
        except OSError as exc:
            log.debug("no reply socket from %s:%d to %s:%d: %s", *dst, *self.src, exc.strerror)
            return None
        self.replies[dst] = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, sock, dst)
        return sock

    @contained
    def _readable(self, sock: socket.socket, dst: Address) -> None:
        # The source's next datagrams to dst, which TPROXY hands to this socket.
        for _ in range(RECV_BATCH):
            try:
                payload = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP unreachable from the LAN host: keep going
                continue
            self.send(dst, payload)

    async def open(self, getter: MuxGetter, idle: float) -> None:
        try:
            mux = await getter()
            family = "inet6" if self.family == socket.AF_INET6 else "inet"
            extra = sshmsg.sstring(family) + sshmsg.U32.pack(max(1, round(idle)))
            mux.open(sshmsg.UDP_CHANNEL_TYPE, self, extra)
        except (ShuttledError, OSError) as exc:
            log.debug("UDP flow from %s:%d not opened: %s", *self.src, exc)
            self.on_open_failed(0, str(exc))
        except Exception as exc:  # the boundary, for a task nobody awaits
            abort(self, exc, "open")

    def abort_connection(self) -> None:
        self.close()

    # --- channel side (Endpoint) ----------------------------------------------------

    def on_open(self, channel: Channel) -> None:
        if self.closed:
            channel.close()
            return
        self.channel = channel
        queued, self.queue = self.queue, []
        for frame in queued:
            if not channel.send_whole(frame):
                self.proxy.stats.dropped += 1

    def on_open_failed(self, reason: int, description: str) -> None:
        self.proxy.stats.failed += 1
        self.proxy.stats.dropped += len(self.queue)
        self.close()

    def on_data(self, data: memoryview) -> None:
        try:
            host, port, payload = receive_datagram(self.channel, data)
        except sshmsg.WireError as exc:
            log.warning("UDP flow from %s:%d: bad datagram frame: %s", *self.src, exc)
            return
        self.last = asyncio.get_running_loop().time()
        sock = self._reply_socket((host, port))
        stats = self.proxy.stats
        try:
            if sock is None:
                raise OSError("no reply socket")
            sock.send(payload)
        except OSError:  # full buffer, or the LAN host said unreachable: UDP drops
            stats.dropped += 1
            return
        stats.datagrams_down += 1
        stats.bytes_down += len(payload)

    def on_extended_data(self, code: int, data: bytes) -> None:
        pass

    def on_eof(self) -> None:
        pass

    def on_close(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self.paused = True  # the pipe to the master is full: drop rather than buffer

    def resume_reading(self) -> None:
        self.paused = False

    # --- ending -----------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.clear()
        loop = asyncio.get_running_loop()
        for sock in self.replies.values():
            loop.remove_reader(sock.fileno())
            sock.close()
        self.replies.clear()
        if self.channel is not None and not self.channel.close_sent:
            self.channel.close()
        self.proxy.forget(self)


class UdpProxy:
    """Transparent UDP listeners on 127.0.0.1 and ::1 (one port) for one tunnel."""

    def __init__(
        self,
        mux_getter: MuxGetter,
        fault_log: Faults | None = None,
        *,
        addresses: tuple[str, ...] = ("127.0.0.1", "::1"),
        max_flows: int = const.UDP_MAX_FLOWS,
        idle: float = const.UDP_IDLE,
    ) -> None:
        self.mux_getter = mux_getter
        self.addresses = addresses
        self.max_flows = max_flows
        self.idle = idle
        self.port = 0
        self.stats = UdpStats()
        self.faults = fault_log if fault_log is not None else Faults()
        self.flows: dict[Address, Flow] = {}
        self._socks: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._socks = bind_listeners(self.addresses, port, socket.SOCK_DGRAM, transparent=True)
        for sock in self._socks:
            recv_original_dst(sock)
            loop.add_reader(sock.fileno(), self._readable, sock)
            self.port = sock.getsockname()[1]
        self._sweeper = loop.call_later(self._sweep_interval(), self._sweep)
        return self.port

    def _readable(self, sock: socket.socket) -> None:
        itself = sock.getsockname()[:2]
        for payload, src, dst in recv_batch(sock, RECV_BATCH):
            if dst is None or dst == itself:  # sent to the listener, not TPROXY'd: not ours
                self.stats.dropped += 1
                continue
            flow = self.flows.get(src) or self.new_flow(src)
            if flow is None:
                continue
            flow.send(dst, payload)

    def new_flow(self, src: Address) -> Flow | None:
        """Open a flow for datagrams from `src`; None (counted refused) past max_flows."""
        if len(self.flows) >= self.max_flows:
            self.stats.refused += 1
            self.stats.dropped += 1
            return None
        flow = Flow(self, src)
        self.flows[src] = flow
        self.stats.opened += 1
        self.stats.flows = len(self.flows)
        task = asyncio.create_task(flow.open(self.mux_getter, self.idle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return flow

    def forget(self, flow: Flow) -> None:
        if self.flows.get(flow.src) is flow:
            del self.flows[flow.src]
        self.stats.flows = len(self.flows)

    def _sweep_interval(self) -> float:
        return max(0.1, min(self.idle / 4, 5.0))

    def _sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        for flow in [f for f in self.flows.values() if now - f.last >= self.idle]:
            flow.close()
        self._sweeper = asyncio.get_running_loop().call_later(self._sweep_interval(), self._sweep)

    def describe(self) -> list[ConnectionRow]:
        now = asyncio.get_running_loop().time()
        return [flow.describe(now) for flow in self.flows.values()]

    def close_flows(self) -> None:
        """End every flow (the session they ran on is gone)."""
        for flow in list(self.flows.values()):
            flow.close()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in self._tasks:
            task.cancel()
        self.close_flows()
        loop = asyncio.get_running_loop()
        for sock in self._socks:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
            sock.close()
        self._socks.clear()
