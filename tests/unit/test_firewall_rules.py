"""The exact transaction text each backend renders: these pins are the rule set's spec."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from shuttled.const import NFT_TABLE, RUN_TABLE_PREFIX
from shuttled.errors import ConfigError
from shuttled.firewall import Capture, IptablesBackend, NftBackend, Subnet, parse_subnet
from shuttled.firewall.base import capture_rules
from shuttled.firewall.ipt import MAX_CHAIN, chain_name, top_chain


def subnets(*texts: str, exclude: bool = False) -> tuple[Subnet, ...]:
    return tuple(s for text in texts for s in parse_subnet(text, exclude=exclude, resolve=False))


# v4 + v6, port ranges, an exclude nested in an include and an include nested in
# that exclude, a port-only exclude (the ssh server), DNS on a local stub too.
WORK = Capture(
    "work",
    subnets(
        "10.0.0.0/8",
        "192.168.50.0/24",
        "10.0.5.128/25",
        "172.16.0.0/12:8000-9000",
        "[fd00::/8]:443",
    )
    + subnets("10.0.5.0/24", "203.0.113.7:22", exclude=True),
    tcp_port=12300,
    dns_port=12301,
    dns_servers=tuple(ipaddress.ip_address(a) for a in ("127.0.0.53", "10.0.0.53", "fd00::53")),
)
# Everything (0/0 = both families) for one user, minus the LAN.
HOME = Capture(
    "home-lab",
    subnets("0/0") + subnets("192.168.0.0/16", "fe80::/10", exclude=True),
    tcp_port=12400,
    uid=1000,
)


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


NFT_TWO_CAPTURES = dedent("""
    table inet shuttled {}
    delete table inet shuttled
    table inet shuttled {
    \tchain output {
    \t\ttype nat hook output priority -105; policy accept;
    \t\tjump cap_work
    \t\tmeta skuid 1000 jump cap_home-lab
    \t}

    \tchain cap_work {
    \t\tip daddr { 10.0.0.53, 127.0.0.53 } meta l4proto { tcp, udp } th dport 53 redirect to :12301
    \t\tip6 daddr fd00::53 meta l4proto { tcp, udp } th dport 53 redirect to :12301
    \t\tfib daddr type local return
    \t\tip daddr 203.0.113.7 tcp dport 22 return
    \t\tip daddr 172.16.0.0/12 tcp dport 8000-9000 redirect to :12300
    \t\tip daddr 10.0.5.128/25 meta l4proto tcp redirect to :12300
    \t\tip daddr 10.0.5.0/24 meta l4proto tcp return
    \t\tip daddr { 10.0.0.0/8, 192.168.50.0/24 } meta l4proto tcp redirect to :12300
    \t\tip6 daddr fd00::/8 tcp dport 443 redirect to :12300
    \t}

    \tchain cap_home-lab {
    \t\tfib daddr type local return
    \t\tip daddr 192.168.0.0/16 meta l4proto tcp return
    \t\tip daddr 0.0.0.0/0 meta l4proto tcp redirect to :12400
    \t\tip6 daddr fe80::/10 meta l4proto tcp return
    \t\tip6 daddr ::/0 meta l4proto tcp redirect to :12400
    \t}
    }
""")

IPT_TWO_CAPTURES = dedent("""
    # iptables-restore -w --noflush
    *nat
    :SHUTTLED - [0:0]
    :SHUTTLED-work - [0:0]
    :SHUTTLED-home-lab - [0:0]
    -I OUTPUT -j SHUTTLED
    -A SHUTTLED -j SHUTTLED-work
    -A SHUTTLED -m owner --uid-owner 1000 -j SHUTTLED-home-lab
    -A SHUTTLED-work -d 10.0.0.53/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 12301
    -A SHUTTLED-work -d 10.0.0.53/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 12301
    -A SHUTTLED-work -d 127.0.0.53/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 12301
    -A SHUTTLED-work -d 127.0.0.53/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 12301
    -A SHUTTLED-work -m addrtype --dst-type LOCAL -j RETURN
    -A SHUTTLED-work -d 203.0.113.7/32 -p tcp -m tcp --dport 22 -j RETURN
    -A SHUTTLED-work -d 172.16.0.0/12 -p tcp -m tcp --dport 8000:9000 -j REDIRECT --to-ports 12300
    -A SHUTTLED-work -d 10.0.5.128/25 -p tcp -j REDIRECT --to-ports 12300
    -A SHUTTLED-work -d 10.0.5.0/24 -p tcp -j RETURN
    -A SHUTTLED-work -d 10.0.0.0/8 -p tcp -j REDIRECT --to-ports 12300
    -A SHUTTLED-work -d 192.168.50.0/24 -p tcp -j REDIRECT --to-ports 12300
    -A SHUTTLED-home-lab -m addrtype --dst-type LOCAL -j RETURN
    -A SHUTTLED-home-lab -d 192.168.0.0/16 -p tcp -j RETURN
    -A SHUTTLED-home-lab -p tcp -j REDIRECT --to-ports 12400
    COMMIT
    # ip6tables-restore -w --noflush
    *nat
    :SHUTTLED - [0:0]
    :SHUTTLED-work - [0:0]
    :SHUTTLED-home-lab - [0:0]
    -I OUTPUT -j SHUTTLED
    -A SHUTTLED -j SHUTTLED-work
    -A SHUTTLED -m owner --uid-owner 1000 -j SHUTTLED-home-lab
    -A SHUTTLED-work -d fd00::53/128 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 12301
    -A SHUTTLED-work -d fd00::53/128 -p udp -m udp --dport 53 -j REDIRECT --to-ports 12301
    -A SHUTTLED-work -m addrtype --dst-type LOCAL -j RETURN
    -A SHUTTLED-work -d fd00::/8 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 12300
    -A SHUTTLED-home-lab -m addrtype --dst-type LOCAL -j RETURN
    -A SHUTTLED-home-lab -d fe80::/10 -p tcp -j RETURN
    -A SHUTTLED-home-lab -p tcp -j REDIRECT --to-ports 12400
    COMMIT
