"""The OpenSSH ControlMaster of one tunnel, and the mux handshake into proxy mode.

The master runs as the profile's local user, with that user's config, keys,
known_hosts and agent; root can still drive it because the master accepts a
mux client whose euid is 0 or its own (mux.c). After MUX_C_PROXY the control
socket carries plain SSH connection-protocol packets and the master does the
crypto, so the data path costs one unix-socket hop and no extra encryption.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import ipaddress
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from shuttled import const
from shuttled.errors import SshError, SshFailure, SshRefusedError
from shuttled.net import communicate
from shuttled.tunnel.nodelay import (
    FD_RELAY,
    FdOffer,
    TcpInfo,
    connect_server,
    runnable_by_all,
    server_route,
)

log = logging.getLogger(__name__)
# ssh's bookkeeping that no user needs: channel and mux notes (nchan.c, channels.c,
# mux.c), e.g. `chan_send_close2: channel 3: no remote_id` when a master that kept
# failed opens exits as our mux connections close (see shuttled.tunnel.session).
_NOISE = re.compile(r"^(chan_\w+: |channel \d+: |mux_\w+: |client_\w+: |control_\w+: |debug\d: )")

MUX_MSG_HELLO = 0x00000001
MUX_C_PROXY = 0x1000000F
MUX_S_PROXY = 0x8000000F
MUX_S_FAILURE = 0x80000003
MUX_S_PERMISSION_DENIED = 0x80000002
MUX_PROTOCOL_VERSION = 4
_U32 = struct.Struct(">I")
# The system.posix_acl_access extended attribute (linux/posix_acl_xattr.h):
# version 2, then (tag, permissions, id) entries sorted by tag, little-endian.
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF
# What ssh prints when it gives up for good (sshconnect.c, sshconnect2.c, ssh.c);
# a jump host's ssh shares the stderr, so its lines are among them.
_HOST_KEY_UNKNOWN = re.compile(r"No \S+ host key is known for (\S+) and")
_HOST_KEY_CHANGED = re.compile(r"Host key for (\S+) has changed")
_HOST_KEY_FAILED = "Host key verification failed"
_IDENTITY_MISSING = re.compile(r"Identity file (.+) not accessible: ([^.]+)")
_AUTH_DENIED = re.compile(r"Permission denied \(([^)]*)\)|Too many authentication failures")


@dataclass(frozen=True)
class LocalUser:
    """The local account whose ssh identity a tunnel uses."""

    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...] = ()

    @classmethod
    def from_name(cls, name: str) -> LocalUser:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise SshError(f"no local user named {name!r}") from None
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, groups)

    @classmethod
    def invoking(cls) -> LocalUser | None:
        """The user behind sudo, when root was reached through sudo (or doas)."""
        uid = os.environ.get("SUDO_UID") or os.environ.get("DOAS_UID")
        if os.geteuid() != 0 or not uid or not uid.isdigit() or int(uid) == 0:
            return None
        try:
            return cls.from_name(pwd.getpwuid(int(uid)).pw_name)
        except KeyError:
            return None


@dataclass(frozen=True)
class SshTarget:
    """How to reach the remote: destination, base command and local identity."""

    remote: str
    ssh_command: tuple[str, ...] = (const.SSH_BIN,)
    options: tuple[str, ...] = ()  # extra "-o Key=Value" pairs from a profile
    user: LocalUser | None = None
    batch: bool = False  # daemon: never prompt

    def base_argv(self) -> list[str]:
        argv = list(self.ssh_command)
        for option in self.options:
            argv += ["-o", option]
        if self.batch:
            argv += ["-o", "BatchMode=yes"]
        return argv


@dataclass
class _ChildOutput:
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=20))


def _child_env(user: LocalUser | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        in (
            "PATH",
            "LANG",
            "LC_ALL",
            "TERM",
            "SSH_AUTH_SOCK",
            "DISPLAY",
            "SSH_ASKPASS",
            "SSH_ASKPASS_REQUIRE",
            "XAUTHORITY",
        )
    }
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    else:
        env.update({k: v for k, v in os.environ.items() if k in ("HOME", "USER", "LOGNAME")})
    return env


class _Identity(TypedDict, total=False):
    """The child's uid, gid and groups, as create_subprocess_exec takes them."""

    user: int
    group: int
    extra_groups: list[int]


