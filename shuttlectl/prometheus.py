"""`shuttlectl stats --prometheus`: every profile's counters in the Prometheus text format.

For node_exporter's textfile collector: a timer writes this to a `.prom` file (README,
"Metrics"). The format is the text exposition format 0.0.4: for each metric family one
`# HELP` and one `# TYPE` line, then its samples, every profile's together; label values
escape backslash, double quote and newline; counters end in `_total`, and values are in
base units (bytes, seconds).

Written here in a few dozen lines rather than with the official `prometheus_client`:
that package is a registry and an HTTP server we would not use, 5,300 lines in 650 KB
whose import takes ~60 ms (`python3 -X importtime -c 'import prometheus_client'`: 57-81
ms, +70 modules, +14 MB RSS), more than all of shuttlectl's own start (~45 ms), and
the README's timer runs shuttlectl every 15 s, with only the standard library. What we
need of the format is escaping and number syntax; the unit tests pin the text, and its
strictness was checked once with `promtool check metrics` and prometheus_client's parser.

Only what the daemon's types declare becomes a metric: a metric's name is an interface
that dashboards rely on, so a newer daemon's unknown counter waits for a release that
names it. A value that is not a number (an odd reply) is left out, never a traceback.
A profile that is down has no tunnel, so only its state: its counters start again from
zero when it next comes up, which Prometheus's rate() reads as a counter reset.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from shuttled.control.schema import ProfileStats

# supervisor.State's values (shuttlectl may not import the supervisor; a test pins them).
STATES = ("down", "connecting", "up", "reconnecting", "failed")
NAMESERVER_HEALTH = ("answering", "failing", "untried")

Labels = tuple[tuple[str, str], ...]  # besides profile, in order
Samples = Iterator[tuple[Labels, object]]


@dataclass(frozen=True)
class Family:
    """One metric family: its name, type, help, and how to read its samples from stats."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    samples: Callable[[ProfileStats], Samples]


def _at(stats: Mapping[str, object], *path: str) -> object:
    """stats[path[0]][path[1]]..., or None where a level is missing or not an object."""
    value: object = stats
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def field(*path: str) -> Callable[[ProfileStats], Samples]:
    """One sample: the number at `path` in a profile's stats."""

    def samples(stats: ProfileStats) -> Samples:
        yield (), _at(stats, *path)

    return samples


def by_key(label: str, *path: str) -> Callable[[ProfileStats], Samples]:
    """One sample per key of the object at `path`, the key as `label`."""

    def samples(stats: ProfileStats) -> Samples:
        value = _at(stats, *path)
        for key, count in sorted(value.items()) if isinstance(value, Mapping) else ():
            yield ((label, str(key)),), count

    return samples


def _state_set(label: str, known: Sequence[str], current: object) -> Samples:
    """1 for `current`, 0 for every other known value; an unknown current one too."""
    extra = [current] if isinstance(current, str) and current not in known else []
    for value in [*known, *extra]:
        yield ((label, value),), int(value == current)


def one_of(label: str, known: Sequence[str], *path: str) -> Callable[[ProfileStats], Samples]:
    """A state set: 1 for the value at `path`, 0 for every other known value."""

    def samples(stats: ProfileStats) -> Samples:
        yield from _state_set(label, known, _at(stats, *path))

    return samples


def each(label: str, keys: Sequence[str], *path: str) -> Callable[[ProfileStats], Samples]:
    """One sample per named key of the object at `path`, the key as `label`."""

    def samples(stats: ProfileStats) -> Samples:
        for key in keys:
            yield ((label, key),), _at(stats, *path, key)

    return samples


def _up(stats: ProfileStats) -> Samples:
    state = stats.get("state")
    yield (), int(state == "up") if isinstance(state, str) else None


def _mode(stats: ProfileStats) -> Samples:
    mode = stats.get("mode")
    if isinstance(mode, str):
        yield (("mode", mode),), 1


def _nameservers(stats: ProfileStats) -> Samples:
    rows = _at(stats, "dns", "nameservers")
    for row in rows if isinstance(rows, list) else ():
        if not isinstance(row, Mapping) or not isinstance(row.get("address"), str):
            continue
        # Not the transport as a label too: it changes (untried, then tcp or udp), and a
        # label that changes starts a new series.
        for labels, value in _state_set("health", NAMESERVER_HEALTH, row.get("health")):
            yield (("nameserver", row["address"]), *labels), value


def _dns_counter(key: str, what: str) -> Family:
    return Family(f"shuttled_dns_{key}_total", "counter", what, field("dns", key))


def _udp(key: str, kind: Literal["counter", "gauge"], name: str, what: str) -> Family:
    return Family(f"shuttled_udp_{name}", kind, what, field("udp", key))


