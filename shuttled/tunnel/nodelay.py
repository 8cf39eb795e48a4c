"""TCP_NODELAY on the ControlMaster's own connection to the server.

OpenSSH turns Nagle off only for "interactive" connections, and a master with
no session (`-M -N`) never is one: ssh_session2() passes
`control_master == SSHCTL_MASTER_NO` as the interactive flag, which is why a
plain `ssh -N -L` has TCP_NODELAY and our master does not. With Nagle on, a
small CHANNEL_OPEN waits for the ACK of the previous connection's small CLOSE,
and sshd delays that ACK: measured, one new connection in nine stalled ~40 ms.

There is no ssh option for it, so we borrow the master's socket for a moment:
pidfd_getfd(2) (Linux 5.6+, needs the right to ptrace the master, which root
has) gives us a duplicate descriptor, the socket option lands on the shared
socket, and our duplicate is closed again. Best effort: where it fails the
tunnel works as before, only with those stalls.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import sys

log = logging.getLogger(__name__)

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture


def _pidfd_getfd(pidfd: int, target_fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _socket_fds(pid: int) -> list[int]:
    fds = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                fds.append(int(name))
        except (OSError, ValueError):
            continue  # closed meanwhile
    return fds


def set_nodelay(pid: int) -> int:
    """Set TCP_NODELAY on the established TCP sockets of process `pid`.

    Returns how many sockets were changed; 0 where the platform or the
    permissions do not allow it (logged at debug level).
    """
    if not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
        return 0
    try:
        fds = _socket_fds(pid)
        pidfd = os.pidfd_open(pid)
    except OSError as exc:  # the master may just have exited
        log.debug("TCP_NODELAY for ssh pid %d: %s", pid, exc)
        return 0
    changed = 0
    try:
        for fd in fds:
            try:
                with socket.socket(fileno=_pidfd_getfd(pidfd, fd)) as sock:
                    if sock.family not in (socket.AF_INET, socket.AF_INET6) or \
                            sock.type != socket.SOCK_STREAM:
                        continue  # the control socket and other unix sockets
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                changed += 1
            except OSError as exc:
                log.debug("TCP_NODELAY for ssh pid %d fd %d: %s", pid, fd, exc)
    finally:
        os.close(pidfd)
    return changed
