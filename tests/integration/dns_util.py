"""Plumbing for the DNS tests: the client's own resolver, a packet counter, the lab with a
hosts file only the remote has, and a real systemd-resolved beside a private bus.

- `DnsLab`: the lab, plus /etc/netns/<srv>/hosts, which `ip netns exec` bind-mounts over
  /etc/hosts for everything started in srv (sshd included) and only there: srv shares
  this machine's filesystem, whose own /etc/hosts must not change.
- `LocalResolver`: the client's ORIGINAL resolver, which split DNS must keep using: a
  DNS responder (UDP and TCP) on `lab.fake_dns_v4`, added to cli's lo for the test, that
  knows only `*.public.test` and logs every query.
- `LeakCounter`: nft counters in a table of their own in cli, on port-53 packets leaving
  through the outside link; removed afterwards.
- `RealResolved`: systemd-resolved from its Debian package, unpacked (never installed:
  installing rewrites this machine's /etc/resolv.conf), run in cli as an unprivileged
  user with the capabilities its unit grants, in a mount namespace of its own (its
  /run/systemd is a tmpfs), on a private dbus-daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon_util import wait_for
from tests.lab import Lab
from tests.lab.core import ETC_NETNS
from tests.lab.services import DnsFormatError, DnsZone
from tests.unit.resolve1_recorder import private_bus

PUBLIC_ZONE = "public.test"
PUBLIC_NAME = f"www.{PUBLIC_ZONE}"
PUBLIC_ADDRESS = "192.0.2.80"
REMOTE_ONLY_NAME = "build01.remote-only.test"
REMOTE_ONLY_SHORT = "build01"
RESOLVED_CACHE = Path(tempfile.gettempdir()) / "shuttled-test-systemd-resolved"


class DnsLab(Lab):
    """The lab, with a name in srv's /etc/hosts that nothing else knows."""

    def _write_resolv_confs(self) -> None:
        super()._write_resolv_confs()
        base = Path("/etc/hosts").read_text()
        extra = (
            f"\n# shuttled lab {self.prefix}: only the remote knows these\n"
            f"{self.tgt_v4}\t{REMOTE_ONLY_NAME} {REMOTE_ONLY_SHORT}\n"
            f"{self.tgt_v6}\t{REMOTE_ONLY_NAME}\n"
        )
        (ETC_NETNS / self.ns_srv / "hosts").write_text(base + extra)


# --- the client's own resolver --------------------------------------------------------------


