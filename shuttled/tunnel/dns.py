"""DNS through the tunnel: local listeners, DNS over TCP to the remote's nameserver.

Queries the firewall redirected to our listeners (UDP and TCP, one port number on
every address) are answered by `DnsForwarder.resolve()`, which sends each one as
DNS over TCP (RFC 1035 4.2.2 framing, RFC 7766 pipelining: many queries in
flight on one connection, matched by message id) through a direct-tcpip channel
to the remote's nameserver. `resolve()` always answers: the nameserver's reply,
or a SERVFAIL built here once the timeout has passed (sshuttle hung for 30 s).

Split DNS: `DnsForwarder._route()` picks the upstream for a query by its
question name (routes: dnsroute.SplitRoutes; the local upstream to the
machine's own resolvers: dnslocal.LocalUpstream); a TTL cache
(dnscache.DnsCache) and the remote's host names (dnsroute.HostsTable) answer
before any upstream is asked.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import ipaddress
import logging
import struct
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from shuttled import const
from shuttled.const import DNS_PORT, DNS_TIMEOUT
from shuttled.tunnel import faults
from shuttled.tunnel.faults import Faults

log = logging.getLogger(__name__)

# (host, port) -> a stream pair through a direct-tcpip channel to host:port.
Opener = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

# --- limits ------------------------------------------------------------------------
MAX_OUTSTANDING = 1024  # queries in flight per forwarder; beyond that: SERVFAIL at once
TCP_CLIENT_PIPELINE = 128  # queries in flight per TCP client before we stop reading it
TCP_CLIENT_IDLE = 10.0  # seconds a TCP client may stay silent or unread (RFC 7766 6.2.3)
UDP_MAX_PENDING = 2 * MAX_OUTSTANDING  # datagrams being answered; beyond that: dropped
UDP_MAX_PAYLOAD = 65507  # largest UDP payload over IPv4
PORT_ATTEMPTS = 8  # tries to find one port number free for every address and protocol
GARBAGE_LOG_LIMIT = 10  # bad replies logged per upstream connection, then only counted

# --- wire format (RFC 1035 4.1) -------------------------------------------------------
HEADER = struct.Struct(">HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
HEADER_SIZE = HEADER.size
_U16 = struct.Struct(">H")
_QUESTION_TAIL = struct.Struct(">HH")  # qtype, qclass
_RECORD_TAIL = struct.Struct(">HHIH")  # type, class, ttl, rdlength

FLAG_QR = 0x8000
OPCODE_MASK = 0x7800
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_CD = 0x0010
RCODE_MASK = 0x000F
TYPE_OPT = 41
MAX_NAME_WIRE = 255
MIN_UDP_PAYLOAD = 512


class Rcode(enum.IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    REFUSED = 5


class DnsMessageError(ValueError):
    """A DNS message that does not parse; the text says what was wrong."""


class UpstreamError(Exception):
    """No nameserver answered: each refused, failed or dropped the query."""


class _DroppedError(UpstreamError):
    """The connection a query was on went away before its reply came."""


# --- messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    ident: int
    flags: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int


@dataclass(frozen=True)
class Question:
    name: str  # presentation form: labels joined by dots, "." for the root
    qtype: int
    qclass: int

    def key(self) -> tuple[str, int, int]:
        """What identifies the question, names compared case-insensitively (RFC 4343)."""
        return self.name.lower(), self.qtype, self.qclass


def parse_header(message: bytes) -> Header:
    if len(message) < HEADER_SIZE:
        raise DnsMessageError(f"{len(message)} bytes is shorter than a DNS header")
    return Header(*HEADER.unpack_from(message))


def check_query(message: bytes) -> Header:
    """The header of a message we may answer: long enough, and not itself a response."""
    header = parse_header(message)
    if header.flags & FLAG_QR:
        raise DnsMessageError("a response where a query was expected")
    return header


def query_id(message: bytes) -> int:
    return parse_header(message).ident


def with_id(message: bytes, ident: int) -> bytes:
    return _U16.pack(ident) + message[2:]


def _label_text(byte: int) -> str:
    if byte in b".\\":
        return "\\" + chr(byte)
    return chr(byte) if 0x21 <= byte <= 0x7E else f"\\{byte:03d}"


_LABEL_TEXT = tuple(_label_text(byte) for byte in range(256))


def _byte_at(message: bytes, offset: int) -> int:
    if offset >= len(message):
        raise DnsMessageError("name runs past the end of the message")
    return message[offset]


def read_name(message: bytes, offset: int) -> tuple[str, int]:
    """The name at offset in presentation form, and the offset just past it.

    Each compression pointer must point before the name part that holds it, so
    pointer targets strictly decrease and no message, however crafted, loops.
    """
    labels: list[str] = []
    wire = 1  # the root label
    end = -1  # where the name ends in place, set at the first pointer
    pos = start = offset
    while (length := _byte_at(message, pos)) != 0:
        if length & 0xC0 == 0xC0:
            target = (length & 0x3F) << 8 | _byte_at(message, pos + 1)
            if target >= start:
                raise DnsMessageError("compression pointer does not point backwards")
            end = pos + 2 if end < 0 else end
            pos = start = target
            continue
        if length & 0xC0:
            raise DnsMessageError(f"unknown label type {length >> 6}")
        wire += length + 1
        if wire > MAX_NAME_WIRE or pos + length >= len(message):
            raise DnsMessageError("name too long or cut short")
        labels.append("".join(_LABEL_TEXT[b] for b in message[pos + 1 : pos + 1 + length]))
        pos += length + 1
    return ".".join(labels) or ".", (pos + 1 if end < 0 else end)


def read_questions(message: bytes) -> tuple[list[Question], int]:
    """The question section and the offset just past it."""
    header = parse_header(message)
    pos = HEADER_SIZE
    questions = []
    for _ in range(header.qdcount):
        name, pos = read_name(message, pos)
        if pos + _QUESTION_TAIL.size > len(message):
            raise DnsMessageError("question cut short")
        questions.append(Question(name, *_QUESTION_TAIL.unpack_from(message, pos)))
        pos += _QUESTION_TAIL.size
    return questions, pos


def question_keys(message: bytes) -> tuple[tuple[str, int, int], ...]:
    return tuple(question.key() for question in read_questions(message)[0])


def _edns_payload_size(message: bytes) -> int | None:
    """The UDP payload size of the query's OPT record (RFC 6891 6.1.2), if it has one."""
    header = parse_header(message)
    _, pos = read_questions(message)
    additional_from = header.ancount + header.nscount
    for index in range(additional_from + header.arcount):
        _, pos = read_name(message, pos)
        if pos + _RECORD_TAIL.size > len(message):
            raise DnsMessageError("record cut short")
        rtype, rclass, _ttl, rdlength = _RECORD_TAIL.unpack_from(message, pos)
        if rtype == TYPE_OPT and index >= additional_from:
            return int(rclass)
        pos += _RECORD_TAIL.size + rdlength
    return None


