"""Router-mode footprint: what the daemon costs a small box that carries a LAN.

    sudo python3 -m bench.router [--method nft|iptables] [--connections 1000]
                                 [--flows 1000] [--gigabytes 1] [--json FILE]

In a namespace lab with a LAN host behind the router (tests/lab, ``Lab(lan=True)``):
the `shuttled` daemon runs in the router with one router-mode profile, and this measures

- its resident memory idle (started, no profile up), with the profile up, with
  ``--connections`` TCP connections from the LAN host held open through it, and with
  ``--flows`` UDP flows on top;
- the CPU seconds it (and its ssh master) spend per GB the LAN host downloads and
  uploads through it (one stream each way, verified end to end).

Numbers are for this machine; the lab's veth links make the ssh transport the only
bottleneck. Everything it starts is stopped, and the lab torn down, on any exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.contenders import profile_stats, shuttlectl
from tests.lab import Lab, clients

REPO = Path(__file__).resolve().parents[1]
PROFILE = "router"
SETTLE = 2.0  # seconds before reading RSS: let the allocator and the loop quiet down


class Daemon:
    """`shuttled daemon` in the router namespace with a private config and socket."""

    def __init__(self, lab: Lab, method: str, root: Path) -> None:
        self.lab, self.method, self.root = lab, method, root
        self.socket = root / "ctl.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_profile(self) -> None:
        lab = self.lab
        body = {
            "remote": lab.srv_v4,
            "identity": lab.identity,
            "ssh_options": {"UserKnownHostsFile": lab.known_hosts, "User": "root"},
            "subnets": lab.target_nets,
            "lan": [lab.if_cli_lan],
            "dns": "all",
        }
        (self.root / "etc").mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / f"{PROFILE}.yaml").write_text(yaml.safe_dump({PROFILE: body}))

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "shuttled",
            "--config-dir",
            str(self.root / "etc"),
            "--socket",
            str(self.socket),
            "--state-dir",
            str(self.root / "state"),
            "--method",
            self.method,
            "--no-dbus",
            "daemon",
        ]
        self.proc = self.lab.popen("cli", argv, name="bench-daemon", cwd=str(REPO))
        deadline = time.monotonic() + 30
        while self.ctl("version").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("daemon did not start:\n" + self.lab.log_tail("bench-daemon"))
            time.sleep(0.1)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return shuttlectl(self.lab, self.socket, *args, cwd=str(REPO))

    def stats(self) -> dict[str, Any]:
        return profile_stats(self.lab, self.socket, PROFILE, cwd=str(REPO))

    def process(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    def ssh(self) -> psutil.Process | None:
        pid = self.stats().get("ssh_pid")
        return psutil.Process(pid) if isinstance(pid, int) else None

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop(self.proc, timeout=20)


def rss_mib(proc: psutil.Process) -> float:
    time.sleep(SETTLE)
    return proc.memory_info().rss / (1 << 20)


def cpu_seconds(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    times = proc.cpu_times()
    return float(times.user + times.system)


@contextmanager
def lan_connections(lab: Lab, count: int) -> Iterator[None]:
    """`count` TCP connections from the LAN host to the target's echo port, held open."""
    socks: list[socket.socket] = []
    with lab.netns("lan"):
        try:
            for i in range(count):
                host = lab.tgt_v4 if i % 2 else lab.tgt_v6
                sock = socket.create_connection((host, lab.ports.echo), timeout=10)
                socks.append(sock)
            for sock in socks[:: max(1, count // 20)]:  # they carry data
                sock.sendall(b"ping")
                if sock.recv(16) != b"ping":
                    raise RuntimeError("echo through the router failed")
            yield
        finally:
            for sock in socks:
                sock.close()


@contextmanager
def lan_udp_flows(lab: Lab, count: int) -> Iterator[int]:
    """`count` UDP flows (one socket each) from the LAN host; yields how many answered."""
    socks: list[socket.socket] = []
    with lab.netns("lan"):
        try:
            for i in range(count):
                host = lab.tgt_v4 if i % 2 else lab.tgt_v6
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.connect((host, lab.ports.udp_echo))
                sock.settimeout(3.0)
                socks.append(sock)
            answered = asyncio.run(_echo_all(socks))
            yield answered
        finally:
            for sock in socks:
                sock.close()


async def _echo_all(socks: list[socket.socket]) -> int:
    loop = asyncio.get_running_loop()

    async def one(sock: socket.socket) -> bool:
        sock.setblocking(False)
        for _ in range(3):
            sock.send(b"flow")
            try:
                return await asyncio.wait_for(loop.sock_recv(sock, 64), 2.0) == b"flow"
            except TimeoutError:
                continue
        return False

    return sum(await asyncio.gather(*(one(s) for s in socks)))


def transfer_cost(lab: Lab, daemon: Daemon, nbytes: int) -> dict[str, float]:
    """CPU seconds per GB (10^9 bytes) of the daemon and of ssh, downloading and uploading."""
    proc, ssh = daemon.process(), daemon.ssh()
    result: dict[str, float] = {}
    for direction in ("down", "up"):
        cpu0, ssh0, t0 = cpu_seconds(proc), cpu_seconds(ssh), time.monotonic()
        with lab.netns("lan"):
            if direction == "down":
                clients.bulk_download(lab.tgt_v4, nbytes, timeout=600)
            else:
                clients.bulk_upload(lab.tgt_v4, nbytes, timeout=600)
        seconds = time.monotonic() - t0
        gigabytes = nbytes / 1e9
        result[f"{direction}_daemon_cpu_s_per_gb"] = (cpu_seconds(proc) - cpu0) / gigabytes
        result[f"{direction}_ssh_cpu_s_per_gb"] = (cpu_seconds(ssh) - ssh0) / gigabytes
        result[f"{direction}_mbit_s"] = nbytes * 8 / seconds / 1e6
    return result


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with Lab(lan=True) as lab, tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        os.chmod(tmp, 0o755)
        daemon = Daemon(lab, args.method, Path(tmp))
        daemon.write_profile()
        try:
            daemon.start()
            proc = daemon.process()
            out: dict[str, Any] = {"method": args.method, "rss_idle_mib": rss_mib(proc)}
            if daemon.ctl("up", PROFILE, "--timeout", "30").returncode != 0:
                raise RuntimeError("profile did not come up:\n" + lab.log_tail("bench-daemon"))
            out["rss_up_mib"] = rss_mib(proc)
            with lan_connections(lab, args.connections):
                out["connections"] = daemon.stats()["active"]
                out["rss_connections_mib"] = rss_mib(proc)
                with lan_udp_flows(lab, args.flows) as answered:
                    out["udp_flows_answered"] = answered
                    out["rss_connections_and_flows_mib"] = rss_mib(proc)
            ssh = daemon.ssh()
            out["ssh_rss_mib"] = ssh.memory_info().rss / (1 << 20) if ssh else None
            out.update(transfer_cost(lab, daemon, int(args.gigabytes * 1e9)))
            out["open_fds_after"] = proc.num_fds()
            return out
        finally:
            daemon.stop()


def report(result: dict[str, Any]) -> str:
    rows = [
        ("daemon RSS idle", f"{result['rss_idle_mib']:.1f} MiB"),
        ("daemon RSS, one router profile up", f"{result['rss_up_mib']:.1f} MiB"),
        (
            f"daemon RSS, {result['connections']} LAN TCP connections",
            f"{result['rss_connections_mib']:.1f} MiB",
        ),
        (
            f"... and {result['udp_flows_answered']} UDP flows",
            f"{result['rss_connections_and_flows_mib']:.1f} MiB",
        ),
        ("ssh master RSS", f"{result['ssh_rss_mib']:.1f} MiB"),
    ]
    for way in ("down", "up"):
        rows.append(
            (
                f"{way}load {result[f'{way}_mbit_s']:.0f} Mbit/s, CPU per GB",
                f"daemon {result[f'{way}_daemon_cpu_s_per_gb']:.2f} s, "
                f"ssh {result[f'{way}_ssh_cpu_s_per_gb']:.2f} s",
            )
        )
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"shuttled router mode ({result['method']})"]
    lines += [f"  {(label + ':').ljust(width)}{value}" for label, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m bench.router",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--method", choices=("nft", "iptables"), default="nft")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--flows", type=int, default=1000)
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    result = measure(args)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
