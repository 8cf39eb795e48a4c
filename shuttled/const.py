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
# Beside it, the administrators' door (control-admin.sock): root and group shuttle
# only, so a flood of connects from others never fills its queue.
ADMIN_SOCKET_SUFFIX = "-admin"
DBUS_NAME = "io.github.shuttled"
DBUS_PATH = "/io/github/shuttled"
ADMIN_GROUP = "shuttle"
PF_DEVICE = "/dev/pf"  # macOS and FreeBSD: pf's ioctls (DIOCNATLOOK)

# --- firewall ------------------------------------------------------------------
NFT_TABLE = "shuttled"  # table `inet shuttled`: the daemon's, and nothing else's
RUN_TABLE_PREFIX = "shuttled_run_"  # one-shot `shuttled run` instances: one table per pid
# The kill switch's blocking rules for wanted profiles, kept while no daemon runs.
LOCKDOWN_TABLE = "shuttled_lockdown"
# How often the daemon compares its rules with the kernel's (someone else may remove
# them: `nft flush ruleset`, a firewall manager's reload); restored within this.
RULE_CHECK_INTERVAL = 1.0
IPT_CHAIN_PREFIX = "SHUTTLED"
# Priority just before the kernel's own dstnat so that we see the first packet.
NFT_NAT_PRIORITY = -105
# Router mode and UDP (TPROXY). A packet carrying this mark bit is routed to a
# local table of ours (`local default dev lo`), so a TPROXY rule can hand a
# forwarded packet, or a local UDP datagram re-routed to lo, to our listeners.
# One bit, with a mask, clear of DNS_BYPASS_MARK, wg-quick (0xca6c), Tailscale
# (0xff0000), kube-proxy (0xc000) and mwan3 (0x3f00).
TPROXY_MARK = 0x20000000
POLICY_TABLE = 5318  # `ip route ... table 5318`: ours alone, v4 and v6
POLICY_PRIORITY = 5318  # `ip rule ... priority 5318`: after `local` (0), before `main`
# mangle-equivalent priority: before conntrack's dstnat, as TPROXY must see
# the original destination.
NFT_MANGLE_PRIORITY = -150
# The kill switch's reject chains run before our nat output chain (-105), so
# they still see the original destination of a local connection.
NFT_HOLD_PRIORITY = -110
# The lockdown table's (shuttled.firewall.lockdown) come after our nat redirect and
# iptables-nft's nat (-100): only what the tunnel does not carry meets them.
NFT_LOCKDOWN_PRIORITY = -90

# --- true connect(): the first SYN waits for the remote's answer (tunnel/connect.py) --
# Queue numbers a capture's SYN rule may use (`queue num N bypass`): the first one
# free in this range is bound by each profile's proxy.
SYN_QUEUE_FIRST = 5318
SYN_QUEUE_COUNT = 256
# A held SYN refused by the remote is run through our chain again carrying one of
# these marks (NF_REPEAT), and the chain's reject rules answer the app: a reset,
# or an ICMP host / network unreachable. Matched under CONNECT_MARK_MASK, which
# leaves out TPROXY_MARK (set on the way by iptables' TPROXY in router mode).
CONNECT_MARK_REFUSED = 0x53480C01
CONNECT_MARK_HOST_UNREACHABLE = 0x53480C02
CONNECT_MARK_NET_UNREACHABLE = 0x53480C03
CONNECT_MARK_MASK = 0xFFFFFFFF & ~TPROXY_MARK
# The kernel's default SYN retries (tcp_syn_retries 6) give up after 127 s: sshd's
# own connect reports a timeout first; past this the held SYN is dropped anyway.
CONNECT_HOLD_MAX = 135.0
# A channel confirmed for a SYN we let through waits this long for its connection
# to be accepted; the app gave up meanwhile when it is not (closed, counted).
CONNECT_ACCEPT_WAIT = 10.0
# A SYN whose open timed out is dropped, not opened again, when the app sends it
# again within this many seconds (its own SYN retries), for at most this many tuples.
CONNECT_TIMED_OUT_MEMORY = 130.0
CONNECT_TIMED_OUT_ENTRIES = 16384


class ConnectMode(enum.StrEnum):
    """When the app's connect() returns (profile key `connect:`, `--connect`)."""

    REMOTE = "remote"  # after the remote answered: refused, unreachable, timed out
    FAST = "fast"  # at once, locally; a failed open resets the connection after


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
# Kernel send buffer of the control socket: the backlog to the master waits there,
# so that upstream writes stay single writev()s with no copy in Python.
MUX_WRITE_SNDBUF = 4 << 20
# Upstream bytes the transport may hold beyond that before we pause every local
# reader: small, as what it holds is copied (4 MiB cost 8% more CPU with 4 streams).
MUX_WRITE_HIGH = 256 * 1024
MUX_WRITE_LOW = 64 * 1024
LISTEN_BACKLOG = 4096

