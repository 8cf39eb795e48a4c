"""shuttled remote helper: RFC 4254 channels over stdio, for remotes that refuse forwarding.

The client runs this in the remote's python3 over a `session` channel of its
ControlMaster when sshd refuses `direct-tcpip` (AllowTcpForwarding no), and for
UDP, which sshd cannot forward. It is standard library only, runs on Python
3.8+, and writes nothing to the remote filesystem.

How it gets there: the client execs `shuttled.remote.loader_command()`, a short
loader that reads exactly N bytes of source from stdin and execs them as
__main__. Those bytes (`shuttled.remote.helper_source()`) are the text of
shuttled/tunnel/sshmsg.py followed by the text of this file, so here the wire
functions are module globals; imported from the package (tests), they come
from shuttled.tunnel.sshmsg. `wire` below is whichever applies. Because the
two texts share one namespace, this file must not rebind any top-level name
that sshmsg.py defines (a unit test checks).

Protocol on stdin/stdout (framing and messages exactly as in sshmsg.py:
unencrypted SSH packets, the same channel subset the ControlMaster carries):

* Hello: the first packet the helper writes is MSG_REQUEST_SUCCESS (81) with
  payload string "shuttled-helper 1" || string python version ("3.11.7"). The
  client waits for it (bounded) before opening channels. Nothing else is ever
  written to stdout; diagnostics go to stderr, one line each, prefixed
  "shuttled-helper: ".
* CHANNEL_OPEN "direct-tcpip" (string host, uint32 port, string orig_host,
  uint32 orig_port): resolve and connect (15 s timeout), then
  OPEN_CONFIRMATION (window 1 MiB, max packet 32 KiB) or OPEN_FAILURE reason
  2 with the error text.
* CHANNEL_OPEN "udp@shuttled" (string bind_family "inet" | "inet6", and
  optionally uint32 idle seconds, 0 = the default): one unconnected UDP
  socket. Each CHANNEL_DATA is one datagram framed by
  pack_datagram(host, port, payload): to the destination from the client, from
  the source towards the client. Window 1 MiB, max packet 66048. Datagrams that
  do not fit the client's window or max packet are dropped and counted; 60 s
  (or the channel's idle) without traffic either way closes the channel (EOF
  then CLOSE).
* Unknown channel type: OPEN_FAILURE reason 3; more channels than the limit
  (16384, or the fd limit): reason 4.
* Windows both ways as RFC 4254: never more than the client's window or max
  packet per DATA; window granted back only for bytes actually written to the
  socket (so at most 1 MiB is buffered per channel); a socket is not read while
  the client's window is 0, nor while 2 MiB of output wait for stdout.
* EOF from the client: shutdown(SHUT_WR) once the queued data is written.
  Socket EOF: CHANNEL_EOF. CLOSE is sent when both directions are done, on a
  socket error, or in reply to the client's CLOSE; nothing is sent on a channel
  after its CLOSE, and its id is freed when both sides closed. After the
  client's CLOSE the data it sent before is still delivered, then FIN, and the
  target's input is read and dropped until its EOF (at most 30 s): closing with
  unread input would make the kernel reset the connection and lose that data.
* CHANNEL_REQUEST with want_reply: CHANNEL_FAILURE. GLOBAL_REQUEST with
  want_reply: REQUEST_FAILURE (usable as a ping of the helper itself).
* Every inbound packet is validated: length, known channel id, state, window
  and max packet.
* A connection's failure ends that connection only. Every callback of a
  channel (socket ready, timer, a client message for it) runs inside its fault
  boundary (Channel.contain): whatever it raises, an OSError the target's
  reset left behind (ENOTCONN, EPIPE...) or a bug, ends that channel: its
  socket closed, CLOSE (OPEN_FAILURE if not yet confirmed), its id freed once
  the client closed too. The helper and every other channel go on.
* Logged (stderr, one line each): protocol and internal errors, and counters:
  UDP datagrams dropped and channels ended by a contained fault (at most one
  line each a minute, and at exit).

Exit status: 0 on stdin EOF (or stdout closed); 3 on a malformed or
out-of-state packet (one line on stderr); 70 on an internal error outside any
one channel (one line).
The loader adds 96 (source truncated) and 97 (no usable python).
"""

import asyncio
import contextlib
import errno
import fcntl
import os
import resource
import socket
import sys
import types
from typing import Any, Callable, Dict, List, Optional, Set, Union


def _load_wire() -> Any:
    """The wire module: our own globals when embedded, else the package's sshmsg."""
    names = globals()
    if "split_packets" in names and "pack_datagram" in names:
        return types.SimpleNamespace(**{k: v for k, v in names.items() if not k.startswith("__")})
    import importlib  # not `from shuttled...`: keeps mypy out of the untyped module

    return importlib.import_module("shuttled.tunnel.sshmsg")


wire = _load_wire()

HELPER_PROTOCOL = "shuttled-helper 1"

EXIT_OK = 0
EXIT_PROTOCOL = 3
EXIT_INTERNAL = 70

