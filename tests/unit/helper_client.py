"""A client for the remote helper, for its tests: a minimal RFC 4254 channel layer (`Peer`,
`Chan`), the helper run the way the remote runs it (`helper_process`) or in process over a
socketpair (`helper_inprocess`), and the loopback TCP and UDP echo servers it connects to."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

from shuttled import const
from shuttled.remote import HELPER_SYNC, helper_source, loader_command
from shuttled.remote import helper as helper_mod
from shuttled.tunnel import sshmsg

TIMEOUT = 30.0  # how long one test's event loop may run


# --- a minimal client channel layer for the tests ----------------------------------------


class Chan:
    """The client's view of one channel."""

    def __init__(self, peer: Peer, lid: int, window: int, max_packet: int, grant: bool) -> None:
        self.peer = peer
        self.lid = lid
        self.rid = -1
        self.lwin = window  # what the helper may still send us
        self.lwin_max = window
        self.lmax = max_packet
        self.grant = grant
        self.consumed = 0
        self.rwin = 0
        self.rmax = 0
        self.data = bytearray()
        self.datagrams: list[bytes] = []
        self.packet_sizes: list[int] = []
        self.events: list[int] = []  # message types in arrival order
        self.changed = asyncio.Event()
        self.window_event = asyncio.Event()
        self.replies: asyncio.Queue[int] = asyncio.Queue()
        self.got_eof = False
        self.got_close = False
        self.sent_close = False
        self.opened: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    # sending
    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while self.rwin == 0:
                self.window_event.clear()
                await self.window_event.wait()
            size = min(len(view), self.rwin, self.rmax)
            self.peer.write(sshmsg.data_header(self.rid, size) + bytes(view[:size]))
            self.rwin -= size
            view = view[size:]
            await self.peer.drain()

    def send_datagram(self, host: str, port: int, payload: bytes) -> None:
        frame = sshmsg.pack_datagram(host, port, payload)
        assert len(frame) <= self.rwin and len(frame) <= self.rmax
        self.rwin -= len(frame)
        self.peer.write(sshmsg.data_header(self.rid, len(frame)) + frame)

    def send_eof(self) -> None:
        self.peer.write(sshmsg.eof(self.rid))

    def send_close(self) -> None:
        self.sent_close = True
        self.peer.write(sshmsg.close(self.rid))

    def adjust(self, amount: int) -> None:
        self.lwin += amount
        self.peer.write(sshmsg.window_adjust(self.rid, amount))

    # receiving
    def on_data(self, data: bytes) -> None:
        if len(data) > self.lwin:
            self.peer.violations.append(
                f"channel {self.lid}: {len(data)} bytes past a window of {self.lwin}"
            )
        if len(data) > self.lmax:
            self.peer.violations.append(
                f"channel {self.lid}: {len(data)} bytes past max packet {self.lmax}"
            )
        self.lwin -= len(data)
        self.packet_sizes.append(len(data))
        self.data += data
        self.datagrams.append(data)
        if self.grant:
            self.consumed += len(data)
            if self.consumed >= self.lwin_max // 2:
                self.adjust(self.consumed)
                self.consumed = 0

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        async def loop() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout)