""")


def test_nft_two_captures() -> None:
    assert NftBackend().render([WORK, HOME]) == NFT_TWO_CAPTURES


def test_iptables_two_captures() -> None:
    assert IptablesBackend().render([WORK, HOME]) == IPT_TWO_CAPTURES


def test_nft_nothing_is_a_delete_that_cannot_fail() -> None:
    assert NftBackend("shuttled_run_42").render([]) == dedent("""
        table inet shuttled_run_42 {}
        delete table inet shuttled_run_42
    """)


def test_iptables_nothing_from_nothing() -> None:
    assert IptablesBackend().render([]) == ""


def test_dns_only_capture_has_no_local_return() -> None:
    dns_only = Capture(
        "dns", (), tcp_port=1, dns_port=5353, dns_servers=(ipaddress.ip_address("192.0.2.53"),)
    )
    assert (
        NftBackend()
        .render([dns_only])
        .endswith(
            dedent("""
        \tchain cap_dns {
        \t\tip daddr 192.0.2.53 meta l4proto { tcp, udp } th dport 53 redirect to :5353
        \t}
        }
    """)
        )
    )
    assert "ip6tables" not in IptablesBackend().render([dns_only])  # no IPv6 rules, no chains


def test_ipv4_only_capture_leaves_ip6tables_alone() -> None:
    v4 = Capture("v4", subnets("10.0.0.0/8:22"), tcp_port=12300)
    assert IptablesBackend(f"{RUN_TABLE_PREFIX}7").render([v4]) == dedent("""
        # iptables-restore -w --noflush
        *nat
        :SHUTTLED_run_7 - [0:0]
        :SHUTTLED_run_7-v4 - [0:0]
        -I OUTPUT -j SHUTTLED_run_7
        -A SHUTTLED_run_7 -j SHUTTLED_run_7-v4
        -A SHUTTLED_run_7-v4 -m addrtype --dst-type LOCAL -j RETURN
        -A SHUTTLED_run_7-v4 -d 10.0.0.0/8 -p tcp -m tcp --dport 22 -j REDIRECT --to-ports 12300
        COMMIT
    """)


def test_neighbours_with_one_verdict_share_a_rule() -> None:
    capture = Capture(
        "c",
        subnets("10.1.0.0/16", "10.2.0.0/16", "10.0.0.0/8", "10.1.2.0/24", "192.0.2.0/24"),
        tcp_port=1,
    )
    (rule,) = capture_rules(capture).subnets
    # A network a later, wider one covers is dropped: same verdict, and older nft
    # refuses overlapping set elements.
    assert [str(n) for n in rule.daddrs] == ["10.0.0.0/8", "192.0.2.0/24"]


def test_duplicate_capture_names_are_refused() -> None:
    capture = Capture("same", subnets("10.0.0.0/8"), tcp_port=1)
    for backend in (NftBackend(), IptablesBackend()):
        with pytest.raises(ConfigError, match="'same' used twice"):
            backend.render([capture, capture])


@pytest.mark.parametrize("table", ["nft", "shuttled-x", "shuttled_a b", "Shuttled", ""])
def test_table_names_stay_in_our_namespace(table: str) -> None:
    with pytest.raises(ValueError):
        NftBackend(table)


def test_iptables_chain_names() -> None:
    assert top_chain(NFT_TABLE) == "SHUTTLED"
    assert top_chain(f"{RUN_TABLE_PREFIX}4194304") == "SHUTTLED_run_4194304"
    top = top_chain(f"{RUN_TABLE_PREFIX}4194304")
    name = "a-rather-long-profile-name"
    chain = chain_name(top, name)
    assert len(chain) == MAX_CHAIN
    assert chain.startswith(f"{top}-a")
    assert chain == chain_name(top, name)  # stable across runs: found again at cleanup
    assert chain != chain_name(top, name + "2")
    assert chain_name("SHUTTLED", "work") == "SHUTTLED-work"
    with pytest.raises(ValueError, match="too long"):
        IptablesBackend("shuttled_" + "x" * 20)


def test_persistent_daemon_table_stays_when_empty_and_goes_on_remove() -> None:
    nft = NftBackend("shuttled", persistent=True)
    script = nft.render([])
    assert script.endswith(
        "table inet shuttled {\n\tchain output {\n\t\ttype nat hook output "
        "priority -105; policy accept;\n\t}\n}\n"
    )
    assert NftBackend("shuttled").render([]).count("table inet shuttled") == 2
    ipt = IptablesBackend("shuttled", persistent=True)
    assert ":SHUTTLED - [0:0]" in ipt.render([])
    assert IptablesBackend("shuttled").render([]) == ""