FAMILIES: tuple[Family, ...] = (
    Family("shuttled_up", "gauge", "1 when the profile's tunnel is up, else 0.", _up),
    Family(
        "shuttled_state",
        "gauge",
        "The profile's state: 1 for the one it is in.",
        one_of("state", STATES, "state"),
    ),
    Family("shuttled_mode", "gauge", "Forwarding mode (direct or helper), while connected.", _mode),
    Family("shuttled_uptime_seconds", "gauge", "Seconds the tunnel has been up.", field("uptime")),
    Family(
        "shuttled_receive_bytes_total",
        "counter",
        "Bytes received from the remote on the tunnel's TCP connections.",
        field("rx"),
    ),
    Family(
        "shuttled_transmit_bytes_total",
        "counter",
        "Bytes sent to the remote on the tunnel's TCP connections.",
        field("tx"),
    ),
    Family("shuttled_connections_active", "gauge", "TCP connections open now.", field("active")),
    Family(
        "shuttled_connections_opened_total", "counter", "TCP connections taken.", field("total")
    ),
    Family(
        "shuttled_connections_failed_total",
        "counter",
        "TCP connections whose channel could not be opened.",
        field("failed"),
    ),
    Family(
        "shuttled_connections_aborted_total",
        "counter",
        "TCP connections ended by a local error, by kind.",
        by_key("kind", "aborted"),
    ),
    Family(
        "shuttled_limit_refused_total",
        "counter",
        "Connections refused by a limit.",
        field("refused"),
    ),
    Family(
        "shuttled_accept_paused_total",
        "counter",
        "Times a listener paused accepting for want of file descriptors.",
        field("deferred"),
    ),
    Family("shuttled_reconnects_total", "counter", "ssh reconnections.", field("reconnects")),
    Family(
        "shuttled_ssh_recycled_total",
        "counter",
        "Worn ssh sessions replaced.",
        field("recycled"),
    ),
    Family(
        "shuttled_ssh_streams", "gauge", "ssh connections carrying the tunnel.", field("streams")
    ),
    Family(
        "shuttled_health_rtt_seconds",
        "gauge",
        "Round trip of the latest health check through ssh.",
        field("rtt"),
    ),
    Family(
        "shuttled_ssh_tcp_rtt_seconds",
        "gauge",
        "The kernel's round-trip estimate of the ssh TCP connection.",
        field("tcp_rtt"),
    ),
    Family(
        "shuttled_ssh_tcp_retransmits_total",
        "counter",
        "Segments the kernel retransmitted on the ssh TCP connection.",
        field("tcp_retrans"),
    ),
    Family(
        "shuttled_ssh_cpu_seconds_total",
        "counter",
        "CPU time of the ssh process.",
        field("ssh_cpu"),
    ),
    Family(
        "shuttled_ssh_resident_memory_bytes",
        "gauge",
        "Resident memory of the ssh process.",
        field("ssh_rss"),
    ),
    _dns_counter("queries", "DNS queries taken."),
    _dns_counter("answered", "DNS queries answered (by a nameserver, the cache or hosts)."),
    _dns_counter("failed", "DNS queries failed here (SERVFAIL, FORMERR or REFUSED)."),
    _dns_counter("timeouts", "DNS queries with no reply in time."),
    _dns_counter("cache_hits", "DNS queries answered from the cache."),
    Family(
        "shuttled_dns_hosts_answers_total",
        "counter",
        "DNS queries answered from the remote's /etc/hosts.",
        field("dns", "hosts"),
    ),
    Family(
        "shuttled_dns_forwarded_total",
        "counter",
        "DNS queries sent on: through the tunnel, to the local resolver, to another profile.",
        each("to", ("tunnel", "local", "peer"), "dns"),
    ),
    Family(
        "shuttled_dns_nameserver_health",
        "gauge",
        "A remote nameserver's health after the latest query to it: 1 for the one it is in.",
        _nameservers,
    ),
    _udp("flows", "gauge", "flows", "UDP flows open now."),
    _udp("opened", "counter", "flows_opened_total", "UDP flows opened."),
    _udp("refused", "counter", "flows_refused_total", "UDP flows refused by a limit."),
    _udp("failed", "counter", "flows_failed_total", "UDP flows whose channel failed."),
    _udp("datagrams_up", "counter", "transmit_datagrams_total", "UDP datagrams sent on."),
    _udp("datagrams_down", "counter", "receive_datagrams_total", "UDP datagrams received."),
    _udp("bytes_up", "counter", "transmit_bytes_total", "UDP payload bytes sent on."),
    _udp("bytes_down", "counter", "receive_bytes_total", "UDP payload bytes received."),
    _udp("dropped", "counter", "dropped_datagrams_total", "UDP datagrams dropped."),
    Family(
        "shuttled_lan_dns_queries_total",
        "counter",
        "DNS queries from the LAN (router mode).",
        field("lan_dns", "queries"),
    ),
    Family(
        "shuttled_lan_dns_dropped_total",
        "counter",
        "DNS queries from the LAN dropped.",
        field("lan_dns", "dropped"),
    ),
)


def number(value: object) -> str | None:
    """A sample value as the format writes it; None for what is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)  # the shortest text that reads back as the same float


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(profile: str, extra: Labels) -> str:
    pairs = (("profile", profile), *extra)
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in pairs) + "}"


def family_lines(family: Family, profiles: Iterable[ProfileStats]) -> list[str]:
    """The family's HELP, TYPE and samples, every profile's; none when it has no sample."""
    samples = []
    for stats in profiles:
        name = stats.get("name")
        for labels, value in family.samples(stats) if isinstance(name, str) else ():
            text = number(value)
            if text is not None:
                samples.append(f"{family.name}{_labels(name, labels)} {text}")
    if not samples:
        return []
    return [
        f"# HELP {family.name} {escape_help(family.help)}",
        f"# TYPE {family.name} {family.kind}",
        *samples,
    ]


def rules_lines(profiles: Sequence[ProfileStats]) -> list[str]:
    """The firewall guard's count: the daemon's, not a profile's, so once and unlabelled."""
    restored = next(
        (number(s.get("rules_restored")) for s in profiles if "rules_restored" in s), None
    )
    if restored is None:
        return []
    name = "shuttled_firewall_rules_restored_total"
    return [
        f"# HELP {name} Times someone else's change to shuttled's rules was undone.",
        f"# TYPE {name} counter",
        f"{name} {restored}",
    ]


def exposition(profiles: Sequence[ProfileStats]) -> str:
    """The whole text, families in FAMILIES order, ending in a newline (or empty)."""
    lines = [line for family in FAMILIES for line in family_lines(family, profiles)]
    lines += rules_lines(profiles)
    return "".join(line + "\n" for line in lines)