class Peer:
    """Reads the helper's packets in a task; writes ours to its stdin."""

    def __init__(self, reader: asyncio.StreamReader, writer: Any) -> None:
        self.reader = reader
        self.writer = writer
        self.hello: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        self.channels: dict[int, Chan] = {}
        self.opening: dict[int, Chan] = {}
        self.globals: asyncio.Queue[int] = asyncio.Queue()
        self.violations: list[str] = []
        self.ended = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.next_id = 100
        self.task = asyncio.get_running_loop().create_task(self._pump())

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def _pump(self) -> None:
        try:
            while True:
                await self.gate.wait()
                head = await self.reader.readexactly(4)
                body = await self.reader.readexactly(int.from_bytes(head, "big"))
                assert body[0] == 0, "padding in an unencrypted packet"
                self._dispatch(body[1], memoryview(body)[2:])
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                self.violations.append("stdout ended inside a packet")
        except Exception as exc:  # a bug in this test client, or a bad packet
            self.violations.append(f"reading packets: {exc!r}")
        finally:
            self.ended.set()
            for chan in self.channels.values():
                chan.changed.set()

    def _dispatch(self, msg_type: int, payload: memoryview) -> None:
        if not self.hello.done():
            if msg_type != sshmsg.MSG_REQUEST_SUCCESS:
                self.violations.append(f"first packet is type {msg_type}, not the hello")
                return
            reader = sshmsg.Reader(payload)
            self.hello.set_result((reader.text(), reader.text()))
            return
        if msg_type in (sshmsg.MSG_REQUEST_SUCCESS, sshmsg.MSG_REQUEST_FAILURE):
            self.globals.put_nowait(msg_type)
            return
        reader = sshmsg.Reader(payload)
        lid = reader.u32()
        if msg_type == sshmsg.MSG_CHANNEL_OPEN_CONFIRMATION:
            chan = self.opening.pop(lid)
            chan.rid, chan.rwin, chan.rmax = reader.u32(), reader.u32(), reader.u32()
            self.channels[lid] = chan
            chan.opened.set_result(chan)
            return
        if msg_type == sshmsg.MSG_CHANNEL_OPEN_FAILURE:
            self.opening.pop(lid).opened.set_result((reader.u32(), reader.text()))
            return
        chan = self.channels[lid]
        if chan.got_close:
            self.violations.append(f"channel {lid}: type {msg_type} after CLOSE")
        chan.events.append(msg_type)
        if msg_type == sshmsg.MSG_CHANNEL_DATA:
            chan.on_data(reader.string())
        elif msg_type == sshmsg.MSG_CHANNEL_WINDOW_ADJUST:
            chan.rwin += reader.u32()
            chan.window_event.set()
        elif msg_type == sshmsg.MSG_CHANNEL_EOF:
            if chan.got_eof:
                self.violations.append(f"channel {lid}: second EOF")
            chan.got_eof = True
        elif msg_type == sshmsg.MSG_CHANNEL_CLOSE:
            chan.got_close = True
            if not chan.sent_close:
                chan.send_close()
        elif msg_type in (sshmsg.MSG_CHANNEL_SUCCESS, sshmsg.MSG_CHANNEL_FAILURE):
            chan.replies.put_nowait(msg_type)
        else:
            self.violations.append(f"unexpected type {msg_type}")
        chan.changed.set()

    async def open(
        self,
        kind: str,
        extra: bytes,
        window: int = const.CHANNEL_WINDOW,
        max_packet: int = const.CHANNEL_MAX_PACKET,
        grant: bool = True,
    ) -> Any:
        """Chan on confirmation, else (reason, description)."""
        lid = self.next_id
        self.next_id += 1
        self.opening[lid] = Chan(self, lid, window, max_packet, grant)
        self.write(sshmsg.channel_open(kind, lid, window, max_packet, extra))
        return await asyncio.wait_for(self.opening[lid].opened, 20)

    async def open_tcp(self, port: int, host: str = "127.0.0.1", **kw: Any) -> Any:
        return await self.open(
            "direct-tcpip", sshmsg.direct_tcpip_extra(host, port, "127.0.0.1", 4444), **kw
        )

    async def open_udp(self, family: str = "inet", **kw: Any) -> Any:
        return await self.open(sshmsg.UDP_CHANNEL_TYPE, sshmsg.sstring(family), **kw)


# --- running the helper ----------------------------------------------------------------------


class Proc:
    def __init__(self, proc: asyncio.subprocess.Process, peer: Peer) -> None:
        self.proc = proc
        self.peer = peer

    async def finish(self, timeout: float = 10.0) -> tuple[int, str]:
        """Close stdin; the exit status and stderr."""
        assert self.proc.stdin is not None and self.proc.stderr is not None
        if not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        err = await self.proc.stderr.read()
        return code, err.decode()


@contextlib.asynccontextmanager
async def helper_process(
    pythons: tuple[str, ...] = ("python3",), shell: str = "sh"
) -> AsyncIterator[Proc]:
    source = helper_source()
    proc = await asyncio.create_subprocess_exec(
        shell,
        "-c",
        loader_command(len(source), pythons),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(source)
    await asyncio.wait_for(proc.stdout.readuntil(HELPER_SYNC), 10)  # the loader's first line
    peer = Peer(proc.stdout, proc.stdin)
    try:
        yield Proc(proc, peer)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        peer.task.cancel()
        assert not peer.violations, peer.violations


@contextlib.asynccontextmanager
async def helper_inprocess(
    expect_exit: int = 0, **kw: Any
) -> AsyncIterator[tuple[helper_mod.Helper, Peer]]:
    ours, theirs = socket.socketpair()
    helper = helper_mod.Helper(theirs.fileno(), theirs.fileno(), **kw)
    task = asyncio.get_running_loop().create_task(helper.run())
    reader, writer = await asyncio.open_connection(sock=ours)
    peer = Peer(reader, writer)
    try:
        await asyncio.wait_for(peer.hello, 5)
        yield helper, peer
        if expect_exit == 0:
            writer.write_eof()
        assert await asyncio.wait_for(task, 10) == expect_exit
        assert not peer.violations, peer.violations
    finally:
        task.cancel()
        peer.task.cancel()
        writer.close()
        theirs.close()


# --- loopback servers --------------------------------------------------------------------------


async def echo_server(received: list[int] | None = None) -> tuple[asyncio.Server, int]:
    """Echoes until EOF, then closes. `received` gets the byte count of each connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        try:
            while data := await reader.read(256 * 1024):
                total += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            if received is not None:
                received.append(total)
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class UdpEcho:
    """A UDP echo on a plain socket (asyncio's transport silently skips empty datagrams)."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._echo)

    def _echo(self) -> None:
        with contextlib.suppress(BlockingIOError):
            data, addr = self.sock.recvfrom(65536)
            self.sock.sendto(data, addr)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


async def udp_echo(host: str) -> tuple[UdpEcho, int]:
    echo = UdpEcho(host)
    return echo, echo.port
