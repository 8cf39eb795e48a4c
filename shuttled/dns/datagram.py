"""DNS over UDP sent from the remote, through the helper's udp@shuttled channels.

The fallback for a nameserver that will not take DNS over TCP (many small
resolvers, appliances and firewalls close TCP 53): the query goes to the remote
helper (shuttled.remote.helper) framed with its destination
(sshmsg.pack_datagram), the helper sends it from an ordinary UDP socket there,
and the reply comes back framed with its source. One channel per address
family (the helper's socket has one), shared by every nameserver and query;
opened on first use, opened again after the helper ends it (idle, or lost).

A reply is matched by its source, its id and its question: ids are random on
this path (RFC 5452), since anyone on the remote's network can send to the
helper's socket. Each query is sent again every DNS_UDP_RETRANSMIT seconds
until its deadline, at most DNS_UDP_SENDS times. Bounded: at most
DNS_UDP_MAX_PENDING queries in flight; a datagram the channel's window cannot
take now is dropped and counted (the next send covers it), never queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shuttled import const
from shuttled.dns.wire import (
    FLAG_QR,
    DnsMessageError,
    parse_header,
    query_id,
    question_keys,
    with_edns,
    with_id,
    without_opt,
)
from shuttled.errors import ShuttledError
from shuttled.tunnel import faults, sshmsg
from shuttled.tunnel.channels import Channel, ChannelMux
from shuttled.tunnel.endpoints import BaseEndpoint
from shuttled.tunnel.udp import receive_datagram

log = logging.getLogger(__name__)

# The mux that carries udp@shuttled channels (SshSession.udp_mux): raises when the
# helper cannot start, with why.
DatagramMux = Callable[[], Awaitable[ChannelMux]]

RETRANSMIT = 0.5  # seconds between sends of one query
SENDS = 4  # sends of one query at most
MAX_PENDING = 1024  # queries in flight on this path
GARBAGE_LOG_LIMIT = 10  # bad replies logged per channel, then only counted

Key = tuple[str, int, int]  # (nameserver address, port, query id on the wire)


class DatagramError(Exception):
    """The query could not be sent or its channel went away."""


class HelperUnavailableError(DatagramError):
    """No helper to send from (no python on the remote, helper refused): says why."""


@dataclass
class _Pending:
    waiter: asyncio.Future[bytes]
    questions: tuple[tuple[str, int, int], ...]


@dataclass
class DatagramStats:
    sent: int = 0  # datagrams handed to the channel, retransmissions included
    dropped: int = 0  # datagrams the channel's window could not take
    garbage: int = 0  # replies that do not parse or carry the wrong question
    late: int = 0  # replies to no query in flight: a retransmission's second answer


def canonical(host: str) -> str:
    """One spelling per address, as the helper reports a source (recvfrom)."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


class _DnsChannel(BaseEndpoint):
    """One udp@shuttled channel (one address family): the Endpoint of its channel."""

    fault_kind = faults.DNS

    def __init__(self, owner: DatagramUpstream, family: str) -> None:
        super().__init__()
        self.owner = owner
        self.family = family
        self.closed = False
        self._garbage = 0

    def on_open(self, channel: Channel) -> None:
        super().on_open(channel)
        if self.closed:
            channel.close()

    def on_open_failed(self, reason: int, description: str) -> None:
        super().on_open_failed(reason, description)
        self.close()

    def on_data(self, data: memoryview) -> None:
        try:
            host, port, payload = receive_datagram(self.channel, data)
            self.owner.deliver((canonical(host), port), payload)
        except (sshmsg.WireError, DnsMessageError) as exc:
            self.owner.stats.garbage += 1
            self._garbage += 1
            if self._garbage <= GARBAGE_LOG_LIMIT:
                log.warning("dropped a bad DNS reply over UDP: %s", exc)

    def on_eof(self) -> None:
        pass

    def on_close(self) -> None:
        self.close()

    def abort_connection(self) -> None:
        super().abort_connection()
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(DatagramError("UDP channel closed"))
        self.opened.add_done_callback(lambda f: None if f.cancelled() else f.exception())
        if self.channel is not None and not self.channel.close_sent:
            self.channel.close()
        self.owner.forget(self)


def _family(host: str) -> str:
    return "inet6" if ":" in host else "inet"


