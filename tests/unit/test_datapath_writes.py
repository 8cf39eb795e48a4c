"""The upload path's write discipline: one writev per batch, order kept on partial
writes, and writes that leave at once outside a read from the pipe and at its end
inside one."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from shuttled.tunnel import channels, sshmsg
from shuttled.tunnel.channels import ChannelMux, MuxProtocol, write_views
from tests.helpers import ChannelEvents, run_async

REMOTE_ID = 5


class FakeTransport:
    """Just enough of a socket transport: what write() got, and a buffer size to report."""

    def __init__(self, sock: socket.socket | None = None, buffered: int = 0) -> None:
        self.sock = sock
        self.buffered = buffered
        self.written: list[bytes] = []
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes | memoryview) -> None:
        self.written.append(bytes(data))

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def close(self) -> None:
        self.closing = True


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def writevs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.writev

    def counting(fd: int, buffers: Any) -> int:
        calls.append(len(buffers))
        return real(fd, buffers)

    monkeypatch.setattr(channels.os, "writev", counting)
    return calls


def drain(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_an_idle_transport_gets_nothing_the_kernel_took(pair: Any, writevs: list[int]) -> None:
    a, b = pair
    transport = FakeTransport(a)
    write_views(transport, a.fileno(), [b"head", memoryview(b"-body-"), b"tail"])  # type: ignore[arg-type]
    assert writevs == [3]
    assert transport.written == []
    assert drain(b) == b"head-body-tail"


def test_a_busy_transport_gets_everything_in_order(pair: Any, writevs: list[int]) -> None:
    a, b = pair
    transport = FakeTransport(a, buffered=10)
    write_views(transport, a.fileno(), [b"one", b"two"])  # type: ignore[arg-type]
    assert writevs == []
    assert transport.written == [b"one", b"two"]
    assert drain(b) == b""


def test_a_partial_write_hands_exactly_the_rest_to_the_transport(pair: Any) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    views = [bytes([i]) * 50_000 for i in range(1, 5)]
    transport = FakeTransport(a)
    write_views(transport, a.fileno(), views)  # type: ignore[arg-type]
    assert transport.written, "the socket buffer should not hold 200 kB"
    assert drain(b) + b"".join(transport.written) == b"".join(views)


def test_a_closing_transport_is_never_written_behind_its_back(
    pair: Any, writevs: list[int]
) -> None:
    a, _b = pair
    transport = FakeTransport(a)
    transport.closing = True
    write_views(transport, a.fileno(), [b"x"])  # type: ignore[arg-type]
    assert writevs == [] and transport.written == [b"x"]


class Pipe:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        pass


def types(data: bytes) -> list[int]:
    messages, _used = sshmsg.split_packets(data, 1 << 24)
    return [t for t, _ in messages]


def test_a_send_leaves_at_once_in_one_write() -> None:
    async def body() -> None:
        pipe = Pipe()
        mux = ChannelMux(pipe)
        channel = mux.open("session", ChannelEvents())
        assert len(pipe.writes) == 1  # the open did not wait for a loop turn
        mux.feed(sshmsg.open_confirmation(channel.local_id, REMOTE_ID, 1 << 20, 1000))
        channel.send(b"x" * 2500)
        assert types(pipe.writes[-1]) == [sshmsg.MSG_CHANNEL_DATA] * 3

    run_async(body())


def test_what_a_read_unblocks_leaves_in_one_write_at_its_end() -> None:
    async def body() -> None:
        pipe = Pipe()
        mux = ChannelMux(pipe)
        channels_ = [mux.open("session", ChannelEvents()) for _ in range(2)]
        for channel in channels_:
            mux.feed(sshmsg.open_confirmation(channel.local_id, REMOTE_ID, 10, 1000))
            channel.send(b"y" * 25)
        before = len(pipe.writes)
        mux.feed(b"".join(sshmsg.window_adjust(c.local_id, 100) for c in channels_))
        assert len(pipe.writes) == before + 1
        assert types(pipe.writes[-1]) == [sshmsg.MSG_CHANNEL_DATA] * 2

    run_async(body())


def test_uvloop_style_transports_are_accepted() -> None:
    async def body() -> None:
        protocol = MuxProtocol("test")
        protocol.connection_made(FakeTransport())  # type: ignore[arg-type]
        assert protocol.mux is not None

    run_async(body())


def test_a_channel_pipe_gets_the_batch_in_bounded_pieces_in_order() -> None:
    async def body() -> None:
        pipe = Pipe()
        mux = ChannelMux(pipe)
        channel = mux.open("session", ChannelEvents())
        mux.feed(sshmsg.open_confirmation(channel.local_id, REMOTE_ID, 1 << 20, 1 << 15))
        payload = bytes(range(256)) * 1000
        before = len(pipe.writes)
        channel.send(payload)
        pieces = pipe.writes[before:]
        assert len(pieces) > 1 and all(len(p) < 2 * channels._JOIN_PIECE for p in pieces)
        messages, used = sshmsg.split_packets(b"".join(pieces), 1 << 24)
        assert used == sum(map(len, pieces))
        assert b"".join(bytes(p[8:]) for _t, p in messages) == payload

    run_async(body())
