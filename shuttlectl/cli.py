"""The shuttlectl command line: one table of commands; argparse and completion come from it.

A thin client: it imports only the protocol and schema modules, const and errors of the
daemon's package, and every rendering copes with what an older or newer
daemon may send.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from shuttlectl import prometheus, render
from shuttlectl.client import Client
from shuttled import __version__, const
from shuttled.const import ExitCode
from shuttled.control.protocol import (
    DEFAULT_UP_TIMEOUT,
    JSON_SCHEMA,
    MAX_UP_TIMEOUT,
    PROTOCOL_VERSION,
)
from shuttled.control.schema import (
    ClientVersion,
    ConnectionRow,
    DoctorReport,
    Document,
    ProfileRow,
    ProfileStats,
    ProfileStatus,
    ReloadResult,
    VersionInfo,
    check,
)
from shuttled.errors import NoSuchProfileError, NotRunningError, UsageError

T = TypeVar("T")

PROG = "shuttlectl"
SOCKET_ENV = "SHUTTLECTL_SOCKET"
# The daemon gives up on `up --wait` after --timeout; we wait a little longer for its reply.
REPLY_GRACE = 10.0
# doctor's ssh may take the master's whole start time, then the helper's.
DOCTOR_TIMEOUT = 180.0


class _Parser(argparse.ArgumentParser):
    """argparse, but bad arguments become a UsageError: one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {PROG} --help)")


@dataclass
class Context:
    """What a command needs: its arguments, a client, and the output mode."""

    args: argparse.Namespace

    @property
    def client(self) -> Client:
        return Client(self.args.socket)

    def call(
        self,
        result: type[T],
        verb: str,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> T:
        """The verb's result, checked to be of the type the schema gives it."""
        return check(result, self.client.call(verb, args, timeout=timeout), verb)

    def emit(self, human: str, document: Document) -> None:
        """Print the human text, or with --json the document with its schema version."""
        if self.args.json:
            print_json(document)
        elif human:
            print(human)


def print_json(document: Document, *, compact: bool = False) -> None:
    body = {"schema": JSON_SCHEMA, **document}
    print(
        json.dumps(body, separators=(",", ":")) if compact else json.dumps(body, indent=2),
        flush=True,
    )


# --- commands -------------------------------------------------------------------------------


def _list(ctx: Context) -> int:
    profiles = ctx.call(list[ProfileRow], "list")
    if ctx.args.names:  # for shell completion: names only, whatever --json says
        for p in profiles:
            print(render.text(p.get("name")))
        return ExitCode.OK
    human = render.profiles_table(profiles) if profiles else "no profiles configured"
    ctx.emit(human, {"profiles": profiles})
    return ExitCode.OK


def _status(ctx: Context) -> int:
    name = ctx.args.profile
    profiles = (
        [ctx.call(ProfileStatus, "status", {"profile": name})]
        if name
        else ctx.call(list[ProfileStatus], "status")
    )
    human = render.status_table(profiles) if profiles else "no profiles configured"
    if name and profiles:
        human += "\n" + render.status_detail(profiles[0])
    problems = render.health(profiles)
    if problems:
        human += "\n" + render.health_block(problems)
    ctx.emit(
        human, {"profile": profiles[0] if profiles else None} if name else {"profiles": profiles}
    )
    # Like `tailscale status`: scripts can ask "is it up?" with the exit code alone.
    not_up = [p for p in profiles if p.get("state") != "up" and (name or render.expected_up(p))]
    return ExitCode.NOT_UP if not_up else ExitCode.OK


def _up(ctx: Context) -> int:
    a = ctx.args
    result = ctx.call(
        ProfileStatus,
        "up",
        {"profile": a.profile, "wait": a.wait, "timeout": a.timeout},
        timeout=(a.timeout + REPLY_GRACE) if a.wait else None,
    )
    state = result.get("state") or ("up" if a.wait else "connecting")
    ctx.emit(f"{a.profile}: {render.text(state)}", {"profile": result})
    return ExitCode.NOT_UP if a.wait and state != "up" else ExitCode.OK


def _down(ctx: Context) -> int:
    result = ctx.call(ProfileStatus, "down", {"profile": ctx.args.profile})
    ctx.emit(
        f"{ctx.args.profile}: {render.text(result.get('state') or 'down')}", {"profile": result}
    )
    return ExitCode.OK


def _stats(ctx: Context) -> int:
    name = ctx.args.profile
    if ctx.args.prometheus:
        return _stats_prometheus(ctx)
    if name is None:
        raise UsageError("stats: which PROFILE? (every profile's only with --prometheus)")
    result = ctx.call(ProfileStats, "stats", {"profile": name})
    ctx.emit(render.stats(name, result), {"profile": name, "stats": result})
    return ExitCode.OK


def _stats_prometheus(ctx: Context) -> int:
    """Every profile's counters (or PROFILE's) for node_exporter, written in one go."""
    if ctx.args.json:
        raise UsageError("stats: --json and --prometheus do not go together")
    names = (
        [ctx.args.profile]
        if ctx.args.profile
        else [p["name"] for p in ctx.call(list[ProfileRow], "list")]
    )
    stats = []
    for name in names:
        try:
            stats.append(ctx.call(ProfileStats, "stats", {"profile": name}))
        except NoSuchProfileError:
            if ctx.args.profile:
                raise  # asked for by name; else removed by a reload since `list`
    sys.stdout.write(prometheus.exposition(stats))
    return ExitCode.OK


def _connections(ctx: Context) -> int:
    name = ctx.args.profile
    conns = ctx.call(list[ConnectionRow], "connections", {"profile": name})
    human = render.connections_table(conns) if conns else f"{name}: no live connections"
    ctx.emit(human, {"profile": name, "connections": conns})
    return ExitCode.OK


def _reload(ctx: Context) -> int:
    result = ctx.call(ReloadResult, "reload")
    ctx.emit(render.reload_summary(result), {"reload": result})
    return ExitCode.OK


def _doctor(ctx: Context) -> int:
    name = ctx.args.profile
    report = ctx.call(DoctorReport, "doctor", {"profile": name}, timeout=DOCTOR_TIMEOUT)
    ctx.emit(render.doctor(report), {"doctor": report})
    return ExitCode.OK if report.get("ok") else ExitCode.FAILED


def _watch(ctx: Context) -> int:
    try:
        for event in ctx.client.watch():
            if ctx.args.json:
                print_json({"event": event}, compact=True)
            else:
                print(render.event(event), flush=True)
    except KeyboardInterrupt:
        pass
    return ExitCode.OK


def _version(ctx: Context) -> int:
    client = ClientVersion(version=__version__, protocol=PROTOCOL_VERSION)
    try:
        daemon = ctx.call(VersionInfo, "version")
    except NotRunningError:
        if not ctx.args.json:
            print(f"{PROG} {__version__} (protocol {PROTOCOL_VERSION})")
        raise
    human = f"{PROG} {__version__} (protocol {PROTOCOL_VERSION})\n{render.daemon_version(daemon)}"
    ctx.emit(human, {"client": client, "daemon": daemon})
    return ExitCode.OK


def _completion(ctx: Context) -> int:
    from shuttlectl.completion import script

    sys.stdout.write(script(ctx.args.shell, build_parser()))
    return ExitCode.OK


# --- the table -------------------------------------------------------------------------------

ProfileArg = Literal["none", "optional", "required"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[Context], int]
    profile: ProfileArg = "none"
    options: Callable[[argparse.ArgumentParser], None] | None = None


def _list_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--names", action="store_true", help="profile names only, one a line")


def _up_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait until the profile is up (default) or return at once",
    )
    p.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_UP_TIMEOUT,
        metavar="SECONDS",
        help=f"give up waiting after this long (default {DEFAULT_UP_TIMEOUT:g})",
    )


