"""Who is on the other end of a Unix socket, on macOS and FreeBSD (Linux: SO_PEERCRED).

getsockopt(SOL_LOCAL, LOCAL_PEERCRED) fills a `struct xucred` as the kernel recorded
it at connect(): u_int cr_version (XUCRED_VERSION 0), uid_t cr_uid (effective),
short cr_ngroups, gid_t cr_groups[16] (cr_groups[0] is the effective gid). FreeBSD
appends a union of a pointer and pid_t cr_pid (filled since FreeBSD 13), 88 bytes on
64-bit systems; macOS has no such field and gives the pid through LOCAL_PEERPID.
"""

from __future__ import annotations

import socket
import struct
import sys

from shuttled.control.api import Caller

SOL_LOCAL = 0
LOCAL_PEERCRED = 1
LOCAL_PEERPID = 2  # macOS
XU_NGROUPS = 16
_XUCRED = struct.Struct(f"=IIh2x{XU_NGROUPS}I")  # 76 bytes, as both kernels lay it out
_FREEBSD_PID_OFFSET = 80  # after 4 bytes of padding that align the union to 8
BUFLEN = 88


def parse_xucred(raw: bytes, *, freebsd: bool) -> Caller:
    """A Caller from a struct xucred; OSError when it is not one we know."""
    if len(raw) < _XUCRED.size:
        raise OSError(f"struct xucred too short ({len(raw)} bytes)")
    version, uid, ngroups, *groups = _XUCRED.unpack_from(raw)
    if version != 0 or not 1 <= ngroups <= XU_NGROUPS:
        raise OSError(f"unknown struct xucred (version {version}, {ngroups} groups)")
    pid = None
    if freebsd and len(raw) >= _FREEBSD_PID_OFFSET + 4:
        pid = struct.unpack_from("=i", raw, _FREEBSD_PID_OFFSET)[0] or None
    return Caller(uid, groups[0], pid, tuple(groups[:ngroups]))


def bsd_peer_credentials(sock: socket.socket) -> Caller:
    freebsd = sys.platform.startswith("freebsd")
    caller = parse_xucred(sock.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, BUFLEN), freebsd=freebsd)
    if caller.pid is None and sys.platform == "darwin":
        pid = struct.unpack("=i", sock.getsockopt(SOL_LOCAL, LOCAL_PEERPID, 4))[0]
        caller = Caller(caller.uid, caller.gid, pid, caller.groups)
    return caller
