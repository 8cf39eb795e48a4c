"""Router mode without a kernel: the TPROXY/mark/reject rules each backend renders (these
pins are the rule set's spec), policy-routing bookkeeping, original destinations from
cmsg, datagram channels, UDP flow limits, and the settings from flags and profiles."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
import struct
import textwrap
from pathlib import Path

import pytest

from shuttled import const
from shuttled.config import load_config
from shuttled.errors import ShuttledError, UsageError
from shuttled.firewall import Capture, IptablesBackend, NftBackend, parse_subnet, policy
from shuttled.firewall.base import LanMatch
from shuttled.firewall.ipt import ChainSet, parse, transaction
from shuttled.firewall.tproxy import router_rules
from shuttled.router import lan_match, settings_from_profile
from shuttled.tunnel import sshmsg, transparent
from shuttled.tunnel.channels import ChannelMux
from shuttled.tunnel.udp import UdpProxy


def subnets(*texts: str, exclude: bool = False) -> tuple:  # type: ignore[type-arg]
    return tuple(s for t in texts for s in parse_subnet(t, exclude=exclude, resolve=False))


# A LAN interface and a LAN subnet, IPv4 and IPv6 (the IPv6 one with a port), an
# exclude nested in an include, the ssh server's own port, UDP and LAN DNS.
LAN = Capture(
    "lan",
    subnets("10.0.0.0/8", "[fd00::/8]:443")
    + subnets("10.0.5.0/24", "203.0.113.7:22", exclude=True),
    tcp_port=12300,
    lan=LanMatch(("br-lan",), (ipaddress.ip_network("192.168.1.0/24"),)),
    udp_port=12302,
    lan_dns_port=12303,
)
HELD = dataclasses.replace(LAN, hold=True, uid=1000)


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


MARK = "meta mark set meta mark | 0x20000000 accept"
# This host's own addresses, broadcasts and multicast: never captured, even by 0/0.
NEVER_LINES = [
    "meta nfproto ipv4 fib daddr type local return",
    "meta nfproto ipv6 fib daddr type local return",
    "meta nfproto ipv4 fib daddr type broadcast return",
    "ip daddr 224.0.0.0/4 return",
    "ip6 daddr ff00::/8 return",
]
NEVER = "".join(f"    \t\t{line}\n" for line in NEVER_LINES)
DNS53 = 'iif != "lo" fib daddr type local meta l4proto { tcp, udp } th dport 53'
NFT_LAN = dedent(f"""
    \tchain prerouting {{
    \t\ttype filter hook prerouting priority -150; policy accept;
    \t\tiifname "br-lan" jump tp_lan
    \t\tip saddr 192.168.1.0/24 jump tp_lan
    \t\tiif "lo" meta mark & 0x20000000 == 0x20000000 jump tp_lan
    \t}}

    \tchain mark_out {{
    \t\ttype route hook output priority -150; policy accept;
    \t\tjump mk_lan
    \t}}

    \tchain tp_lan {{
    \t\tmeta nfproto ipv4 {DNS53} tproxy ip to 127.0.0.1:12303 {MARK}
    \t\tmeta nfproto ipv6 {DNS53} tproxy ip6 to [::1]:12303 {MARK}
{NEVER}    \t\tip daddr 203.0.113.7 meta l4proto {{ tcp, udp }} th dport 22 return
    \t\tip daddr 10.0.5.0/24 return
    \t\tiif != "lo" ip daddr 10.0.0.0/8 meta l4proto tcp tproxy ip to 127.0.0.1:12300 {MARK}
    \t\tip daddr 10.0.0.0/8 meta l4proto udp tproxy ip to 127.0.0.1:12302 {MARK}
    \t\tiif != "lo" ip6 daddr fd00::/8 tcp dport 443 tproxy ip6 to [::1]:12300 {MARK}
    \t\tip6 daddr fd00::/8 udp dport 443 tproxy ip6 to [::1]:12302 {MARK}
    \t}}

    \tchain mk_lan {{
    \t\tmeta nfproto ipv4 fib saddr type != local return
    \t\tmeta nfproto ipv6 fib saddr type != local return
{NEVER}    \t\tip daddr 203.0.113.7 meta l4proto {{ tcp, udp }} th dport 22 return
    \t\tip daddr 10.0.5.0/24 return
    \t\tip daddr 10.0.0.0/8 meta l4proto udp meta mark set meta mark | 0x20000000
    \t\tip6 daddr fd00::/8 udp dport 443 meta mark set meta mark | 0x20000000
    \t}}
    }}