def _spawn_kwargs(user: LocalUser | None) -> _Identity:
    if user is None or os.geteuid() != 0:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def fs_identity(uid: int, gid: int) -> Iterator[None]:
    """File-system permission checks as uid/gid, for this thread only (setfsuid(2)).

    A master's private directory is its user's (mode 0700) and ssh makes its
    control socket 0600: root reaches them only with CAP_DAC_OVERRIDE, which
    the service does not have. With the user's file-system identity it needs no
    capability (but CAP_SETUID); everything else stays root's, and the master
    still sees euid 0 as its mux peer. Never await inside: other tasks run on
    this thread.
    """
    if uid == 0 or os.geteuid() != 0 or not sys.platform.startswith("linux"):
        yield
        return
    libc = _libc()
    libc.setfsgid(gid)
    libc.setfsuid(uid)
    try:
        if libc.setfsuid(-1) != uid:  # -1 changes nothing and returns the current one
            raise OSError(ctypes.get_errno() or 1, f"cannot take file-system uid {uid}")
        yield
    finally:
        libc.setfsuid(0)
        libc.setfsgid(0)


def user_fs(user: LocalUser | None) -> contextlib.AbstractContextManager[None]:
    return fs_identity(user.uid, user.gid) if user is not None else contextlib.nullcontext()


def unreadable(path: str, user: LocalUser | None) -> str | None:
    """Why `user` (root: None) cannot read the file at `path`, or None when it can.
    Checked as that user (fs_identity): root's view would hide a 0600 key or a
    0700 ~/.ssh, and the service has no CAP_DAC_OVERRIDE anyway."""
    try:
        with user_fs(user):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return f"cannot read {path}: {(exc.strerror or str(exc)).lower()}"
    os.close(fd)
    return None


def helper_python(user: LocalUser | None) -> str | None:
    """A python the profile's user may run, for our one-liners run as that user
    (the descriptor relay, signals); ours unless it is out of their reach."""
    if user is None or runnable_by_all(sys.executable):
        return sys.executable
    found = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    return found if found is not None and runnable_by_all(found) else None


def grant_dir(path: str, uid: int) -> None:
    """Give `uid`, and no one else, full access to root's directory `path`.

    ssh runs as the profile's user and makes its control socket in the master's
    directory. A POSIX ACL entry (user:UID:rwx) lets it without chown, which needs
    CAP_CHOWN: the owner may set a file's ACL with no capability at all.
    """
    entries = [
        (_ACL_USER_OBJ, 7, _ACL_UNDEFINED_ID),
        (_ACL_USER, 7, uid),
        (_ACL_GROUP_OBJ, 0, _ACL_UNDEFINED_ID),
        (_ACL_MASK, 7, _ACL_UNDEFINED_ID),
        (_ACL_OTHER, 0, _ACL_UNDEFINED_ID),
    ]
    os.setxattr(
        path,
        "system.posix_acl_access",
        _ACL_HEADER.pack(2) + b"".join(_ACL_ENTRY.pack(*e) for e in entries),
    )


def remove_private_dir(path: str, uid: int, gid: int) -> None:
    """Remove a master's directory: its entries as their owner (see fs_identity),
    the directory itself as root (the parent is root's)."""
    with contextlib.suppress(OSError), fs_identity(uid, gid):
        for name in os.listdir(path):
            entry = os.path.join(path, name)
            if os.path.isdir(entry) and not os.path.islink(entry):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry)
    with contextlib.suppress(OSError):
        os.rmdir(path)


async def ssh_config(target: SshTarget) -> dict[str, str]:
    """`ssh -G`: the effective options for the destination, as the user sees them."""
    proc = await asyncio.create_subprocess_exec(
        *target.base_argv(),
        "-G",
        target.remote,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_child_env(target.user),
        **_spawn_kwargs(target.user),
    )
    try:
        out, err = await communicate(proc, 10)
    except TimeoutError:
        raise SshError(f"`ssh -G {target.remote}` did not answer within 10 s") from None
    if proc.returncode != 0:
        raise SshError(f"`ssh -G {target.remote}` failed: {_last_line(err)}")
    options: dict[str, str] = {}
    for line in out.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        options.setdefault(key.lower(), value)
    return options


