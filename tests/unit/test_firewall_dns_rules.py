"""DNS capture rules of split DNS and `dns: all`: the bypass mark first, all of port 53."""

from __future__ import annotations

import ipaddress

import pytest

from shuttled.const import DNS_BYPASS_MARK
from shuttled.errors import ConfigError
from shuttled.firewall import Capture, IptablesBackend, NftBackend, parse_subnet
from shuttled.firewall.base import capture_rules
from shuttled.firewall.iptables import _chain_body

SPLIT = Capture(
    "split",
    tuple(parse_subnet("10.1.0.0/16", resolve=False)),
    tcp_port=12300,
    dns_port=12301,
    dns_servers=(ipaddress.ip_address("10.9.3.53"),),
    bypass_mark=DNS_BYPASS_MARK,
)
EVERY = Capture("every", (), tcp_port=12400, dns_port=12401, dns_all=True)


def nft_chain(capture: Capture) -> list[str]:
    text = NftBackend(persistent=True).render([capture])
    body = text.split(f"chain cap_{capture.name} {{\n")[1].split("\t}")[0]
    return [line.strip() for line in body.splitlines() if line.strip()]


def test_nft_split_returns_for_our_mark_before_catching_dns() -> None:
    assert nft_chain(SPLIT) == [
        "meta mark 0x5d1e0053 return",
        "ip daddr 10.9.3.53 meta l4proto { tcp, udp } th dport 53 redirect to :12301",
        "fib daddr type local return",
        "ip daddr 10.1.0.0/16 meta l4proto tcp redirect to :12300",
    ]


def test_iptables_split_returns_for_our_mark_before_catching_dns() -> None:
    assert _chain_body(4, SPLIT) == [
        "-m mark --mark 0x5d1e0053 -j RETURN",
        "-d 10.9.3.53/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 12301",
        "-d 10.9.3.53/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 12301",
        "-m addrtype --dst-type LOCAL -j RETURN",
        "-d 10.1.0.0/16 -p tcp -j REDIRECT --to-ports 12300",
    ]


def test_iptables_family_without_rules_gets_no_chain_for_the_mark_alone() -> None:
    assert _chain_body(6, SPLIT) == []


def test_nft_mode_all_catches_port_53_to_every_address() -> None:
    assert nft_chain(EVERY) == [
        "ip daddr 0.0.0.0/0 meta l4proto { tcp, udp } th dport 53 redirect to :12401",
        "ip6 daddr ::/0 meta l4proto { tcp, udp } th dport 53 redirect to :12401",
    ]


def test_iptables_mode_all_catches_port_53_to_every_address() -> None:
    assert _chain_body(4, EVERY) == [
        "-p tcp -m tcp --dport 53 -j REDIRECT --to-ports 12401",
        "-p udp -m udp --dport 53 -j REDIRECT --to-ports 12401",
    ]
    assert _chain_body(6, EVERY) == _chain_body(4, EVERY)


def test_mode_all_has_no_bypass_mark() -> None:
    assert capture_rules(EVERY).bypass_mark is None
    assert "mark" not in NftBackend().render([EVERY])
    assert "mark" not in IptablesBackend().render([EVERY])


def test_mark_survives_per_family_split() -> None:
    assert capture_rules(SPLIT).family(6).bypass_mark == DNS_BYPASS_MARK


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dns_all": True},
        {"bypass_mark": 0},
        {"bypass_mark": 1 << 32, "dns_port": 1},
    ],
)
def test_bad_dns_captures_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Capture("bad", (), tcp_port=1, **kwargs)  # type: ignore[arg-type]


def test_dns_held_before_its_listener_exists_is_refused_not_redirected() -> None:
    held = Capture(
        "held",
        tuple(parse_subnet("10.1.0.0/16", resolve=False)),
        tcp_port=12500,
        dns_all=True,
        hold=True,
    )
    rules = capture_rules(held)
    assert rules.dns == () and [r.family for r in rules.refused_dns] == [4, 6]
    assert nft_chain(held) == []  # nothing redirects: no listener to send it to
    assert _chain_body(4, held) == []
    text = NftBackend(persistent=True).render([held])
    hold = text.split("chain ks_held {\n")[1].split("\t}")[0]
    assert "ip daddr 0.0.0.0/0 tcp dport 53 reject with tcp reset" in hold
    assert "ip daddr 0.0.0.0/0 udp dport 53 reject" in hold
