"""Low-level helpers: enter a named network namespace from a thread, find and stop processes.

Everything here works by namespace identity or by PID, never by process name.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def enter_netns(name: str) -> Iterator[None]:
    """Move the *calling thread* into network namespace ``name`` for the block.

    Sockets created inside the block belong to that namespace and keep working after it.
    Only this thread moves: threads started inside inherit it, others do not.  Name
    resolution (getaddrinfo) still reads the host's /etc/resolv.conf: use literal
    addresses, or a subprocess under ``ip netns exec`` for resolver tests.
    """
    new_fd = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        old_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(new_fd)
            try:
                yield
            finally:
                _setns(old_fd)
        finally:
            os.close(old_fd)
    finally:
        os.close(new_fd)


def netns_id(name: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) identifying the named namespace, or None when it does not exist."""
    try:
        st = os.stat(os.path.join(NETNS_RUN_DIR, name))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X")


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _protected_pids() -> set[int]:
    """This process and its ancestors: never signalled by a sweep."""
    pids = {os.getpid()}
    pid = os.getpid()
    for _ in range(64):
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
            pid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if pid <= 1:
            break
        pids.add(pid)
    return pids


def pids_in_netns(ident: tuple[int, int]) -> list[int]:
    """PIDs of live processes whose network namespace is ``ident`` (see netns_id)."""
    found = []
    protected = _protected_pids()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in protected:
            continue
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ident and not _is_zombie(pid):
            found.append(pid)
    return sorted(found)


def pids_of_uid(uid: int) -> list[int]:
    """PIDs of live processes whose real uid is ``uid``."""
    found = []
    protected = _protected_pids()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in protected:
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid and not _is_zombie(int(entry)):
                found.append(int(entry))
        except OSError:
            continue
    return sorted(found)


def terminate_popen(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 5.0
) -> int | None:
    """SIGTERM then SIGKILL one child we started (and its process group); reap it."""
    if proc.poll() is not None:
        return proc.returncode
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # start_new_session=True: the group id is the child's pid
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def kill_pids(pids: Iterable[int], timeout: float = 3.0) -> list[int]:
    """SIGTERM ``pids``, wait (bounded), SIGKILL the rest; return those still alive."""
    pending = [p for p in set(pids) if p not in _protected_pids()]
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 3.0)):
        for pid in pending:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pending and time.monotonic() < deadline:
            pending = [p for p in pending if pid_alive(p)]
            if pending:
                time.sleep(0.02)
        if not pending:
            return []
    return pending


def sweep_netns(ident: tuple[int, int] | None, rounds: int = 3) -> list[int]:
    """Stop every process inside the namespace ``ident``; return PIDs that survived."""
    if ident is None:
        return []
    survivors: list[int] = []
    for _ in range(rounds):
        pids = pids_in_netns(ident)
        if not pids:
            return []
        survivors = kill_pids(pids)
    return survivors
