"""Client side of the lab's services, shared by tests and benchmarks.

Every function connects from the *current thread's* network namespace: wrap calls in
``with lab.netns("cli"):`` (sockets made there go through the client's firewall rules, so
through the tunnel when one is up).  Addresses are literals (v4 or v6); timeouts are
seconds and always bounded.  Sync functions raise ``TransferError`` on wrong data unless
``check=False``; async variants (``a...``) do the same and suit thousands of concurrent
connections in one thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import http.client
import socket
import struct
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, TypeVar

from .services import (
    BULK_PORT,
    CLOSE_FIRST_PORT,
    DNS_PORT,
    ECHO_PORT,
    HTTP_PORT,
    UDP_ECHO_PORT,
    build_query,
    parse_message,
    stream_chunks,
    stream_sha256,
)

T = TypeVar("T")
RECV_BUFFER = 1 << 20


class TransferError(AssertionError):
    """Data arrived wrong, short, or not at all."""


@dataclasses.dataclass
class TransferResult:
    direction: str  # "up", "sink" (half-close) or "down"
    nbytes: int  # bytes that should have crossed
    transferred: int  # bytes that did (as counted by the receiver)
    seconds: float
    expected_sha256: str
    actual_sha256: str

    @property
    def ok(self) -> bool:
        return self.transferred == self.nbytes and self.expected_sha256 == self.actual_sha256

    @property
    def mbit_per_s(self) -> float:
        return self.transferred * 8 / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def check(self) -> TransferResult:
        if not self.ok:
            raise TransferError(
                f"{self.direction}: {self.transferred}/{self.nbytes} bytes, sha256 "
                f"{self.actual_sha256[:16]} != expected {self.expected_sha256[:16]}"
            )
        return self


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_all(sock: socket.socket, limit: int = 1 << 16) -> bytes:
    """Read until EOF (at most ``limit`` bytes)."""
    data = bytearray()
    while len(data) < limit:
        chunk = sock.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _parse_reply(reply: bytes) -> tuple[str, int]:
    parts = reply.decode("ascii", "replace").split()
    if len(parts) != 2 or parts[0] == "ERR":
        raise TransferError(f"bulk server replied {reply[:200]!r}")
    return parts[0], int(parts[1])


# --- bulk (sync) ------------------------------------------------------------------------------
def bulk_upload(
    host: str,
    nbytes: int,
    *,
    port: int = BULK_PORT,
    seed: int = 1,
    half_close: bool = False,
    timeout: float = 60.0,
    check: bool = True,
) -> TransferResult:
    """Send ``nbytes`` of stream(seed); the server hashes them and replies.

    ``half_close=True`` uses SINK: the client shuts down its write side and must still
    read the server's reply (the half-close path), instead of announcing the size.
    """
    t0 = time.monotonic()
    h = hashlib.sha256()
    with _connect(host, port, timeout) as sock:
        sock.sendall(b"SINK\n" if half_close else f"UP {nbytes}\n".encode())
        for chunk in stream_chunks(seed, nbytes):
            h.update(chunk)
            sock.sendall(chunk)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        reply = _recv_all(sock, 256)
    digest, count = _parse_reply(reply)
    res = TransferResult(
        "sink" if half_close else "up", nbytes, count, time.monotonic() - t0, h.hexdigest(), digest
    )
    return res.check() if check else res


def bulk_download(
    host: str,
    nbytes: int,
    *,
    port: int = BULK_PORT,
    seed: int = 1,
    timeout: float = 60.0,
    check: bool = True,
) -> TransferResult:
    """Receive ``nbytes`` of stream(seed) until the server's EOF and verify them."""
    t0 = time.monotonic()
    h = hashlib.sha256()
    count = 0
    buf = bytearray(RECV_BUFFER)
    view = memoryview(buf)
    with _connect(host, port, timeout) as sock:
        sock.sendall(f"DOWN {nbytes} {seed}\n".encode())
        while True:
            k = sock.recv_into(view)
            if k == 0:
                break
            h.update(view[:k])
            count += k
    seconds = time.monotonic() - t0
    res = TransferResult("down", nbytes, count, seconds, stream_sha256(seed, nbytes), h.hexdigest())
    return res.check() if check else res


