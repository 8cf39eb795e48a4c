"""Every control verb, declared once; every transport is generated from this table.

A `Verb` names its arguments (with types), the permission it needs, the
method of the daemon core that implements it, and whether it streams. The
Unix-socket server (unix.py) and the D-Bus service read the same table:
`prepare()` validates and authorizes a call, `invoke()` runs it, `stream()`
runs a streaming verb. Nothing here knows about sockets or buses.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, cast

from shuttled import const
from shuttled.control import schema
from shuttled.control.auth import is_admin, may_manage
from shuttled.control.protocol import DEFAULT_UP_TIMEOUT, MAX_UP_TIMEOUT, BadRequestError
from shuttled.errors import ConfigError, NoSuchProfileError, PermissionDeniedError

if TYPE_CHECKING:
    from shuttled.config import Config


class Core(Protocol):
    """What the daemon provides to the control transports (shuttled/daemon.py)."""

    config: Config

    def list_profiles(self) -> list[schema.ProfileRow]: ...
    def status(self, name: str | None) -> schema.ProfileStatus | list[schema.ProfileStatus]: ...
    async def up(self, name: str, wait: bool, timeout: float) -> schema.ProfileStatus: ...
    async def down(self, name: str) -> schema.ProfileStatus: ...
    def stats(self, name: str) -> schema.ProfileStats: ...
    def connections(self, name: str) -> list[schema.ConnectionRow]: ...
    async def reload(self) -> schema.ReloadResult: ...
    def subscribe(self) -> asyncio.Queue[schema.Event]: ...
    def unsubscribe(self, queue: asyncio.Queue[schema.Event]) -> None: ...
    def version(self) -> schema.VersionInfo: ...
    async def doctor(self, name: str) -> schema.DoctorReport: ...


class Permission(enum.Enum):
    READ = "read"  # anyone who can reach the socket
    MUTATE_PROFILE = "mutate_profile"  # root, group `shuttle`, or the profile's allow list
    # Who talks to whom through a profile: the same people as MUTATE_PROFILE.
    PRIVATE = "private"
    ADMIN = "admin"  # root or group `shuttle`


ArgType = type[str] | type[bool] | type[int] | type[float]
_TYPE_NAMES: Mapping[type, str] = {
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
}
_DBUS_SIGNATURES: Mapping[type, str] = {str: "s", bool: "b", int: "x", float: "d"}


@dataclass(frozen=True)
class Arg:
    name: str
    type: ArgType
    required: bool = False
    default: Any = None
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None

    @property
    def dbus_signature(self) -> str:
        return _DBUS_SIGNATURES[self.type]

    def check(self, verb: str, value: object) -> Any:
        """The value as the handler gets it, or a one-line BadRequestError."""
        expected = (int, float) if self.type is float else (self.type,)
        # bool is an int to Python, never to us.
        if isinstance(value, bool) != (self.type is bool) or not isinstance(value, expected):
            raise BadRequestError(
                f"{verb}: argument {self.name!r} must be {_TYPE_NAMES[self.type]}"
            )
        if self.type is float and isinstance(value, int | float):
            value = float(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            self._check_range(verb, value)
        if isinstance(value, str) and not value:
            raise BadRequestError(f"{verb}: argument {self.name!r} must not be empty")
        return value

    def _check_range(self, verb: str, value: float) -> None:
        low = -float("inf") if self.minimum is None else self.minimum
        high = float("inf") if self.maximum is None else self.maximum
        if not low <= value <= high:
            raise BadRequestError(
                f"{verb}: argument {self.name!r} must be between {low:g} and {high:g}"
            )


class ArgInfo(TypedDict):
    name: str
    type: str
    required: bool
    default: object
    help: str


class VerbInfo(TypedDict):
    """A verb as describe() tells it."""

    name: str
    permission: str
    streams: bool
    help: str
    args: list[ArgInfo]


@dataclass(frozen=True)
class Verb:
    name: str
    handler: str  # method of Core
    permission: Permission
    args: tuple[Arg, ...] = ()
    streams: bool = False  # handler returns a queue of events; `release` gives it back
    release: str | None = None
    help: str = ""

    def describe(self) -> VerbInfo:
        """A JSON-able description, for D-Bus introspection and generated docs."""
        return {
            "name": self.name,
            "permission": self.permission.value,
            "streams": self.streams,
            "help": self.help,
            "args": [
                {
                    "name": a.name,
                    "type": a.type.__name__,
                    "required": a.required,
                    "default": a.default,
                    "help": a.help,
                }
                for a in self.args
            ],
        }


_PROFILE = Arg("profile", str, required=True, help="profile name")


def _table(*verbs: Verb) -> Mapping[str, Verb]:
    return MappingProxyType({v.name: v for v in verbs})


VERBS: Mapping[str, Verb] = _table(
    Verb("list", "list_profiles", Permission.READ, help="profiles and their states"),
    Verb(
        "status",
        "status",
        Permission.READ,
        (Arg("profile", str, help="one profile (default: all)"),),
        help="state, traffic and health of one or all profiles",
    ),
    Verb(
        "up",
        "up",
        Permission.MUTATE_PROFILE,
        (
            _PROFILE,
            Arg("wait", bool, default=True, help="return once up (or failed)"),
            Arg(
                "timeout",
                float,
                default=DEFAULT_UP_TIMEOUT,
                minimum=0.0,
                maximum=MAX_UP_TIMEOUT,
                help="seconds to wait",
            ),
        ),
        help="bring a profile up (idempotent)",
    ),
    Verb(
        "down",
        "down",
        Permission.MUTATE_PROFILE,
        (_PROFILE,),
        help="take a profile down (idempotent)",
    ),
    Verb("stats", "stats", Permission.READ, (_PROFILE,), help="counters of one profile"),
    Verb(
        "connections",
        "connections",
        Permission.PRIVATE,
        (_PROFILE,),
        help="live connections of one profile",
    ),
    Verb(
        "reload",
        "reload",
        Permission.ADMIN,
        help="re-read the configuration; apply only what changed",
    ),
    Verb(
        "watch",
        "subscribe",
        Permission.READ,
        streams=True,
        release="unsubscribe",
        help="stream state-change events",
    ),
    Verb("version", "version", Permission.READ, help="daemon version and protocol"),
    # Like `up`: it logs in with the profile's user's keys and runs commands on the
    # remote, which only those who may use the profile should make it do.
    Verb(
        "doctor",
        "doctor",
        Permission.MUTATE_PROFILE,
        (_PROFILE,),
        help="check the profile's remote (ssh, forwarding, python, DNS, routes); "
        "nothing is captured",
    ),
)


def describe() -> list[VerbInfo]:
    return [verb.describe() for verb in VERBS.values()]


@dataclass(frozen=True)
class Caller:
    """Who is asking, from the transport's peer credentials."""

    uid: int
    gid: int
    pid: int | None = None
    groups: tuple[int, ...] = ()  # supplementary groups; the primary gid is added below

    @property
    def gids(self) -> tuple[int, ...]:
        return (self.gid, *(g for g in self.groups if g != self.gid))


