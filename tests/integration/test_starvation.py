"""Not starvable, with a real daemon in the lab: ordinary users who
flood the tunnel with connections, flood the control socket with connects, or throw
garbage at it, leave root's `status`, root's traffic and the tunnel itself working.

The floods run as unprivileged lab users (setpriv), from scripts that need only the
standard library; every loop in them is bounded in count and in time.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from shuttlectl.client import Client
from tests.integration.daemon_util import (
    Daemon,
    DaemonSet,
    http_ok,
    root_profile,
    user_python,
    wait_for,
)
from tests.lab import Lab, LabUser, clients

pytestmark = pytest.mark.integration

NOFILE = 1024  # the daemon's soft and hard limit in the flood test: what a unit without
# LimitNOFILE gave it before it raised its soft limit (hard 1024 keeps it there)
TCP_FLOOD = 5000
CONTROL_FLOODERS = 4
STATUS_CALLS = 20
STATUS_WITHIN = 1.0

# Opens COUNT connections to HOST:PORT without waiting for any, waits (bounded) until
# each is established or failed, prints a JSON line, holds them until stdin closes (or
# HOLD seconds), then prints how many were still alive, reset or closed.
TCP_FLOODER = r"""
import errno, json, resource, select, socket, sys, time
host, port, count, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
t0 = time.monotonic()
socks, failed = [], 0
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    if s.connect_ex((host, port)) in (0, errno.EINPROGRESS):
        socks.append(s)
    else:
        failed += 1
        s.close()
poller = select.poll()
for s in socks:
    poller.register(s, select.POLLOUT)
waiting, deadline = len(socks), time.monotonic() + 20
while waiting and time.monotonic() < deadline:
    for fd, _ev in poller.poll(200):
        poller.unregister(fd)
        waiting -= 1
print(json.dumps({"opened": len(socks), "failed": failed, "unsettled": waiting,
                  "seconds": round(time.monotonic() - t0, 2)}), flush=True)
select.select([sys.stdin], [], [], hold)
alive = reset = closed = 0
for s in socks:
    try:
        data = s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        closed += not data
        alive += bool(data)
    except BlockingIOError:
        alive += 1
    except OSError:
        reset += 1
print(json.dumps({"alive": alive, "reset": reset, "closed": closed}), flush=True)
"""

# Loops socket(); non-blocking connect(); close() on the control socket for SECONDS.
CONTROL_FLOODER = r"""
import json, socket, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
counts = {"connected": 0, "eagain": 0, "other": 0}
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(path)
        counts["connected"] += 1
    except BlockingIOError:
        counts["eagain"] += 1
    except OSError:
        counts["other"] += 1
    s.close()
print(json.dumps(counts), flush=True)
"""

# Sends COUNT fuzzed requests over WORKERS connections to the control socket for at most
# SECONDS: batches of BATCH lines (garbage bytes, deep nesting, wrong types, unknown
# fields and verbs, valid requests), each answered before the next batch; now and then
# alone, a line over 64 KiB, a partial line then a hang-up, or a `watch` left at once.
# WORKERS is above the per-uid limit (8): some connects must be told busy.
FUZZER = r"""
import asyncio, json, random, sys, time
path, count, seed, workers, seconds = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                       int(sys.argv[4]), float(sys.argv[5]))
BATCH = 16
rng = random.Random(seed)
# status and stats list the kernel's rules (nft, 13-100 ms): a few of them, each user
# is held to its share of the daemon's time for them (see POOL)
VERBS = ["list", "version", "up", "down", "reload", "connections", "fly", "STATUS",
         "x" * 40, "", "status\u0000"]
ARGS = [{}, {"profile": "work"}, {"profile": "nope"}, {"profile": 7}, {"profile": None},
        {"timeout": "x"}, {"timeout": -1}, {"timeout": 1e308}, {"wait": "yes"}, [], "s", 3,
        {"profile": "x" * 3000}, {"a": {"b": [1, 2, {"c": None}]}}, {"profile": "work", "z": 1}]
IDS = [-1, 2 ** 60, "7", 1.5, None, True, [], {}]

