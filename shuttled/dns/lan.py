"""DNS for LAN hosts (router mode): their port-53 traffic answered through the tunnel.

TPROXY hands LAN DNS (to this host, or to any address: `lan_dns: all`) to
transparent listeners on 127.0.0.1/::1, so nothing has to listen on a LAN
address. Each query goes to the profile's resolver (the same DnsForwarder as
local DNS, so split DNS and its cache apply alike) and the answer goes back
FROM the address and port the host asked (transparent.send_from; over TCP the
accepted socket already has that address).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Coroutine
from typing import Any

from shuttled import const
from shuttled.dns.listeners import Resolver, TcpDnsClients, answer_or_drop
from shuttled.dns.wire import truncate, udp_payload_limit
from shuttled.tunnel.faults import Faults
from shuttled.tunnel.proxy import bind_listeners
from shuttled.tunnel.transparent import Address, recv_batch, recv_original_dst, send_from

log = logging.getLogger(__name__)

MAX_PENDING = 2048  # queries being answered over UDP; beyond that they are dropped
TCP_PIPELINE = 32  # queries in flight per TCP client
PORT_ATTEMPTS = 8


class LanDns:
    """Transparent UDP and TCP DNS listeners (one port) answering with `resolver`."""

    def __init__(
        self,
        resolver: Resolver,
        addresses: tuple[str, ...] = ("127.0.0.1", "::1"),
        fault_log: Faults | None = None,
    ) -> None:
        self.resolver = resolver
        self.faults = fault_log if fault_log is not None else Faults()
        self.addresses = addresses
        self.port = 0
        self.queries = 0
        self.dropped = 0
        self._udp: list[socket.socket] = []
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tcp = TcpDnsClients(
            self._resolve, self.faults, "LAN DNS over TCP client", TCP_PIPELINE
        )

    async def start(self) -> int:
        """Listen (UDP and TCP on one port number, 127.0.0.1 and ::1); the port."""
        for _attempt in range(PORT_ATTEMPTS):
            try:
                return await self._bind()
            except OSError as exc:
                self.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP DNS")

    async def _bind(self) -> int:
        loop = asyncio.get_running_loop()
        self._udp = bind_listeners(self.addresses, 0, socket.SOCK_DGRAM, transparent=True)
        self.port = self._udp[0].getsockname()[1]
        for sock in self._udp:
            recv_original_dst(sock)
            loop.add_reader(sock.fileno(), self._readable, sock)
        # TCP on the same port number: TPROXY rules name one port for both.
        for sock in bind_listeners(self.addresses, self.port, socket.SOCK_STREAM, transparent=True):
            sock.listen(const.LISTEN_BACKLOG)
            self._servers.append(
                await asyncio.start_server(self._tcp.serve, sock=sock, backlog=const.LISTEN_BACKLOG)
            )
        return self.port

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._udp:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
            sock.close()
        self._udp.clear()
        for server in self._servers:
            server.close()
        self._servers.clear()
        for task in self._tasks:
            task.cancel()
        self._tcp.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, query: bytes) -> bytes | None:
        self.queries += 1
        answer = await answer_or_drop(self.resolver, query, self.faults, "LAN query")
        if answer is None:
            self.dropped += 1
        return answer

    # --- UDP ------------------------------------------------------------------------

    def _readable(self, sock: socket.socket) -> None:
        itself = sock.getsockname()[:2]
        for query, src, dst in recv_batch(sock, 64):
            if dst is None or dst == itself or len(self._tasks) >= MAX_PENDING:
                self.dropped += 1
                continue
            self._spawn(self._answer_udp(query, src, dst))

    async def _answer_udp(self, query: bytes, src: Address, dst: Address) -> None:
        answer = await self._resolve(query)
        if answer is None:
            return
        try:
            # Too long for the client: TC makes it ask again over TCP (RFC 7766 5).
            send_from(dst, src, truncate(answer, udp_payload_limit(query)))
        except OSError as exc:
            self.dropped += 1
            log.debug("LAN DNS answer to %s:%d not sent: %s", *src, exc.strerror)
