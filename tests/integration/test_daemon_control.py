"""The control socket under abuse, with a real daemon: 1,000 malformed requests of every
kind leave it answering, its tunnel untouched, and no file descriptor behind."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.integration.daemon_util import (
    DaemonSet,
    http_ok,
    root_profile,
    user_python,
    wait_for,
)
from tests.lab import Lab, LabUser

pytestmark = pytest.mark.integration

TOTAL = 1000
WORKERS = 16  # concurrent abusers, below the daemon's 64-client cap
IDLE = 3  # connections that never send a line: the daemon's idle timeout (10 s) ends them
REPLY_TIMEOUT = 15.0

BAD_JSON = [
    b"{",
    b"}",
    b"[]",
    b"null",
    b"42",
    b'"status"',
    b"{}",
    b'{"v":1}',
    b'{"v":2,"id":1,"verb":"status"}',
    b'{"v":true,"id":1,"verb":"status"}',
    b'{"v":1,"id":"7","verb":"status"}',
    b'{"v":1,"id":-1,"verb":"status"}',
    b'{"v":1,"id":1e400,"verb":"status"}',
    b'{"v":1,"id":NaN,"verb":"status"}',
    b'{"v":1,"id":1,"verb":"STATUS"}',
    b'{"v":1,"id":1,"verb":"nope"}',
    b'{"v":1,"id":1,"verb":"status","args":[]}',
    b'{"v":1,"id":1,"verb":"status","x":1}',
    b'{"v":1,"id":1,"verb":"up","args":{"profile":5}}',
    b'{"v":1,"id":1,"verb":"up","args":{"profile":"work","timeout":-1}}',
    b'{"v":1,"id":1,"verb":"up","args":{"profile":"work","wait":"yes"}}',
    b'{"v":1,"id":1,"verb":"stats","args":{}}',
    b'{"v":1,"id":1,"verb":"stats","args":{"profile":"' + b"x" * 5000 + b'"}}',
    b'{"v":1,"id":1,"verb":"status","args":{"profile":"\\u0000"}}',
    b"[" * 30000 + b"]" * 30000,  # nested past the recursion limit, under 64 KiB
    b'{"v":1,"id":1,"verb":"status"' + b',"verb":"no such"' * 3000 + b"}",  # last wins
    b'\xff\xfe{\x00"v\x00"',  # not UTF-8
    b"\x00" * 100,
]


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(REPLY_TIMEOUT)
    sock.connect(str(path))
    return sock


def _replies(sock: socket.socket) -> list[dict[str, object]]:
    """Reply lines until the daemon hangs up (or the client's half-close is answered)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def _send_then_read(path: Path, payload: bytes) -> list[dict[str, object]]:
    with _connect(path) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it hung up on an oversized line before we finished: fine
        return _replies(sock)


def _all_errors(replies: list[dict[str, object]]) -> bool:
    return bool(replies) and all(
        r.get("ok") is False and isinstance(r.get("error"), dict) for r in replies
    )


def random_bytes(path: Path, rng: random.Random) -> None:
    payload = rng.randbytes(rng.randrange(1, 4096))
    replies = _send_then_read(path, payload)
    # Every line (a newline may occur at random) gets an answer; nothing is ever "ok".
    assert all(r.get("ok") is False for r in replies), replies


def wrong_json(path: Path, rng: random.Random) -> None:
    lines = rng.sample(BAD_JSON, 3)
    replies = _send_then_read(path, b"".join(line + b"\n" for line in lines))
    assert len(replies) == 3 and _all_errors(replies), (lines, replies)


def huge_line(path: Path, rng: random.Random) -> None:
    size = rng.choice([(64 << 10) + 1, 100 << 10, 1 << 20])
    newline = rng.random() < 0.5
    replies = _send_then_read(path, b"a" * size + (b"\n" if newline else b""))
    # The daemon may hang up before we could read its answer; when there is one, it says so.
    if replies:
        assert _all_errors(replies) and "longer than" in str(replies[0]["error"]), replies


def half_line(path: Path, rng: random.Random) -> None:
    request = b'{"v":1,"id":1,"verb":"status","args":{}}'
    with _connect(path) as sock:
        sock.sendall(request[: rng.randrange(1, len(request))])
    # closed mid-line, without waiting for anything


KINDS: list[Callable[[Path, random.Random], None]] = [
    random_bytes,
    wrong_json,
    huge_line,
    half_line,
]


def test_1000_malformed_requests_leave_the_daemon_answering(lab: Lab, daemons: DaemonSet) -> None:
    d = daemons.work_up(autostart=True)
    ssh_pid = d.ssh_pid("work")
    proc = psutil.Process(d.pid)
    fds_before = proc.num_fds()
    rss_before = proc.memory_info().rss

    idle = [_connect(d.socket) for _ in range(IDLE)]  # slow clients, alongside the rest
    started = time.monotonic()
    rng = random.Random(20261126)
    jobs = [(KINDS[i % len(KINDS)], random.Random(rng.random())) for i in range(TOTAL)]
    with ThreadPoolExecutor(WORKERS) as pool:
        for batch in range(0, TOTAL, 100):
            futures = [pool.submit(kind, d.socket, r) for kind, r in jobs[batch : batch + 100]]
            for future in futures:
                future.result(timeout=60)
            assert d.alive, d.log()
            status = d.ctl("status")
            assert status.returncode == 0, (status.stderr, d.log())

    for sock in idle:  # each gets an error reply once the idle timeout ends it
        with sock:
            sock.settimeout(max(1.0, started + REPLY_TIMEOUT + 5 - time.monotonic()))
            replies = _replies(sock)
        assert _all_errors(replies) and "no complete request" in str(replies[0]["error"])

    assert d.alive and proc.pid == d.pid
    assert d.state("work") == "up" and d.ssh_pid("work") == ssh_pid
    assert http_ok(lab, lab.tgt_v4)
    assert d.ctl("up", "work").returncode == 0  # mutating verbs still work too
    wait_for(
        "the daemon's descriptors back to where they were",
        lambda: proc.num_fds() <= fds_before + 2,
        10.0,
        detail=lambda: f"{fds_before} -> {proc.num_fds()}",
    )
    assert proc.memory_info().rss < rss_before + (64 << 20)
    log = lab.log_tail(d.log_name, 100000)
    assert "Traceback" not in log and "failed" not in log, log[-3000:]


FLOOD = """
import socket, sys, time
socks = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    try:
        s.sendall(b'{"v":1,"id":1,"verb":"watch","args":{}}\\n')  # a stream: never idle
    except OSError:
        pass  # over the per-uid limit: told busy and hung up on at accept, maybe first
    socks.append(s)
print("holding", flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_unprivileged_client_flood_does_not_lock_root_out(
    lab: Lab, lab_user: LabUser, daemons: DaemonSet
) -> None:
    d = daemons.new()
    d.write_profile("work", root_profile(lab, lab.target_nets))
    d.start()
    flood = lab.popen(
        "cli", [user_python(), "-c", FLOOD, str(d.socket), "80", "60"], user=lab_user, name="flood"
    )
    try:
        wait_for(
            "the flood to hold its connections",
            lambda: "holding" in lab.log_tail("flood") or flood.poll() is not None,
            20.0,
        )
        assert flood.poll() is None, lab.log_tail("flood")
        status = d.ctl("status")
        assert status.returncode == 0, status.stderr
        up = d.ctl("up", "work")
        assert up.returncode == 0, up.stderr
    finally:
        lab.stop(flood)