""")

NFT_HELD = dedent("""
    \tchain cap_lan {
    \t}

    \tchain prerouting {
    \t\ttype filter hook prerouting priority -150; policy accept;
    \t\tiifname "br-lan" jump tp_lan
    \t\tip saddr 192.168.1.0/24 jump tp_lan
    \t}

    \tchain hold_out {
    \t\ttype filter hook output priority -110; policy accept;
    \t\tmeta skuid 1000 jump ks_lan
    \t}

    \tchain hold_fwd {
    \t\ttype filter hook forward priority -110; policy accept;
    \t\tiifname "br-lan" jump ks_lan
    \t\tip saddr 192.168.1.0/24 jump ks_lan
    \t}
    .""").removesuffix(".")  # (the dot keeps dedent from eating the tabs)

NFT_HOLD_CHAIN = dedent("""
    \tchain ks_lan {
    \t\tmeta nfproto ipv4 meta mark & 0x20000000 == 0x20000000 return
    \t\tmeta nfproto ipv6 meta mark & 0x20000000 == 0x20000000 return
    \t\tNEVER
    \t\tip daddr 203.0.113.7 meta l4proto { tcp, udp } th dport 22 return
    \t\tip daddr 10.0.5.0/24 return
    \t\tip daddr 10.0.0.0/8 meta l4proto tcp reject with tcp reset
    \t\tip daddr 10.0.0.0/8 reject
    \t\tip6 daddr fd00::/8 tcp dport 443 reject with tcp reset
    \t\tip6 daddr fd00::/8 udp dport 443 reject
    \t}
    }
""").replace("\t\tNEVER\n", "".join(f"\t\t{line}\n" for line in NEVER_LINES))

TPROXY4 = "--on-ip 127.0.0.1 --tproxy-mark 0x20000000/0x20000000"
DNS4 = "! -i lo -p {0} -m addrtype --dst-type LOCAL -m {0} --dport 53"
IPT_LAN_V4 = dedent(f"""
    # iptables-restore -w --noflush
    *mangle
    :SHUTTLED - [0:0]
    :SHUTTLED-lan - [0:0]
    :SHUTTLED-.out - [0:0]
    :SHUTTLED-.m.lan - [0:0]
    -I PREROUTING -j SHUTTLED
    -I OUTPUT -j SHUTTLED-.out
    -A SHUTTLED -i br-lan -j SHUTTLED-lan
    -A SHUTTLED -s 192.168.1.0/24 -j SHUTTLED-lan
    -A SHUTTLED -i lo -m mark --mark 0x20000000/0x20000000 -j SHUTTLED-lan
    -A SHUTTLED-lan {DNS4.format("tcp")} -j TPROXY --on-port 12303 {TPROXY4}
    -A SHUTTLED-lan {DNS4.format("udp")} -j TPROXY --on-port 12303 {TPROXY4}
    -A SHUTTLED-lan -m addrtype --dst-type LOCAL -j RETURN
    -A SHUTTLED-lan -m addrtype --dst-type BROADCAST -j RETURN
    -A SHUTTLED-lan -d 224.0.0.0/4 -j RETURN
    -A SHUTTLED-lan -d 203.0.113.7/32 -p tcp -m tcp --dport 22 -j RETURN
    -A SHUTTLED-lan -d 203.0.113.7/32 -p udp -m udp --dport 22 -j RETURN
    -A SHUTTLED-lan -d 10.0.5.0/24 -j RETURN
    -A SHUTTLED-lan ! -i lo -d 10.0.0.0/8 -p tcp -j TPROXY --on-port 12300 {TPROXY4}
    -A SHUTTLED-lan -d 10.0.0.0/8 -p udp -j TPROXY --on-port 12302 {TPROXY4}
    -A SHUTTLED-.out -j SHUTTLED-.m.lan
    -A SHUTTLED-.m.lan -m addrtype ! --src-type LOCAL -j RETURN
    -A SHUTTLED-.m.lan -m addrtype --dst-type LOCAL -j RETURN
    -A SHUTTLED-.m.lan -m addrtype --dst-type BROADCAST -j RETURN
    -A SHUTTLED-.m.lan -d 224.0.0.0/4 -j RETURN
    -A SHUTTLED-.m.lan -d 203.0.113.7/32 -p tcp -m tcp --dport 22 -j RETURN
    -A SHUTTLED-.m.lan -d 203.0.113.7/32 -p udp -m udp --dport 22 -j RETURN
    -A SHUTTLED-.m.lan -d 10.0.5.0/24 -j RETURN
    -A SHUTTLED-.m.lan -d 10.0.0.0/8 -p udp -j MARK --set-xmark 0x20000000/0x20000000
    COMMIT
