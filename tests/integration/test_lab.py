"""The lab itself: a true negative without the tunnel, working sshd, services, DNS, teardown.

If these fail, every tunnel test built on the lab is meaningless; they run first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab import CLOSE_FIRST_LINE, Lab, LabUser, clients, services
from tests.lab.core import ETC_NETNS, STATE_DIR
from tests.lab.netns import netns_exists, netns_id, pid_alive, pids_in_netns

REPO = Path(__file__).resolve().parents[2]


def netns_list() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10
    ).stdout


def assert_gone(prefix: str, namespaces: list[str], pids: list[int], tmpdir: str) -> None:
    listing = netns_list()
    for ns in namespaces:
        assert ns not in listing, f"namespace {ns} left behind:\n{listing}"
        assert not netns_exists(ns)
        assert not (ETC_NETNS / ns).exists(), f"/etc/netns/{ns} left behind"
    alive = [p for p in pids if pid_alive(p)]
    assert not alive, f"processes left behind: {alive}"
    assert not Path(tmpdir).exists(), f"temp dir {tmpdir} left behind"
    assert not (STATE_DIR / f"{prefix}.json").exists()


# --- the negative: no tunnel, no route through srv -----------------------------------------------
def test_client_cannot_reach_target_without_tunnel(lab: Lab) -> None:
    t0 = time.monotonic()
    r = lab.run(
        "cli",
        ["curl", "-sS", "--connect-timeout", "1", "--max-time", "2", lab.http_url_v4],
        check=False,
    )
    assert r.returncode in (7, 28), (r.returncode, r.stdout, r.stderr)
    assert lab.http_marker not in r.stdout
    assert time.monotonic() - t0 < 5
    with lab.netns("cli"):
        for addr in (lab.tgt_v4, lab.tgt_v6, lab.tgt_v4_alt, lab.tgt_v6_alt):
            outcome, seconds = clients.probe_tcp(addr, lab.ports.http, timeout=0.5)
            assert outcome in ("timeout", "unreachable"), (addr, outcome)
            assert seconds < 2


def test_server_does_not_forward(lab: Lab) -> None:
    out = lab.run(
        "srv", ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]
    ).stdout.split()
    assert out == ["0", "0"]


def test_client_routes_target_via_server(lab: Lab) -> None:
    """The negative above is a drop at srv, not a missing route at cli."""
    for addr, via in (
        (lab.tgt_v4, lab.srv_v4),
        (lab.tgt_v6, lab.srv_v6),
        (lab.fake_dns_v4, lab.srv_v4),
    ):
        route = lab.run("cli", ["ip", "route", "get", addr]).stdout
        assert f"via {via}" in route, route


def test_server_reaches_target_http(lab: Lab) -> None:
    for url in (lab.http_url_v4, lab.http_url_v6):
        r = lab.run("srv", ["curl", "-sS", "--max-time", "5", url])
        assert lab.http_marker in r.stdout
    with lab.netns("srv"):
        resp = clients.http_get(lab.tgt_v6)
        assert resp.status == 200 and lab.http_marker in resp.text
        blob = clients.http_get(lab.tgt_v4, lab.blob_path)
        assert len(blob.body) == lab.blob_size
        import hashlib

        assert hashlib.sha256(blob.body).hexdigest() == services.stream_sha256(
            lab.blob_seed, lab.blob_size
        )
        assert lab.http_marker in clients.http_get(lab.tgt_v4, port=lab.ports.fast_http).text
    # The HTTP server logs who connected: srv's target-side address.
    assert any(line.startswith(lab.srv_tgt_v4) for line in lab.http_requests())


# --- ssh ------------------------------------------------------------------------------------------
def test_ssh_with_generated_keys(lab: Lab) -> None:
    for host in (lab.remote, lab.remote6, lab.remote_nofwd):
        r = lab.run("cli", [*lab.ssh_argv, host, "true"], timeout=30)
        assert r.returncode == 0
    r = lab.run("cli", f"{lab.ssh_cmd} {lab.remote} cat /etc/resolv.conf")
    assert f"nameserver {lab.dns_v4}" in r.stdout, "the remote's resolver must be tgt's DNS"


def test_ssh_forwarding_allowed_on_22_refused_on_2222(lab: Lab) -> None:
    request = "GET / HTTP/1.0\r\n\r\n"
    ok = lab.run(
        "cli", [*lab.ssh_argv, "-W", f"{lab.tgt_v4}:80", lab.remote], input=request, timeout=30
    )
    assert lab.http_marker in ok.stdout
    ok6 = lab.run(
        "cli", [*lab.ssh_argv, "-W", f"[{lab.tgt_v6}]:80", lab.remote6], input=request, timeout=30
    )
    assert lab.http_marker in ok6.stdout
    refused = lab.run(
        "cli",
        [*lab.ssh_argv, "-W", f"{lab.tgt_v4}:80", lab.remote_nofwd],
        input=request,
        timeout=30,
        check=False,
    )
    assert refused.returncode != 0
    assert lab.http_marker not in refused.stdout
    assert "refused local port forward" in lab.log_tail("sshd-2222")
    # ...but a session (the fallback helper's way in) works there, with python3.
    r = lab.run("cli", [*lab.ssh_argv, lab.remote_nofwd, "python3", "-c", "'print(6*7)'"])
    assert r.stdout.strip() == "42"


def test_lab_user_ssh(lab: Lab, lab_user: LabUser) -> None:
    r = lab.run("cli", ["ssh", lab_user.remote, "id", "-un"], user=lab_user, timeout=30)
    assert r.stdout.strip() == lab_user.name
    r = lab.run("cli", ["id", "-u"], user=lab_user)
    assert int(r.stdout) == lab_user.uid
    home = Path(lab_user.home)
    assert (home / ".ssh" / "config").stat().st_uid == lab_user.uid
    roots = ("/tmp", "/var/tmp", "/dev/shm", lab_user.home)
    before = lab.fs_snapshot(roots, uid=lab_user.uid)
    lab.run("cli", ["ssh", lab_user.remote, "touch", "/tmp/sd-left-behind"], user=lab_user)
    try:
        assert lab.fs_snapshot(roots, uid=lab_user.uid) - before == {"/tmp/sd-left-behind"}
    finally:
        os.unlink("/tmp/sd-left-behind")


# --- services in tgt ----------------------------------------------------------------------------
def test_services_protocols_from_server(lab: Lab) -> None:
    with lab.netns("srv"):
        for addr in (lab.tgt_v4, lab.tgt_v6):
            clients.bulk_upload(addr, 8 << 20, seed=3)
            clients.bulk_upload(addr, 3 << 20 | 12345, seed=4, half_close=True)
            clients.bulk_download(addr, 5 << 20 | 777, seed=5)
            clients.bulk_download(addr, 0)
            assert clients.echo(addr, b"abc" * 100000) == b"abc" * 100000
            assert clients.echo(addr, b"no half close", half_close=False) == b"no half close"
            data, seconds = clients.read_close_first(addr)
            assert data == CLOSE_FIRST_LINE and seconds < 0.5
            outcome, seconds = clients.probe_tcp(addr, lab.ports.closed)
            assert outcome == "refused" and seconds < 0.5
            assert clients.udp_echo(addr, b"ping") == b"ping"
        assert max(clients.echo_rtt(lab.tgt_v4, 20)) < 0.5
        with pytest.raises(clients.TransferError):
            clients.TransferResult("down", 10, 9, 1.0, "a", "a").check()


def test_many_concurrent_connections_from_server(lab: Lab) -> None:
    import asyncio

    async def main() -> list[bytes]:
        coros = [clients.aecho(lab.tgt_v4, f"conn {i}\n".encode() * 10) for i in range(500)]
        return await clients.gather_limited(coros)

    with lab.netns("srv"):
        replies = asyncio.run(main())
        ups = asyncio.run(
            clients.gather_limited(
                [clients.abulk_upload(lab.tgt_v6, 256 << 10, seed=i) for i in range(8)]
            )
        )
        downs = asyncio.run(
            clients.gather_limited(
                [clients.abulk_download(lab.tgt_v4, 256 << 10, seed=i) for i in range(8)]
            )
        )
    assert replies == [f"conn {i}\n".encode() * 10 for i in range(500)]
    assert all(r.ok for r in ups + downs)


def test_stream_is_deterministic_and_not_periodic() -> None:
    a = b"".join(bytes(c) for c in services.stream_chunks(1, 3 << 20))
    b = b"".join(bytes(c) for c in services.stream_chunks(1, 3 << 20))
    assert a == b and len(a) == 3 << 20
    chunks = {
        a[i : i + services.STREAM_MARK_EVERY] for i in range(0, len(a), services.STREAM_MARK_EVERY)
    }
    assert len(chunks) == len(a) // services.STREAM_MARK_EVERY
    assert services.stream_sha256(1, 1000) != services.stream_sha256(2, 1000)


# --- DNS ----------------------------------------------------------------------------------------
def test_dns_responder_answers_from_server(lab: Lab) -> None:
    lab.clear_dns_queries()
    r = lab.run("srv", ["getent", "ahosts", lab.dns_name])
    assert lab.tgt_v4 in r.stdout and lab.tgt_v6 in r.stdout
    r = lab.run("srv", ["getent", "hosts", f"nosuch.{lab.dns_zone}"], check=False)
    assert r.returncode == 2
    with lab.netns("srv"):
        ans = clients.dns_query(lab.dns_v6, f"alt.{lab.dns_zone}", "AAAA", tcp=True)
        assert ans.rcode == 0 and ans.addresses == [lab.tgt_v6_alt]
        ans = clients.dns_query(lab.dns_v4, f"nosuch.{lab.dns_zone}")
        assert ans.rcode == 3
        ans = clients.dns_query(lab.dns_v4, f"many.{lab.dns_zone}")
        assert ans.truncated and len(ans.addresses) < 40
        assert len(clients.dns_query(lab.dns_v4, f"many.{lab.dns_zone}", tcp=True).addresses) == 40
    seen = lab.dns_queries()
    assert ("udp", lab.dns_name, "A") in seen
    assert ("tcp", f"alt.{lab.dns_zone}", "AAAA") in seen
    assert ("udp", f"nosuch.{lab.dns_zone}", "A") in seen


def test_dns_silent_mode(lab: Lab) -> None:
    lab.set_dns_silent(True)
    try:
        with lab.netns("srv"), pytest.raises(TimeoutError):
            clients.dns_query(lab.dns_v4, lab.dns_name, timeout=0.5)
    finally:
        lab.set_dns_silent(False)
    assert ("udp-silent", lab.dns_name, "A") in lab.dns_queries()
    with lab.netns("srv"):
        assert clients.dns_query(lab.dns_v4, lab.dns_name).addresses == [lab.tgt_v4]


def test_client_resolver_needs_the_tunnel(lab: Lab) -> None:
    conf = lab.run("cli", ["cat", "/etc/resolv.conf"]).stdout
    assert f"nameserver {lab.fake_dns_v4}" in conf
    lab.clear_dns_queries()
    r = lab.run("cli", ["getent", "hosts", lab.dns_name], check=False, timeout=30)
    assert r.returncode != 0 and lab.tgt_v4 not in r.stdout
    assert lab.dns_queries() == [], "the fake resolver address must not reach the responder"


# --- link control -------------------------------------------------------------------------------
def test_set_link_down_and_up(lab: Lab) -> None:
    with lab.netns("cli"):
        assert clients.probe_tcp(lab.srv_v4, 22)[0] == "connected"
    lab.set_link(False)
    try:
        with lab.netns("cli"):
            for addr in (lab.srv_v4, lab.srv_v6):
                assert clients.probe_tcp(addr, 22, timeout=0.5)[0] in ("timeout", "unreachable")
    finally:
        lab.set_link(True)
    with lab.netns("cli"):
        assert clients.probe_tcp(lab.srv_v6, 22)[0] == "connected"
    lab.ssh("true")


# --- teardown -----------------------------------------------------------------------------------
def test_teardown_leaves_nothing() -> None:
    from tests.lab import require_root_tools

    require_root_tools("ip", "sshd", "ssh", "ssh-keygen", "useradd")
    with Lab() as lab:
        user = lab.add_user()
        # Extra processes a test would leave: a child in cli and a live ssh session on srv.
        lab.popen("cli", ["sleep", "300"], name="sleeper")
        session = lab.popen("cli", [*lab.ssh_argv, lab.remote, "sleep", "300"], name="session")
        srv_ident = netns_id(lab.ns_srv)
        assert srv_ident is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(pids_in_netns(srv_ident)) < 4:
            time.sleep(0.05)
        pids = list(lab.pids.values())
        for ns in lab.namespaces.values():
            ident = netns_id(ns)
            assert ident is not None
            pids += pids_in_netns(ident)
        namespaces = list(lab.namespaces.values())
        prefix, tmpdir = lab.prefix, lab.tmpdir
        assert session.poll() is None
        assert len(pids) >= 7, pids  # 2 sshd + session child, services, http, sleep, ssh
        for ns in namespaces:
            assert ns in netns_list()
            assert (ETC_NETNS / ns / "resolv.conf").exists()
    assert not lab.teardown_errors, lab.teardown_errors
    assert_gone(prefix, namespaces, pids, tmpdir)
    r = subprocess.run(["getent", "passwd", user.name], capture_output=True, timeout=10)
    assert r.returncode != 0, f"user {user.name} left behind"
    assert not Path(user.home).exists()


def test_teardown_after_exception_in_block() -> None:
    from tests.lab import require_root_tools

    require_root_tools("ip", "sshd", "ssh", "ssh-keygen")
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        namespaces = list(lab.namespaces.values())
        pids = list(lab.pids.values())
        prefix, tmpdir = lab.prefix, lab.tmpdir
        raise RuntimeError("boom")
    assert_gone(prefix, namespaces, pids, tmpdir)


def test_stale_lab_of_a_killed_owner_is_cleaned() -> None:
    from tests.lab import cleanup_stale, require_root_tools

    require_root_tools("ip", "sshd", "ssh", "ssh-keygen")
    code = (
        "import sys, time\nfrom tests.lab import Lab\nlab = Lab().open()\n"
        "print(lab.prefix, lab.tmpdir, *lab.namespaces.values(), flush=True)\n"
        "time.sleep(120)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline().split()
        assert len(line) == 5, line
        prefix, tmpdir, namespaces = line[0], line[1], line[2:]
        pids = []
        for ns in namespaces:
            ident = netns_id(ns)
            assert ident is not None
            pids += pids_in_netns(ident)
        assert pids
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=10)
    assert prefix in cleanup_stale()
    assert_gone(prefix, namespaces, pids, tmpdir)


def test_open_failure_tears_down() -> None:
    from tests.lab import LabError, require_root_tools

    require_root_tools("ip", "sshd", "ssh", "ssh-keygen")
    lab = Lab(sshd_extra=["ThisIsNotAnSshdOption yes"])
    with pytest.raises(LabError, match="sshd -t"):
        lab.open()
    assert_gone(lab.prefix, list(lab.namespaces.values()), [], lab.tmpdir)
