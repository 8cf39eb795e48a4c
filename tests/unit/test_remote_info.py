"""Reading the remote's routes and hosts: real outputs, odd ones, hostile ones."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shuttled.net import Subnet, parse_subnet, valid_host_name
from shuttled.supervisor import auto_subnets
from shuttled.tunnel import remote_info
from shuttled.tunnel.remote_info import (
    MAX_ROUTES,
    parse_hosts,
    parse_ip_route_json,
    parse_ip_route_text,
    parse_proc_ipv6_route,
    parse_proc_route,
    read_remote_file,
    remote_hosts,
    remote_routes,
    usable_route,
)


def nets(*texts: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(t) for t in texts]


# `ip -j route show table main` on the lab's ssh server (iproute2 6.1).
LAB_V4 = (
    '[{"dst":"10.81.1.0/24","dev":"to-cli","protocol":"kernel","scope":"link",'
    '"prefsrc":"10.81.1.2","flags":[]},{"dst":"10.81.2.0/24","dev":"to-tgt",'
    '"protocol":"kernel","scope":"link","prefsrc":"10.81.2.1","flags":[]}]'
)
LAB_V6 = (
    '[{"dst":"fd00:81:1::/64","dev":"to-cli","protocol":"kernel","metric":256,"flags":[],'
    '"pref":"medium"},{"dst":"fd00:81:2::/64","dev":"to-tgt","protocol":"kernel",'
    '"metric":256,"flags":[],"pref":"medium"},{"dst":"fe80::/64","dev":"to-tgt",'
    '"protocol":"kernel","metric":256,"flags":[],"pref":"medium"},{"dst":"fe80::/64",'
    '"dev":"to-cli","protocol":"kernel","metric":256,"flags":[],"pref":"medium"}]'
)
# A busier server: default route, docker, blackhole, unreachable, multipath, a host route.
SERVER_V4 = json.dumps(
    [
        {
            "dst": "default",
            "gateway": "192.168.1.1",
            "dev": "eth0",
            "protocol": "dhcp",
            "prefsrc": "192.168.1.20",
            "metric": 100,
            "flags": [],
        },
        {"dst": "10.20.0.0/16", "gateway": "192.168.1.254", "dev": "eth0", "flags": []},
        {
            "dst": "172.17.0.0/16",
            "dev": "docker0",
            "protocol": "kernel",
            "scope": "link",
            "prefsrc": "172.17.0.1",
            "flags": ["linkdown"],
        },
        {
            "dst": "192.168.1.0/24",
            "dev": "eth0",
            "protocol": "kernel",
            "scope": "link",
            "prefsrc": "192.168.1.20",
            "metric": 100,
            "flags": [],
        },
        {"type": "blackhole", "dst": "10.99.0.0/16", "flags": []},
        {"type": "unreachable", "dst": "10.98.0.0/16", "flags": []},
        {"dst": "169.254.0.0/16", "dev": "eth0", "scope": "link", "metric": 1000, "flags": []},
        {
            "dst": "10.30.0.0/24",
            "flags": [],
            "nexthops": [
                {"gateway": "192.168.1.2", "dev": "eth0", "weight": 1, "flags": []},
                {"gateway": "192.168.1.3", "dev": "eth0", "weight": 1, "flags": []},
            ],
        },
        {"dst": "10.40.1.7", "gateway": "192.168.1.2", "dev": "eth0", "flags": []},
        {"dst": "0.0.0.0/1", "gateway": "10.8.0.1", "dev": "tun0", "flags": []},
        {"dst": "128.0.0.0/1", "gateway": "10.8.0.1", "dev": "tun0", "flags": []},
    ]
)
LAB_PROC_V4 = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"
    "                                                       \n"
    "to-cli\t0001510A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0"
    "                                                                             \n"
    "to-tgt\t0002510A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0"
    "                                                                             \n"
)
HOST_PROC_V4 = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
)
# The same table as a big-endian machine (s390x) prints it.
BIG_ENDIAN_PROC_V4 = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "eth0\t00000000\tC0000201\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    "eth0\tC0000200\t00000000\t0001\t0\t0\t0\tFFFFFF00\t0\t0\t0\n"
    "eth0\t0A140000\t00000000\t0201\t0\t0\t0\tFFFF0000\t0\t0\t0\n"
)  # REJECT: left out
LAB_PROC_V6 = """\
fd000081000100000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000003 00000000 00000001   to-cli
fd000081000200000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001   to-tgt
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001   to-tgt
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000004 00000000 80200001       lo
fd000081000100000000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000004 00000000 80200001   to-cli
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000003 00000000 00000001   to-tgt
20010db8000000000000000000000000 20 00000000000000000000000000000000 00 fd000081000200000000000000000009 00000400 00000001 00000000 00000003   to-tgt
"""  # noqa: E501
HOSTS = """\
127.0.0.1\tlocalhost
127.0.1.1\tsrv.corp.example srv
# The build farm
10.20.0.11   build01.corp.example build01   # the old one
10.20.0.12   Build02.Corp.Example. build02
fd00:20::12  build02.corp.example
::1     localhost ip6-localhost ip6-loopback
ff02::1 ip6-allnodes
fe80::1%eth0 router
10.20.0.13   bad_label-.example good13
not-an-address  name
10.20.0.14
10.20.0.15   caf\u00e9.example
"""


# --- routes ------------------------------------------------------------------------------


def test_ip_json_of_the_lab_server() -> None:
    assert parse_ip_route_json(LAB_V4, 4) == nets("10.81.1.0/24", "10.81.2.0/24")
    assert parse_ip_route_json(LAB_V6, 6) == nets("fd00:81:1::/64", "fd00:81:2::/64")


def test_ip_json_leaves_out_default_special_link_local_and_disguised_defaults() -> None:
    assert parse_ip_route_json(SERVER_V4, 4) == nets(
        "10.20.0.0/16", "172.17.0.0/16", "192.168.1.0/24", "10.30.0.0/24", "10.40.1.7/32"
    )


def test_ip_json_that_is_not_json_means_fall_back() -> None:
    assert parse_ip_route_json('Option "-j" is unknown, try "ip -help".', 4) is None
    assert parse_ip_route_json('{"dst": "10.0.0.0/8"}', 4) is None


def test_proc_route_little_endian() -> None:
    assert parse_proc_route(LAB_PROC_V4) == nets("10.81.1.0/24", "10.81.2.0/24")
    assert parse_proc_route(HOST_PROC_V4) == nets("192.0.2.0/24")


def test_proc_route_big_endian_found_from_the_masks() -> None:
    assert parse_proc_route(BIG_ENDIAN_PROC_V4) == nets("192.0.2.0/24")


def test_proc_ipv6_route_keeps_only_unicast_routes_through_a_device() -> None:
    assert parse_proc_ipv6_route(LAB_PROC_V6) == nets(
        "fd00:81:1::/64", "fd00:81:2::/64", "2001:db8::/32"
    )


@pytest.mark.parametrize(
    "net,usable",
    [
        ("10.0.0.0/8", True),
        ("0.0.0.0/0", False),
        ("0.0.0.0/1", False),
        ("128.0.0.0/1", False),
        ("127.0.0.0/8", False),
        ("169.254.0.0/16", False),
        ("224.0.0.0/4", False),
        ("fd00::/8", True),
        ("::/0", False),
        ("fe80::/64", False),
        ("ff00::/8", False),
        ("::1/128", False),
        ("2000::/3", True),
    ],
)
def test_usable_route(net: str, usable: bool) -> None:
    assert usable_route(ipaddress.ip_network(net)) is usable


def test_junk_is_ignored_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    junk = json.dumps(
        [
            1,
            "x",
            {"dst": 5},
            {"dst": "10.0.0.0/33"},
            {"dst": "fd00::/8"},
            {"dst": "10.1.0.0/16", "dev": ["eth0"]},
            {"dst": "10.2.0.0/16"},
        ]
    )
    with caplog.at_level(logging.WARNING, logger=remote_info.__name__):
        assert parse_ip_route_json(junk, 4) == nets("10.2.0.0/16")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "ignored 6 IPv4 routes" in lines[0]


def test_route_count_and_output_size_are_bounded() -> None:
    many = json.dumps([{"dst": f"10.{i // 256}.{i % 256}.0/24"} for i in range(3000)])
    assert len(parse_ip_route_json(many, 4) or []) == MAX_ROUTES
    huge = "[" + ",".join(['{"dst":"10.0.0.0/8"}'] * 60000) + "]"
    assert len(huge) > remote_info.MAX_OUTPUT
    assert parse_ip_route_json(huge, 4) is None


def test_deeply_nested_json_does_not_raise() -> None:
    assert parse_ip_route_json("[" * 100000 + "]" * 100000, 4) is None


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_fuzz_route_parsers_never_raise(data: bytes) -> None:
    for family in (4, 6):
        result = parse_ip_route_json(data, family)
        assert result is None or all(n.version == family for n in result)
    assert all(n.version == 4 for n in parse_proc_route(data))
    assert all(n.version == 6 for n in parse_proc_ipv6_route(data))
    for family in (4, 6):
        assert all(n.version == family for n in parse_ip_route_text(data, family))


_FIELD = st.one_of(
    st.text(max_size=40),
    st.integers(),
    st.none(),
    st.booleans(),
    st.lists(st.text(max_size=5), max_size=3),
)


@settings(max_examples=300)
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["dst", "type", "dev", "flags", "gateway"]), _FIELD, max_size=5
        ),
        max_size=20,
    )
)
def test_fuzz_json_shaped_routes_never_raise(routes: list[dict[str, object]]) -> None:
    for net in parse_ip_route_json(json.dumps(routes), 4) or []:
        assert usable_route(net)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.text("0123456789ABCDEFabcdefxyz", min_size=0, max_size=10),
            st.text("0123456789ABCDEF", min_size=0, max_size=9),
        ),
        max_size=10,
    )
)
def test_fuzz_proc_lines_never_raise(rows: list[tuple[str, str]]) -> None:
    text = "Iface\tDestination\n" + "".join(
        f"eth0\t{a}\t00000000\t0001\t0\t0\t0\t{b}\t0\t0\t0\n" for a, b in rows
    )
    for net in parse_proc_route(text):
        assert usable_route(net)


# --- hosts -----------------------------------------------------------------------------------


def test_hosts_file_names_lower_cased_loopback_and_junk_left_out() -> None:
    table = parse_hosts(HOSTS)
    v4 = ipaddress.ip_address
    assert table == {
        "build01.corp.example": (v4("10.20.0.11"),),
        "build01": (v4("10.20.0.11"),),
        "build02.corp.example": (v4("10.20.0.12"), v4("fd00:20::12")),
        "build02": (v4("10.20.0.12"),),
        "good13": (v4("10.20.0.13"),),
    }


@settings(max_examples=300)
@given(st.text(max_size=3000))
def test_fuzz_hosts_never_raise(text: str) -> None:
    for name, addresses in parse_hosts(text).items():
        assert name == name.lower() and valid_host_name(name)
        assert 0 < len(addresses) <= remote_info.MAX_ADDRESSES_PER_NAME


def test_hosts_names_are_bounded() -> None:
    text = "".join(f"10.0.{i // 250}.{i % 250 + 1} host{i}\n" for i in range(5000))
    assert len(parse_hosts(text)) == remote_info.MAX_HOST_NAMES


# --- the commands --------------------------------------------------------------------------


# `busybox ip route show table main` and `busybox ip -6 route show table main` (BusyBox
# 1.35.0, as OpenWrt ships it), captured in a namespace with a default route, OpenVPN's
# 0.0.0.0/1, a gateway route, a host route, a multipath route, prohibit, unreachable and
# blackhole routes, and IPv6 multicast and link-local ones. Note the double spaces.
BUSYBOX_V4 = (
    "0.0.0.0/1 via 192.0.2.1 dev d0 \n"
    "default via 192.0.2.1 dev d0 \n"
    "10.20.0.0/16 via 192.0.2.254 dev d0  metric 5 \n"
    "10.30.0.5 via 192.0.2.9 dev d0 \n"
    "10.40.0.0/16 \n"
    "prohibit 10.97.0.0/16 \n"
    "unreachable 10.98.0.0/16 \n"
    "blackhole 10.99.0.0/16 \n"
    "192.0.2.0/24 dev d0 scope link  src 192.0.2.2 \n"
)
BUSYBOX_V6 = (
    "2001:db8:1::/64 dev d0  metric 256 \n"
    "2001:db8:9::/48 via 2001:db8:1::1 dev d0  metric 1024 \n"
    "unreachable 2001:db8:dead::/48 dev lo  metric 1024 \n"
    "fe80::/64 dev d1  metric 256 \n"
    "fe80::/64 dev d0  metric 256 \n"
    "default via 2001:db8:1::1 dev d0  metric 1024 \n"
    "multicast ff00::/8 dev d1  metric 256 \n"
    "multicast ff00::/8 dev d0  metric 256 \n"
)
# What BusyBox's ip says to -j (stderr, exit status 1).
BUSYBOX_IP_USAGE = (
    "BusyBox v1.35.0 (Debian 1:1.35.0-4+deb12u1+b1) multi-call binary.\n\n"
    "Usage: ip [OPTIONS] address|route|link|tunnel|neigh|rule [ARGS]\n"
)
# iproute2 6.1's text for the same table: the multipath route's nexthops are indented.
IPROUTE2_TEXT_V4 = (
    "10.40.0.0/16 \n"
    "\tnexthop via 192.0.2.3 dev d0 weight 1 \n"
    "\tnexthop via 192.0.2.4 dev d0 weight 1 \n"
    "192.0.2.0/24 dev d0 proto kernel scope link src 192.0.2.2 \n"
)
# /proc/net/route of that namespace: the blackhole, unreachable and prohibit routes have
# no device ("*"); the blackhole has no RTF_REJECT.
PROC_V4_REJECTS = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "d0\t0000140A\tFE0200C0\t0003\t0\t0\t5\t0000FFFF\t0\t0\t0\n"
    "*\t0000610A\t00000000\t0201\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
    "*\t0000620A\t00000000\t0201\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
    "*\t0000630A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
)


def test_busybox_ip_route_text_keeps_unicast_networks_only() -> None:
    assert parse_ip_route_text(BUSYBOX_V4, 4) == nets(
        "10.20.0.0/16", "10.30.0.5/32", "10.40.0.0/16", "192.0.2.0/24"
    )
    assert parse_ip_route_text(BUSYBOX_V6, 6) == nets("2001:db8:1::/64", "2001:db8:9::/48")


def test_iproute2_text_skips_nexthop_lines() -> None:
    assert parse_ip_route_text(IPROUTE2_TEXT_V4, 4) == nets("10.40.0.0/16", "192.0.2.0/24")


def test_route_text_of_the_wrong_family_or_garbage_is_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert parse_ip_route_text("fd00::/64 dev eth0\nnot-a-net dev eth0\nblackhole\n", 4) == []
    assert "ignored 3 IPv4 routes" in caplog.text


def test_proc_route_leaves_out_deviceless_reject_routes() -> None:
    assert parse_proc_route(PROC_V4_REJECTS) == nets("10.20.0.0/16")


class FakeRemote:
    """A remote shell: `outputs` maps a command to (exit status, stdout); any other
    command is not found (127), as a POSIX shell says."""

    def __init__(self, outputs: dict[str, tuple[int, str]], stderr: str = "sh: not found") -> None:
        self.outputs = outputs
        self.stderr = stderr
        self.commands: list[str] = []

    async def run(self, command: str) -> tuple[int | None, bytes, bytes]:
        self.commands.append(command)
        status, out = self.outputs.get(command, (127, ""))
        return status, out.encode(), b"" if status == 0 else self.stderr.encode()


def read_loop(path: str) -> str:
    return f'while IFS= read -r l || [ -n "$l" ]; do printf \'%s\\n\' "$l"; done < {path}'


def test_routes_from_ip_json() -> None:
    remote = FakeRemote(
        {"ip -j route show table main": (0, LAB_V4), "ip -j -6 route show table main": (0, LAB_V6)}
    )
    learnt = asyncio.run(remote_routes(remote.run))
    assert learnt.value == nets("10.81.1.0/24", "10.81.2.0/24", "fd00:81:1::/64", "fd00:81:2::/64")
    assert learnt.sources == ("ip -j route show table main", "ip -j -6 route show table main")
    assert learnt.missing == ()


def test_routes_fall_back_to_proc_without_iproute2() -> None:
    remote = FakeRemote(
        {"cat /proc/net/route": (0, LAB_PROC_V4), "cat /proc/net/ipv6_route": (0, LAB_PROC_V6)}
    )
    assert asyncio.run(remote_routes(remote.run)).value == nets(
        "10.81.1.0/24", "10.81.2.0/24", "fd00:81:1::/64", "fd00:81:2::/64", "2001:db8::/32"
    )
    assert remote.commands == [
        "ip -j route show table main",
        "cat /proc/net/route",
        "ip -j -6 route show table main",
        "cat /proc/net/ipv6_route",
    ]


def test_busybox_ip_without_json_gives_its_text_routes() -> None:
    remote = FakeRemote(
        {
            "ip -j route show table main": (1, ""),
            "ip route show table main": (0, BUSYBOX_V4),
            "ip -j -6 route show table main": (1, ""),
            "ip -6 route show table main": (0, BUSYBOX_V6),
        },
        stderr=BUSYBOX_IP_USAGE,
    )
    learnt = asyncio.run(remote_routes(remote.run))
    assert learnt.value == nets(
        "10.20.0.0/16",
        "10.30.0.5/32",
        "10.40.0.0/16",
        "192.0.2.0/24",
        "2001:db8:1::/64",
        "2001:db8:9::/48",
    )
    assert learnt.sources == ("ip route show table main", "ip -6 route show table main")


def test_old_iproute2_printing_text_for_json_falls_back_to_text() -> None:
    remote = FakeRemote(
        {
            "ip -j route show table main": (0, "10.0.0.0/8 dev eth0\n"),
            "ip route show table main": (0, "10.0.0.0/8 dev eth0\n"),
        }
    )
    assert asyncio.run(remote_routes(remote.run)).value[:1] == nets("10.0.0.0/8")


def test_no_cat_reads_proc_with_the_shells_own_read() -> None:
    remote = FakeRemote(
        {read_loop("/proc/net/route"): (0, LAB_PROC_V4), read_loop("/proc/net/ipv6_route"): (0, "")}
    )
    learnt = asyncio.run(remote_routes(remote.run))
    assert learnt.value == nets("10.81.1.0/24", "10.81.2.0/24")
    assert learnt.sources[0] == "the shell's read < /proc/net/route"
    assert learnt.missing == ()


def test_no_ip_and_no_proc_is_one_line_each_family(caplog: pytest.LogCaptureFixture) -> None:
    # BusyBox ash without the ip applet, in a chroot without /proc.
    remote = FakeRemote(
        {
            "cat /proc/net/route": (1, ""),
            "cat /proc/net/ipv6_route": (1, ""),
        },
        stderr="cat: can't open '/proc/net/route': No such file or directory",
    )
    learnt = asyncio.run(remote_routes(remote.run))
    assert learnt.value == []
    assert learnt.missing == (
        "auto_nets: the remote has no `ip` and no /proc/net/route: no IPv4 routes learned",
        "auto_nets: the remote has no `ip` and no /proc/net/ipv6_route: no IPv6 routes learned",
    )
    assert learnt.missing[0] in caplog.text


def test_a_failing_ip_is_named_with_its_error() -> None:
    remote = FakeRemote({}, stderr="RTNETLINK answers: Permission denied")
    remote.outputs = {
        c: (2, "") for c in ("ip -j route show table main", "ip route show table main")
    }
    learnt = asyncio.run(remote_routes(remote.run))
    assert learnt.missing[0].startswith(
        "auto_nets: the remote has an `ip route` that fails (RTNETLINK answers: Permission denied)"
    )


def test_hosts_command() -> None:
    remote = FakeRemote({"cat /etc/hosts": (0, "10.1.1.1 a.example\n")})
    learnt = asyncio.run(remote_hosts(remote.run))
    assert learnt.value == {"a.example": (ipaddress.ip_address("10.1.1.1"),)}
    assert learnt.sources == ("cat /etc/hosts",)


def test_no_hosts_file_is_said_once() -> None:
    remote = FakeRemote({"cat /etc/hosts": (1, "")}, stderr="cat: /etc/hosts: No such file")
    learnt = asyncio.run(remote_hosts(remote.run))
    assert learnt.value == {}
    assert learnt.missing == ("remote_hosts: the remote has no /etc/hosts: no host names learned",)


def test_read_file_without_cat_nor_a_posix_shell() -> None:
    # fish or csh: neither cat nor the sh loop; the shell's own complaint is kept.
    remote = FakeRemote({}, stderr="fish: Unknown command: cat")
    data, source, why = asyncio.run(read_remote_file(remote.run, "/etc/resolv.conf"))
    assert (data, source) == (None, "")
    assert why == "an unreadable /etc/resolv.conf (fish: Unknown command: cat)"


# --- which routes become subnets ---------------------------------------------------------------


def subs(*texts: str, exclude: bool = False) -> tuple[Subnet, ...]:
    return tuple(s for t in texts for s in parse_subnet(t, exclude=exclude, resolve=False))


def test_auto_subnets_leave_out_the_server_route_excludes_and_other_profiles() -> None:
    learnt = nets(
        "10.81.1.0/24",
        "10.81.2.0/24",
        "10.5.0.0/16",
        "10.6.1.0/24",
        "10.7.0.0/16",
        "fd00:81:1::/64",
    )
    profile = subs("10.5.0.0/16", exclude=True) + subs("10.6.0.0/16:22", exclude=True)
    server = nets("10.81.1.2/32")
    others = subs("10.7.128.0/24")
    kept = auto_subnets(learnt, profile, server, others)
    assert [s.network for s in kept] == nets("10.81.2.0/24", "10.6.1.0/24", "fd00:81:1::/64")
    assert all(not s.exclude and s.ports is None for s in kept)


def test_auto_subnets_leave_out_networks_this_machine_sits_in() -> None:
    learnt = nets("192.168.1.0/24", "10.81.2.0/24", "fd00:81:1::/64")
    local = [
        ipaddress.ip_address(a) for a in ("192.168.1.20", "fd00:81:1::1", "127.0.0.1", "fe80::1")
    ]
    kept = auto_subnets(learnt, (), (), (), local)
    assert [s.network for s in kept] == nets("10.81.2.0/24")
