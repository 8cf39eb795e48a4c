"""Every path, name, size and code that more than one module needs: one place."""

from __future__ import annotations

import enum
import sys
from pathlib import Path

# --- files and sockets -------------------------------------------------------
CONFIG_DIR = Path("/etc/shuttled")
STATE_DIR = Path("/var/lib/shuttled")
# macOS and FreeBSD have no /run (and macOS cannot create one): /var/run there.
RUN_DIR = Path("/run/shuttled") if sys.platform == "linux" else Path("/var/run/shuttled")
CONTROL_SOCKET = RUN_DIR / "control.sock"
DBUS_NAME = "io.github.shuttled"
DBUS_PATH = "/io/github/shuttled"
ADMIN_GROUP = "shuttle"

# --- firewall ------------------------------------------------------------------
NFT_TABLE = "shuttled"  # table `inet shuttled`: the daemon's, and nothing else's
RUN_TABLE_PREFIX = "shuttled_run_"  # one-shot `shuttled run` instances: one table per pid
IPT_CHAIN_PREFIX = "SHUTTLED"
# Priority just before the kernel's own dstnat so that we see the first packet.
NFT_NAT_PRIORITY = -105

# --- ssh and the channel layer ----------------------------------------------------
SSH_BIN = "ssh"
MUX_HELLO_TIMEOUT = 10.0
MASTER_START_TIMEOUT = 60.0
# 1 MiB per channel: the lab measured 8 MiB collapsing multi-stream throughput
# (sshd's buffers balloon), while 1 MiB reached 85% of ssh -L.
CHANNEL_WINDOW = 1 << 20
# Grant window back once this much was consumed: fewer WINDOW_ADJUST messages.
CHANNEL_WINDOW_REFILL = CHANNEL_WINDOW // 2
CHANNEL_MAX_PACKET = 32 * 1024
# Upper bound for any packet we accept from the master (RFC 4253 says 35000 must
# be accepted; sshd sends at most max packet + header).
MAX_INBOUND_PACKET = 256 * 1024
# Local socket write buffer: beyond this we stop granting window to the remote.
LOCAL_WRITE_HIGH = 512 * 1024
LOCAL_WRITE_LOW = 128 * 1024
# Upstream bytes queued towards the master before we pause every local reader.
MUX_WRITE_HIGH = 4 << 20
MUX_WRITE_LOW = 1 << 20
LISTEN_BACKLOG = 4096

# --- liveness ---------------------------------------------------------------------
KEEPALIVE_INTERVAL = 10.0
KEEPALIVE_MISSES = 3
SSH_SERVER_ALIVE_INTERVAL = 10
SSH_SERVER_ALIVE_COUNT = 3

# --- DNS -----------------------------------------------------------------------
DNS_PORT = 53
DNS_TIMEOUT = 2.0
DNS_MAX_UDP = 65535

# --- remote helper -------------------------------------------------------------
REMOTE_PYTHONS = ("python3", "python3.13", "python3.12", "python3.11", "python3.10",
                  "python3.9", "python3.8", "python")
HELPER_NO_PYTHON_EXIT = 97


class ExitCode(enum.IntEnum):
    """Published exit codes of `shuttled` and `shuttlectl`."""

    OK = 0
    FAILED = 1
    USAGE = 2
    NOT_RUNNING = 3
    NO_SUCH_PROFILE = 4
    DENIED = 5
    TIMEOUT = 6
    NOT_UP = 7