TCP_WINDOW = 1 << 20
TCP_MAX_PACKET = 32 * 1024
UDP_WINDOW = 1 << 20
UDP_MAX_PACKET = 65536 + 512  # a whole datagram plus its address framing
MAX_INBOUND_PACKET = 256 * 1024
INPUT_BUFFER = (1 << 20) + MAX_INBOUND_PACKET
INPUT_MIN_READ = 256 * 1024
SOCKET_READ = 256 * 1024
OUT_HIGH = 2 << 20  # queued towards stdout: stop reading sockets
OUT_LOW = 512 * 1024  # ... and start again
IOV_BATCH = 512
UDP_RECV_BATCH = 64
MAX_CHANNELS = 16384
CONNECT_TIMEOUT = 15.0
UDP_IDLE_TIMEOUT = 60.0
DRAIN_TIMEOUT = 30.0
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; the name is 3.10+

Buf = Union[bytes, bytearray, memoryview]

_U32X2_unpack = wire.U32X2.unpack_from
_U32_unpack = wire.U32.unpack_from
_data_header = wire.data_header
_split_packets = wire.split_packets
_pack_datagram = wire.pack_datagram
_close_packet = wire.close
_DATA_OVERHEAD = wire.HEADER.size + 8  # DATA header: packet header, id, length
_eof_packet = wire.eof


class ProtocolError(Exception):
    """The client sent something RFC 4254 (or our subset of it) does not allow."""


def log(message: str) -> None:
    line = "shuttled-helper: %s\n" % " ".join(message.split())
    with contextlib.suppress(OSError):
        os.write(2, line.encode("utf-8", "replace"))


def _drop_front(parts: List[Buf], count: int) -> None:
    """Remove `count` bytes from the front of a list of buffers."""
    done = 0
    for part in parts:
        size = len(part)
        if count < size:
            break
        count -= size
        done += 1
    del parts[:done]
    if count:
        parts[0] = memoryview(parts[0])[count:]


def _where(exc: BaseException) -> str:
    """Where `exc` was raised, as " (line N in function)" for a one-line report."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    return " (line %d in %s)" % (tb.tb_lineno, tb.tb_frame.f_code.co_name)


def _describe(exc: BaseException) -> str:
    """One line about a contained fault: the errno's name for an OSError, else the
    exception and where it came from (a bug)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return "%s (%s)" % (errno.errorcode.get(exc.errno, str(exc.errno)), _error_text(exc))
    return "%s: %s%s" % (type(exc).__name__, exc, _where(exc))


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's strerror is "Connect call failed (...)"
    return str(exc) or type(exc).__name__


