"""Plumbing for tests of the `shuttled` daemon: start one in the lab's cli namespace with
its own config dir, state dir and control socket, drive it with `shuttlectl`, stop it by PID.

    with DaemonSet(lab) as daemons:          # every daemon stopped by PID at the end
        d = daemons.new()
        d.write_profile("work", root_profile(lab, [lab.target_net_v4]))
        d.start()                            # bounded wait for the control socket
        d.up("work")
        assert http_ok(lab, lab.tgt_v4)

On the way out, `DaemonSet` stops each daemon (SIGTERM, then SIGKILL) unless the test
already stopped it and judged its exit code, kills what a SIGKILLed daemon left behind
(its ssh masters by PID, their control dirs), and checks that the client's ruleset is
what it was before the first daemon started.

Also here: `Watch` (a `watch` subscriber on the control socket), `NotifyListener` (a
NOTIFY_SOCKET playing systemd), profile builders and bounded pollers.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil
import yaml

from tests.lab import Lab, LabUser, clients

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
UP_TIMEOUT = 30.0
CTL_TIMEOUT = 60.0
NFT_TABLE = ("inet", "shuttled")
UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

T = TypeVar("T")


def wait_for(
    what: str,
    probe: Callable[[], T],
    timeout: float,
    interval: float = 0.1,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``probe`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def _world_reachable(path: str) -> bool:
    """Whether an unprivileged user can execute ``path`` (every directory searchable)."""
    real = Path(os.path.realpath(path))
    for part in [*reversed(real.parents), real]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


def user_python() -> str:
    """A python3 an unprivileged test user can run (pyenv under /root is not one).

    shuttlectl needs only the standard library and the repository on PYTHONPATH.
    """
    if _world_reachable(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and _world_reachable(candidate):
            return candidate
    raise AssertionError("no python3 an unprivileged user can run")


def root_profile(lab: Lab, subnets: Sequence[str], **keys: Any) -> dict[str, Any]:
    """A profile whose ssh runs as root with the lab's key and known_hosts."""
    options = {
        "UserKnownHostsFile": lab.known_hosts,
        "User": "root",
        "ConnectTimeout": 5,
        **keys.pop("ssh_options", {}),
    }
    return {
        "remote": lab.srv_v4,
        "identity": lab.identity,
        "ssh_options": options,
        "subnets": list(subnets),
        **keys,
    }


def split_profile(lab: Lab, subnets: Sequence[str], *domains: str) -> dict[str, Any]:
    """A root_profile whose names under ``domains`` resolve through the tunnel (split DNS)."""
    return root_profile(lab, subnets, dns={"mode": "split", "domains": list(domains)})


def user_profile(user: LabUser, subnets: Sequence[str], **keys: Any) -> dict[str, Any]:
    """A profile whose ssh runs as ``user`` with that user's own ~/.ssh/config."""
    return {"remote": user.remote, "user": user.name, "subnets": list(subnets), **keys}


def http_ok(lab: Lab, address: str, timeout: float = 5.0) -> bool:
    """An HTTP GET from cli to ``address`` returns the lab's page."""
    with lab.netns("cli"):
        response = clients.http_get(address, timeout=timeout)
    return response.status == 200 and lab.http_marker.encode() in response.body


def http_fails(lab: Lab, address: str, timeout: float = 2.0) -> bool:
    """An HTTP GET from cli to ``address`` fails (refused, reset, timed out...)."""
    try:
        http_ok(lab, address, timeout=timeout)
    except (OSError, http.client.HTTPException):
        return True
    return False


def http_works_soon(lab: Lab, address: str, timeout: float) -> float:
    """Seconds until an HTTP GET from cli succeeds (AssertionError after ``timeout``)."""
    t0 = time.monotonic()

    def attempt() -> bool:
        try:
            return http_ok(lab, address, timeout=2.0)
        except OSError:
            return False

    wait_for(f"HTTP GET {address} through the tunnel", attempt, timeout, interval=0.1)
    return time.monotonic() - t0


def nft_table(lab: Lab) -> str | None:
    """Our table in cli (`nft list table inet shuttled`), or None when it does not exist."""
    result = lab.run("cli", ["nft", "list", "table", *NFT_TABLE], check=False)
    return result.stdout if result.returncode == 0 else None


