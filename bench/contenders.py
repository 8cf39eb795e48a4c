"""The contenders: how each one is started in the lab, reached, accounted and stopped.

Every contender runs in the client namespace (cli) against the same sshd (srv) and the
same target services (tgt).  Processes are started with ``lab.popen`` (tracked, stopped by
PID) and found again by PID: the contender's own process tree in cli, and the descendants
of the lab's sshd listener in srv.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import tools
from tests.lab import Lab

UP_TIMEOUT = 45.0
DEFAULT_CIPHER = "default"


class ContenderError(RuntimeError):
    pass


@dataclass
class Endpoints:
    """Where the load connects from cli for each service (None: not a forwarder)."""

    iperf3: tuple[str, int] | None = None
    http: tuple[str, int] | None = None
    echo: tuple[str, int] | None = None


@dataclass
class Context:
    lab: Lab
    cipher: str
    quick: bool
    source: str = str(tools.REPO)  # where `python3 -m shuttled` is run from (a snapshot)
    notes: list[str] = field(default_factory=list)
    method: str = "nft"  # shuttled's firewall backend (--method): nft or iptables

    def ssh_argv(self) -> list[str]:
        argv = list(self.lab.ssh_argv)
        if self.cipher != DEFAULT_CIPHER:
            argv += ["-c", self.cipher]
        return argv

    def ssh_cmd(self) -> str:
        return shlex.join(self.ssh_argv())


def wait_log(
    lab: Lab, name: str, proc: subprocess.Popen[Any], marker: str, timeout: float = UP_TIMEOUT
) -> None:
    """Wait (bounded) until ``marker`` shows in the child's log; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while marker not in lab.log_tail(name, 400):
        if proc.poll() is not None:
            raise ContenderError(
                f"{name} exited ({proc.returncode}) before {marker!r}:\n" + lab.log_tail(name, 30)
            )
        if time.monotonic() > deadline:
            raise ContenderError(
                f"{name}: no {marker!r} after {timeout:.0f}s:\n" + lab.log_tail(name, 30)
            )
        time.sleep(0.05)


