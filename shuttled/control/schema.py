"""What every verb answers, as types: the half of the protocol that says what results hold.

The daemon builds its results as these types, the D-Bus export and the Unix socket send
them as they are, and `shuttlectl` checks each reply against them (`check`) before it
renders it or prints it with --json. `json_reference()` writes the README's table of
the --json documents from the same types, so the documentation cannot drift either.

TypedDicts rather than dataclasses with `to_json`: the wire format *is* a JSON object
with these keys (nulls and optional keys included), and a TypedDict is exactly that at
run time, a plain dict. Both transports and `shuttlectl --json` pass results on
untouched, so nothing converts, and no field can be renamed on one side only: mypy
checks the producers' literals and every key the renderer reads. Dataclasses would need
a to_json and a from_json a type, written by hand and able to disagree.

Compatibility: keys a newer daemon adds pass the check (the renderer shows what it does
not know, and --json keeps it); a missing or mistyped declared key is a ProtocolError.
A key added to a result later must be NotRequired, or older daemons fail the check.

Only the standard library and shuttled.errors: the CLI imports this, and so may any
producer in the daemon (it is a leaf). Deliberately no `from __future__ import
annotations`: TypedDict must see NotRequired at class creation.
"""

import sys
import types
from collections.abc import Iterable, Mapping
from typing import (
    Literal,
    NotRequired,
    TypedDict,
    TypeVar,
    Union,
    cast,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

from shuttled.errors import ProtocolError

T = TypeVar("T")


# --- results of the verbs ---------------------------------------------------------------------

# What `state` says of a profile: the supervisor's states, and INVALID for a profile the
# daemon did not load because its file has errors (last_error says which, file:line).
INVALID = "invalid"
PROFILE_STATES = ("down", "connecting", "up", "reconnecting", "failed", INVALID)


class ProfileRow(TypedDict):
    """One row of `list`."""

    name: str
    state: str  # one of PROFILE_STATES
    remote: str
    autostart: bool
    wanted: bool  # someone asked for it up (or it starts with the daemon)


class SubnetRow(TypedDict):
    subnet: str  # "!10.0.5.0/24" for an exclude
    source: str  # profile or auto_nets


class NameserverRow(TypedDict):
    """One of the remote's nameservers, as this ssh session knows it."""

    address: str  # "10.0.0.2", or "10.0.0.2@5353" off port 53
    transport: str  # tcp or udp (through the remote helper) once one answered; untried
    health: str  # answering or failing (after the latest query to it), or untried
    error: str | None  # why the latest query failed, in one line


class DnsStatus(TypedDict):
    mode: str  # all or split
    path: str | None  # firewall or resolved, once started
    domains: list[str]  # what goes through the tunnel (names and reverse zones)
    link: NotRequired[str]  # path resolved: our link and the server on it
    server: NotRequired[str]
    resolvers: NotRequired[list[str] | Literal["all"]]  # path firewall: what is caught
    nameservers: NotRequired[list[NameserverRow]]  # the remote's, once started


class ProfileStatus(TypedDict):
    """`status` (one row a profile), and what `up` and `down` answer."""

    name: str
    state: str
    remote: str
    wanted: bool
    mode: str | None  # direct or helper, while connected
    # When connect() returns: "remote" (after the remote answered), or
    # "fast (why)"; None while the profile has no tunnel.
    connect: str | None
    since: float | None  # epoch seconds of the last state change
    uptime: float  # seconds up; 0 when not up
    rx: int
    tx: int
    connections: int
    rtt: float | None  # the latest health check's round trip, seconds
    last_error: str | None
    subnets: list[SubnetRow]
    dns: DnsStatus | None
    holding: bool  # the kill switch rejects the profile's traffic
    health: list[str]  # problems worth a line after the table


class DnsCounters(TypedDict):
    """The forwarder's counters (dns.forwarder.DnsStats, field for field)."""

    queries: int
    answered: int
    failed: int
    timeouts: int
    cache_hits: int
    hosts: int
    tunnel: int
    local: int
    peer: int


class DnsStats(DnsCounters):
    mode: str
    path: str
    nameservers: NotRequired[list[NameserverRow]]  # the remote's: transport and health


class UdpCounters(TypedDict):
    """UDP flows (tunnel.udp.UdpStats, field for field)."""

    flows: int
    opened: int
    refused: int
    failed: int
    datagrams_up: int
    datagrams_down: int
    bytes_up: int
    bytes_down: int
    dropped: int


class LanDnsCounters(TypedDict):
    queries: int
    dropped: int


# The parts of `stats` that one producer each gives (all of them only while connected).


class LimitStats(TypedDict, total=False):
    refused: int  # connections refused by a limit
    deferred: int  # listener pauses at EMFILE


class StreamStats(TypedDict, total=False):
    streams: int  # ssh connections carrying the tunnel
    stream_channels: list[int]  # with several: the app connections each carries


class LinkStats(TypedDict, total=False):
    tcp_rtt: float  # the kernel's view of the first ssh connection, seconds
    tcp_retrans: int


class ProcessStats(TypedDict, total=False):
    ssh_pid: int | None
    ssh_cpu: float | None  # seconds
    ssh_rss: int | None  # bytes


class RouterStats(TypedDict, total=False):
    udp: UdpCounters  # router mode with UDP
    lan_dns: LanDnsCounters  # router mode answering the LAN's DNS


class ConnectStats(TypedDict):
    """True connect(): whether connect() waits for the remote, and how opens ended."""

    mode: str  # "remote" (the SYN waits for the remote's answer) or "fast"
    why: str | None  # why "fast" when "remote" was asked for
    pending: int  # SYNs held now, and opened channels waiting for their accept
    refused: int  # the app got ECONNREFUSED (refused, prohibited, over a limit)
    unreachable: int  # the app got EHOSTUNREACH / ENETUNREACH
    timed_out: int  # the SYN was dropped: the app's own connect timeout applies
    abandoned: int  # channels opened for SYNs that never became connections
    retransmits: int  # SYN copies dropped while the first one was held
    passed: int  # connected at accept with no held SYN (queue full, unreadable)


class TunnelStats(LimitStats, StreamStats, LinkStats, ProcessStats, RouterStats, total=False):
    """What a profile's tunnel counts (supervisor.Tunnel.stats): all of it, or none."""

    tx: int
    rx: int
    active: int
    total: int
    failed: int
    reconnects: int
    recycled: int  # worn ssh sessions replaced
    aborted: dict[str, int]  # by kind: connections ended by a local error
    uptime: float
    rtt: float | None
    mode: str | None
    connect: ConnectStats
    dns: DnsStats  # when the profile does DNS


class RulesStats(TypedDict, total=False):
    rules_restored: int  # times someone else's change to our rules was undone
    rules_last_loss: str | None


class ProfileStats(TunnelStats, RulesStats):
    """`stats`: name and state always; the rest while the profile has a tunnel."""

    name: str
    state: str


class ConnectionRow(TypedDict):
    """One TCP connection or UDP flow of `connections`."""

    proto: Literal["tcp", "udp"]
    src: str
    dst: str  # a UDP flow: every destination it sent to, or "-"
    tx: int
    rx: int
    age: float  # seconds
    state: Literal["open", "opening"]  # opening: its SYN waits for the remote


class ReloadResult(TypedDict):
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]


