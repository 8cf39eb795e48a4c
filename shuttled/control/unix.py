"""The control socket: newline-delimited JSON over a Unix stream socket.

Anyone may connect (mode 0666); what a caller may do is decided per request
from the peer's kernel credentials (SO_PEERCRED, SO_PEERGROUPS). Every
failure a client can provoke -- garbage, oversized or slow requests, unknown
verbs, denied calls -- gets an error reply; none of them reaches the daemon.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shuttled import const
from shuttled.control import api
from shuttled.control.protocol import (
    MAX_REQUEST_BYTES,
    BadRequestError,
    BusyError,
    decode_request,
    encode_event,
    error_reply,
    ok_reply,
)
from shuttled.errors import ShuttledError

log = logging.getLogger(__name__)

MAX_CLIENTS = 64
# One unprivileged account may hold this many connections (watch streams never
# time out): a flood from one user can neither exhaust the daemon nor lock root out.
MAX_CLIENTS_PER_UID = 8
IDLE_TIMEOUT = 10.0  # seconds without a complete request line
WRITE_TIMEOUT = 10.0  # seconds a client may take to read what we wrote
# Not exported by every Python: the peer's supplementary groups at connect time.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_GROUPS_BUFLEN = 1024  # Python's getsockopt maximum: 256 groups; more -> /proc

Credentials = Callable[[Any], api.Caller]


def peer_credentials(sock: Any) -> api.Caller:
    """The connecting process's uid, gid, pid and supplementary groups."""
    if not hasattr(socket, "SO_PEERCRED"):  # macOS, FreeBSD: LOCAL_PEERCRED
        from shuttled.control.peercred import bsd_peer_credentials

        return bsd_peer_credentials(sock)
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return api.Caller(uid, gid, pid, _peer_groups(sock, pid, uid, gid))


def _peer_groups(sock: Any, pid: int, uid: int, gid: int) -> tuple[int, ...]:
    # SO_PEERGROUPS is what the kernel recorded at connect(), like SO_PEERCRED;
    # /proc is read later and only trusted while the process still has the uid.
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_BUFLEN)
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    except OSError:
        pass
    groups = proc_groups(pid, uid)
    return groups if groups is not None else (gid,)


def proc_groups(pid: int, uid: int, proc: Path = Path("/proc")) -> tuple[int, ...] | None:
    """The Groups: line of /proc/PID/status, if that process still runs as `uid`."""
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return None
    fields = dict(line.partition(":")[::2] for line in text.splitlines())
    uids = fields.get("Uid", "").split()
    if len(uids) < 2 or uids[1] != str(uid):  # effective uid changed: pid reused or setuid
        return None
    try:
        return tuple(int(g) for g in fields.get("Groups", "").split())
    except ValueError:
        return None


class _ClientGone(Exception):
    """The client stopped reading or went away; just drop it."""