def shuttlectl(
    lab: Lab, socket: str | os.PathLike[str], *args: str, cwd: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """`python3 -m shuttlectl --socket SOCKET ARGS...` in cli, run from ``cwd``; not checked."""
    return lab.run(
        "cli",
        [sys.executable, "-m", "shuttlectl", "--socket", str(socket), *args],
        check=False,
        timeout=timeout,
        cwd=cwd,
    )


def profile_stats(
    lab: Lab, socket: str | os.PathLike[str], profile: str, *, cwd: str
) -> dict[str, Any]:
    """A daemon profile's counters: `shuttlectl --json stats PROFILE`."""
    out = shuttlectl(lab, socket, "--json", "stats", profile, cwd=cwd)
    if out.returncode != 0:
        raise ContenderError(
            f"shuttlectl stats failed ({out.returncode}): "
            f"{(out.stderr or out.stdout).strip()[-300:]}"
        )
    stats: dict[str, Any] = json.loads(out.stdout)["stats"]
    return stats


def sshd_pid(lab: Lab, port: int) -> int | None:
    return lab.pids.get(f"sshd-{port}")


def remote_processes(lab: Lab, port: int) -> dict[int, str]:
    """Per-connection sshd processes (and what they run) under the lab's sshd on ``port``:
    role "sshd" for sshd itself, "remote-python" for a python (our helper, sshuttle's
    server), "remote-other" for the rest (shells, cat)."""
    pid = sshd_pid(lab, port)
    if pid is None:
        return {}
    out: dict[int, str] = {}
    try:
        for child in psutil.Process(pid).children(recursive=True):
            name = _name(child)
            role = (
                "sshd"
                if name.startswith("sshd")
                else "remote-python"
                if name.startswith("python")
                else "remote-other"
            )
            out[child.pid] = role
    except psutil.Error:
        pass
    return out


def local_tree(pid: int, main_role: str) -> dict[int, str]:
    """``pid`` as ``main_role``, its ssh descendants as "ssh", other descendants "local-other"."""
    out: dict[int, str] = {}
    try:
        proc = psutil.Process(pid)
        out[pid] = main_role
        for child in proc.children(recursive=True):
            out[child.pid] = "ssh" if _name(child) == "ssh" else "local-other"
    except psutil.Error:
        pass
    return out


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return "?"


class Contender:
    """Base: a forwarder reached transparently at the target's own addresses."""

    name = "?"
    description = "?"
    forwards = True
    sshd_port = 22
    figures: tuple[str, ...] = ()

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.lab = ctx.lab
        self.proc: subprocess.Popen[Any] | None = None
        self.extra: list[subprocess.Popen[Any]] = []
        self.log_name = self.name

    # --- lifecycle -------------------------------------------------------------------------
    @classmethod
    def unavailable_here(cls) -> str | None:
        """Why this contender cannot run on this machine (None: it can); may install the
        contender's tools (a venv) on first use."""
        return None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for proc in [*self.extra, *([self.proc] if self.proc else [])]:
            self.lab.stop(proc, timeout=10.0)
        self.extra.clear()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        return self.lab.log_tail(self.log_name, lines)

    # --- what the load talks to --------------------------------------------------------------
    def endpoints(self) -> Endpoints:
        lab = self.lab
        return Endpoints(
            (lab.tgt_v4, lab.ports.iperf3),
            (lab.tgt_v4, lab.ports.fast_http),
            (lab.tgt_v4, lab.ports.echo),
        )

    # --- accounting --------------------------------------------------------------------------
    def processes(self) -> dict[int, str]:
        """PID -> role of every process that does work for this contender."""
        out = remote_processes(self.lab, self.sshd_port)
        if self.proc is not None:
            out.update(local_tree(self.proc.pid, "proxy"))
        return out

    def rss_pid(self) -> int | None:
        """The process whose memory the concurrency figure watches (the proxy)."""
        return self.proc.pid if self.proc is not None else None


# Figures a forwarding contender must produce, and the raw transport's.
BULK = ("bulk_up_1", "bulk_up_4", "bulk_down_1", "bulk_down_4")
FORWARDER_FIGURES = (
    *BULK,
    "conn_rate_c1",
    "conn_rate_c8",
    "ttfb_ms",
    "rtt_us_median",
    "rtt_us_p99",
    "concurrent_ok",
    "rss_growth_mb",
    "cpu_s_per_gb.total",
)
RAW_FIGURES = (*BULK, "cpu_s_per_gb.total")


class RawSsh(Contender):
    """The ssh transport itself: bytes through `ssh srv cat` each way (no forwarding).

    One ControlMaster; each stream is a session channel of it (`ssh -S ctl srv cat`), so
    1 and 4 streams share one encrypted connection, like every forwarder here."""

    name = "raw-ssh"
    description = "ssh srv 'cat > /dev/null' / 'cat /dev/zero' (session channels, one master)"
    forwards = False
    figures = RAW_FIGURES

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.control = ""
        self._tmp: str | None = None

    def start(self) -> None:
        self._tmp = tempfile.mkdtemp(prefix="bench-raw-", dir=self.lab.tmpdir)
        self.control = os.path.join(self._tmp, "ctl")
        argv = [*self.ctx.ssh_argv(), "-M", "-S", self.control, "-N", self.lab.remote]
        self.proc = self.lab.popen("cli", argv, name=self.log_name)
        deadline = time.monotonic() + UP_TIMEOUT
        while not os.path.exists(self.control):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ContenderError("ssh master did not start:\n" + self.log_tail())
            time.sleep(0.05)

    def stream_argv(self, command: str) -> list[str]:
        return [
            *self.ctx.ssh_argv(),
            "-S",
            self.control,
            "-o",
            "ControlMaster=no",
            self.lab.remote,
            command,
        ]

    def processes(self) -> dict[int, str]:
        out = remote_processes(self.lab, self.sshd_port)
        if self.proc is not None:
            out.update(local_tree(self.proc.pid, "ssh"))
        return out

    def endpoints(self) -> Endpoints:
        return Endpoints()

    def rss_pid(self) -> int | None:
        return None


class SshL(Contender):
    """OpenSSH's own forwarding: `ssh -N -L` to each target service."""

    name = "ssh-L"
    description = "ssh -N -L 127.0.0.1:P:tgt:port (OpenSSH's own channel forwarding)"
    figures = FORWARDER_FIGURES
    BASE_PORT = 15201

    def start(self) -> None:
        lab = self.lab
        self.ports = {
            "iperf3": self.BASE_PORT,
            "http": self.BASE_PORT + 1,
            "echo": self.BASE_PORT + 2,
        }
        targets = {"iperf3": lab.ports.iperf3, "http": lab.ports.fast_http, "echo": lab.ports.echo}
        forwards: list[str] = []
        for key, local in self.ports.items():
            forwards += ["-L", f"127.0.0.1:{local}:{lab.tgt_v4}:{targets[key]}"]
        argv = [*self.ctx.ssh_argv(), "-N", "-o", "ExitOnForwardFailure=yes", *forwards, lab.remote]
        self.proc = lab.popen("cli", argv, name=self.log_name)
        _wait_listening(
            lab, self.proc, [("127.0.0.1", p) for p in self.ports.values()], self.log_name
        )

    def endpoints(self) -> Endpoints:
        return Endpoints(
            ("127.0.0.1", self.ports["iperf3"]),
            ("127.0.0.1", self.ports["http"]),
            ("127.0.0.1", self.ports["echo"]),
        )

    def processes(self) -> dict[int, str]:
        out = remote_processes(self.lab, self.sshd_port)
        if self.proc is not None:
            out.update(local_tree(self.proc.pid, "ssh"))
        return out


def _wait_listening(
    lab: Lab, proc: subprocess.Popen[Any], addrs: Sequence[tuple[str, int]], name: str
) -> None:
    import socket

    deadline = time.monotonic() + UP_TIMEOUT
    with lab.netns("cli"):
        for host, port in addrs:
            while True:
                if proc.poll() is not None:
                    raise ContenderError(f"{name} exited:\n{lab.log_tail(name, 20)}")
                try:
                    with socket.create_connection((host, port), timeout=1.0):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise ContenderError(f"{name}: {host}:{port} never listened") from None
                    time.sleep(0.05)


class ShuttledRun(Contender):
    """`shuttled run` in direct mode (sshd's direct-tcpip through the master)."""

    name = "shuttled"
    description = "shuttled run -r srv (direct-tcpip via the ControlMaster, proxy mode)"
    figures = FORWARDER_FIGURES
    remote_attr = "remote"
    forward = "direct"

    def python_argv(self) -> list[str]:
        return [sys.executable, "-m", "shuttled"]

    def start(self) -> None:
        lab = self.lab
        argv = [
            *self.python_argv(),
            "run",
            "--method",
            self.ctx.method,
            "--forward",
            self.forward,
            "-e",
            self.ctx.ssh_cmd(),
            "-r",
            getattr(lab, self.remote_attr),
            *lab.target_nets,
        ]
        self.proc = lab.popen("cli", argv, name=self.log_name, cwd=self.ctx.source)
        wait_log(lab, self.log_name, self.proc, "is up")


class ShuttledHelper(ShuttledRun):
    """`shuttled run` against the sshd that refuses forwarding: the remote helper."""

    name = "shuttled-helper"
    description = "shuttled run -r srv-nofwd (AllowTcpForwarding no: uploaded python helper)"
    remote_attr = "remote_nofwd"
    forward = "helper"
    sshd_port = 2222


class ShuttledUvloop(ShuttledRun):
    """`shuttled run` direct mode with uvloop installed as the event loop (an experiment)."""

    name = "shuttled-uvloop"
    description = "shuttled run, direct mode, under uvloop (bench/uvloop_shim.py, experiment)"

    @classmethod
    def unavailable_here(cls) -> str | None:
        status = tools.tools_python("uvloop")
        return None if status.path else f"uvloop not installable: {status.note}"

    def python_argv(self) -> list[str]:
        self._python = tools.tools_python("uvloop").path
        assert self._python is not None
        return [
            self._python,
            str(Path(__file__).with_name("uvloop_shim.py")),
            self.ctx.source,
        ]


class Sshuttle(Contender):
    """sshuttle 2.0.0 from PyPI, in the bench's own venv."""

    name = "sshuttle"
    description = f"sshuttle {tools.SSHUTTLE_VERSION} (PyPI, own venv), --method nat"
    figures = FORWARDER_FIGURES

    @classmethod
    def unavailable_here(cls) -> str | None:
        status = tools.sshuttle()
        return None if status.path else status.note

    def start(self) -> None:
        lab = self.lab
        self._exe = tools.sshuttle().path
        assert self._exe is not None
        argv = [
            self._exe,
            "--method",
            "nat",
            "-e",
            self.ctx.ssh_cmd(),
            "-r",
            lab.remote,
            lab.target_net_v4,
        ]
        self.proc = lab.popen("cli", argv, name=self.log_name)
        # sshuttle's start (remote python, firewall helper) is slow on a loaded machine.
        wait_log(lab, self.log_name, self.proc, "Connected to server", timeout=90.0)

    def stop(self) -> None:
        # SIGINT to sshuttle's main process only: it then has its firewall helper undo
        # the nat rules (a SIGTERM to the whole group leaves them behind).
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        super().stop()
        left = self.lab.run("cli", "iptables-save -t nat", check=False).stdout or ""
        if "sshuttle" in left:
            self.ctx.notes.append("sshuttle left nat rules behind in cli")


class ShuttledDaemon(Contender):
    """A daemon profile: `shuttled daemon` plus `shuttlectl up PROFILE`."""

    name = "shuttled-daemon"
    description = "shuttled daemon + shuttlectl up (profile: root, direct, streams: 1)"
    figures = FORWARDER_FIGURES
    profile = "bench"
    streams = 1

    def start(self) -> None:
        lab = self.lab
        base = Path(tempfile.mkdtemp(prefix="bench-daemon-", dir=lab.tmpdir))
        config, state = base / "config", base / "state"
        config.mkdir()
        state.mkdir()
        self.socket = str(base / "control.sock")
        options = {
            "UserKnownHostsFile": lab.known_hosts,
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "IdentitiesOnly": "yes",
        }
        if self.ctx.cipher != DEFAULT_CIPHER:
            options["Ciphers"] = self.ctx.cipher
        lines = [
            f"{self.profile}:",
            f"  remote: root@{lab.srv_v4}",
            "  user: root",
            f"  identity: {lab.identity}",
            "  forward: direct",
            f'  subnets: [{lab.target_net_v4}, "{lab.target_net_v6}"]',
            "  ssh_options:",
            *(f'    {k}: "{v}"' for k, v in options.items()),
        ]
        if self.streams != 1:
            lines.append(f"  streams: {self.streams}")
        (config / "bench.yaml").write_text("\n".join(lines) + "\n")
        argv = [
            sys.executable,
            "-m",
            "shuttled",
            "-v",
            "--config-dir",
            str(config),
            "--socket",
            self.socket,
            "--state-dir",
            str(state),
            "--no-dbus",
            "--method",
            self.ctx.method,
            "daemon",
        ]
        self.proc = lab.popen("cli", argv, name=self.log_name, cwd=self.ctx.source)
        deadline = time.monotonic() + UP_TIMEOUT
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ContenderError("daemon did not open its socket:\n" + self.log_tail())
            time.sleep(0.05)
        up = self.ctl("up", self.profile, "--wait", "--timeout", "30", timeout=60)
        if up.returncode != 0:
            raise ContenderError(
                f"shuttlectl up failed ({up.returncode}): "
                f"{(up.stderr or up.stdout).strip()}\n{self.log_tail()}"
            )

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return shuttlectl(self.lab, self.socket, *args, cwd=self.ctx.source, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        """`shuttlectl --json stats` of the profile (active, reconnects, aborted, ssh_pid...)."""
        return profile_stats(self.lab, self.socket, self.profile, cwd=self.ctx.source)


class ShuttledDaemonStreams2(ShuttledDaemon):
    name = "shuttled-daemon-s2"
    description = "daemon profile with streams: 2 (two ssh connections)"
    streams = 2


class ShuttledDaemonStreams4(ShuttledDaemon):
    name = "shuttled-daemon-s4"
    description = "daemon profile with streams: 4 (four ssh connections)"
    streams = 4


ALL: dict[str, type[Contender]] = {
    c.name: c
    for c in (
        RawSsh,
        SshL,
        ShuttledRun,
        ShuttledHelper,
        ShuttledDaemon,
        Sshuttle,
        ShuttledUvloop,
        ShuttledDaemonStreams2,
        ShuttledDaemonStreams4,
    )
}
DEFAULT_ORDER = (
    "raw-ssh",
    "ssh-L",
    "shuttled",
    "shuttled-helper",
    "shuttled-daemon",
    "shuttled-daemon-s2",
    "shuttled-daemon-s4",
    "sshuttle",
)