# --- liveness ---------------------------------------------------------------------
KEEPALIVE_INTERVAL = 10.0
KEEPALIVE_MISSES = 3
MAX_STREAMS = 8  # ssh connections one tunnel may hold (`streams`, `--streams`)
# The master's own check (any packet from the server counts): a backstop only,
# about 12 s, behind ours (LINK_SILENCE_DEAD).
SSH_SERVER_ALIVE_INTERVAL = 3
SSH_SERVER_ALIVE_COUNT = 3
# Dead-link detection (session.py). A ping goes out at least every LIVENESS_PING
# seconds (or `keepalive`, if shorter); every packet from the master, and where
# the daemon made the TCP connection every segment the kernel saw from the
# server, is a sign of life. No sign for LINK_SILENCE_DEAD seconds (blind: without
# the kernel's view, where ssh made the connection) means the link is dead; no
# answer from sshd itself for `keepalive` x KEEPALIVE_MISSES does too.
LIVENESS_PING = 2.0
LINK_SILENCE_DEAD = 6.0
LINK_SILENCE_DEAD_BLIND = 10.0
LIVENESS_CHECK = 0.5  # how often the deadlines are checked
# Our own connect to the ssh server, per address, when ssh -G sets no ConnectTimeout.
SERVER_CONNECT_TIMEOUT = 10.0

# --- DNS -----------------------------------------------------------------------
DNS_PORT = 53
DNS_TIMEOUT = 2.0
DNS_MAX_UDP = 65535
# SO_MARK on our own queries to the original resolvers (split DNS without
# systemd-resolved): every capture chain returns for it first, so they are not
# caught again. An odd value, clear of the bits wg-quick (0xca6c) and Tailscale
# (0xff0000 mask) use for policy routing.
DNS_BYPASS_MARK = 0x5D1E0053
DNS_CACHE_ENTRIES = 2048  # answers kept per profile, least recently used dropped first
DNS_CACHE_BYTES = 4 << 20  # and never more than this many bytes of them
DNS_CACHE_MAX_TTL = 300  # seconds: a short cache, whatever TTL the answer carries
DNS_HOSTS_TTL = 60  # TTL of answers built from the remote's /etc/hosts
# systemd-resolved path: one link per profile, named LINK_PREFIX + up to 6 characters
# (IFNAMSIZ), with one address out of DNS_LINK_NET where that profile's listener binds:
# resolved only sends to a server it can reach through that very link.
DNS_LINK_PREFIX = "shuttled-"
DNS_LINK_NET = "169.254.53.0/24"
RESOLVED_BUS_NAME = "org.freedesktop.resolve1"

# --- remote helper -------------------------------------------------------------
REMOTE_PYTHONS = (
    "python3",
    "python3.13",
    "python3.12",
    "python3.11",
    "python3.10",
    "python3.9",
    "python3.8",
    "python",
)
HELPER_NO_PYTHON_EXIT = 97

# --- UDP through the helper (router mode and --udp) ------------------------------
UDP_MAX_FLOWS = 1024  # per profile: one flow per local source address and port
UDP_IDLE = 60.0  # seconds without a datagram either way ends a flow
UDP_MAX_DESTINATIONS = 64  # peers one flow may talk to (each has a reply socket)
UDP_OPEN_QUEUE = 32  # datagrams held per flow while its channel opens
UDP_HELPER_RETRY = 30.0  # after the helper failed to start, seconds before trying again
# A master keeps every failed proxied open, and has room for 16,384 channels in all
# (shuttled.tunnel.session): past this many the session is replaced by a fresh one.
# Well before the limit: every channel it keeps makes each later connection cost the
# master more (measured: 6,000 kept, 1,460 -> 640 new connections/s); a fresh ssh
# connection costs one handshake.
MASTER_FAILED_OPENS_MAX = 1000
RECYCLE_DRAIN_MAX = 600.0  # seconds a replaced session may carry its old connections
RECYCLE_RETRY = 30.0  # after a replacement failed to start, seconds before trying again

# --- limits: a flood from one local user starves neither root nor the tunnel -------
# The daemon raises its soft RLIMIT_NOFILE to the hard limit at start; the unit
# sets LimitNOFILE=524288. Captured connections are refused (reset) before the
# descriptors run out, so that the control socket, the ssh masters, DNS and the
# journal always have some: FD_RESERVE are kept from everyone's connections,
# FD_RESERVE_ROOT even from root's.
FD_RESERVE = 256
FD_RESERVE_ROOT = 64
SPARE_FDS = 4  # /dev/null placeholders the control socket closes to accept at EMFILE
MAX_CONNECTIONS = 8192  # captured TCP connections per profile (`max_connections`)
# Per local user and profile (`max_connections_per_user`); root is never limited,
# and no one user gets more than half of what the descriptors allow.
MAX_CONNECTIONS_PER_USER = 2048
ACCEPT_BATCH = 64  # connections accepted per wakeup of a listener: the loop stays fair
ACCEPT_PAUSE = 0.2  # seconds a listener waits after EMFILE/ENFILE instead of spinning
LIMIT_LOG_INTERVAL = 10.0  # seconds between two warnings about the same refusals
CONTROL_BACKLOG = 4096  # the control socket's listen queue (the kernel caps it at somaxconn)


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


class Forward(enum.StrEnum):
    """How a profile's TCP connections reach their destination (config `forward:`)."""

    AUTO = "auto"
    DIRECT = "direct"  # sshd makes the connections (direct-tcpip)
    HELPER = "helper"  # the uploaded python helper makes them
