"""DNS through the tunnel: the forwarder that answers every query the listeners take.

Queries the firewall redirected to our listeners (UDP and TCP, one port number on
every address) are answered by `DnsForwarder.resolve()`, which sends each one to
the remote's nameserver as DNS over TCP (RFC 1035 4.2.2 framing, RFC 7766
pipelining: many queries in flight on one connection, matched by message id)
through a direct-tcpip channel, or as DNS over UDP from the remote helper where
the nameserver will not take TCP (upstream.TunnelUpstream decides). `resolve()`
always answers: the nameserver's reply, or a SERVFAIL built here once the
timeout has passed (sshuttle hung for 30 s).

Split DNS: `DnsForwarder._route()` picks the upstream for a query by its
question name (routes: routing.SplitRoutes; the local upstream to the
machine's own resolvers: local.LocalUpstream); a TTL cache
(cache.DnsCache) and the remote's host names (routing.HostsTable) answer
before any upstream is asked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from shuttled.const import DNS_TIMEOUT
from shuttled.control.schema import NameserverRow
from shuttled.dns.datagram import DatagramMux
from shuttled.dns.upstream import Opener, TunnelUpstream, Upstream, UpstreamError, describe
from shuttled.dns.wire import (
    RCODE_MASK,
    DnsMessageError,
    Question,
    Rcode,
    check_query,
    error_response,
    parse_header,
    query_id,
    read_questions,
)

log = logging.getLogger(__name__)

MAX_OUTSTANDING = 1024  # queries in flight per forwarder; beyond that: SERVFAIL at once


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
    """Which names go through this forwarder's tunnel (routing.SplitRoutes)."""

    def claims(self, name: str) -> bool: ...


class Cache(Protocol):
    """A reply cache (cache.DnsCache)."""

    def get(self, query: bytes) -> bytes | None: ...

    def put(self, query: bytes, reply: bytes) -> bool: ...

    def clear(self) -> None: ...


class Hosts(Protocol):
    """Names answered here without asking anyone (routing.HostsTable)."""

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
        datagrams: DatagramMux | None = None,
    ) -> None:
        self.timeout = timeout
        self.stats = DnsStats()
        self.routes = routes
        self.hosts: Hosts | None = None
        self.cache = cache
        self._upstream = TunnelUpstream(
            opener, nameservers, connect_timeout=timeout, datagrams=datagrams
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

    def new_session(self) -> None:
        """The tunnel reconnected: learn each nameserver's transport again."""
        self._upstream.reset()

    def nameservers(self) -> list[NameserverRow]:
        return self._upstream.nameservers()

    def problem(self) -> str | None:
        """Why the remote's nameservers answer nothing, in one line; None while one does."""
        return self._upstream.problem()

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
            return self._fail(query, Rcode.SERVFAIL, describe(exc))
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