def udp_payload_limit(query: bytes) -> int:
    """How large a UDP reply the client takes: its EDNS0 size, else 512 (RFC 1035 4.2.1)."""
    try:
        size = _edns_payload_size(query)
    except DnsMessageError:
        size = None
    return MIN_UDP_PAYLOAD if size is None else min(max(size, MIN_UDP_PAYLOAD), UDP_MAX_PAYLOAD)


def _questions_only(message: bytes, ident: int, flags: int) -> bytes:
    """A header with these id and flags, then the message's question section if it parses."""
    try:
        questions, end = read_questions(message)
    except DnsMessageError:
        return HEADER.pack(ident, flags, 0, 0, 0, 0)
    return HEADER.pack(ident, flags, len(questions), 0, 0, 0) + message[HEADER_SIZE:end]


def error_response(query: bytes, rcode: Rcode) -> bytes:
    """A reply carrying only rcode: the query's id, opcode, RD, CD and question; QR and RA."""
    header = parse_header(query)
    kept = header.flags & (OPCODE_MASK | FLAG_RD | FLAG_CD)
    return _questions_only(query, header.ident, FLAG_QR | FLAG_RA | kept | rcode)


def truncate(response: bytes, limit: int) -> bytes:
    """The response if it fits in limit bytes, else its header and question with TC set."""
    if len(response) <= limit:
        return response
    header = parse_header(response)
    flags = header.flags | FLAG_TC
    short = _questions_only(response, header.ident, flags)
    return short if len(short) <= limit else HEADER.pack(header.ident, flags, 0, 0, 0, 0)