def line(i):
    k = rng.randrange(12)
    if k == 0:
        data = rng.randbytes(rng.randrange(1, 300))
    elif k == 1:
        data = b"[" * rng.randrange(1, 20000) + b"]" * rng.randrange(0, 3)
    elif k == 2:
        data = json.dumps(rng.choice([[], 1, "up", None, {}, {"v": 1}, {"v": 1, "id": i}]))
    elif k == 3:
        data = json.dumps({"v": rng.choice([0, 2, "1", True, None, 1.5]), "id": i,
                           "verb": "status"})
    elif k == 4:
        data = json.dumps({"v": 1, "id": rng.choice(IDS), "verb": "status"})
    elif k == 5:
        data = json.dumps({"v": 1, "id": i, "verb": "status", "extra": 1})
    else:
        data = json.dumps({"v": 1, "id": i, "verb": rng.choice(VERBS),
                           "args": rng.choice(ARGS)})
    data = (data if isinstance(data, bytes) else data.encode()).replace(b"\n", b" ")
    return (data if data.strip() else b"!" + data) + b"\n"

POOL = [line(i) for i in range(3000)] + [  # drawn from at random: cheap, the daemon gets the CPU
    b'{"v":1,"id":1,"verb":"status","args":{}}\n', b'{"v":1,"id":2,"verb":"stats","args":'
    b'{"profile":"work"}}\n', b'{"v":1,"id":3,"verb":"status","args":{"profile":"nope"}}\n']

SPECIAL = {"huge": b"a" * (70 << 10) + b"\n", "watch": b'{"v":1,"id":1,"verb":"watch"}\n',
           "partial": b'{"v":1,"id":1,"verb":"stat'}
stats = {"sent": 0, "ok": 0, "error": 0, "busy": 0, "hangups": 0, "huge": 0, "partial": 0,
         "watch": 0}
deadline = time.monotonic() + seconds

async def exchange(reader, writer, lines):
    # The replies, in order; fewer when the daemon hangs up (busy, a line too long).
    try:
        writer.write(b"".join(lines))
        await writer.drain()
    except ConnectionError:
        pass  # hung up on us already: its reply may be waiting all the same
    replies = []
    try:
        async with asyncio.timeout(20):
            while len(replies) < len(lines):
                reply = await reader.readline()
                if not reply:
                    break
                replies.append(reply)
    except (ConnectionError, TimeoutError, ValueError):
        pass
    return replies

def count_replies(replies):
    busy = False
    for reply in replies:  # {"v":1,"id":..,"ok":..}: no need to parse it all
        kind = ("busy" if b'"code":"busy"' in reply else "ok" if b'"ok":true' in reply
                else "error")
        stats[kind] += 1
        busy = busy or kind == "busy"
    return busy

async def worker():
    conn = None
    while stats["sent"] < count and time.monotonic() < deadline:
        if conn is None:
            conn = await asyncio.open_unix_connection(path, limit=1 << 20)
        r = rng.random()
        special = ("partial" if r < 0.03 else "huge" if r < 0.06 else "watch" if r < 0.08
                   else None)
        if special == "partial":
            conn[1].write(SPECIAL["partial"])
            conn[1].close()
            conn = None
            stats["sent"] += 1
            stats["partial"] += 1
            continue
        lines = [SPECIAL[special]] if special else rng.choices(POOL, k=BATCH)
        stats["sent"] += len(lines)
        if special:
            stats[special] += 1
        replies = await exchange(*conn, lines)
        busy = count_replies(replies)
        if len(replies) < len(lines) and not busy:
            stats["hangups"] += 1
        if busy or special or len(replies) < len(lines):
            conn[1].close()
            conn = None
            if busy:
                stats["sent"] -= len(lines)  # not requests: refused at connect
                await asyncio.sleep(0.2)
    if conn is not None:
        conn[1].close()

async def main():
    await asyncio.gather(*(worker() for _ in range(workers)))

asyncio.run(main())
print(json.dumps(stats), flush=True)
"""
# Asks `status` (which lists the kernel's rules: two runs of nft) 8 at a time on 8
# connections for SECONDS; prints how many answers came.
STATUS_LOOP = r"""
import asyncio, json, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
answers = 0
async def worker():
    global answers
    reader, writer = await asyncio.open_unix_connection(path)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        writer.write(b'{"v":1,"id":1,"verb":"status","args":{}}\n' * 8)
        for _ in range(8):
            answers += bool(await reader.readline())
    writer.close()
async def main():
    await asyncio.gather(*(worker() for _ in range(8)))
