"""The control socket: newline-delimited JSON over a Unix stream socket.

Anyone may connect (mode 0666); what a caller may do is decided per request
from the peer's kernel credentials (SO_PEERCRED, SO_PEERGROUPS). Every
failure a client can provoke -- garbage, oversized or slow requests, unknown
verbs, denied calls -- gets an error reply; none of them reaches the daemon.

Not starvable: a caller over its limits is told "busy" and hung up on right
after accept(), before a task or a stream exists, so a connect flood costs ~30 us
a connection; the listen queue is long (CONTROL_BACKLOG), so connects do not fail.
Still, a queue kept full by others makes everyone wait for it to drain: beside the
socket is the administrators' door (`control-admin.sock`, mode 0660 root:shuttle),
the same protocol and the same per-request checks, which no unprivileged process
can connect to, so its queue is always empty and root's `status` answers at once.
The requests of one unprivileged uid get a share of the daemon's time (_Share), so
expensive verbs asked in a loop slow that uid down, not everyone. When the process
is out of descriptors, a spare one is given up to let the next client in (SpareFds).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shuttled import const
from shuttled.control import api
from shuttled.control.auth import is_admin
from shuttled.control.protocol import (
    MAX_REQUEST_BYTES,
    BadRequestError,
    BusyError,
    decode_request,
    encode_event,
    error_reply,
    ok_reply,
)
from shuttled.control.schema import Result
from shuttled.errors import PermissionDeniedError, ShuttledError
from shuttled.net import gid_of
from shuttled.tunnel.accept import Acceptor, SpareFds, Throttled

log = logging.getLogger(__name__)
# Somebody probing or misusing the socket: worth a warning, not one line per request.
_BAD_REQUESTS = Throttled(log)
_DENIED = Throttled(log)

MAX_CLIENTS = 64
# One unprivileged account may hold this many connections (watch streams never
# time out): a flood from one user can neither exhaust the daemon nor lock root out.
MAX_CLIENTS_PER_UID = 8
IDLE_TIMEOUT = 10.0  # seconds without a complete request line
ADMIN_CACHE_TTL = 1.0  # seconds one "is an administrator" answer is reused for a caller
YIELD_EVERY = 32  # requests of one client answered before others get a turn
# The daemon's time an unprivileged uid's requests may take: a share of it, spent in
# bursts of at most SHARE_BURST seconds; a request is charged the time its verb's handler
# took, at most SHARE_MAX_CHARGE (what it waited for is not work). `status` runs nft
# twice (13 ms or more): one user looping it on 8 connections held root's `status` 2 s.
# Malformed requests are not charged: cheap (~0.1 ms) and taken in turns (YIELD_EVERY).
SHARE_PER_UID = 0.2
SHARE_BURST = 0.5
SHARE_MAX_CHARGE = 1.0
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


class _AdminCache:
    """is_admin (for callers over a limit, and to know who has a share of the daemon's
    time), remembered for ADMIN_CACHE_TTL: it reads the group database, 58 us of the
    270 us a turned-away connect cost (measured under a flood of connects), and a flood
    asks it for the same credentials."""

    def __init__(self) -> None:
        self._answers: dict[tuple[int, tuple[int, ...]], tuple[float, bool]] = {}

    def __call__(self, caller: api.Caller) -> bool:
        key, now = (caller.uid, caller.gids), time.monotonic()
        cached = self._answers.get(key)
        if cached is not None and now - cached[0] < ADMIN_CACHE_TTL:
            return cached[1]
        if len(self._answers) >= 1024:  # bounded, whatever the callers
            self._answers.clear()
        answer = is_admin(caller.uid, caller.gids)
        self._answers[key] = (now, answer)
        return answer


class _Share:
    """A token bucket of the daemon's time for one unprivileged uid (all its connections):
    once it is spent, that uid's next request waits, its others stay in its sockets."""

    def __init__(self) -> None:
        self.credit = SHARE_BURST
        self.stamp = time.monotonic()

    def charge(self, seconds: float) -> None:
        self._refill()
        self.credit = max(self.credit - min(seconds, SHARE_MAX_CHARGE), -SHARE_BURST)

    def owed(self) -> float:
        """How long the uid's next request must wait (2.5 s at most)."""
        self._refill()
        return max(-self.credit / SHARE_PER_UID, 0.0)

    def full(self) -> bool:
        self._refill()
        return self.credit >= SHARE_BURST

    def _refill(self) -> None:
        now = time.monotonic()
        self.credit = min(SHARE_BURST, self.credit + (now - self.stamp) * SHARE_PER_UID)
        self.stamp = now