def _grow_pipe(fd: int) -> None:
    """Larger pipes to and from sshd: fewer, bigger reads and writes. Best effort."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)


class Channel:
    """What TCP and UDP channels share: ids, windows both ways, EOF/CLOSE flags, the
    socket, and the fault boundary that every callback of the channel runs in."""

    kind = "channel"
    fault_kind = "channel"  # what the fault counters call it

    def __init__(
        self,
        helper: "Helper",
        lid: int,
        rid: int,
        rwin: int,
        rmax: int,
        lwin: int,
        lmax: int,
        sock: socket.socket,
    ) -> None:
        self.h = helper
        self.sock: Optional[socket.socket] = sock
        self.fd = sock.fileno()
        self.lid = lid  # ours: the recipient in what the client sends
        self.rid = rid  # the client's: the recipient in what we send
        self.rwin = rwin  # how much the client still accepts
        self.rmax = rmax
        self.lwin = lwin  # how much we still accept
        self.lmax = lmax
        self.grant_at = lwin // 2
        self.consumed = 0  # processed but not yet granted back
        self.confirmed = False  # OPEN_CONFIRMATION queued: the client knows the channel
        self.sent_eof = False
        self.sent_close = False
        self.got_eof = False
        self.got_close = False

    # --- the fault boundary ----------------------------------------------------------

    def contain(self, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback(*args)`, one of this channel's callbacks, so that whatever it
        raises ends this channel only.

        The event loop (socket ready, timers) and the Helper (client messages, stdout
        drained, idle sweep) call a channel only through here. Without it, anything
        raised reaches the loop's exception handler, which ends the helper (exit 70)
        and with it every connection: an OSError a target's reset leaves for a call
        not expecting one (ENOTCONN, EPIPE, EBADF, ENOSPC from epoll...) or a bug
        that only some connection's state trips. A protocol violation by the client
        is not this channel's failure: it goes on up and ends the helper (exit 3).
        """
        try:
            callback(*args)
        except (ProtocolError, wire.WireError):
            raise
        except Exception as exc:
            where = getattr(callback, "__name__", "callback")
            self.h.fault(self.fault_kind, exc, where)
            self.end("%s: %s" % (where, _error_text(exc)))

    def end(self, why: str) -> None:
        """Take the channel down after a fault, whatever state the fault left it in:
        the socket closed, then OPEN_FAILURE if the client never heard of the
        channel, else CLOSE. The id is freed once the client has closed too; before
        that its DATA in flight must still find the channel (else: protocol error)."""
        self.close_socket()
        if not self.confirmed:
            self.sent_close = True  # nothing more is ever sent for it
            self.h.queue(wire.open_failure(self.rid, wire.OPEN_CONNECT_FAILED, "helper: " + why))
            self.h.release(self)
            return
        self.send_close()
        if self.got_close:
            self.h.release(self)

    def start(self) -> None:
        """Confirm the open; the subclass has armed the socket before calling this."""
        self.h.queue(wire.open_confirmation(self.rid, self.lid, self.lwin, self.lmax))
        self.confirmed = True

    def take_window(self, size: int) -> None:
        if self.got_eof:
            raise ProtocolError("channel %d: data after EOF" % self.lid)
        if size > self.lmax:
            raise ProtocolError(
                "channel %d: %d bytes of data exceed the max packet %d"
                % (self.lid, size, self.lmax)
            )
        if size > self.lwin:
            raise ProtocolError(
                "channel %d: %d bytes of data exceed the window (%d left)"
                % (self.lid, size, self.lwin)
            )
        self.lwin -= size

    def grant(self, size: int) -> None:
        """`size` bytes were consumed: give window back once half of it is used."""
        self.consumed += size
        if self.consumed >= self.grant_at and not self.sent_close:
            self.h.queue(wire.window_adjust(self.rid, self.consumed))
            self.lwin += self.consumed
            self.consumed = 0

    def send_eof(self) -> None:
        if not self.sent_eof and not self.sent_close:
            self.sent_eof = True
            self.h.queue(_eof_packet(self.rid))

    def send_close(self) -> None:
        if not self.sent_close:
            self.sent_close = True
            self.h.queue(_close_packet(self.rid))

    def on_window(self, size: int) -> None:
        self.rwin += size
        if self.rwin > wire.MAX_WINDOW:
            raise ProtocolError("channel %d: window adjusted beyond 2^32-1" % self.lid)

    def on_eof(self) -> None:
        """The client's EOF (Helper already set got_eof)."""

    def on_close(self) -> None:
        """The client's CLOSE (Helper already set got_close)."""
        self.send_close()
        self.h.release(self)
        self.close_socket()

    def on_data(self, data: memoryview) -> None:
        raise NotImplementedError

    def close_socket(self) -> None:
        """Close the socket, at most once. Never raises: the fault boundary and
        Helper.finish rely on it."""
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        self.h.unwatch(self.fd)  # before close(): a reused fd number must not be unwatched
        with contextlib.suppress(OSError):
            sock.close()