class UnixControlServer:
    """Serves the verb table of `api` to clients of one Unix socket.

    Like asyncio.Server: `await start(path)`, then `close()` (stop accepting, hang
    up on every client, remove the socket) and optionally `await wait_closed()`.
    """

    def __init__(self, core: api.Core, *, credentials: Credentials = peer_credentials,
                 max_clients: int = MAX_CLIENTS, max_per_uid: int = MAX_CLIENTS_PER_UID,
                 idle_timeout: float = IDLE_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT) -> None:
        self.core = core
        self.credentials = credentials
        self.max_clients = max_clients
        self.max_per_uid = max_per_uid
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.path: Path | None = None
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._clients: set[asyncio.Task[Any]] = set()
        self._per_uid: collections.Counter[int] = collections.Counter()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, path: Path = const.CONTROL_SOCKET) -> None:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _remove_stale(path)
        self._server = await asyncio.start_unix_server(self._on_client, path=str(path),
                                                       limit=MAX_REQUEST_BYTES)
        # Authorization is per request from peer credentials, so everyone may connect.
        os.chmod(path, 0o666)
        self.path, self._inode = path, path.stat().st_ino
        log.debug("control socket listening on %s", path)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        self._unlink()

    async def wait_closed(self) -> None:
        """Until every client handler has finished (after close())."""
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _unlink(self) -> None:
        # Only our own socket: a second daemon may have replaced it meanwhile.
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()
        self.path = None

    # --- one client --------------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # close() cancels us. Ending normally keeps asyncio's stream callback
            # from logging the cancellation as an error; the task is ours alone.
            log.debug("control client cancelled")
        except (_ClientGone, ConnectionError, TimeoutError) as exc:
            log.debug("control client dropped: %s", exc or type(exc).__name__)
        except Exception:  # a bug; the daemon must carry on regardless
            log.exception("control client failed")
        finally:
            self._clients.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            caller = self.credentials(writer.get_extra_info("socket"))
        except OSError as exc:
            await self._send(writer, error_reply(None, ShuttledError(
                f"cannot read peer credentials: {exc.strerror}")))
            return
        busy = self._over_limit(caller)
        if busy is not None:
            await self._send(writer, error_reply(None, busy))
            return
        self._per_uid[caller.uid] += 1
        try:
            while (line := await self._read_request(reader, writer)) is not None:
                if line.strip() and not await self._handle(line, caller, reader, writer):
                    return
        finally:
            self._per_uid[caller.uid] -= 1

    def _over_limit(self, caller: api.Caller) -> BusyError | None:
        """Limits apply to unprivileged callers only: an administrator is never
        turned away because others hold connections."""
        from shuttled.config import is_admin

        if is_admin(caller.uid, caller.gids):
            return None
        if self._per_uid[caller.uid] >= self.max_per_uid:
            return BusyError(f"too many control connections from uid {caller.uid} "
                             f"({self.max_per_uid}); try again")
        if len(self._clients) > self.max_clients:
            return BusyError(f"too many control clients ({self.max_clients}); try again")
        return None

    async def _read_request(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> bytes | None:
        """The next request line; None (after an error reply, if due) to hang up."""
        try:
            line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
        except TimeoutError:
            await self._send(writer, error_reply(None, BadRequestError(
                f"no complete request within {self.idle_timeout:g} s")))
            return None
        except ValueError:  # StreamReader's "separator not found, limit exceeded"
            await self._send(writer, error_reply(None, BadRequestError(
                f"request longer than {MAX_REQUEST_BYTES} bytes")))
            return None
        return line or None

    async def _handle(self, line: bytes, caller: api.Caller, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is done (after a stream)."""
        request_id: int | None = None
        try:
            request = decode_request(line.rstrip(b"\r\n"))
            request_id = request.id
            call = api.prepare(self.core, request.verb, request.args, caller)
            if call.verb.streams:
                await self._send(writer, ok_reply(request_id, {"streaming": call.verb.name}))
                await self._stream(call, reader, writer)
                return False
            reply = ok_reply(request_id, await api.invoke(self.core, call))
        except BadRequestError as exc:
            log.debug("bad control request from uid %d: %s", caller.uid, exc)
            reply = error_reply(request_id if request_id is not None else exc.request_id, exc)
        except ShuttledError as exc:
            log.debug("control request from uid %d refused: %s", caller.uid, exc)
            reply = error_reply(request_id, exc)
        except _ClientGone:
            raise
        except Exception as exc:  # a bug in the core; the client still gets an answer
            log.exception("control request %r failed", line[:200])
            reply = error_reply(request_id, exc)
        await self._send(writer, reply)
        return True

    async def _stream(self, call: api.Call, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """Send events until the client hangs up (or stops reading them)."""

        async def pump() -> None:
            async for event in api.stream(self.core, call):
                await self._send(writer, encode_event(event))

        tasks = [asyncio.create_task(pump()), asyncio.create_task(_until_eof(reader))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        # Client-side failures become _ClientGone, so that a ConnectionError raised
        # by the core is never mistaken for the client leaving.
        try:
            writer.write(data)
            await asyncio.wait_for(writer.drain(), self.write_timeout)
        except TimeoutError:
            raise _ClientGone(f"client read nothing for {self.write_timeout:g} s") from None
        except ConnectionError as exc:
            raise _ClientGone(str(exc) or type(exc).__name__) from None


async def _until_eof(reader: asyncio.StreamReader) -> None:
    # A watching client has nothing more to say; whatever it sends is ignored.
    try:
        while await reader.read(4096):
            pass
    except ConnectionError:
        pass  # gone, just the same


def _remove_stale(path: Path) -> None:
    """Remove a socket left by a dead daemon; refuse to steal a live one's."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ShuttledError(f"{path} exists and is not a socket; remove it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise ShuttledError(f"another shuttled is already listening on {path}")
