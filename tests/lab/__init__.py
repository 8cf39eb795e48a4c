"""Reusable network-namespace lab for shuttled's integration tests, benchmarks and demo.

    from tests.lab import Lab, clients
    with Lab() as lab:
        with lab.netns("cli"):
            clients.bulk_download(lab.tgt_v4, 10 << 20)

See core.py for the topology, services.py for the target services and their protocols,
clients.py for the client helpers.  Needs root, iproute2, OpenSSH (sshd, ssh, ssh-keygen).
"""

from . import clients, services
from .core import (
    DNS_ZONE,
    Lab,
    LabCommandError,
    LabError,
    LabUser,
    Ports,
    cleanup_stale,
    open_labs,
)
from .env import in_ci, missing_root_tools, require_root_tools, which
from .services import (
    BULK_PORT,
    CLOSE_FIRST_LINE,
    CLOSE_FIRST_PORT,
    CLOSED_PORT,
    DNS_PORT,
    ECHO_PORT,
    FAST_HTTP_PORT,
    HTTP_PORT,
    IPERF3_PORT,
    UDP_ECHO_PORT,
    stream_chunks,
    stream_sha256,
)

__all__ = [
    "BULK_PORT",
    "CLOSED_PORT",
    "CLOSE_FIRST_LINE",
    "CLOSE_FIRST_PORT",
    "DNS_PORT",
    "DNS_ZONE",
    "ECHO_PORT",
    "FAST_HTTP_PORT",
    "HTTP_PORT",
    "IPERF3_PORT",
    "UDP_ECHO_PORT",
    "Lab",
    "LabCommandError",
    "LabError",
    "LabUser",
    "Ports",
    "cleanup_stale",
    "clients",
    "in_ci",
    "missing_root_tools",
    "open_labs",
    "require_root_tools",
    "services",
    "stream_chunks",
    "stream_sha256",
    "which",
]
