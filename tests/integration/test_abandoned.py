"""Impatient clients must not take the tunnel down.

Apps that connect and close or reset at once, close while their channel is still
opening, send a few bytes and reset, scan ports, send garbage to the DNS listeners or
let UDP answers meet ICMP port unreachable: each such connection may end, but the ssh
session, every other connection and a 100 MB transfer running meanwhile must not notice.
The same storm (`storm`) runs against `shuttled run` (both firewall backends, direct
and helper mode) and against a daemon profile, whose stats also count what was aborted.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import random
import re
import socket
import struct
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from functools import partial

import pytest

from tests.integration.daemon_util import DaemonSet, http_ok, wait_for
from tests.lab import Lab, clients
from tests.lab.runner import VARIANTS, start_run, stop_run
from tests.lab.services import DNS_PORT, UDP_ECHO_PORT, build_query

pytestmark = pytest.mark.integration

BIG = 100 << 20  # the transfer that runs through the storm
FIN_PROBES = RST_PROBES = 1000
OPENING_PROBES = SEND_RESET_PROBES = 200
SCAN_PORTS = range(1, 1001)
DNS_PROBES = 40  # of each DNS kind
UDP_PROBES = 100  # of each UDP kind
CONCURRENCY = 200
CONNECT_TIMEOUT = 1.0
REPLY_WAIT = 0.3  # how long a probe that reads waits for an answer
STORM_TIMEOUT = 60.0
WAVE_PAUSE = 0.5
SETTLE_TIMEOUT = 20.0  # the black-holed opens fail on the remote after ~3 s
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
BAD_LOG = re.compile(r"lost|reconnect", re.IGNORECASE)
ABORT_KINDS = {"tcp", "udp", "dns", "channel"}
Probe = tuple[str, Callable[[], Awaitable[str]]]


# --- probes: each returns an outcome word, never raises OSError ---------------------------------


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _close(sock: socket.socket, reset: bool) -> None:
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


async def _outcome(probe: Callable[[], Awaitable[str]]) -> str:
    try:
        return await probe()
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


async def _read(sock: socket.socket, wait: float) -> str:
    try:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), wait)
    except TimeoutError:
        return "silent"
    return "answered" if data else "eof"


async def tcp_probe(
    host: str,
    port: int,
    *,
    reset: bool,
    payload: bytes = b"",
    wait: float = 0.0,
    pause: float = 0.0,
) -> str:
    """Connect, maybe send ``payload``, wait ``pause`` or for a reply, then close
    (FIN) or reset (SO_LINGER 0)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), CONNECT_TIMEOUT)
        if payload:
            await asyncio.wait_for(loop.sock_sendall(sock, payload), CONNECT_TIMEOUT)
        outcome = await _read(sock, wait) if wait else "connected"
        await asyncio.sleep(pause)
        return outcome
    finally:
        _close(sock, reset)