def frame(message: bytes) -> bytes:
    """The message with its two-byte length prefix for TCP (RFC 1035 4.2.2)."""
    if len(message) > 0xFFFF:
        raise DnsMessageError(f"{len(message)} bytes is too long for DNS over TCP")
    return _U16.pack(len(message)) + message


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """One length-prefixed message, or None at end of stream between messages."""
    try:
        prefix = await reader.readexactly(_U16.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    return await reader.readexactly(_U16.unpack(prefix)[0])


# --- resolv.conf and nameserver addresses ----------------------------------------------


def parse_resolv_conf(text: str) -> list[str]:
    """The nameserver addresses of a resolv.conf, in order, without duplicates.

    Other lines and addresses that do not parse are ignored, as the C library does.
    IPv6 link-local addresses are left out: they need a zone (`fe80::1%eth0`) that
    means nothing to another host or to a firewall rule. IPv4-mapped IPv6 addresses
    become IPv4. Zones on other addresses are dropped.
    """
    found: list[str] = []
    for line in text.splitlines():
        address = _nameserver_line(line)
        if address is not None and address not in found:
            found.append(address)
    return found


def _nameserver_line(line: str) -> str | None:
    fields = line.split()
    if len(fields) < 2 or fields[0] != "nameserver":
        return None
    try:
        ip = ipaddress.ip_address(fields[1].split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast or (ip.version == 6 and ip.is_link_local):
        return None
    return str(ip)


def parse_nameserver(text: str) -> tuple[str, int]:
    """`ADDRESS` or `ADDRESS@PORT` (sshuttle's --to-ns form) as (address, port)."""
    address, at, port_text = text.partition("@")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"nameserver {text!r} is not an IP address") from None
    if not at:
        return str(ip), DNS_PORT
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) <= 0xFFFF):
        raise ValueError(f"nameserver {text!r} has a bad port")
    return str(ip), int(port_text)


# --- upstreams -------------------------------------------------------------------------


class Upstream(Protocol):
    """Where queries go. query() returns the reply with the query's own id, before
    deadline (event-loop time), or raises UpstreamError or TimeoutError."""

    async def query(self, message: bytes, deadline: float) -> bytes: ...

    def close(self) -> None: ...


@dataclass
class _Pending:
    waiter: asyncio.Future[bytes]
    questions: tuple[tuple[str, int, int], ...]


def _describe(exc: BaseException) -> str:
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
            reason = f"lost: {_describe(exc)}"
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
            raise UpstreamError(f"cannot reach {self._label(index)}: {_describe(exc)}") from exc
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
            log.debug("nameserver %s failed again: %s", self._label(index), _describe(exc))
            return
        self._failing.add(index)
        log.warning("nameserver %s failed: %s", self._label(index), _describe(exc))

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


# --- the forwarder ---------------------------------------------------------------------


@dataclass
class DnsStats:
    """Counters; every query ends as exactly one of answered, failed or timeouts.

    cache_hits and hosts are answers given here (counted in answered too); tunnel,
    local and peer say where the others went.
    """

    queries: int = 0  # well-formed queries taken (not the ones dropped as garbage)
    answered: int = 0  # replies from a nameserver, the cache or the remote's hosts
    failed: int = 0  # SERVFAIL, FORMERR or REFUSED built here: bad question, overload, ...
    timeouts: int = 0  # SERVFAIL built here because no reply came in time
    cache_hits: int = 0  # answered from the cache
    hosts: int = 0  # answered from the remote's /etc/hosts
    tunnel: int = 0  # sent to the remote's resolver through the tunnel
    local: int = 0  # sent to this machine's original resolver (split DNS)
    peer: int = 0  # handed to another profile whose names they are


