"""A blocking client of the control socket: one connection per call, typed errors."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from shuttled.control.protocol import (
    MAX_REPLY_BYTES,
    Event,
    Reply,
    Request,
    decode_reply,
    encode_request,
)
from shuttled.errors import (
    NotRunningError,
    PermissionDeniedError,
    ProtocolError,
    ShuttledError,
    TimeoutError_,
)

CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 30.0


class Client:
    """Talks to the daemon at `path`; every failure is a ShuttledError subclass."""

    def __init__(self, path: Path, timeout: float = REPLY_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)

    def call(self, verb: str, args: Mapping[str, Any] | None = None, *,
             timeout: float | None = None) -> Any:
        """Send one request and return its result (or raise the daemon's error)."""
        with self._connect() as sock, sock.makefile("rb") as stream:
            request_id = self._send(sock, verb, args)
            wait = timeout or self.timeout
            sock.settimeout(wait)
            return self._reply(stream, request_id, wait).unwrap()

    def watch(self) -> Iterator[dict[str, Any]]:
        """Events from the daemon until it goes away (or the caller stops iterating)."""
        with self._connect() as sock, sock.makefile("rb") as stream:
            request_id = self._send(sock, "watch", None)
            sock.settimeout(self.timeout)
            self._reply(stream, request_id, self.timeout).unwrap()
            sock.settimeout(None)  # events come when they come
            while True:
                message = self._read(stream, "watching", None)
                if isinstance(message, Reply):
                    message.unwrap()  # an error ends the stream
                    continue
                yield dict(message.event)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(str(self.path))
        except BaseException as exc:
            sock.close()
            raise self._connect_error(exc) from None
        return sock

    def _connect_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, FileNotFoundError):
            return NotRunningError(f"the shuttled daemon is not running "
                                   f"(no socket at {self.path})")
        if isinstance(exc, ConnectionRefusedError):
            return NotRunningError(f"the shuttled daemon is not running "
                                   f"(nothing listening on {self.path})")
        if isinstance(exc, PermissionError):
            return PermissionDeniedError(f"cannot connect to {self.path}: permission denied")
        if isinstance(exc, TimeoutError):
            return TimeoutError_(f"the daemon did not accept a connection on {self.path}")
        if isinstance(exc, OSError):
            return ShuttledError(f"cannot connect to {self.path}: {exc.strerror or exc}")
        return exc

    def _send(self, sock: socket.socket, verb: str, args: Mapping[str, Any] | None) -> int:
        request_id = next(self._ids)
        try:
            sock.sendall(encode_request(Request(request_id, verb, dict(args or {}))))
        except OSError as exc:
            raise ShuttledError(f"cannot send to the daemon: {exc.strerror or exc}") from None
        return request_id

    def _reply(self, stream: IO[bytes], request_id: int, timeout: float) -> Reply:
        message = self._read(stream, "answering", timeout)
        if not isinstance(message, Reply) or message.id not in (request_id, None):
            raise ProtocolError("the daemon answered another request")
        return message

    def _read(self, stream: IO[bytes], doing: str, timeout: float | None) -> Reply | Event:
        try:
            line = stream.readline(MAX_REPLY_BYTES + 1)
        except TimeoutError:
            raise TimeoutError_(f"the daemon did not answer within {timeout or 0:g} s") from None
        except OSError as exc:
            raise ShuttledError(f"lost the daemon: {exc.strerror or exc}") from None
        if not line:
            raise ShuttledError(f"the daemon closed the connection instead of {doing}")
        return decode_reply(line)
