"""Accepting without starving: our own accept loop, the descriptor budget of captured
connections, spare descriptors for the control socket, and the daemon's file limit.

asyncio's own server is no use at EMFILE: its accept loop (Python 3.11.7) goes on
calling accept() `backlog` times in the same tick after the first failure, sending
each failure to the loop's exception handler and arming a one-second timer for each.
Measured with 1,100 connections waiting on a listener with backlog 4096 and 256
descriptors: 42,000 handler calls and 53,000 pending timers a second at 100% CPU;
the daemon logged 4.45 million lines in two minutes. Acceptor stops at the first
such failure, waits ACCEPT_PAUSE and says so once per LIMIT_LOG_INTERVAL, counted.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from shuttled import const

log = logging.getLogger(__name__)

# Out of descriptors (the process's or the system's) or kernel memory: an immediate
# retry cannot succeed.
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The listener itself is gone (closed under us): stop reading it.
_LISTENER_GONE = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})
_TCPI_UNACKED = struct.Struct("=I")  # struct tcp_info: tcpi_unacked at offset 24
_TCPI_UNACKED_AT = 24
_NOFILE_TRIES = (1 << 20, 65536, 10240)  # with no finite hard limit (macOS: OPEN_MAX)

OnAccept = Callable[[socket.socket, Any], None]


class Throttled:
    """A log line for something that recurs: at most one per interval, with how
    many times it happened since the last line. Counts also go to stats, so the
    lines are only the hint to look there."""

    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.WARNING,
        interval: float = const.LIMIT_LOG_INTERVAL,
    ) -> None:
        self.logger = logger
        self.level = level
        self.interval = interval
        self.pending = 0
        self._last = -math.inf

    def __call__(self, message: str, *args: object, exc_info: bool = False) -> None:
        self.pending += 1
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        since = "" if self._last == -math.inf else f" in {now - self._last:.0f} s"
        self.logger.log(
            self.level, f"{message} ({self.pending} times{since})", *args, exc_info=exc_info
        )
        self.pending, self._last = 0, now


class SpareFds:
    """Descriptors held open on /dev/null and given up one at a time when accept()
    meets EMFILE, so that a control connection (root's `status`) still gets in even
    when something else used up every descriptor. Refilled when one is free again."""

    def __init__(self, count: int = const.SPARE_FDS) -> None:
        self.count = count
        self._fds: list[int] = []

    def __len__(self) -> int:
        return len(self._fds)

    def fill(self) -> None:
        while len(self._fds) < self.count:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return  # still short: the next fill() tries again

    def release(self) -> bool:
        """Close one placeholder; False when none is left."""
        if not self._fds:
            return False
        os.close(self._fds.pop())
        return True

    def close(self) -> None:
        while self.release():
            pass


class FdBudget:
    """How many descriptors captured connections may hold, across every proxy of
    the process: the soft limit, less what everything else holds (sampled from
    /proc/self/fd once it matters), less a reserve -- a smaller one for root."""

    SAMPLE_EVERY = 1.0  # seconds between two counts of our open descriptors

    def __init__(self) -> None:
        self.live = 0  # descriptors of captured connections, from accept to close
        self._others = 0
        self._sampled = -math.inf

    def limit(self, root: bool) -> int:
        """Captured connections allowed in all, for root or for anyone else."""
        # Read each time (a syscall): `prlimit --pid` may change it under us.
        soft = _soft_limit()
        self._sample(soft)
        reserve = const.FD_RESERVE_ROOT if root else const.FD_RESERVE
        return max(soft - self._others - reserve, 0)

    def _sample(self, soft: int) -> None:
        # Counting our descriptors costs a directory listing: only near the limit.
        if self.live * 2 < soft - const.FD_RESERVE:
            self._others = 0
            return
        now = time.monotonic()
        if now - self._sampled < self.SAMPLE_EVERY:
            return
        self._sampled = now
        try:
            count = len(os.listdir("/proc/self/fd" if sys.platform == "linux" else "/dev/fd"))
        except OSError:
            return  # EMFILE itself, or no such directory: keep the last count
        self._others = max(count - 1 - self.live, 0)  # -1: the listing's own descriptor


def _soft_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


BUDGET = FdBudget()


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the new soft limit.

    The soft limit a service gets by default (1024) is far too few for a proxy that
    holds one descriptor per connection; the hard limit is what the administrator
    allows (systemd's default: 524288; our unit sets LimitNOFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    tries = (hard,) if hard != resource.RLIM_INFINITY else _NOFILE_TRIES
    for want in tries:
        if want <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            continue
        soft = want
        break
    if soft != before:
        log.debug("file descriptor limit raised from %d to %d", before, soft)
    if soft - const.FD_RESERVE < const.MAX_CONNECTIONS:
        log.warning(
            "only %d file descriptors (hard limit %s): captured connections are "
            "refused beyond about %d; raise the hard limit (LimitNOFILE=, "
            "ulimit -Hn)",
            soft,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            max(soft - const.FD_RESERVE, 0),
        )
    return soft


class Acceptor:
    """Our accept loop on one listening socket (see the module docstring): each new
    connection, non-blocking, goes to `on_accept(sock, address)`, which owns it.

    With `spares`, an EMFILE is met by giving up one spare descriptor and accepting
    again; without (or when none is left) the listener pauses for ACCEPT_PAUSE and
    the connections wait in the kernel's queue."""

    def __init__(
        self, sock: socket.socket, on_accept: OnAccept, *, what: str, spares: SpareFds | None = None
    ) -> None:
        self.sock = sock
        self.on_accept = on_accept
        self.what = what
        self.spares = spares
        self.deferred = 0  # pauses at EMFILE/ENFILE
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reading = False
        self._warn = Throttled(log)
        self._bug = Throttled(log, logging.ERROR)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._resume()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_reading()
        self.sock.close()

    def _resume(self) -> None:
        self._timer = None
        if self._loop is not None and self.sock.fileno() >= 0 and not self._reading:
            self._loop.add_reader(self.sock.fileno(), self._ready)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading and self._loop is not None and self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
        self._reading = False

    def _ready(self) -> None:
        # A batch per wakeup: a flood on one listener leaves the loop to the others.
        for _ in range(const.ACCEPT_BATCH):
            try:
                conn, address = self._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if not self._failed(exc):
                    return
                continue
            self._hand_over(conn, address)

    def _accept(self) -> tuple[socket.socket, Any]:
        try:
            return self.sock.accept()
        except OSError as exc:
            if (
                exc.errno not in (errno.EMFILE, errno.ENFILE)
                or self.spares is None
                or not self.spares.release()
            ):
                raise
        return self.sock.accept()  # a spare given up: this connection gets its place

    def _failed(self, exc: OSError) -> bool:
        """Deal with a failed accept(); True to go on accepting."""
        if exc.errno in EXHAUSTED:
            self.deferred += 1
            self._stop_reading()
            assert self._loop is not None
            self._timer = self._loop.call_later(const.ACCEPT_PAUSE, self._resume)
            self._warn(
                "cannot accept on %s: %s; pausing %g s each time, %s waiting",
                self.what,
                os.strerror(exc.errno or 0),
                const.ACCEPT_PAUSE,
                _queued(self.sock),
            )
            return False
        if exc.errno in _LISTENER_GONE:
            self._stop_reading()
            return False
        # ECONNABORTED, EPROTO, ENETDOWN...: that connection's own error (accept(2))
        log.debug("accept on %s: %s", self.what, exc)
        return True

    def _hand_over(self, conn: socket.socket, address: Any) -> None:
        try:
            conn.setblocking(False)
            self.on_accept(conn, address)
        except Exception:  # a bug: this connection ends, the listener goes on
            self._bug("handling a new connection on %s failed", self.what, exc_info=True)
            conn.close()


def _queued(sock: socket.socket) -> str:
    """How many connections wait in a TCP listener's accept queue (Linux), as text."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None or sock.type != socket.SOCK_STREAM or sock.family == socket.AF_UNIX:
        return "connections"
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 104)
        return f"{_TCPI_UNACKED.unpack_from(raw, _TCPI_UNACKED_AT)[0]} connections"
    except (OSError, struct.error):
        return "connections"


def quiet_accept_failures(loop: asyncio.AbstractEventLoop) -> None:
    """Throttle what asyncio's own servers (still used by the DNS listeners) log at
    EMFILE: one line per interval instead of one per failed accept()."""
    throttled = Throttled(log)
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == "socket.accept() out of system resource":
            throttled("asyncio listener: %s", context.get("exception"))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