class TcpChannel(Channel):
    kind = "direct-tcpip"
    fault_kind = "tcp"

    def __init__(
        self, helper: "Helper", lid: int, rid: int, rwin: int, rmax: int, sock: socket.socket
    ) -> None:
        Channel.__init__(self, helper, lid, rid, rwin, rmax, TCP_WINDOW, TCP_MAX_PACKET, sock)
        self.wq: List[Buf] = []  # client data not yet accepted by the socket
        self.reading = False
        self.writing = False
        self.rd_eof = False
        self.wr_shut = False
        self.dirty = False
        self.draining = False
        self.drain_timer: Optional[asyncio.TimerHandle] = None

    def start(self) -> None:
        self.update_reading()
        Channel.start(self)

    # --- socket -> client ---------------------------------------------------------

    def update_reading(self) -> None:
        want = (
            self.sock is not None
            and not self.rd_eof
            and (self.draining or (not self.sent_close and self.rwin > 0))
        )
        if want != self.reading:
            if want:
                self.h.loop.add_reader(self.fd, self.contain, self.on_readable)
            else:
                self.h.loop.remove_reader(self.fd)
            self.reading = want

    def on_readable(self) -> None:
        helper = self.h
        if self.draining:
            self.discard_input()
            return
        if helper.out_paused:  # stdout is backed up: park until it drains
            self.h.loop.remove_reader(self.fd)
            self.reading = False
            helper.stalled.append(self)
            return
        want = self.rwin if self.rwin < SOCKET_READ else SOCKET_READ
        try:
            data = self.sock.recv(want)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        size = len(data)
        if not size:
            self.rd_eof = True
            self.update_reading()
            self.send_eof()
            self.try_close()
            return
        self.rwin -= size
        rid = self.rid
        step = self.rmax
        if size <= step:
            helper.queue_parts([_data_header(rid, size), data], size + _DATA_OVERHEAD)
        else:
            view = memoryview(data)
            parts: List[Buf] = []
            for offset in range(0, size, step):
                chunk = view[offset : offset + step]
                parts.append(_data_header(rid, len(chunk)))
                parts.append(chunk)
            helper.queue_parts(parts, size + _DATA_OVERHEAD * (len(parts) >> 1))
        if not self.rwin:
            self.update_reading()

    def resume(self) -> None:
        """stdout has drained: read the socket again, if the client's window allows."""
        self.update_reading()

    def discard_input(self) -> None:
        """After the client's CLOSE: read and drop, so that the target never blocks
        writing to us while we still deliver what the client sent."""
        try:
            data = self.sock.recv(SOCKET_READ)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close_socket()
            return
        if not data:
            self.rd_eof = True
            self.update_reading()
            self.finish_drain()

    # --- client -> socket -----------------------------------------------------------

    def on_data(self, data: memoryview) -> None:
        """Queue a view into the input buffer; Helper flushes it before reusing that."""
        if self.sock is None:
            return
        self.wq.append(data)
        if not self.dirty:
            self.dirty = True
            self.h.dirty.append(self)

    def flush_socket(self) -> None:
        sock = self.sock
        wq = self.wq
        if sock is None:
            wq.clear()
            return
        written = 0
        while wq:
            try:
                sent = sock.send(wq[0]) if len(wq) == 1 else sock.sendmsg(wq[:IOV_BATCH])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.abort()
                return
            written += sent
            _drop_front(wq, sent)
        if written:
            self.grant(written)
        if wq:
            if not self.writing:
                self.h.loop.add_writer(self.fd, self.contain, self.flush_socket)
                self.writing = True
            return
        if self.writing:
            self.h.loop.remove_writer(self.fd)
            self.writing = False
        if self.draining:
            self.finish_drain()
        elif self.got_eof:
            self.shut_write()

    def keep_unsent(self, inbuf: bytearray) -> None:
        """Copy what still points into the input buffer before it is reused."""
        self.wq[:] = [
            bytes(p) if isinstance(p, memoryview) and p.obj is inbuf else p for p in self.wq
        ]

    def shut_write(self) -> None:
        if self.sock is None or self.wr_shut:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.abort()
            return
        self.wr_shut = True
        if self.draining:
            self.finish_drain()
        else:
            self.try_close()

    # --- channel state ----------------------------------------------------------

    def on_window(self, size: int) -> None:
        Channel.on_window(self, size)
        if not self.reading:
            self.update_reading()

    def on_eof(self) -> None:
        if not self.wq and not self.dirty:
            self.shut_write()

    def try_close(self) -> None:
        """Both directions finished: close the socket and send CLOSE."""
        if self.rd_eof and self.wr_shut and not self.sent_close:
            self.close_socket()
            self.send_close()

    def abort(self) -> None:
        """The socket failed (reset, refused write...): CLOSE without EOF."""
        self.close_socket()
        self.send_close()

    def on_close(self) -> None:
        self.send_close()
        self.h.release(self)
        if self.sock is None:
            return
        # A lingering close: deliver what the client sent before its CLOSE, then
        # FIN, and read (discarding) until the target's EOF. Closing with unread
        # input would make the kernel reset the connection and lose that data.
        self.draining = True
        self.h.draining.add(self)
        self.drain_timer = self.h.loop.call_later(
            DRAIN_TIMEOUT, self.contain, self.on_drain_timeout
        )
        self.update_reading()
        self.finish_drain()

    def on_drain_timeout(self) -> None:
        """The target sent no EOF within DRAIN_TIMEOUT of the client's CLOSE."""
        self.close_socket()

    def finish_drain(self) -> None:
        if self.wq or self.dirty:
            return
        if not self.wr_shut:
            self.shut_write()  # comes back here
        elif self.rd_eof:
            self.close_socket()

    def close_socket(self) -> None:
        if self.sock is None:
            return
        self.reading = self.writing = False  # Channel.close_socket unwatches both
        if self.drain_timer is not None:
            self.drain_timer.cancel()
            self.drain_timer = None
        self.h.draining.discard(self)
        self.wq.clear()
        Channel.close_socket(self)


class UdpChannel(Channel):
    kind = wire.UDP_CHANNEL_TYPE
    fault_kind = "udp"

    def __init__(
        self, helper: "Helper", lid: int, rid: int, rwin: int, rmax: int, sock: socket.socket
    ) -> None:
        Channel.__init__(self, helper, lid, rid, rwin, rmax, UDP_WINDOW, UDP_MAX_PACKET, sock)
        self.family = sock.family
        self.last = helper.loop.time()
        self.idle = helper.udp_idle

    def start(self) -> None:
        self.h.loop.add_reader(self.fd, self.contain, self.on_readable)
        Channel.start(self)

    def on_data(self, data: memoryview) -> None:
        host, port, payload = wire.unpack_datagram(data)
        self.grant(len(data))
        if self.sock is None:
            return
        self.last = self.h.loop.time()
        try:
            socket.inet_pton(self.family, host)  # never resolve names here: it blocks
            self.sock.sendto(payload, (host, port))
        except (OSError, ValueError):  # a full socket buffer (UDP may drop), or not an
            self.h.udp_dropped_send += 1  # address (ValueError: a NUL in it)

    def on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        helper = self.h
        rid = self.rid
        for _ in range(UDP_RECV_BATCH):
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # a reported ICMP error; the socket stays usable
                continue
            frame = _pack_datagram(addr[0], addr[1], data)
            size = len(frame)
            if size > self.rwin or size > self.rmax or helper.out_paused:
                helper.udp_dropped_reply += 1
                continue
            self.rwin -= size
            helper.queue_parts([_data_header(rid, size), frame], size + _DATA_OVERHEAD)
        self.last = helper.loop.time()

    def expire(self) -> None:
        self.send_eof()
        self.send_close()
        self.close_socket()


