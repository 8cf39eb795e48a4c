"""Human rendering of daemon replies: units, durations, tables, health lines.

Every function takes a result of the type shuttled.control.schema declares for
it, which the client checked (schema.check) before. The value helpers still cope
with odd values (a field of a newer daemon, shown as it is): a reply never turns
into a traceback.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TypeGuard

from shuttled.control.schema import (
    ConnectionRow,
    ConnectStats,
    Event,
    OtherEvent,
    ProfileRow,
    ProfileStats,
    ProfileStatus,
    ReloadResult,
    StateEvent,
    VersionInfo,
)
from shuttled.control.tables import NONE, connect_mode, doctor, table, text

__all__ = ["NONE", "doctor", "table", "text"]  # shuttlectl's renderings, shared with shuttled

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
ERROR_WIDTH = 60  # last error in the status table; the health lines have it whole


def size(value: object) -> str:
    """Bytes with IEC units: 512 B, 1.5 KiB, 12.3 MiB."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return NONE
    amount, unit = float(value), 0
    while amount >= 1024 and unit < len(_UNITS) - 1:
        amount, unit = amount / 1024, unit + 1
    return f"{int(amount)} B" if unit == 0 else f"{amount:.1f} {_UNITS[unit]}"


def duration(value: object) -> str:
    """Seconds as the two largest units: 45s, 12m03s, 2h03m, 3d04h."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return NONE
    seconds = int(value)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def milliseconds(value: object) -> str:
    """A round-trip time given in seconds, in ms."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return NONE
    return f"{value * 1000:.1f} ms" if value < 0.01 else f"{value * 1000:.0f} ms"


# --- list and status --------------------------------------------------------------------------


def yes_no(value: object) -> str:
    return "yes" if value is True else "no" if value is False else NONE


def profiles_table(profiles: Sequence[ProfileRow]) -> str:
    rows = [
        [
            text(p.get("name")),
            text(p.get("state")),
            text(p.get("remote")),
            yes_no(p.get("autostart")),
            yes_no(p.get("wanted")),
        ]
        for p in profiles
    ]
    return table(["PROFILE", "STATE", "REMOTE", "AUTOSTART", "WANTED"], rows)


def status_table(profiles: Sequence[ProfileStatus]) -> str:
    rows = []
    for p in profiles:
        up = p.get("state") == "up"
        rows.append(
            [
                text(p.get("name")),
                text(p.get("state")),
                text(p.get("remote")),
                duration(p.get("uptime")) if up else NONE,
                size(p.get("rx")),
                size(p.get("tx")),
                text(p.get("connections")),
                text(p.get("last_error"), ERROR_WIDTH),
            ]
        )
    return table(["PROFILE", "STATE", "REMOTE", "UPTIME", "RX", "TX", "CONNS", "LAST ERROR"], rows)


def expected_up(profile: ProfileStatus) -> bool:
    """Should this profile be up: someone asked for it, or it starts with the daemon."""
    return profile.get("wanted") is True


def health(profiles: Sequence[ProfileStatus]) -> list[str]:
    """Problems worth a line after the table, like `tailscale status`."""
    lines = []
    for p in profiles:
        name, state, error = text(p.get("name")), p.get("state"), p.get("last_error")
        if state in ("failed", "invalid"):
            lines.append(f"{name}: {state}: {text(error)}")
        elif state == "reconnecting":
            lines.append(f"{name}: reconnecting" + (f" after: {text(error)}" if error else ""))
        elif state == "down" and expected_up(p):
            lines.append(f"{name}: should be up but is down")
        elif len(text(error)) > ERROR_WIDTH:  # cut in the table: whole here
            lines.append(f"{name}: last error: {text(error)}")
        if p.get("holding"):
            lines.append(f"{name}: kill switch on: its traffic is dropped until it is up")
        lines += [f"{name}: {text(h)}" for h in p.get("health") or [] if isinstance(h, str)]
    return lines


def health_block(lines: Sequence[str]) -> str:
    return "\n".join(["", "# Health check:", *(f"#     - {line}" for line in lines)])


def subnets(profile: ProfileStatus) -> str:
    items = []
    rows = profile.get("subnets")
    for s in rows if isinstance(rows, list) else []:
        source = s.get("source")
        items.append(text(s.get("subnet")) + (f" ({source})" if source else ""))
    return ", ".join(items) or NONE


def status_detail(profile: ProfileStatus) -> str:
    """What a single-profile status adds below its table row."""
    pairs = [
        ("mode", text(profile.get("mode"))),
        ("connect", text(profile.get("connect"))),
        ("subnets", subnets(profile)),
        ("health check", milliseconds(profile.get("rtt")).replace(NONE, "none yet")),
    ]
    if isinstance(since := profile.get("since"), int | float):
        pairs.insert(1, ("since", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))))
    return "\n".join(f"  {label}: {value}" for label, value in pairs)


# --- stats, connections, reload, events ------------------------------------------------------

_STATS_DONE = {
    "name",
    "state",
    "mode",
    "rx",
    "tx",
    "active",
    "total",
    "failed",
    "reconnects",
    "uptime",
    "rtt",
    "ssh_pid",
    "ssh_cpu",
    "ssh_rss",
    "aborted",
    "tcp_rtt",
    "tcp_retrans",
    "connect",
}


def _count(value: object) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else NONE


def _health_check(rtt: object) -> str:
    took = milliseconds(rtt)
    return "  no health check yet" if took == NONE else f"  latest health check: {took} round trip"