asyncio.run(main())
print(json.dumps({"answers": answers}), flush=True)
"""
FUZZ_REQUESTS = 100_000
FUZZ_USERS = 3
FUZZ_WORKERS = 10


@pytest.fixture
def second_user(lab: Lab) -> Iterator[LabUser]:
    user = lab.add_user()
    yield user
    if user in lab.users:
        lab.remove_user(user)


def limited_daemon(daemons: DaemonSet, nofile: int) -> Daemon:
    """A daemon started under `prlimit --nofile=N:N` (soft and hard)."""
    d = daemons.new()
    plain = d.argv

    def argv(dbus: bool = False) -> list[str]:
        return ["prlimit", f"--nofile={nofile}:{nofile}", *plain(dbus)]

    d.argv = argv  # type: ignore[method-assign]
    return d


def user_script(
    lab: Lab, user: LabUser, script: str, *args: object, name: str
) -> subprocess.Popen[str]:
    return lab.popen(
        "cli",
        [user_python(), "-c", script, *map(str, args)],
        user=user,
        name=name,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def json_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The next line the script prints, as JSON (AssertionError after `timeout`)."""
    result: list[str] = []
    reader = threading.Thread(
        target=lambda: result.append(proc.stdout.readline()),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()
    reader.join(timeout)
    assert result and result[0], f"no output from the flooder within {timeout:g} s"
    document: dict[str, Any] = json.loads(result[0])
    return document


def timed_status(d: Daemon, public: bool = False) -> float:
    """Seconds root's status call took (in this process: no interpreter start-up);
    `public`: through the socket everyone uses, not the administrators' door."""
    client = Client(d.socket, timeout=10, admin=not public)
    t0 = time.monotonic()
    client.call("status")
    return time.monotonic() - t0


def test_floods_from_users_starve_neither_root_nor_the_tunnel(
    lab: Lab, lab_user: LabUser, second_user: LabUser, daemons: DaemonSet
) -> None:
    d = limited_daemon(daemons, NOFILE)
    d.write_profile("work", root_profile(lab, lab.target_nets))
    d.start()
    d.up("work")
    daemon = psutil.Process(d.pid)

    tcp = user_script(
        lab, lab_user, TCP_FLOODER, lab.tgt_v4, lab.ports.echo, TCP_FLOOD, 60, name="tcp-flooder"
    )
    opened = json_line(tcp, 40)
    assert opened["opened"] + opened["failed"] == TCP_FLOOD, opened
    control = [
        user_script(lab, second_user, CONTROL_FLOODER, d.socket, 8, name=f"control-flooder-{i}")
        for i in range(CONTROL_FLOODERS)
    ]
    time.sleep(0.5)  # the control floods are under way

    cpu0 = sum(daemon.cpu_times()[:2])
    latencies = [timed_status(d) for _ in range(STATUS_CALLS)]
    # The public socket: a queue the flood keeps full, but no EAGAIN for anyone.
    public = [timed_status(d, public=True) for _ in range(5)]
    user_status = d.ctl("status", user=lab_user)
    ctl_runs = []
    for _ in range(5):
        t0 = time.monotonic()
        result = d.ctl("status", "work")
        ctl_runs.append((result.returncode, round(time.monotonic() - t0, 2)))
    assert http_ok(lab, lab.tgt_v4), d.log()
    stats = d.stats("work")
    fds = daemon.num_fds()
    cpu = sum(daemon.cpu_times()[:2]) - cpu0
    floods = [json_line(p, 30) for p in control]
    tcp.stdin.close()  # type: ignore[union-attr]
    held = json_line(tcp, 30)
    print(
        f"\nflood: {opened} then {held}; control floods {floods}\n"
        f"root status latency max {max(latencies):.3f} s, median "
        f"{sorted(latencies)[len(latencies) // 2]:.3f} s; shuttlectl runs {ctl_runs}; "
        f"through the public socket max {max(public):.3f} s\n"
        f"daemon fds {fds} of {NOFILE}, cpu {cpu:.1f} s during the checks; stats "
        f"active {stats['active']} refused {stats['refused']} deferred {stats['deferred']}"
    )

    assert max(latencies) < STATUS_WITHIN, latencies
    assert all(code == 0 for code, _ in ctl_runs), (ctl_runs, d.log())
    assert user_status.returncode == 0, user_status.stderr  # another user is not locked out
    assert sum(f["connected"] for f in floods) > 1000, floods  # they did get in, a lot
    assert stats["reconnects"] == 0 and d.state("work") == "up", stats
    assert stats["refused"] > 0 and fds < NOFILE - 32, (stats, fds)
    assert held["alive"] >= 100, held  # the user got a share, not nothing
    log = d.log(lines=100000)
    assert log.count("refused connections over") <= 3, log[-3000:]
    assert "out of system resource" not in log and "cannot accept" not in log, log[-3000:]
    # Still serving once the floods are gone.
    assert timed_status(d) < STATUS_WITHIN and http_ok(lab, lab.tgt_v4)


@pytest.fixture
def fuzz_users(lab: Lab) -> Iterator[list[LabUser]]:
    users = [lab.add_user() for _ in range(FUZZ_USERS)]
    yield users
    for user in users:
        if user in lab.users:
            lab.remove_user(user)


class RssSampler:
    """The daemon's RSS every 0.1 s in a thread: the peak."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.peak = proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def test_a_hundred_thousand_fuzzed_requests_from_several_users(
    lab: Lab, fuzz_users: list[LabUser], daemons: DaemonSet
) -> None:
    d = daemons.work_up()
    daemon = psutil.Process(d.pid)
    for _ in range(3):  # warm up: the first replies allocate what every later one reuses
        timed_status(d)
    rss_before, fds_before = daemon.memory_info().rss, daemon.num_fds()
    sampler = RssSampler(daemon)
    cpu0 = sum(daemon.cpu_times()[:2])
    t0 = time.monotonic()
    fuzzers = [
        user_script(
            lab,
            user,
            FUZZER,
            d.socket,
            FUZZ_REQUESTS // FUZZ_USERS,
            seed,
            FUZZ_WORKERS,
            45,
            name=f"fuzzer-{seed}",
        )
        for seed, user in enumerate(fuzz_users)
    ]
    during = [timed_status(d) for _ in range(5)]
    results = [json_line(p, 55) for p in fuzzers]
    seconds = time.monotonic() - t0
    peak = sampler.stop()
    cpu = sum(daemon.cpu_times()[:2]) - cpu0
    time.sleep(0.5)
    rss_after = daemon.memory_info().rss
    mib = 1 << 20
    print(
        f"\nfuzz: {sum(r['sent'] for r in results)} requests in {seconds:.1f} s: "
        f"{results}\nroot status during it: max {max(during):.3f} s; daemon cpu {cpu:.1f} s\n"
        f"daemon RSS {rss_before / mib:.1f} MiB before, peak {peak / mib:.1f} MiB, "
        f"{rss_after / mib:.1f} MiB after; fds {fds_before} -> {daemon.num_fds()}"
    )

    assert sum(r["sent"] for r in results) >= FUZZ_REQUESTS - FUZZ_USERS, results
    assert all(r["busy"] > 0 for r in results), results  # the per-uid limit held
    assert all(r["ok"] > 0 and r["error"] > r["ok"] for r in results), results
    assert d.alive and max(during) < STATUS_WITHIN, during
    assert peak < rss_before + 64 * mib and rss_after < rss_before + 32 * mib
    assert d.state("work") == "up" and d.stats("work")["reconnects"] == 0
    assert http_ok(lab, lab.tgt_v4)
    wait_for(
        "the daemon's descriptors back to where they were",
        lambda: daemon.num_fds() <= fds_before + 2,
        15.0,
        detail=lambda: f"{fds_before} -> {daemon.num_fds()}",
    )
    log = d.log(lines=100000)
    assert "Traceback" not in log and "failed" not in log, log[-3000:]


def test_a_user_asking_status_in_a_loop_gets_a_share_of_the_daemon_not_all_of_it(
    lab: Lab, lab_user: LabUser, daemons: DaemonSet
) -> None:
    d = daemons.work_up()
    loop = user_script(lab, lab_user, STATUS_LOOP, d.socket, 8, name="status-loop")
    time.sleep(1.5)  # its burst is spent
    latencies = [timed_status(d) for _ in range(10)]
    public = [timed_status(d, public=True) for _ in range(3)]
    with lab.netns("cli"):
        rtts = clients.echo_rtt(lab.tgt_v4, 200)
    answered = json_line(loop, 30)
    print(
        f"\nstatus loop: {answered}; root status max {max(latencies):.3f} s, through the "
        f"public socket max {max(public):.3f} s; echo rtt max {max(rtts) * 1e3:.1f} ms"
    )
    # Without the share: 1.6-2.2 s (each status runs nft twice, ~13 ms, in the loop).
    assert max(latencies) < STATUS_WITHIN and max(public) < STATUS_WITHIN
    assert answered["answers"] >= 8  # slowed to its share, not shut out