def refusal(lines: Iterable[str], remote: str) -> SshRefusedError | None:
    """The error of an ssh that exited for a reason no retry heals, from its
    stderr; None for the rest (network errors, a server going away): those retry."""
    lines = list(lines)
    for line in lines:
        if found := _HOST_KEY_UNKNOWN.search(line):
            return SshRefusedError(SshFailure.HOST_KEY, f"host key for {found[1]} is not known")
        if found := _HOST_KEY_CHANGED.search(line):
            return SshRefusedError(
                SshFailure.HOST_KEY, f"host key for {found[1]} has changed since it was trusted"
            )
    if any(_HOST_KEY_FAILED in line for line in lines):
        # BatchMode says no more than this of an unknown key (its own, or a jump host's).
        return SshRefusedError(SshFailure.HOST_KEY, f"host key for {remote} is not known")
    denied = next((m for line in lines if (m := _AUTH_DENIED.search(line))), None)
    if denied is None:
        return None
    # A missing key is only a warning to ssh; it matters once nothing else worked.
    for line in lines:
        if found := _IDENTITY_MISSING.search(line):
            return SshRefusedError(
                SshFailure.IDENTITY, f"identity file {found[1]}: {found[2].lower()}"
            )
    return SshRefusedError(SshFailure.AUTH, f"{remote} refused the keys ({denied[0]})")


async def learn_host_keys(target: SshTarget, directory: str) -> tuple[list[str], str]:
    """The server's host key as the target's own ssh receives it (port, jump host,
    HostKeyAlias, its user's config), as known_hosts lines naming the host the way
    that ssh looks it up; and ssh's last stderr line. ssh-keyscan cannot go through
    a ProxyJump: ssh itself does the key exchange and records the key in a scratch
    file in `directory` (accept-new), whether or not it then logs in. A jump host's
    own key is checked as always (its ssh does not get our -o options)."""
    scratch = os.path.join(directory, "known_hosts")
    ours = {
        "StrictHostKeyChecking": "accept-new",
        "UserKnownHostsFile": scratch,
        "GlobalKnownHostsFile": "/dev/null",
        "KnownHostsCommand": "none",
        "HashKnownHosts": "no",
        "CheckHostIP": "no",
        "UpdateHostKeys": "no",
        "ControlMaster": "no",
        "ControlPath": "none",
        "BatchMode": "yes",
    }
    # ssh keeps the first value it sees: ours go before the profile's.
    argv = [*target.ssh_command, *(f"-o{k}={v}" for k, v in ours.items())]
    argv += [f"-o{option}" for option in target.options]
    argv.append(f"-oConnectTimeout={const.SERVER_CONNECT_TIMEOUT:.0f}")  # unless it has one
    proc = await asyncio.create_subprocess_exec(
        *argv,
        target.remote,
        "true",  # should it log in after all: nothing but this runs there
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=_child_env(target.user),
        start_new_session=True,
        **_spawn_kwargs(target.user),
    )
    try:
        _, err = await communicate(proc, const.MASTER_START_TIMEOUT)
    except TimeoutError:
        err = b"no answer in time"
    with user_fs(target.user), contextlib.suppress(FileNotFoundError):
        lines = Path(scratch).read_text().splitlines()
        return [x for x in lines if x.strip() and not x.startswith("#")], _last_line(err)
    return [], _last_line(err)


def _last_line(data: bytes) -> str:
    lines = [x for x in data.decode(errors="replace").splitlines() if x.strip()]
    return lines[-1] if lines else "no output"


async def server_endpoints(target: SshTarget) -> tuple[list[str], int, str | None]:
    """Addresses and port of the first TCP hop ssh makes, for auto-exclusion.

    Returns (addresses, port, warning). With a ProxyJump the first hop is the
    jump host; with a ProxyCommand we cannot know and say so.
    """
    host, port, warning = await server_host(target)
    return (await _resolve(host) if host else []), port, warning


async def server_host(target: SshTarget) -> tuple[str | None, int, str | None]:
    """Host (name or address) and port of the first TCP hop ssh makes, and a warning."""
    options = await ssh_config(target)
    if options.get("proxycommand", "none") != "none":
        return None, 0, "a ProxyCommand is configured: its addresses are not auto-excluded"
    jump = options.get("proxyjump", "none")
    if jump != "none":
        first = jump.split(",")[0]
        options = await ssh_config(
            SshTarget(first, target.ssh_command, target.options, target.user)
        )
    return options.get("hostname", target.remote), int(options.get("port", "22")), None