async def opening_probe(host: str, port: int) -> str:
    """A nonblocking connect, closed before the handshake is even seen through."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setblocking(False)
    code = sock.connect_ex((host, port))
    _close(sock, reset=True)
    return errno.errorcode.get(code, "ok")


async def udp_probe(host: str, port: int, payload: bytes, wait: float = 0.0) -> str:
    """One datagram; the socket is closed at once (``wait`` 0: an answer meets ICMP port
    unreachable) or after waiting for an answer."""
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.connect((host, port))
        sock.send(payload)
        return await _read(sock, wait) if wait else "sent"
    finally:
        sock.close()


# --- the storm ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Aim:
    """What the storm hits: the target's addresses and ports, the DNS listener."""

    hosts: tuple[str, str]
    blackhole: tuple[str, str]  # addresses in the target net that nobody has
    open_ports: tuple[int, ...]
    closed_ports: tuple[int, ...]
    dns: str  # a resolver address only the tunnel's DNS listener answers on
    udp: bool  # whether UDP to the target goes through the tunnel

    @classmethod
    def of(cls, lab: Lab, udp: bool) -> Aim:
        p = lab.ports
        prefix4, prefix6 = lab.tgt_v4.rsplit(".", 1)[0], lab.tgt_v6.rsplit(":", 1)[0]
        return cls(
            (lab.tgt_v4, lab.tgt_v6),
            (f"{prefix4}.99", f"{prefix6}:99"),
            (p.http, p.fast_http, p.echo, p.close_first, p.bulk, p.dns),
            (p.closed, 1, 13, 25, 443, 3306, 8443, 9999),
            lab.fake_dns_v4,
            udp,
        )

    def spread(self, i: int) -> tuple[str, int]:
        """The i-th (host, port): both families, open and closed ports, all mixed."""
        ports = self.open_ports + self.closed_ports
        return self.hosts[i % 2], ports[(i // 2) % len(ports)]


def connection_probes(aim: Aim) -> list[Probe]:
    """Connect-then-FIN, connect-then-RST, closed while opening, a few bytes and RST."""
    probes: list[Probe] = []
    for i in range(max(FIN_PROBES, RST_PROBES)):
        host, port = aim.spread(i)
        pause = (i % 4) * 0.005  # at once, or while an answer (close_first's line) comes in
        if i < FIN_PROBES:
            probes.append(("fin", partial(tcp_probe, host, port, reset=False, pause=pause)))
        if i < RST_PROBES:
            probes.append(("rst", partial(tcp_probe, host, port, reset=True, pause=pause)))
    for i in range(OPENING_PROBES):
        host, port = aim.spread(i)
        if i % 2:  # nobody is there: the remote's connect is still trying when we leave
            blackhole = aim.blackhole[i // 2 % 2]
            probes.append(
                ("opening", partial(tcp_probe, blackhole, port, reset=i % 4 == 1, pause=0.02))
            )
        else:
            probes.append(("opening", partial(opening_probe, host, port)))
    for i in range(SEND_RESET_PROBES):
        host, port = aim.spread(i)
        probes.append(
            (
                "send-reset",
                partial(
                    tcp_probe,
                    host,
                    port,
                    reset=True,
                    payload=b"GET / HTTP/1.0\r\n" * (1 + i % 3),
                    pause=i % 3 * 0.01,
                ),
            )
        )
    return probes


def scan_probes(aim: Aim) -> list[Probe]:
    return [("scan", partial(tcp_probe, aim.hosts[0], port, reset=False)) for port in SCAN_PORTS]


def dns_payloads(name: str) -> dict[str, list[bytes]]:
    """TCP streams and UDP datagrams that are no good DNS query, by kind (four each)."""
    rng = random.Random(19)
    query = build_query(name, "A")
    framed = struct.pack(">H", len(query)) + query
    response = query[:2] + bytes([query[2] | 0x80]) + query[3:]
    return {
        "tcp-truncated": [framed[:n] for n in (1, 2, 7, len(framed) - 1)],
        "tcp-garbage": [
            struct.pack(">H", 40) + rng.randbytes(40),
            struct.pack(">H", 5) + rng.randbytes(5),
            struct.pack(">H", 0),
            rng.randbytes(300),
        ],
        "udp-bad": [query[:7], query[:12], rng.randbytes(64), response],
    }


def dns_probes(aim: Aim, name: str) -> list[Probe]:
    """TCP 53 dropped and reset, truncated and garbage queries over TCP and UDP, good
    queries whose asker is gone before the answer."""
    bad = dns_payloads(name)
    query = build_query(name, "A")
    framed = struct.pack(">H", len(query)) + query
    probes: list[Probe] = []
    for i in range(DNS_PROBES):
        reset, pick = bool(i % 2), i % 4
        tcp = partial(tcp_probe, aim.dns, DNS_PORT, reset=reset)
        probes += [
            ("dns-tcp-drop", tcp),
            ("dns-tcp-truncated", partial(tcp, payload=bad["tcp-truncated"][pick])),
            ("dns-tcp-garbage", partial(tcp, payload=bad["tcp-garbage"][pick], wait=REPLY_WAIT)),
            ("dns-tcp-gone", partial(tcp, payload=framed)),
            (
                "dns-udp-bad",
                partial(udp_probe, aim.dns, DNS_PORT, bad["udp-bad"][pick], wait=REPLY_WAIT),
            ),
            ("dns-udp-gone", partial(udp_probe, aim.dns, DNS_PORT, query)),
        ]
    return probes


def udp_probes(aim: Aim) -> list[Probe]:
    """UDP flows whose answers meet ICMP port unreachable, here (the app closed its
    socket) or on the remote (nothing listens on that port)."""
    probes: list[Probe] = []
    for i in range(UDP_PROBES if aim.udp else 0):
        host, closed = aim.hosts[i % 2], aim.closed_ports[i % len(aim.closed_ports)]
        probes += [
            ("udp-gone", partial(udp_probe, host, UDP_ECHO_PORT, b"echo me")),
            ("udp-refused", partial(udp_probe, host, closed, b"anyone?", wait=REPLY_WAIT)),
        ]
    return probes


async def run_waves(waves: list[list[Probe]]) -> dict[str, collections.Counter[str]]:
    """Each wave's probes CONCURRENCY at once, kinds interleaved, a pause between waves
    (a scan comes in bursts); outcomes counted by kind."""
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for probes in waves:
        random.Random(19).shuffle(probes)
        outcomes = await clients.gather_limited((_outcome(p) for _, p in probes), CONCURRENCY)
        for (kind, _), outcome in zip(probes, outcomes, strict=True):
            counts[kind][outcome] += 1
        await asyncio.sleep(WAVE_PAUSE)
    return dict(counts)


async def _echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    payload = b"still here after the storm\n" * 100
    writer.write(payload)
    return await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload


def app_sockets(lab: Lab, pid: int) -> list[str]:
    """The TCP connections (not listeners) process ``pid`` in cli holds, as `ss` lines,
    but its ssh servers' (the daemon keeps each master's socket, for TCP_INFO; and a
    master replaced after many failed opens lives on while it carries a connection)."""
    lines = lab.run("cli", ["ss", "-Htnp", "state", "connected"]).stdout.splitlines()
    servers = tuple(
        f"{addr}:{port}"
        for addr in (lab.srv_v4, f"[{lab.srv_v6}]")
        for port in (lab.ports.ssh, lab.ports.ssh_nofwd)
    )
    return [
        line
        for line in lines
        if f"pid={pid}," in line and not any(f" {s} " in f" {line} " for s in servers)
    ]


async def settled(lab: Lab, pid: int, keep: int) -> None:
    """Wait until shuttled has let go of the storm's connections: it holds ``keep``."""
    for _ in range(int(SETTLE_TIMEOUT / 0.2)):
        held = await asyncio.to_thread(app_sockets, lab, pid)
        if len(held) <= keep:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"shuttled still holds {len(held)} connections "
        f"{SETTLE_TIMEOUT:g} s after the storm:\n" + "\n".join(held[:20])
    )


async def _storm(lab: Lab, pid: int, aim: Aim, upload: bool) -> dict[str, collections.Counter[str]]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(lab.tgt_v4, lab.ports.echo), 10)
    try:
        assert await _echoes(reader, writer), "the long-lived connection does not echo"
        bulk = clients.abulk_upload if upload else clients.abulk_download
        transfer = asyncio.create_task(bulk(lab.tgt_v6, BIG, seed=19, timeout=STORM_TIMEOUT))
        waves = [
            connection_probes(aim),
            scan_probes(aim),
            dns_probes(aim, lab.dns_name) + udp_probes(aim),
        ]
        counts = await asyncio.wait_for(run_waves(waves), STORM_TIMEOUT)
        (await asyncio.wait_for(transfer, STORM_TIMEOUT)).check()
        await settled(lab, pid, keep=1)  # the long-lived connection, nothing else
        assert await _echoes(reader, writer), "the long-lived connection lost its echo"
    finally:
        writer.close()
    return counts


def storm(
    lab: Lab, pid: int, *, udp: bool, upload: bool = False
) -> dict[str, collections.Counter[str]]:
    """The whole storm from cli against shuttled process ``pid``, with a long-lived echo
    connection opened before it and a 100 MB transfer running through it; once shuttled
    has closed every connection of the storm, both are checked. Then the tunnel must
    still serve HTTP, DNS (UDP and TCP) and, with ``udp``, UDP. Outcomes by kind."""
    with lab.netns("cli"):
        try:
            counts = asyncio.run(_storm(lab, pid, Aim.of(lab, udp), upload))
        except OSError as exc:  # the transfer or the long-lived connection
            raise AssertionError(f"an unrelated connection broke in the storm: {exc!r}") from exc
        assert lab.tgt_v4 in clients.dns_query(lab.fake_dns_v4, lab.dns_name).addresses
        assert lab.tgt_v4 in clients.dns_query(lab.fake_dns_v4, lab.dns_name, tcp=True).addresses
        if udp:
            assert clients.udp_echo(lab.tgt_v4, b"ping") == b"ping"
    assert http_ok(lab, lab.tgt_v4) and http_ok(lab, lab.tgt_v6)
    # The probes did reach the tunnel (a connect to a captured port completes locally).
    for kind in ("fin", "rst", "scan"):
        assert counts[kind]["connected"] >= 0.5 * sum(counts[kind].values()), counts
    return counts


# --- shuttled run -------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    lab: Lab
    proc: subprocess.Popen[bytes]
    name: str

    def log(self) -> str:
        return self.lab.log_tail(self.name, 1_000_000)

    def assert_session_intact(self) -> None:
        assert self.proc.poll() is None, f"shuttled run exited:\n{self.lab.log_tail(self.name)}"
        bad = [line for line in self.log().splitlines() if BAD_LOG.search(line)]
        assert not bad, "\n".join(bad[:20])


@pytest.fixture(params=VARIANTS)
def run(request: pytest.FixtureRequest, lab: Lab) -> Iterator[Run]:
    """`shuttled run` for one test: gone before the next one (a daemon) starts."""
    method, helper = request.param
    before = lab.firewall_snapshot()
    name = f"shuttled-abandoned-{method}-{'helper' if helper else 'direct'}"
    proc = start_run(
        lab,
        "--dns",
        "--udp",
        *lab.target_nets,
        method=method,
        name=name,
        remote=lab.remote_nofwd if helper else lab.remote,
    )
    try:
        yield Run(lab, proc, name)
    finally:
        code = stop_run(lab, proc)
    assert code == 0, lab.log_tail(name, 60)
    assert lab.firewall_snapshot() == before


def test_run_survives_abandoned_connections(run: Run) -> None:
    storm(run.lab, run.proc.pid, udp=True)
    run.assert_session_intact()


# --- the daemon ---------------------------------------------------------------------------------


@pytest.mark.parametrize("forward", ["direct", "helper"])
def test_daemon_survives_abandoned_connections_and_counts_them(
    lab: Lab, daemons: DaemonSet, forward: str
) -> None:
    d = daemons.work_up(dns="all", udp=True, forward=forward)
    storm(lab, d.pid, udp=True, upload=True)
    stats = d.stats("work")
    assert d.state("work") == "up" and stats["reconnects"] == 0, stats
    aborted = stats.get("aborted")
    assert isinstance(aborted, dict) and set(aborted) >= ABORT_KINDS, stats
    assert all(isinstance(n, int) and n >= 0 for n in aborted.values()), aborted
    # Nothing abandoned is kept (the long-lived connection was closed last).
    wait_for(
        "no connection left",
        lambda: d.stats("work")["active"] == 0,
        5,
        detail=lambda: f"{d.stats('work')}\n{d.log()}",
    )