def stats(name: str, s: ProfileStats) -> str:
    """`wg show`-like: one heading, then indented `label: value` lines."""
    mode = s.get("mode")
    state = text(s.get("state")) + (f" ({mode})" if mode else "")
    lines = [f"profile: {name}"]
    if "state" in s:
        lines.append(f"  state: {state}")
    lines += [
        f"  uptime: {duration(s.get('uptime'))}",
        f"  transfer: {size(s.get('rx'))} received, {size(s.get('tx'))} sent",
        f"  connections: {_count(s.get('active'))} active, {_count(s.get('total'))} total, "
        f"{_count(s.get('failed'))} failed",
        *([f"  aborted by a local error: {_any(s.get('aborted'))}"] if "aborted" in s else []),
        f"  reconnects: {_count(s.get('reconnects'))}",
        _health_check(s.get("rtt")),
        *(
            [
                f"  ssh connection (kernel): {milliseconds(s.get('tcp_rtt'))} round trip, "
                f"{_count(s.get('tcp_retrans'))} retransmitted"
            ]
            if "tcp_rtt" in s
            else []
        ),
        f"  ssh: {_ssh_process(s)}",
        *([_connect(connect)] if (connect := s.get("connect")) else []),
    ]
    for key, value in s.items():
        if key == "dns" and isinstance(value, Mapping):
            lines += _dns(value)
        elif key not in _STATS_DONE:
            lines.append(f"  {key.replace('_', ' ')}: {_any(value)}")
    return "\n".join(lines)


def _connect(c: ConnectStats) -> str:
    """How connect() answers, and how the opens it waited for ended."""
    counts = ", ".join(
        f"{_count(c.get(key))} {key.replace('_', ' ')}"
        for key in ("pending", "refused", "unreachable", "timed_out", "abandoned", "passed")
    )
    return f"  connect: {connect_mode(c)}; {counts}"


def _dns(dns: Mapping[str, object]) -> list[str]:
    """The DNS counters on one line, then a line a nameserver: transport and health."""
    rows = dns.get("nameservers")
    counters = {k: v for k, v in dns.items() if k != "nameservers"}
    lines = [f"  dns: {_any(counters)}"]
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, Mapping):
            continue
        error = row.get("error")
        lines.append(
            f"  nameserver {text(row.get('address'))}: {text(row.get('transport'))}, "
            f"{text(row.get('health'))}" + (f": {text(error)}" if error else "")
        )
    return lines


def _ssh_process(s: ProfileStats) -> str:
    """The ssh child: pid, CPU time used so far (seconds), resident memory."""
    cpu = s.get("ssh_cpu")
    cpu_text = (
        f"{cpu:.2f} s" if isinstance(cpu, int | float) and not isinstance(cpu, bool) else NONE
    )
    pid = s.get("ssh_pid")
    return (f"pid {_count(pid)}, " if pid is not None else "") + (
        f"{cpu_text} cpu, {size(s.get('ssh_rss'))} rss"
    )


def _any(value: object) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k.replace('_', ' ')} {_any(v)}" for k, v in value.items()) or NONE
    if isinstance(value, list):
        return ", ".join(_any(v) for v in value) or NONE
    return text(value)


def daemon_version(v: VersionInfo) -> str:
    """`shuttled 0.1.0 (protocol 1, nft, up 2h03m)`: the extras only when sent."""
    extras = [f"protocol {text(v.get('protocol'))}"]
    if firewall := v.get("firewall"):
        extras.append(text(firewall))
    if isinstance(uptime := v.get("uptime"), int | float):
        extras.append(f"up {duration(uptime)}")
    return f"shuttled {text(v.get('version'))} ({', '.join(extras)})"


def connections_table(conns: Sequence[ConnectionRow]) -> str:
    rows = [
        [
            text(c.get("proto")),
            text(c.get("src")),
            text(c.get("dst")),
            size(c.get("rx")),
            size(c.get("tx")),
            duration(c.get("age")),
            text(c.get("state")),
        ]
        for c in conns
    ]
    return table(["PROTO", "SOURCE", "DESTINATION", "RX", "TX", "AGE", "STATE"], rows)


def reload_summary(result: ReloadResult) -> str:
    lines = []
    for key in ("added", "removed", "changed", "unchanged"):
        names = result.get(key)
        if isinstance(names, list) and names:
            lines.append(f"{key}: {', '.join(text(n) for n in names)}")
    if not any(result.get(k) for k in ("added", "removed", "changed")):
        lines.insert(0, "configuration reloaded: no changes")
    else:
        lines.insert(0, "configuration reloaded")
    return "\n".join(lines)


def _is_state(e: Event | OtherEvent) -> TypeGuard[StateEvent]:
    return e.get("type") == "state"


def event(e: Event | OtherEvent, now: float | None = None) -> str:
    """One line per event: time (the event's own, else now), profile, what happened."""
    when = e.get("time")
    if isinstance(when, bool) or not isinstance(when, int | float):
        when = now if now is not None else time.time()
    stamp = time.strftime("%H:%M:%S", time.localtime(when))
    if _is_state(e):
        line = f"{stamp} {text(e.get('profile'))}: {text(e.get('state'))}"
        return line + (f" ({text(e.get('error'))})" if e.get("error") else "")
    rest = " ".join(f"{k}={text(v)}" for k, v in e.items() if k not in ("type", "profile", "time"))
    who = f" {text(e.get('profile'))}:" if "profile" in e else ""
    return f"{stamp}{who} {text(e.get('type'))} {rest}".rstrip()
