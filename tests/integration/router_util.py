"""Router-mode test plumbing (the lab with a LAN host is conftest's `rlab`): what that host
sees, the daemon as the router, and the router's kernel state (firewall, `ip rule`, routing
tables)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import select
import socket
import subprocess
import time
from typing import Any

from tests.integration.daemon_util import Daemon, DaemonSet, root_profile
from tests.lab import Lab, clients
from tests.lab.runner import start_run

METHODS = ["nft", "iptables"]
PROFILE = "router"


# --- the lab and its kernel state ------------------------------------------------------------


def kernel_state(lab: Lab) -> dict[str, str]:
    """The router's firewall, policy rules and every routing table."""
    state = lab.firewall_snapshot()
    for family in ("-4", "-6"):
        state[f"rule{family}"] = lab.run("cli", ["ip", family, "rule", "show"]).stdout
        state[f"route{family}"] = lab.run(
            "cli", ["ip", family, "route", "show", "table", "all"]
        ).stdout
    return state


def block_ssh(lab: Lab, on: bool) -> None:
    """Make srv drop (or accept again) the router's ssh connections: reconnect blocked."""
    if on:
        lab.run(
            "srv",
            [
                "nft",
                "add table inet labblock; add chain inet labblock in "
                "{ type filter hook input priority -300; policy accept; }; "
                "add rule inet labblock in tcp dport 22 drop",
            ],
        )
    else:
        lab.run("srv", ["nft", "delete", "table", "inet", "labblock"], check=False)


# --- what a LAN host sees ---------------------------------------------------------------------


def http_from(lab: Lab, host: str, source: str | None = None, timeout: float = 5.0) -> str:
    """GET / from the LAN host (optionally from one of its addresses): "ok" or why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with lab.netns("lan"), socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            if source:
                sock.bind((source, 0))
            sock.connect((host, lab.ports.http))
            sock.sendall(b"GET / HTTP/1.0\r\nHost: tgt\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        except OSError as exc:
            return _why(exc)
    return "ok" if lab.http_marker.encode() in reply else f"bad reply {reply[:80]!r}"


def udp_from(
    lab: Lab, host: str, source: str | None = None, timeout: float = 2.0, size: int = 16
) -> str:
    """One datagram to tgt's UDP echo from the LAN host: "ok" or why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    payload = os.urandom(size)
    with lab.netns("lan"), socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            if source:
                sock.bind((source, 0))
            sock.connect((host, lab.ports.udp_echo))
            sock.send(payload)
            reply, peer = sock.recvfrom(65535)
        except OSError as exc:
            return _why(exc)
    if peer[:2] != (host, lab.ports.udp_echo):  # the answer comes FROM the target
        return f"answer from {peer}"
    return "ok" if reply == payload else "wrong echo"


def _why(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    return errno.errorcode.get(exc.errno or 0, str(exc))


def timed(probe: Any, *args: Any, **kw: Any) -> tuple[str, float]:
    started = time.monotonic()
    outcome = probe(*args, **kw)
    return outcome, time.monotonic() - started


def udp_flows(lab: Lab, count: int, timeout: float = 15.0) -> int:
    """`count` UDP flows at once from the LAN host (one socket each, both families):
    how many got their own datagram echoed back. Unanswered ones are resent."""
    socks: dict[int, tuple[socket.socket, bytes]] = {}
    answered: set[int] = set()
    targets = [lab.tgt_v4, lab.tgt_v6]
    with lab.netns("lan"):
        try:
            for i in range(count):
                host = targets[i % 2]
                sock = socket.socket(
                    socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM
                )
                sock.setblocking(False)
                sock.connect((host, lab.ports.udp_echo))
                socks[sock.fileno()] = (sock, hashlib.sha256(str(i).encode()).digest())
            deadline = time.monotonic() + timeout
            next_send = 0.0
            while len(answered) < count and time.monotonic() < deadline:
                if time.monotonic() >= next_send:  # (re)send what is still unanswered
                    for fd, (sock, payload) in socks.items():
                        if fd not in answered:
                            with _quiet():
                                sock.send(payload)
                    next_send = time.monotonic() + 2.0
                ready, _, _ = select.select(
                    [s for fd, (s, _) in socks.items() if fd not in answered], [], [], 0.2
                )
                for sock in ready:
                    with _quiet():
                        if sock.recv(65535) == socks[sock.fileno()][1]:
                            answered.add(sock.fileno())
        finally:
            for sock, _ in socks.values():
                sock.close()
    return len(answered)


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, *exc: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)


def tcp_connections(lab: Lab, count: int) -> None:
    """`count` echo connections from the LAN host, all open before any data moves."""

    hosts = [lab.tgt_v4 if i % 2 else lab.tgt_v6 for i in range(count)]
    payloads = [hashlib.sha256(str(i).encode()).digest() * 8 for i in range(count)]
    with lab.netns("lan"):
        replies = asyncio.run(clients.aecho_all_open(hosts, lab.ports.echo, payloads, 60))
    assert replies == payloads


# --- the daemon as the router -----------------------------------------------------------------


def router_profile(lab: Lab, **keys: Any) -> dict[str, Any]:
    """Subnets = the target networks; the LAN is the host's first address of each family."""
    body = root_profile(
        lab,
        lab.target_nets,
        dns={"mode": "all"},
        lan=[f"{lab.lan_v4}/32", f"{lab.lan_v6}/128"],
        keepalive=2,
        **keys,
    )
    return body


def start_lan_run(lab: Lab, name: str, method: str = "nft") -> subprocess.Popen[bytes]:
    """`shuttled run` as a router: DNS, the LAN interface, and every LAN host's DNS."""
    return start_run(
        lab,
        "--dns",
        "--lan",
        lab.if_cli_lan,
        "--lan-dns",
        "all",
        *lab.target_nets,
        method=method,
        name=name,
    )


def start_daemon(daemons: DaemonSet, method: str, body: dict[str, Any]) -> Daemon:
    d = daemons.new(f"router-{method}")
    base_argv = d.argv

    def argv(dbus: bool = False) -> list[str]:  # the same daemon, on this backend
        args = base_argv(dbus)
        args[args.index("--method") + 1] = method
        return args

    d.argv = argv  # type: ignore[method-assign]
    d.write_profile(PROFILE, body)
    d.start()
    return d