class UnixControlServer:
    """Serves the verb table of `api` to clients of one Unix socket.

    Like asyncio.Server: `await start(path)`, then `close()` (stop accepting, hang
    up on every client, remove the socket) and optionally `await wait_closed()`.
    """

    def __init__(
        self,
        core: api.Core,
        *,
        credentials: Credentials = peer_credentials,
        max_clients: int = MAX_CLIENTS,
        max_per_uid: int = MAX_CLIENTS_PER_UID,
        idle_timeout: float = IDLE_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self.core = core
        self.credentials = credentials
        self.max_clients = max_clients
        self.max_per_uid = max_per_uid
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.path: Path | None = None
        self.turned_away = 0  # connections told busy (or credential-less) at accept
        self._doors: list[tuple[Path, int, Acceptor]] = []  # path, its inode, its loop
        self._spares = SpareFds()
        self._clients: set[asyncio.Task[Any]] = set()
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._busy = Throttled(log)
        self._is_admin = _AdminCache()
        self._busy_replies: dict[str, bytes] = {}
        self._shares: dict[int, _Share] = {}

    @property
    def client_count(self) -> int:
        """Connections being served right now (accepted, not yet finished)."""
        return len(self._clients)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, path: Path = const.CONTROL_SOCKET) -> None:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _remove_stale(path)
        # Authorization is per request from peer credentials, so everyone may connect.
        self._open_door(path, 0o666, None)
        self.path = path
        admin = admin_socket(path)
        try:
            _remove_stale(admin)
            self._open_door(admin, 0o660, _admin_gid())
        except (OSError, ShuttledError) as exc:  # the public door serves root too
            log.warning("no administrators' control socket %s: %s", admin, exc)
        self._spares.fill()
        log.debug("control socket listening on %s", path)

    def _open_door(self, path: Path, mode: int, gid: int | None) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, mode)
            if gid is not None:
                os.chown(path, -1, gid)
            sock.listen(const.CONTROL_BACKLOG)
        except OSError:
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        acceptor = Acceptor(
            sock, self._on_accept, what=f"the control socket {path}", spares=self._spares
        )
        self._doors.append((path, path.stat().st_ino, acceptor))
        acceptor.start()

    def close(self) -> None:
        for _path, _inode, acceptor in self._doors:
            acceptor.close()
        for task in list(self._clients):
            task.cancel()
        self._unlink()

    async def wait_closed(self) -> None:
        """Until every client handler has finished (after close())."""
        await asyncio.gather(*self._clients, return_exceptions=True)
        self._spares.close()

    def _unlink(self) -> None:
        # Only our own sockets: a second daemon may have replaced them meanwhile.
        for path, inode, _acceptor in self._doors:
            with contextlib.suppress(OSError):
                if path.stat().st_ino == inode:
                    path.unlink()
        self._doors.clear()
        self.path = None

    # --- accept: the limits, before anything is spent on a client ----------------------------

    def _on_accept(self, sock: socket.socket, _address: Any) -> None:
        try:
            caller = self.credentials(sock)
        except OSError as exc:
            self._turn_away(
                sock,
                error_reply(None, ShuttledError(f"cannot read peer credentials: {exc.strerror}")),
            )
            return
        busy = self._over_limit(caller)
        if busy is not None:
            self._busy("control connections turned away: %s", busy)
            self._turn_away(sock, self._busy_reply(busy))
            return
        self._per_uid[caller.uid] += 1
        task = asyncio.get_running_loop().create_task(self._on_client(sock, caller))
        self._clients.add(task)
        task.add_done_callback(functools.partial(self._client_done, sock, caller.uid))

    def _over_limit(self, caller: api.Caller) -> str | None:
        """Why `caller` is told busy, if it is. Limits apply to unprivileged callers
        only: an administrator is never turned away because others hold connections."""
        if self._per_uid[caller.uid] >= self.max_per_uid:
            busy = (
                f"too many control connections from uid {caller.uid} "
                f"({self.max_per_uid}); try again"
            )
        elif len(self._clients) >= self.max_clients:
            busy = f"too many control clients ({self.max_clients}); try again"
        else:
            return None
        # Asked only now, and cached: under a flood this is the expensive part.
        return None if caller.uid == 0 or self._is_admin(caller) else busy

    def _busy_reply(self, message: str) -> bytes:
        reply = self._busy_replies.get(message)
        if reply is None:
            if len(self._busy_replies) >= 256:
                self._busy_replies.clear()
            reply = self._busy_replies[message] = error_reply(None, BusyError(message))
        return reply

    def _turn_away(self, sock: socket.socket, reply: bytes) -> None:
        # One short line into an empty socket buffer: a non-blocking send fits.
        self.turned_away += 1
        with contextlib.suppress(OSError):
            sock.send(reply)
        sock.close()

    def _client_done(self, sock: socket.socket, uid: int, task: asyncio.Task[None]) -> None:
        self._clients.discard(task)
        self._per_uid[uid] -= 1
        if self._per_uid[uid] <= 0:
            del self._per_uid[uid]
        if task.cancelled():
            sock.close()  # cancelled before its stream owned the socket
        self._spares.fill()  # a descriptor is free again

    # --- one client --------------------------------------------------------------------------

    async def _on_client(self, sock: socket.socket, caller: api.Caller) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_REQUEST_BYTES)
        except OSError as exc:
            log.debug("control client dropped: %s", exc)
            sock.close()
            return
        try:
            await self._serve(reader, writer, caller)
        except asyncio.CancelledError:
            # close() cancels us. Ending normally keeps asyncio from logging the
            # cancellation as an error; the task is ours alone.
            log.debug("control client cancelled")
        except (_ClientGone, ConnectionError, TimeoutError) as exc:
            log.debug("control client dropped: %s", exc or type(exc).__name__)
        except Exception:  # a bug; the daemon must carry on regardless
            log.exception("control client failed")
        finally:
            writer.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, caller: api.Caller
    ) -> None:
        share = None if caller.uid == 0 or self._is_admin(caller) else self._share(caller.uid)
        for count in itertools.count(1):
            line = await self._read_request(reader, writer)
            if line is None or (
                line.strip() and not await self._handle(line, caller, share, reader, writer)
            ):
                return
            wait = share.owed() if share is not None else 0.0
            # Lines already buffered are read, answered and written without a pause: one
            # client's 64 KiB of tiny lines would hold the loop for seconds. Yield now
            # and then (not each time: an extra turn of the loop for every request).
            if wait > 0 or count % YIELD_EVERY == 0:
                await asyncio.sleep(wait)

    def _share(self, uid: int) -> _Share:
        share = self._shares.get(uid)
        if share is None:
            if len(self._shares) >= 1024:  # bounded: forget those with nothing owed
                self._shares = {u: s for u, s in self._shares.items() if not s.full()}
            share = self._shares[uid] = _Share()
        return share

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes | None:
        """The next request line; None (after an error reply, if due) to hang up."""
        try:
            # asyncio.timeout, not wait_for: no task per request (Python 3.11)
            async with asyncio.timeout(self.idle_timeout):
                line = await reader.readline()
        except TimeoutError:
            await self._send(
                writer,
                error_reply(
                    None, BadRequestError(f"no complete request within {self.idle_timeout:g} s")
                ),
            )
            return None
        except ValueError:  # StreamReader's "separator not found, limit exceeded"
            await self._send(
                writer,
                error_reply(
                    None, BadRequestError(f"request longer than {MAX_REQUEST_BYTES} bytes")
                ),
            )
            return None
        return line or None

    async def _handle(
        self,
        line: bytes,
        caller: api.Caller,
        share: _Share | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
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
            reply = ok_reply(request_id, await self._invoke(call, share))
        except BadRequestError as exc:
            log.debug("bad control request from uid %d: %s", caller.uid, exc)
            _BAD_REQUESTS("bad control requests, the latest from uid %d: %s", caller.uid, exc)
            reply = error_reply(request_id if request_id is not None else exc.request_id, exc)
        except ShuttledError as exc:
            log.debug("control request from uid %d refused: %s", caller.uid, exc)
            if isinstance(exc, PermissionDeniedError):
                _DENIED("control requests denied, the latest from uid %d: %s", caller.uid, exc)
            reply = error_reply(request_id, exc)
        except _ClientGone:
            raise
        except Exception as exc:  # a bug in the core; the client still gets an answer
            log.exception("control request %r failed", line[:200])
            reply = error_reply(request_id, exc)
        await self._send(writer, reply)
        return True

    async def _invoke(self, call: api.Call, share: _Share | None) -> Result:
        started = time.monotonic()
        try:
            return await api.invoke(self.core, call)
        finally:
            if share is not None:
                share.charge(time.monotonic() - started)

    async def _stream(
        self, call: api.Call, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
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
            if writer.transport.is_closing():
                raise _ClientGone("the client went away")
            if writer.transport.get_write_buffer_size():  # else all went at once
                async with asyncio.timeout(self.write_timeout):
                    await writer.drain()
        except TimeoutError:
            raise _ClientGone(f"client read nothing for {self.write_timeout:g} s") from None
        except ConnectionError as exc:
            raise _ClientGone(str(exc) or type(exc).__name__) from None


def admin_socket(path: Path) -> Path:
    """The administrators' door beside the control socket at `path`."""
    return path.with_name(f"{path.stem}{const.ADMIN_SOCKET_SUFFIX}{path.suffix}")


def _admin_gid() -> int | None:
    return gid_of(const.ADMIN_GROUP)  # None, no group shuttle: root alone (0660, group root)


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