class NotifyListener:
    """An AF_UNIX datagram socket playing systemd's part: each message with its sender pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[float, int | None, list[str]]] = []

    def receive(self, timeout: float) -> tuple[float, int | None, list[str]] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
        except TimeoutError:
            return None
        pid = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = UCRED.unpack(payload[: UCRED.size])[0]
        message = (time.monotonic(), pid, data.decode().splitlines())
        self.messages.append(message)
        return message

    def until(self, line: str, timeout: float) -> tuple[float, int | None, list[str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.receive(deadline - time.monotonic())
            if message is not None and line in message[2]:
                return message
        raise AssertionError(f"no {line!r} within {timeout:g} s; got {self.lines()}")

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.receive(deadline - time.monotonic())

    def lines(self) -> list[str]:
        return [line for _, _, lines in self.messages for line in lines]

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def accepts(path: Path) -> bool:
    """Whether a Unix stream socket at ``path`` is listening (works while its owner is
    stopped: the kernel completes the connection into the backlog)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _control_path(proc: psutil.Process) -> str | None:
    """The -S control path of an ssh master, from its command line."""
    try:
        argv = proc.cmdline()
    except psutil.Error:
        return None
    for flag, value in itertools.pairwise(argv):
        if flag == "-S" and value.endswith("/ctl"):
            return value
    return None


