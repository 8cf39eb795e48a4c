"""Measurements: each function takes a started contender and returns plain numbers.

Every loop is bounded in count and in time; all traffic stays inside the lab (the client
namespace talks to the target namespace through the contender).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from bench import loadgen
from bench.contenders import Contender, RawSsh
from tests.lab import clients

IPERF_GRACE = 25.0


@dataclass
class Sizes:
    """How long and how much, per mode."""

    bulk_seconds: int
    bulk_omit: int
    conn_count: int
    conn_seconds: float
    rtt_count: int
    concurrent: int
    concurrent_seconds: float

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(
                bulk_seconds=1,
                bulk_omit=0,
                conn_count=200,
                conn_seconds=1.5,
                rtt_count=200,
                concurrent=200,
                concurrent_seconds=30.0,
            )
        return cls(
            bulk_seconds=8,
            bulk_omit=1,
            conn_count=20000,
            conn_seconds=5.0,
            rtt_count=3000,
            concurrent=5000,
            concurrent_seconds=90.0,
        )


# --- CPU accounting ---------------------------------------------------------------------------
@dataclass
class CpuMeter:
    """CPU seconds (user+system) of a contender's processes between start() and stop().

    Processes that appear during the interval count from zero; the set is taken again at
    the end so that per-connection children (sshd sessions) are included."""

    contender: Contender
    start_times: dict[int, tuple[str, float]] = field(default_factory=dict)

    def start(self) -> CpuMeter:
        self.start_times = _cpu(self.contender.processes())
        return self

    def stop(self) -> dict[str, float]:
        end = _cpu(
            {**{p: r for p, (r, _) in self.start_times.items()}, **self.contender.processes()}
        )
        out: dict[str, float] = {}
        for pid, (role, seconds) in end.items():
            before = self.start_times.get(pid, (role, 0.0))[1]
            out[role] = out.get(role, 0.0) + max(0.0, seconds - before)
        return out


def _cpu(pids: dict[int, str]) -> dict[int, tuple[str, float]]:
    out = {}
    for pid, role in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = (role, t.user + t.system)
        except psutil.Error:
            continue
    return out


def add_cpu(total: dict[str, float], part: dict[str, float]) -> None:
    for role, seconds in part.items():
        total[role] = total.get(role, 0.0) + seconds


# --- bulk ---------------------------------------------------------------------------------------
@dataclass
class Bulk:
    gbit_per_s: float
    nbytes: int
    cpu: dict[str, float]


def bulk(contender: Contender, sizes: Sizes, *, down: bool, streams: int) -> Bulk:
    """One bulk figure; a failed attempt is retried once (and said so in the notes)."""
    fn = _bulk_raw if isinstance(contender, RawSsh) else _bulk_iperf
    try:
        return fn(contender, sizes, down=down, streams=streams)  # type: ignore[arg-type]
    except RuntimeError as exc:
        contender.ctx.notes.append(
            f"{contender.name}: bulk {'down' if down else 'up'} x{streams} retried after: {exc}"
        )
        time.sleep(1.0)
        return fn(contender, sizes, down=down, streams=streams)  # type: ignore[arg-type]


def _bulk_iperf(contender: Contender, sizes: Sizes, *, down: bool, streams: int) -> Bulk:
    lab = contender.lab
    ep = contender.endpoints().iperf3
    assert ep is not None
    argv = [
        "iperf3",
        "-c",
        ep[0],
        "-p",
        str(ep[1]),
        "-t",
        str(sizes.bulk_seconds),
        "-J",
        "--connect-timeout",
        "10000",
    ]
    if sizes.bulk_omit:
        argv += ["-O", str(sizes.bulk_omit)]
    if streams > 1:
        argv += ["-P", str(streams)]
    if down:
        argv.append("-R")
    meter = CpuMeter(contender).start()
    timeout = sizes.bulk_seconds + sizes.bulk_omit + IPERF_GRACE
    try:
        proc = lab.run("cli", argv, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        restart_iperf3(contender)
        raise RuntimeError(f"iperf3 did not finish in {timeout:.0f}s") from None
    cpu = meter.stop()
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        restart_iperf3(contender)
        raise RuntimeError(
            f"iperf3 output is not JSON (rc {proc.returncode}): "
            f"{(proc.stderr or proc.stdout)[-300:]}"
        ) from None
    if "error" in result:
        restart_iperf3(contender)
        raise RuntimeError(f"iperf3: {result['error']}")
    received = result["end"]["sum_received"]
    return Bulk(received["bits_per_second"] / 1e9, int(received["bytes"]), cpu)


def restart_iperf3(contender: Contender) -> None:
    """An interrupted test can leave `iperf3 -s` busy: start a fresh one."""
    lab = contender.lab
    name = f"iperf3-{lab.ports.iperf3}"
    for pname, proc in list(lab._procs):
        if pname == name and proc.poll() is None:
            lab.stop(proc)
    lab.start_iperf3()


def _bulk_raw(contender: RawSsh, sizes: Sizes, *, down: bool, streams: int) -> Bulk:
    """`cat` through session channels of one master, C tools at both ends (like iperf3):
    up: ``timeout T cat /dev/zero | ssh srv 'wc -c'``; down: ``ssh srv 'timeout T cat
    /dev/zero' | wc -c``.  Bytes are what wc counted; time is from start to the last
    pipeline's end (session setup included, a few ms of T)."""
    lab = contender.lab
    seconds = sizes.bulk_seconds + sizes.bulk_omit
    if down:
        remote = f"exec timeout {seconds} cat /dev/zero"
        script = f"{shlex.join(contender.stream_argv(remote))} | wc -c"
    else:
        script = (
            f"timeout {seconds} cat /dev/zero | {shlex.join(contender.stream_argv('exec wc -c'))}"
        )
    meter = CpuMeter(contender).start()
    start = time.monotonic()
    procs = [
        lab.popen("cli", script, name=f"raw-{i}", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for i in range(streams)
    ]
    counts = []
    errors = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=seconds + IPERF_GRACE)
            counts.append(int(out.split()[-1]))
        except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            lab.stop(proc)
    elapsed = time.monotonic() - start
    cpu = meter.stop()
    if errors:
        raise RuntimeError("raw ssh: " + "; ".join(errors))
    total = sum(counts)
    return Bulk(total * 8 / 1e9 / elapsed, total, cpu)