""")

IPT_HELD_FILTER_V4 = dedent("""
    *filter
    :SHUTTLED - [0:0]
    :SHUTTLED-lan - [0:0]
    :SHUTTLED-.fwd - [0:0]
    -I OUTPUT -j SHUTTLED
    -I FORWARD -j SHUTTLED-.fwd
    -A SHUTTLED -m owner --uid-owner 1000 -j SHUTTLED-lan
    -A SHUTTLED-lan -m mark --mark 0x20000000/0x20000000 -j RETURN
    -A SHUTTLED-lan -m addrtype --dst-type LOCAL -j RETURN
    -A SHUTTLED-lan -m addrtype --dst-type BROADCAST -j RETURN
    -A SHUTTLED-lan -d 224.0.0.0/4 -j RETURN
    -A SHUTTLED-lan -d 203.0.113.7/32 -p tcp -m tcp --dport 22 -j RETURN
    -A SHUTTLED-lan -d 203.0.113.7/32 -p udp -m udp --dport 22 -j RETURN
    -A SHUTTLED-lan -d 10.0.5.0/24 -j RETURN
    -A SHUTTLED-lan -d 10.0.0.0/8 -p tcp -j REJECT --reject-with tcp-reset
    -A SHUTTLED-lan -d 10.0.0.0/8 -j REJECT
    -A SHUTTLED-.fwd -i br-lan -j SHUTTLED-lan
    -A SHUTTLED-.fwd -s 192.168.1.0/24 -j SHUTTLED-lan
    COMMIT
""")


# --- the rules ----------------------------------------------------------------------------


def test_nft_lan_capture_tproxies_lan_tcp_and_all_udp_and_marks_local_udp() -> None:
    script = NftBackend("shuttled").render([LAN])
    assert script.endswith(NFT_LAN), script
    # Local TCP keeps the nat redirect: only the LAN's TCP is TPROXY'd.
    assert "ip daddr 10.0.0.0/8 meta l4proto tcp redirect to :12300" in script


def test_nft_kill_switch_rejects_before_nat_and_captures_nothing() -> None:
    script = NftBackend("shuttled").render([HELD])
    assert NFT_HELD in script and script.endswith(NFT_HOLD_CHAIN), script
    assert "redirect to :12300" not in script and "mk_lan" not in script
    assert "tproxy ip to 127.0.0.1:12302" not in script  # no UDP capture while held


def ipt_router_rules(captures: list[Capture]) -> str:
    """The iptables backend's mangle and filter transactions (its nat ones left out)."""
    blocks = IptablesBackend("shuttled").render(captures).split("# ip")
    return "".join(f"# ip{block}" for block in blocks[1:] if "\n*nat\n" not in block)


def test_iptables_lan_capture_in_mangle() -> None:
    text = ipt_router_rules([LAN])
    assert text.startswith(IPT_LAN_V4), text
    assert "*filter" not in text


def test_iptables_kill_switch_rejects_in_filter_output_and_forward() -> None:
    text = ipt_router_rules([HELD])
    assert IPT_HELD_FILTER_V4 in text, text
    assert "MARK" not in text


def test_plain_local_captures_add_no_router_rules() -> None:
    plain = Capture("work", subnets("10.0.0.0/8"), tcp_port=12300)
    assert router_rules([plain]).empty
    assert ipt_router_rules([plain]) == ""
    assert "prerouting" not in NftBackend("shuttled").render([plain])


def test_every_interface_means_all_but_lo() -> None:
    capture = dataclasses.replace(LAN, lan=LanMatch(every_interface=True))
    assert '\t\tiif != "lo" jump tp_lan\n' in NftBackend("shuttled").render([capture])
    assert "-A SHUTTLED ! -i lo -j SHUTTLED-lan" in ipt_router_rules([capture])