def _stats_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prometheus",
        action="store_true",
        help="in the Prometheus text format, for node_exporter's textfile collector; "
        "every profile's without PROFILE",
    )


def _completion_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", choices=("bash", "zsh"), help="shell to complete for")


def _timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 <= seconds <= MAX_UP_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be within 0-{MAX_UP_TIMEOUT:g} seconds")
    return seconds


COMMANDS: Mapping[str, Command] = {
    c.name: c
    for c in (
        Command("list", "profiles and their states", _list, options=_list_options),
        Command("status", "state, traffic and health; exits 7 when not up", _status, "optional"),
        Command("up", "bring a profile up (idempotent)", _up, "required", _up_options),
        Command("down", "take a profile down (idempotent)", _down, "required"),
        Command(
            "stats", "counters of a profile, like `wg show`", _stats, "optional", _stats_options
        ),
        Command("connections", "live connections of a profile", _connections, "required"),
        Command("reload", "re-read the configuration (root or group shuttle)", _reload),
        Command(
            "doctor",
            "check a profile's remote (ssh, forwarding, DNS, ...); exits 1 when one fails",
            _doctor,
            "required",
        ),
        Command("watch", "print state changes as they happen", _watch),
        Command("version", "client and daemon versions", _version),
        Command(
            "completion",
            "print a shell completion script",
            _completion,
            options=_completion_options,
        ),
    )
}
OFFLINE = frozenset({"completion"})  # commands that never talk to the daemon


def _common(defaults: bool) -> _Parser:
    """--socket and --json, accepted before and after the verb."""
    p = _Parser(add_help=False)
    socket_default = Path(os.environ.get(SOCKET_ENV) or const.CONTROL_SOCKET)
    p.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        default=socket_default if defaults else argparse.SUPPRESS,
        help=f"control socket (default {const.CONTROL_SOCKET}, or ${SOCKET_ENV})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help=f'machine-readable output ({{"schema": {JSON_SCHEMA}, ...}})',
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        parents=[_common(True)],
        description="Control the shuttled VPN-over-ssh daemon.",
        epilog=_EXIT_CODES,
    )
    sub = parser.add_subparsers(dest="command", metavar="VERB", required=True, parser_class=_Parser)
    for command in COMMANDS.values():
        p = sub.add_parser(
            command.name, help=command.help, description=command.help, parents=[_common(False)]
        )
        if command.profile != "none":
            p.add_argument(
                "profile", metavar="PROFILE", nargs="?" if command.profile == "optional" else None
            )
        if command.options is not None:
            command.options(p)
    return parser


_EXIT_CODES = (
    "exit codes: 0 ok, 1 failed, 2 usage, 3 daemon not running, "
    "4 no such profile, 5 permission denied, 6 timeout, 7 not up (status, up)"
)


def run(args: argparse.Namespace) -> int:
    return COMMANDS[args.command].run(Context(args))