# --- connections, latency, concurrency -----------------------------------------------------
def conn_rate(contender: Contender, sizes: Sizes, concurrency: int) -> loadgen.LoadResult:
    ep = contender.endpoints().http
    assert ep is not None
    with contender.lab.netns("cli"):
        result = asyncio.run(
            loadgen.http_load(
                ep[0],
                ep[1],
                concurrency=concurrency,
                count=sizes.conn_count,
                seconds=sizes.conn_seconds,
            )
        )
    if result.ok == 0:
        raise RuntimeError(
            f"no HTTP request succeeded ({result.errors} errors: {result.first_error})"
        )
    return result


def rtt(contender: Contender, sizes: Sizes) -> tuple[float, float]:
    """Median and p99 of 1-byte round trips over one connection, in microseconds."""
    ep = contender.endpoints().echo
    assert ep is not None
    with contender.lab.netns("cli"):
        samples = clients.echo_rtt(ep[0], sizes.rtt_count + 20, port=ep[1])[20:]
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return statistics.median(samples) * 1e6, p99 * 1e6


@dataclass
class Concurrency:
    wanted: int
    ok: int
    rss_before_mb: float | None
    rss_held_mb: float | None
    rss_after_mb: float | None
    seconds: float
    first_error: str

    @property
    def growth_mb(self) -> float | None:
        if self.rss_before_mb is None or self.rss_held_mb is None:
            return None
        return self.rss_held_mb - self.rss_before_mb


def concurrent(contender: Contender, sizes: Sizes) -> Concurrency:
    ep = contender.endpoints().echo
    assert ep is not None
    pid = contender.rss_pid()
    before = rss_mb(pid)
    holder: dict[str, Any] = {}

    def measure_held() -> None:
        holder["held"] = rss_mb(pid)

    t0 = time.monotonic()
    with contender.lab.netns("cli"):
        res = asyncio.run(
            loadgen.hold_many(
                ep[0],
                ep[1],
                sizes.concurrent,
                seconds=sizes.concurrent_seconds,
                while_held=measure_held,
            )
        )
    seconds = time.monotonic() - t0
    time.sleep(1.0)
    after = rss_mb(pid)
    return Concurrency(
        sizes.concurrent, res.ok, before, holder.get("held"), after, seconds, res.first_error
    )


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.memory_info().rss / (1 << 20)
    except psutil.Error:
        return None
