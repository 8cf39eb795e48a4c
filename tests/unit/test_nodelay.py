"""TCP_NODELAY lands on another process's TCP socket (what the ssh master lacks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from shuttled.tunnel.nodelay import _pidfd_getfd, set_nodelay

CHILD = """
import socket, sys, time
srv = socket.create_server(("127.0.0.1", 0))
c = socket.create_connection(srv.getsockname())
print(c.fileno(), flush=True)
time.sleep(30)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pidfd_getfd is Linux-only")
def test_nodelay_is_set_on_the_other_process_socket() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        fd = int(child.stdout.readline())
        pidfd = os.pidfd_open(child.pid)
        try:
            with socket.socket(fileno=_pidfd_getfd(pidfd, fd)) as sock:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
                assert set_nodelay(child.pid) >= 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            os.close(pidfd)
        assert child.poll() is None  # its own descriptor is untouched
    finally:
        child.kill()
        child.wait(5)


def test_a_vanished_process_is_not_an_error() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(5)
    time.sleep(0.05)
    assert set_nodelay(child.pid) == 0
