"""The ssh master's server connection made by us (nodelay.py): the route from `ssh -G`,
the descriptor relay ssh runs as its ProxyCommand, TCP_INFO, and the file-system
identity that lets root reach a user's control socket without CAP_DAC_*."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile

import pytest

from shuttled.tunnel.nodelay import (
    FD_RELAY,
    FdOffer,
    ServerRoute,
    TcpInfo,
    connect_server,
    runnable_by_all,
    server_route,
)
from shuttled.tunnel.ssh import fs_identity, grant_dir, remove_private_dir

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


@linux
def test_route_follows_ssh_g() -> None:
    route = server_route(
        {
            "hostname": "10.0.0.1",
            "port": "2222",
            "addressfamily": "inet6",
            "connecttimeout": "7",
            "tcpkeepalive": "no",
        },
        10.0,
    )
    assert route == ServerRoute("10.0.0.1", 2222, socket.AF_INET6, 7.0, False)
    assert server_route({"hostname": "h"}, 10.0) == ServerRoute(
        "h", 22, socket.AF_UNSPEC, 10.0, True
    )


@pytest.mark.parametrize("key", ["proxycommand", "proxyjump", "bindaddress", "bindinterface"])
def test_a_first_hop_not_ours_leaves_the_connect_to_ssh(key: str) -> None:
    assert isinstance(server_route({"hostname": "h", key: "x"}, 10.0), str)
    if sys.platform.startswith("linux"):
        assert not isinstance(server_route({"hostname": "h", key: "none"}, 10.0), str)


def test_the_relay_holds_nothing_ssh_would_expand() -> None:
    assert "%" not in FD_RELAY and "\n" not in FD_RELAY


@linux
def test_connect_sets_nodelay_and_tcp_info_sees_the_peer() -> None:
    async def main() -> None:
        server = socket.create_server(("127.0.0.1", 0))
        with server:
            route = ServerRoute("127.0.0.1", server.getsockname()[1], socket.AF_INET, 5.0, True)
            sock = await connect_server(route)
            peer, _ = server.accept()
            with sock, peer:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                peer.sendall(b"x")
                await asyncio.sleep(0.05)
                info = TcpInfo.of(sock)
                assert info is not None and info.state == 1  # TCP_ESTABLISHED
                assert info.heard < 1.0 and info.unacked == 0 and info.rtt < 1.0

    asyncio.run(main())


@linux
def test_refused_connect_says_where() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    route = ServerRoute("127.0.0.1", port, socket.AF_INET, 5.0, True)
    with pytest.raises(OSError, match=f"port {port}"):
        asyncio.run(connect_server(route))


@linux
def test_the_relay_passes_the_offered_connection_to_its_stdout(tmp_path: os.PathLike[str]) -> None:
    """What ssh does with ProxyUseFdpass: a socketpair as the command's stdin/stdout,
    then one descriptor received over it (mm_receive_fd)."""

    async def main() -> None:
        offer = FdOffer(os.path.join(tmp_path, "fd"), os.geteuid())
        offer.bind()
        a, b = socket.socketpair()
        ours, theirs = socket.socketpair()
        with a, b, ours, theirs:
            relay = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", "-c", FD_RELAY, offer.path, stdin=b, stdout=b
            )
            b.close()
            await asyncio.wait_for(offer.serve(ours), 10)
            assert await asyncio.wait_for(relay.wait(), 10) == 0
            _, fds, _, _ = socket.recv_fds(a, 1, 1)
            with socket.socket(fileno=fds[0]) as passed:
                passed.sendall(b"ping")
                assert theirs.recv(4) == b"ping"
        assert offer.passed

    asyncio.run(main())


def test_runnable_by_all() -> None:
    assert runnable_by_all("/bin/sh")
    with tempfile.TemporaryDirectory() as private:
        os.chmod(private, 0o700)
        script = os.path.join(private, "x")
        with open(script, "w") as fh:
            fh.write("#!/bin/sh\n")
        os.chmod(script, 0o755)
        assert not runnable_by_all(script)


@pytest.mark.skipif(
    os.geteuid() != 0 or not sys.platform.startswith("linux"), reason="needs root on Linux"
)
def test_fs_identity_reaches_a_user_socket_in_a_shared_directory() -> None:
    """What the daemon does without CAP_DAC_OVERRIDE: a root-owned 0700 directory shared
    with one user by an ACL entry, a socket of that user's (0600), reached with the
    user's file-system identity; removed with it too."""
    nobody = 65534
    base = tempfile.mkdtemp(dir="/run" if os.path.isdir("/run") else None)
    os.chmod(base, 0o755)
    private = tempfile.mkdtemp(dir=base)
    try:
        grant_dir(private, nobody)
        code = (
            "import os,socket,sys;os.umask(0o177);s=socket.socket(socket.AF_UNIX);"
            "s.bind(sys.argv[1]);s.listen();print(flush=True);sys.stdin.read()"
        )
        listener = subprocess.Popen(
            ["/usr/bin/python3", "-c", code, f"{private}/ctl"],
            user=nobody,
            group=nobody,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert listener.stdout is not None
            listener.stdout.readline()
            assert os.stat(f"{private}/ctl").st_uid == nobody
            with socket.socket(socket.AF_UNIX) as sock, fs_identity(nobody, nobody):
                sock.connect(f"{private}/ctl")
        finally:
            listener.kill()
            listener.wait(5)
        remove_private_dir(private, nobody, nobody)
        assert not os.path.exists(private)
    finally:
        remove_private_dir(private, nobody, nobody)
        os.rmdir(base)