def test_lan_dns_all_catches_port_53_to_any_address() -> None:
    capture = dataclasses.replace(LAN, lan_dns_all=True)
    script = NftBackend("shuttled").render([capture])
    assert (
        'meta nfproto ipv4 iif != "lo" meta l4proto { tcp, udp } th dport 53 '
        f"tproxy ip to 127.0.0.1:12303 {MARK}"
    ) in script


def test_udp_only_capture_marks_and_tproxies_but_leaves_lan_tcp_alone() -> None:
    capture = Capture("work", subnets("10.0.0.0/8"), tcp_port=12300, udp_port=12302)
    script = NftBackend("shuttled").render([capture])
    assert 'iif "lo" meta mark & 0x20000000 == 0x20000000 jump tp_work' in script
    assert "tproxy ip to 127.0.0.1:12300" not in script
    assert router_rules([capture]).needs_policy


def test_iptables_state_parse_and_transaction_round_trip() -> None:
    save = dedent("""
        *mangle
        :PREROUTING ACCEPT [0:0]
        :OUTPUT ACCEPT [0:0]
        :SHUTTLED - [0:0]
        :SHUTTLED-.out - [0:0]
        :SHUTTLED-old - [0:0]
        :SHUTTLED_run_9 - [0:0]
        -A PREROUTING -j SHUTTLED
        -A PREROUTING -j SHUTTLED_run_9
        -A OUTPUT -j SHUTTLED-.out
        -A SHUTTLED -i lan0 -j SHUTTLED-old
        COMMIT
    """)
    state = parse(save, "SHUTTLED")
    assert state.chains == ("SHUTTLED", "SHUTTLED-.out", "SHUTTLED-old")
    assert state.jumps == (("PREROUTING", "SHUTTLED"), ("OUTPUT", "SHUTTLED-.out"))
    text = transaction("mangle", state, ChainSet())
    assert text == dedent("""
        *mangle
        :SHUTTLED - [0:0]
        :SHUTTLED-.out - [0:0]
        :SHUTTLED-old - [0:0]
        -D PREROUTING -j SHUTTLED
        -D OUTPUT -j SHUTTLED-.out
        -X SHUTTLED-old
        -X SHUTTLED-.out
        -X SHUTTLED
        COMMIT
    """)


# --- policy routing bookkeeping --------------------------------------------------------------


def test_tproxy_users_are_found_per_instance() -> None:
    ruleset = dedent("""
        table inet fw4 {
        \tchain x {
        \t\tmeta l4proto udp tproxy ip to 127.0.0.1:1 accept
        \t}
        }
        table inet shuttled {
        \tchain tp_a {
        \t\tip daddr 10.0.0.0/8 meta l4proto udp tproxy ip to 127.0.0.1:5 accept
        \t}
        }
        table inet shuttled_run_42 {
        \tchain output {
        \t}
        }
    """)
    assert policy._nft_users(ruleset) == {"shuttled"}  # fw4's own tproxy is not ours
    save = (
        "-A SHUTTLED_run_7-a -d 10.0.0.0/8 -p udp -j TPROXY --on-port 5\n"
        "-A OTHER -p udp -j TPROXY --on-port 6\n"
    )
    assert policy.ipt_users(save) == {"shuttled_run_7"}


def test_our_policy_rule_is_recognised_by_table_and_priority() -> None:
    ours = {"priority": const.POLICY_PRIORITY, "table": str(const.POLICY_TABLE)}
    assert policy._ours(ours)
    assert not policy._ours({**ours, "table": "main"})
    assert not policy._ours({**ours, "priority": 100})


def test_tproxy_mark_is_clear_of_the_dns_bypass_mark() -> None:
    # Our `ip rule fwmark M/M` must never catch the DNS forwarder's own sockets.
    assert const.DNS_BYPASS_MARK & const.TPROXY_MARK == 0


# --- transparent sockets --------------------------------------------------------------------


def test_original_destination_from_cmsg_both_families() -> None:
    v4 = struct.pack("!HH4s8x", socket.AF_INET, 7, socket.inet_pton(socket.AF_INET, "10.1.2.3"))
    v6 = struct.pack(
        "!HHI16sI", socket.AF_INET6, 443, 0, socket.inet_pton(socket.AF_INET6, "fd00::2"), 0
    )
    anc4 = [(socket.SOL_IP, transparent.IP_RECVORIGDSTADDR, v4)]
    anc6 = [(socket.IPPROTO_IPV6, transparent.IPV6_RECVORIGDSTADDR, v6)]
    assert transparent.original_dst(anc4, socket.AF_INET) == ("10.1.2.3", 7)
    assert transparent.original_dst(anc6, socket.AF_INET6) == ("fd00::2", 443)
    assert transparent.original_dst([], socket.AF_INET) is None
    assert transparent.parse_sockaddr(b"\x00" * 4, socket.AF_INET) is None


