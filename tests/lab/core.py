"""The namespace lab: client, ssh server and target network, torn down by PID and namespace.

::

    cli  (client, runs shuttled)      srv  (sshd :22 and :2222,       tgt  (HTTP, echo, bulk,
      10.N.1.1  fd00:N:1::1  ─veth─     IP forwarding OFF)    ─veth─     DNS, UDP echo ...)
                                        10.N.1.2  fd00:N:1::2             10.N.2.2   fd00:N:2::2
                                        10.N.2.1  fd00:N:2::1             10.N.2.200 fd00:N:2::1:2

The client routes the target network (and the fake resolver's net 10.N.3.0/24) via srv, and
srv does not forward: without a tunnel the packets are dropped there, so "unreachable without
the tunnel" is a real negative.  Through the tunnel, sshd on srv connects to tgt itself.

Use it as a context manager (``with Lab() as lab:``) or call ``open()``/``close()``;
``close()`` always runs every teardown step (kill by PID, sweep each namespace by PID,
delete namespaces, /etc/netns dirs, test users, the temp dir) and never raises.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import services as svc
from .env import SBIN_PATH, which
from .netns import (
    enter_netns,
    kill_pids,
    netns_exists,
    netns_id,
    pid_alive,
    pids_of_uid,
    process_start_time,
    sweep_netns,
    terminate_popen,
)

if TYPE_CHECKING:
    from .dropbear import DropbearServer

log = logging.getLogger("tests.lab")

STATE_DIR = Path("/run/shuttled-lab")
ETC_NETNS = Path("/etc/netns")
DNS_ZONE = "corp.shuttled.test"
ROLES = ("cli", "srv", "tgt")
LAN_ROLE = "lan"  # the optional LAN host behind cli (``Lab(lan=True)``)
PREFIX_RE = re.compile(r"^sd\d{1,4}[a-z0-9]{1,4}$")
USER_PREFIX = "sdtest"
WAIT_PORT_TIMEOUT = 15.0
EXTRA_SSHD_PORT = 2300  # the first port of Lab.start_sshd's servers

_counter = itertools.count()
_counter_lock = threading.Lock()
_open_labs: weakref.WeakSet[Lab] = weakref.WeakSet()


@dataclasses.dataclass(frozen=True)
class Ports:
    """Where the lab's services listen (see tests/lab/services.py for the protocols)."""

    ssh: int = 22
    ssh_nofwd: int = 2222
    http: int = svc.HTTP_PORT
    fast_http: int = svc.FAST_HTTP_PORT
    echo: int = svc.ECHO_PORT
    udp_echo: int = svc.UDP_ECHO_PORT
    bulk: int = svc.BULK_PORT
    close_first: int = svc.CLOSE_FIRST_PORT
    closed: int = svc.CLOSED_PORT
    dns: int = svc.DNS_PORT
    iperf3: int = svc.IPERF3_PORT


def forget_namespace_records(ident: tuple[int, int] | None) -> None:
    """shuttled's per-namespace state files (which iptables-nft tables existed before
    it) name the namespace by inode: once the lab deletes the namespace they can never
    be used again, and a SIGKILLed run in it leaves them behind."""
    if ident is None:
        return
    for path in Path("/run/shuttled").glob(f"iptables-tables-{ident[1]}-*.json"):
        path.unlink(missing_ok=True)
    Path(f"/run/shuttled/daemon-{ident[1]}.lock").unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class LabUser:
    """An unprivileged local account made for one lab, with its own key authorized on srv.

    Its ~/.ssh/config knows the hosts ``srv``, ``srv6`` and ``srv-nofwd`` (as this user), so
    a plain ``ssh srv`` run as the user works: what a daemon profile with ``user:`` needs.
    """

    name: str
    uid: int
    gid: int
    home: str
    identity: str
    ssh_config: str
    remote: str = "srv"
    remote_nofwd: str = "srv-nofwd"

    def env(self) -> dict[str, str]:
        return {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": SBIN_PATH,
            "LANG": "C.UTF-8",
            "SHELL": "/bin/bash",
        }


class LabError(RuntimeError):
    pass


class LabCommandError(subprocess.CalledProcessError):
    """A failed ``Lab.run``; its message carries the command's output."""

    def __str__(self) -> str:
        out = []
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                text = data if isinstance(data, str) else data.decode(errors="replace")
                out.append(f"{label}: {text.strip()[-2000:]}")
        return super().__str__() + ("\n" + "\n".join(out) if out else "")


def _new_prefix() -> str:
    for _ in range(1000):
        with _counter_lock:
            n = next(_counter)
        prefix = f"sd{os.getpid() % 10000}{n}"
        if (
            not any(netns_exists(f"{prefix}-{r}") for r in (*ROLES, LAN_ROLE))
            and not (STATE_DIR / f"{prefix}.json").exists()
        ):
            return prefix
    raise LabError("no free lab prefix")


def _net_number(prefix: str) -> int:
    """N in 10.N.x.0/24 and fd00:N:x::/64, derived from the prefix (16..239)."""
    return 16 + zlib.crc32(prefix.encode()) % 224


