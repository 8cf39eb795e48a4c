"""Plain DNS to this machine's original resolvers, for the names split DNS keeps local.

Split DNS without systemd-resolved catches every query to the resolvers of
/etc/resolv.conf; the names that are not the tunnel's are sent on from here to
those same resolvers. Each query leaves from a socket of its own carrying
SO_MARK `mark`, for which our capture chains return first, so it is not caught
a second time. UDP first (a fresh socket and a random id and source port per
query, replies checked against both), TCP when the answer comes back truncated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Sequence

from shuttled.dns.resolvconf import parse_nameserver
from shuttled.dns.upstream import UpstreamError
from shuttled.dns.wire import (
    FLAG_QR,
    FLAG_TC,
    DnsMessageError,
    frame,
    parse_header,
    question_keys,
    read_frame,
    with_id,
)

log = logging.getLogger(__name__)

MAX_REPLY = 65535


class LocalUpstream:
    """The original resolvers, in order, each given an equal share of the time left."""

    def __init__(self, nameservers: Sequence[str], *, mark: int | None) -> None:
        if not nameservers:
            raise ValueError("no local nameserver to forward DNS queries to")
        self._servers = [parse_nameserver(text) for text in nameservers]
        self._mark = mark
        self._preferred = 0
        self._closed = False

    async def query(self, message: bytes, deadline: float) -> bytes:
        if self._closed:
            raise UpstreamError("DNS forwarding is closed")
        loop = asyncio.get_running_loop()
        count = len(self._servers)
        failure: Exception = UpstreamError("no local nameserver tried")
        for step in range(count):
            index = (self._preferred + step) % count
            try:
                async with asyncio.timeout((deadline - loop.time()) / (count - step)):
                    reply = await self._ask(self._servers[index], message)
            except (UpstreamError, OSError) as exc:  # TimeoutError is an OSError
                log.debug("local nameserver %s: %s", self._servers[index][0], exc or "timeout")
                failure = exc
                continue
            self._preferred = index
            return reply
        raise failure

    async def _ask(self, server: tuple[str, int], message: bytes) -> bytes:
        reply = await self._udp(server, message)
        if parse_header(reply).flags & FLAG_TC:  # too long for UDP: ask again over TCP
            reply = await self._tcp(server, message)
        return reply

    def _socket(self, host: str, kind: socket.SocketKind) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, kind)
        try:
            sock.setblocking(False)
            if self._mark is not None and hasattr(socket, "SO_MARK"):  # Linux only
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self._mark)
        except OSError:
            sock.close()
            raise
        return sock

    async def _udp(self, server: tuple[str, int], message: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        ident = secrets.randbelow(0x10000)
        with self._socket(server[0], socket.SOCK_DGRAM) as sock:
            await loop.sock_connect(sock, server)
            await loop.sock_sendall(sock, with_id(message, ident))
            while True:  # a connected socket hears only the server; still, check each reply
                data = await loop.sock_recv(sock, MAX_REPLY)
                if _matches(data, ident, message):
                    return with_id(data, parse_header(message).ident)

    async def _tcp(self, server: tuple[str, int], message: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        ident = secrets.randbelow(0x10000)
        sock = self._socket(server[0], socket.SOCK_STREAM)
        try:
            await loop.sock_connect(sock, server)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(frame(with_id(message, ident)))
            while (data := await read_frame(reader)) is not None:
                if _matches(data, ident, message):
                    return with_id(data, parse_header(message).ident)
            raise UpstreamError(f"{server[0]} closed the connection without an answer")
        except asyncio.IncompleteReadError as exc:
            raise UpstreamError(f"{server[0]} closed the connection mid-answer") from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def close(self) -> None:
        self._closed = True


def _matches(data: bytes, ident: int, query: bytes) -> bool:
    """A reply to our query: a response, our id, and our question (when it has one)."""
    try:
        header = parse_header(data)
        keys = question_keys(data)
    except DnsMessageError:
        return False
    return (
        bool(header.flags & FLAG_QR)
        and header.ident == ident
        and (not keys or keys == question_keys(query))
    )