class Daemon:
    """One `shuttled daemon` in the cli namespace, with a private directory."""

    def __init__(self, lab: Lab, root: Path, name: str, method: str = "nft") -> None:
        self.lab = lab
        self.name = name
        self.method = method  # firewall backend: nft or iptables
        self.root = root
        self.config_dir = root / "etc"
        self.state_dir = root / "state"
        self.socket = root / "ctl.sock"
        for d in (root, self.config_dir, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)  # unprivileged callers must reach the socket
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.killed = self.exit_seen = False
        self.orphans: list[psutil.Process] = []
        self.stale_dirs: list[str] = []
        self.options_after = False  # the daemon's options after `daemon`, not before

    # --- configuration ----------------------------------------------------------------
    def write_profile(self, name: str, body: Mapping[str, Any]) -> Path:
        """One YAML file ``<name>.yaml`` in the config dir holding profile ``name``."""
        return self.write_file(f"{name}.yaml", yaml.safe_dump({name: dict(body)}))

    def write_file(self, filename: str, text: str) -> Path:
        path = self.config_dir / filename
        tmp = path.with_name(f".{filename}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    def remove_file(self, filename: str) -> None:
        (self.config_dir / filename).unlink(missing_ok=True)

    # --- process ----------------------------------------------------------------------
    @property
    def pid(self) -> int:
        assert self.proc is not None, "daemon not started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self, dbus: bool = False) -> list[str]:
        """`shuttled -v OPTIONS daemon`; with `options_after`, `shuttled daemon -v OPTIONS`."""
        argv = self._argv(dbus)
        if self.options_after:
            argv.remove("daemon")
            argv.insert(3, "daemon")
        return argv

    def _argv(self, dbus: bool) -> list[str]:
        return [
            sys.executable,
            "-m",
            "shuttled",
            "-v",
            "--config-dir",
            str(self.config_dir),
            "--socket",
            str(self.socket),
            "--state-dir",
            str(self.state_dir),
            "--method",
            self.method,
            *([] if dbus else ["--no-dbus"]),
            "daemon",
        ]

    def start(
        self, env: Mapping[str, str] | None = None, *, dbus: bool = False, wait: bool = True
    ) -> subprocess.Popen[bytes]:
        """Start the daemon; with ``wait``, until `shuttlectl version` answers (bounded)."""
        assert not self.alive, "daemon already running"
        self.starts += 1
        self.killed = self.exit_seen = False
        full_env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        full_env.update(env or {})
        self.proc = self.lab.popen(
            "cli", self.argv(dbus), name=self.log_name, env=full_env, cwd=str(REPO_ROOT)
        )
        if wait:
            self.wait_ready()
        return self.proc

    @property
    def log_name(self) -> str:
        return f"{self.name}-{self.starts}"

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def answering() -> bool:
            if not self.alive:
                raise AssertionError(
                    f"daemon exited with {self.proc and self.proc.returncode}:\n{self.log()}"
                )
            return self.socket.exists() and self.ctl("version").returncode == 0

        wait_for("the daemon's control socket", answering, timeout, detail=self.log)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM by PID and wait; SIGKILL if it does not exit in time. The exit code
        (None when it was SIGKILLed by kill()); the caller now owns checking it."""
        code = self.terminate(timeout)
        self.exit_seen = True
        return code

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        if self.proc is None or self.killed:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.lab.stop(self.proc)
                raise AssertionError(
                    f"daemon ignored SIGTERM for {timeout:g} s:\n{self.log()}"
                ) from None
        return self.proc.returncode

    def kill(self) -> list[psutil.Process]:
        """SIGKILL by PID; returns (and remembers, for cleanup) the children it leaves."""
        assert self.proc is not None
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        self.stale_dirs += [os.path.dirname(path) for path in map(_control_path, children) if path]
        self.proc.kill()
        self.proc.wait(10)
        self.killed = True
        self.orphans += children
        return children

    def cleanup(self) -> None:
        """Stop by PID whatever is left (the daemon, orphaned ssh masters)."""
        if self.proc is not None and self.proc.poll() is None:
            self.lab.stop(self.proc)
        for child in self.orphans:
            with contextlib.suppress(psutil.Error):
                child.kill()  # psutil checks the create time: never a reused pid
        psutil.wait_procs(self.orphans, timeout=5)
        self.orphans = []
        for path in self.stale_dirs:  # ssh control dirs a SIGKILLed daemon could not remove
            shutil.rmtree(path, ignore_errors=True)
        self.stale_dirs = []

    def log(self, lines: int = 60) -> str:
        return self.lab.log_tail(self.log_name, lines)

    # --- shuttlectl ---------------------------------------------------------------------
    def ctl_argv(self, *args: str, user: LabUser | None = None) -> list[str]:
        if user is None:
            return [sys.executable, "-m", "shuttlectl", "--socket", str(self.socket), *args]
        return [
            "env",
            f"PYTHONPATH={REPO_ROOT}",
            user_python(),
            "-m",
            "shuttlectl",
            "--socket",
            str(self.socket),
            *args,
        ]

    def ctl(
        self, *args: str, user: LabUser | None = None, timeout: float = CTL_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run shuttlectl in cli (as root or ``user``); never raises on a non-zero exit."""
        return self.lab.run(
            "cli",
            self.ctl_argv(*args, user=user),
            check=False,
            timeout=timeout,
            user=user,
            cwd=str(REPO_ROOT),
        )

    def ctl_json(
        self, *args: str, user: LabUser | None = None, ok: Sequence[int] = (0,)
    ) -> dict[str, Any]:
        result = self.ctl("--json", *args, user=user)
        assert result.returncode in ok, (
            f"shuttlectl {' '.join(args)} exited {result.returncode}: {result.stderr}\n{self.log()}"
        )
        document: dict[str, Any] = json.loads(result.stdout)
        return document

    def status(self, profile: str) -> dict[str, Any]:
        document = self.ctl_json("status", profile, ok=(0, 7))
        status: dict[str, Any] = document["profile"]
        return status

    def state(self, profile: str) -> str:
        return str(self.status(profile)["state"])

    def stats(self, profile: str) -> dict[str, Any]:
        stats: dict[str, Any] = self.ctl_json("stats", profile)["stats"]
        return stats

    def ssh_pid(self, profile: str) -> int:
        pid = self.stats(profile).get("ssh_pid")
        assert isinstance(pid, int), f"{profile} has no ssh child: {self.stats(profile)}"
        return pid

    def up(self, profile: str, user: LabUser | None = None) -> None:
        result = self.ctl("up", profile, "--timeout", str(UP_TIMEOUT), user=user)
        assert result.returncode == 0, (
            f"up {profile} exited {result.returncode}: {result.stdout}{result.stderr}\n{self.log()}"
        )

    def wait_state(self, profile: str, *states: str, timeout: float = UP_TIMEOUT) -> str:
        """Poll `status --json PROFILE` until its state is one of ``states``; that state."""
        seen: list[str] = []

        def probe() -> str | None:
            state = self.state(profile)
            if not seen or seen[-1] != state:
                seen.append(state)
            return state if state in states else None

        return wait_for(
            f"{profile} to be {'/'.join(states)}",
            probe,
            timeout,
            detail=lambda: f"states seen: {seen}\n{self.log()}",
        )


class Watch:
    """A `watch` subscriber on the control socket, read by a thread; events as dicts.

    Subscribed once the daemon's ok reply arrived, so no event after __init__ is missed.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(daemon.socket))
        self.sock.sendall(
            json.dumps({"v": 1, "id": 1, "verb": "watch", "args": {}}).encode() + b"\n"
        )
        self._stream = self.sock.makefile("rb")
        reply = json.loads(self._stream.readline())
        assert reply.get("ok") is True, f"watch refused: {reply}"
        self.sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in self._stream:
                event = json.loads(line).get("event")
                if isinstance(event, dict):
                    with self._lock:
                        self._events.append(event)

    def events(self, profile: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self._events if profile is None or e.get("profile") == profile]

    def states(self, profile: str) -> list[str]:
        return [str(e.get("state")) for e in self.events(profile) if e.get("type") == "state"]

    def wait_states(self, profile: str, sequence: Sequence[str], timeout: float) -> list[str]:
        """Until ``sequence`` appears, in order (not necessarily adjacent), in the events."""

        def probe() -> list[str] | None:
            states = self.states(profile)
            it = iter(states)
            return states if all(s in it for s in sequence) else None

        return wait_for(
            f"{profile} states {list(sequence)}",
            probe,
            timeout,
            detail=lambda: f"events: {self.states(profile)}\n{self.daemon.log()}",
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


class DaemonSet:
    """Daemons of one test: each stopped by PID at the end, and the ruleset checked."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.daemons: list[Daemon] = []
        self.watches: list[Watch] = []
        self.before: dict[str, str] = {}

    def __enter__(self) -> DaemonSet:
        self.before = self.lab.firewall_snapshot()
        return self

    def new(self, name: str = "daemon", method: str = "nft") -> Daemon:
        root = Path(self.lab.tmpdir) / f"{name}-{len(self.daemons)}"
        if root.exists():
            shutil.rmtree(root)
        daemon = Daemon(self.lab, root, f"{name}-{len(self.daemons)}", method)
        self.daemons.append(daemon)
        return daemon

    def work_up(self, *, autostart: bool = False, **keys: Any) -> Daemon:
        """A new daemon, started, whose one profile "work" (root_profile to the lab's
        target networks, with ``keys``) is up: by its autostart, or else by `up`."""
        daemon = self.new()
        if autostart:
            keys["autostart"] = True
        daemon.write_profile("work", root_profile(self.lab, self.lab.target_nets, **keys))
        daemon.start()
        if autostart:
            daemon.wait_state("work", "up")
        else:
            daemon.up("work")
        return daemon

    def watch(self, daemon: Daemon) -> Watch:
        watch = Watch(daemon)
        self.watches.append(watch)
        return watch

    def __exit__(self, exc_type: object, *exc: object) -> None:
        problems = []
        for watch in self.watches:
            watch.close()
        for daemon in self.daemons:
            try:
                code = None if daemon.exit_seen else daemon.terminate()
            except AssertionError as err:
                problems.append(str(err))
                code = None
            finally:
                daemon.cleanup()
            if code not in (None, 0):
                problems.append(f"{daemon.name} exited {code} on SIGTERM:\n{daemon.log()}")
        for daemon in self.daemons:
            # A kill-switched profile still wanted when its daemon stopped keeps its
            # lockdown (by design): lift it as its user would, before comparing.
            if (daemon.state_dir / "lockdown.json").exists():
                self.lab.run(
                    "cli",
                    [
                        sys.executable,
                        "-m",
                        "shuttled",
                        "--state-dir",
                        str(daemon.state_dir),
                        "cleanup",
                        "--all",
                    ],
                    check=False,
                    cwd=str(REPO_ROOT),
                )
        leftover = nft_table(self.lab)
        if leftover is not None:
            # Leave the next test a clean namespace whatever happened here.
            self.lab.run(
                "cli",
                [sys.executable, "-m", "shuttled", "cleanup"],
                check=False,
                cwd=str(REPO_ROOT),
            )
            problems.append(f"table inet shuttled left behind after SIGTERM:\n{leftover}")
        after = self.lab.firewall_snapshot()
        if after != self.before:
            problems.append("the client's ruleset differs from before the daemons started")
        if problems and exc_type is None:
            raise AssertionError("\n".join(problems))