class Routes(Protocol):
    """Which names go through this forwarder's tunnel (dnsroute.SplitRoutes)."""

    def claims(self, name: str) -> bool: ...


class Cache(Protocol):
    """A reply cache (dnscache.DnsCache)."""

    def get(self, query: bytes) -> bytes | None: ...

    def put(self, query: bytes, reply: bytes) -> bool: ...

    def clear(self) -> None: ...


class Hosts(Protocol):
    """Names answered here without asking anyone (dnsroute.HostsTable)."""

    def answer(self, query: bytes, questions: Sequence[Question]) -> bytes | None: ...


class DnsPeers:
    """The forwarders of one process whose DNS capture share one firewall table.

    Without systemd-resolved every split profile catches the same resolvers'
    port 53, and the first capture chain wins: the forwarder that gets a query
    for another profile's names hands it to that profile's forwarder here.
    """

    def __init__(self) -> None:
        self._members: dict[str, DnsForwarder] = {}

    def add(self, name: str, forwarder: DnsForwarder) -> None:
        self._members[name] = forwarder

    def remove(self, name: str, forwarder: DnsForwarder) -> None:
        if self._members.get(name) is forwarder:
            del self._members[name]

    def claimant(self, qname: str, asking: DnsForwarder) -> DnsForwarder | None:
        return next(
            (
                f
                for f in self._members.values()
                if f is not asking and f.routes is not None and f.routes.claims(qname)
            ),
            None,
        )