async def known_host_key(target: SshTarget) -> tuple[bool, str]:
    """Whether the user's known_hosts files hold a key for the server, looked up
    the way ssh does (HostKeyAlias, `[host]:port`): (known, what was found or where
    it was looked for). Before any connection: a closed port does not hide it."""
    options = await ssh_config(target)
    alias = options.get("hostkeyalias", "none")
    host = alias if alias != "none" else options.get("hostname", target.remote)
    port = options.get("port", "22")
    name = host if port == "22" or alias != "none" else f"[{host}]:{port}"
    files = [
        *options.get("userknownhostsfile", "").split(),
        *options.get("globalknownhostsfile", "").split(),
    ]
    for known in files:
        proc = await asyncio.create_subprocess_exec(
            "ssh-keygen",
            "-F",
            name,
            "-f",
            str(resolve_home(known, target.user)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=_child_env(target.user),
            **_spawn_kwargs(target.user),
        )
        out, _ = await communicate(proc, 10)
        if proc.returncode == 0 and out.strip():
            return True, f"{name} is in {known}"
    return False, f"no key for {name} in {' or '.join(files) or 'any known_hosts file'}"


async def resolve_host(host: str) -> list[str]:
    """The addresses of a host name (an address stands for itself); SshError if none."""
    return await _resolve(host)


async def _resolve(host: str) -> list[str]:
    with contextlib.suppress(ValueError):
        return [str(ipaddress.ip_address(host))]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SshError(f"cannot resolve the ssh server {host!r}: {exc.strerror}") from None
    return sorted({str(info[4][0]).split("%")[0] for info in infos})


def ssh_line(raw: bytes) -> tuple[str, bool]:
    """One line of ssh's stderr without ssh's own `ssh: ` (our log adds it once), and
    whether a user needs it: errors (connect, auth, host key) yes, bookkeeping no."""
    line = raw.decode(errors="replace").rstrip().removeprefix("ssh: ")
    return line, bool(line) and not _NOISE.match(line)


class SshMaster:
    """One `ssh -M -S PATH -N` child and its private control-socket directory."""

    def __init__(self, target: SshTarget, name: str) -> None:
        self.target = target
        self.name = name
        self.proc: asyncio.subprocess.Process | None = None
        self._dir: str | None = None
        self._output = _ChildOutput()
        self._reader: asyncio.Task[None] | None = None
        # Our duplicate of ssh's server connection, when we made it (nodelay.py).
        self.server: socket.socket | None = None
        self._offer: FdOffer | None = None
        self._serving: asyncio.Task[None] | None = None
        self._relay: list[str] = []  # the -o options that make ssh take it

    @property
    def control_path(self) -> str:
        assert self._dir is not None
        return os.path.join(self._dir, "ctl")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _make_dir(self) -> None:
        base = const.RUN_DIR if os.geteuid() == 0 and const.RUN_DIR.parent.exists() else None
        if base is not None:
            base.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._dir = tempfile.mkdtemp(
            prefix=f"ssh-{self.name[:16]}-", dir=str(base) if base else None
        )
        user = self.target.user
        if user is not None and os.geteuid() == 0:
            try:
                grant_dir(self._dir, user.uid)
            except OSError:  # no ACLs on this file system: chown (needs CAP_CHOWN)
                os.chown(self._dir, user.uid, user.gid)

    def argv(self) -> list[str]:
        return [
            *self.target.base_argv(),
            "-M",
            "-S",
            self.control_path,
            "-N",
            "-o",
            "ControlMaster=yes",
            "-o",
            "ControlPersist=no",
            "-o",
            f"ServerAliveInterval={const.SSH_SERVER_ALIVE_INTERVAL}",
            "-o",
            f"ServerAliveCountMax={const.SSH_SERVER_ALIVE_COUNT}",
            "-o",
            "ExitOnForwardFailure=yes",
            *self._relay,
            self.target.remote,
        ]

    def tcp_info(self) -> TcpInfo | None:
        """The kernel's view of the server connection; None where ssh made it."""
        return TcpInfo.of(self.server) if self.server is not None else None

    async def _connect_server(self) -> None:
        """Make the server connection ourselves where ssh would go straight to the
        server (see nodelay.py); where not, or when it fails, ssh makes it."""
        python = helper_python(self.target.user)
        try:
            route = server_route(await ssh_config(self.target), const.SERVER_CONNECT_TIMEOUT)
        except SshError as exc:
            route = str(exc)
        if python is None:
            route = "no python the profile's user may run for the descriptor relay"
        if isinstance(route, str):
            log.debug("ssh connects to the server itself: %s", route)
            return
        try:
            self.server = await connect_server(route)
        except OSError as exc:
            log.info("%s; ssh tries itself", exc.strerror or exc)
            return
        assert self._dir is not None and python is not None
        user = self.target.user
        self._offer = FdOffer(os.path.join(self._dir, "fd"), user.uid if user else 0)
        with user_fs(user):
            self._offer.bind()
        relay = shlex.join([python, "-I", "-S", "-c", FD_RELAY, self._offer.path])
        self._relay = ["-o", f"ProxyCommand={relay}", "-o", "ProxyUseFdpass=yes"]

    async def start(self) -> None:
        """Spawn the master and wait (bounded) until its control socket exists."""
        self._make_dir()
        await self._connect_server()
        argv = self.argv()
        log.info("starting ssh master: %s", shlex.join(argv))
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=_child_env(self.target.user),
                start_new_session=self.target.batch,
                **_spawn_kwargs(self.target.user),
            )
        except OSError as exc:
            raise SshError(f"cannot run {argv[0]!r}: {exc.strerror}") from None
        if self._offer is not None and self.server is not None:
            self._serving = asyncio.create_task(self._offer.serve(self.server))
        self._reader = asyncio.create_task(self._read_stderr())
        await self._wait_for_socket()

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line, needed = ssh_line(raw)
            if needed:
                self._output.lines.append(line)
            if line:
                log.log(logging.INFO if needed else logging.DEBUG, "ssh: %s", line)

    async def _wait_for_socket(self) -> None:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + const.MASTER_START_TIMEOUT
        while not self._socket_exists():
            if self.proc.returncode is not None:
                if self._reader is not None:
                    await asyncio.wait([self._reader], timeout=1)
                if refused := refusal(self._output.lines, self.target.remote):
                    raise refused
                raise SshError(
                    f"ssh to {self.target.remote} exited with status "
                    f"{self.proc.returncode}: {self.last_error()}"
                )
            if loop.time() > deadline:
                raise SshError(
                    f"ssh to {self.target.remote} did not authenticate within "
                    f"{const.MASTER_START_TIMEOUT:.0f} s"
                )
            await asyncio.sleep(0.05)

    def _socket_exists(self) -> bool:
        with user_fs(self.target.user):  # the directory is the user's (mode 0700)
            return os.path.exists(self.control_path)

    def last_error(self) -> str:
        return self._output.lines[-1] if self._output.lines else "no output from ssh"

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def connect_proxy(self) -> socket.socket:
        """A new mux client connection already switched to proxy mode."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Blocking, and with the user's file-system identity for the permission
            # checks (fs_identity): a unix connect is done at once unless the
            # master's backlog is full, and the check must not be repeated as root.
            sock.settimeout(2.0)
            with user_fs(self.target.user):
                sock.connect(self.control_path)
            sock.setblocking(False)
            await asyncio.wait_for(self._handshake(sock), const.MUX_HELLO_TIMEOUT)
        except TimeoutError:
            sock.close()
            raise SshError("ssh master did not answer the mux handshake") from None
        except (OSError, SshError) as exc:
            sock.close()
            raise SshError(f"mux handshake with the ssh master failed: {exc}") from None
        return sock

    async def _handshake(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, _mux_message(MUX_MSG_HELLO, MUX_PROTOCOL_VERSION))
        kind, body = await _read_mux_message(sock)
        if kind != MUX_MSG_HELLO or len(body) < 4:
            raise SshError(f"unexpected mux hello 0x{kind:08x}")
        (version,) = _U32.unpack_from(body)
        if version != MUX_PROTOCOL_VERSION:
            raise SshError(f"ssh master speaks mux protocol {version}, we need 4")
        request_id = 1
        await loop.sock_sendall(sock, _mux_message(MUX_C_PROXY, request_id))
        kind, body = await _read_mux_message(sock)
        if kind != MUX_S_PROXY:
            raise SshError(f"proxy mode refused (reply 0x{kind:08x}): {_mux_reason(body)}")

    async def stop(self) -> None:
        """Terminate the child (bounded), reap it, remove the socket directory."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            await self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                await self._signal(signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5)
        if self._serving is not None:  # done, or ssh never asked: nobody will
            self._serving.cancel()
            await asyncio.wait([self._serving], timeout=1)
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=1)
            self._reader.cancel()
        if self._offer is not None:
            self._offer.close()
        if self.server is not None:  # ssh's copy is closed: now the server sees FIN
            self.server.close()
            self.server = None
        if self._dir is not None:
            user = self.target.user
            remove_private_dir(self._dir, user.uid if user else 0, user.gid if user else 0)
            self._dir = None

    async def _signal(self, sig: signal.Signals) -> None:
        """Signal the master; where we may not (the service has no CAP_KILL, and
        the master runs as the profile's user), as that user, which we may be."""
        assert self.proc is not None
        try:
            self.proc.send_signal(sig)
            return
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        user, python = self.target.user, helper_python(self.target.user)
        if user is None or python is None or self.proc.returncode is not None:
            return
        try:
            kill = await asyncio.create_subprocess_exec(
                python,
                "-I",
                "-S",
                "-c",
                "import os,sys;os.kill(*map(int,sys.argv[1:]))",
                str(self.proc.pid),
                str(int(sig)),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env=_child_env(user),
                **_spawn_kwargs(user),
            )
            await asyncio.wait_for(kill.wait(), 5)
        except (OSError, TimeoutError) as exc:
            log.warning("cannot signal ssh pid %d as %s: %s", self.proc.pid, user.name, exc)


