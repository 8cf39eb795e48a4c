"""Impatient clients, the helper's side: a connection's failure ends that connection only.

Fault injection: with a long echo transfer running through an in-process helper,
each channel callback in turn raises ENOTCONN, ECONNRESET, EPIPE, EBADF and a
plain Exception, once each for a fresh victim channel. The victim must get CLOSE
(OPEN_FAILURE before its confirmation) and be freed, the helper must keep
answering, and the transfer must finish with the right bytes.

Then the real thing, over the helper's stdio: targets that reset at once, names
and datagram addresses that used to end the helper, and epoll refusing a fd.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from shuttled.remote import helper as helper_mod
from shuttled.tunnel import sshmsg
from tests.helpers import async_test
from tests.unit.helper_client import (
    TIMEOUT,
    Chan,
    Peer,
    echo_server,
    helper_inprocess,
    helper_process,
    udp_echo,
)


def injected() -> list[BaseException]:
    """What each callback raises, one victim channel each."""
    return [
        *(
            OSError(code, os.strerror(code))
            for code in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.EBADF)
        ),
        Exception("simulated bug"),
    ]


class Inject:
    """Makes `cls.name` raise, once, for the channels the test names by the client's
    channel id (the helper's `rid`); every other channel runs the real method."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
        self.pending: dict[int, BaseException] = {}
        self.raised: list[int] = []
        original = getattr(cls, name)

        def faulty(channel: Any, *args: Any) -> Any:
            exc = self.pending.pop(channel.rid, None)
            if exc is None:
                return original(channel, *args)
            self.raised.append(channel.rid)
            raise exc

        faulty.__name__ = name
        monkeypatch.setattr(cls, name, faulty)


class Transfer:
    """An echo transfer that keeps going, 16 KiB every 10 ms, until finish()."""

    def __init__(self, chan: Chan) -> None:
        self.chan = chan
        self.sent = hashlib.sha256()
        self.size = 0
        self.stop = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        while not self.stop.is_set():
            chunk = os.urandom(16384)
            self.sent.update(chunk)
            self.size += len(chunk)
            await self.chan.send(chunk)
            await asyncio.sleep(0.01)
        self.chan.send_eof()

    async def finish(self) -> None:
        assert not self.chan.got_close, "the transfer ended while faults were injected"
        assert self.size and len(self.chan.data) > 0
        self.stop.set()
        await self.task
        await self.chan.wait_for(lambda: self.chan.got_close, 30)
        assert len(self.chan.data) == self.size
        assert hashlib.sha256(self.chan.data).hexdigest() == self.sent.hexdigest()
        assert self.chan.events[-2:] == [sshmsg.MSG_CHANNEL_EOF, sshmsg.MSG_CHANNEL_CLOSE]


async def ping(peer: Peer) -> None:
    """The helper itself still answers: a global request gets its REQUEST_FAILURE."""
    peer.write(
        sshmsg.packet(
            sshmsg.MSG_GLOBAL_REQUEST, sshmsg.sstring("ping@shuttled") + sshmsg.sbool(True)
        )
    )
    assert await asyncio.wait_for(peer.globals.get(), 5) == sshmsg.MSG_REQUEST_FAILURE


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def blast_server() -> tuple[asyncio.Server, int, asyncio.Event]:
    """Sends 4 MiB once `go` is set."""
    go = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await go.wait()
        with contextlib.suppress(ConnectionError):  # the helper closed the victim
            writer.write(bytes(4 << 20))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], go


# --- one victim per injected exception, per callback ----------------------------------------
#
# A victim function opens a victim channel, arms the injection for it, makes the
# helper call the callback, and checks that the victim alone was ended.


Victim = Callable[..., Awaitable[None]]


class Case:
    """One callback's test: the helper, its client, the injection and the targets."""

    def __init__(
        self, peer: Peer, helper: helper_mod.Helper, inject: Inject, tcp_port: int, udp_port: int
    ) -> None:
        self.peer = peer
        self.helper = helper
        self.inject = inject
        self.tcp_port = tcp_port
        self.udp_port = udp_port

    async def open(self, kind: str, exc: BaseException, **kw: Any) -> Chan:
        if kind == "tcp":
            chan = await self.peer.open_tcp(self.tcp_port, **kw)
        else:
            chan = await self.peer.open_udp(**kw)
        assert isinstance(chan, Chan), chan
        self.inject.pending[chan.lid] = exc
        return chan

    async def expect_open_failure(self, kind: str, exc: BaseException) -> None:
        """The fault comes before the confirmation: OPEN_FAILURE, id never used."""
        lid = self.peer.next_id
        self.inject.pending[lid] = exc
        before = set(self.helper.channels)
        if kind == "tcp":
            answer = await self.peer.open_tcp(self.tcp_port)
        else:
            answer = await self.peer.open_udp()
        reason, text = answer
        assert reason == sshmsg.OPEN_CONNECT_FAILED and text.startswith("helper: start: ")
        assert set(self.helper.channels) == before

    async def expect_close(self, chan: Chan) -> None:
        """CLOSE for the victim (the test client answers with its own), then the
        helper frees it: no channel, socket or drain left behind."""
        channel = self.helper.channels.get(chan.rid)
        await chan.wait_for(lambda: chan.got_close, 10)
        await until(lambda: chan.rid not in self.helper.channels)
        if channel is not None:
            assert channel.sock is None and channel not in self.helper.draining


