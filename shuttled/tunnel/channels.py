"""RFC 4254 channel layer over one packet pipe.

The pipe is either the ControlMaster's control socket in proxy mode or the stdio
of the remote helper (itself carried in a session channel): both speak the same
unencrypted SSH packets, so everything above this module is one piece of code.

Ownership of flow control:
- towards the remote we never send past the window it granted (sshd enforces it
  and the master does not check, so a mistake here kills the whole connection);
- towards us we grant window only as the local side drains what we wrote, so a
  slow local reader holds back the remote with bounded memory per channel.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from shuttled import const
from shuttled.errors import ProtocolError
from shuttled.tunnel import faults, sshmsg
from shuttled.tunnel.sshmsg import Reader, WireError

log = logging.getLogger(__name__)

Buffer = bytes | memoryview
# writev() takes at most this many buffers at once (Linux and the BSDs: 1024).
_IOV_MAX = 1024
# Largest join handed to a pipe that wants one bytes (see ChannelMux._join_and_write).
_JOIN_PIECE = 64 * 1024


class Pipe(Protocol):
    """Where the mux writes packets: an asyncio transport or an outer channel."""

    def write(self, data: bytes) -> None:
        """Send these bytes (whole packets) towards the peer."""

    def close(self) -> None:
        """Close the pipe; the mux is done with it."""


def socket_fd(transport: asyncio.BaseTransport) -> int:
    """The descriptor behind a socket transport (asyncio's or uvloop's), or -1."""
    sock = transport.get_extra_info("socket")
    try:
        return int(sock.fileno()) if sock is not None else -1
    except (AttributeError, OSError, ValueError):
        return -1


def write_views(transport: asyncio.WriteTransport, fd: int, views: Sequence[Buffer]) -> None:
    """Write `views` in order, in one writev() while the transport holds nothing.

    asyncio's transport.write() copies whatever the kernel does not take at once into
    its own buffer, and a batch must first be joined into one bytes: two copies per
    byte on the hot path. Here the kernel takes the buffers as they are, and only the
    unsent rest goes to the transport, which then keeps order and reports errors.
    """
    sent = 0
    if fd >= 0 and not transport.get_write_buffer_size() and not transport.is_closing():
        with contextlib.suppress(OSError):  # EAGAIN, or an error the transport will meet
            sent = os.writev(fd, views[:_IOV_MAX])
    for view in views:
        size = len(view)
        if sent >= size:
            sent -= size
            continue
        transport.write(memoryview(view)[sent:] if sent else view)
        sent = 0


class TransportPipe:
    """A socket transport as the mux's pipe, written with write_views."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        self.fd = socket_fd(transport)

    def write(self, data: bytes) -> None:
        write_views(self.transport, self.fd, (data,))

    def writev(self, views: Sequence[Buffer]) -> None:
        write_views(self.transport, self.fd, views)

    def close(self) -> None:
        self.transport.close()


class Endpoint(Protocol):
    """What sits on our side of one channel (a local socket, a DNS client, ...)."""

    def on_open(self, channel: Channel) -> None:
        """The peer confirmed the channel: data may flow."""

    def on_open_failed(self, reason: int, description: str) -> None:
        """The peer refused the open, with an RFC 4254 reason code."""

    def on_data(self, data: memoryview) -> None:
        """Data from the peer (valid only during the call)."""

    def on_extended_data(self, code: int, data: bytes) -> None:
        """Extended data from the peer (stderr: code 1)."""

    def on_eof(self) -> None:
        """The peer sends no more data."""

    def on_close(self) -> None:
        """The channel is closed both ways; the endpoint ends."""

    def pause_reading(self) -> None:
        """The channel's send window or the pipe is full: stop feeding it."""

    def resume_reading(self) -> None:
        """There is room again: feed the channel."""


class State(enum.Enum):
    OPENING = "opening"
    OPEN = "open"
    CLOSED = "closed"


@dataclass
class Counters:
    """Per-mux totals, read by stats; plain ints so the hot path stays cheap."""

    bytes_up: int = 0
    bytes_down: int = 0
    opened: int = 0
    open_failed: int = 0
    active: int = 0