def cleanup_control_dirs(base: Path = const.RUN_DIR, min_age: float = 60.0) -> list[str]:
    """The control-socket directories killed masters left behind under `base`.

    Removed: those whose socket is missing or answers nobody. Kept: live ones
    (another daemon or `shuttled run`), and any younger than `min_age`, where a
    master that is starting has not made its socket yet.
    """
    removed = []
    for path in sorted(base.glob("ssh-*")):
        try:
            info = path.lstat()
        except OSError:
            continue
        young = time.time() - info.st_mtime < min_age
        if not path.is_dir() or path.is_symlink() or young:
            continue
        # The socket is the master's user's (the directory root's, or theirs).
        uid, gid = _owner(path / "ctl", info.st_uid, info.st_gid)
        if _answers(path / "ctl", uid, gid):
            continue
        remove_private_dir(str(path), uid, gid)
        removed.append(f"ssh control directory {path}")
    return removed


def _owner(path: Path, uid: int, gid: int) -> tuple[int, int]:
    """Who owns `path`, looked at as uid/gid (the directory's owner); theirs if none."""
    try:
        with fs_identity(uid, gid):
            info = path.lstat()
    except OSError:
        return uid, gid
    return info.st_uid, info.st_gid


def _answers(path: Path, uid: int, gid: int) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            with fs_identity(uid, gid):  # the socket is 0600: see fs_identity
                sock.connect(str(path))
        except OSError:
            return False
    return True


def _mux_message(kind: int, value: int) -> bytes:
    body = _U32.pack(kind) + _U32.pack(value)
    return _U32.pack(len(body)) + body


def _mux_reason(body: bytes) -> str:
    # MUX_S_FAILURE / PERMISSION_DENIED: uint32 request id, string reason.
    if len(body) >= 8:
        (size,) = _U32.unpack_from(body, 4)
        return body[8 : 8 + size].decode(errors="replace")
    return "no reason given"


async def _read_exact(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < size:
        chunk = await loop.sock_recv(sock, size - len(buf))
        if not chunk:
            raise SshError("ssh master closed the control connection")
        buf += chunk
    return bytes(buf)


async def _read_mux_message(sock: socket.socket) -> tuple[int, bytes]:
    (length,) = _U32.unpack(await _read_exact(sock, 4))
    if not 4 <= length <= 65536:
        raise SshError(f"mux message length {length} out of range")
    body = await _read_exact(sock, length)
    return _U32.unpack_from(body)[0], body[4:]


def resolve_home(path: str, user: LocalUser | None) -> Path:
    return Path(path.replace("~", user.home if user else str(Path.home()), 1))
