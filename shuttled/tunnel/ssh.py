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
import ipaddress
import logging
import os
import pwd
import shlex
import shutil
import socket
import struct
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from shuttled import const
from shuttled.errors import SshError

log = logging.getLogger(__name__)

MUX_MSG_HELLO = 0x00000001
MUX_C_PROXY = 0x1000000F
MUX_S_PROXY = 0x8000000F
MUX_S_FAILURE = 0x80000003
MUX_S_PERMISSION_DENIED = 0x80000002
MUX_PROTOCOL_VERSION = 4
_U32 = struct.Struct(">I")


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
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "LANG", "LC_ALL", "TERM", "SSH_AUTH_SOCK", "DISPLAY",
                    "SSH_ASKPASS", "SSH_ASKPASS_REQUIRE", "XAUTHORITY")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    else:
        env.update({k: v for k, v in os.environ.items() if k in ("HOME", "USER", "LOGNAME")})
    return env


def _spawn_kwargs(user: LocalUser | None) -> dict[str, object]:
    if user is None or os.geteuid() != 0:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}


async def ssh_config(target: SshTarget) -> dict[str, str]:
    """`ssh -G`: the effective options for the destination, as the user sees them."""
    proc = await asyncio.create_subprocess_exec(
        *target.base_argv(), "-G", target.remote, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=_child_env(target.user), **_spawn_kwargs(target.user))  # type: ignore[arg-type]
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SshError(f"`ssh -G {target.remote}` did not answer within 10 s") from None
    if proc.returncode != 0:
        raise SshError(f"`ssh -G {target.remote}` failed: {_last_line(err)}")
    options: dict[str, str] = {}
    for line in out.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        options.setdefault(key.lower(), value)
    return options


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
        options = await ssh_config(SshTarget(first, target.ssh_command, target.options,
                                             target.user))
    return options.get("hostname", target.remote), int(options.get("port", "22")), None


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


class SshMaster:
    """One `ssh -M -S PATH -N` child and its private control-socket directory."""

    def __init__(self, target: SshTarget, name: str) -> None:
        self.target = target
        self.name = name
        self.proc: asyncio.subprocess.Process | None = None
        self._dir: str | None = None
        self._output = _ChildOutput()
        self._reader: asyncio.Task[None] | None = None

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
        self._dir = tempfile.mkdtemp(prefix=f"ssh-{self.name[:16]}-",
                                     dir=str(base) if base else None)
        user = self.target.user
        if user is not None and os.geteuid() == 0:
            os.chown(self._dir, user.uid, user.gid)

    def argv(self) -> list[str]:
        return [*self.target.base_argv(), "-M", "-S", self.control_path, "-N",
                "-o", "ControlMaster=yes", "-o", "ControlPersist=no",
                "-o", f"ServerAliveInterval={const.SSH_SERVER_ALIVE_INTERVAL}",
                "-o", f"ServerAliveCountMax={const.SSH_SERVER_ALIVE_COUNT}",
                "-o", "ExitOnForwardFailure=yes", self.target.remote]

    async def start(self) -> None:
        """Spawn the master and wait (bounded) until its control socket exists."""
        self._make_dir()
        argv = self.argv()
        log.info("starting ssh master: %s", shlex.join(argv))
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, env=_child_env(self.target.user),
                start_new_session=self.target.batch,
                **_spawn_kwargs(self.target.user))  # type: ignore[arg-type]
        except OSError as exc:
            raise SshError(f"cannot run {argv[0]!r}: {exc.strerror}") from None
        self._reader = asyncio.create_task(self._read_stderr())
        await self._wait_for_socket()

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._output.lines.append(line)
                log.info("ssh: %s", line)

    async def _wait_for_socket(self) -> None:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + const.MASTER_START_TIMEOUT
        while not os.path.exists(self.control_path):
            if self.proc.returncode is not None:
                if self._reader is not None:
                    await asyncio.wait([self._reader], timeout=1)
                raise SshError(f"ssh to {self.target.remote} exited with status "
                               f"{self.proc.returncode}: {self.last_error()}")
            if loop.time() > deadline:
                raise SshError(f"ssh to {self.target.remote} did not authenticate within "
                               f"{const.MASTER_START_TIMEOUT:.0f} s")
            await asyncio.sleep(0.05)

    def last_error(self) -> str:
        return self._output.lines[-1] if self._output.lines else "no output from ssh"

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def connect_proxy(self) -> socket.socket:
        """A new mux client connection already switched to proxy mode."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
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
        await loop.sock_connect(sock, self.control_path)
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
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=1)
            self._reader.cancel()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def cleanup_control_dirs(base: Path = const.RUN_DIR, min_age: float = 60.0) -> list[str]:
    """The control-socket directories killed masters left behind under `base`.

    Removed: those whose socket is missing or answers nobody. Kept: live ones
    (another daemon or `shuttled run`), and any younger than `min_age`, where a
    master that is starting has not made its socket yet.
    """
    removed = []
    for path in sorted(base.glob("ssh-*")):
        try:
            young = time.time() - path.lstat().st_mtime < min_age
        except OSError:
            continue
        if not path.is_dir() or path.is_symlink() or young or _answers(path / "ctl"):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(f"ssh control directory {path}")
    return removed


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
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
        return body[8:8 + size].decode(errors="replace")
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
