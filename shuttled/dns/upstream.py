"""Upstream transports: DNS over TCP through a direct-tcpip channel to a nameserver.

RFC 1035 4.2.2 framing and RFC 7766 pipelining: many queries in flight on one
connection, matched by message id; a connection that fails fails only its own
queries, which the forwarder may retry elsewhere."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shuttled.const import DNS_PORT, DNS_TIMEOUT
from shuttled.dns.resolvconf import parse_nameserver
from shuttled.dns.wire import (
    FLAG_QR,
    DnsMessageError,
    frame,
    parse_header,
    query_id,
    question_keys,
    read_frame,
    with_id,
)

log = logging.getLogger(__name__)

# (host, port) -> a stream pair through a direct-tcpip channel to host:port.
Opener = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

GARBAGE_LOG_LIMIT = 10  # bad replies logged per upstream connection, then only counted


class UpstreamError(Exception):
    """No nameserver answered: each refused, failed or dropped the query."""


class _DroppedError(UpstreamError):
    """The connection a query was on went away before its reply came."""


class Upstream(Protocol):
    """Where queries go. query() returns the reply with the query's own id, before
    deadline (event-loop time), or raises UpstreamError or TimeoutError."""

    async def query(self, message: bytes, deadline: float) -> bytes: ...

    def close(self) -> None: ...


@dataclass
class _Pending:
    waiter: asyncio.Future[bytes]
    questions: tuple[tuple[str, int, int], ...]


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


class _Connection:
    """One DNS-over-TCP stream: queries pipelined under ids unique on it (RFC 7766 6.2.1.1)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str
    ) -> None:
        self.name = name
        self.closed = False
        self._reader = reader
        self._writer = writer
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._replies = 0  # valid replies received, to tell a silent stream from a slow answer
        self._garbage = 0
        self._task = asyncio.create_task(self._receive())

    async def ask(self, message: bytes) -> bytes:
        """The reply to message (a validated query), its id restored."""
        if self.closed:
            raise _DroppedError(f"connection to {self.name} is closed")
        ident = self._allocate_id()
        waiter = asyncio.get_running_loop().create_future()
        self._pending[ident] = _Pending(waiter, question_keys(message))
        replies_before = self._replies
        try:
            self._writer.write(frame(with_id(message, ident)))
            await self._writer.drain()
            reply = await waiter
        except OSError as exc:
            self.close(f"write failed: {exc}")
            raise _DroppedError(f"connection to {self.name} lost: {exc}") from exc
        except asyncio.CancelledError:
            if self._replies == replies_before:  # nothing at all came back since we asked
                self.close("no reply in time, replacing the connection")
            raise
        finally:
            del self._pending[ident]
        return with_id(reply, query_id(message))

    def _allocate_id(self) -> int:
        for _ in range(0x10000):
            ident, self._next_id = self._next_id, (self._next_id + 1) & 0xFFFF
            if ident not in self._pending:
                return ident
        raise UpstreamError(f"no free query id on the connection to {self.name}")

    async def _receive(self) -> None:
        reason = "closed by the nameserver"
        try:
            while (message := await read_frame(self._reader)) is not None:
                self._deliver(message)
        except (OSError, EOFError) as exc:
            reason = f"lost: {describe(exc)}"
        finally:
            self.close(reason)

    def _deliver(self, message: bytes) -> None:
        try:
            pending = self._match(message)
        except DnsMessageError as exc:
            self._garbage += 1
            if self._garbage <= GARBAGE_LOG_LIMIT:
                log.warning("dropped a bad reply from nameserver %s: %s", self.name, exc)
            return
        self._replies += 1
        pending.waiter.set_result(message)

    def _match(self, message: bytes) -> _Pending:
        header = parse_header(message)
        if not header.flags & FLAG_QR:
            raise DnsMessageError("QR bit clear")
        pending = self._pending.get(header.ident)
        if pending is None or pending.waiter.done():
            raise DnsMessageError(f"no query with id {header.ident} outstanding")
        questions = question_keys(message)
        if questions and questions != pending.questions:
            raise DnsMessageError(f"question of id {header.ident} does not match the query")
        return pending

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        log.debug("DNS connection to %s %s", self.name, reason)
        for pending in self._pending.values():
            if not pending.waiter.done():
                pending.waiter.set_exception(_DroppedError(f"connection to {self.name} {reason}"))
        self._writer.close()
        if self._task is not asyncio.current_task():
            self._task.cancel()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a shared task's outcome seen, so an unawaited failure is not logged as a bug."""
    if not task.cancelled():
        task.exception()


