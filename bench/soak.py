"""Soak: good and abandoned connections through a daemon profile for minutes.

    sudo python3 -m bench.soak [--minutes 10] [--method nft|iptables] [--rate N]
                               [--concurrency 32] [--max-connections N] [--skip KIND,...]
                               [--source head|worktree] [--json FILE]

Builds the namespace lab (tests/lab) and brings up the bench's `shuttled-daemon` contender
(`shuttled daemon` plus one profile, direct mode) in cli. After a short warm-up it drives,
for --minutes, as fast as the machine goes (or at most --rate new connections a second,
with at most --concurrency at once, and never more than --max-connections in all) this mix
to the target's addresses (both families, two addresses each):

- good connections, each checked: an HTTP GET read to the end of its body (status 200,
  all of Content-Length), or an echo of random bytes compared with what came back;
- abandoned ones: connect then close (FIN), connect then reset (SO_LINGER 0), closed
  while opening (a nonblocking connect dropped at once, or a connect to an address of the
  target net that nobody has, left before the remote's connect gives up), a few bytes then
  a reset, and connects to closed ports (the proxy has to end them: EOF or reset).

It samples when idle, at the start, every --interval seconds and at the end after a
settle: open fds of the daemon, of its ssh master and of sshd's session on srv (which
holds one socket per open direct-tcpip channel), the profile's active connections
(`shuttlectl stats --json`), RSS of the daemon and of the ssh master, the reconnects. It
prints a table and a verdict (fds and connections back to their start, RSS within
--rss-tolerance, no session restart, no good connection failed, every connection to a
closed port ended by the proxy) and writes it all as JSON. Exit status: 0 the verdict
holds, 1 it does not, 2 this machine cannot run it, 130 interrupted (the lab is torn down).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import errno
import itertools
import json
import logging
import os
import random
import re
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from bench import loadgen, tools
from bench.contenders import ALL, DEFAULT_CIPHER, Context, ShuttledDaemon, remote_processes
from bench.figures import rss_mb
from tests.lab import Lab

log = logging.getLogger("bench.soak")

# What the workers do, in turn: half good, half abandoned.
GOOD = ("http", "echo")
MIX = ("http", "fin", "echo", "rst", "http", "opening", "echo", "send-reset", "http", "closed-port")
CONNECT_TIMEOUT = loadgen.OP_TIMEOUT  # every connect and every read of a good connection
CLOSED_WAIT = 10.0  # how long a connection to a closed port may stay open
BLACKHOLE_PAUSE = 0.02  # the app gives up on an unreachable host after this long
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
DRAIN = 15.0  # after the deadline, how long connections in flight may take
SETTLE = 5.0
SETTLE_MAX = 60.0
RSS_TOLERANCE_MB = 10.0
MAX_MINUTES = 120.0
DEFAULT_MAX_CONNECTIONS = 5_000_000
DEFAULT_CONCURRENCY = 32
TOOLS = ("ip", "sshd", "ssh", "ssh-keygen")
# Daemon log lines worth showing: the session's end and restart, the ssh master's own
# messages (its fatal errors come this way), Python tracebacks.
BAD_LOG = re.compile(r"lost|reconnect|traceback|exception|\] ssh: ", re.IGNORECASE)
DAEMONS = tuple(n for n, c in ALL.items() if issubclass(c, ShuttledDaemon))
# Per-namespace settings, touching only the lab's own namespaces: the load generator and
# sshd must not run out of ports (TIME_WAIT) nor cli's conntrack table (the redirect) fill,
# at thousands of connections a second for minutes; and sshd's connects to the blackhole
# address give up after ~7 s (SYN retried twice) instead of ~130 s, so that what the load
# left opening has ended by the end sample.
SYSCTLS = {
    "cli": {
        "net.ipv4.ip_local_port_range": "10000 65000",
        "net.ipv4.tcp_tw_reuse": "1",
        "net.netfilter.nf_conntrack_tcp_timeout_time_wait": "10",
    },
    "srv": {
        "net.ipv4.ip_local_port_range": "10000 65000",
        "net.ipv4.tcp_tw_reuse": "1",
        "net.ipv4.tcp_syn_retries": "2",
    },
}


# --- where the load goes ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Aim:
    hosts: tuple[str, ...]  # the target's addresses, both families
    blackhole: tuple[str, str]  # addresses in the target net that nobody has
    http: int
    echo: int
    open_ports: tuple[int, ...]
    closed_ports: tuple[int, ...]
    payloads: dict[int, bytes]  # what "send-reset" sends, per open port

    @classmethod
    def of(cls, lab: Lab) -> Aim:
        p = lab.ports
        prefix4, prefix6 = lab.tgt_v4.rsplit(".", 1)[0], lab.tgt_v6.rsplit(":", 1)[0]
        return cls(
            hosts=(lab.tgt_v4, lab.tgt_v6, lab.tgt_v4_alt, lab.tgt_v6_alt),
            blackhole=(f"{prefix4}.99", f"{prefix6}:99"),
            http=p.fast_http,
            echo=p.echo,
            open_ports=(p.fast_http, p.echo, p.close_first, p.bulk),
            closed_ports=(p.closed, 1, 13),
            # a request cut short; bytes to echo; a 256 KiB download reset mid-way
            payloads={
                p.fast_http: b"GET / HTTP/1.1\r\nHost: tg",
                p.echo: b"x" * 100,
                p.close_first: b"hello\n",
                p.bulk: b"DOWN 262144 3\n",
            },
        )

    def host(self, n: int) -> str:
        return self.hosts[n % len(self.hosts)]

    def spread(self, n: int, ports: Sequence[int]) -> tuple[str, int]:
        """The n-th connection of a kind: every address with every port, in turn."""
        return self.hosts[n % len(self.hosts)], ports[n // len(self.hosts) % len(ports)]


def _variant(n: int, count: int) -> int:
    """Which of ``count`` variants the n-th connection of a kind is (not in step with
    the address and port it goes to)."""
    return n // 16 % count


# --- one connection of each kind; each returns an outcome word ----------------------------------
def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _close(sock: socket.socket, reset: bool) -> None:
    if reset:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


async def _connect(host: str, port: int) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, (host, port)), CONNECT_TIMEOUT
        )
    except BaseException:
        _close(sock, reset=True)
        raise
    return sock


async def good_http(aim: Aim, n: int) -> str:
    await loadgen.http_request(aim.host(n), aim.http, CONNECT_TIMEOUT)
    return "ok"


async def good_echo(aim: Aim, n: int) -> str:
    payload = random.randbytes(1 + n * 7919 % 4096)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(aim.host(n), aim.echo), CONNECT_TIMEOUT
    )
    try:
        writer.write(payload)
        back = await asyncio.wait_for(reader.readexactly(len(payload)), CONNECT_TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):  # a reset: already counted
            await asyncio.wait_for(writer.wait_closed(), 1.0)
    if back != payload:
        raise RuntimeError(f"echo of {len(payload)} bytes came back different")
    return "ok"


async def abandon(aim: Aim, n: int, *, reset: bool) -> str:
    """Connect to an open port, wait 0, 2 or 4 ms (the channel still opening, or just
    open), then close or reset."""
    sock = await _connect(*aim.spread(n, aim.open_ports))
    try:
        await asyncio.sleep(_variant(n, 3) * 0.002)
    finally:
        _close(sock, reset)
    return "connected"


async def opening(aim: Aim, n: int) -> str:
    """Closed while opening: every other one a nonblocking connect dropped at once (RST
    right after the handshake), else a connect to an address nobody has, left after 20 ms
    while the remote's connect is still trying."""
    host, port = aim.spread(n, aim.open_ports)
    if _variant(n, 2):
        sock = await _connect(aim.blackhole[n % 2], port)
        await asyncio.sleep(BLACKHOLE_PAUSE)
        _close(sock, reset=bool(n // 2 % 2))
        return "left-blackhole"
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setblocking(False)
    code = sock.connect_ex((host, port))
    _close(sock, reset=True)
    return "dropped-" + errno.errorcode.get(code, "ok").lower()


async def send_reset(aim: Aim, n: int) -> str:
    """A few bytes (a cut request, or a command that starts a download), then a reset."""
    host, port = aim.spread(n, aim.open_ports)
    sock = await _connect(host, port)
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_sendall(sock, aim.payloads[port]), CONNECT_TIMEOUT
        )
        await asyncio.sleep(_variant(n, 3) * 0.002)
    finally:
        _close(sock, reset=True)
    return "sent"


async def closed_port(aim: Aim, n: int) -> str:
    """Connect to a port nobody listens on: the proxy accepts, the channel open fails, and
    the proxy must then end the connection ("hung": it did not within CLOSED_WAIT)."""
    try:
        sock = await _connect(*aim.spread(n, aim.closed_ports))
    except ConnectionResetError:
        return "reset-at-connect"  # the proxy's reset came before the loop saw the connect
    try:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 64), CLOSED_WAIT)
        return "answered" if data else "eof"
    except TimeoutError:
        return "hung"
    except ConnectionResetError:
        return "reset"
    finally:
        _close(sock, reset=False)