class Lab:
    """A throwaway three-namespace network with sshd, target services and DNS.

    Parameters: ``prefix`` (default unique per process and call), ``services`` (start the
    target services and the HTTP server), ``sshd`` (start both sshd instances),
    ``sshd_extra`` (extra sshd_config lines for both instances), ``lan`` (router mode: a
    fourth namespace ``lan``, a LAN host with no software of its own behind cli, which
    then forwards; see ``_build_lan``).
    """

    def __init__(
        self,
        prefix: str | None = None,
        *,
        services: bool = True,
        sshd: bool = True,
        sshd_extra: Sequence[str] = (),
        lan: bool = False,
    ) -> None:
        self.prefix = prefix or _new_prefix()
        if len(self.prefix) > 10:
            raise LabError(f"lab prefix {self.prefix!r} too long (max 10 characters)")
        self.want_services = services
        self.want_sshd = sshd
        self.sshd_extra = list(sshd_extra)
        self.ports = Ports()

        # --- names -------------------------------------------------------------------------
        self.ns_cli, self.ns_srv, self.ns_tgt = (f"{self.prefix}-{r}" for r in ROLES)
        self.namespaces = {"cli": self.ns_cli, "srv": self.ns_srv, "tgt": self.ns_tgt}
        self.if_cli = "to-srv"  # in cli
        self.if_srv_cli = "to-cli"  # in srv, towards cli (set_link toggles this one)
        self.if_srv_tgt = "to-tgt"  # in srv, towards tgt
        self.if_tgt = "to-srv"  # in tgt
        # Router mode: lan-host -> cli (the router) -> srv -> tgt.
        self.want_lan = lan
        self.ns_lan = f"{self.prefix}-{LAN_ROLE}"
        if lan:
            self.namespaces[LAN_ROLE] = self.ns_lan
        self.if_cli_lan = "to-lan"  # in cli, towards the LAN host
        self.if_lan = "to-cli"  # in lan

        # --- addresses ---------------------------------------------------------------------
        n = self.net = _net_number(self.prefix)
        self.client_net_v4, self.client_net_v6 = f"10.{n}.1.0/24", f"fd00:{n}:1::/64"
        self.target_net_v4, self.target_net_v6 = f"10.{n}.2.0/24", f"fd00:{n}:2::/64"
        self.target_nets = [self.target_net_v4, self.target_net_v6]
        self.cli_v4, self.cli_v6 = f"10.{n}.1.1", f"fd00:{n}:1::1"
        self.srv_v4, self.srv_v6 = f"10.{n}.1.2", f"fd00:{n}:1::2"
        self.srv_tgt_v4, self.srv_tgt_v6 = f"10.{n}.2.1", f"fd00:{n}:2::1"
        self.tgt_v4, self.tgt_v6 = f"10.{n}.2.2", f"fd00:{n}:2::2"
        # A second target address inside a sub-range, for -x (exclude) tests.
        self.tgt_v4_alt, self.tgt_v6_alt = f"10.{n}.2.200", f"fd00:{n}:2::1:2"
        self.excluded_net_v4, self.excluded_net_v6 = f"10.{n}.2.128/25", f"fd00:{n}:2::1:0/112"
        # The client's resolver: an address nobody owns, routed via srv (dropped there).
        # Only `shuttled run --dns` (which answers from the REMOTE's resolver) makes it work.
        self.resolver_net_v4 = f"10.{n}.3.0/24"
        self.fake_dns_v4 = f"10.{n}.3.53"
        # The remote's resolver (srv's resolv.conf): the DNS responder in tgt.
        self.dns_v4, self.dns_v6 = self.tgt_v4, self.tgt_v6
        self.dns_zone = DNS_ZONE
        # The LAN (only with lan=True): cli is its router; the host has two addresses per
        # family, so a profile can capture one source and not the other.
        self.lan_net_v4, self.lan_net_v6 = f"10.{n}.4.0/24", f"fd00:{n}:4::/64"
        self.router_lan_v4, self.router_lan_v6 = f"10.{n}.4.1", f"fd00:{n}:4::1"
        self.lan_v4, self.lan_v6 = f"10.{n}.4.2", f"fd00:{n}:4::2"
        self.lan_v4_other, self.lan_v6_other = f"10.{n}.4.3", f"fd00:{n}:4::3"
        self.dns_name = f"www.{DNS_ZONE}"
        self.dns_records: dict[str, dict[str, list[str]]] = {
            f"www.{DNS_ZONE}": {"A": [self.tgt_v4], "AAAA": [self.tgt_v6]},
            f"tgt.{DNS_ZONE}": {"A": [self.tgt_v4], "AAAA": [self.tgt_v6]},
            f"alt.{DNS_ZONE}": {"A": [self.tgt_v4_alt], "AAAA": [self.tgt_v6_alt]},
            f"v4only.{DNS_ZONE}": {"A": [self.tgt_v4]},
            f"many.{DNS_ZONE}": {"A": [f"10.{n}.2.{i}" for i in range(10, 50)]},
            DNS_ZONE: {},
        }
        self.http_marker = f"shuttled-lab-ok-{self.prefix}"
        self.http_url_v4 = f"http://{self.tgt_v4}/"
        self.http_url_v6 = f"http://[{self.tgt_v6}]/"
        self.index_html = (
            "<!doctype html>\n<html><head><title>shuttled lab target</title></head>\n"
            f"<body><h1>Hello from the target network</h1>\n<p>{self.http_marker}</p>\n"
            "<p>Served inside namespace tgt, reachable from cli only through the tunnel.</p>\n"
            "</body></html>\n"
        )
        # A 4 MiB binary file on the web server: stream_chunks(BLOB_SEED, BLOB_SIZE).
        self.blob_path, self.blob_seed, self.blob_size = "/blob.bin", 7, 4 << 20

        # --- ssh -----------------------------------------------------------------------------
        self.remote, self.remote6, self.remote_nofwd = "srv", "srv6", "srv-nofwd"
        self.tmpdir = ""
        self.ssh_config = ""
        self.ssh_cmd = ""
        self.ssh_argv: list[str] = []
        self.identity = ""
        self.known_hosts = ""
        self.host_key = ""

        self.users: list[LabUser] = []
        self._extra_sshd_ports = itertools.count(EXTRA_SSHD_PORT)  # start_sshd's
        self._procs: list[tuple[str, subprocess.Popen[Any]]] = []
        self._ns_ids: dict[str, tuple[int, int]] = {}
        self._opened = False
        self._closed = False
        self.teardown_errors: list[str] = []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Lab:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Lab {self.prefix} net={self.net} {'open' if self.is_open else 'closed'}>"

    @property
    def is_open(self) -> bool:
        return self._opened and not self._closed

    def open(self) -> Lab:
        """Build everything; on any failure tear down what was built and re-raise."""
        if self._opened:
            raise LabError("a Lab can be opened once")
        self._opened = True
        _open_labs.add(self)
        t0 = time.monotonic()
        try:
            self.tmpdir = tempfile.mkdtemp(prefix=f"{self.prefix}-lab-")
            # 0711: sshd reads authorized_keys/<user> as that user, who must traverse here.
            os.chmod(self.tmpdir, 0o711)
            (Path(self.tmpdir) / "logs").mkdir()
            self._write_state()
            _raise_nofile()
            self._build_network()
            self._write_resolv_confs()
            self._make_keys_and_configs()
            if self.want_sshd:
                self._start_sshd()
            if self.want_services:
                self._start_services()
        except BaseException:
            log.error("lab %s: setup failed, tearing down", self.prefix)
            self.close()
            raise
        log.info("lab %s up in %.2fs (net %d)", self.prefix, time.monotonic() - t0, self.net)
        return self

    def close(self) -> None:
        """Tear everything down; safe to call twice; never raises (see teardown_errors)."""
        if self._closed or not self._opened:
            self._closed = True
            return
        self._closed = True
        steps = [
            ("stop processes", self._stop_procs),
            ("sweep namespaces", self._sweep_namespaces),
            ("remove users", self._remove_users),
            ("delete namespaces", self._delete_namespaces),
            ("remove /etc/netns", self._remove_etc_netns),
            ("remove temp dir", self._remove_tmpdir),
            ("remove state", self._remove_state),
        ]
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # keep going: every step must get its chance
                self.teardown_errors.append(f"{what}: {exc}")
                log.warning("lab %s teardown: %s: %s", self.prefix, what, exc)
        _open_labs.discard(self)

    # ------------------------------------------------------------------ commands
    def ns(self, role: str) -> str:
        """Namespace name for a role ("cli", "srv", "tgt") or a full name."""
        return self.namespaces.get(role, role)

    def exec_argv(
        self, ns: str, argv: Sequence[str] | str, user: LabUser | str | None = None
    ) -> list[str]:
        """The argv that runs ``argv`` inside namespace ``ns`` (optionally as ``user``)."""
        cmd = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
        if user is not None:
            u = self._user(user)
            cmd = [
                "setpriv",
                f"--reuid={u.uid}",
                f"--regid={u.gid}",
                "--init-groups",
                "--",
                "env",
                "-i",
                *(f"{k}={v}" for k, v in u.env().items()),
                *cmd,
            ]
        return ["ip", "netns", "exec", self.ns(ns), *cmd]

    def run(
        self,
        ns: str,
        argv: Sequence[str] | str,
        *,
        check: bool = True,
        timeout: float = 60.0,
        user: LabUser | str | None = None,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        text: bool = True,
        capture: bool = True,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        """Run to completion inside ``ns`` (a str argv runs under ``sh -c``); output captured."""
        full = self.exec_argv(ns, argv, user)
        try:
            proc = subprocess.run(
                full,
                input=input,
                text=text,
                timeout=timeout,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=None if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture else None,
                stderr=subprocess.PIPE if capture else None,
                check=False,
            )
        except subprocess.TimeoutExpired:
            log.warning("lab %s: timed out after %ss: %s", self.prefix, timeout, shlex.join(full))
            raise
        if check and proc.returncode != 0:
            raise LabCommandError(proc.returncode, full, proc.stdout, proc.stderr)
        return proc

    def popen(
        self,
        ns: str,
        argv: Sequence[str] | str,
        *,
        name: str | None = None,
        user: LabUser | str | None = None,
        env: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> subprocess.Popen[Any]:
        """Start a tracked child inside ``ns`` (own session); stopped by PID at teardown.

        Unless stdout/stderr are given, both go to ``<tmpdir>/logs/<name>.log`` (see
        ``log_path``).  ``ip netns exec`` execs in place, so ``proc.pid`` is the program.
        """
        if not self.is_open:
            raise LabError("lab is not open")
        full = self.exec_argv(ns, argv, user)
        if name is None:
            first = argv if isinstance(argv, str) else (argv[0] if argv else "proc")
            name = f"{Path(first.split()[0] if first.strip() else 'sh').name}-{len(self._procs)}"
        kw.setdefault("stdin", subprocess.DEVNULL)
        logfh = None
        if "stdout" not in kw or "stderr" not in kw:
            logfh = open(self.log_path(name), "ab")  # noqa: SIM115 (handed to the child)
            kw.setdefault("stdout", logfh)
            kw.setdefault("stderr", subprocess.STDOUT if kw["stdout"] is logfh else logfh)
        kw.setdefault("start_new_session", True)
        try:
            proc = subprocess.Popen(full, env=dict(env) if env is not None else None, **kw)
        finally:
            if logfh is not None:
                logfh.close()
        self._procs.append((name, proc))
        return proc

    def spawn(self, ns: str, argv: Sequence[str] | str, **kw: Any) -> subprocess.Popen[Any]:
        """Alias of popen()."""
        return self.popen(ns, argv, **kw)

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
        """Stop one tracked child (SIGTERM, then SIGKILL) and reap it; returns its exit code."""
        return terminate_popen(proc, timeout)

    def netns(self, ns: str) -> contextlib.AbstractContextManager[None]:
        """``with lab.netns("cli"): ...``: sockets made in the block live in that namespace."""
        return enter_netns(self.ns(ns))

    @property
    def pids(self) -> dict[str, int]:
        """Tracked children still running: name -> PID."""
        return {name: p.pid for name, p in self._procs if p.poll() is None}

    def log_path(self, name: str) -> str:
        return os.path.join(self.tmpdir, "logs", f"{name}.log")

    def log_tail(self, name: str, lines: int = 40) -> str:
        try:
            with open(self.log_path(name), errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""

    def logs(self, lines: int = 40) -> dict[str, str]:
        """Tail of every log file of this lab (sshd, services, http, children)."""
        out = {}
        logdir = Path(self.tmpdir, "logs")
        if logdir.is_dir():
            for path in sorted(logdir.glob("*.log")):
                out[path.stem] = self.log_tail(path.stem, lines)
        return out

    # ------------------------------------------------------------------ ssh
    def ssh(
        self, *args: str, host: str | None = None, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``ssh -F <lab config> HOST ARGS...`` from cli."""
        return self.run(
            "cli", [*self.ssh_argv, host or self.remote, *args], check=check, timeout=timeout
        )

    def add_user(self) -> LabUser:
        """Create an unprivileged user ``sdtest<N>`` whose key srv accepts; removed at teardown."""
        if not self.is_open:
            raise LabError("lab is not open")
        extra = f"x{len(self.users)}" if self.users else ""
        name = f"{USER_PREFIX}{self.prefix[2:]}{extra}"
        self._write_state(extra_user=name)
        # Password "*": no password login, but not "locked" (sshd refuses locked accounts).
        subprocess.run(
            [
                "useradd",
                "--create-home",
                "--shell",
                "/bin/bash",
                "--user-group",
                "--password",
                "*",
                "--comment",
                f"shuttled lab {self.prefix}",
                name,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": SBIN_PATH},
        )
        pw = pwd.getpwnam(name)
        sshdir = Path(pw.pw_dir, ".ssh")
        sshdir.mkdir(mode=0o700, exist_ok=True)
        identity = sshdir / "id_ed25519"
        _keygen(identity, f"{name}@cli")
        shutil.copy(self.known_hosts, sshdir / "known_hosts")
        config = sshdir / "config"
        config.write_text(
            self._client_config(str(identity), str(sshdir / "known_hosts"), user=None)
        )
        for path in (
            sshdir,
            identity,
            identity.with_suffix(".pub"),
            sshdir / "known_hosts",
            config,
        ):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        os.chmod(config, 0o600)
        self._authorize(name, identity.with_suffix(".pub").read_text())
        user = LabUser(
            name=name,
            uid=pw.pw_uid,
            gid=pw.pw_gid,
            home=pw.pw_dir,
            identity=str(identity),
            ssh_config=str(config),
        )
        self.users.append(user)
        return user

    def remove_user(self, user: LabUser | str) -> None:
        """Kill the user's processes (by uid) and delete the account and its home now."""
        u = self._user(user)
        self._delete_user(u)
        self.users.remove(u)
        self._write_state()

    def start_dropbear(self, user: LabUser, **kw: Any) -> DropbearServer:
        """A real Dropbear on srv beside sshd, logging in ``user`` (see dropbear.py)."""
        from .dropbear import start_dropbear

        return start_dropbear(self, user, **kw)

    # ------------------------------------------------------------------ network control
    def set_link(self, up: bool, *, wait: bool = True, timeout: float = 10.0) -> None:
        """Cut (``up=False``) or restore the cli<->srv link (srv's side of the veth).

        The client keeps its addresses and routes (it sees carrier loss); packets are
        dropped until the link is back.  With ``wait``, restoring waits (bounded) until cli
        reaches srv's sshd over IPv4 and IPv6 again.
        """
        self._ip(self.ns_srv, ["link", "set", self.if_srv_cli, "up" if up else "down"])
        if not up:
            return
        self._ip_batch(self.ns_cli, self._cli_routes())
        self._ip_batch(self.ns_tgt, self._tgt_routes())
        if wait and self.want_sshd:
            with self.netns("cli"):
                for addr in (self.srv_v4, self.srv_v6):
                    _wait_port(
                        addr, self.ports.ssh, timeout, what=f"srv sshd after link up ({addr})"
                    )

    def set_dns_silent(self, silent: bool) -> None:
        """Make the DNS responder drop (log but not answer) queries, or answer again."""
        flag = Path(self.tmpdir, "dns-silent")
        if silent:
            flag.touch()
        else:
            flag.unlink(missing_ok=True)

    @contextlib.contextmanager
    def dns_tcp_closed(self, how: str) -> Iterator[None]:
        """The DNS responder in tgt answers over UDP only while in the block: TCP 53 is
        refused (``how="refuse"``: a reset, as a closed port) or black-holed
        (``"drop"``: no answer at all), by an nft table of its own in tgt."""
        verdict = {"refuse": "reject with tcp reset", "drop": "drop"}[how]
        table = "table inet lab_dns_tcp {\n chain input {\n  type filter hook input "
        table += f"priority 0; policy accept;\n  tcp dport {svc.DNS_PORT} {verdict}\n }}\n}}\n"
        self.run("tgt", ["nft", "-f", "-"], input=table)
        try:
            yield
        finally:
            self.run("tgt", ["nft", "delete", "table", "inet", "lab_dns_tcp"], check=False)

    def dns_queries(self) -> list[tuple[str, str, str]]:
        """Queries the responder saw, oldest first: (proto, name, type); proto is udp, tcp,
        udp-silent or tcp-silent."""
        try:
            text = Path(self.tmpdir, "logs", "dns-queries.log").read_text()
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3:
                out.append((parts[0], parts[1], parts[2]))
        return out

    def clear_dns_queries(self) -> None:
        with contextlib.suppress(OSError):
            Path(self.tmpdir, "logs", "dns-queries.log").write_text("")

    def http_requests(self) -> list[str]:
        """Request lines logged by the HTTP server on port 80, client address first
        (IPv4 clients shown as plain IPv4, not ::ffff:-mapped)."""
        lines = [ln for ln in self.log_tail("http", 100000).splitlines() if '"' in ln]
        return [ln.removeprefix("::ffff:") for ln in lines]

    def start_iperf3(self, port: int | None = None) -> subprocess.Popen[Any]:
        """Start ``iperf3 -s`` in tgt (tracked); waits until it accepts."""
        port = port or self.ports.iperf3
        proc = self.popen("tgt", ["iperf3", "-s", "-p", str(port)], name=f"iperf3-{port}")
        with self.netns("tgt"):
            _wait_port(self.tgt_v4, port, WAIT_PORT_TIMEOUT, what="iperf3", proc=proc)
        return proc

    def firewall_snapshot(self, ns: str = "cli") -> dict[str, str]:
        """nft ruleset and normalized iptables-save/ip6tables-save of ``ns`` (for equality
        checks before and after a run; comments and counters are dropped)."""
        out = {"nft": self.run(ns, ["nft", "list", "ruleset"]).stdout}
        for tool in ("iptables-save", "ip6tables-save"):
            if which(tool):
                text = self.run(ns, [tool], check=False).stdout or ""
                out[tool] = "\n".join(
                    re.sub(r"\[\d+:\d+\]", "[0:0]", ln)
                    for ln in text.splitlines()
                    if not ln.startswith("#")
                )
        return out

    def fs_snapshot(
        self,
        roots: Sequence[str] = ("/tmp", "/var/tmp", "/dev/shm"),
        *,
        uid: int | None = None,
        limit: int = 200000,
    ) -> set[str]:
        """Paths under ``roots`` (recursive, at most ``limit``), optionally only those owned
        by ``uid``; this lab's own temp dir is left out.

        srv shares this machine's filesystem, so this is "the remote's filesystem": compare
        a snapshot before and after a fallback-mode run (with a ``LabUser``, pass its uid
        and add its home to ``roots``: nothing else writes there).
        """
        found: set[str] = set()
        skip = os.path.realpath(self.tmpdir) if self.tmpdir else None
        for root in roots:
            for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: None):
                if skip and os.path.realpath(dirpath) == skip:
                    dirnames[:] = []
                    continue
                for name in dirnames + filenames:
                    path = os.path.join(dirpath, name)
                    if skip and os.path.realpath(path) == skip:
                        continue
                    if uid is not None:
                        try:
                            if os.lstat(path).st_uid != uid:
                                continue
                        except OSError:
                            continue
                    found.add(path)
                    if len(found) >= limit:
                        return found
        return found

    def describe(self) -> str:
        """A short human description of the topology (for the demo and the bench)."""
        return (
            f"lab {self.prefix} (namespaces {self.ns_cli}, {self.ns_srv}, {self.ns_tgt})\n"
            f"  cli {self.cli_v4} {self.cli_v6}\n"
            f"   |  veth\n"
            f"  srv {self.srv_v4} {self.srv_v6}  sshd :22 (forwarding), :2222 (no forwarding)\n"
            f"      {self.srv_tgt_v4} {self.srv_tgt_v6}  IP forwarding off\n"
            f"   |  veth\n"
            f"  tgt {self.tgt_v4} {self.tgt_v6}  http :80, echo :7, bulk :5001, dns :53\n"
            f"  target networks: {self.target_net_v4} {self.target_net_v6}\n"
            f"  ssh: {self.ssh_cmd} {self.remote}"
        )

    # ------------------------------------------------------------------ setup steps
    def _state_path(self) -> Path:
        return STATE_DIR / f"{self.prefix}.json"

    def _write_state(self, extra_user: str | None = None) -> None:
        """Record what we own before creating it, so a later run can clean up after a crash."""
        STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        users = [u.name for u in self.users] + ([extra_user] if extra_user else [])
        state = {
            "prefix": self.prefix,
            "owner_pid": os.getpid(),
            "owner_start": process_start_time(os.getpid()),
            "namespaces": list(self.namespaces.values()),
            "etc_netns": [str(ETC_NETNS / ns) for ns in self.namespaces.values()],
            "users": users,
            "tmpdir": self.tmpdir,
        }
        tmp = self._state_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self._state_path())

    def _ip(self, ns: str, args: Sequence[str]) -> None:
        subprocess.run(
            ["ip", "-n", ns, *args], check=True, capture_output=True, text=True, timeout=30
        )

    def _ip_batch(self, ns: str, lines: Sequence[str]) -> None:
        proc = subprocess.run(
            ["ip", "-n", ns, "-batch", "-"],
            input="\n".join(lines) + "\n",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise LabError(f"ip -n {ns} -batch failed: {proc.stderr.strip()}\n" + "\n".join(lines))

    def _sysctl(self, ns: str, settings: Mapping[str, str]) -> None:
        args = [f"{k}={v}" for k, v in settings.items()]
        self.run(ns, ["sysctl", "-q", "-w", *args], timeout=30)

    def _cli_routes(self) -> list[str]:
        return [
            f"route replace {self.target_net_v4} via {self.srv_v4}",
            f"route replace {self.resolver_net_v4} via {self.srv_v4}",
            f"route replace {self.target_net_v6} via {self.srv_v6}",
        ]

    def _tgt_routes(self) -> list[str]:
        return [
            f"route replace default via {self.srv_tgt_v4}",
            f"route replace default via {self.srv_tgt_v6}",
        ]

    def _build_network(self) -> None:
        for ns in self.namespaces.values():
            subprocess.run(
                ["ip", "netns", "add", ns], check=True, capture_output=True, text=True, timeout=30
            )
            ident = netns_id(ns)
            if ident is None:
                raise LabError(f"namespace {ns} vanished after creation")
            self._ns_ids[ns] = ident
        base = {
            "net.ipv6.conf.all.disable_ipv6": "0",
            "net.ipv6.conf.default.disable_ipv6": "0",
            "net.ipv6.conf.all.accept_dad": "0",
            "net.ipv6.conf.default.accept_dad": "0",
            "net.ipv6.conf.all.keep_addr_on_down": "1",
            "net.ipv6.conf.default.keep_addr_on_down": "1",
            "net.ipv6.conf.all.accept_ra": "0",
            "net.ipv6.conf.default.accept_ra": "0",
            "net.ipv4.ip_forward": "0",
            "net.ipv6.conf.all.forwarding": "0",
            "net.ipv6.conf.default.forwarding": "0",
        }
        for ns in self.namespaces.values():
            self._sysctl(ns, base)
        self._ip(
            self.ns_cli,
            [
                "link",
                "add",
                self.if_cli,
                "type",
                "veth",
                "peer",
                "name",
                self.if_srv_cli,
                "netns",
                self.ns_srv,
            ],
        )
        self._ip(
            self.ns_srv,
            [
                "link",
                "add",
                self.if_srv_tgt,
                "type",
                "veth",
                "peer",
                "name",
                self.if_tgt,
                "netns",
                self.ns_tgt,
            ],
        )
        self._ip_batch(
            self.ns_cli,
            [
                "link set lo up",
                f"addr add {self.cli_v4}/24 dev {self.if_cli}",
                f"addr add {self.cli_v6}/64 dev {self.if_cli} nodad",
                f"link set {self.if_cli} up",
                *self._cli_routes(),
            ],
        )
        self._ip_batch(
            self.ns_srv,
            [
                "link set lo up",
                f"addr add {self.srv_v4}/24 dev {self.if_srv_cli}",
                f"addr add {self.srv_v6}/64 dev {self.if_srv_cli} nodad",
                f"addr add {self.srv_tgt_v4}/24 dev {self.if_srv_tgt}",
                f"addr add {self.srv_tgt_v6}/64 dev {self.if_srv_tgt} nodad",
                f"link set {self.if_srv_cli} up",
                f"link set {self.if_srv_tgt} up",
            ],
        )
        self._ip_batch(
            self.ns_tgt,
            [
                "link set lo up",
                f"addr add {self.tgt_v4}/24 dev {self.if_tgt}",
                f"addr add {self.tgt_v4_alt}/24 dev {self.if_tgt}",
                f"addr add {self.tgt_v6}/64 dev {self.if_tgt} nodad",
                f"addr add {self.tgt_v6_alt}/64 dev {self.if_tgt} nodad",
                f"link set {self.if_tgt} up",
                *self._tgt_routes(),
            ],
        )
        fwd = self.run(
            self.ns_srv, ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]
        ).stdout.split()
        if fwd != ["0", "0"]:
            raise LabError(f"IP forwarding on srv is not off: {fwd}")
        if self.want_lan:
            self._build_lan()

    def _build_lan(self) -> None:
        """lan-host -veth- cli, default routes via cli, forwarding on in cli (a router)."""
        self._ip(
            self.ns_cli,
            [
                "link",
                "add",
                self.if_cli_lan,
                "type",
                "veth",
                "peer",
                "name",
                self.if_lan,
                "netns",
                self.ns_lan,
            ],
        )
        self._ip_batch(
            self.ns_cli,
            [
                f"addr add {self.router_lan_v4}/24 dev {self.if_cli_lan}",
                f"addr add {self.router_lan_v6}/64 dev {self.if_cli_lan} nodad",
                f"link set {self.if_cli_lan} up",
            ],
        )
        self._ip_batch(
            self.ns_lan,
            [
                "link set lo up",
                f"addr add {self.lan_v4}/24 dev {self.if_lan}",
                f"addr add {self.lan_v4_other}/24 dev {self.if_lan}",
                f"addr add {self.lan_v6}/64 dev {self.if_lan} nodad",
                # Deprecated: usable when bound to, never picked as a source by itself.
                f"addr add {self.lan_v6_other}/64 dev {self.if_lan} nodad preferred_lft 0",
                f"link set {self.if_lan} up",
                f"route replace default via {self.router_lan_v4}",
                f"route replace default via {self.router_lan_v6}",
            ],
        )
        self._sysctl(self.ns_cli, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})

    def set_router_forwarding(self, on: bool) -> None:
        """Turn IP forwarding in cli (the LAN's router) on or off, both families."""
        value = "1" if on else "0"
        self._sysctl(
            self.ns_cli, {"net.ipv4.ip_forward": value, "net.ipv6.conf.all.forwarding": value}
        )

    def _write_resolv_confs(self) -> None:
        confs = {
            self.ns_cli: f"nameserver {self.fake_dns_v4}\noptions timeout:1 attempts:2\n",
            self.ns_srv: f"nameserver {self.dns_v4}\noptions timeout:1 attempts:2\n",
            self.ns_tgt: "nameserver 127.0.0.1\n",
        }
        if self.want_lan:  # the LAN host asks its router, as DHCP would tell it to
            confs[self.ns_lan] = f"nameserver {self.router_lan_v4}\noptions timeout:1 attempts:2\n"
        for ns, text in confs.items():
            d = ETC_NETNS / ns
            d.mkdir(parents=True, exist_ok=True)
            (d / "resolv.conf").write_text(f"# shuttled lab {self.prefix}\n{text}")

    def _client_config(self, identity: str, known_hosts: str, user: str | None) -> str:
        hosts = [
            (self.remote, self.srv_v4, self.ports.ssh),
            (self.remote6, self.srv_v6, self.ports.ssh),
            (self.remote_nofwd, self.srv_v4, self.ports.ssh_nofwd),
            (f"{self.remote_nofwd}6", self.srv_v6, self.ports.ssh_nofwd),
        ]
        out = [f"# shuttled lab {self.prefix}"]
        for alias, addr, port in hosts:
            out += [f"Host {alias}", f"    HostName {addr}", f"    Port {port}", ""]
        out += (
            ["Host *"]
            + ([f"    User {user}"] if user else [])
            + [
                f"    IdentityFile {identity}",
                "    IdentitiesOnly yes",
                f"    UserKnownHostsFile {known_hosts}",
                "    GlobalKnownHostsFile /dev/null",
                "    StrictHostKeyChecking yes",
                "    BatchMode yes",
                "    CheckHostIP no",
                "    UpdateHostKeys no",
                "    ConnectTimeout 10",
                "    LogLevel ERROR",
                "",
            ]
        )
        return "\n".join(out)

    def _make_keys_and_configs(self) -> None:
        tmp = Path(self.tmpdir)
        self.host_key = str(tmp / "ssh_host_ed25519_key")
        _keygen(Path(self.host_key), f"srv.{self.prefix}")
        self.identity = str(tmp / "id_ed25519")
        _keygen(Path(self.identity), f"root@cli.{self.prefix}")
        (tmp / "authorized_keys").mkdir(mode=0o755)
        self._authorize("root", Path(self.identity + ".pub").read_text())
        hostpub = " ".join(Path(self.host_key + ".pub").read_text().split()[:2])
        names = [
            self.srv_v4,
            f"[{self.srv_v4}]:*",  # every port: :2222 and those of start_sshd
            self.srv_v6,
            f"[{self.srv_v6}]:*",
        ]
        self.known_hosts = str(tmp / "known_hosts")
        Path(self.known_hosts).write_text(f"{','.join(names)} {hostpub}\n")
        os.chmod(self.known_hosts, 0o644)
        self.ssh_config = str(tmp / "ssh_config")
        Path(self.ssh_config).write_text(
            self._client_config(self.identity, self.known_hosts, user="root")
        )
        self.ssh_argv = ["ssh", "-F", self.ssh_config]
        self.ssh_cmd = shlex.join(self.ssh_argv)

    def _authorize(self, user: str, pubkey: str) -> None:
        path = Path(self.tmpdir, "authorized_keys", user)
        path.write_text(pubkey)
        os.chmod(path, 0o644)

    def _sshd_config(self, port: int, forwarding: bool, first: Sequence[str] = ()) -> str:
        tmp = self.tmpdir
        lines = [
            f"# shuttled lab {self.prefix}: sshd on port {port}",
            # sshd takes a keyword's first value: these override the lab's own below.
            *first,
            f"Port {port}",
            "AddressFamily any",
            "ListenAddress 0.0.0.0",
            "ListenAddress ::",
            f"HostKey {self.host_key}",
            f"PidFile {tmp}/sshd-{port}.pid",
            f"AuthorizedKeysFile {tmp}/authorized_keys/%u",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            f"AllowTcpForwarding {'yes' if forwarding else 'no'}",
            "AllowStreamLocalForwarding no",
            "X11Forwarding no",
            "PermitTunnel no",
            "LogLevel VERBOSE",
            "MaxStartups 200:30:400",
            "MaxSessions 100",
            # bash sources ~/.bashrc for ssh commands; where that runs `pyenv init`,
            # a rehash lock left by a killed session would stall every command 60 s.
            "SetEnv PYENV_REHASH_TIMEOUT=0",
            "Subsystem sftp internal-sftp",
            *self.sshd_extra,
            "",
        ]
        return "\n".join(lines)

    def _start_sshd(self) -> None:
        for port, forwarding in ((self.ports.ssh, True), (self.ports.ssh_nofwd, False)):
            self._run_sshd(port, self._sshd_config(port, forwarding))

    def start_sshd(self, options: Sequence[str]) -> int:
        """One more sshd in srv, the lab's forwarding one with ``options`` (sshd_config
        lines, e.g. ``["PermitOpen 10.N.2.2:80", "MaxSessions 0"]``) taking precedence, on
        a port of its own; returns the port (``ssh -p PORT srv``). Stopped by PID at
        teardown, like the lab's own two."""
        if not self.is_open:
            raise LabError("lab is not open")
        port = next(self._extra_sshd_ports)
        self._run_sshd(port, self._sshd_config(port, True, first=options))
        return port

    def _run_sshd(self, port: int, config: str) -> None:
        sshd = which("sshd")
        if sshd is None:
            raise LabError("sshd not found")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        cfg = os.path.join(self.tmpdir, f"sshd_config-{port}")
        Path(cfg).write_text(config)
        check = self.run("srv", [sshd, "-t", "-f", cfg], check=False)
        if check.returncode != 0:
            raise LabError(f"sshd -t rejected {cfg}: {check.stderr.strip()}")
        proc = self.popen("srv", [sshd, "-D", "-e", "-f", cfg], name=f"sshd-{port}")
        with self.netns("srv"):
            _wait_port(
                self.srv_v4,
                port,
                WAIT_PORT_TIMEOUT,
                what=f"sshd :{port}",
                proc=proc,
                log_tail=lambda: self.log_tail(f"sshd-{port}"),
            )

    def _start_services(self) -> None:
        tmp = Path(self.tmpdir)
        www = tmp / "www"
        www.mkdir(mode=0o755)
        (www / "index.html").write_text(self.index_html)
        with open(www / self.blob_path.lstrip("/"), "wb") as fh:
            for chunk in svc.stream_chunks(self.blob_seed, self.blob_size):
                fh.write(chunk)
        ready = tmp / "services.ready"
        cfg = {
            "addresses": [self.tgt_v4, self.tgt_v4_alt, self.tgt_v6, self.tgt_v6_alt],
            "zone": self.dns_zone,
            "records": self.dns_records,
            "query_log": str(tmp / "logs" / "dns-queries.log"),
            "silent_flag": str(tmp / "dns-silent"),
            "ready_file": str(ready),
            "index_html": self.index_html,
        }
        cfg_path = tmp / "services.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        script = str(Path(svc.__file__).resolve())
        proc = self.popen("tgt", [sys.executable, "-u", script, str(cfg_path)], name="services")
        http = self.popen(
            "tgt",
            [
                sys.executable,
                "-u",
                "-m",
                "http.server",
                str(self.ports.http),
                "--bind",
                "::",
                "--directory",
                str(www),
            ],
            name="http",
        )
        deadline = time.monotonic() + WAIT_PORT_TIMEOUT
        while not ready.exists():
            if proc.poll() is not None:
                raise LabError(
                    f"services exited ({proc.returncode}):\n" + self.log_tail("services")
                )
            if time.monotonic() > deadline:
                raise LabError("services not ready in time:\n" + self.log_tail("services"))
            time.sleep(0.02)
        with self.netns("tgt"):
            for addr in (self.tgt_v4, self.tgt_v6):
                _wait_port(
                    addr,
                    self.ports.http,
                    WAIT_PORT_TIMEOUT,
                    what="http.server",
                    proc=http,
                    log_tail=lambda: self.log_tail("http"),
                )

    # ------------------------------------------------------------------ teardown steps
    def _stop_procs(self) -> None:
        for _name, proc in reversed(self._procs):
            terminate_popen(proc, timeout=3.0)

    def _sweep_namespaces(self) -> None:
        left = []
        for ident in self._ns_ids.values():
            left += sweep_netns(ident)
        if left:
            raise LabError(f"processes survived SIGKILL: {sorted(set(left))}")

    def _remove_users(self) -> None:
        problems = []
        for user in list(self.users):
            try:
                self._delete_user(user)
            except LabError as exc:
                problems.append(str(exc))
        if problems:
            raise LabError("; ".join(problems))

    def _delete_user(self, user: LabUser) -> None:
        kill_pids(pids_of_uid(user.uid))
        proc = subprocess.run(
            ["userdel", "--remove", "--force", user.name],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": SBIN_PATH},
        )
        # 12: could not remove the mail spool/home (e.g. none made): the user is gone.
        if proc.returncode not in (0, 12):
            raise LabError(f"userdel {user.name}: {proc.stderr.strip()}")

    def _delete_namespaces(self) -> None:
        problems = []
        for ns in self.namespaces.values():
            if not netns_exists(ns) or (ns in self._ns_ids and netns_id(ns) != self._ns_ids[ns]):
                continue
            forget_namespace_records(netns_id(ns))
            proc = subprocess.run(
                ["ip", "netns", "delete", ns], capture_output=True, text=True, timeout=30
            )
            if proc.returncode != 0:
                problems.append(f"{ns}: {proc.stderr.strip()}")
        if problems:
            raise LabError("ip netns delete: " + "; ".join(problems))

    def _remove_etc_netns(self) -> None:
        for ns in self.namespaces.values():
            shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        with contextlib.suppress(OSError):
            ETC_NETNS.rmdir()  # only when empty: other tools may use it too

    def _remove_tmpdir(self) -> None:
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _remove_state(self) -> None:
        self._state_path().unlink(missing_ok=True)

    def _user(self, user: LabUser | str) -> LabUser:
        if isinstance(user, LabUser):
            return user
        for u in self.users:
            if u.name == user:
                return u
        raise LabError(f"unknown lab user {user!r}")


# ---------------------------------------------------------------------- helpers
def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _raise_nofile() -> None:
    """Raise our soft fd limit (children inherit it: sshd, services, shuttled, tests)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard if hard != resource.RLIM_INFINITY else 65536, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _wait_port(
    addr: str,
    port: int,
    timeout: float,
    *,
    what: str,
    proc: subprocess.Popen[Any] | None = None,
    log_tail: Any = None,
) -> None:
    """Wait (bounded) until ``addr:port`` accepts a TCP connection in the current netns."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    for _ in range(100000):
        if proc is not None and proc.poll() is not None:
            tail = log_tail() if log_tail else ""
            raise LabError(f"{what} exited with {proc.returncode} before accepting\n{tail}")
        try:
            with socket.create_connection((addr, port), timeout=0.5):
                return
        except OSError as exc:
            last = exc
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    tail = log_tail() if log_tail else ""
    raise LabError(f"{what}: {addr}:{port} not accepting after {timeout}s ({last})\n{tail}")


def open_labs() -> list[Lab]:
    return list(_open_labs)


@atexit.register
def _close_all_at_exit() -> None:
    for lab in list(_open_labs):
        lab.close()


def cleanup_stale(verbose: bool = False) -> list[str]:
    """Tear down labs whose owning process is gone (after a crash or SIGKILL).

    Only labs with a state record in /run/shuttled-lab are touched; a record is written
    before anything is created, so every leftover has one.  Returns the cleaned prefixes.
    """
    cleaned: list[str] = []
    if not STATE_DIR.is_dir():
        return cleaned
    for path in sorted(STATE_DIR.glob("*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        pid, start = state.get("owner_pid"), state.get("owner_start")
        if isinstance(pid, int) and pid_alive(pid) and process_start_time(pid) == start:
            continue  # its owner is alive: not ours to touch
        prefix = str(state.get("prefix", path.stem))
        if not PREFIX_RE.match(prefix):
            continue
        if verbose:
            print(f"cleaning stale lab {prefix} (owner pid {pid} is gone)")
        for ns in state.get("namespaces", []):
            if ns.startswith(prefix + "-") and netns_exists(ns):
                sweep_netns(netns_id(ns))
        for name in state.get("users", []):
            if name.startswith(USER_PREFIX):
                with contextlib.suppress(KeyError):
                    kill_pids(pids_of_uid(pwd.getpwnam(name).pw_uid))
                subprocess.run(
                    ["userdel", "--remove", "--force", name],
                    capture_output=True,
                    timeout=30,
                    env={"PATH": SBIN_PATH},
                    check=False,
                )
        for ns in state.get("namespaces", []):
            if ns.startswith(prefix + "-") and netns_exists(ns):
                subprocess.run(
                    ["ip", "netns", "delete", ns], capture_output=True, timeout=30, check=False
                )
        for d in state.get("etc_netns", []):
            if Path(d).parent == ETC_NETNS and Path(d).name.startswith(prefix + "-"):
                shutil.rmtree(d, ignore_errors=True)
        tmpdir = state.get("tmpdir") or ""
        if tmpdir and Path(tmpdir).name.startswith(f"{prefix}-lab-"):
            shutil.rmtree(tmpdir, ignore_errors=True)
        path.unlink(missing_ok=True)
        cleaned.append(prefix)
    return cleaned