class Helper:
    """One helper session: channels multiplexed over a read fd and a write fd."""

    def __init__(
        self,
        rfd: int = 0,
        wfd: int = 1,
        max_channels: int = MAX_CHANNELS,
        connect_timeout: float = CONNECT_TIMEOUT,
        udp_idle: float = UDP_IDLE_TIMEOUT,
    ) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.max_channels = max_channels
        self.connect_timeout = connect_timeout
        self.udp_idle = udp_idle
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # run()
        self.done: "asyncio.Future[int]" = None  # type: ignore[assignment]
        self.channels: Dict[int, Channel] = {}
        self.udp: Dict[int, UdpChannel] = {}
        self.draining: Set[TcpChannel] = set()
        self.dirty: List[TcpChannel] = []
        self.stalled: List[TcpChannel] = []
        self.tasks: Set["asyncio.Task[None]"] = set()
        self.pending_opens = 0
        self.next_id = 0
        self.inbuf = bytearray(INPUT_BUFFER)
        self.inview = memoryview(self.inbuf)
        self.in_start = 0
        self.in_end = 0
        self.out: List[Buf] = []
        self.out_bytes = 0
        self.out_paused = False
        self.out_writing = False
        self.flush_armed = False
        self.sweep_timer: Optional[asyncio.TimerHandle] = None
        # Datagrams UDP let us drop: replies that did not fit the client's window or
        # max packet (or met a backed-up stdout), and sends that failed or had no
        # numeric address. Reported on stderr at most once a minute, and at exit.
        self.udp_dropped_reply = 0
        self.udp_dropped_send = 0
        self.udp_reported = (0, 0)
        # Channels ended by a fault their boundary contained, by kind ("tcp",
        # "udp"), and the last one's description; reported like the drops.
        self.faults: Dict[str, int] = {}
        self.faults_reported: Dict[str, int] = {}
        self.last_fault = ""
        self.report_after = 0.0
        self.handlers: Dict[int, Callable[[memoryview], None]] = {
            wire.MSG_CHANNEL_OPEN: self._m_open,
            wire.MSG_CHANNEL_WINDOW_ADJUST: self._m_window_adjust,
            wire.MSG_CHANNEL_DATA: self._m_data,
            wire.MSG_CHANNEL_EXTENDED_DATA: self._m_extended_data,
            wire.MSG_CHANNEL_EOF: self._m_eof,
            wire.MSG_CHANNEL_CLOSE: self._m_close,
            wire.MSG_CHANNEL_REQUEST: self._m_request,
            wire.MSG_CHANNEL_SUCCESS: self._m_reply,
            wire.MSG_CHANNEL_FAILURE: self._m_reply,
            wire.MSG_GLOBAL_REQUEST: self._m_global_request,
        }

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until stdin EOF (0), a protocol error (3) or an internal error (70)."""
        loop = self.loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        old_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._on_loop_error)
        blocking = {fd: os.get_blocking(fd) for fd in (self.rfd, self.wfd)}
        try:
            for fd in blocking:
                os.set_blocking(fd, False)
                _grow_pipe(fd)
            loop.add_reader(self.rfd, self._on_input)
            version = "%d.%d.%d" % sys.version_info[:3]
            self.queue(
                wire.packet(
                    wire.MSG_REQUEST_SUCCESS, wire.sstring(HELPER_PROTOCOL) + wire.sstring(version)
                )
            )
            self.sweep_timer = loop.call_later(self._sweep_interval(), self._sweep)
            code = await self.done
            if code == EXIT_OK:
                await self._drain_output(1.0)
            return code
        finally:
            self._teardown()
            loop.set_exception_handler(old_handler)
            for fd, mode in blocking.items():
                with contextlib.suppress(OSError):
                    os.set_blocking(fd, mode)

    def finish(self, code: int, why: str = "") -> None:
        if self.done.done():
            return
        if why:
            log(why)
        elif code == EXIT_OK:
            self._report()
        self.loop.remove_reader(self.rfd)
        for task in list(self.tasks):
            task.cancel()
        for channel in list(self.channels.values()):
            channel.close_socket()  # never raises
        for draining in list(self.draining):
            draining.close_socket()
        self.channels.clear()
        self.udp.clear()
        if code != EXIT_OK:
            self.out.clear()
            self.out_bytes = 0
        self.done.set_result(code)

    def _teardown(self) -> None:
        loop = self.loop
        if not self.done.done():
            self.finish(EXIT_INTERNAL)
        if self.sweep_timer is not None:
            self.sweep_timer.cancel()
        loop.remove_reader(self.rfd)
        if self.out_writing:
            loop.remove_writer(self.wfd)
            self.out_writing = False

    async def _drain_output(self, limit: float) -> None:
        deadline = self.loop.time() + limit
        while self.out and self.loop.time() < deadline:
            await asyncio.sleep(0.01)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
        exc = context.get("exception")
        if exc is None:
            log("event loop: %s" % context.get("message", "unknown problem"))
            return
        self._internal_error(exc)

    def _internal_error(self, exc: BaseException) -> None:
        """A failure outside any one channel's boundary: a bug in the helper itself."""
        self.finish(
            EXIT_INTERNAL, "internal error: %s: %s%s" % (type(exc).__name__, exc, _where(exc))
        )

    def fault(self, kind: str, exc: BaseException, where: str) -> None:
        """Count a fault that ended one channel (the boundary ends it)."""
        self.faults[kind] = self.faults.get(kind, 0) + 1
        self.last_fault = "%s %s: %s" % (kind, where, _describe(exc))

    def _sweep_interval(self) -> float:
        return max(0.05, min(self.udp_idle / 4, 5.0))

    def _sweep(self) -> None:
        now = self.loop.time()
        for channel in list(self.udp.values()):
            if not channel.sent_close and now - channel.last >= channel.idle:
                channel.contain(channel.expire)
        if now >= self.report_after:
            self._report()
        self.sweep_timer = self.loop.call_later(self._sweep_interval(), self._sweep)

    def _report(self) -> None:
        """The counters that changed since the last report, one line each on stderr
        (the client logs them); then nothing more for a minute."""
        counts = (self.udp_dropped_reply, self.udp_dropped_send)
        drops = counts != self.udp_reported
        faults = [
            "%d %s" % (count - self.faults_reported.get(kind, 0), kind)
            for kind, count in sorted(self.faults.items())
            if count != self.faults_reported.get(kind, 0)
        ]
        if drops:
            log(
                "udp: dropped %d replies (client window or max packet, or stdout backed up) "
                "and %d datagrams towards targets (send failed or not an address)"
                % (counts[0] - self.udp_reported[0], counts[1] - self.udp_reported[1])
            )
            self.udp_reported = counts
        if faults:
            log(
                "faults: %s channels ended by a fault of their own (the helper went on); "
                "last: %s" % (", ".join(faults), self.last_fault)
            )
            self.faults_reported = dict(self.faults)
        if drops or faults:
            self.report_after = self.loop.time() + 60.0

    # --- output ----------------------------------------------------------------------

    def queue(self, data: bytes) -> None:
        self.queue_parts([data], len(data))

    def queue_parts(self, parts: List[Buf], size: int) -> None:
        """Append packets for stdout; written in one batch after this loop iteration."""
        self.out.extend(parts)
        self.out_bytes += size
        if self.out_bytes >= OUT_HIGH:
            self.out_paused = True
        if not self.flush_armed:
            self.flush_armed = True
            self.loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self.flush_armed = False
        out = self.out
        while out:
            try:
                if len(out) == 1:
                    written = os.write(self.wfd, out[0])
                else:
                    written = os.writev(self.wfd, out[:IOV_BATCH])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # the client is gone
                out.clear()
                self.out_bytes = 0
                self.finish(EXIT_OK)
                return
            self.out_bytes -= written
            _drop_front(out, written)
        if out:
            if not self.out_writing:
                self.loop.add_writer(self.wfd, self._flush_out)
                self.out_writing = True
            self.flush_armed = True
        elif self.out_writing:
            self.loop.remove_writer(self.wfd)
            self.out_writing = False
        if self.out_paused and self.out_bytes <= OUT_LOW:
            self.out_paused = False
            stalled, self.stalled = self.stalled, []
            for channel in stalled:
                channel.contain(channel.resume)

    # --- input -----------------------------------------------------------------------

    def _on_input(self) -> None:
        try:
            size = os.readv(self.rfd, [self.inview[self.in_end :]])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # e.g. ECONNRESET on a socketpair: the client is gone
            size = 0
        if not size:
            self.finish(EXIT_OK)
            return
        self.in_end += size
        try:
            messages, used = _split_packets(
                self.inview[self.in_start : self.in_end], MAX_INBOUND_PACKET
            )
            handlers = self.handlers
            for msg_type, payload in messages:
                handler = handlers.get(msg_type)
                if handler is None:
                    raise ProtocolError("unexpected message type %d" % msg_type)
                handler(payload)
        except (ProtocolError, wire.WireError) as exc:
            self.finish(EXIT_PROTOCOL, "protocol error: %s" % exc)
            return
        self.in_start += used
        if self.dirty:
            self._flush_dirty()
        start, end = self.in_start, self.in_end
        if start == end:
            self.in_start = self.in_end = 0
        elif len(self.inbuf) - end < INPUT_MIN_READ:
            self.inbuf[0 : end - start] = self.inbuf[start:end]
            self.in_start, self.in_end = 0, end - start

    def _flush_dirty(self) -> None:
        dirty, self.dirty = self.dirty, []
        for channel in dirty:
            channel.dirty = False
            channel.contain(channel.flush_socket)
            if channel.wq:  # (a channel ended by a fault has none)
                channel.keep_unsent(self.inbuf)

    def _channel(self, lid: int) -> Channel:
        channel = self.channels.get(lid)
        if channel is None:
            raise ProtocolError("message for channel %d, which is not open" % lid)
        return channel

    @staticmethod
    def _expect(payload: memoryview, size: int, name: str) -> None:
        if len(payload) != size:
            raise ProtocolError("%s of %d bytes, expected %d" % (name, len(payload), size))

    def _m_data(self, payload: memoryview) -> None:
        if len(payload) < 8:
            raise ProtocolError("CHANNEL_DATA of %d bytes" % len(payload))
        lid, size = _U32X2_unpack(payload, 0)
        if size != len(payload) - 8:
            raise ProtocolError("CHANNEL_DATA string of %d bytes in %d" % (size, len(payload) - 8))
        channel = self._channel(lid)
        channel.take_window(size)
        if channel.sent_close:
            return
        channel.contain(channel.on_data, payload[8:])

    def _m_extended_data(self, payload: memoryview) -> None:
        reader = wire.Reader(payload)
        channel = self._channel(reader.u32())
        reader.u32()
        size = len(reader.string())
        reader.end("CHANNEL_EXTENDED_DATA")
        channel.take_window(size)
        channel.grant(size)  # no meaning for these channel types: discarded

    def _m_window_adjust(self, payload: memoryview) -> None:
        self._expect(payload, 8, "CHANNEL_WINDOW_ADJUST")
        lid, size = _U32X2_unpack(payload, 0)
        channel = self._channel(lid)
        if not channel.sent_close:
            channel.contain(channel.on_window, size)

    # EOF and CLOSE are recorded here, outside the boundary: whatever becomes of the
    # channel, the protocol state must hold (a second EOF is still an error; an id
    # whose CLOSE came must be freed when the channel ends).

    def _m_eof(self, payload: memoryview) -> None:
        self._expect(payload, 4, "CHANNEL_EOF")
        channel = self._channel(_U32_unpack(payload, 0)[0])
        if channel.got_eof:
            raise ProtocolError("channel %d: second EOF" % channel.lid)
        channel.got_eof = True
        channel.contain(channel.on_eof)

    def _m_close(self, payload: memoryview) -> None:
        self._expect(payload, 4, "CHANNEL_CLOSE")
        channel = self._channel(_U32_unpack(payload, 0)[0])
        channel.got_close = True
        channel.contain(channel.on_close)

    def _m_request(self, payload: memoryview) -> None:
        reader = wire.Reader(payload)
        channel = self._channel(reader.u32())
        reader.text()
        want_reply = reader.boolean()
        if want_reply and not channel.sent_close:
            self.queue(wire.channel_reply(channel.rid, False))

    def _m_reply(self, payload: memoryview) -> None:
        self._expect(payload, 4, "CHANNEL_SUCCESS/FAILURE")
        self._channel(_U32_unpack(payload, 0)[0])  # we ask nothing: nothing to match

    def _m_global_request(self, payload: memoryview) -> None:
        reader = wire.Reader(payload)
        reader.text()
        if reader.boolean():
            self.queue(wire.packet(wire.MSG_REQUEST_FAILURE))

    # --- opening channels ---------------------------------------------------------

    def _m_open(self, payload: memoryview) -> None:
        reader = wire.Reader(payload)
        kind = reader.text()
        rid, rwin, rmax = reader.u32(), reader.u32(), reader.u32()
        if kind == "direct-tcpip":
            host, port = reader.text(), reader.u32()
            reader.text()
            reader.u32()
            reader.end("CHANNEL_OPEN direct-tcpip")
        elif kind == wire.UDP_CHANNEL_TYPE:
            family = reader.text()
            idle = reader.u32() if reader.pos < len(reader.buf) else 0
            reader.end("CHANNEL_OPEN " + kind)
        else:
            self._open_failed(rid, wire.OPEN_UNKNOWN_CHANNEL_TYPE, "unknown channel type %r" % kind)
            return
        if rmax == 0:
            raise ProtocolError("CHANNEL_OPEN %s with max packet 0" % kind)
        if len(self.channels) + len(self.draining) + self.pending_opens >= self.max_channels:
            self._open_failed(
                rid, wire.OPEN_RESOURCE_SHORTAGE, "too many channels (%d)" % self.max_channels
            )
        elif kind == "direct-tcpip":
            if not host or port > 0xFFFF:
                self._open_failed(
                    rid, wire.OPEN_CONNECT_FAILED, "bad target %r port %d" % (host, port)
                )
                return
            self.pending_opens += 1
            task = self.loop.create_task(self._open_tcp(rid, rwin, rmax, host, port))
            self.tasks.add(task)
            task.add_done_callback(self._task_done)
        else:
            self._open_udp(rid, rwin, rmax, family, idle)

    def _open_failed(self, rid: int, reason: int, text: str) -> None:
        self.queue(wire.open_failure(rid, reason, text))

    def _task_done(self, task: "asyncio.Task[None]") -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._internal_error(task.exception())  # type: ignore[arg-type]

    def _new_id(self) -> int:
        while True:
            lid = self.next_id
            self.next_id = (lid + 1) & 0xFFFFFFFF
            if lid not in self.channels:
                return lid

    async def _open_tcp(self, rid: int, rwin: int, rmax: int, host: str, port: int) -> None:
        try:
            sock = await self._connect(host, port)
        except Exception as exc:  # this open fails, nothing else (no channel yet to end)
            # OSError and timeouts are the target's or the resolver's answer, and
            # ValueError a name the IDNA codec refuses (a label over 63 bytes); any
            # other exception is a fault.
            if not isinstance(exc, (OSError, asyncio.TimeoutError, ValueError)):
                self.fault("tcp", exc, "connect")
            self._open_failed(
                rid,
                wire.OPEN_CONNECT_FAILED,
                "connect to %s port %d: %s" % (host, port, _error_text(exc)),
            )
            return
        finally:
            self.pending_opens -= 1
        if self.done.done():
            sock.close()
            return
        self._start(TcpChannel(self, self._new_id(), rid, rwin, rmax, sock))

    async def _connect(self, host: str, port: int) -> socket.socket:
        loop = self.loop
        deadline = loop.time() + self.connect_timeout
        kind, proto = socket.SOCK_STREAM, socket.IPPROTO_TCP
        try:  # an address: no resolver, no thread
            infos = socket.getaddrinfo(
                host, port, 0, kind, proto, socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
            )
        except socket.gaierror:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=kind, proto=proto), self.connect_timeout
            )
        error: BaseException = OSError("no address for %s" % host)
        for family, type_, proto_, _, address in infos:
            sock = socket.socket(family, type_, proto_)
            try:
                sock.setblocking(False)
                # Before connecting: once connected, a target that reset at once
                # makes it fail on BSDs and macOS (EINVAL).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await asyncio.wait_for(
                    loop.sock_connect(sock, address), max(0.0, deadline - loop.time())
                )
            except (OSError, asyncio.TimeoutError) as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise error

    def _open_udp(self, rid: int, rwin: int, rmax: int, family_name: str, idle: int = 0) -> None:
        families = {"inet": (socket.AF_INET, "0.0.0.0"), "inet6": (socket.AF_INET6, "::")}
        if family_name not in families:
            self._open_failed(
                rid, wire.OPEN_CONNECT_FAILED, "unknown address family %r" % family_name
            )
            return
        family, anywhere = families[family_name]
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:
            self._open_failed(
                rid,
                wire.OPEN_CONNECT_FAILED,
                "udp socket (%s): %s" % (family_name, _error_text(exc)),
            )
            return
        try:
            sock.setblocking(False)
            sock.bind((anywhere, 0))
        except OSError as exc:
            sock.close()
            self._open_failed(
                rid, wire.OPEN_CONNECT_FAILED, "udp bind (%s): %s" % (family_name, _error_text(exc))
            )
            return
        channel = UdpChannel(self, self._new_id(), rid, rwin, rmax, sock)
        channel.idle = float(idle) or self.udp_idle
        self.udp[channel.lid] = channel
        self._start(channel)

    def _start(self, channel: Channel) -> None:
        """Register a new channel, then arm and confirm it inside its boundary: a
        fault there is its OPEN_FAILURE."""
        self.channels[channel.lid] = channel
        channel.contain(channel.start)

    def release(self, channel: Channel) -> None:
        """Both sides sent CLOSE (or the client never learnt of it): the id is free.
        Idempotent, and never frees an id that a newer channel took."""
        if self.channels.get(channel.lid) is channel:
            del self.channels[channel.lid]
        if self.udp.get(channel.lid) is channel:
            del self.udp[channel.lid]

    def unwatch(self, fd: int) -> None:
        """Stop watching a socket's fd for both directions; never raises. Unconditional,
        as after a fault the channel's flags may not say what is registered. (When
        epoll refuses the change, e.g. EBADF, the loop has forgotten the fd anyway.)"""
        for remove in (self.loop.remove_reader, self.loop.remove_writer):
            with contextlib.suppress(OSError, ValueError):
                remove(fd)


def _raise_fd_limit() -> int:
    """Lift the soft fd limit to the hard one (bounded); returns the limit in force."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20
    except (OSError, ValueError):
        return 1024


def main() -> int:
    limit = min(MAX_CHANNELS, max(16, _raise_fd_limit() - 64))
    try:
        return asyncio.run(Helper(max_channels=limit).run())
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback on the client's screen
        log("internal error: %s: %s" % (type(exc).__name__, exc))
        return EXIT_INTERNAL


def _exit(code: int) -> None:
    """Exit now: no waiting for a resolver thread stuck in getaddrinfo."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