def hold_connection(
    host: str, seconds: float, *, port: int = BULK_PORT, timeout: float = 10.0, stall: bool = False
) -> socket.socket:
    """Open an idle (HOLD) or never-read (STALL) connection; the caller closes it."""
    sock = _connect(host, port, timeout)
    sock.sendall(f"{'STALL' if stall else 'HOLD'} {seconds}\n".encode())
    return sock


# --- small services (sync) ---------------------------------------------------------------------
def echo(
    host: str,
    payload: bytes,
    *,
    port: int = ECHO_PORT,
    timeout: float = 10.0,
    half_close: bool = True,
) -> bytes:
    """Send ``payload`` to the echo server and return what came back.

    With ``half_close`` the client shuts down its write side after sending and reads until
    the server's EOF; otherwise it reads exactly len(payload) bytes.
    """
    with _connect(host, port, timeout) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
            return _recv_all(sock, len(payload) + (1 << 16))
        data = bytearray()
        while len(data) < len(payload):
            chunk = sock.recv(len(payload) - len(data))
            if not chunk:
                break
            data += chunk
        return bytes(data)


def echo_rtt(
    host: str, count: int = 100, *, port: int = ECHO_PORT, timeout: float = 10.0
) -> list[float]:
    """Round-trip times (seconds) of ``count`` 1-byte echoes over one connection."""
    out = []
    with _connect(host, port, timeout) as sock:
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise TransferError("echo connection closed")
            out.append(time.perf_counter() - t0)
    return out


def read_close_first(
    host: str, *, port: int = CLOSE_FIRST_PORT, timeout: float = 5.0
) -> tuple[bytes, float]:
    """Connect to the close-first server; return (data, seconds until EOF)."""
    t0 = time.monotonic()
    with _connect(host, port, timeout) as sock:
        data = _recv_all(sock, 4096)
    return data, time.monotonic() - t0


def probe_tcp(host: str, port: int, timeout: float = 1.0) -> tuple[str, float]:
    """Try to connect; return (outcome, seconds): "connected", "refused", "reset",
    "timeout", "unreachable" or "error:<errno name>"."""
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            outcome = "connected"
    except ConnectionRefusedError:
        outcome = "refused"
    except ConnectionResetError:
        outcome = "reset"
    except TimeoutError:
        outcome = "timeout"
    except OSError as exc:
        import errno

        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            outcome = "unreachable"
        else:
            outcome = f"error:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
    return outcome, time.monotonic() - t0


def udp_echo(
    host: str, payload: bytes, *, port: int = UDP_ECHO_PORT, timeout: float = 2.0
) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.send(payload)
        return sock.recv(65535)