class VersionInfo(TypedDict):
    version: str
    protocol: int
    firewall: str | None  # the firewall backend in use
    uptime: float  # seconds the daemon has run


class CheckRow(TypedDict):
    """One check of `doctor`."""

    check: str  # ssh, host key, forwarding, python, dns tcp ADDRESS, routes, hosts, ...
    status: str  # ok, warn (failed, not needed by this profile), fail, or skip
    result: str
    fix: str | None  # one line, for warn and fail


class DoctorReport(TypedDict):
    """`doctor`: the remote checked as the profile would use it, nothing captured."""

    profile: str
    remote: str
    ok: bool  # no needed check failed
    checks: list[CheckRow]


class StateEvent(TypedDict):
    type: Literal["state"]
    profile: str
    state: str
    error: str | None
    time: float


class RulesEvent(TypedDict):
    """Someone else changed our firewall rules, and we put them back."""

    type: Literal["rules"]
    lost: str
    restored: int
    time: float


Event = StateEvent | RulesEvent  # what `watch` streams


class OtherEvent(TypedDict):
    """An event of a type this client does not know (a newer daemon): shown as it is."""

    type: str
    profile: NotRequired[str]
    time: NotRequired[float]


# What a non-streaming verb answers.
Result = (
    list[ProfileRow]
    | ProfileStatus
    | list[ProfileStatus]
    | ProfileStats
    | list[ConnectionRow]
    | ReloadResult
    | VersionInfo
    | DoctorReport
)


class Streaming(TypedDict):
    """The first reply to a streaming verb; its events follow."""

    streaming: str  # the verb


class ErrorBody(TypedDict):
    code: str  # the `code` of the class in shuttled.errors
    message: str


# --- what `shuttlectl --json` prints ({"schema": N, ...} and one of these) ----------------------


class ListDocument(TypedDict):
    profiles: list[ProfileRow]


class StatusDocument(TypedDict):
    profile: NotRequired[ProfileStatus | None]  # status PROFILE
    profiles: NotRequired[list[ProfileStatus]]  # status


class ProfileDocument(TypedDict):
    profile: ProfileStatus


class StatsDocument(TypedDict):
    profile: str
    stats: ProfileStats


class ConnectionsDocument(TypedDict):
    profile: str
    connections: list[ConnectionRow]


class ReloadDocument(TypedDict):
    reload: ReloadResult


class DoctorDocument(TypedDict):
    doctor: DoctorReport


class WatchDocument(TypedDict):
    event: Event | OtherEvent


class ClientVersion(TypedDict):
    version: str
    protocol: int


class VersionDocument(TypedDict):
    client: ClientVersion
    daemon: VersionInfo


class ErrorDocument(TypedDict):
    error: ErrorBody


Document = (
    ListDocument
    | StatusDocument
    | ProfileDocument
    | StatsDocument
    | ConnectionsDocument
    | ReloadDocument
    | DoctorDocument
    | WatchDocument
    | VersionDocument
    | ErrorDocument
)

