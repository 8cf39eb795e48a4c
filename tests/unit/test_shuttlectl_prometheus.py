"""`shuttlectl stats --prometheus`: the exact text for typed stats, escaping, and the format's
rules (one HELP and TYPE a family, families together, `_total` on counters) read back by a
strict parser (tests/helpers.py). The verb against a control socket: test_shuttlectl.py."""

from __future__ import annotations

import math

import pytest

from shuttlectl import prometheus
from shuttled.control.schema import ProfileStats
from shuttled.supervisor import State
from tests.helpers import parse_prometheus

UP: ProfileStats = {
    "name": "work",
    "state": "up",
    "mode": "helper",
    "tx": 4096,
    "rx": 1 << 33,
    "active": 2,
    "total": 17,
    "failed": 1,
    "reconnects": 3,
    "recycled": 1,
    "aborted": {"write": 2, "read": 0},
    "uptime": 3723.5,
    "rtt": 0.0123,
    "refused": 4,
    "deferred": 0,
    "streams": 2,
    "stream_channels": [1, 1],
    "tcp_rtt": 0.0005,
    "tcp_retrans": 7,
    "ssh_pid": 321,
    "ssh_cpu": 1.25,
    "ssh_rss": 12 << 20,
    "dns": {
        "mode": "split",
        "path": "firewall",
        "queries": 40,
        "answered": 36,
        "failed": 1,
        "timeouts": 3,
        "cache_hits": 5,
        "hosts": 2,
        "tunnel": 30,
        "local": 3,
        "peer": 0,
        "nameservers": [
            {"address": "10.0.0.2", "transport": "tcp", "health": "answering", "error": None},
            {
                "address": "10.0.0.3@5353",
                "transport": "untried",
                "health": "failing",
                "error": "timed out",
            },
        ],
    },
    "udp": {
        "flows": 1,
        "opened": 9,
        "refused": 0,
        "failed": 1,
        "datagrams_up": 120,
        "datagrams_down": 118,
        "bytes_up": 9600,
        "bytes_down": 70000,
        "dropped": 2,
    },
    "lan_dns": {"queries": 12, "dropped": 1},
    "rules_restored": 1,
    "rules_last_loss": "table inet shuttled",
}
DOWN: ProfileStats = {"name": "lab", "state": "down", "rules_restored": 1, "rules_last_loss": None}