@dataclass(frozen=True)
class Call:
    """A validated, authorized call: positional handler arguments in table order."""

    verb: Verb
    args: tuple[Any, ...]

    def value(self, name: str) -> Any:
        return self.args[[a.name for a in self.verb.args].index(name)]


def check_args(verb: Verb, raw: Mapping[str, Any]) -> tuple[Any, ...]:
    known = {a.name for a in verb.args}
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise BadRequestError(f"{verb.name}: unknown argument {unknown[0][:64]!r}")
    values = []
    for arg in verb.args:
        if arg.name not in raw or raw[arg.name] is None:
            if arg.required:
                raise BadRequestError(f"{verb.name}: missing argument {arg.name!r}")
            values.append(arg.default)
        else:
            values.append(arg.check(verb.name, raw[arg.name]))
    return tuple(values)


def _admin_denied(verb: Verb) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"{verb.name}: permission denied (only root and members of group {const.ADMIN_GROUP!r})"
    )


def authorize(call: Call, caller: Caller, config: Config) -> None:
    """Raise PermissionDeniedError unless the caller may make this call."""
    permission = call.verb.permission
    if permission is Permission.ADMIN and not is_admin(caller.uid, caller.gids):
        raise _admin_denied(call.verb)
    if permission in (Permission.MUTATE_PROFILE, Permission.PRIVATE):
        name = call.value("profile")
        if name in config.invalid and not is_admin(caller.uid, caller.gids):
            # Its allow list is in the broken file: say what is wrong, change nothing.
            raise ConfigError(f"{name} is invalid: {config.invalid[name].error()}")
        profile = config.profiles.get(name)  # None: invalid, and the caller an admin
        if profile is not None and not may_manage(profile.allow, caller.uid, caller.gids):
            raise PermissionDeniedError(
                f"{call.verb.name} {name}: permission denied (only root, group "
                f"{const.ADMIN_GROUP!r} and the profile's allow list)"
            )


def _check_profile(call: Call, config: Config) -> None:
    names = [a.name for a in call.verb.args]
    if "profile" in names:
        name = call.value("profile")
        if name is not None and name not in config.profiles and name not in config.invalid:
            raise NoSuchProfileError(f"no profile named {name[:64]!r}")


def prepare(core: Core, verb_name: str, raw_args: Mapping[str, Any], caller: Caller) -> Call:
    """Validate, check the profile exists, then authorize: any failure is a typed error."""
    verb = VERBS.get(verb_name)
    if verb is None:
        raise BadRequestError(f"unknown verb {verb_name[:32]!r} (known: {', '.join(VERBS)})")
    call = Call(verb, check_args(verb, raw_args))
    config = core.config
    _check_profile(call, config)
    authorize(call, caller, config)
    return call


async def invoke(core: Core, call: Call) -> schema.Result:
    """Run a non-streaming call on the core and return its result (one of schema's types)."""
    assert not call.verb.streams, f"{call.verb.name} streams: use stream()"
    result = getattr(core, call.verb.handler)(*call.args)
    if inspect.isawaitable(result):
        result = await result
    return cast(schema.Result, result)  # the handler's type in Core: a schema.Result, by the table


async def stream(core: Core, call: Call) -> AsyncGenerator[schema.Event, None]:
    """Events of a streaming call until the consumer stops iterating."""
    assert call.verb.streams and call.verb.release
    queue: asyncio.Queue[schema.Event] = getattr(core, call.verb.handler)(*call.args)
    try:
        while True:
            yield await queue.get()
    finally:
        getattr(core, call.verb.release)(queue)


def profile_verbs() -> Sequence[str]:
    """Verbs that take a profile name (what shell completion completes with names)."""
    return [v.name for v in VERBS.values() if any(a.name == "profile" for a in v.args)]
