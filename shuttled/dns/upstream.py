"""Upstream transports: DNS to the remote's nameservers, over TCP or UDP each.

DNS over TCP through a direct-tcpip channel first: RFC 1035 4.2.2 framing and
RFC 7766 pipelining, many queries in flight on one connection, matched by
message id; a connection that fails fails only its own queries, which the
forwarder may retry elsewhere. Where a nameserver refuses TCP 53 (or drops it),
DNS over UDP sent from the remote by the helper (datagram.py), when the remote
has a python for it. TunnelUpstream decides per nameserver and says why none
answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shuttled.const import DNS_PORT, DNS_TIMEOUT
from shuttled.control.schema import NameserverRow
from shuttled.dns.datagram import (
    DatagramError,
    DatagramMux,
    DatagramUpstream,
    HelperUnavailableError,
)
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
UDP_WARM_AFTER = 0.2  # seconds TCP may take to answer before the helper for UDP starts


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


def tcp_failure(exc: BaseException) -> str:
    """What a failed DNS-over-TCP attempt says of the nameserver, as a verb phrase."""
    if isinstance(exc, TimeoutError):
        return "does not answer DNS over TCP"
    if isinstance(exc, _DroppedError):
        return f"drops DNS over TCP ({describe(exc)})"
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return f"refuses DNS over TCP ({describe(cause)})"


def explain(label: str, exc: BaseException) -> str:
    """A failure as one sentence that names the nameserver."""
    why = describe(exc)
    return why if label in why else f"{label}: {why}"


@dataclass
class Nameserver:
    """One of the remote's nameservers and what this session learnt of it."""

    host: str
    port: int
    transport: str = "untried"  # tcp or udp once one answered
    tcp_failed: str | None = None  # how TCP failed while no transport answered yet
    health: str = "untried"  # answering or failing, after the latest query
    error: str | None = None  # why the latest query failed

    @property
    def label(self) -> str:
        return self.host if self.port == DNS_PORT else f"{self.host}@{self.port}"

    def row(self) -> NameserverRow:
        return {
            "address": self.label,
            "transport": self.transport,
            "health": self.health,
            "error": self.error,
        }


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


