"""The DNS listeners the firewall redirects queries to: UDP and TCP on one port number.

Every address of the listener shares one port number (the firewall rule names
one port); each query is answered by a `Resolver` (the forwarder), each TCP client
is served with RFC 7766 pipelining and idle limits."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, cast

from shuttled import const
from shuttled.dns.forwarder import MAX_OUTSTANDING
from shuttled.dns.upstream import describe
from shuttled.dns.wire import DnsMessageError, frame, read_frame, truncate, udp_payload_limit
from shuttled.tunnel import faults
from shuttled.tunnel.faults import Faults

log = logging.getLogger(__name__)

TCP_CLIENT_PIPELINE = 128  # queries in flight per TCP client before we stop reading it
TCP_CLIENT_IDLE = 10.0  # seconds a TCP client may stay silent or unread (RFC 7766 6.2.3)
UDP_MAX_PENDING = 2 * MAX_OUTSTANDING  # datagrams being answered; beyond that: dropped
PORT_ATTEMPTS = 8  # tries to find one port number free for every address and protocol


class Resolver(Protocol):
    async def resolve(self, query: bytes) -> bytes: ...


async def answer_or_drop(
    resolver: Resolver, query: bytes, fault_log: Faults, what: str
) -> bytes | None:
    """The resolver's answer, or None to send nothing: a query that does not parse is
    dropped, and a fault is counted (the boundary: one query, not the listener)."""
    try:
        return await resolver.resolve(query)
    except DnsMessageError as exc:
        log.debug("dropped a DNS %s: %s", what, exc)
    except Exception as exc:
        fault_log.record(faults.DNS, exc, what)
    return None


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
        self._tcp = TcpDnsClients(
            self._answer, self.faults, "DNS over TCP client", TCP_CLIENT_PIPELINE
        )

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
            # asyncio's default backlog (100) lost connects in a burst of 300 (a storm of
            # impatient clients): the same queue as the TCP listeners'.
            self._servers.append(
                await asyncio.start_server(
                    self._tcp.serve, address, port, backlog=const.LISTEN_BACKLOG
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
        for task in self._udp_tasks:
            task.cancel()
        self._tcp.close()
        self._transports.clear()
        self._servers.clear()

    async def _answer(self, query: bytes) -> bytes | None:
        return await answer_or_drop(self._resolver, query, self.faults, "query")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._udp_tasks.add(task)
        task.add_done_callback(self._udp_tasks.discard)

    # UDP: one task per datagram, the reply sent back from the listening socket.

    def _on_datagram(
        self, query: bytes, addr: tuple[Any, ...], transport: asyncio.DatagramTransport
    ) -> None:
        if len(self._udp_tasks) >= UDP_MAX_PENDING:
            log.debug("DNS over UDP: too many queries in flight, dropped one")
            return
        self._spawn(self._answer_udp(query, addr, transport))

    async def _answer_udp(
        self, query: bytes, addr: tuple[Any, ...], transport: asyncio.DatagramTransport
    ) -> None:
        response = await self._answer(query)
        if response is not None and not transport.is_closing():
            # Too long for the client: TC makes it ask again over TCP (RFC 7766 5).
            transport.sendto(truncate(response, udp_payload_limit(query)), addr)


Answer = Callable[[bytes], Awaitable[bytes | None]]


class TcpDnsClients:
    """The DNS-over-TCP clients of one listener (ours, or router mode's LAN DNS).

    Each client's queries are pipelined (RFC 7766): answered in any order, at most
    `pipeline` in flight before we stop reading it; a client silent or unread for
    TCP_CLIENT_IDLE is dropped. A fault ends that client, never the listener.
    """

    def __init__(self, answer: Answer, fault_log: Faults, what: str, pipeline: int) -> None:
        self._answer = answer
        self._faults = fault_log
        self._what = what
        self._pipeline = pipeline
        self._clients: set[asyncio.Task[Any]] = set()

    def close(self) -> None:
        """Drop every client (the listener is closing)."""
        for task in self._clients:
            task.cancel()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio.start_server's callback: serve one client until it goes."""
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        slots = asyncio.Semaphore(self._pipeline)
        answers: set[asyncio.Task[Any]] = set()
        try:
            while (query := await self._next_query(reader)) is not None:
                await slots.acquire()
                answer = asyncio.create_task(self._answer_one(query, writer, slots))
                answers.add(answer)
                answer.add_done_callback(answers.discard)
            if answers:
                await asyncio.wait(answers)
        except asyncio.CancelledError:
            pass  # close(); Python 3.11 would log a cancelled connection callback as an error
        except Exception as exc:  # the boundary: this client, not the listener
            self._faults.record(faults.DNS, exc, self._what)
            writer.transport.abort()
        finally:
            for answer in answers:
                answer.cancel()
            writer.close()
            self._clients.discard(task)

    async def _next_query(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            async with asyncio.timeout(TCP_CLIENT_IDLE):
                return await read_frame(reader)
        except (OSError, EOFError) as exc:  # TimeoutError included: an idle client
            log.debug("%s gone: %s", self._what, describe(exc))
            return None

    async def _answer_one(
        self, query: bytes, writer: asyncio.StreamWriter, slots: asyncio.Semaphore
    ) -> None:
        try:
            response = await self._answer(query)
            if response is not None and not writer.is_closing():
                writer.write(frame(response))
                async with asyncio.timeout(TCP_CLIENT_IDLE):
                    await writer.drain()
        except OSError as exc:  # TimeoutError included: a client that does not read
            log.debug("%s not writable: %s", self._what, describe(exc))
            writer.transport.abort()
        finally:
            slots.release()