# --- datagram channels and flows --------------------------------------------------------------


class _Pipe:
    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes) -> None:
        self.buf += data

    def close(self) -> None:
        pass


class _Endpoint:
    def __getattr__(self, name: str) -> object:
        return lambda *args: None


def test_datagram_is_sent_whole_or_dropped_never_split_or_queued() -> None:
    async def body() -> None:
        pipe = _Pipe()
        mux = ChannelMux(pipe)
        channel = mux.open(sshmsg.UDP_CHANNEL_TYPE, _Endpoint(), sshmsg.sstring("inet"))
        mux.feed(sshmsg.open_confirmation(channel.local_id, 5, 1000, 66048))
        assert channel.send_whole(b"x" * 600)
        assert not channel.send_whole(b"y" * 600)  # 400 bytes of window left
        assert channel.remote_window == 400 and not channel.send_blocked
        mux.push()
        messages, _ = sshmsg.split_packets(bytes(pipe.buf), 1 << 20)
        sizes = [len(p) - 8 for t, p in messages if t == sshmsg.MSG_CHANNEL_DATA]
        assert sizes == [600]

    asyncio.run(body())


def test_flows_beyond_the_limit_are_refused_and_counted() -> None:
    async def body() -> None:
        async def no_helper() -> ChannelMux:
            raise ShuttledError("UDP unavailable: no python")

        proxy = UdpProxy(no_helper, max_flows=2)
        flows = [proxy.new_flow(("192.168.1.9", port)) for port in (1000, 1001, 1002)]
        assert flows[2] is None and proxy.stats.refused == 1 and len(proxy.flows) == 2
        await asyncio.sleep(0.01)  # the opens fail: counted, and the slots are free again
        assert proxy.stats.failed == 2 and proxy.flows == {}
        assert proxy.new_flow(("192.168.1.9", 1003)) is not None
        proxy.close()

    asyncio.run(body())


# --- settings -------------------------------------------------------------------------------------


def test_lan_flags_split_interfaces_and_subnets() -> None:
    match = lan_match(["br-lan", "192.168.1.0/24", "fd00:1::/64", "10.9.9.9", "eth0.2"])
    assert match is not None
    assert match.interfaces == ("br-lan", "eth0.2")
    assert [str(s) for s in match.sources] == ["192.168.1.0/24", "fd00:1::/64", "10.9.9.9/32"]
    assert lan_match([]) is None
    with pytest.raises(UsageError):
        lan_match(["bad name with spaces"])


def test_profile_keys_become_router_settings(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        dedent("""
        home:
          remote: gw
          subnets: [10.0.0.0/8]
          lan: [br-lan, 192.168.1.0/24]
          kill_switch: true
          udp_flows: 100
          udp_idle: 30
          lan_dns: all
        plain:
          remote: gw
          subnets: [172.16.0.0/12]
    """)
    )
    config = load_config(tmp_path)
    home = settings_from_profile(config.profiles["home"])
    assert home.lan == LanMatch(("br-lan",), (ipaddress.ip_network("192.168.1.0/24"),))
    assert home.udp and home.kill_switch and home.lan_dns_all
    assert (home.udp_flows, home.udp_idle) == (100, 30.0)
    plain = settings_from_profile(config.profiles["plain"])
    assert plain.lan is None and not plain.udp and not plain.kill_switch


def test_broadcast_multicast_and_own_addresses_are_never_captured_even_by_0_0() -> None:
    everything = Capture(
        "all", subnets("0/0"), tcp_port=1, udp_port=2, lan=LanMatch(every_interface=True)
    )
    script = NftBackend("shuttled").render([everything])
    tp = script[script.index("chain tp_all") : script.index("chain mk_all")]
    # DHCP, mDNS and the router's own services stay local: these come before any tproxy.
    assert tp.index("ip daddr 224.0.0.0/4 return") < tp.index("tproxy")
    assert tp.index("fib daddr type broadcast return") < tp.index("tproxy")
    assert tp.index("ip6 daddr ff00::/8 return") < tp.index("tproxy")