async def tcp_start(case: Case, exc: BaseException) -> None:
    await case.expect_open_failure("tcp", exc)


async def udp_start(case: Case, exc: BaseException) -> None:
    await case.expect_open_failure("udp", exc)


async def send_data(case: Case, exc: BaseException, kind: str) -> None:
    chan = await case.open(kind, exc)
    if kind == "tcp":
        await chan.send(b"ping")
    else:
        chan.send_datagram("127.0.0.1", case.udp_port, b"ping")
    await case.expect_close(chan)


async def window(case: Case, exc: BaseException, kind: str) -> None:
    chan = await case.open(kind, exc)
    chan.adjust(1000)
    await case.expect_close(chan)


async def eof(case: Case, exc: BaseException, kind: str) -> None:
    chan = await case.open(kind, exc)
    chan.send_eof()
    await case.expect_close(chan)


async def close(case: Case, exc: BaseException, kind: str) -> None:
    chan = await case.open(kind, exc)
    chan.send_close()
    await case.expect_close(chan)


async def drain_timeout(case: Case, exc: BaseException) -> None:
    """The client's CLOSE, a target that never sends EOF: the drain timer fires."""
    listener = socket.create_server(("127.0.0.1", 0))
    chan = await case.peer.open_tcp(listener.getsockname()[1])
    assert isinstance(chan, Chan)
    case.inject.pending[chan.lid] = exc
    channel = case.helper.channels[chan.rid]
    chan.send_close()
    await chan.wait_for(lambda: chan.got_close)
    await until(lambda: chan.lid in case.inject.raised)
    assert channel.sock is None and channel not in case.helper.draining
    listener.close()


async def stalled_resume(case: Case, exc: BaseException) -> None:
    """stdout backs up while the victim reads: it is parked, then resumed."""
    server, port, go = await blast_server()
    chan = await case.peer.open_tcp(port, window=8 << 20)
    assert isinstance(chan, Chan)
    case.inject.pending[chan.lid] = exc
    channel = case.helper.channels[chan.rid]
    case.peer.gate.clear()
    go.set()
    await until(lambda: channel in case.helper.stalled)
    case.peer.gate.set()
    await case.expect_close(chan)
    server.close()


async def udp_reply(case: Case, exc: BaseException) -> None:
    chan = await case.open("udp", exc)
    chan.send_datagram("127.0.0.1", case.udp_port, b"echo me")
    await case.expect_close(chan)
    assert chan.datagrams == []


async def udp_expire(case: Case, exc: BaseException) -> None:
    chan = await case.open("udp", exc)
    await case.expect_close(chan)
    assert chan.events == [sshmsg.MSG_CHANNEL_CLOSE]  # expire raised before its EOF


CASES: dict[str, tuple[type, str, Victim, dict[str, Any]]] = {
    "tcp start": (helper_mod.TcpChannel, "start", tcp_start, {}),
    "tcp on_data": (helper_mod.TcpChannel, "on_data", send_data, {"kind": "tcp"}),
    "tcp flush_socket": (helper_mod.TcpChannel, "flush_socket", send_data, {"kind": "tcp"}),
    "tcp on_readable": (helper_mod.TcpChannel, "on_readable", send_data, {"kind": "tcp"}),
    "tcp on_window": (helper_mod.TcpChannel, "on_window", window, {"kind": "tcp"}),
    "tcp on_eof": (helper_mod.TcpChannel, "on_eof", eof, {"kind": "tcp"}),
    "tcp on_close": (helper_mod.TcpChannel, "on_close", close, {"kind": "tcp"}),
    "tcp on_drain_timeout": (helper_mod.TcpChannel, "on_drain_timeout", drain_timeout, {}),
    "tcp resume": (helper_mod.TcpChannel, "resume", stalled_resume, {}),
    "udp start": (helper_mod.UdpChannel, "start", udp_start, {}),
    "udp on_data": (helper_mod.UdpChannel, "on_data", send_data, {"kind": "udp"}),
    "udp on_readable": (helper_mod.UdpChannel, "on_readable", udp_reply, {}),
    "udp on_window": (helper_mod.UdpChannel, "on_window", window, {"kind": "udp"}),
    "udp on_eof": (helper_mod.UdpChannel, "on_eof", eof, {"kind": "udp"}),
    "udp on_close": (helper_mod.UdpChannel, "on_close", close, {"kind": "udp"}),
    "udp expire": (helper_mod.UdpChannel, "expire", udp_expire, {}),
}