class TunnelUpstream:
    """DNS to the remote's nameservers through the tunnel, over TCP or UDP each.

    A query goes to the nameserver that answered last (the first one at the
    start), then on to the next ones in order while time is left: each gets an
    equal share of the remaining time, as a stub resolver gives it. Never random.

    Transport, per nameserver: DNS over TCP through a direct-tcpip channel, one
    reused, pipelined connection each, first. With `datagrams` (the helper's UDP)
    a nameserver not yet heard from gets half its share over TCP and, if TCP is
    refused, reset or silent, the rest over UDP from the remote. The first
    transport that answers is kept for the session; `reset()` (a reconnect)
    starts over. A query whose TCP connection drops under it is asked again
    once, on a new connection.
    """

    def __init__(
        self,
        opener: Opener,
        nameservers: Sequence[str],
        *,
        connect_timeout: float = DNS_TIMEOUT,
        datagrams: DatagramMux | None = None,
    ) -> None:
        if not nameservers:
            raise ValueError("no nameserver to forward DNS queries to")
        self._opener = opener
        self._servers = [Nameserver(*parse_nameserver(text)) for text in nameservers]
        self._connect_timeout = connect_timeout
        self._udp = DatagramUpstream(datagrams) if datagrams is not None else None
        self._preferred = 0
        self._connections: dict[int, _Connection] = {}
        self._connecting: dict[int, asyncio.Task[_Connection]] = {}
        self._closed = False

    def _label(self, index: int) -> str:
        return self._servers[index].label

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
        """Ask one nameserver within its share of the time, by its transport."""
        loop = asyncio.get_running_loop()
        server = self._servers[index]
        share_end = loop.time() + (deadline - loop.time()) / left
        if server.transport == "udp":
            return await self._ask_udp(server, message, share_end)
        if server.transport == "untried" and self._udp is not None:
            return await self._try_both(index, message, share_end)
        reply = await self._ask_tcp(index, message, share_end)
        server.transport = "tcp"
        return reply

    async def _try_both(self, index: int, message: bytes, share_end: float) -> bytes:
        """A nameserver not heard from yet: TCP in half the share, then UDP in the rest.

        After TCP failed it once (the helper may have been too slow to start in the
        time left), UDP goes first, with the whole share."""
        server = self._servers[index]
        tcp = server.tcp_failed
        if tcp is None:
            try:
                return await self._first_tcp(index, message, share_end)
            except (UpstreamError, OSError) as exc:
                tcp = server.tcp_failed = tcp_failure(exc)
        assert self._udp is not None
        try:
            reply = await self._udp.ask(server.host, server.port, message, share_end)
        except HelperUnavailableError as exc:
            # The session's words for it start with "UDP unavailable: ", said here already.
            why = str(exc).removeprefix("UDP unavailable: ")
            raise UpstreamError(
                f"{server.label} {tcp} and DNS over UDP needs the remote helper: {why}"
            ) from None
        except (DatagramError, OSError) as exc:
            server.tcp_failed = None  # neither answers: TCP first again next time
            raise UpstreamError(f"{server.label} {tcp}, and over UDP: {describe(exc)}") from None
        server.transport = "udp"
        log.info("nameserver %s %s: asking it over UDP from now on", server.label, tcp)
        return reply

    async def _first_tcp(self, index: int, message: bytes, share_end: float) -> bytes:
        """TCP in the first half of the share; when it is slow to answer, the helper for
        UDP starts meanwhile (uploading it takes a while), so UDP is ready in time."""
        assert self._udp is not None
        server = self._servers[index]
        loop = asyncio.get_running_loop()
        warm = loop.call_later(UDP_WARM_AFTER, self._udp.prepare, server.host)
        try:
            reply = await self._ask_tcp(index, message, loop.time() + (share_end - loop.time()) / 2)
        finally:
            warm.cancel()
        server.transport = "tcp"
        return reply

    async def _ask_udp(self, server: Nameserver, message: bytes, share_end: float) -> bytes:
        assert self._udp is not None
        try:
            return await self._udp.ask(server.host, server.port, message, share_end)
        except DatagramError as exc:
            raise UpstreamError(f"{server.label} over UDP: {exc}") from exc

    async def _ask_tcp(self, index: int, message: bytes, share_end: float) -> bytes:
        """Ask over TCP until share_end, again once if the connection drops."""
        loop = asyncio.get_running_loop()
        retried = False
        while True:
            try:
                async with asyncio.timeout(share_end - loop.time()):
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
        host, port = self._servers[index].host, self._servers[index].port
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
        server = self._servers[index]
        why = explain(server.label, exc)
        if server.health == "failing":
            log.debug("nameserver failed again: %s", why)
        else:
            log.warning("nameserver failed: %s", why)
        server.health, server.error = "failing", why

    def _note_success(self, index: int) -> None:
        self._preferred = index
        server = self._servers[index]
        if server.health == "failing":
            log.info("nameserver %s answers again (over %s)", server.label, server.transport)
        server.health, server.error = "answering", None

    def nameservers(self) -> list[NameserverRow]:
        """Each nameserver's transport and health, for status and stats."""
        return [server.row() for server in self._servers]

    def problem(self) -> str | None:
        """Why no nameserver answers, in one line; None while one does (or none was asked)."""
        if not all(server.health == "failing" for server in self._servers):
            return None
        return "; ".join(server.error or server.label for server in self._servers)

    def reset(self) -> None:
        """A new ssh session: what was learnt of each nameserver's transport is forgotten,
        and the channels of the old one go."""
        self._drop_channels()
        self._preferred = 0
        self._servers = [Nameserver(server.host, server.port) for server in self._servers]

    def close(self) -> None:
        self._closed = True
        self._drop_channels()

    def _drop_channels(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._closed:  # on a reset, a connect in progress fails with its old session
            for task in self._connecting.values():
                task.cancel()
            self._connecting.clear()
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
