"""The ssh master's TCP connection to the server: made by us, handed to ssh.

Why: OpenSSH turns Nagle off only for "interactive" connections, and a master
with no session (`-M -N`) never is one: ssh_session2() passes
`control_master == SSHCTL_MASTER_NO` as the interactive flag, which is why a
plain `ssh -N -L` has TCP_NODELAY and our master does not. With Nagle on, a
small CHANNEL_OPEN waits for the ACK of the previous connection's small CLOSE,
and sshd delays that ACK: measured, one new connection in nine stalled ~40 ms.
There is no ssh option for it.

How: the daemon connects to the server itself, where `ssh -G` says ssh would
(HostName, Port, AddressFamily, ConnectTimeout, TCPKeepAlive), sets TCP_NODELAY,
and hands the socket over: with `ProxyUseFdpass=yes` ssh takes a connected
descriptor from its ProxyCommand over SCM_RIGHTS. ssh closes every descriptor
it inherits (closefrom(3) at its start), so the ProxyCommand, a python one-liner
that ssh runs as the profile's user, fetches ours from a one-shot unix socket in
the master's private directory and passes it on. ssh still knows the destination
by name (known_hosts, HostKeyAlias and CheckHostIP work as before) and sees the
real peer address. The daemon keeps a duplicate: TCP_INFO tells when the server
was last heard, the kernel's RTT and retransmissions (liveness, stats).

Fallback, where the first hop is not ours to make (a ProxyCommand or ProxyJump,
BindAddress, BindInterface) or our connect failed: ssh connects as before, and
pidfd_getfd(2) borrows its socket for a moment to set TCP_NODELAY. That needs the
right to ptrace the master, which root has outside the service (`shuttled run`)
and the daemon under systemd has not (no CAP_SYS_PTRACE): there it is skipped.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import socket
import stat
import struct
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture

# The ProxyCommand: take one descriptor from the unix socket argv[1], pass it to
# ssh on stdout (its end of a socketpair). One line: ssh's config parser takes
# the option's value up to the end of the line. No "%": ssh expands those.
FD_RELAY = (
    "import socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
    "f=socket.recv_fds(s,1,1)[1];f or sys.exit('shuttled: no connection passed');"
    "socket.send_fds(socket.socket(fileno=1),[bytes(1)],f)"
)

# struct tcp_info (linux/tcp.h) up to tcpi_total_retrans: 8 bytes, 24 u32.
_TCP_INFO = struct.Struct("=8B24I")


@dataclass(frozen=True)
class ServerRoute:
    """Where ssh would connect, from `ssh -G`."""

    host: str
    port: int
    family: int  # AF_UNSPEC, AF_INET or AF_INET6
    timeout: float  # per address
    keepalive: bool  # TCPKeepAlive


def server_route(options: dict[str, str], default_timeout: float) -> ServerRoute | str:
    """The route from `ssh -G` options, or why we must let ssh connect itself."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "send_fds"):
        return "not Linux"
    for key in ("proxycommand", "proxyjump", "bindaddress", "bindinterface"):
        if options.get(key, "none") not in ("none", ""):
            return f"the ssh config sets {key}"
    family = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}.get(
        options.get("addressfamily", "any"), socket.AF_UNSPEC
    )
    timeout = options.get("connecttimeout", "none")
    return ServerRoute(
        options.get("hostname", ""),
        int(options.get("port", "22")),
        family,
        float(timeout) if timeout.isdigit() else default_timeout,
        options.get("tcpkeepalive", "yes") == "yes",
    )


async def connect_server(route: ServerRoute) -> socket.socket:
    """A TCP connection to the server with TCP_NODELAY, trying each address in turn."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        route.host, route.port, family=route.family, type=socket.SOCK_STREAM
    )
    errors = []
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), route.timeout)
        except TimeoutError:
            sock.close()
            errors.append(f"{address[0]}: no answer in {route.timeout:g} s")
            continue
        except OSError as exc:
            sock.close()
            errors.append(f"{address[0]}: {exc.strerror or exc}")
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if route.keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock
    raise OSError(
        f"cannot connect to {route.host} port {route.port}: {'; '.join(errors) or 'no address'}"
    )


@dataclass(frozen=True)
class TcpInfo:
    """What the kernel knows of the server connection (TCP_INFO)."""

    state: int
    heard: float  # seconds since the last segment from the server (data or ACK)
    unacked: int  # segments sent and not yet acknowledged
    backoff: int  # retransmission timeouts in a row (exponential backoff)
    rtt: float  # smoothed round trip, seconds
    retrans: int  # segments retransmitted over the connection's life

    @classmethod
    def of(cls, sock: socket.socket) -> TcpInfo | None:
        try:
            raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
        except OSError:
            return None
        if len(raw) < _TCP_INFO.size:
            return None
        f = _TCP_INFO.unpack(raw)
        # f[8:] are the u32s: rto ato snd_mss rcv_mss unacked sacked lost retrans
        # fackets last_data_sent last_ack_sent last_data_recv last_ack_recv pmtu
        # rcv_ssthresh rtt rttvar ... total_retrans.
        return cls(
            state=f[0],
            heard=min(f[19], f[20]) / 1000.0,
            unacked=f[12],
            backoff=f[4],
            rtt=f[23] / 1e6,
            retrans=f[31],
        )


class FdOffer:
    """A one-shot unix socket from which our ProxyCommand takes the connection.

    It lives in the master's private directory (mode 0700, the user's), and is
    bound with the user's file-system identity, so only that user (and root) may
    connect; the peer's uid is checked again all the same.
    """

    def __init__(self, path: str, uid: int) -> None:
        self.path = path
        self.uid = uid
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.setblocking(False)
        self.passed = False

    def bind(self) -> None:
        """Call with the user's file-system identity (ssh.fs_identity)."""
        self.listener.bind(self.path)
        self.listener.listen(1)

    async def serve(self, server: socket.socket) -> None:
        """Hand `server` to the first peer of the right uid; then stop listening."""
        loop = asyncio.get_running_loop()
        try:
            while not self.passed:
                peer, _ = await loop.sock_accept(self.listener)
                with peer:
                    if _peer_uid(peer) not in (self.uid, 0):
                        continue
                    peer.setblocking(True)
                    socket.send_fds(peer, [bytes(1)], [server.fileno()])
                    self.passed = True
        finally:
            self.close()

    def close(self) -> None:
        self.listener.close()  # the path goes with the master's directory


def _peer_uid(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", raw)[1])


def runnable_by_all(path: str) -> bool:
    """Whether every user may run `path` (execute bit for others along the way)."""
    real = os.path.realpath(path)
    try:
        while True:
            if not os.stat(real).st_mode & stat.S_IXOTH:
                return False
            if real == "/":
                return True
            real = os.path.dirname(real)
    except OSError:
        return False


# --- the fallback: borrow the master's own socket (needs ptrace rights) ---------------


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
    except OSError as exc:  # the master may just have exited, or is not ours to see
        log.debug("TCP_NODELAY for ssh pid %d: %s", pid, exc)
        return 0
    changed = 0
    try:
        for fd in fds:
            try:
                with socket.socket(fileno=_pidfd_getfd(pidfd, fd)) as sock:
                    if (
                        sock.family not in (socket.AF_INET, socket.AF_INET6)
                        or sock.type != socket.SOCK_STREAM
                    ):
                        continue  # the control socket and other unix sockets
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                changed += 1
            except OSError as exc:
                log.debug("TCP_NODELAY for ssh pid %d fd %d: %s", pid, fd, exc)
    finally:
        os.close(pidfd)
    return changed