class Channel:
    """One channel's exact state: ids, windows both ways, EOF and CLOSE flags."""

    __slots__ = (
        "_pending",
        "_pending_size",
        "_replies",
        "_unacked",
        "bytes_down",
        "bytes_up",
        "close_received",
        "close_sent",
        "endpoint",
        "eof_pending",
        "eof_received",
        "eof_sent",
        "hold_window",
        "kind",
        "local_id",
        "mux",
        "opened_at",
        "reading_paused",
        "remote_id",
        "remote_max_packet",
        "remote_window",
        "state",
        "window",
    )

    def __init__(self, mux: ChannelMux, local_id: int, kind: str, endpoint: Endpoint) -> None:
        self.mux = mux
        self.local_id = local_id
        self.kind = kind
        self.endpoint = endpoint
        self.state = State.OPENING
        self.remote_id = 0
        self.remote_window = 0
        self.remote_max_packet = 0
        self.window = const.CHANNEL_WINDOW  # what the remote may still send us
        self._unacked = 0  # received and delivered, not yet granted back
        self.hold_window = False  # local side is backed up: grant nothing
        self._pending: collections.deque[memoryview] = collections.deque()
        self._pending_size = 0
        self._replies: collections.deque[asyncio.Future[bool]] = collections.deque()
        self.eof_pending = self.eof_sent = self.eof_received = False
        self.close_sent = self.close_received = False
        self.reading_paused = False
        self.bytes_up = self.bytes_down = 0
        self.opened_at = asyncio.get_running_loop().time()

    # --- sending ----------------------------------------------------------------

    @property
    def can_send(self) -> bool:
        """Open, and neither EOF nor CLOSE sent: send() would carry data."""
        return self.state is State.OPEN and not (self.close_sent or self.eof_sent)

    def send(self, data: bytes | memoryview) -> None:
        """Queue data; whatever exceeds the remote's window waits for WINDOW_ADJUST."""
        if not self.can_send or not data:
            return
        view = memoryview(data)
        if self._pending_size:
            self._queue(view)
            return
        sent = self._send_within_window(view)
        if sent < len(view):
            self._queue(view[sent:])

    def _queue(self, view: memoryview) -> None:
        self._pending.append(view)
        self._pending_size += len(view)
        self.mux.update_reading(self)

    def _send_within_window(self, view: memoryview) -> int:
        total = min(len(view), self.remote_window)
        if not total:
            return 0
        step = self.remote_max_packet
        write = self.mux.write_data
        for start in range(0, total, step):
            write(self.remote_id, view[start : min(start + step, total)])
        self.remote_window -= total
        self.bytes_up += total
        self.mux.push()
        return total

    def _drain_pending(self) -> None:
        while self._pending and self.remote_window:
            view = self._pending.popleft()
            sent = self._send_within_window(view)
            self._pending_size -= sent
            if sent < len(view):
                self._pending.appendleft(view[sent:])
                break
        if not self._pending_size and self.eof_pending:
            self.send_eof()
        self.mux.update_reading(self)

    def send_whole(self, data: bytes) -> bool:
        """Send `data` as exactly one CHANNEL_DATA, or not at all (False).

        For datagram channels (udp@shuttled): each DATA is one datagram, so it may
        be neither split nor queued; what does not fit the window now is dropped,
        as a full socket buffer would drop it.
        """
        size = len(data)
        if (
            not self.can_send
            or self._pending_size
            or size > self.remote_window
            or size > self.remote_max_packet
        ):
            return False
        self.mux.write_data(self.remote_id, memoryview(data))
        self.remote_window -= size
        self.bytes_up += size
        self.mux.push()
        return True

    @property
    def send_blocked(self) -> bool:
        """Data waits for the peer's window."""
        return self._pending_size > 0

    def send_eof(self) -> None:
        """Send EOF once queued data is out (at confirmation, if still opening)."""
        if self.eof_sent or self.close_sent or self.state is not State.OPEN:
            self.eof_pending = self.state is State.OPENING
            return
        if self._pending_size:
            self.eof_pending = True
            return
        self.eof_pending = False
        self.eof_sent = True
        self.mux.write(sshmsg.eof(self.remote_id))
        self._maybe_close()

    def request(
        self, name: str, extra: bytes = b"", want_reply: bool = True
    ) -> asyncio.Future[bool] | None:
        """Send a CHANNEL_REQUEST; with want_reply, a future of success/failure."""
        if self.state is not State.OPEN or self.close_sent:
            raise ProtocolError(f"request {name!r} on channel {self.local_id} that is not open")
        self.mux.write(sshmsg.channel_request(self.remote_id, name, want_reply, extra))
        if not want_reply:
            return None
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._replies.append(future)
        return future

    def close(self) -> None:
        """Send CLOSE now (abortive for the remote); nothing more is sent after it."""
        if self.close_sent:
            return
        self.close_sent = True
        self._pending.clear()
        self._pending_size = 0
        if self.state is State.OPEN:
            self.mux.write(sshmsg.close(self.remote_id))
        self._maybe_finish()

    def _maybe_close(self) -> None:
        # Both directions finished: the conversation is over, say so.
        if self.eof_sent and self.eof_received and not self.close_sent:
            self.close()

    # --- receiving ----------------------------------------------------------------

    def consumed(self, size: int) -> None:
        """The endpoint took `size` bytes off our hands; grant window when worth it."""
        self._unacked += size
        if not self.hold_window:
            self._grant(const.CHANNEL_WINDOW_REFILL)

    def set_hold_window(self, hold: bool) -> None:
        """Hold back window grants (the endpoint cannot take more yet), or release them."""
        self.hold_window = hold
        if not hold:
            self._grant(1)

    def _grant(self, threshold: int) -> None:
        if self._unacked >= threshold and not (self.close_sent or self.close_received):
            self.mux.write(sshmsg.window_adjust(self.remote_id, self._unacked))
            self.window += self._unacked
            self._unacked = 0

    def _on_confirm(self, remote_id: int, window: int, max_packet: int) -> None:
        self.state = State.OPEN
        self.remote_id = remote_id
        self.remote_window = window
        # Cap stream channels at our own bound (a huge max packet only costs
        # latency); a datagram channel needs whole datagrams in one message.
        cap = (
            const.MAX_INBOUND_PACKET
            if self.kind == sshmsg.UDP_CHANNEL_TYPE
            else const.CHANNEL_MAX_PACKET
        )
        self.remote_max_packet = max(1, min(max_packet, cap))
        if self.close_sent:  # closed by our side while the open was in flight
            self.mux.write(sshmsg.close(self.remote_id))
            return
        self.notify("open", self.endpoint.on_open, self)
        if self.eof_pending and not self.close_sent:
            self.send_eof()

    def _on_data(self, data: memoryview) -> None:
        size = len(data)
        if size > self.window:
            raise ProtocolError(
                f"channel {self.local_id}: {size} bytes of data exceed the window of {self.window}"
            )
        self.window -= size
        self.bytes_down += size
        if self.close_sent or self.eof_received:
            self.consumed(size)  # nobody will read it; keep the books balanced
            return
        try:  # inline, not notify(): this is the hot path
            self.endpoint.on_data(data)
        except Exception as exc:
            self.mux.contain(self, exc, "data")

    def _on_window_adjust(self, amount: int) -> None:
        if self.remote_window + amount > sshmsg.MAX_WINDOW:
            raise ProtocolError(f"channel {self.local_id}: window adjust overflows 2^32")
        self.remote_window += amount
        if self._pending_size:
            self._drain_pending()

    def _on_eof(self) -> None:
        if self.eof_received:
            raise ProtocolError(f"channel {self.local_id}: second EOF")
        self.eof_received = True
        if not self.close_sent:
            self.notify("eof", self.endpoint.on_eof)
        self._maybe_close()

    def _on_close(self) -> None:
        if self.close_received:
            raise ProtocolError(f"channel {self.local_id}: second CLOSE")
        self.close_received = True
        if self.close_sent:
            self._maybe_finish()
        else:
            self.close()  # answer it; close() then finishes the channel

    def _on_reply(self, ok: bool) -> None:
        if not self._replies:
            raise ProtocolError(f"channel {self.local_id}: reply without a request")
        future = self._replies.popleft()
        if not future.done():
            future.set_result(ok)

    def _maybe_finish(self) -> None:
        # An id is free only once CLOSE went both ways (RFC 4254 section 5.3).
        if self.state is State.OPEN and self.close_sent and self.close_received:
            self._finish()

    def _finish(self) -> None:
        self.state = State.CLOSED
        for future in self._replies:
            if not future.done():
                future.set_result(False)
        self._replies.clear()
        self.mux.release(self)
        self.notify("close", self.endpoint.on_close)

    def notify(self, where: str, callback: Callable[..., None], *args: object) -> None:
        """Call into the endpoint inside the fault boundary: what it raises ends this
        channel, never the mux (see faults.py)."""
        try:
            callback(*args)
        except Exception as exc:
            self.mux.contain(self, exc, where)