@dataclasses.dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def http_get(
    host: str, path: str = "/", *, port: int = HTTP_PORT, timeout: float = 10.0
) -> HttpResponse:
    """A plain HTTP/1.1 GET (no proxies, no redirects); ``host`` is a literal address."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read()
        return HttpResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


# --- DNS ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class DnsAnswer:
    rcode: int  # 0 NOERROR, 3 NXDOMAIN ...
    addresses: list[str]
    truncated: bool
    raw: dict[str, Any]


def dns_query(
    server: str,
    name: str,
    qtype: str = "A",
    *,
    tcp: bool = False,
    port: int = DNS_PORT,
    timeout: float = 2.0,
) -> DnsAnswer:
    """Ask ``server`` directly (UDP or TCP) and parse the answer; raises TimeoutError."""
    query = build_query(name, qtype)
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    if tcp:
        with socket.create_connection((server, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">H", len(query)) + query)
            head = _recv_exact(sock, 2)
            data = _recv_exact(sock, struct.unpack(">H", head)[0])
    else:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((server, port))
            sock.send(query)
            deadline = time.monotonic() + timeout
            while True:
                data = sock.recv(65535)
                if data[:2] == query[:2] or time.monotonic() > deadline:
                    break
    msg = parse_message(data)
    if msg["id"] != struct.unpack(">H", query[:2])[0]:
        raise TransferError("DNS answer with the wrong id")
    addrs = [a["data"] for a in msg["answers"] if a["type"] in ("A", "AAAA")]
    return DnsAnswer(msg["rcode"], addrs, msg["tc"], msg)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise TransferError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


# --- async variants ----------------------------------------------------------------------------
async def _aopen(
    host: str, port: int, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(host, port, limit=RECV_BUFFER), timeout)


async def aecho(
    host: str, payload: bytes, *, port: int = ECHO_PORT, timeout: float = 30.0
) -> bytes:
    """Echo with half-close: write, shut down the write side, read to EOF."""
    reader, writer = await _aopen(host, port, timeout)
    try:
        writer.write(payload)
        await asyncio.wait_for(writer.drain(), timeout)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def aecho_all_open(
    hosts: Sequence[str], port: int, payloads: Sequence[bytes], timeout: float
) -> list[bytes]:
    """One echo connection per payload (to ``hosts[i]``), all open at the same time before
    any data moves; then each writes its payload and half-closes. The replies, in order;
    `timeout` bounds the opening and, again, the reading."""
    opened = await asyncio.wait_for(
        asyncio.gather(*(asyncio.open_connection(host, port) for host in hosts)), timeout
    )
    for (_reader, writer), payload in zip(opened, payloads, strict=True):
        writer.write(payload)
        writer.write_eof()
    replies = await asyncio.wait_for(
        asyncio.gather(*(reader.read() for reader, _writer in opened)), timeout
    )
    for _reader, writer in opened:
        writer.close()
    return list(replies)


async def abulk_upload(
    host: str, nbytes: int, *, port: int = BULK_PORT, seed: int = 1, timeout: float = 120.0
) -> TransferResult:
    t0 = time.monotonic()
    h = hashlib.sha256()
    reader, writer = await _aopen(host, port, timeout)
    try:
        writer.write(f"UP {nbytes}\n".encode())
        for chunk in stream_chunks(seed, nbytes):
            h.update(chunk)
            writer.write(bytes(chunk))
            await asyncio.wait_for(writer.drain(), timeout)
        reply = await asyncio.wait_for(reader.read(256), timeout)
    finally:
        writer.close()
    digest, count = _parse_reply(reply)
    return TransferResult("up", nbytes, count, time.monotonic() - t0, h.hexdigest(), digest).check()


async def abulk_download(
    host: str, nbytes: int, *, port: int = BULK_PORT, seed: int = 1, timeout: float = 120.0
) -> TransferResult:
    t0 = time.monotonic()
    h = hashlib.sha256()
    count = 0
    reader, writer = await _aopen(host, port, timeout)
    try:
        writer.write(f"DOWN {nbytes} {seed}\n".encode())
        deadline = time.monotonic() + timeout
        while True:
            chunk = await asyncio.wait_for(
                reader.read(RECV_BUFFER), max(0.1, deadline - time.monotonic())
            )
            if not chunk:
                break
            h.update(chunk)
            count += len(chunk)
    finally:
        writer.close()
    return TransferResult(
        "down", nbytes, count, time.monotonic() - t0, stream_sha256(seed, nbytes), h.hexdigest()
    ).check()


async def gather_limited(coros: Iterable[Awaitable[T]], limit: int = 0) -> list[T]:
    """Await all, at most ``limit`` at once (0: all at once); exceptions propagate."""
    if limit <= 0:
        return list(await asyncio.gather(*coros))
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[T]) -> T:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))
