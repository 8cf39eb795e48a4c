"""DNS messages and a fake DNS-over-TCP server on loopback, for the DNS unit tests."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from shuttled.dns import wire
from shuttled.dns.wire import FLAG_QR, FLAG_RA, FLAG_RD
from shuttled.tunnel import sshmsg

TYPE_A = 1
TYPE_TXT = 16


BODY_TIMEOUT = 15.0  # how long one test's event loop may run


# --- building messages ------------------------------------------------------------


def encode_name(name: str) -> bytes:
    labels = [label.encode() for label in name.strip(".").split(".") if label]
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def make_query(
    name: str, ident: int = 0x1234, qtype: int = TYPE_A, edns: int | None = None
) -> bytes:
    opt = b"\0" + struct.pack(">HHIH", 41, edns, 0, 0) if edns is not None else b""
    header = struct.pack(">6H", ident, FLAG_RD, 1, 0, 0, 1 if opt else 0)
    return header + encode_name(name) + struct.pack(">HH", qtype, 1) + opt


def txt_rdata(size: int) -> bytes:
    out = b""
    while len(out) < size:
        chunk = min(255, size - len(out) - 1)
        out += bytes([chunk]) + b"x" * chunk
    return out


def make_answer(query: bytes, size: int = 0) -> bytes:
    """A reply: the query's id and question, one A record (or TXT of about size bytes)."""
    ident, flags, qdcount = struct.unpack_from(">3H", query)
    _, end = wire.read_questions(query)
    rtype, rdata = (TYPE_TXT, txt_rdata(size)) if size else (TYPE_A, bytes([10, 0, 0, 1]))
    record = b"\xc0\x0c" + struct.pack(">HHIH", rtype, 1, 60, len(rdata)) + rdata
    header = struct.pack(">6H", ident, flags | FLAG_QR | FLAG_RA, qdcount, 1, 0, 0)
    return header + query[12:end] + record


def qname(message: bytes) -> str:
    return wire.read_questions(message)[0][0].name


# --- a fake DNS-over-TCP server ---------------------------------------------------


class FakeServer:
    """DNS over TCP on loopback; each test sets how it misbehaves."""

    def __init__(
        self,
        *,
        delay: Callable[[int], float] = lambda index: 0.0,
        silent: Callable[[int], bool] = lambda connection: False,
        drop_after: Callable[[int], int | None] = lambda connection: None,
        before_reply: Callable[[bytes], list[bytes]] = lambda query: [],
        answer_size: int = 0,
    ) -> None:
        self.delay = delay
        self.silent = silent
        self.drop_after = drop_after
        self.before_reply = before_reply
        self.answer_size = answer_size
        self.connections = 0
        self.received: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> FakeServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # end the handlers (blocked in reads) before the loop ends
            writer.transport.abort()
        await asyncio.sleep(0.01)

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1@{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.connections += 1
        number = self.connections
        replies: set[asyncio.Task[None]] = set()
        count = 0
        try:
            while (query := await wire.read_frame(reader)) is not None:
                self.received.append(query)
                count += 1
                if count == self.drop_after(number):
                    writer.transport.abort()
                    return
                if not self.silent(number):
                    index = len(self.received) - 1
                    task = asyncio.create_task(self._reply(query, index, writer))
                    replies.add(task)
                    task.add_done_callback(replies.discard)
        except (OSError, EOFError):
            pass
        finally:
            for task in replies:
                task.cancel()
            writer.close()

    async def _reply(self, query: bytes, index: int, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.delay(index))
        for junk in self.before_reply(query):
            writer.write(struct.pack(">H", len(junk)) + junk)
        writer.write(wire.frame(make_answer(query, self.answer_size)))


def direct(host: str, port: int) -> Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return asyncio.open_connection(host, port)


# --- a fake helper for DNS over UDP -------------------------------------------------

# (nameserver, port, query as sent) -> the datagrams that come back: (source, port, bytes)
UdpAnswer = Callable[[str, int, bytes], list[tuple[str, int, bytes]]]


def answer_udp(host: str, port: int, query: bytes) -> list[tuple[str, int, bytes]]:
    """A nameserver that answers every query over UDP, from where it was sent."""
    return [(host, port, make_answer(query))]


class FakeUdpChannel:
    """What DatagramUpstream uses of a udp@shuttled channel: whole sends, window, close."""

    def __init__(self, helper: FakeHelperMux, endpoint: Any) -> None:
        self.helper = helper
        self.endpoint = endpoint
        self.close_sent = False

    def send_whole(self, data: bytes) -> bool:
        if self.close_sent:
            return False
        host, port, payload = sshmsg.unpack_datagram(data)
        self.helper.sent.append((host, port, payload))
        for source, sport, reply in self.helper.answer(host, port, payload):
            frame = sshmsg.pack_datagram(source, sport, reply)
            asyncio.get_running_loop().call_soon(self._deliver, frame)
        return True

    def _deliver(self, frame: bytes) -> None:
        if not self.close_sent:
            self.endpoint.on_data(memoryview(frame))

    def consumed(self, size: int) -> None:
        pass

    def close(self) -> None:
        self.close_sent = True


class FakeHelperMux:
    """The helper's mux as DatagramUpstream sees it: opens udp@shuttled channels that
    answer with `answer`; every datagram sent is kept in `sent`."""

    def __init__(self, answer: UdpAnswer = answer_udp) -> None:
        self.answer = answer
        self.sent: list[tuple[str, int, bytes]] = []
        self.opened: list[str] = []

    def open(self, kind: str, endpoint: Any, extra: bytes = b"") -> FakeUdpChannel:
        self.opened.append(kind)
        channel = FakeUdpChannel(self, endpoint)
        asyncio.get_running_loop().call_soon(endpoint.on_open, channel)
        return channel

    async def __call__(self) -> Any:  # the DatagramMux getter
        return self