Handler = Callable[[Channel, Reader], None]


class ChannelMux:
    """All channels over one pipe: ids, dispatch, batched writes, global pause."""

    def __init__(
        self,
        pipe: Pipe,
        *,
        name: str = "mux",
        on_lost: Callable[[BaseException | None], None] | None = None,
        on_global: Callable[[int, memoryview], None] | None = None,
        fault_log: faults.Faults | None = None,
    ) -> None:
        self.pipe = pipe
        self.name = name
        self.counters = Counters()
        self.faults = fault_log if fault_log is not None else faults.Faults()
        self.channels: dict[int, Channel] = {}
        self._free_ids: list[int] = []
        self._next_id = 0
        self._out: list[Buffer] = []
        self._flushing = False
        self._feeding = False
        self._write_batch = pipe.writev if isinstance(pipe, TransportPipe) else self._join_and_write
        self._leftover = b""
        self._paused = False
        self._blocked: set[Channel] = set()  # channels whose endpoint we paused
        self._closed = False
        self._on_lost = on_lost
        self._on_global = on_global
        self._dispatch: dict[int, Callable[[Reader], None]] = {
            sshmsg.MSG_CHANNEL_OPEN_CONFIRMATION: self._open_confirmation,
            sshmsg.MSG_CHANNEL_OPEN_FAILURE: self._open_failure,
            sshmsg.MSG_CHANNEL_WINDOW_ADJUST: self._window_adjust,
            sshmsg.MSG_CHANNEL_EXTENDED_DATA: self._extended_data,
            sshmsg.MSG_CHANNEL_EOF: lambda r: self._channel(r)._on_eof(),
            sshmsg.MSG_CHANNEL_CLOSE: lambda r: self._channel(r)._on_close(),
            sshmsg.MSG_CHANNEL_REQUEST: self._channel_request,
            sshmsg.MSG_CHANNEL_SUCCESS: lambda r: self._channel(r)._on_reply(True),
            sshmsg.MSG_CHANNEL_FAILURE: lambda r: self._channel(r)._on_reply(False),
            sshmsg.MSG_CHANNEL_OPEN: self._peer_open,
        }

    # --- opening ----------------------------------------------------------------

    def open(self, kind: str, endpoint: Endpoint, extra: bytes = b"") -> Channel:
        """Open a channel of `kind` for `endpoint`; its answer comes as on_open/on_open_failed."""
        if self._closed:
            raise ProtocolError(f"{self.name} is closed")
        local_id = self._free_ids.pop() if self._free_ids else self._allocate_id()
        channel = Channel(self, local_id, kind, endpoint)
        self.channels[local_id] = channel
        self.counters.active += 1
        self.write(
            sshmsg.channel_open(
                kind, local_id, const.CHANNEL_WINDOW, const.CHANNEL_MAX_PACKET, extra
            )
        )
        return channel

    def _allocate_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def open_direct_tcpip(
        self, host: str, port: int, orig_host: str, orig_port: int, endpoint: Endpoint
    ) -> Channel:
        """Open a direct-tcpip channel: sshd (or the helper) connects to host:port."""
        extra = sshmsg.direct_tcpip_extra(host, port, orig_host, orig_port)
        return self.open("direct-tcpip", endpoint, extra)

    def release(self, channel: Channel) -> None:
        """Forget a finished channel: its id is free again and its bytes are counted."""
        if self.channels.pop(channel.local_id, None) is channel:
            self._free_ids.append(channel.local_id)
            self.counters.active -= 1
            self.counters.bytes_up += channel.bytes_up
            self.counters.bytes_down += channel.bytes_down
        self._blocked.discard(channel)

    # --- writing ----------------------------------------------------------------

    def write(self, packet: Buffer) -> None:
        """Queue a packet for the pipe, in order, written now unless paused."""
        if self._closed:
            return
        self._out.append(packet)
        self.push()

    def write_data(self, remote_id: int, data: memoryview) -> None:
        """Queue one CHANNEL_DATA; the caller push()es once its whole batch is queued."""
        if self._closed:
            return
        self._out += (sshmsg.data_header(remote_id, len(data)), data)

    def push(self) -> None:
        """Send what is queued now, unless a feed() is running: everything a read
        from the pipe causes (grants, queued data it unblocks) leaves in one write
        at its end. A burst still leaves in one write per app read (Channel.send
        batches). At once rather than on the next loop turn: new connections one
        at a time went from ~80/s to ~550/s in the lab (TTFB 1.2 -> 1.0 ms)."""
        if not self._feeding:
            self._flush()

    def _flush(self) -> None:
        if self._flushing or self._closed:
            return
        self._flushing = True
        try:
            while self._out:  # a write may call back into us (pause_writing)
                out, self._out = self._out, []
                self._write_batch(out)
        finally:
            self._flushing = False

    def _join_and_write(self, out: list[Buffer]) -> None:
        # A pipe that is itself a channel (the helper's) takes one bytes at a time.
        # Joined in pieces, not whole: a 256 KiB join freed together with the 256 KiB
        # read it copies made glibc trim and re-fault the heap top on every read
        # (10x the brk calls; helper upload 1.25 -> 1.70 CPU s/GB).
        piece: list[Buffer] = []
        size = 0
        for buf in out:
            piece.append(buf)
            size += len(buf)
            if size >= _JOIN_PIECE:
                self.pipe.write(b"".join(piece))
                piece, size = [], 0
        if piece:
            self.pipe.write(b"".join(piece))

    # --- global back-pressure from the pipe -----------------------------------------

    def pause_writing(self) -> None:
        """The pipe is full: every channel stops reading its endpoint."""
        self._paused = True
        for channel in list(self.channels.values()):
            self.update_reading(channel)

    def resume_writing(self) -> None:
        """The pipe drained: blocked channels read again."""
        self._paused = False
        for channel in list(self._blocked):
            self.update_reading(channel)

    def update_reading(self, channel: Channel) -> None:
        """Pause a channel's producer while its window or the pipe is full."""
        want_paused = (self._paused or channel.send_blocked) and channel.state is not State.CLOSED
        if want_paused == channel.reading_paused:
            return
        channel.reading_paused = want_paused
        if want_paused:
            self._blocked.add(channel)
            channel.notify("pause", channel.endpoint.pause_reading)
        else:
            self._blocked.discard(channel)
            channel.notify("resume", channel.endpoint.resume_reading)

    def contain(self, channel: Channel, exc: BaseException, where: str) -> None:
        """An endpoint failed: end its channel (CLOSE to the remote, its local side
        aborted) and count it; the other channels and the mux go on."""
        if not channel.close_sent and channel.state is not State.CLOSED:
            channel.close()
        endpoint = channel.endpoint
        self.faults.end(
            getattr(endpoint, "fault_kind", faults.CHANNEL),
            exc,
            where,
            getattr(endpoint, "abort_connection", None),
        )

    # --- reading ----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the pipe; a protocol violation ends the whole mux."""
        if self._closed:
            return
        self._feeding = True
        try:
            self._parse(data)
        finally:
            self._feeding = False
        self._flush()

    def _parse(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            if self._leftover:
                view = self._complete_leftover(view)
            messages, used = sshmsg.split_packets(view, const.MAX_INBOUND_PACKET)
            for msg_type, payload in messages:
                self._handle(msg_type, payload)
        except (WireError, ProtocolError) as exc:
            self.fail(ProtocolError(f"{self.name}: malformed message from the remote: {exc}"))
            return
        # Only the tail of one packet is ever copied; payloads are views of `data`.
        if used < len(view):
            self._leftover = bytes(view[used:])

    def _complete_leftover(self, view: memoryview) -> memoryview:
        """Finish the packet split across reads; return what follows it."""
        head = self._leftover
        if len(head) < 4:
            take = min(4 - len(head), len(view))
            head, view = head + bytes(view[:take]), view[take:]
            if len(head) < 4:
                self._leftover = head
                return view
        total = 4 + sshmsg.U32.unpack_from(head)[0]
        if total > const.MAX_INBOUND_PACKET + 4:
            raise WireError(f"packet length {total - 4} over {const.MAX_INBOUND_PACKET}")
        take = min(total - len(head), len(view))
        head, view = head + bytes(view[:take]), view[take:]
        self._leftover = b""
        if len(head) < total:
            self._leftover = head
            return view
        messages, _used = sshmsg.split_packets(head, const.MAX_INBOUND_PACKET)
        for msg_type, payload in messages:
            self._handle(msg_type, payload)
        return view

    def _handle(self, msg_type: int, payload: memoryview) -> None:
        if msg_type == sshmsg.MSG_CHANNEL_DATA:
            self._data(payload)
            return
        handler = self._dispatch.get(msg_type)
        if handler is None:
            if self._on_global is not None and msg_type in (
                sshmsg.MSG_REQUEST_SUCCESS,
                sshmsg.MSG_REQUEST_FAILURE,
            ):
                self._on_global(msg_type, payload)
                return
            raise ProtocolError(f"unexpected message type {msg_type}")
        reader = Reader(payload)
        handler(reader)
        reader.end(f"message type {msg_type}")

    def _channel(self, reader: Reader, opening_ok: bool = False) -> Channel:
        local_id = reader.u32()
        channel = self.channels.get(local_id)
        if channel is None:
            raise ProtocolError(f"message for unknown channel {local_id}")
        if channel.state is State.OPENING and not opening_ok:
            raise ProtocolError(f"message for channel {local_id} before its confirmation")
        if channel.state is not State.OPENING and opening_ok:
            raise ProtocolError(f"second open reply for channel {local_id}")
        return channel

    def _data(self, payload: memoryview) -> None:
        if len(payload) < 8:
            raise ProtocolError("truncated CHANNEL_DATA")
        local_id, size = sshmsg.U32X2.unpack_from(payload)
        if size != len(payload) - 8:
            raise ProtocolError(f"CHANNEL_DATA length {size} != {len(payload) - 8}")
        channel = self.channels.get(local_id)
        if channel is None or channel.state is not State.OPEN:
            raise ProtocolError(f"data for channel {local_id} that is not open")
        channel._on_data(payload[8:])

    def _extended_data(self, reader: Reader) -> None:
        channel = self._channel(reader)
        code = reader.u32()
        data = reader.string()
        if len(data) > channel.window:
            raise ProtocolError(f"channel {channel.local_id}: extended data exceeds window")
        channel.window -= len(data)
        channel.notify("extended data", channel.endpoint.on_extended_data, code, data)
        channel.consumed(len(data))

    def _open_confirmation(self, reader: Reader) -> None:
        channel = self._channel(reader, opening_ok=True)
        remote_id, window, max_packet = reader.u32(), reader.u32(), reader.u32()
        self.counters.opened += 1
        channel._on_confirm(remote_id, window, max_packet)

    def _open_failure(self, reader: Reader) -> None:
        channel = self._channel(reader, opening_ok=True)
        reason = reader.u32()
        description = reader.text()
        reader.string()  # language tag
        self.counters.open_failed += 1
        channel.state = State.CLOSED
        self.release(channel)
        channel.notify("open failure", channel.endpoint.on_open_failed, reason, description)

    def _window_adjust(self, reader: Reader) -> None:
        channel = self._channel(reader)
        channel._on_window_adjust(reader.u32())

    def _channel_request(self, reader: Reader) -> None:
        channel = self._channel(reader)
        name = reader.text()
        want_reply = reader.boolean()
        hook = getattr(channel.endpoint, "on_exit_status", None)
        if name == "exit-status" and hook is not None:
            channel.notify("exit status", hook, reader.u32())
        else:
            reader.rest()  # request-specific data, whatever its layout
        if want_reply and not channel.close_sent:
            self.write(sshmsg.channel_reply(channel.remote_id, False))

    def _peer_open(self, reader: Reader) -> None:
        # We never ask for forwarded channels; refuse whatever arrives.
        kind = reader.text()
        sender = reader.u32()
        reader.rest()
        self.write(
            sshmsg.open_failure(
                sender, sshmsg.OPEN_ADMINISTRATIVELY_PROHIBITED, f"{kind} channels are not accepted"
            )
        )

    # --- teardown ---------------------------------------------------------------

    def fail(self, exc: BaseException | None) -> None:
        """The pipe is gone or the peer broke the protocol: end every channel."""
        if self._closed:
            return
        if exc is not None:
            log.error("%s", exc)
        self._flush()
        self._closed = True
        self.pipe.close()
        for channel in list(self.channels.values()):
            channel.close_sent = channel.close_received = True
            if channel.state is State.OPENING:
                self.release(channel)
                channel.state = State.CLOSED
                channel.notify(
                    "open failure",
                    channel.endpoint.on_open_failed,
                    sshmsg.OPEN_CONNECT_FAILED,
                    "tunnel closed",
                )
            else:
                channel._finish()
        if self._on_lost is not None:
            self._on_lost(exc)

    @property
    def closed(self) -> bool:
        """The mux failed or was closed: no channel can be opened."""
        return self._closed


def grow_send_buffer(transport: asyncio.BaseTransport, size: int) -> None:
    """Let the kernel, not the transport's buffer, hold the backlog towards the master,
    so that writes stay one writev() each with no copy in Python (as root, past
    net.core.wmem_max; measured: upload CPU per GB 1.39 -> 0.89 s)."""
    sock = transport.get_extra_info("socket")
    for option in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
        if sock is not None and option is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, size)
                return
            except OSError:
                continue


class MuxProtocol(asyncio.Protocol):
    """asyncio glue: the control socket's bytes into a ChannelMux, and back-pressure."""

    def __init__(
        self,
        name: str,
        on_lost: Callable[[BaseException | None], None] | None = None,
        fault_log: faults.Faults | None = None,
    ) -> None:
        self.name = name
        self.mux: ChannelMux | None = None
        self._on_lost = on_lost
        self._faults = fault_log
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are not subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=const.MUX_WRITE_HIGH, low=const.MUX_WRITE_LOW)
        pipe = TransportPipe(self.transport)
        grow_send_buffer(transport, const.MUX_WRITE_SNDBUF)
        self.mux = ChannelMux(pipe, name=self.name, on_lost=self._on_lost, fault_log=self._faults)

    def data_received(self, data: bytes) -> None:
        assert self.mux is not None
        self.mux.feed(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.mux is not None:
            self.mux.fail(
                exc
                if exc is not None
                else ConnectionResetError(
                    f"{self.name}: the ssh master closed the control connection"
                )
            )

    def pause_writing(self) -> None:
        if self.mux is not None:
            self.mux.pause_writing()

    def resume_writing(self) -> None:
        if self.mux is not None:
            self.mux.resume_writing()