@pytest.mark.parametrize("name", list(CASES))
@async_test(TIMEOUT)
async def test_fault_in_a_callback_ends_that_channel_only(
    name: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    cls, method, victim, kw = CASES[name]
    kind = name.split()[0]
    monkeypatch.setattr(helper_mod, "DRAIN_TIMEOUT", 0.1)
    received: list[int] = []
    server, tcp_port = await echo_server(received)
    udp, udp_port = await udp_echo("127.0.0.1")
    async with helper_inprocess(udp_idle=0.3 if method == "expire" else 60.0) as (helper, peer):
        long_chan = await peer.open_tcp(tcp_port)
        transfer = Transfer(long_chan)
        await long_chan.wait_for(lambda: len(long_chan.data) > 0)
        inject = Inject(monkeypatch, cls, method)
        case = Case(peer, helper, inject, tcp_port, udp_port)
        for exc in injected():
            await victim(case, exc, **kw)
            await ping(peer)
        assert len(inject.raised) == 5 and not inject.pending
        await transfer.finish()
    assert helper.faults == {kind: 5}
    if kind == "tcp" and method not in ("on_drain_timeout", "resume"):
        # Every victim's connection to the echo server was closed, and the transfer's.
        await until(lambda: len(received) == 6)
    # Reported on stderr: at the first sweep after a fault, then at most once a
    # minute, and at exit; the last line names the last fault.
    lines = capfd.readouterr().err.splitlines()
    prefix = "shuttled-helper: faults: "
    assert all(line.startswith(prefix) for line in lines), lines
    assert sum(int(line[len(prefix) :].split()[0]) for line in lines) == 5, lines
    assert (
        f"{kind} channels ended by a fault of their own (the helper went on); last: "
        f"{kind} {method}: Exception: simulated bug (line " in lines[-1]
    ), lines
    server.close()
    udp.close()


@async_test(TIMEOUT)
async def test_fault_while_connecting_fails_that_open_only(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The connect: an OSError is the target's answer, anything else a fault; both
    are this open's OPEN_FAILURE."""
    pending: dict[int, BaseException] = {}
    original = helper_mod.Helper._connect

    async def faulty(self: helper_mod.Helper, host: str, port: int) -> socket.socket:
        exc = pending.pop(port, None)
        if exc is not None:
            raise exc
        return await original(self, host, port)

    monkeypatch.setattr(helper_mod.Helper, "_connect", faulty)
    server, port = await echo_server()
    async with helper_inprocess() as (helper, peer):
        transfer = Transfer(await peer.open_tcp(port))
        for fake_port, exc in enumerate(injected(), start=1):  # never connected
            pending[fake_port] = exc
            reason, text = await peer.open_tcp(fake_port)
            assert reason == sshmsg.OPEN_CONNECT_FAILED
            assert text.startswith(f"connect to 127.0.0.1 port {fake_port}: ")
            await ping(peer)
        assert not pending
        await transfer.finish()
    assert helper.faults == {"tcp": 1}  # the plain Exception only
    assert "last: tcp connect: Exception: simulated bug" in capfd.readouterr().err
    server.close()


# --- real faults over the helper's stdio ---------------------------------------------------


async def reset_server(
    go: asyncio.Event | None = None,
) -> tuple[asyncio.Server, int, asyncio.Event]:
    """Accepts, then resets (SO_LINGER 0): at once, or once `go` is set. `reset` is
    set when it has."""
    reset = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if go is not None:
            await go.wait()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        reset.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], reset


async def still_serving(peer: Peer, echo_port: int) -> None:
    await ping(peer)
    other = await peer.open_tcp(echo_port)
    await other.send(b"still here")
    await other.wait_for(lambda: bytes(other.data) == b"still here")
    other.send_eof()
    await other.wait_for(lambda: other.got_close)


@pytest.mark.parametrize("window", [0, 1 << 20])
@pytest.mark.parametrize("send", ["data then eof", "eof only"])
@async_test(TIMEOUT)
async def test_target_resets_right_after_accept(window: int, send: str) -> None:
    """Data then EOF, or EOF alone, to a socket the target has already reset: EPIPE
    or ECONNRESET from the write, ENOTCONN from shutdown. With window 0 the helper
    never reads the socket, so the write meets the reset first."""
    go = asyncio.Event()
    server, port, reset = await reset_server(go)
    echo, echo_port = await echo_server()
    async with helper_process() as h:
        chan = await h.peer.open_tcp(port, window=window)
        assert isinstance(chan, Chan)
        # This client sends its data and EOF whether or not the helper's CLOSE came
        # meanwhile (allowed until it sends its own), and answers that CLOSE after.
        chan.sent_close = True
        go.set()
        await asyncio.wait_for(reset.wait(), 5)
        await asyncio.sleep(0.05)  # the RST is in the helper's socket
        if send == "data then eof":
            await chan.send(os.urandom(100_000))
        chan.send_eof()
        await chan.wait_for(lambda: chan.got_close)
        h.peer.write(sshmsg.close(chan.rid))
        assert chan.events == [sshmsg.MSG_CHANNEL_CLOSE]  # a reset: no data, no EOF
        await still_serving(h.peer, echo_port)
        assert await h.finish() == (0, "")  # a reset is no fault: nothing to report
    server.close()
    echo.close()


@async_test(TIMEOUT)
async def test_targets_that_reset_during_the_connect() -> None:
    """A reset at once races the helper's connect: OPEN_FAILURE or a channel that
    closes, 50 times over, and the helper goes on."""
    server, port, _ = await reset_server()
    echo, echo_port = await echo_server()
    async with helper_process() as h:
        for _ in range(50):
            chan = await h.peer.open_tcp(port)
            if isinstance(chan, Chan):  # the helper reads the reset: CLOSE
                await chan.wait_for(lambda c=chan: c.got_close)
            else:
                assert chan[0] == sshmsg.OPEN_CONNECT_FAILED, chan
        await still_serving(h.peer, echo_port)
        assert await h.finish() == (0, "")
    server.close()
    echo.close()


@async_test(TIMEOUT)
async def test_names_and_addresses_that_used_to_end_the_helper() -> None:
    """A label the IDNA codec refuses (UnicodeError, not OSError) and a datagram to
    an address with a NUL in it (ValueError): one failed open, one dropped datagram."""
    udp, udp_port = await udp_echo("127.0.0.1")
    async with helper_process() as h:
        reason, text = await h.peer.open_tcp(80, host="a" * 64 + ".example")
        assert reason == sshmsg.OPEN_CONNECT_FAILED and "idna" in text
        chan = await h.peer.open_udp()
        chan.send_datagram("127.0.0.1\x00", udp_port, b"lost")
        chan.send_datagram("127.0.0.1", udp_port, b"kept")
        await chan.wait_for(lambda: len(chan.datagrams) == 1)
        assert sshmsg.unpack_datagram(chan.datagrams[0])[2] == b"kept"
        await ping(h.peer)
        code, err = await h.finish()
        assert code == 0
        assert err.splitlines() == [
            "shuttled-helper: udp: dropped 0 replies (client window or max packet, or stdout "
            "backed up) and 1 datagrams towards targets (send failed or not an address)"
        ]
    udp.close()


@async_test(TIMEOUT)
async def test_epoll_refusing_a_socket_ends_that_channel(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A fault deep inside a callback (the loop's add_reader: epoll_ctl's ENOSPC at
    max_user_watches): when arming a new channel, its OPEN_FAILURE; when reading
    again after a window adjust, its CLOSE."""
    server, port = await echo_server()
    async with helper_inprocess() as (helper, peer):
        transfer = Transfer(await peer.open_tcp(port))
        loop = asyncio.get_running_loop()
        add_reader = loop.add_reader
        refuse: set[int] = set()  # the client's ids of the channels epoll refuses

        def limited(fd: Any, callback: Callable[..., object], *args: Any) -> None:
            channel = getattr(callback, "__self__", None)  # a Channel's contain
            if isinstance(channel, helper_mod.Channel) and channel.rid in refuse:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            add_reader(fd, callback, *args)

        monkeypatch.setattr(loop, "add_reader", limited)
        refuse.add(peer.next_id)  # arming a new channel
        reason, text = await peer.open_tcp(port)
        assert (reason, text) == (
            sshmsg.OPEN_CONNECT_FAILED,
            "helper: start: No space left on device",
        )
        chan = await peer.open_tcp(port, window=0)  # reading again on a window adjust
        assert isinstance(chan, Chan)
        refuse.add(chan.lid)
        chan.adjust(1000)
        await chan.wait_for(lambda: chan.got_close)
        await ping(peer)
        await transfer.finish()
    assert helper.faults == {"tcp": 2}
    assert "last: tcp on_window: ENOSPC (No space left on device)" in capfd.readouterr().err
    server.close()
