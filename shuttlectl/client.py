"""A blocking client of the control socket: one connection per call, typed errors."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from shuttled.const import ADMIN_SOCKET_SUFFIX
from shuttled.control import protocol
from shuttled.control.protocol import (
    MAX_REPLY_BYTES,
    BusyError,
    Reply,
    Request,
    decode_reply,
    encode_request,
)
from shuttled.control.schema import Event, OtherEvent, check_event
from shuttled.errors import (
    NotRunningError,
    PermissionDeniedError,
    ProtocolError,
    ShuttledError,
    TimeoutError_,
)

CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 30.0
# A full listen queue (EAGAIN: another process floods the socket), a daemon between
# unlink and listen (ECONNREFUSED) and a "busy" answer all pass: retry this long,
# from RETRY_FIRST seconds apart doubling to RETRY_MAX. On a full queue connect()
# itself waits (SO_SNDTIMEO): the kernel wakes it at each accept, where polling
# every few ms lost the race to processes that flood the socket with connects.
RETRY_FOR = 2.0
RETRY_FIRST = 0.01
RETRY_MAX = 0.2


class Client:
    """Talks to the daemon at `path`; every failure is a ShuttledError subclass.
    `admin=False`: always through the public socket, even where the administrators' door
    is open to us."""

    def __init__(self, path: Path, timeout: float = REPLY_TIMEOUT, admin: bool = True) -> None:
        self.path = path
        self.timeout = timeout
        self.admin = admin  # try the administrators' door first (see _connect_admin)
        self._ids = itertools.count(1)

    def call(
        self, verb: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> object:
        """Send one request and return its result, for schema.check (or raise the daemon's
        error)."""
        with self._session(verb, args, timeout or self.timeout) as (_sock, _stream, reply):
            return reply.unwrap()

    def watch(self) -> Iterator[Event | OtherEvent]:
        """Events from the daemon until it goes away (or the caller stops iterating)."""
        with self._session("watch", None, self.timeout) as (sock, stream, reply):
            reply.unwrap()
            sock.settimeout(None)  # events come when they come
            while True:
                message = self._read(stream, "watching", None)
                if isinstance(message, Reply):
                    message.unwrap()  # an error ends the stream
                    continue
                yield check_event(message.event)

    @contextlib.contextmanager
    def _session(
        self, verb: str, args: Mapping[str, Any] | None, wait: float
    ) -> Iterator[tuple[socket.socket, IO[bytes], Reply]]:
        """A connection, the request sent and its first reply; "busy" retried."""
        delays = _backoff()
        while True:
            with self._connect() as sock, sock.makefile("rb") as stream:
                reply = self._exchange(sock, stream, verb, args, wait)
                if not _busy(reply) or not _sleep(delays):
                    yield sock, stream, reply
                    return

    def _exchange(
        self,
        sock: socket.socket,
        stream: IO[bytes],
        verb: str,
        args: Mapping[str, Any] | None,
        wait: float,
    ) -> Reply:
        request_id = next(self._ids)
        try:
            sock.sendall(encode_request(Request(request_id, verb, dict(args or {}))))
        except OSError as exc:
            # Turned away at accept (busy): the daemon wrote why, then hung up.
            return self._turned_away(stream, exc)
        sock.settimeout(wait)
        return self._reply(stream, request_id, wait)

    def _turned_away(self, stream: IO[bytes], exc: OSError) -> Reply:
        try:
            message = self._read(stream, "answering", CONNECT_TIMEOUT)
        except ShuttledError:
            message = None
        if isinstance(message, Reply) and not message.ok:
            return message
        raise ShuttledError(f"cannot send to the daemon: {exc.strerror or exc}") from None

    def _connect(self) -> socket.socket:
        admin = self._connect_admin() if self.admin else None
        return admin or self._connect_public()

    def _connect_admin(self) -> socket.socket | None:
        """Root and group shuttle use the administrators' door when they can: the
        same daemon and checks, but a queue no unprivileged flood can fill."""
        admin = self.path.with_name(f"{self.path.stem}{ADMIN_SOCKET_SUFFIX}{self.path.suffix}")
        if not os.access(admin, os.W_OK):
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(str(admin))
        except OSError:
            sock.close()  # stale, or refused: the public socket it is
            return None
        return sock

    def _connect_public(self) -> socket.socket:
        delays = _backoff()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                _wait_in_connect(sock, RETRY_FOR)
                sock.connect(str(self.path))
                sock.settimeout(CONNECT_TIMEOUT)
            except (BlockingIOError, ConnectionRefusedError) as exc:
                sock.close()
                if not _sleep(delays):
                    raise self._connect_error(exc) from None
            except BaseException as exc:
                sock.close()
                raise self._connect_error(exc) from None
            else:
                return sock

    def _connect_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, FileNotFoundError):
            return NotRunningError(f"the shuttled daemon is not running (no socket at {self.path})")
        if isinstance(exc, ConnectionRefusedError):
            return NotRunningError(
                f"the shuttled daemon is not running (nothing listening on {self.path})"
            )
        if isinstance(exc, PermissionError):
            return PermissionDeniedError(f"cannot connect to {self.path}: permission denied")
        if isinstance(exc, TimeoutError | BlockingIOError):
            return TimeoutError_(f"the daemon did not accept a connection on {self.path}")
        if isinstance(exc, OSError):
            return ShuttledError(f"cannot connect to {self.path}: {exc.strerror or exc}")
        return exc

    def _reply(self, stream: IO[bytes], request_id: int, timeout: float) -> Reply:
        message = self._read(stream, "answering", timeout)
        if not isinstance(message, Reply) or message.id not in (request_id, None):
            raise ProtocolError("the daemon answered another request")
        return message

    def _read(self, stream: IO[bytes], doing: str, timeout: float | None) -> Reply | protocol.Event:
        try:
            line = stream.readline(MAX_REPLY_BYTES + 1)
        except TimeoutError:
            raise TimeoutError_(f"the daemon did not answer within {timeout or 0:g} s") from None
        except OSError as exc:
            raise ShuttledError(f"lost the daemon: {exc.strerror or exc}") from None
        if not line:
            raise ShuttledError(f"the daemon closed the connection instead of {doing}")
        return decode_reply(line)


def _busy(reply: Reply) -> bool:
    return not reply.ok and reply.error is not None and reply.error.code == BusyError.code


def _backoff() -> Iterator[float]:
    """Delays between attempts, RETRY_FOR seconds in all."""
    deadline = time.monotonic() + RETRY_FOR
    delay = RETRY_FIRST
    while (left := deadline - time.monotonic()) > 0:
        yield min(delay, left)
        delay = min(delay * 2, RETRY_MAX)


def _sleep(delays: Iterator[float]) -> bool:
    """Wait the next delay; False when the time to retry is over."""
    delay = next(delays, None)
    if delay is None:
        return False
    time.sleep(delay)
    return True


def _wait_in_connect(sock: socket.socket, seconds: float) -> None:
    """A blocking connect() that waits up to `seconds` for room in a full queue."""
    sock.settimeout(None)
    whole = int(seconds)
    with contextlib.suppress(OSError):  # then EAGAIN at once, and the retries
        sock.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_SNDTIMEO,
            struct.pack("ll", whole, int((seconds - whole) * 1e6)),
        )