class LocalResolver:
    """UDP and TCP DNS on one address inside cli, served by a thread; stopped by stop()."""

    def __init__(
        self, lab: Lab, address: str, records: dict[str, dict[str, list[str]]] | None = None
    ) -> None:
        self.lab = lab
        self.address = address
        self.queries: list[tuple[str, str, str]] = []
        self._zone = DnsZone(
            PUBLIC_ZONE, {PUBLIC_NAME: {"A": [PUBLIC_ADDRESS]}, PUBLIC_ZONE: {}, **(records or {})}
        )
        self._stop = threading.Event()
        lab._ip(lab.ns_cli, ["addr", "add", f"{address}/32", "dev", "lo"])
        try:
            with lab.netns("cli"):
                self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._udp.bind((address, 53))
                self._tcp = socket.create_server((address, 53))
        except BaseException:
            self._remove_address()
            raise
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def names(self) -> list[str]:
        return [name for _, name, _ in self.queries]

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._udp, self._tcp], [], [], 0.1)
            for sock in ready:
                with contextlib.suppress(OSError, DnsFormatError, struct.error):
                    self._answer_udp() if sock is self._udp else self._answer_tcp()

    def _answer_udp(self) -> None:
        query, peer = self._udp.recvfrom(65535)
        reply, name, qtype = self._zone.answer(query, 512)
        self.queries.append(("udp", name, qtype))
        self._udp.sendto(reply, peer)

    def _answer_tcp(self) -> None:
        conn, _ = self._tcp.accept()
        with conn:
            conn.settimeout(2)
            length = struct.unpack(">H", conn.recv(2, socket.MSG_WAITALL))[0]
            query = conn.recv(length, socket.MSG_WAITALL)
            reply, name, qtype = self._zone.answer(query, None)
            self.queries.append(("tcp", name, qtype))
            conn.sendall(struct.pack(">H", len(reply)) + reply)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._udp.close()
        self._tcp.close()
        self._remove_address()

    def _remove_address(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.lab._ip(self.lab.ns_cli, ["addr", "del", f"{self.address}/32", "dev", "lo"])


@contextlib.contextmanager
def local_resolver(
    lab: Lab, records: dict[str, dict[str, list[str]]] | None = None
) -> Iterator[LocalResolver]:
    resolver = LocalResolver(lab, lab.fake_dns_v4, records)
    try:
        yield resolver
    finally:
        resolver.stop()


# --- packets leaving ---------------------------------------------------------------------------


class LeakCounter:
    """Counts port-53 packets, and packets to `nets`, that leave cli through its outside
    link (postrouting: after NAT and every output hook)."""

    TABLE = ("inet", "leakcheck")

    def __init__(self, lab: Lab, nets: Sequence[str] = ()) -> None:
        self.lab = lab
        link = lab.if_cli
        rules = [
            f'oifname "{link}" udp dport 53 counter',
            f'oifname "{link}" tcp dport 53 counter',
            *(f'oifname "{link}" {"ip6" if ":" in n else "ip"} daddr {n} counter' for n in nets),
        ]
        body = "".join(f"  {rule}\n" for rule in rules)
        # Postrouting: only what really leaves, after every output hook of ours.
        lab.run(
            "cli",
            ["nft", "-f", "-"],
            input=(
                "table inet leakcheck {\n chain out {\n"
                f"  type filter hook postrouting priority 100; policy accept;\n{body} }}\n}}\n"
            ),
        )

    def packets(self) -> int:
        listed = json.loads(self.lab.run("cli", ["nft", "-j", "list", "table", *self.TABLE]).stdout)
        return sum(
            expr["counter"]["packets"]
            for item in listed["nftables"]
            for expr in item.get("rule", {}).get("expr", [])
            if "counter" in expr
        )

    def remove(self) -> None:
        self.lab.run("cli", ["nft", "delete", "table", *self.TABLE], check=False)


@contextlib.contextmanager
def leak_counter(lab: Lab, nets: Sequence[str] = ()) -> Iterator[LeakCounter]:
    counter = LeakCounter(lab, nets)
    try:
        yield counter
    finally:
        counter.remove()


def our_links(lab: Lab, ns: str = "cli") -> list[str]:
    listed = json.loads(lab.run(ns, ["ip", "-j", "link", "show"]).stdout)
    return sorted(link["ifname"] for link in listed if link["ifname"].startswith("shuttled-"))


# --- a real systemd-resolved -------------------------------------------------------------------


def resolved_package() -> Path | None:
    """The unpacked systemd-resolved package (downloaded once), or None where apt cannot
    fetch it (no network, not Debian). Never installed: only `dpkg -x` into a directory."""
    binary = RESOLVED_CACHE / "root" / "lib" / "systemd" / "systemd-resolved"
    if binary.exists():
        return RESOLVED_CACHE / "root"
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        return None
    work = Path(tempfile.mkdtemp(prefix="shuttled-resolved-dl-"))
    try:
        os.chmod(work, 0o755)  # apt's _apt user downloads into it
        got = subprocess.run(
            ["apt-get", "download", "systemd-resolved"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        debs = list(work.glob("systemd-resolved_*.deb"))
        if got.returncode != 0 or not debs:
            return None
        root = work / "root"
        subprocess.run(["dpkg", "-x", str(debs[0]), str(root)], check=True, timeout=60)
        if RESOLVED_CACHE.exists():
            shutil.rmtree(RESOLVED_CACHE)
        work.rename(RESOLVED_CACHE)
        return RESOLVED_CACHE / "root"
    finally:
        shutil.rmtree(work, ignore_errors=True)


class RealResolved:
    """systemd-resolved in cli beside a private system bus; stop() ends both by PID."""

    CAPS = "+net_bind_service,+net_raw,+setpcap"

    def __init__(self, lab: Lab, package: Path, bus_address: str) -> None:
        self.lab = lab
        self.package = package
        self.bus_address = bus_address
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[Any]:
        package, lab = self.package, self.lab
        script = (
            "set -e; mount --make-rprivate /; mount -t tmpfs -o mode=0755 tmpfs /run/systemd; "
            "mkdir /run/systemd/resolve; chown 65534:65534 /run/systemd/resolve; "
            "exec setpriv --reuid=65534 --regid=65534 --clear-groups "
            f"--inh-caps={self.CAPS} --ambient-caps={self.CAPS} "
            f"{package}/lib/systemd/systemd-resolved"
        )
        env = {
            **os.environ,
            "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address,
            "SYSTEMD_LOG_LEVEL": "debug",
            "SYSTEMD_LOG_TARGET": "console",
        }
        self.proc = lab.popen(
            "cli", ["unshare", "--mount", "sh", "-c", script], name="systemd-resolved", env=env
        )
        wait_for(
            "systemd-resolved on the private bus",
            self._answering,
            20,
            detail=lambda: lab.log_tail("systemd-resolved"),
        )
        return self.proc

    def restart(self) -> None:
        """Stop (by PID) and start again on the same bus, with its state forgotten."""
        self.stop()
        self._start()

    def _answering(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                "systemd-resolved exited:\n" + self.lab.log_tail("systemd-resolved")
            )
        return self.resolvectl("status", check=False).returncode == 0

    def resolvectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address,
            "SYSTEMD_COLORS": "0",
            "SYSTEMD_PAGER": "",
        }
        result: subprocess.CompletedProcess[str] = self.lab.run(
            "cli",
            [str(self.package / "usr" / "bin" / "resolvectl"), "--no-pager", *args],
            check=check,
            env=env,
        )
        return result

    def links(self) -> dict[str, str]:
        """`resolvectl status` per link name: that link's section."""
        sections: dict[str, str] = {}
        current = ""
        for line in self.resolvectl("status").stdout.splitlines():
            if line.startswith("Link "):
                current = line.split("(", 1)[1].rstrip(")")
                sections[current] = ""
            elif current:
                sections[current] += line.strip() + "\n"
        return sections

    def stop(self) -> None:
        self.lab.stop(self.proc)


@contextlib.contextmanager
def real_resolved(lab: Lab) -> Iterator[tuple[RealResolved, str]]:
    """(resolved, bus address), or a skip where the package cannot be had or run."""
    for tool in ("unshare", "setpriv", "dbus-daemon"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    package = resolved_package()
    if package is None:
        pytest.skip(
            "cannot download systemd-resolved (apt-get download failed): the D-Bus "
            "calls are covered against a recorder (tests/unit/test_resolved.py)"
        )
    with private_bus() as address:
        resolved = RealResolved(lab, package, address)
        try:
            yield resolved, address
        finally:
            resolved.stop()


def ask(
    lab: Lab, server: str, name: str, qtype: str = "A", *, tcp: bool = False, timeout: float = 3.0
) -> Any:
    from tests.lab import clients

    with lab.netns("cli"):
        return clients.dns_query(server, name, qtype, tcp=tcp, timeout=timeout)


def timed_ask(lab: Lab, server: str, name: str) -> tuple[Any, float]:
    started = time.monotonic()
    answer = ask(lab, server, name, timeout=5.0)
    return answer, time.monotonic() - started


def dns_lab() -> Iterator[Lab]:
    """Body of a module-scoped `lab` fixture that builds a DnsLab."""
    from tests.conftest import LAB_TOOLS
    from tests.lab import require_root_tools

    require_root_tools(*LAB_TOOLS, "nft")
    with DnsLab() as instance:
        yield instance
