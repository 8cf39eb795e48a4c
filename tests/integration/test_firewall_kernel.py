"""Both backends against the real kernel, each test inside a fresh network namespace.

The namespace is made with unshare(CLONE_NEWNET) on this test's own thread and
left with setns() on teardown. It has no name, so the kernel frees it the moment
we leave, even when the test process is killed: nothing can leak to the host.
Traffic in the redirect test stays inside it too (loopback and a veth pair whose
both ends are in the namespace).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import select
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from shuttled.const import NFT_TABLE, RUN_TABLE_PREFIX
from shuttled.errors import FirewallError
from shuttled.firewall import (
    Backend,
    Capture,
    IptablesBackend,
    NftBackend,
    Subnet,
    cleanup_all,
    detect,
    parse_subnet,
)
from shuttled.firewall import iptables as fw_iptables
from shuttled.net import which_tool
from tests.lab.core import forget_namespace_records

pytestmark = pytest.mark.integration

CLONE_NEWNET = 0x40000000
SO_ORIGINAL_DST = 80  # same number for IPv4 (SOL_IP) and IPv6 (SOL_IPV6, IP6T_SO_ORIGINAL_DST)
TABLE = f"{NFT_TABLE}_fwtest"
LIBC = ctypes.CDLL(None, use_errno=True)


def require(tool: str) -> None:
    """Skip unless we are root and `tool` is installed; under CI=true, fail instead."""
    if os.geteuid() != 0:
        why = "needs root"
    elif not which_tool(tool):
        why = f"needs {tool}"
    else:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI=true: not skipping)")
    pytest.skip(why)


def require_backend(cls: type[Backend]) -> None:
    for tool in cls.tools:
        require(tool)


@pytest.fixture(params=["nft", "iptables", "iptables-legacy"])
def backend(
    request: pytest.FixtureRequest, netns: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> type[Backend]:
    """Each backend; iptables twice: as installed (nft on Debian) and legacy."""
    if request.param == "iptables-legacy":
        _use_legacy_iptables(tmp_path, monkeypatch)
    cls: type[Backend] = NftBackend if request.param == "nft" else IptablesBackend
    require_backend(cls)
    return cls


def _use_legacy_iptables(bin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put iptables-legacy first on PATH under the plain names, for us and the backend."""
    for tool in (*IptablesBackend.tools, "iptables", "ip6tables"):
        legacy = tool.replace("tables", "tables-legacy", 1)
        require(legacy)
        path = shutil.which(legacy, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
        assert path is not None
        (bin_dir / tool).symlink_to(path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ.get('PATH', '')}")


def _netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.fixture
def netns() -> Iterator[None]:
    """Run the test in a new, empty network namespace with only lo (up)."""
    require("ip")
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    home_inode = os.fstat(home).st_ino
    inode = None
    try:
        if LIBC.unshare(CLONE_NEWNET) != 0:
            pytest.fail(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
        inode = _netns_inode()
        assert inode != home_inode  # never touch the host's rules
        sh("ip", "link", "set", "lo", "up")
        yield
    finally:
        if LIBC.setns(home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the test's own namespace failed")
        os.close(home)
        if inode is not None and inode != home_inode:
            forget_namespace_records((0, inode))  # the namespace is gone with us
    assert _netns_inode() == home_inode


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def ruleset() -> str:
    """Every rule in the namespace, as each tool lists it; counters and comments dropped."""
    parts = [sh("nft", "list", "ruleset")] if which_tool("nft") else []
    for save in ("iptables-save", "ip6tables-save"):
        if which_tool(save):
            text = re.sub(r"\[\d+:\d+\]", "", sh(save))
            text = re.sub(r' -m comment --comment ("[^"]*"|\S+)', "", text)
            parts.append("\n".join(ln for ln in text.splitlines() if not ln.startswith("#")))
    return "\n".join(parts)


def add_foreign_rules() -> None:
    """Someone else's rules, which every test expects to find untouched."""
    if which_tool("nft"):
        subprocess.run(
            ["nft", "-f", "-"],
            check=True,
            text=True,
            input=(
                "table inet foreign {\n chain out {\n"
                "  type filter hook output priority 0; policy accept;\n"
                "  ip daddr 192.0.2.99 tcp dport 9 accept\n }\n}\n"
            ),
        )
    if which_tool("iptables"):
        sh("iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-d", "192.0.2.99/32", "-j", "RETURN")
    if which_tool("ip6tables"):
        sh("ip6tables", "-w", "-t", "nat", "-A", "OUTPUT", "-d", "2001:db8::99", "-j", "RETURN")


def subnets(*texts: str, exclude: bool = False) -> tuple[Subnet, ...]:
    return tuple(s for text in texts for s in parse_subnet(text, exclude=exclude))


WORK = Capture(
    "work",
    subnets("10.0.0.0/8", "192.168.50.0/24", "172.16.0.0/12:8000-9000", "[fd00::/8]:443")
    + subnets("10.0.5.0/24", "203.0.113.7:22", exclude=True),
    tcp_port=12300,
    dns_port=12301,
    dns_servers=tuple(ipaddress.ip_address(a) for a in ("127.0.0.53", "10.0.0.53", "fd00::53")),
)
HOME = Capture(
    "home", subnets("0/0") + subnets("192.168.0.0/16", exclude=True), tcp_port=12400, uid=1000
)


def assert_kernel_holds_render(fw: Backend, captures: Sequence[Capture]) -> None:
    """What the kernel lists is what we rendered: the render is the real rule set."""
    if isinstance(fw, NftBackend):
        rendered = fw.render(captures).split(f"table inet {fw.table} {{\n", 1)[1]
        listed = fw.snapshot().split("\n", 1)[1]
        assert _lines(listed) == _lines(rendered)
    else:
        rendered_rules = [ln for ln in _lines(fw.render(captures)) if ln.startswith("-A ")]
        listed_rules = [
            ln
            for ln in _lines(fw.snapshot())
            if ln.startswith("-A ") and not ln.startswith("-A OUTPUT")
        ]
        assert sorted(listed_rules) == sorted(rendered_rules)


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def test_apply_reapply_remove(backend: type[Backend]) -> None:
    add_foreign_rules()
    before = ruleset()
    fw = backend(TABLE)

    fw.apply([WORK, HOME])
    applied = ruleset()
    assert applied != before
    assert_kernel_holds_render(fw, [WORK, HOME])

    fw.apply([WORK, HOME])
    assert ruleset() == applied  # replaced, not doubled (one OUTPUT jump, one table)

    fw.apply([HOME])
    assert "work" not in fw.snapshot()
    assert_kernel_holds_render(fw, [HOME])

    fw.remove()
    assert ruleset() == before
    assert fw.snapshot() == ""
    fw.remove()  # idempotent
    assert ruleset() == before


def _break_nft(monkeypatch: pytest.MonkeyPatch, fw: NftBackend) -> None:
    def render(captures: Sequence[Capture]) -> str:
        return NftBackend.render(fw, captures).replace(
            "fib daddr type local return", "jump cap_no_such_chain", 1
        )

    monkeypatch.setattr(fw, "render", render)


def _break_ip6tables(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only IPv6 is broken: IPv4 commits first and must then be put back.
    real = fw_iptables._chain_body

    def chain_body(family: int, capture: Capture) -> list[str]:
        return [*real(family, capture), *(["-j NO_SUCH_CHAIN"] if family == 6 else [])]

    monkeypatch.setattr(fw_iptables, "_chain_body", chain_body)


def test_refused_transaction_keeps_previous_rules(
    backend: type[Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    fw = backend(TABLE)
    fw.apply([WORK])
    applied = ruleset()

    if isinstance(fw, NftBackend):
        _break_nft(monkeypatch, fw)
    else:
        _break_ip6tables(monkeypatch)
    with pytest.raises(FirewallError) as err:
        fw.apply([WORK, HOME])
    message = str(err.value)
    assert "\n" not in message
    if backend is NftBackend:
        assert "No such file or directory | jump cap_no_such_chain" in message
    else:
        assert "ip6tables-restore" in message and "NO_SUCH_CHAIN" in message
    assert ruleset() == applied


def test_cleanup_all_takes_daemon_and_dead_runs_only(netns: None) -> None:
    for cls in (NftBackend, IptablesBackend):
        require_backend(cls)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, live = f"{RUN_TABLE_PREFIX}{gone.pid}", f"{RUN_TABLE_PREFIX}{os.getpid()}"
    other = f"{NFT_TABLE}_other"
    capture = Capture("c", subnets("10.0.0.0/8", "fd00::/8"), tcp_port=12300)
    for cls in (NftBackend, IptablesBackend):
        for table in (NFT_TABLE, dead, live, other):
            cls(table).apply([capture])

    removed = cleanup_all()

    assert sorted(removed) == sorted(
        f"{cls.name} {table}"
        for cls in (NftBackend, IptablesBackend)
        for table in (NFT_TABLE, dead)
    )
    for cls in (NftBackend, IptablesBackend):
        assert cls.instances() == sorted([live, other])
    assert cleanup_all() == []


def test_detect_in_a_fresh_namespace(netns: None) -> None:
    require_backend(NftBackend)
    require_backend(IptablesBackend)
    assert isinstance(detect(), NftBackend)
    assert isinstance(detect("iptables", table=TABLE), IptablesBackend)
    assert detect("iptables", table=TABLE).table == TABLE
    assert "shuttled" not in sh("nft", "list", "ruleset")  # the probes left nothing behind


# --- real connections -------------------------------------------------------------

PROXY_PORT, DNS_LISTEN_PORT, OWN_PORT = 12300, 12301, 7000
LAB = Capture(
    "lab",
    subnets("198.51.100.0/24", "0/0:7000", "[2001:db8:1::/48]:443")
    + subnets("198.51.100.7", exclude=True),
    tcp_port=PROXY_PORT,
    dns_port=DNS_LISTEN_PORT,
    dns_servers=(ipaddress.ip_address("198.51.100.53"),),
)


def _lab_network() -> None:
    """Routes to two TEST-NET ranges over a veth whose far end is also in here."""
    sh("ip", "link", "add", "shf0", "type", "veth", "peer", "name", "shf1")
    sh("ip", "addr", "add", "192.0.2.1/24", "dev", "shf0")
    sh("ip", "-6", "addr", "add", "2001:db8::1/64", "dev", "shf0", "nodad")
    for link in ("shf0", "shf1"):
        sh("ip", "link", "set", link, "up")
    sh("ip", "route", "add", "198.51.100.0/24", "dev", "shf0")
    sh("ip", "-6", "route", "add", "2001:db8:1::/48", "dev", "shf0")


def _listen(
    family: socket.AddressFamily, addr: str, port: int, kind: socket.SocketKind = socket.SOCK_STREAM
) -> socket.socket:
    sock = socket.socket(family, kind)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((addr, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(8)
    return sock


def _original_dst(conn: socket.socket) -> tuple[str, int]:
    if conn.family == socket.AF_INET:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, addr = struct.unpack_from("!2xH4s", raw)
    else:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, addr = struct.unpack_from("!2xH4x16s", raw)
    return socket.inet_ntop(conn.family, addr), port


def _land(dest: tuple[str, int], listeners: dict[str, socket.socket]) -> str | None:
    """Connect to dest: the name of the listener that got it (and its original dst), or None."""
    family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    with socket.socket(family) as client:
        client.setblocking(False)
        client.connect_ex(dest)
        ready, _, _ = select.select(list(listeners.values()), [], [], 0.5)
        if not ready:
            return None
        conn, _ = ready[0].accept()
        with conn:
            name = next(n for n, sock in listeners.items() if sock is ready[0])
            if name == "own":
                return name
            assert _original_dst(conn) == dest
            return name


def test_connections_are_redirected(backend: type[Backend]) -> None:
    _lab_network()
    listeners = {
        "proxy4": _listen(socket.AF_INET, "127.0.0.1", PROXY_PORT),
        "proxy6": _listen(socket.AF_INET6, "::1", PROXY_PORT),
        "own": _listen(socket.AF_INET, "192.0.2.1", OWN_PORT),
    }
    dns = _listen(socket.AF_INET, "127.0.0.1", DNS_LISTEN_PORT, socket.SOCK_DGRAM)
    fw = backend(TABLE)
    try:
        fw.apply([LAB])
        assert _land(("198.51.100.10", 80), listeners) == "proxy4"
        assert _land(("2001:db8:1::10", 443), listeners) == "proxy6"
        assert _land(("198.51.100.7", 80), listeners) is None  # excluded
        assert _land(("2001:db8:1::10", 80), listeners) is None  # port not included
        assert _land(("192.0.2.1", OWN_PORT), listeners) == "own"  # our own address: never

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"query", ("198.51.100.53", 53))
            assert select.select([dns], [], [], 0.5)[0]
            assert dns.recvfrom(64)[0] == b"query"

        fw.apply([Capture(LAB.name, LAB.subnets, PROXY_PORT, uid=65534)])
        assert _land(("198.51.100.10", 80), listeners) is None  # root's socket, not 65534's
        fw.apply([Capture(LAB.name, LAB.subnets, PROXY_PORT, uid=0)])
        assert _land(("198.51.100.10", 80), listeners) == "proxy4"
    finally:
        fw.remove()
        for sock in (*listeners.values(), dns):
            sock.close()