class DnsForwarder:
    """Answers queries: always a reply, within `timeout` seconds.

    Where a query goes (`_route`): names of the remote's hosts are answered here,
    then the cache is asked; names the routes claim (all of them when there are
    no routes: mode `all`) go through the tunnel, names another profile claims go
    to that profile's forwarder, and the rest to the local upstream, the
    machine's original resolvers. Without a local upstream they are REFUSED.
    """

    def __init__(
        self,
        opener: Opener,
        nameservers: Sequence[str],
        *,
        timeout: float = DNS_TIMEOUT,
        max_outstanding: int = MAX_OUTSTANDING,
        routes: Routes | None = None,
        local: Upstream | None = None,
        cache: Cache | None = None,
        peers: DnsPeers | None = None,
    ) -> None:
        self.timeout = timeout
        self.stats = DnsStats()
        self.routes = routes
        self.hosts: Hosts | None = None
        self.cache = cache
        self._upstream: Upstream = TcpPipelinedUpstream(
            opener, nameservers, connect_timeout=timeout
        )
        self._local = local
        self._peers = peers
        self._max_outstanding = max_outstanding
        self._outstanding = 0

    def set_routes(self, routes: Routes | None, hosts: Hosts | None = None) -> None:
        """New names for the tunnel (auto_nets, remote_hosts learnt on a reconnect)."""
        self.routes = routes
        self.hosts = hosts
        if self.cache is not None:  # an answer may now belong to the other side
            self.cache.clear()

    async def resolve(self, query: bytes) -> bytes:
        """The reply to query, or SERVFAIL/FORMERR/REFUSED built here; never raises for
        network trouble. Raises DnsMessageError for what cannot be answered at all
        (shorter than a header, or a response): drop those."""
        return await self._resolve(query, consult_peers=True)

    async def resolve_for_peer(self, query: bytes) -> bytes:
        """A query another profile's forwarder caught for our names."""
        return await self._resolve(query, consult_peers=False)

    async def _resolve(self, query: bytes, consult_peers: bool) -> bytes:
        check_query(query)
        self.stats.queries += 1
        try:
            questions, _ = read_questions(query)
        except DnsMessageError as exc:
            return self._fail(query, Rcode.FORMERR, f"malformed query: {exc}")
        known = self._known(query, questions)
        if known is not None:
            self.stats.answered += 1
            return known
        if self._outstanding >= self._max_outstanding:
            return self._fail(query, Rcode.SERVFAIL, "too many queries in flight")
        self._outstanding += 1
        try:
            return await self._dispatch(query, self._route(questions, consult_peers))
        finally:
            self._outstanding -= 1

    def _known(self, query: bytes, questions: list[Question]) -> bytes | None:
        """An answer given without asking anyone: the remote's hosts, then the cache."""
        if self.hosts is not None and (reply := self.hosts.answer(query, questions)):
            self.stats.hosts += 1
            return reply
        if self.cache is not None and (reply := self.cache.get(query)):
            self.stats.cache_hits += 1
            return reply
        return None

    def _route(
        self, questions: list[Question], consult_peers: bool
    ) -> Upstream | DnsForwarder | None:
        """Where a query goes: our tunnel, a peer forwarder, the local upstream or nowhere."""
        name = questions[0].name if questions else "."
        if self.routes is None or self.routes.claims(name):
            self.stats.tunnel += 1
            return self._upstream
        peer = self._peers.claimant(name, self) if consult_peers and self._peers else None
        if peer is not None:
            self.stats.peer += 1
            return peer
        if self._local is not None:
            self.stats.local += 1
        return self._local

    async def _dispatch(self, query: bytes, target: Upstream | DnsForwarder | None) -> bytes:
        if target is None:
            return self._fail(query, Rcode.REFUSED, "not a name this profile answers")
        if isinstance(target, DnsForwarder):
            reply = await target.resolve_for_peer(query)
            failed = parse_header(reply).flags & RCODE_MASK == Rcode.SERVFAIL
            return self._fail(query, Rcode.SERVFAIL, "peer failed") if failed else self._ok(reply)
        reply = await self._forward(query, target)
        if self.cache is not None and parse_header(reply).flags & RCODE_MASK != Rcode.SERVFAIL:
            self.cache.put(query, reply)
        return reply

    def _ok(self, reply: bytes) -> bytes:
        self.stats.answered += 1
        return reply

    async def _forward(self, query: bytes, upstream: Upstream) -> bytes:
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                reply = await upstream.query(query, deadline)
        except TimeoutError:
            self.stats.timeouts += 1
            log.debug("DNS query %#06x timed out", query_id(query))
            return error_response(query, Rcode.SERVFAIL)
        except (UpstreamError, OSError) as exc:
            return self._fail(query, Rcode.SERVFAIL, _describe(exc))
        return self._ok(reply)

    def _fail(self, query: bytes, rcode: Rcode, why: str) -> bytes:
        self.stats.failed += 1
        log.debug("DNS query %#06x: %s: %s", query_id(query), rcode.name, why)
        return error_response(query, rcode)

    def close(self) -> None:
        self._upstream.close()
        if self._local is not None:
            self._local.close()
        if self.cache is not None:
            self.cache.clear()


# --- listeners -------------------------------------------------------------------------


class Resolver(Protocol):
    async def resolve(self, query: bytes) -> bytes: ...


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, listener: DnsListener) -> None:
        self._listener = listener
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self._transport is not None:
            self._listener._on_datagram(data, addr, self._transport)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS UDP listener: %s", exc)