# Verb (or case) -> its --json document, in the order the README lists them.
DOCUMENTS: Mapping[str, type] = {
    "list": ListDocument,
    "status": StatusDocument,
    "up, down": ProfileDocument,
    "stats": StatsDocument,
    "connections": ConnectionsDocument,
    "reload": ReloadDocument,
    "doctor, `shuttled run --check --json`": DoctorDocument,
    "watch (one line each)": WatchDocument,
    "version": VersionDocument,
    "any error": ErrorDocument,
}


# --- checking a reply ---------------------------------------------------------------------------


def check(tp: type[T], value: object, what: str) -> T:
    """`value` (parsed JSON) as `tp`, or a ProtocolError naming the first field that is not."""
    problem = problem_with(tp, value, what)
    if problem is not None:
        raise ProtocolError(f"malformed reply from the daemon: {problem}")
    return cast(T, value)  # checked against tp just above


def problem_with(hint: object, value: object, where: str) -> str | None:
    """What in `value` does not match the type `hint`; None when all does."""
    if is_typeddict(hint):
        return _typeddict_problem(hint, value, where)
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if any(problem_with(a, value, where) is None for a in args):
            return None
        return f"{where} is {_kind(value)}, not {describe(hint)}"
    if origin is list:
        if not isinstance(value, list):
            return f"{where} is {_kind(value)}, not a list"
        return _first(problem_with(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            return f"{where} is {_kind(value)}, not an object"
        return _first(problem_with(args[1], v, f"{where}.{k}") for k, v in value.items())
    return None if _scalar_fits(hint, value) else f"{where} is {_kind(value)}, not {describe(hint)}"


def _typeddict_problem(hint: object, value: object, where: str) -> str | None:
    if not isinstance(value, dict):
        return f"{where} is {_kind(value)}, not an object"
    missing = sorted(k for k in getattr(hint, "__required_keys__", ()) if k not in value)
    if missing:
        return f"{where} has no {missing[0]!r}"
    fields = get_type_hints(hint)
    return _first(
        problem_with(fields[k], v, f"{where}.{k}") for k, v in value.items() if k in fields
    )


def _scalar_fits(hint: object, value: object) -> bool:
    if get_origin(hint) is Literal:
        return any(type(value) is type(a) and value == a for a in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON has one kind of number: 2 is a fine float
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(hint, type) and isinstance(value, hint)


def _first(problems: Iterable[str | None]) -> str | None:
    return next((p for p in problems if p is not None), None)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    kinds: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}
    return kinds.get(type(value), "a number")


def check_event(value: object) -> Event | OtherEvent:
    """An event as its type says; one of a type we do not know only needs a `type`."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "state":
        return check(StateEvent, value, "event")
    if kind == "rules":
        return check(RulesEvent, value, "event")
    return check(OtherEvent, value, "event")


# --- documentation -----------------------------------------------------------------------------


def describe(hint: object) -> str:
    """A type as the README says it: `string or null`, `list of ProfileRow`."""
    if is_typeddict(hint):
        return getattr(hint, "__name__", "object")
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is list:
        return f"list of {describe(args[0])}"
    if origin is dict:
        return f"object of {describe(args[1])}"
    if origin is Literal:
        return " or ".join(f'"{a}"' for a in args)
    names: dict[object, str] = {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        type(None): "null",
    }
    return names.get(hint, str(hint))


def fields_line(td: type) -> str:
    """`name` string, `wanted` boolean, ...; the keys always there first, the others
    marked with a ?."""
    required: frozenset[str] = getattr(td, "__required_keys__", frozenset())
    hints = sorted(get_type_hints(td).items(), key=lambda item: item[0] not in required)
    return ", ".join(
        f"`{key}{'' if key in required else '?'}` {describe(hint)}" for key, hint in hints
    )


def _referenced(td: type, seen: dict[str, type]) -> None:
    """Every TypedDict reachable from td's fields, in the order first met."""
    for hint in get_type_hints(td).values():
        for inner in _leaves(hint):
            if isinstance(inner, type) and is_typeddict(inner) and inner.__name__ not in seen:
                seen[inner.__name__] = inner
                _referenced(inner, seen)


def _leaves(hint: object) -> list[object]:
    args = get_args(hint)
    return [leaf for a in args for leaf in _leaves(a)] if args else [hint]


def json_reference() -> str:
    """The README's reference of `shuttlectl --json` (python3 -m shuttled.control.schema)."""
    lines = ["| verb | document (besides `schema`) |", "|---|---|"]
    types_: dict[str, type] = {}
    for verb, doc in DOCUMENTS.items():
        lines.append(f"| {verb} | {fields_line(doc)} |")
        _referenced(doc, types_)
    lines += ["", "| type | fields (`?`: only sometimes there) |", "|---|---|"]
    lines += [f"| {name} | {fields_line(td)} |" for name, td in types_.items()]
    lines += ["", f"A profile's `state` is one of: {', '.join(PROFILE_STATES)}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(json_reference() + "\n")