GOLDEN = """\
# HELP shuttled_up 1 when the profile's tunnel is up, else 0.
# TYPE shuttled_up gauge
shuttled_up{profile="work"} 1
shuttled_up{profile="lab"} 0
# HELP shuttled_state The profile's state: 1 for the one it is in.
# TYPE shuttled_state gauge
shuttled_state{profile="work",state="down"} 0
shuttled_state{profile="work",state="connecting"} 0
shuttled_state{profile="work",state="up"} 1
shuttled_state{profile="work",state="reconnecting"} 0
shuttled_state{profile="work",state="failed"} 0
shuttled_state{profile="lab",state="down"} 1
shuttled_state{profile="lab",state="connecting"} 0
shuttled_state{profile="lab",state="up"} 0
shuttled_state{profile="lab",state="reconnecting"} 0
shuttled_state{profile="lab",state="failed"} 0
# HELP shuttled_mode Forwarding mode (direct or helper), while connected.
# TYPE shuttled_mode gauge
shuttled_mode{profile="work",mode="helper"} 1
# HELP shuttled_uptime_seconds Seconds the tunnel has been up.
# TYPE shuttled_uptime_seconds gauge
shuttled_uptime_seconds{profile="work"} 3723.5
# HELP shuttled_receive_bytes_total Bytes received from the remote on the tunnel's TCP connections.
# TYPE shuttled_receive_bytes_total counter
shuttled_receive_bytes_total{profile="work"} 8589934592
# HELP shuttled_transmit_bytes_total Bytes sent to the remote on the tunnel's TCP connections.
# TYPE shuttled_transmit_bytes_total counter
shuttled_transmit_bytes_total{profile="work"} 4096
# HELP shuttled_connections_active TCP connections open now.
# TYPE shuttled_connections_active gauge
shuttled_connections_active{profile="work"} 2
# HELP shuttled_connections_opened_total TCP connections taken.
# TYPE shuttled_connections_opened_total counter
shuttled_connections_opened_total{profile="work"} 17
# HELP shuttled_connections_failed_total TCP connections whose channel could not be opened.
# TYPE shuttled_connections_failed_total counter
shuttled_connections_failed_total{profile="work"} 1
# HELP shuttled_connections_aborted_total TCP connections ended by a local error, by kind.
# TYPE shuttled_connections_aborted_total counter
shuttled_connections_aborted_total{profile="work",kind="read"} 0
shuttled_connections_aborted_total{profile="work",kind="write"} 2
# HELP shuttled_limit_refused_total Connections refused by a limit.
# TYPE shuttled_limit_refused_total counter
shuttled_limit_refused_total{profile="work"} 4
# HELP shuttled_accept_paused_total Times a listener paused accepting for want of file descriptors.
# TYPE shuttled_accept_paused_total counter
shuttled_accept_paused_total{profile="work"} 0
# HELP shuttled_reconnects_total ssh reconnections.
# TYPE shuttled_reconnects_total counter
shuttled_reconnects_total{profile="work"} 3
# HELP shuttled_ssh_recycled_total Worn ssh sessions replaced.
# TYPE shuttled_ssh_recycled_total counter
shuttled_ssh_recycled_total{profile="work"} 1
# HELP shuttled_ssh_streams ssh connections carrying the tunnel.
# TYPE shuttled_ssh_streams gauge
shuttled_ssh_streams{profile="work"} 2
# HELP shuttled_health_rtt_seconds Round trip of the latest health check through ssh.
# TYPE shuttled_health_rtt_seconds gauge
shuttled_health_rtt_seconds{profile="work"} 0.0123
# HELP shuttled_ssh_tcp_rtt_seconds The kernel's round-trip estimate of the ssh TCP connection.
# TYPE shuttled_ssh_tcp_rtt_seconds gauge
shuttled_ssh_tcp_rtt_seconds{profile="work"} 0.0005
# HELP shuttled_ssh_tcp_retransmits_total Segments the kernel retransmitted on the ssh TCP connection.
# TYPE shuttled_ssh_tcp_retransmits_total counter
shuttled_ssh_tcp_retransmits_total{profile="work"} 7
# HELP shuttled_ssh_cpu_seconds_total CPU time of the ssh process.
# TYPE shuttled_ssh_cpu_seconds_total counter
shuttled_ssh_cpu_seconds_total{profile="work"} 1.25
# HELP shuttled_ssh_resident_memory_bytes Resident memory of the ssh process.
# TYPE shuttled_ssh_resident_memory_bytes gauge
shuttled_ssh_resident_memory_bytes{profile="work"} 12582912
# HELP shuttled_dns_queries_total DNS queries taken.
# TYPE shuttled_dns_queries_total counter
shuttled_dns_queries_total{profile="work"} 40
# HELP shuttled_dns_answered_total DNS queries answered (by a nameserver, the cache or hosts).
# TYPE shuttled_dns_answered_total counter
shuttled_dns_answered_total{profile="work"} 36
# HELP shuttled_dns_failed_total DNS queries failed here (SERVFAIL, FORMERR or REFUSED).
# TYPE shuttled_dns_failed_total counter
shuttled_dns_failed_total{profile="work"} 1
# HELP shuttled_dns_timeouts_total DNS queries with no reply in time.
# TYPE shuttled_dns_timeouts_total counter
shuttled_dns_timeouts_total{profile="work"} 3
# HELP shuttled_dns_cache_hits_total DNS queries answered from the cache.
# TYPE shuttled_dns_cache_hits_total counter
shuttled_dns_cache_hits_total{profile="work"} 5
# HELP shuttled_dns_hosts_answers_total DNS queries answered from the remote's /etc/hosts.
# TYPE shuttled_dns_hosts_answers_total counter
shuttled_dns_hosts_answers_total{profile="work"} 2
# HELP shuttled_dns_forwarded_total DNS queries sent on: through the tunnel, to the local resolver, to another profile.
# TYPE shuttled_dns_forwarded_total counter
shuttled_dns_forwarded_total{profile="work",to="tunnel"} 30
shuttled_dns_forwarded_total{profile="work",to="local"} 3
shuttled_dns_forwarded_total{profile="work",to="peer"} 0
# HELP shuttled_dns_nameserver_health A remote nameserver's health after the latest query to it: 1 for the one it is in.
# TYPE shuttled_dns_nameserver_health gauge
shuttled_dns_nameserver_health{profile="work",nameserver="10.0.0.2",health="answering"} 1
shuttled_dns_nameserver_health{profile="work",nameserver="10.0.0.2",health="failing"} 0
shuttled_dns_nameserver_health{profile="work",nameserver="10.0.0.2",health="untried"} 0
shuttled_dns_nameserver_health{profile="work",nameserver="10.0.0.3@5353",health="answering"} 0
shuttled_dns_nameserver_health{profile="work",nameserver="10.0.0.3@5353",health="failing"} 1
shuttled_dns_nameserver_health{profile="work",nameserver="10.0.0.3@5353",health="untried"} 0
# HELP shuttled_udp_flows UDP flows open now.
# TYPE shuttled_udp_flows gauge
shuttled_udp_flows{profile="work"} 1
# HELP shuttled_udp_flows_opened_total UDP flows opened.
# TYPE shuttled_udp_flows_opened_total counter
shuttled_udp_flows_opened_total{profile="work"} 9
# HELP shuttled_udp_flows_refused_total UDP flows refused by a limit.
# TYPE shuttled_udp_flows_refused_total counter
shuttled_udp_flows_refused_total{profile="work"} 0
# HELP shuttled_udp_flows_failed_total UDP flows whose channel failed.
# TYPE shuttled_udp_flows_failed_total counter
shuttled_udp_flows_failed_total{profile="work"} 1
# HELP shuttled_udp_transmit_datagrams_total UDP datagrams sent on.
# TYPE shuttled_udp_transmit_datagrams_total counter
shuttled_udp_transmit_datagrams_total{profile="work"} 120
# HELP shuttled_udp_receive_datagrams_total UDP datagrams received.
# TYPE shuttled_udp_receive_datagrams_total counter
shuttled_udp_receive_datagrams_total{profile="work"} 118
# HELP shuttled_udp_transmit_bytes_total UDP payload bytes sent on.
# TYPE shuttled_udp_transmit_bytes_total counter
shuttled_udp_transmit_bytes_total{profile="work"} 9600
# HELP shuttled_udp_receive_bytes_total UDP payload bytes received.
# TYPE shuttled_udp_receive_bytes_total counter
shuttled_udp_receive_bytes_total{profile="work"} 70000
# HELP shuttled_udp_dropped_datagrams_total UDP datagrams dropped.
# TYPE shuttled_udp_dropped_datagrams_total counter
shuttled_udp_dropped_datagrams_total{profile="work"} 2
# HELP shuttled_lan_dns_queries_total DNS queries from the LAN (router mode).
# TYPE shuttled_lan_dns_queries_total counter
shuttled_lan_dns_queries_total{profile="work"} 12
# HELP shuttled_lan_dns_dropped_total DNS queries from the LAN dropped.
# TYPE shuttled_lan_dns_dropped_total counter
shuttled_lan_dns_dropped_total{profile="work"} 1
# HELP shuttled_firewall_rules_restored_total Times someone else's change to shuttled's rules was undone.
# TYPE shuttled_firewall_rules_restored_total counter
shuttled_firewall_rules_restored_total 1
"""  # noqa: E501