class TcpPipelinedUpstream:
    """DNS over TCP to a list of nameservers, one reused, pipelined connection each.

    A query goes to the nameserver that answered last (the first one at the
    start), then on to the next ones in order while time is left: each gets an
    equal share of the remaining time. Never random. A query whose connection
    drops under it is asked again once, on a new connection.
    """

    def __init__(
        self, opener: Opener, nameservers: Sequence[str], *, connect_timeout: float = DNS_TIMEOUT
    ) -> None:
        if not nameservers:
            raise ValueError("no nameserver to forward DNS queries to")
        self._opener = opener
        self._servers = [parse_nameserver(text) for text in nameservers]
        self._connect_timeout = connect_timeout
        self._preferred = 0
        self._failing: set[int] = set()
        self._connections: dict[int, _Connection] = {}
        self._connecting: dict[int, asyncio.Task[_Connection]] = {}
        self._closed = False

    def _label(self, index: int) -> str:
        host, port = self._servers[index]
        return host if port == DNS_PORT else f"{host}@{port}"

    async def query(self, message: bytes, deadline: float) -> bytes:
        if self._closed:
            raise UpstreamError("DNS forwarding is closed")
        count = len(self._servers)
        failure: Exception = UpstreamError("no nameserver tried")
        for step in range(count):
            index = (self._preferred + step) % count
            try:
                reply = await self._ask_server(index, message, deadline, count - step)
            except (UpstreamError, OSError) as exc:  # TimeoutError is an OSError
                self._note_failure(index, exc)
                failure = exc
                continue
            self._note_success(index)
            return reply
        raise failure

    async def _ask_server(self, index: int, message: bytes, deadline: float, left: int) -> bytes:
        """Ask one nameserver within its share of the time, again once if the connection drops."""
        loop = asyncio.get_running_loop()
        retried = False
        while True:
            try:
                async with asyncio.timeout((deadline - loop.time()) / left):
                    connection = await self._connection(index)
                    return await connection.ask(message)
            except _DroppedError:
                if retried:
                    raise
                retried = True
                log.debug("DNS query dropped by %s, asking again", self._label(index))

    async def _connection(self, index: int) -> _Connection:
        """The open connection to a nameserver; every query waits on the same connect."""
        if self._closed:
            raise UpstreamError("DNS forwarding is closed")
        connection = self._connections.get(index)
        if connection is not None and not connection.closed:
            return connection
        task = self._connecting.get(index)
        if task is None:
            task = asyncio.create_task(self._open(index))
            task.add_done_callback(_retrieve)
            self._connecting[index] = task
        return await asyncio.shield(task)

    async def _open(self, index: int) -> _Connection:
        host, port = self._servers[index]
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await self._opener(host, port)
        except Exception as exc:  # the opener is the channel layer's: any failure is this one's
            raise UpstreamError(f"cannot reach {self._label(index)}: {describe(exc)}") from exc
        finally:
            self._connecting.pop(index, None)
        connection = _Connection(reader, writer, self._label(index))
        if self._closed:
            connection.close()
            raise UpstreamError("DNS forwarding is closed")
        self._connections[index] = connection
        return connection

    def _note_failure(self, index: int, exc: BaseException) -> None:
        if index in self._failing:
            log.debug("nameserver %s failed again: %s", self._label(index), describe(exc))
            return
        self._failing.add(index)
        log.warning("nameserver %s failed: %s", self._label(index), describe(exc))

    def _note_success(self, index: int) -> None:
        self._preferred = index
        if index in self._failing:
            self._failing.discard(index)
            log.info("nameserver %s answers again", self._label(index))

    def close(self) -> None:
        self._closed = True
        for task in self._connecting.values():
            task.cancel()
        self._connecting.clear()
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
