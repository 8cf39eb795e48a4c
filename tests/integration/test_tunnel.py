"""`shuttled run` end to end: real sshd, real nft/iptables, namespaces made here.

Each tunnel variant (firewall backend x forwarding mode) runs the same traffic
suite; the fixture checks on the way out that the client's ruleset is exactly
what it was before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.lab import Lab, LabUser, clients
from tests.lab.runner import VARIANTS, start_run, stop_run
from tests.lab.services import CLOSE_FIRST_LINE

pytestmark = pytest.mark.integration

BIG = 100 << 20


@dataclasses.dataclass
class Tunnel:
    lab: Lab
    proc: subprocess.Popen[bytes]
    name: str
    method: str
    helper: bool

    def log(self) -> str:
        return self.lab.log_tail(self.name, 60)


def remote_files(lab: Lab, user: LabUser) -> set[str]:
    """Everything the remote account owns in its home and the temp dirs: the helper
    runs as that account, so anything it wrote would show up here."""
    return lab.fs_snapshot(("/tmp", "/var/tmp", "/dev/shm", user.home), uid=user.uid)


@pytest.fixture(scope="module", params=VARIANTS)
def tunnel(request: pytest.FixtureRequest, lab: Lab) -> Iterator[Tunnel]:
    method, helper = request.param
    before = lab.firewall_snapshot()
    # Helper mode logs in as an unprivileged account, so "nothing written on the
    # remote" can be checked exactly: no new file owned by that account.
    user = lab.add_user() if helper else None
    remote_fs = remote_files(lab, user) if user else set()
    name = f"shuttled-{method}-{'helper' if helper else 'direct'}"
    proc = start_run(
        lab,
        "--dns",
        "-x",
        lab.excluded_net_v4,
        "-x",
        lab.excluded_net_v6,
        *lab.target_nets,
        method=method,
        name=name,
        user=user,
        remote=user.remote_nofwd if user else lab.remote,
    )
    try:
        yield Tunnel(lab, proc, name, method, helper)
    finally:
        code = stop_run(lab, proc)
    assert code == 0, lab.log_tail(name, 60)
    assert lab.firewall_snapshot() == before
    if user:
        assert remote_files(lab, user) == remote_fs
        lab.remove_user(user)


def test_mode_matches_what_the_server_allows(tunnel: Tunnel) -> None:
    expected = "helper mode" if tunnel.helper else "direct mode"
    assert expected in tunnel.log()


def test_http_get_with_curl_and_python(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    curl = lab.run("cli", ["curl", "-sS", "--max-time", "10", lab.http_url_v4])
    assert lab.http_marker in curl.stdout
    with lab.netns("cli"):
        response = clients.http_get(lab.tgt_v4)
    assert response.status == 200 and lab.http_marker.encode() in response.body


def test_ipv6_target(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    with lab.netns("cli"):
        response = clients.http_get(lab.tgt_v6)
    assert response.status == 200 and lab.http_marker.encode() in response.body


def test_100_mb_each_way_arrive_intact(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    with lab.netns("cli"):
        clients.bulk_upload(lab.tgt_v4, BIG).check()
        clients.bulk_download(lab.tgt_v4, BIG).check()


def test_four_transfers_at_once_each_way(tunnel: Tunnel) -> None:
    lab = tunnel.lab

    async def both() -> list[clients.TransferResult]:
        ups = [clients.abulk_upload(lab.tgt_v4, BIG, seed=i) for i in range(4)]
        downs = [clients.abulk_download(lab.tgt_v6, BIG, seed=i) for i in range(4)]
        return await asyncio.wait_for(asyncio.gather(*ups, *downs), 300)

    with lab.netns("cli"):
        results = asyncio.run(both())
    assert len(results) == 8
    for result in results:
        result.check()


def test_2000_concurrent_connections_complete(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    count = 2000

    payloads = [hashlib.sha256(str(i).encode()).digest() * 4 for i in range(count)]
    with lab.netns("cli"):
        replies = asyncio.run(
            clients.aecho_all_open([lab.tgt_v4] * count, lab.ports.echo, payloads, 120)
        )
    assert replies == payloads


def refused_outcome(host: str, port: int) -> tuple[str, float]:
    """Connect and read: the kernel completes the local handshake before the
    remote refuses, so the refusal arrives as a reset on the first read."""
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=5.0) as sock:
            data = sock.recv(1)
            outcome = "eof" if not data else "data"
    except (ConnectionRefusedError, ConnectionResetError) as exc:
        outcome = type(exc).__name__
    except TimeoutError:
        outcome = "timeout"
    return outcome, time.monotonic() - started


def test_refused_port_is_reset_within_a_second(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    with lab.netns("cli"):
        outcome, seconds = refused_outcome(lab.tgt_v4, lab.ports.closed)
    assert outcome in ("ConnectionRefusedError", "ConnectionResetError"), outcome
    assert seconds < 1.0


def test_client_half_close_still_reads_the_reply(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    payload = b"half-close " * 10_000
    with lab.netns("cli"):
        reply = clients.echo(lab.tgt_v4, payload, half_close=True)
    assert reply == payload


def test_server_closing_first_is_seen_as_eof_at_once(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    with lab.netns("cli"):
        data, elapsed = clients.read_close_first(lab.tgt_v4)
    assert data == CLOSE_FIRST_LINE and elapsed < 1.0


def test_dns_name_only_the_remote_resolver_knows(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    with lab.netns("cli"):
        answer = clients.dns_query(lab.fake_dns_v4, lab.dns_name, "A")
        answer6 = clients.dns_query(lab.fake_dns_v4, lab.dns_name, "AAAA", tcp=True)
    assert lab.tgt_v4 in answer.addresses and lab.tgt_v6 in answer6.addresses
    # The system resolver of the client namespace (its resolv.conf names a
    # resolver that exists nowhere) now resolves the private name.
    resolved = lab.run("cli", ["getent", "ahostsv4", lab.dns_name]).stdout
    assert lab.tgt_v4 in resolved


def test_excluded_subnet_is_not_captured(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    with lab.netns("cli"):
        outcome, _ = clients.probe_tcp(lab.tgt_v4_alt, lab.ports.http, timeout=1.0)
        captured, _ = clients.probe_tcp(lab.tgt_v4, lab.ports.http, timeout=2.0)
    assert outcome in ("timeout", "unreachable") and captured == "connected"


def test_many_refused_connections_leave_the_master_and_traffic_alone(tunnel: Tunnel) -> None:
    """The master keeps a channel per failed open for good: 3 x 600 of them, and
    nothing that would make it close them (that is fatal for it)."""
    lab = tunnel.lab

    async def refuse_many(count: int) -> list[str]:
        async def one() -> str:
            try:
                reader, writer = await asyncio.open_connection(lab.tgt_v4, lab.ports.closed)
            except OSError as exc:
                return type(exc).__name__
            try:
                return "eof" if not await reader.read(1) else "data"
            except OSError as exc:
                return type(exc).__name__
            finally:
                writer.close()

        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 60)

    with lab.netns("cli"):
        for _ in range(3):
            outcomes = asyncio.run(refuse_many(600))
            assert set(outcomes) <= {"ConnectionResetError", "ConnectionRefusedError"}
        clients.bulk_download(lab.tgt_v4, 1 << 20).check()
    assert "lost" not in tunnel.log()