def test_typed_stats_of_an_up_and_a_down_profile_give_the_golden_text() -> None:
    assert prometheus.exposition([UP, DOWN]) == GOLDEN


def test_the_golden_text_parses_strictly_with_every_family_once() -> None:
    samples = parse_prometheus(GOLDEN)
    families = {name for name, _ in samples}
    assert families == {f.name for f in prometheus.FAMILIES} | {
        "shuttled_firewall_rules_restored_total"
    }
    for family in families:
        assert GOLDEN.count(f"# HELP {family} ") == GOLDEN.count(f"# TYPE {family} ") == 1
    assert samples[("shuttled_receive_bytes_total", (("profile", "work"),))] == 1 << 33


def test_family_names_are_unique_and_counters_end_in_total() -> None:
    names = [f.name for f in prometheus.FAMILIES]
    assert len(names) == len(set(names))
    for family in prometheus.FAMILIES:
        assert family.name.startswith("shuttled_")
        assert (family.kind == "counter") == family.name.endswith("_total"), family.name


def test_the_states_are_the_supervisors() -> None:
    assert tuple(s.value for s in State) == prometheus.STATES


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain", "plain"),
        ('say "hi"', 'say \\"hi\\"'),
        ("C:\\path", "C:\\\\path"),
        ("two\nlines", "two\\nlines"),
        ('\\"\n', '\\\\\\"\\n'),
    ],
)
def test_label_values_escape_backslash_quote_and_newline(raw: str, escaped: str) -> None:
    assert prometheus.escape_label(raw) == escaped


def test_odd_label_values_read_back_as_sent() -> None:
    odd = 'we"ird\\\nstate'
    text = prometheus.exposition([{"name": "work", "state": odd, "aborted": {odd: 1}}])
    samples = parse_prometheus(text)
    assert samples[("shuttled_state", (("profile", "work"), ("state", odd)))] == 1
    assert samples[("shuttled_connections_aborted_total", (("profile", "work"), ("kind", odd)))]
    assert samples[("shuttled_up", (("profile", "work"),))] == 0


def test_help_text_escapes_backslash_and_newline() -> None:
    assert prometheus.escape_help("a\\b\nc") == "a\\\\b\\nc"


def test_numbers_keep_their_value_and_odd_values_are_left_out() -> None:
    assert prometheus.number(3) == "3" and prometheus.number(0.1) == "0.1"
    assert prometheus.number(math.inf) == "+Inf" and prometheus.number(-math.inf) == "-Inf"
    assert prometheus.number(math.nan) == "NaN" and prometheus.number(1e-7) == "1e-07"
    assert prometheus.number(True) is None and prometheus.number("3") is None
    text = prometheus.exposition(
        [{"name": "work", "state": "up", "rx": True, "tx": "lots", "rtt": None, "dns": []}]  # type: ignore[typeddict-item]
    )
    assert parse_prometheus(text).keys() == {
        ("shuttled_up", (("profile", "work"),)),
        *(("shuttled_state", (("profile", "work"), ("state", s))) for s in prometheus.STATES),
    }


def test_no_profiles_give_an_empty_text() -> None:
    assert prometheus.exposition([]) == ""