PROBES: dict[str, Callable[[Aim, int], Awaitable[str]]] = {
    "http": good_http,
    "echo": good_echo,
    "fin": lambda aim, n: abandon(aim, n, reset=False),
    "rst": lambda aim, n: abandon(aim, n, reset=True),
    "opening": opening,
    "send-reset": send_reset,
    "closed-port": closed_port,
}


# --- the load ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Tally:
    """What the load did. The int totals are read by the sampler while the load runs."""

    started: int = 0
    good_ok: int = 0
    good_failed: int = 0
    abandoned: int = 0
    load_errors: int = 0  # abandoned connections whose connect itself failed
    seconds: float = 0.0
    by_kind: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    outcomes: dict[str, collections.Counter[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    failures: list[str] = dataclasses.field(default_factory=list)  # the first few, with time
    good_ms: array.array[float] = dataclasses.field(default_factory=lambda: array.array("f"))

    def latency(self) -> dict[str, float]:
        if not self.good_ms:
            return {}
        values = sorted(self.good_ms)
        return {
            "median_ms": statistics.median(values),
            "p99_ms": values[min(len(values) - 1, int(len(values) * 0.99))],
            "max_ms": values[-1],
        }


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


async def drive(
    aim: Aim,
    tally: Tally,
    *,
    mix: Sequence[str],
    seconds: float,
    concurrency: int,
    cap: int,
    rate: float | None,
    stop: threading.Event,
) -> None:
    """``concurrency`` workers, each starting the next connection of ``mix`` as soon as its
    last one ended (or when --rate allows), until ``seconds`` passed, ``cap`` connections
    were started or ``stop`` is set. Connections in flight then have DRAIN seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + seconds
    issued = 0

    async def one(i: int) -> None:
        kind = mix[i % len(mix)]
        good = kind in GOOD
        n = tally.by_kind[kind]  # the kind's own sequence number
        tally.by_kind[kind] += 1
        t0 = loop.time()
        try:
            outcome = await PROBES[kind](aim, n)
        except (OSError, TimeoutError, RuntimeError, asyncio.IncompleteReadError) as exc:
            outcome = _outcome(exc)
            if good:
                tally.good_failed += 1
            else:
                tally.load_errors += 1
            if len(tally.failures) < 20:
                tally.failures.append(
                    f"{loop.time() - start:.1f}s {kind} #{n}: {type(exc).__name__}: {exc}"
                )
        else:
            if good:
                tally.good_ok += 1
                tally.good_ms.append((loop.time() - t0) * 1e3)
        if not good:
            tally.abandoned += 1
        tally.outcomes[kind][outcome] += 1

    async def worker() -> None:
        nonlocal issued
        while issued < cap and loop.time() < deadline and not stop.is_set():
            i = issued
            issued += 1
            tally.started = issued
            if rate:
                due = start + i / rate
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
            await one(i)

    try:
        async with asyncio.timeout(seconds + DRAIN):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    except TimeoutError:
        tally.failures.append(f"connections still open {DRAIN:.0f}s after the deadline")
    tally.seconds = loop.time() - start


class Load:
    """The load in its own thread (in cli's namespace), so that sampling never waits for it."""

    def __init__(self, lab: Lab, aim: Aim, args: argparse.Namespace, seconds: float) -> None:
        self.tally = Tally()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name="soak-load", daemon=True, args=(lab, aim, args, seconds)
        )

    def _run(self, lab: Lab, aim: Aim, args: argparse.Namespace, seconds: float) -> None:
        try:
            with lab.netns("cli"):
                asyncio.run(
                    drive(
                        aim,
                        self.tally,
                        mix=args.mix,
                        seconds=seconds,
                        concurrency=args.concurrency,
                        cap=args.max_connections,
                        rate=args.rate,
                        stop=self.stop,
                    )
                )
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def start(self) -> Load:
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


# --- samples -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Sample:
    label: str
    t: float  # seconds since the load started (negative before)
    started: int = 0
    good_ok: int = 0
    good_failed: int = 0
    abandoned: int = 0
    daemon_alive: bool = False
    daemon_fds: int | None = None
    daemon_rss_mb: float | None = None
    ssh_pid: int | None = None
    ssh_fds: int | None = None
    ssh_rss_mb: float | None = None
    sshd_fds: int | None = None  # sshd's session processes on srv, summed
    state: str | None = None
    active: int | None = None
    channels: int | None = None  # open channels per stats (only with streams > 1)
    reconnects: int | None = None
    recycled: int | None = None  # worn ssh connections replaced, make before break
    failed: int | None = None
    total: int | None = None
    aborted: dict[str, int] | None = None
    error: str = ""


def _fds(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return psutil.Process(pid).num_fds()
    except psutil.Error:
        return None


def take_sample(daemon: ShuttledDaemon, label: str, t: float, tally: Tally) -> Sample:
    s = Sample(label, round(t, 1), tally.started, tally.good_ok, tally.good_failed, tally.abandoned)
    pid = daemon.proc.pid if daemon.proc is not None else None
    s.daemon_alive = daemon.alive()
    s.daemon_fds, s.daemon_rss_mb = _fds(pid), rss_mb(pid)
    try:
        stats = daemon.stats()
    except Exception as exc:  # a daemon that does not answer is a finding, not the end
        s.error = f"stats: {type(exc).__name__}: {exc}"
        stats = {}
    s.state, s.active, s.reconnects = (
        stats.get("state"),
        stats.get("active"),
        stats.get("reconnects"),
    )
    s.recycled = stats.get("recycled")
    s.failed, s.total, s.aborted = stats.get("failed"), stats.get("total"), stats.get("aborted")
    per_stream = stats.get("stream_channels")
    s.channels = sum(per_stream) if isinstance(per_stream, list) else None
    ssh_pid = stats.get("ssh_pid")
    s.ssh_pid = ssh_pid if isinstance(ssh_pid, int) else None
    s.ssh_fds, s.ssh_rss_mb = _fds(s.ssh_pid), rss_mb(s.ssh_pid)
    sshd = [
        p for p, role in remote_processes(daemon.lab, daemon.sshd_port).items() if role == "sshd"
    ]
    counts = [_fds(p) for p in sshd]
    s.sshd_fds = sum(c for c in counts if c is not None) if sshd else None
    return s


def settle(
    daemon: ShuttledDaemon, base: Sample, label: str, t0: float, tally: Tally, wait: float
) -> tuple[Sample, float]:
    """Wait ``wait`` s, then sample every 2 s until what the load opened is closed again
    (fds and connections back to ``base``), at most SETTLE_MAX s more. Returns the last
    sample and the seconds waited."""
    began = time.monotonic()
    time.sleep(wait)
    while True:
        now = take_sample(daemon, label, time.monotonic() - t0, tally)
        if drained(base, now) or time.monotonic() - began >= wait + SETTLE_MAX:
            return now, time.monotonic() - began
        time.sleep(2.0)


def drained(start: Sample, now: Sample) -> bool:
    """Everything the load opened is closed again."""
    pairs = (
        (start.daemon_fds, now.daemon_fds),
        (start.ssh_fds, now.ssh_fds),
        (start.sshd_fds, now.sshd_fds),
        (start.active, now.active),
    )
    return all(a is not None and b is not None and b <= a for a, b in pairs)


# --- verdict -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Check:
    what: str
    rule: str
    value: str
    ok: bool


def verdict(start: Sample, end: Sample, tally: Tally, rss_tolerance: float) -> list[Check]:
    checks: list[Check] = []

    def back(what: str, a: float | None, b: float | None) -> None:
        ok = a is not None and b is not None and b <= a
        checks.append(Check(what, "end ≤ start", f"{_num(a)} → {_num(b)}", ok))

    back("daemon fds", start.daemon_fds, end.daemon_fds)
    back("ssh master fds", start.ssh_fds, end.ssh_fds)
    back("sshd fds (srv)", start.sshd_fds, end.sshd_fds)
    back("active connections", start.active, end.active)
    if start.channels is not None or end.channels is not None:
        back("open channels", start.channels, end.channels)
    for what, a, b in (
        ("daemon RSS", start.daemon_rss_mb, end.daemon_rss_mb),
        ("ssh master RSS", start.ssh_rss_mb, end.ssh_rss_mb),
    ):
        ok = a is not None and b is not None and b - a <= rss_tolerance
        growth = f" ({b - a:+.1f})" if a is not None and b is not None else ""
        checks.append(
            Check(
                what, f"end ≤ start + {rss_tolerance:g} MB", f"{_num(a)} → {_num(b)} MB{growth}", ok
            )
        )
    reconnects = (
        end.reconnects - start.reconnects
        if end.reconnects is not None and start.reconnects is not None
        else None
    )
    # A new ssh master is a restart unless the daemon replaced a worn one on purpose
    # (make before break, stats `recycled`): that one is no session restart.
    recycled = (end.recycled or 0) - (start.recycled or 0)
    same = (
        end.daemon_alive
        and end.ssh_pid is not None
        and (end.ssh_pid == start.ssh_pid or recycled > 0)
    )
    checks.append(
        Check(
            "session restarts",
            "0 reconnects, same ssh master (or replaced when worn), daemon alive, up",
            f"{_num(reconnects)} reconnects, {recycled} replaced when worn, ssh pid "
            f"{start.ssh_pid} → {end.ssh_pid}, daemon "
            f"{'alive' if end.daemon_alive else 'DEAD'}, {end.state}",
            reconnects == 0 and same and end.state == "up",
        )
    )
    good = tally.good_ok + tally.good_failed
    checks.append(
        Check(
            "good connections failed",
            "0",
            f"{tally.good_failed:,} of {good:,}",
            tally.good_failed == 0 and good > 0,
        )
    )
    hung = tally.outcomes.get("closed-port", collections.Counter()).get("hung", 0)
    checks.append(
        Check(
            "closed-port connections not ended by the proxy",
            f"0 (within {CLOSED_WAIT:g} s)",
            f"{hung:,}",
            hung == 0,
        )
    )
    return checks


def _num(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"


# --- report ---------------------------------------------------------------------------------------
def table(samples: Sequence[Sample]) -> str:
    head = (
        "| sample | t (s) | conns | good/s | abandoned/s | good failed | daemon fds | "
        "ssh fds | sshd fds | active | daemon RSS MB | ssh RSS MB | reconnects | "
        "aborted (tcp) |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    prev: Sample | None = None
    for s in samples:
        # Rates over the interval since the previous sample, while the load ran.
        during = prev is not None and prev.label != "idle" and s.label not in ("idle", "end")
        dt = s.t - prev.t if prev is not None else 0.0
        good_rate = (s.good_ok - prev.good_ok) / dt if prev and during and dt > 0 else None
        ab_rate = (s.abandoned - prev.abandoned) / dt if prev and during and dt > 0 else None
        aborted = s.aborted.get("tcp") if s.aborted else None
        when = "-" if s.label == "idle" else f"{s.t:.0f}"
        cells = [
            s.label,
            when,
            f"{s.started:,}",
            _rate(good_rate),
            _rate(ab_rate),
            f"{s.good_failed:,}",
            _num(s.daemon_fds),
            _num(s.ssh_fds),
            _num(s.sshd_fds),
            _num(s.active),
            _num(s.daemon_rss_mb),
            _num(s.ssh_rss_mb),
            _num(s.reconnects),
            _num(aborted),
        ]
        lines.append("| " + " | ".join(cells) + " |")
        prev = s
    return "\n".join(lines)


def interval_rates(samples: Sequence[Sample], tally: Tally) -> list[float]:
    """Good connections a second in each sampling interval of the load (the last one
    ends when the load ended)."""
    points = [(s.t, s.good_ok) for s in samples if s.label not in ("idle", "end")]
    points.append((tally.seconds, tally.good_ok))
    return [
        (g2 - g1) / (t2 - t1) for (t1, g1), (t2, g2) in itertools.pairwise(points) if t2 - t1 >= 1.0
    ]


def _rate(value: float | None) -> str:
    return "-" if value is None or value < 0 else f"{value:,.0f}"


def summary_lines(doc: dict[str, Any]) -> list[str]:
    load = doc["load"]
    lines = [
        f"load: {load['seconds']:.0f} s, {load['started']:,} connections "
        f"({load['good_ok']:,} good ok, {load['good_failed']:,} good failed, "
        f"{load['abandoned']:,} abandoned), {load['good_per_s']:,.0f} good/s + "
        f"{load['abandoned_per_s']:,.0f} abandoned/s, concurrency "
        f"{doc['args']['concurrency']}, rate {doc['args']['rate'] or 'unlimited'}"
    ]
    by_interval = load["good_per_s_by_interval"]
    if len(by_interval) > 1 and by_interval[0] > 0:
        lines.append(
            f"good/s per interval: {', '.join(f'{r:,.0f}' for r in by_interval)} "
            f"(last/first {by_interval[-1] / by_interval[0]:.2f})"
        )
    lat = load["good_latency"]
    if lat:
        lines.append(
            f"good connection time: median {lat['median_ms']:.2f} ms, p99 "
            f"{lat['p99_ms']:.2f} ms, max {lat['max_ms']:.0f} ms"
        )
    for kind, outcomes in load["outcomes"].items():
        text = ", ".join(f"{k} {v:,}" for k, v in sorted(outcomes.items(), key=lambda x: -x[1]))
        lines.append(f"  {kind}: {text}")
    if load["load_errors"]:
        lines.append(f"abandoned connections whose own connect failed: {load['load_errors']:,}")
    lines += [f"  failure: {f}" for f in load["failures"][:10]]
    end = doc["samples"][-1]
    if end.get("aborted") is not None:
        lines.append(
            f"daemon stats at the end: aborted {end['aborted']}, failed opens "
            f"{_num(end['failed'])}, total {_num(end['total'])}"
        )
    if doc["daemon_log"]["suspicious"]:
        lines.append(
            f"daemon log: {doc['daemon_log']['suspicious']} lines matching "
            f"{BAD_LOG.pattern!r}, e.g.:"
        )
        lines += [f"  {line[:200]}" for line in doc["daemon_log"]["examples"]]
    lines += [f"note: {n}" for n in doc["notes"]]
    return lines


def verdict_line(doc: dict[str, Any]) -> str:
    checks = doc["verdict"]["checks"]
    failed = [c for c in checks if not c["ok"]]
    load = doc["load"]
    by = {c["what"]: c["value"] for c in checks}
    word = "PASS" if not failed else "FAIL (" + ", ".join(c["what"] for c in failed) + ")"
    return (
        f"verdict: {word}: daemon fds {by['daemon fds']}, ssh fds {by['ssh master fds']}, "
        f"sshd fds {by['sshd fds (srv)']}, active {by['active connections']}, "
        f"RSS daemon {by['daemon RSS']} / ssh {by['ssh master RSS']} "
        f"(tolerance +{doc['args']['rss_tolerance']:g} MB), restarts: "
        f"{by['session restarts']}; {load['good_per_s']:,.0f} good/s + "
        f"{load['abandoned_per_s']:,.0f} abandoned/s; good failed "
        f"{by['good connections failed']}"
    )


# --- the run --------------------------------------------------------------------------------------
def tune(lab: Lab) -> list[str]:
    """SYSCTLS in the lab's namespaces; what could not be set becomes a note."""
    notes = []
    for role, settings in SYSCTLS.items():
        for key, value in settings.items():
            out = lab.run(role, ["sysctl", "-q", "-w", f"{key}={value}"], check=False)
            if out.returncode != 0:
                notes.append(
                    f"{role}: could not set {key}={value}: "
                    f"{(out.stderr or out.stdout).strip()[:200]}"
                )
    return notes


def daemon_log(daemon: ShuttledDaemon) -> dict[str, Any]:
    try:
        with open(daemon.lab.log_path(daemon.log_name), errors="replace") as fh:
            bad = [line.rstrip() for line in fh if BAD_LOG.search(line)]
    except OSError:
        bad = []
    return {"suspicious": len(bad), "examples": bad[:10]}


def soak(args: argparse.Namespace, lab: Lab, source: str, doc: dict[str, Any]) -> None:
    """Fill ``doc`` (samples, load, verdict); the caller tears the lab down."""
    doc["notes"] += tune(lab)
    ctx = Context(lab, args.cipher, quick=False, source=source, method=args.method)
    daemon = ALL[args.contender](ctx)
    assert isinstance(daemon, ShuttledDaemon)
    t0 = time.monotonic()
    daemon.start()
    log.info("%s up in %.1fs (%s)", daemon.name, time.monotonic() - t0, args.method)
    doc["notes"] += tune(lab)  # conntrack's settings exist once the firewall rules do
    aim = Aim.of(lab)
    samples: list[Sample] = []
    loads: list[Load] = []
    idle = take_sample(daemon, "idle", -args.warmup - SETTLE, Tally())
    samples.append(idle)
    try:
        if args.warmup > 0:
            log.info("warm-up: %.0f s of the same mix", args.warmup)
            warm = Load(lab, aim, args, args.warmup).start()
            loads.append(warm)
            warm.join(args.warmup + DRAIN + 5)
            doc["warmup"] = {
                "seconds": args.warmup,
                "started": warm.tally.started,
                "good_failed": warm.tally.good_failed,
            }
        seconds = args.minutes * 60
        load = Load(lab, aim, args, seconds)
        loads.append(load)
        # The start: after the warm-up has drained (what it left opening has ended).
        start, waited = settle(
            daemon,
            idle,
            "start",
            time.monotonic(),
            load.tally,
            args.settle if args.warmup > 0 else 0.0,
        )
        start.t = 0.0
        samples.append(start)
        doc["start_settle_seconds"] = round(waited, 1)
        log.info(
            "start: daemon fds %s, ssh fds %s, sshd fds %s, active %s, RSS %s/%s MB",
            start.daemon_fds,
            start.ssh_fds,
            start.sshd_fds,
            start.active,
            _num(start.daemon_rss_mb),
            _num(start.ssh_rss_mb),
        )
        began = time.monotonic()
        load.start()
        next_at = args.interval
        while load.alive():
            time.sleep(0.5)
            now = time.monotonic() - began
            if not daemon.alive() and not load.stop.is_set():
                log.warning("the daemon exited: stopping the load")
                doc["notes"].append(f"the daemon exited after {now:.0f}s:\n" + daemon.log_tail(10))
                load.stop.set()
            if now >= next_at and load.alive():
                s = take_sample(daemon, f"{next_at:.0f}s", now, load.tally)
                samples.append(s)
                log.info(
                    "%s: %s conns, %s good failed, daemon fds %s, active %s, "
                    "reconnects %s, RSS %s MB",
                    s.label,
                    f"{s.started:,}",
                    s.good_failed,
                    s.daemon_fds,
                    s.active,
                    s.reconnects,
                    _num(s.daemon_rss_mb),
                )
                next_at += args.interval
        if load.error is not None:
            raise load.error
        # Settle: a short wait, then until everything is back (bounded).
        end, waited = settle(daemon, start, "end", began, load.tally, args.settle)
        samples.append(end)
        doc["settle_seconds"] = round(waited, 1)
        tally = load.tally
        doc["load"] = {
            "seconds": tally.seconds,
            "started": tally.started,
            "good_ok": tally.good_ok,
            "good_failed": tally.good_failed,
            "abandoned": tally.abandoned,
            "load_errors": tally.load_errors,
            "good_per_s": tally.good_ok / tally.seconds if tally.seconds else 0.0,
            "abandoned_per_s": tally.abandoned / tally.seconds if tally.seconds else 0.0,
            "by_kind": dict(tally.by_kind),
            "outcomes": {k: dict(v) for k, v in tally.outcomes.items()},
            "failures": tally.failures,
            "good_latency": tally.latency(),
            "good_per_s_by_interval": [round(r, 1) for r in interval_rates(samples, tally)],
        }
        checks = verdict(start, end, tally, args.rss_tolerance)
        doc["verdict"] = {
            "pass": all(c.ok for c in checks),
            "checks": [dataclasses.asdict(c) for c in checks],
        }
    finally:
        for each in loads:  # on an interrupt: no more connections into a lab going away
            each.stop.set()
            each.join(DRAIN + 5)
        doc["samples"] = [dataclasses.asdict(s) for s in samples]
        doc["daemon_log"] = daemon_log(daemon)
        daemon.stop()


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python3 -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--minutes", type=float, default=10.0, help="how long the load runs")
    p.add_argument(
        "--method", choices=("nft", "iptables"), default="nft", help="shuttled's firewall backend"
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="at most this many new connections a second (default: as many as "
        "the machine sustains)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"connections in flight at most (default {DEFAULT_CONCURRENCY})",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"hard cap on connections started (default {DEFAULT_MAX_CONNECTIONS:,})",
    )
    p.add_argument(
        "--skip",
        default="",
        metavar="KIND,...",
        help=f"leave these kinds out of the mix ({', '.join(PROBES)})",
    )
    p.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    p.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="seconds of the same load before the start sample (not counted)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=SETTLE,
        help="seconds after the load before the end sample (then up to "
        f"{SETTLE_MAX:.0f} s more until the fds are back)",
    )
    p.add_argument(
        "--rss-tolerance",
        type=float,
        default=RSS_TOLERANCE_MB,
        help="MB of RSS growth allowed (Python's allocator keeps arenas)",
    )
    p.add_argument(
        "--contender",
        choices=DAEMONS,
        default="shuttled-daemon",
        help="which daemon profile (streams: 1, 2, 4)",
    )
    p.add_argument("--cipher", default=DEFAULT_CIPHER)
    p.add_argument(
        "--source",
        choices=("head", "worktree"),
        default="head",
        help="the last commit (default) or the work tree, as a snapshot",
    )
    p.add_argument(
        "--json",
        metavar="FILE",
        type=Path,
        default=tools.REPO / "bench" / "results" / "soak.json",
        help="where to write the results (default bench/results/soak.json)",
    )
    args = p.parse_args(argv)
    if not 0 < args.minutes <= MAX_MINUTES:
        p.error(f"--minutes must be in (0, {MAX_MINUTES:g}]")
    if not 1 <= args.concurrency <= 1024:
        p.error("--concurrency must be 1..1024")
    if not 1 <= args.max_connections <= 50_000_000:
        p.error("--max-connections must be 1..50,000,000")
    if args.rate is not None and not 0 < args.rate <= 100_000:
        p.error("--rate must be in (0, 100000]")
    skip = {k.strip() for k in args.skip.split(",") if k.strip()}
    if skip - set(PROBES):
        p.error(f"--skip: unknown kinds {', '.join(sorted(skip - set(PROBES)))}")
    args.mix = tuple(k for k in MIX if k not in skip)
    if not any(k in GOOD for k in args.mix):
        p.error("--skip: the mix needs good connections (http or echo)")
    if not 1 <= args.interval <= 600 or not 0 <= args.warmup <= 120 or not 0 <= args.settle <= 120:
        p.error("--interval 1..600, --warmup and --settle 0..120")
    return args


def run(args: argparse.Namespace) -> int:
    doc: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python3 -m bench.soak", *sys.argv[1:]]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": tools.machine(),
        "notes": [],
        "sysctls": SYSCTLS,
    }
    with tempfile.TemporaryDirectory(prefix="shuttled-bench-src-") as src:
        doc["machine"]["shuttled"] = tools.snapshot(args.source, Path(src))
        os.chmod(src, 0o755)
        with Lab() as lab:
            try:
                soak(args, lab, src, doc)
            finally:
                doc["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
                _write(args.json, doc)
    samples = [Sample(**s) for s in doc["samples"]]
    m = doc["machine"]
    print(
        f"## Soak: {args.contender}, {args.method}, {args.minutes:g} min, "
        f"shuttled {m['shuttled']}, {doc['started']}\n"
    )
    print(table(samples) + "\n")
    print("\n".join(summary_lines(doc)))
    print(verdict_line(doc))
    print(f"JSON: {args.json}")
    return 0 if doc["verdict"]["pass"] else 1


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    from bench.cli import run_lab_program

    args = parse(argv)
    return run_lab_program("soak", args, run, (*TOOLS, args.method))


if __name__ == "__main__":
    sys.exit(main())
