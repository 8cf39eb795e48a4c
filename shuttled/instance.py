"""One daemon per network namespace: who owns shuttled's firewall state here.

The daemon's table has a fixed name, so a second daemon (another --socket, another
state dir) would remove or replace the first one's rules. An exclusive flock,
taken before anything is touched, decides; the file holds the owner's pid so that
the refusal can name it. The kernel releases the lock when its holder dies, so a
SIGKILLed daemon never blocks its successor.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from shuttled.const import LOCKDOWN_TABLE, NFT_TABLE, RUN_DIR, RUN_TABLE_PREFIX
from shuttled.errors import ShuttledError


class AlreadyRunningError(ShuttledError):
    code = "already_running"


def lock_path() -> Path:
    """Per network namespace: daemons in separate namespaces own separate tables."""
    netns = os.stat("/proc/self/ns/net").st_ino if os.path.exists("/proc/self/ns/net") else 0
    return RUN_DIR / f"daemon-{netns}.lock"


class InstanceLock:
    """Held for the daemon's whole life; released by close() or by its death."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or lock_path()
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunningError naming the running daemon."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise AlreadyRunningError(
                f"another shuttled daemon is running ({describe_owner(self.path)}); it owns "
                f"the firewall rules in this network namespace: nothing was changed"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def describe_owner(path: Path | None = None) -> str:
    pid = owner(path)
    return f"pid {pid}" if pid and pid > 0 else "pid unknown"


def owner(path: Path | None = None) -> int | None:
    """The pid of the daemon holding the lock, or None when no daemon holds it."""
    path = path or lock_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held: somebody runs
            with contextlib.suppress(OSError, ValueError):
                return int(os.read(fd, 32).decode().strip() or "0") or -1
            return -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def is_cleanup_target(table: str, *, live: bool = False, lockdown: bool = False) -> bool:
    """May `cleanup` remove what this owner left (tables, resolved links, records carry
    its name)? The daemon's, or a one-shot run's whose process is gone (`live`: running
    or not); the kill switch's lockdown table only with `lockdown`."""
    if table == NFT_TABLE:
        return True
    if table == LOCKDOWN_TABLE:
        return lockdown
    pid = table.removeprefix(RUN_TABLE_PREFIX)
    return table.startswith(RUN_TABLE_PREFIX) and pid.isdigit() and (live or not _alive(int(pid)))


def _alive(pid: int) -> bool:
    # A reused pid keeps a stale run table until that process ends too: rare,
    # and the rules only redirect to a dead port (fail closed), never leak.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, it just isn't ours to signal
    return True
