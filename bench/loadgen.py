"""Small asyncio load generators: short HTTP requests, and many idle connections.

Run inside the client namespace (the caller wraps them in ``lab.netns("cli")``).  Both are
bounded by a count and by wall-clock time; every socket operation has its own timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

REQUEST = b"GET / HTTP/1.1\r\nHost: tgt\r\nConnection: close\r\n\r\n"
STATUS_OK = b"HTTP/1.1 200"
OP_TIMEOUT = 10.0
CONNECT_PARALLEL = 256


@dataclass
class LoadResult:
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    ttfb: list[float] = field(default_factory=list)
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def ttfb_median_ms(self) -> float | None:
        return statistics.median(self.ttfb) * 1e3 if self.ttfb else None

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{type(exc).__name__}: {exc}"


class _Http(asyncio.Protocol):
    """One request per connection: send, note the first byte, read the response to the end
    of its body (Content-Length, as an HTTP client does), then close.

    Not waiting for the server's FIN: the end of a response is its length, and through
    ssh the FIN can trail the data by a delayed-ACK round (see bench/README.md)."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.first: float | None = None
        self.buf = b""
        self.need: int | None = None  # total bytes of head + body once the head is parsed
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    @property
    def head(self) -> bytes:
        return self.buf[:64]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.buf += data
        if self.need is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value.strip())
            self.need = end + 4 + length
        if len(self.buf) >= self.need:
            self._finish(self.buf.startswith(STATUS_OK))

    def _finish(self, ok: bool) -> None:
        if not self.done.done():
            self.done.set_result(ok)

    def eof_received(self) -> bool:
        self._finish(
            False
            if self.need is None or len(self.buf) < self.need
            else self.buf.startswith(STATUS_OK)
        )
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is not None:
                self.done.set_exception(exc)
            else:
                self._finish(False)


async def http_request(host: str, port: int, timeout: float = OP_TIMEOUT) -> float | None:
    """One request on a new connection: connect, GET, read the response to the end of its
    body, close.  Returns the time to the first response byte (s); raises OSError,
    TimeoutError (each step bounded by ``timeout``) or RuntimeError (not a 200 reply)."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    transport, proto = await asyncio.wait_for(
        loop.create_connection(lambda: _Http(t0), host, port), timeout
    )
    try:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # already reset: proto.done says so
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ok = await asyncio.wait_for(proto.done, timeout)
    finally:
        transport.close()
    if not ok:
        raise RuntimeError(f"bad HTTP reply {proto.head!r}")
    return None if proto.first is None else proto.first - t0


async def http_load(
    host: str, port: int, *, concurrency: int, count: int, seconds: float
) -> LoadResult:
    """``concurrency`` workers each doing connect, GET, read-to-EOF, close in a loop, until
    ``count`` requests were started or ``seconds`` passed."""
    result = LoadResult()
    issued = 0
    start = time.monotonic()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal issued
        while issued < count and time.monotonic() < deadline:
            issued += 1
            try:
                ttfb = await http_request(host, port)
            except (OSError, RuntimeError, TimeoutError) as exc:
                result.error(exc)
                continue
            result.ok += 1
            if ttfb is not None:
                result.ttfb.append(ttfb)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.monotonic() - start
    return result


@dataclass
class HoldResult:
    ok: int = 0
    opened: int = 0
    first_error: str = ""


async def hold_many(
    host: str, port: int, count: int, *, seconds: float, while_held: Callable[[], None]
) -> HoldResult:
    """Open ``count`` connections to an echo server (at most CONNECT_PARALLEL connects in
    flight), keep every one open, then prove each works with a 1-byte echo while all are
    held; ``while_held`` runs at that moment (the RSS reading).  Bounded by ``seconds``."""
    result = HoldResult()
    sem = asyncio.Semaphore(CONNECT_PARALLEL)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def connect() -> None:
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), OP_TIMEOUT
                )
            except (OSError, TimeoutError) as exc:
                if not result.first_error:
                    result.first_error = f"connect: {type(exc).__name__}: {exc}"
                return
            conns.append((reader, writer))

    async def ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            writer.write(b"x")
            if await asyncio.wait_for(reader.readexactly(1), OP_TIMEOUT * 3) != b"x":
                raise OSError("wrong echo")
            result.ok += 1
            return True
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            if not result.first_error:
                result.first_error = f"echo: {type(exc).__name__}: {exc}"
            return False

    try:
        async with asyncio.timeout(seconds):
            await asyncio.gather(*(connect() for _ in range(count)))
            result.opened = len(conns)
            await asyncio.gather(*(ping(r, w) for r, w in conns))
    except TimeoutError:
        if not result.first_error:
            result.first_error = f"not done in {seconds:.0f}s"
    finally:
        result.opened = len(conns)
        while_held()
        for _reader, writer in conns:
            writer.close()
        await asyncio.sleep(0.2)
    return result