class DnsListener:
    """UDP and TCP DNS listeners on the same port number on each address."""

    def __init__(self, resolver: Resolver, fault_log: Faults | None = None) -> None:
        self.port = 0
        self._resolver = resolver
        self.faults = fault_log if fault_log is not None else Faults()
        self._transports: list[asyncio.DatagramTransport] = []
        self._servers: list[asyncio.Server] = []
        self._udp_tasks: set[asyncio.Task[Any]] = set()
        self._tcp_tasks: set[asyncio.Task[Any]] = set()

    async def start(self, addresses: Sequence[str], port: int = 0) -> int:
        """Listen on every address (IPv6 skipped where the host has none) and return the
        port: port 0 picks one number free for UDP and TCP on all of them."""
        attempt = 1
        while True:
            try:
                await self._bind_all(addresses, port)
                return self.port
            except OSError as exc:
                self.close()
                if port or exc.errno != errno.EADDRINUSE or attempt >= PORT_ATTEMPTS:
                    raise
                attempt += 1
                log.debug("DNS port collision (%s), picking another", exc)

    async def _bind_all(self, addresses: Sequence[str], port: int) -> None:
        loop = asyncio.get_running_loop()
        for address in addresses:
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(address, port)
                )
            except OSError as exc:
                if ":" not in address or exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise
                log.warning("DNS: no IPv6 on this host, not listening on %s", address)
                continue
            self._transports.append(transport)
            port = int(transport.get_extra_info("sockname")[1])
            # asyncio's default backlog (100) lost connects in a burst of 300 (issue 19's
            # storm): the same queue as the TCP listeners'.
            self._servers.append(
                await asyncio.start_server(
                    self._serve_tcp, address, port, backlog=const.LISTEN_BACKLOG
                )
            )
        if not self._transports:
            raise OSError(errno.EADDRNOTAVAIL, f"cannot listen for DNS on {', '.join(addresses)}")
        self.port = port

    def close(self) -> None:
        for transport in self._transports:
            transport.close()
        for server in self._servers:
            server.close()
        for task in (*self._udp_tasks, *self._tcp_tasks):
            task.cancel()
        self._transports.clear()
        self._servers.clear()

    async def _answer(self, query: bytes) -> bytes | None:
        try:
            return await self._resolver.resolve(query)
        except DnsMessageError as exc:
            log.debug("dropped a DNS query: %s", exc)
        except Exception as exc:  # the boundary: one query, not the listener
            self.faults.record(faults.DNS, exc, "query")
        return None

    def _spawn(self, tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # UDP: one task per datagram, the reply sent back from the listening socket.

    def _on_datagram(
        self, query: bytes, addr: tuple[Any, ...], transport: asyncio.DatagramTransport
    ) -> None:
        if len(self._udp_tasks) >= UDP_MAX_PENDING:
            log.debug("DNS over UDP: too many queries in flight, dropped one")
            return
        self._spawn(self._udp_tasks, self._answer_udp(query, addr, transport))

    async def _answer_udp(
        self, query: bytes, addr: tuple[Any, ...], transport: asyncio.DatagramTransport
    ) -> None:
        response = await self._answer(query)
        if response is not None and not transport.is_closing():
            # Too long for the client: TC makes it ask again over TCP (RFC 7766 5).
            transport.sendto(truncate(response, udp_payload_limit(query)), addr)

    # TCP: queries pipelined per client, answered in any order, bounded in number.

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tcp_tasks.add(task)
        slots = asyncio.Semaphore(TCP_CLIENT_PIPELINE)
        answers: set[asyncio.Task[Any]] = set()
        try:
            while (query := await self._next_tcp_query(reader)) is not None:
                await slots.acquire()
                self._spawn(answers, self._answer_tcp(query, writer, slots))
            if answers:
                await asyncio.wait(answers)
        except asyncio.CancelledError:
            pass  # close(); Python 3.11 would log a cancelled connection callback as an error
        except Exception as exc:  # the boundary: this client, not the listener
            self.faults.record(faults.DNS, exc, "DNS over TCP client")
            writer.transport.abort()
        finally:
            for answer in answers:
                answer.cancel()
            writer.close()
            self._tcp_tasks.discard(task)

    async def _next_tcp_query(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            async with asyncio.timeout(TCP_CLIENT_IDLE):
                return await read_frame(reader)
        except (OSError, EOFError) as exc:  # TimeoutError included: an idle client
            log.debug("DNS over TCP client gone: %s", _describe(exc))
            return None

    async def _answer_tcp(
        self, query: bytes, writer: asyncio.StreamWriter, slots: asyncio.Semaphore
    ) -> None:
        try:
            response = await self._answer(query)
            if response is not None and not writer.is_closing():
                writer.write(frame(response))
                async with asyncio.timeout(TCP_CLIENT_IDLE):
                    await writer.drain()
        except OSError as exc:  # TimeoutError included: a client that does not read
            log.debug("DNS over TCP client not writable: %s", _describe(exc))
            writer.transport.abort()
        finally:
            slots.release()
