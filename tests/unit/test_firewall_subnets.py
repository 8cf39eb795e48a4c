"""parse_subnet (sshuttle's syntax, with 0/0 meaning both families) and rule ordering."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from shuttled.errors import ConfigError
from shuttled.firewall import Capture, Subnet, order_subnets, parse_subnet
from shuttled.net import host_bits_warning

V4 = ipaddress.IPv4Network
V6 = ipaddress.IPv6Network


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8", [Subnet(V4("10.0.0.0/8"))]),
        ("10.1.2.3", [Subnet(V4("10.1.2.3/32"))]),
        ("10.1.2.3/8", [Subnet(V4("10.0.0.0/8"))]),  # host bits masked, as iptables does
        ("10/8", [Subnet(V4("10.0.0.0/8"))]),  # iproute2 shorthand, not inet_aton's 0.0.0.10
        ("192.168/16", [Subnet(V4("192.168.0.0/16"))]),
        ("0/0", [Subnet(V4("0.0.0.0/0")), Subnet(V6("::/0"))]),  # both families: no v6 leak
        ("0.0.0.0/0", [Subnet(V4("0.0.0.0/0"))]),
        ("::/0", [Subnet(V6("::/0"))]),
        ("fd00::/8", [Subnet(V6("fd00::/8"))]),
        ("fd00::1", [Subnet(V6("fd00::1/128"))]),
        ("10.0.0.0/8:80", [Subnet(V4("10.0.0.0/8"), (80, 80))]),
        ("10.0.0.0/8:8000-9000", [Subnet(V4("10.0.0.0/8"), (8000, 9000))]),
        ("0/0:443", [Subnet(V4("0.0.0.0/0"), (443, 443)), Subnet(V6("::/0"), (443, 443))]),
        ("[fd00::/8]:443", [Subnet(V6("fd00::/8"), (443, 443))]),
        ("[fd00::1]:22-23", [Subnet(V6("fd00::1/128"), (22, 23))]),
        ("[fd00::1]", [Subnet(V6("fd00::1/128"))]),
        ("[10.0.0.1]:22", [Subnet(V4("10.0.0.1/32"), (22, 22))]),
    ],
)
def test_parse_subnet(text: str, expected: list[Subnet]) -> None:
    assert parse_subnet(text) == expected


def test_parse_subnet_exclude_flag() -> None:
    assert parse_subnet("10.0.5.0/24", exclude=True) == [Subnet(V4("10.0.5.0/24"), exclude=True)]


def _fake_getaddrinfo(host: str, *args: Any, **kwargs: Any) -> list[Any]:
    assert host == "db.example.com"
    return [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::5", 0, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.5", 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.5", 0)),  # duplicates collapse
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::5%eth0", 0, 0, 2)),
    ]


def test_hostname_resolves_to_every_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _fake_getaddrinfo)
    assert parse_subnet("db.example.com:5432", exclude=True) == [
        Subnet(V4("192.0.2.5/32"), (5432, 5432), True),
        Subnet(V6("2001:db8::5/128"), (5432, 5432), True),
        Subnet(V6("fe80::5/128"), (5432, 5432), True),
    ]


def test_hostname_without_resolving_is_only_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", None)  # must not be called
    assert parse_subnet("db.example.com:5432", resolve=False) == []
    with pytest.raises(ConfigError):
        parse_subnet("bad..name", resolve=False)


def test_unresolvable_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(ConfigError, match=r"'nope\.example':.*cannot resolve.*not known"):
        parse_subnet("nope.example")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("10.0.0.0/33", "prefix length 33 is over 32 for IPv4$"),
        ("10.0.0.256", "'10.0.0.256' is not an IPv4 or IPv6 address$"),
        ("10", "'10' is not an IPv4 or IPv6 address$"),
        ("10.0.0.0/x", r"prefix length 'x' is not a number from 0 to 32 \(nor a netmask\)$"),
        ("10.0.0.0/8:0", "1-65535"),
        ("10.0.0.0/8:65536", "1-65535"),
        ("10.0.0.0/8:9000-8000", "reversed"),
        ("10.0.0.0/8:http", "bad port 'http'"),
        ("10.0.0.0/8:", "bad port ''"),
        ("10.0.0.0/8:80-", "bad port"),
        ("[fd00::/8", r"\[address\]:ports"),
        ("[fd00::/8]443", r"\[address\]:ports"),
        ("fd00::/129", "prefix length 129 is over 128 for IPv6$"),
        ("example.com/24", "host name takes no /prefix"),
        ("bad name", "not an IP address, network or host name"),
        ("-bad.example", "not an IP address, network or host name"),
    ],
)
def test_parse_subnet_errors(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as err:
        parse_subnet(text, resolve=False)
    message = str(err.value)
    assert message.startswith(f"subnet {text!r}: ")
    assert "\n" not in message


def test_subnet_rejects_bad_ports() -> None:
    with pytest.raises(ValueError):
        Subnet(V4("10.0.0.0/8"), (0, 80))
    with pytest.raises(ValueError):
        Subnet(V4("10.0.0.0/8"), (90, 80))


def test_family() -> None:
    assert Subnet(V4("10.0.0.0/8")).family == 4
    assert Subnet(V6("fd00::/8")).family == 6


def test_order_most_specific_first() -> None:
    wide = Subnet(V4("0.0.0.0/0"))
    net8 = Subnet(V4("10.0.0.0/8"))
    excl24 = Subnet(V4("10.0.5.0/24"), exclude=True)
    incl24 = Subnet(V4("10.0.5.0/24"))
    host = Subnet(V4("10.0.5.5/32"))
    port80 = Subnet(V4("0.0.0.0/0"), (80, 80))
    ports = Subnet(V4("10.0.0.0/8"), (8000, 9000))
    v6 = Subnet(V6("fd00::/8"))
    shuffled = [wide, v6, incl24, ports, net8, excl24, port80, host]
    assert order_subnets(shuffled) == [port80, ports, host, excl24, incl24, net8, v6, wide]
    assert sorted(shuffled) == order_subnets(shuffled)  # mixed families sort without TypeError


def test_capture_validation() -> None:
    net = (Subnet(V4("10.0.0.0/8")),)
    with pytest.raises(ConfigError, match="profile name"):
        Capture("bad name", net, 1)
    with pytest.raises(ConfigError, match="profile name"):
        Capture("x" * 33, net, 1)
    with pytest.raises(ConfigError, match="tcp_port 0"):
        Capture("ok", net, 0)
    with pytest.raises(ConfigError, match="dns_port 70000"):
        Capture("ok", net, 1, dns_port=70000)
    with pytest.raises(ConfigError, match="without a dns_port"):
        Capture("ok", net, 1, dns_servers=(ipaddress.ip_address("10.0.0.53"),))
    with pytest.raises(ConfigError, match="uid"):
        Capture("ok", net, 1, uid=-1)
    Capture("Work_2-b", net, 1, dns_port=2, uid=0)


@pytest.mark.parametrize(
    ("text", "warning"),
    [
        ("10.81.0.1/24", "subnet '10.81.0.1/24': host bits set: means 10.81.0.0/24"),
        ("10.81.0.1/24:443", "subnet '10.81.0.1/24:443': host bits set: means 10.81.0.0/24"),
        ("[fd00::1/64]:443", "subnet '[fd00::1/64]:443': host bits set: means fd00::/64"),
        ("10.81.0.0/24", None),
        ("10.81.0.1", None),
        ("10/8", None),
        ("0/0", None),
        ("host.example:22", None),
    ],
)
def test_host_bits_past_the_prefix_are_a_warning_naming_the_network_meant(
    text: str, warning: str | None
) -> None:
    assert host_bits_warning(text) == warning
    assert parse_subnet(text, resolve=False) is not None  # still accepted