class DatagramUpstream:
    """Queries over UDP from the remote, to any nameserver: `ask()` one of them."""

    def __init__(self, mux: DatagramMux, *, max_pending: int = MAX_PENDING) -> None:
        self._mux = mux
        self._max_pending = max_pending
        self._channels: dict[str, _DnsChannel] = {}
        self._pending: dict[Key, _Pending] = {}
        self._opening: dict[str, asyncio.Future[_DnsChannel]] = {}
        self.stats = DatagramStats()

    async def ask(self, host: str, port: int, message: bytes, deadline: float) -> bytes:
        """The reply to `message` (a validated query) from host:port, its id restored.

        Raises HelperUnavailableError, DatagramError, or TimeoutError at `deadline`."""
        host = canonical(host)
        channel = await self._channel(host)
        if len(self._pending) >= self._max_pending:  # counted once the channel is there
            raise DatagramError("too many DNS queries over UDP in flight")
        key = self._allocate((host, port))
        waiter = asyncio.get_running_loop().create_future()
        self._pending[key] = _Pending(waiter, question_keys(message))
        sent = with_edns(message)
        datagram = sshmsg.pack_datagram(host, port, with_id(sent, key[2]))
        try:
            reply = await self._send_until(channel, datagram, waiter, deadline)
        finally:
            del self._pending[key]
        # The client asked without EDNS: it gets no OPT record it did not ask for.
        if sent is not message:
            with contextlib.suppress(DnsMessageError):  # records that do not parse: as is
                reply = without_opt(reply)
        return with_id(reply, query_id(message))

    async def _send_until(
        self, channel: _DnsChannel, datagram: bytes, waiter: asyncio.Future[bytes], deadline: float
    ) -> bytes:
        loop = asyncio.get_running_loop()
        for _ in range(SENDS):
            if channel.closed or channel.channel is None:
                raise DatagramError("UDP channel closed")
            if channel.channel.send_whole(datagram):
                self.stats.sent += 1
            else:
                self.stats.dropped += 1
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.wait([waiter], timeout=min(RETRANSMIT, left))
            if waiter.done():
                return waiter.result()
        await asyncio.wait([waiter], timeout=max(0.0, deadline - loop.time()))
        if waiter.done():
            return waiter.result()
        raise TimeoutError

    def prepare(self, host: str) -> None:
        """Open the channel to `host`'s family now (starting the helper if need be), for
        queries to come; its failure is theirs to report."""
        family = _family(host)
        if family not in self._channels:
            self._opening_of(family)

    def _allocate(self, peer: tuple[str, int]) -> Key:
        for _ in range(64):
            key = (*peer, secrets.randbelow(0x10000))
            if key not in self._pending:
                return key
        raise DatagramError("no free query id for UDP")

    async def _channel(self, host: str) -> _DnsChannel:
        family = _family(host)
        channel = self._channels.get(family)
        if channel is None:
            channel = await asyncio.shield(self._opening_of(family))
        try:
            await asyncio.shield(channel.opened)
        except (ShuttledError, OSError) as exc:  # refused by the helper, or aborted
            raise DatagramError(f"no UDP channel: {exc}") from exc
        return channel

    def _opening_of(self, family: str) -> asyncio.Future[_DnsChannel]:
        """The one open of a family's channel in progress: every query waits on it."""
        opening = self._opening.get(family)
        if opening is None:
            opening = asyncio.ensure_future(self._open(family))
            self._opening[family] = opening
            opening.add_done_callback(functools.partial(self._opened, family))
        return opening

    def _opened(self, family: str, opening: asyncio.Future[_DnsChannel]) -> None:
        if self._opening.get(family) is opening:
            del self._opening[family]
        if not opening.cancelled():
            opening.exception()  # retrieved: the queries that wait for it report it

    async def _open(self, family: str) -> _DnsChannel:
        try:
            mux = await self._mux()
        except Exception as exc:  # the session's: any failure means no helper
            raise HelperUnavailableError(str(exc) or type(exc).__name__) from exc
        channel = _DnsChannel(self, family)
        self._channels[family] = channel
        extra = sshmsg.sstring(family) + sshmsg.U32.pack(round(const.UDP_IDLE))
        try:
            mux.open(sshmsg.UDP_CHANNEL_TYPE, channel, extra)
        except Exception as exc:  # a mux that closed under us
            channel.close()
            raise DatagramError(f"cannot open a UDP channel: {exc}") from exc
        return channel

    def deliver(self, source: tuple[str, int], message: bytes) -> None:
        """A datagram from `source`: the reply to one of our queries, or dropped."""
        header = parse_header(message)
        if not header.flags & FLAG_QR:
            raise DnsMessageError("QR bit clear")
        pending = self._pending.get((*source, header.ident))
        if pending is None or pending.waiter.done():
            self.stats.late += 1  # normal after a retransmission: not worth a warning
            return
        questions = question_keys(message)
        if questions and questions != pending.questions:
            raise DnsMessageError(f"question of id {header.ident} does not match the query")
        pending.waiter.set_result(message)

    def forget(self, channel: _DnsChannel) -> None:
        if self._channels.get(channel.family) is channel:
            del self._channels[channel.family]
        for (host, _, _), pending in self._pending.items():
            if _family(host) == channel.family and not pending.waiter.done():
                pending.waiter.set_exception(DatagramError("UDP channel closed"))

    def close(self) -> None:
        for opening in list(self._opening.values()):
            opening.cancel()
        for channel in list(self._channels.values()):
            channel.close()
