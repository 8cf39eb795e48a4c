"""Profiles: YAML files in the config directory, validated once into frozen dataclasses.

Every `*.yaml`/`*.yml` file in the config directory (and in its `profiles.d/`)
either maps profile names to profile bodies, or holds a single top-level
`profiles:` map that does. Errors are collected over all files and reported
together, each as `file:line: profile.key: what is wrong`.

Profile keys: PROFILE_KEYS below is the one schema (type, default, meaning, parser).
README.md's table is its `profile_reference()`, shuttled-profile(5) its
`profile_reference_man()` (`python3 -m shuttled.manpages packaging/man`).

`dns` as a map: `{mode: off|all|split, domains: [names], nameservers: [IPs]}`;
split needs domains; nameservers are the remote resolvers to ask (default:
the remote's /etc/resolv.conf). `dns: true` means all, `dns: false` off.

A profile name matches [A-Za-z0-9_-]{1,32}; a profile needs subnets,
auto_nets or dns.
"""

from __future__ import annotations

import difflib
import ipaddress
import itertools
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import yaml

from shuttled import const
from shuttled.const import ConnectMode, Forward
from shuttled.errors import ConfigError, SshError, SshFailure
from shuttled.net import (
    Subnet,
    gid_of,
    host_bits_warning,
    parse_subnet,
    uid_of,
    valid_host_name,
    valid_profile_name,
)
from shuttled.tunnel.ssh import LocalUser, SshTarget, unreadable

log = logging.getLogger(__name__)

PROFILES_KEY = "profiles"
PROFILES_SUBDIR = "profiles.d"
ROOT_SSH_DIR = "ssh"  # under the config dir: keys and known_hosts of root-run profiles
ROOT_KEY_NAMES = ("id_ed25519", "id_ecdsa", "id_rsa")
DNS_MODES = ("off", "all", "split")
# ssh options that would take the master away from us (we own its control socket
# and its lifetime), make it prompt, or run local commands behind our back.
FORBIDDEN_SSH_OPTIONS = frozenset(
    o.lower()
    for o in (
        "ControlMaster",
        "ControlPath",
        "ControlPersist",
        "LocalCommand",
        "PermitLocalCommand",
        "BatchMode",
        "ForkAfterAuthentication",
        "SessionType",
        "StdinNull",
        "RemoteCommand",
        "RequestTTY",
    )
)
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\$?")
_OPTION_RE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_PYTHON_RE = re.compile(r"[A-Za-z0-9_./+-]{1,255}")
_IFNAME_RE = re.compile(r"[^/:\s]{1,15}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


# --- YAML with line numbers -------------------------------------------------------------


class _Map(dict[Any, Any]):
    """A YAML mapping that remembers the line of each key (1-based)."""

    line = 0
    lines: dict[Any, int]


class _Seq(list[Any]):
    """A YAML sequence that remembers the line of each item (1-based)."""

    line = 0
    lines: list[int]


_UNCLOSED = {
    "while parsing a flow mapping": "the {",
    "while parsing a flow sequence": "the [",
    "while scanning a quoted scalar": "the quote",
}


class _Loader(yaml.CSafeLoader):
    """The C parser, with constructors that keep node marks as line numbers."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    explicit = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)
    first_explicit = len(node.value) - explicit  # merged (<<) pairs come first
    result = _Map()
    result.line, result.lines = node.start_mark.line + 1, {}
    seen: set[Any] = set()
    for index, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value", key_node.start_mark
            )
        if index >= first_explicit:
            if key in seen:  # PyYAML would silently keep the last one
                loader.duplicates.append((key_node.start_mark.line + 1, str(key)))
            seen.add(key)
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    result = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.lines = [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)  # type: ignore[arg-type]
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)  # type: ignore[arg-type]


# --- validation context -------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    line: int
    path: str
    message: str


class _Invalid(Exception):
    """One or more problems with one key; collected, never shown as such."""

    def __init__(self, *problems: _Problem) -> None:
        super().__init__(problems)
        self.problems = problems


@dataclass
class _Ctx:
    """Where a value is: its file, line and dotted path; also collects warnings."""

    file: str
    line: int
    path: str
    config_dir: Path
    warnings: list[str]

    def fail(self, message: str, line: int | None = None) -> NoReturn:
        raise _Invalid(_Problem(line or self.line, self.path, message))

    def warn(self, message: str, line: int | None = None) -> None:
        self.warnings.append(f"{self.file}:{line or self.line}: {self.path}: {message}")

    def at(self, line: int, path: str | None = None) -> _Ctx:
        return _Ctx(self.file, line, path or self.path, self.config_dir, self.warnings)

    def item(self, seq: _Seq | Sequence[Any], index: int) -> _Ctx:
        lines = getattr(seq, "lines", None)
        return self.at(lines[index] if lines else self.line)

    def key(self, mapping: _Map | Mapping[Any, Any], key: Any) -> _Ctx:
        lines = getattr(mapping, "lines", {})
        return self.at(lines.get(key, self.line), f"{self.path}.{key}")


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    names = {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        int: "an integer",
        float: "a number",
        type(None): "nothing",
    }
    return next((n for t, n in names.items() if isinstance(value, t)), type(value).__name__)


def _each(ctx: _Ctx, value: Any, parse: Callable[[_Ctx, Any], Any]) -> tuple[Any, ...]:
    """Parse every item of a list, collecting every item's problem."""
    if isinstance(value, str):  # a single item where a list was meant: take it
        value = [value]
    if not isinstance(value, list):
        ctx.fail(f"expected a list, got {_kind(value)}")
    results: list[Any] = []
    problems: list[_Problem] = []
    for index, item in enumerate(value):
        try:
            results.append(parse(ctx.item(value, index), item))
        except _Invalid as exc:
            problems += exc.problems
    if problems:
        raise _Invalid(*problems)
    return tuple(results)


# --- value parsers --------------------------------------------------------------------------


def _bool(ctx: _Ctx, value: Any) -> bool:
    if not isinstance(value, bool):
        ctx.fail(f"expected true or false, got {_kind(value)}")
    return value


def _text(ctx: _Ctx, value: Any) -> str:
    if not isinstance(value, str):
        ctx.fail(f"expected a string, got {_kind(value)}")
    if not value.strip() or _CONTROL_RE.search(value):
        ctx.fail("must be non-empty text without control characters")
    return value


def _word(ctx: _Ctx, value: Any) -> str:
    """A string ssh gets as one argument: no spaces, and never read as an option."""
    text = _text(ctx, value)
    if any(c.isspace() for c in text) or text.startswith("-"):
        ctx.fail(f"{text!r} must not contain spaces nor start with '-'")
    return text


def _int_in(low: int, high: int) -> Callable[[_Ctx, Any], int]:
    def parse(ctx: _Ctx, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            ctx.fail(f"expected an integer, got {_kind(value)}")
        if not low <= value <= high:
            ctx.fail(f"{value} is not within {low}-{high}")
        return value

    return parse


def _seconds_in(low: int, high: int) -> Callable[[_Ctx, Any], float]:
    def parse(ctx: _Ctx, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            ctx.fail(f"expected a number of seconds, got {_kind(value)}")
        if not low <= value <= high:
            ctx.fail(f"{value} is not within {low}-{high} seconds")
        return float(value)

    return parse


def _choice(choices: Sequence[str]) -> Callable[[_Ctx, Any], str]:
    def parse(ctx: _Ctx, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            ctx.fail(f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def _user(ctx: _Ctx, value: Any) -> str | None:
    name = _text(ctx, value)
    if not _USER_RE.fullmatch(name):
        ctx.fail(f"{name!r} is not a user name")
    if name == "root":
        return None
    if uid_of(name) is None:
        ctx.warn(f"no local user {name!r} yet: the profile cannot connect until it exists")
    return name


def _identity(ctx: _Ctx, value: Any) -> str:
    path = _text(ctx, value)
    # `~` is left for ssh, which expands it to the home of the user it runs as.
    if path.startswith("~") or Path(path).is_absolute():
        return path
    return str(ctx.config_dir / path)


def _python(ctx: _Ctx, value: Any) -> str:
    text = _text(ctx, value)
    if not _PYTHON_RE.fullmatch(text) or text.startswith("-"):
        ctx.fail(f"{text!r} is not a program name or path")
    return text


def _forward(ctx: _Ctx, value: Any) -> Forward:
    return Forward(_choice([f.value for f in Forward])(ctx, value))


def _connect(ctx: _Ctx, value: Any) -> ConnectMode:
    return ConnectMode(_choice([m.value for m in ConnectMode])(ctx, value))


def _ssh_option(ctx: _Ctx, key: Any, value: Any) -> tuple[str, str]:
    if not isinstance(key, str) or not _OPTION_RE.fullmatch(key):
        ctx.fail(f"{key!r} is not an ssh option name")
    if key.lower() in FORBIDDEN_SSH_OPTIONS:
        ctx.fail("shuttled manages this option itself; it cannot be set in a profile")
    if isinstance(value, bool):
        return key, "yes" if value else "no"
    if isinstance(value, int):
        return key, str(value)
    return key, _text(ctx, value)


def _ssh_options(ctx: _Ctx, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        ctx.fail(f"expected a mapping of ssh options, got {_kind(value)}")
    results: list[tuple[str, str]] = []
    problems: list[_Problem] = []
    seen: set[str] = set()
    for key, item in value.items():
        sub = ctx.key(value, key)
        try:
            if str(key).lower() in seen:
                sub.fail("given twice (ssh options ignore case)")
            results.append(_ssh_option(sub, key, item))
            seen.add(str(key).lower())
        except _Invalid as exc:
            problems += exc.problems
    if problems:
        raise _Invalid(*problems)
    return tuple(results)


def _subnet(exclude: bool) -> Callable[[_Ctx, Any], str]:
    def parse(ctx: _Ctx, value: Any) -> str:
        text = _text(ctx, value).strip()
        try:
            # Syntax only: a host name is resolved when the capture is built, so a
            # config loads at boot before DNS works.
            parse_subnet(text, exclude=exclude, resolve=False)
        except ConfigError as exc:
            ctx.fail(str(exc))
        warning = host_bits_warning(text)
        if warning:
            ctx.warn(warning)
        return text

    return parse


def _subnets(ctx: _Ctx, value: Any) -> tuple[str, ...]:
    return _each(ctx, value, _subnet(False))


def _excludes(ctx: _Ctx, value: Any) -> tuple[str, ...]:
    return _each(ctx, value, _subnet(True))


# --- dns --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DnsSettings:
    """Which DNS goes through the tunnel: none, all of it, or names under `domains`."""

    mode: str = "off"  # off | all | split
    domains: tuple[str, ...] = ()  # split: these names and everything below them
    nameservers: tuple[str, ...] = ()  # remote resolvers; () = the remote's resolv.conf

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def _domain(ctx: _Ctx, value: Any) -> str:
    name = _text(ctx, value).strip().lower().removesuffix(".")
    if name.startswith("*."):
        ctx.fail(f"write {name[2:]!r}: a domain already covers every name below it")
    if not valid_host_name(name):
        ctx.fail(f"{name!r} is not a DNS name")
    return name


def _address(ctx: _Ctx, value: Any) -> str:
    try:
        return str(ipaddress.ip_address(_text(ctx, value).strip()))
    except ValueError:
        ctx.fail(f"{value!r} is not an IP address")


def _dns_mode(ctx: _Ctx, value: Any) -> str:
    if isinstance(value, bool):  # YAML 1.1 reads a bare `off` as false
        return "all" if value else "off"
    return _choice(DNS_MODES)(ctx, value)


_DNS_KEYS: Mapping[str, Callable[[_Ctx, Any], Any]] = {
    "mode": _dns_mode,
    "domains": lambda ctx, v: _each(ctx, v, _domain),
    "nameservers": lambda ctx, v: _each(ctx, v, _address),
}


def _dns(ctx: _Ctx, value: Any) -> DnsSettings:
    if not isinstance(value, dict):
        return DnsSettings(_dns_mode(ctx, value))
    parsed = _parse_map(ctx, value, _DNS_KEYS)
    if "mode" not in parsed:
        ctx.fail("needs a mode (off, all or split)")
    settings = DnsSettings(**parsed)
    if settings.mode == "split" and not settings.domains:
        ctx.fail("split DNS needs domains: [...]")
    if settings.mode == "all" and settings.domains:
        ctx.fail("domains are only used with mode: split")
    return settings


def _parse_map(
    ctx: _Ctx, value: Mapping[Any, Any], keys: Mapping[str, Callable[[_Ctx, Any], Any]]
) -> dict[str, Any]:
    """Parse the keys of a nested mapping; unknown keys are problems too."""
    parsed: dict[str, Any] = {}
    problems: list[_Problem] = []
    for key, item in value.items():
        sub = ctx.key(value, key)
        try:
            if key not in keys:
                sub.fail(_unknown_key(key, keys))
            if item is not None:
                parsed[key] = keys[key](sub, item)
        except _Invalid as exc:
            problems += exc.problems
    if problems:
        raise _Invalid(*problems)
    return parsed


def _unknown_key(key: Any, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")


# --- lan and allow -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LanSettings:
    """Router mode: capture traffic forwarded from these interfaces and/or sources."""

    all_interfaces: bool = False
    interfaces: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()  # subnet texts, parse with parse_subnet()

    @property
    def enabled(self) -> bool:
        return self.all_interfaces or bool(self.interfaces or self.sources)


def _lan_item(ctx: _Ctx, value: Any) -> tuple[str, str]:
    text = _text(ctx, value).strip()
    looks_like_ip = "/" in text
    try:
        ipaddress.ip_address(text)
        looks_like_ip = True
    except ValueError:
        pass
    if looks_like_ip:
        return "source", _subnet(False)(ctx, text)
    if not _IFNAME_RE.fullmatch(text) or text in (".", ".."):
        ctx.fail(f"{text!r} is neither an interface name nor a subnet")
    return "interface", text


def _lan(ctx: _Ctx, value: Any) -> LanSettings:
    if isinstance(value, bool):
        return LanSettings(all_interfaces=value)
    items = _each(ctx, value, _lan_item)
    return LanSettings(
        interfaces=tuple(v for k, v in items if k == "interface"),
        sources=tuple(v for k, v in items if k == "source"),
    )


def _allow_item(ctx: _Ctx, value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # a bare uid
    text = _text(ctx, value).strip()
    kind, sep, name = text.partition(":")
    if not sep:
        kind, name = "user", text
    if kind not in ("user", "group") or not _USER_RE.fullmatch(name):
        ctx.fail(f"{text!r}: expected user:NAME, group:NAME or NAME")
    if (uid_of(name) if kind == "user" else gid_of(name)) is None:
        ctx.warn(f"no local {kind} {name!r} (ignored until it exists)")
    return f"{kind}:{name}"


def _allow(ctx: _Ctx, value: Any) -> tuple[str, ...]:
    return _each(ctx, value, _allow_item)


# --- profiles ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """One tunnel as the administrator wrote it. `==` compares settings, not `source`."""

    name: str
    remote: str
    user: str | None = None  # None: root, with keys under <config dir>/ssh
    port: int | None = None
    identity: str | None = None
    jump: str | None = None
    ssh_options: tuple[tuple[str, str], ...] = ()
    subnets: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    auto_nets: bool = False
    dns: DnsSettings = DnsSettings()
    remote_hosts: bool = False
    autostart: bool = False
    lan: LanSettings = LanSettings()
    allow: tuple[str, ...] = ()  # normalized: "user:NAME" / "group:NAME"
    kill_switch: bool = False
    udp: bool | None = None  # None: on with lan, off without
    udp_flows: int = const.UDP_MAX_FLOWS
    udp_idle: float = const.UDP_IDLE
    lan_dns: str = "box"  # box: DNS the LAN sends to this host; all: every port-53 packet
    forward: Forward = Forward.AUTO
    connect: ConnectMode = ConnectMode.REMOTE
    python: str | None = None
    keepalive: float = const.KEEPALIVE_INTERVAL
    streams: int = 1
    max_connections: int = const.MAX_CONNECTIONS
    max_connections_per_user: int = const.MAX_CONNECTIONS_PER_USER
    # Where it was written; moving a profile within its file is not a change.
    source: str = field(default="", compare=False)
    config_dir: Path = field(default=const.CONFIG_DIR, compare=False, repr=False)

    def networks(self, *, resolve: bool = True) -> tuple[Subnet, ...]:
        """Includes then excludes as firewall Subnets; host names are resolved now."""
        includes = [s for t in self.subnets for s in parse_subnet(t, resolve=resolve)]
        excludes = [s for t in self.exclude for s in parse_subnet(t, exclude=True, resolve=resolve)]
        return (*includes, *excludes)

    def ssh_target(self) -> SshTarget:
        """How to reach the remote. Raises SshError when the local user does not exist."""
        command = [const.SSH_BIN]
        for flag, value in (("-p", self.port), ("-i", self.identity), ("-J", self.jump)):
            if value is not None:
                command += [flag, str(value)]
        # ssh keeps the first value it sees: the profile's options go before ours.
        options = [f"{key}={value}" for key, value in self.ssh_options]
        if self.user is None:
            options += self._root_options()
        user = LocalUser.from_name(self.user) if self.user is not None else None
        return SshTarget(self.remote, tuple(command), tuple(options), user=user, batch=True)

    def remedies(self) -> tuple[tuple[SshFailure, str], ...]:
        """The command that fixes each failure no retry heals, for this profile."""
        where = "" if self.config_dir == const.CONFIG_DIR else f" --config-dir {self.config_dir}"
        key = self.identity or self._root_key()
        install = (
            f"add {key}.pub to the server's authorized_keys (`ssh-copy-id -i {key} {self.remote}`)"
            if key
            else f"give the profile an identity, or put a key in {self.config_dir / ROOT_SSH_DIR}"
            if self.user is None
            else f"add {self.user}'s public key to the server's authorized_keys (ssh-copy-id)"
        )
        return (
            (SshFailure.HOST_KEY, f"run `sudo shuttled{where} trust {self.name}`"),
            (SshFailure.AUTH, install),
            (SshFailure.IDENTITY, f"fix {self.name}.identity, then `shuttlectl reload`"),
        )

    def _root_key(self) -> str | None:
        """The key a root profile's ssh tries first (see _root_options); None if none."""
        if self.user is not None:
            return None
        keys = (self.config_dir / ROOT_SSH_DIR / name for name in ROOT_KEY_NAMES)
        return next((str(k) for k in keys if k.is_file()), None)

    def _root_options(self) -> list[str]:
        """Root's home may be hidden from the service (ProtectHome): keys live with the config."""
        ssh_dir = self.config_dir / ROOT_SSH_DIR
        given = {key.lower() for key, _ in self.ssh_options}
        options = []
        if "userknownhostsfile" not in given:
            options.append(f"UserKnownHostsFile={ssh_dir / 'known_hosts'}")
        if self.identity is None and "identityfile" not in given:
            options += [
                f"IdentityFile={ssh_dir / name}"
                for name in ROOT_KEY_NAMES
                if (ssh_dir / name).is_file()
            ]
        return options


# --- the schema ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySpec:
    """One profile key: how it is documented and how it is parsed."""

    name: str
    type: str  # for humans
    help: str
    parse: Callable[[_Ctx, Any], Any] = field(repr=False)
    required: bool = False
    default_text: str | None = None  # how the default is documented, when not obvious

    @property
    def default(self) -> Any:
        """The value a profile gets without this key (from the Profile dataclass)."""
        f = Profile.__dataclass_fields__[self.name]
        return f.default

    def default_doc(self) -> str:
        if self.required:
            return "required"
        if self.default_text is not None:
            return self.default_text
        value = self.default
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return "none" if value is None else "[]" if value == () else str(value)


def _spec(
    name: str, type_: str, help_: str, parse: Callable[[_Ctx, Any], Any], **kw: Any
) -> tuple[str, KeySpec]:
    return name, KeySpec(name, type_, help_, parse, **kw)


PROFILE_KEYS: Mapping[str, KeySpec] = MappingProxyType(
    dict(
        (
            _spec(
                "remote",
                "string",
                "ssh destination: [user@]host, a Host alias from the user's "
                "ssh config, or ssh://user@host:port",
                _word,
                required=True,
            ),
            _spec(
                "user",
                "user name",
                "local account whose ssh config, keys, known_hosts and agent "
                "are used; without it ssh runs as root with keys and known_hosts in "
                "<config dir>/ssh/",
                _user,
                default_text="root",
            ),
            _spec(
                "port",
                "integer 1-65535",
                "ssh port (ssh -p)",
                _int_in(1, 65535),
                default_text="ssh's",
            ),
            _spec(
                "identity",
                "path",
                "private key (ssh -i); relative to the config directory, ~ is the user's home",
                _identity,
                default_text="ssh's",
            ),
            _spec("jump", "string", "jump host(s) (ssh -J, ProxyJump)", _word),
            _spec(
                "ssh_options",
                "map of option: string/int/bool",
                "extra ssh -o options; "
                "Control*, LocalCommand, PermitLocalCommand, BatchMode, RemoteCommand, "
                "SessionType, StdinNull, RequestTTY and ForkAfterAuthentication are refused",
                _ssh_options,
                default_text="{}",
            ),
            _spec(
                "subnets",
                "list of subnets",
                "destinations to capture: 10.0.0.0/8, fd00::/8, "
                "0/0 (all IPv4 and IPv6), 10.0.0.0/8:8000-9000, [fd00::/8]:443, host.example",
                _subnets,
            ),
            _spec("exclude", "list of subnets", "destinations never to capture", _excludes),
            _spec("auto_nets", "bool", "also capture the networks the remote routes", _bool),
            _spec(
                "dns",
                "off | all | split | map",
                "DNS through the tunnel: all queries, or only "
                "names under domains (split); map form {mode, domains, nameservers}",
                _dns,
                default_text="off",
            ),
            _spec("remote_hosts", "bool", "learn host names from the remote", _bool),
            _spec("autostart", "bool", "bring the profile up when the daemon starts", _bool),
            _spec(
                "lan",
                "bool | list",
                "router mode: also capture traffic forwarded from the LAN; "
                "true for every interface, or a list of interface names and source subnets",
                _lan,
                default_text="false",
            ),
            _spec(
                "allow",
                "list",
                "who besides root and group shuttle may up/down the profile: "
                "user:NAME, group:NAME or NAME (a user)",
                _allow,
            ),
            _spec(
                "kill_switch",
                "bool",
                "while the profile is wanted, nothing to its subnets (and, when it catches "
                "DNS, no DNS) leaves by the normal route: refused (TCP reset, ICMP "
                "unreachable) while not up, from the first up on, also while the daemon is "
                "stopped, crashed or not yet started at boot (the lockdown); while up, what "
                "the tunnel does not carry (UDP when udp is off, ICMP) is refused too. Only "
                "shuttlectl down lifts it",
                _bool,
            ),
            _spec(
                "udp",
                "bool",
                "carry UDP to the subnets too, through the remote helper (needs "
                "python3 on the remote)",
                _bool,
                default_text="true with lan, else false",
            ),
            _spec(
                "udp_flows",
                "integer 1-1000000",
                "most UDP flows (local source address and "
                "port) at once; new flows beyond it are refused and counted",
                _int_in(1, 1_000_000),
            ),
            _spec(
                "udp_idle",
                "seconds 1-3600",
                "a UDP flow ends after this long without a datagram either way",
                _seconds_in(1, 3600),
            ),
            _spec(
                "lan_dns",
                "box | all",
                "with lan and dns: answer the DNS LAN hosts send to this "
                "host (box), or all their port-53 traffic (all)",
                _choice(("box", "all")),
            ),
            _spec(
                "forward",
                "auto | direct | helper",
                "who opens the remote connections: sshd "
                "(direct), the uploaded python helper, or sshd with the helper as fallback (auto)",
                _forward,
            ),
            _spec(
                "connect",
                "remote | fast",
                "when the app's connect() returns: once the remote end answered, so a "
                "closed port is refused and an unreachable host unreachable (remote; Linux "
                "with nfnetlink_queue), or at once, with a reset after when the remote "
                "refuses (fast)",
                _connect,
            ),
            _spec(
                "python",
                "string",
                "python on the remote for the helper",
                _python,
                default_text="python3, then others",
            ),
            _spec(
                "keepalive",
                "seconds 1-300",
                "health ping interval (pings go at least every 2 s); "
                "the link is declared dead after three misses, or 6 s without a sign of life",
                _seconds_in(1, 300),
            ),
            _spec(
                "streams",
                f"integer 1-{const.MAX_STREAMS}",
                "ssh connections for this profile; each new connection goes to the one "
                "carrying the fewest",
                _int_in(1, const.MAX_STREAMS),
            ),
            _spec(
                "max_connections",
                "integer 1-1000000",
                "most TCP connections captured at once; "
                "new ones beyond it are reset and counted (refused in stats); root's are never "
                "refused",
                _int_in(1, 1_000_000),
            ),
            _spec(
                "max_connections_per_user",
                "integer 1-1000000",
                "the same for each local user "
                "(the uid owning the app's socket), and never more than half of what the "
                "daemon's file descriptors allow; root is never limited",
                _int_in(1, 1_000_000),
            ),
        )
    )
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def profile_reference_man() -> str:
    """The profile reference as man(7) paragraphs, for shuttled(8) / shuttled.yaml(5)."""

    def roff(text: str) -> str:
        return text.replace("\\", "\\e").replace("-", "\\-")

    paras = [
        f".TP\n.B {s.name}\n({roff(s.type)}; default: {roff(s.default_doc())})\n{roff(s.help)}"
        for s in PROFILE_KEYS.values()
    ]
    return "\n".join(paras) + "\n"


def profile_reference() -> str:
    """The profile reference as a Markdown table (README; the man page uses the same rows)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += [
        f"| `{s.name}` | {_cell(s.type)} | {_cell(s.default_doc())} | {_cell(s.help)} |"
        for s in PROFILE_KEYS.values()
    ]
    return "\n".join(rows)


# --- the whole configuration ---------------------------------------------------------------------


class ConfigErrors(ConfigError):
    """Every problem of a configuration: a summary line, then one `file:line: ...` each."""

    def __init__(self, errors: Sequence[str], where: str | Path) -> None:
        count = len(errors)
        summary = f"{count} error{'' if count == 1 else 's'} in {where}"
        super().__init__("\n".join([summary, *errors]))
        self.errors = tuple(errors)


@dataclass(frozen=True)
class InvalidProfile:
    """A profile of a file with errors: not loaded, shown with the file's errors."""

    name: str
    remote: str  # as written, when the file parsed that far; else ""
    errors: tuple[str, ...]  # `file:line: ...`, the profile's own first

    def error(self) -> str:
        """The first error, and how many more `shuttled check` lists."""
        more = len(self.errors) - 1
        return self.errors[0] + (f" (and {more} more: shuttled check)" if more else "")


@dataclass(frozen=True)
class Config:
    """All profiles, immutable; `==` compares the profiles' settings only."""

    profiles: Mapping[str, Profile] = field(default_factory=lambda: MappingProxyType({}))
    directory: Path = field(default=const.CONFIG_DIR, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # Only from load_config(partial=True): the profiles of broken files, every error.
    invalid: Mapping[str, InvalidProfile] = field(
        default_factory=lambda: MappingProxyType({}), compare=False
    )
    errors: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, *profiles: Profile, directory: Path = const.CONFIG_DIR) -> Config:
        return cls(MappingProxyType({p.name: p for p in profiles}), directory)

    def diff(self, new: Config) -> dict[str, list[str]]:
        """What a reload to `new` changes, as the `reload` verb reports it."""
        old_names, new_names = set(self.profiles), set(new.profiles)
        both = old_names & new_names
        return {
            "added": sorted(new_names - old_names),
            "removed": sorted(old_names - new_names),
            "changed": sorted(n for n in both if self.profiles[n] != new.profiles[n]),
            "unchanged": sorted(n for n in both if self.profiles[n] == new.profiles[n]),
        }


def config_files(config_dir: Path) -> list[Path]:
    """The YAML files of a config directory and its profiles.d/, in a stable order."""
    files: list[Path] = []
    for directory in (config_dir, config_dir / PROFILES_SUBDIR):
        if directory.is_dir():
            files += sorted(
                p
                for p in directory.iterdir()
                if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
            )
    return files


class _Collector:
    """Loads files one by one, keeping every profile and every problem."""

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir
        self.profiles: dict[str, Profile] = {}
        self.sources: dict[str, str] = {}  # every name seen, valid or not: for duplicates
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.broken: dict[str, InvalidProfile] = {}  # profiles of files with errors
        self._file_errors: list[tuple[int, str]] = []
        self._text = ""

    def load_file(self, path: Path) -> None:
        self._file_errors = []
        data = self._read(path)
        top = self._profiles_map(path, data) if data is not None else None
        for name, body in (top or {}).items():
            self._add(path, top.lines.get(name, 1) if top else 1, name, body)
        errors = [text for _, text in sorted(self._file_errors, key=lambda e: e[0])]
        self.errors += errors
        if errors:
            self._disable(path, top, errors)

    def _disable(self, path: Path, top: _Map | None, errors: list[str]) -> None:
        """Every profile a broken file defines becomes invalid, with the file's errors
        (its own first); where the file does not parse, its names are guessed."""
        names = list(top) if top is not None else _names_in(self._text, path)
        for name in names:
            if not isinstance(name, str) or not valid_profile_name(name):
                continue
            source = self.sources.get(name)
            if source is not None and source.rpartition(":")[0] != str(path):
                continue  # defined first in another file: that one stands
            self.profiles.pop(name, None)
            body = top.get(name) if top is not None else None
            remote = body.get("remote") if isinstance(body, dict) else None
            own = [e for e in errors if f": {name}." in e or f": {name}:" in e]
            self.broken[name] = InvalidProfile(
                name=name,
                remote=remote if isinstance(remote, str) else "",
                errors=tuple(dict.fromkeys([*own, *errors])),
            )

    def _error(self, path: Path, line: int, message: str) -> None:
        self._file_errors.append((line, f"{path}:{line}: {message}"))

    def _read(self, path: Path) -> Any:
        self._text = ""
        try:
            text = self._text = path.read_bytes().decode()
        except OSError as exc:
            self._error(path, 0, f"cannot read: {exc.strerror}")
            return None
        except UnicodeDecodeError as exc:
            self._error(path, 0, f"not UTF-8 (byte {exc.start})")
            return None
        loader = _Loader(text)
        try:
            data = loader.get_single_data()
        except yaml.YAMLError as exc:
            self._yaml_error(path, exc, text)
            return None
        finally:
            loader.dispose()
        for line, key in loader.duplicates:
            self._error(path, line, f"key {key!r} is given twice")
        return data

    def _yaml_error(self, path: Path, exc: yaml.YAMLError, text: str) -> None:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        if mark is not None and _at_tab(text, mark.line, mark.column):
            self._error(path, line, "tabs are not allowed in YAML; use spaces")
            return
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        # PyYAML notices an unclosed [, { or quote only where it gives up, often
        # lines later: name the line that opened it, where the mistake is.
        opened = _UNCLOSED.get(getattr(exc, "context", None) or "")
        start = getattr(exc, "context_mark", None)
        if opened and start is not None and start.line + 1 < line:
            self._error(
                path,
                start.line + 1,
                f"YAML syntax error: {opened} opened here is not closed ({problem} at line {line})",
            )
            return
        self._error(path, line, f"YAML syntax error: {problem}")

    def _profiles_map(self, path: Path, data: Any) -> _Map | None:
        if not isinstance(data, _Map):
            self._error(
                path, 1, f"expected a mapping of profile names to profiles, got {_kind(data)}"
            )
            return None
        if PROFILES_KEY not in data:
            return data
        inner = data[PROFILES_KEY]
        if len(data) > 1:
            self._error(
                path,
                data.lines[PROFILES_KEY],
                f"with a top-level {PROFILES_KEY!r} map, nothing else may be at the top level",
            )
        if inner is None:
            return None
        if not isinstance(inner, _Map):
            self._error(
                path,
                data.lines[PROFILES_KEY],
                f"{PROFILES_KEY}: expected a mapping, got {_kind(inner)}",
            )
            return None
        return inner

    def _add(self, path: Path, line: int, name: Any, body: Any) -> None:
        if not isinstance(name, str) or not valid_profile_name(name):
            self._error(path, line, f"{name!r}: a profile name must match [A-Za-z0-9_-]{{1,32}}")
            return
        if name in self.sources:
            self._error(path, line, f"{name}: profile already defined at {self.sources[name]}")
            return
        self.sources[name] = f"{path}:{line}"
        ctx = _Ctx(str(path), line, name, self.config_dir, self.warnings)
        try:
            self.profiles[name] = _profile(ctx, name, body)
        except _Invalid as exc:
            for p in exc.problems:
                self._error(path, p.line, f"{p.path}: {p.message}")


def _at_tab(text: str, line: int, column: int) -> bool:
    """PyYAML stopped at a tab: it says "found character that cannot start any
    token" or "a tab character that violates indentation", neither naming the fix."""
    lines = text.splitlines()
    return line < len(lines) and "\t" in lines[line][: column + 1]


def _profile(ctx: _Ctx, name: str, body: Any) -> Profile:
    if not isinstance(body, dict):
        ctx.fail(f"a profile must be a mapping of keys, got {_kind(body)}")
    problems: list[_Problem] = []
    for key in body:
        if key not in PROFILE_KEYS:
            problems.append(
                _Problem(ctx.key(body, key).line, f"{name}.{key}", _unknown_key(key, PROFILE_KEYS))
            )
    values = _profile_values(ctx, body, problems)
    if problems:
        raise _Invalid(*problems)
    profile = Profile(
        name=name, source=f"{ctx.file}:{ctx.line}", config_dir=ctx.config_dir, **values
    )
    if not (profile.subnets or profile.auto_nets or profile.dns.enabled):
        ctx.fail("nothing to capture: give subnets, auto_nets: true or dns")
    if profile.identity is not None and (problem := _identity_problem(profile)):
        ctx.key(body, "identity").fail(problem)
    return profile


def _identity_problem(profile: Profile) -> str | None:
    """Why the profile's ssh cannot read its identity file; None when it can, or when
    that cannot be known yet (a user still to be created, ssh's %-tokens). ssh
    itself only warns and tries other keys, then fails with "Permission denied"."""
    assert profile.identity is not None
    try:
        user = LocalUser.from_name(profile.user) if profile.user is not None else None
    except SshError:
        return None  # already a warning: no such user yet
    path = profile.identity
    if "%" in path:
        return None
    if path == "~" or path.startswith("~/"):  # ssh's ~ is its user's home
        path = (user.home if user else str(Path.home())) + path[1:]
    elif path.startswith("~"):
        path = str(Path(path).expanduser())
    return unreadable(path, user)


def _profile_values(ctx: _Ctx, body: Mapping[Any, Any], problems: list[_Problem]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, spec in PROFILE_KEYS.items():
        if body.get(key) is None:  # absent, or `key:` with nothing after it
            if spec.required:
                where = ctx.key(body, key) if key in body else ctx
                problems.append(
                    _Problem(where.line, f"{ctx.path}.{key}", "required key is missing")
                )
            continue
        try:
            values[key] = spec.parse(ctx.key(body, key), body[key])
        except _Invalid as exc:
            problems += exc.problems
    return values


_TOP_KEY_RE = re.compile(r"^([A-Za-z0-9_-]{1,32})[ \t]*:", re.MULTILINE)
_INNER_KEY_RE = re.compile(r"^([ \t]+)([A-Za-z0-9_-]{1,32})[ \t]*:", re.MULTILINE)


def _names_in(text: str, path: Path) -> list[str]:
    """The profile names a file that does not parse seems to define: its top-level
    keys (the least indented ones under a `profiles:` map); else the file's name."""
    names = _TOP_KEY_RE.findall(text)
    if PROFILES_KEY in names:
        inner = _INNER_KEY_RE.findall(text)
        depth = min((len(indent) for indent, _ in inner), default=0)
        names = [n for indent, n in inner if len(indent) == depth]
    return names or [path.stem]


def _collect(config_dir: Path) -> _Collector:
    collector = _Collector(config_dir)
    if not config_dir.is_dir():
        collector.errors.append(f"{config_dir}: not a directory")
        return collector
    for path in config_files(config_dir):
        collector.load_file(path)
    return collector


def load_config(config_dir: Path = const.CONFIG_DIR, *, partial: bool = False) -> Config:
    """Load and validate every profile; ConfigErrors lists every problem found.

    partial (the daemon's start): a file with errors disables the profiles it
    defines (Config.invalid) and the others load; only a missing directory raises.
    """
    collector = _collect(config_dir)
    if collector.errors and not (partial and config_dir.is_dir()):
        raise ConfigErrors(collector.errors, config_dir)
    for warning in collector.warnings:
        log.warning("%s", warning)
    return Config(
        MappingProxyType(dict(collector.profiles)),
        config_dir,
        tuple(collector.warnings),
        invalid=MappingProxyType(dict(collector.broken)),
        errors=tuple(collector.errors),
    )


def check_config(config_dir: Path) -> tuple[list[str], list[str], int]:
    """`shuttled check`: every error, every warning, and how many profiles are valid."""
    collector = _collect(config_dir)
    return collector.errors, collector.warnings, len(collector.profiles)


# --- overlaps ------------------------------------------------------------------------------------


def _ports_meet(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    if a is None or b is None:
        return True
    return a[0] <= b[1] and b[0] <= a[1]


def _subnet_text(subnet: Subnet) -> str:
    if subnet.ports is None:
        return str(subnet.network)
    first, last = subnet.ports
    ports = str(first) if first == last else f"{first}-{last}"
    net = f"[{subnet.network}]" if subnet.network.version == 6 else str(subnet.network)
    return f"{net}:{ports}"


def overlaps(a: Iterable[Subnet], b: Iterable[Subnet]) -> list[tuple[Subnet, Subnet]]:
    """Pairs of include subnets that capture some of the same destinations.

    For when the daemon learns subnets at run time (auto_nets) and must check
    them against the other active profiles.
    """
    return [
        (x, y)
        for x, y in itertools.product(
            [s for s in a if not s.exclude], [s for s in b if not s.exclude]
        )
        if x.network.version == y.network.version
        and x.network.overlaps(y.network)
        and _ports_meet(x.ports, y.ports)
    ]


def dns_domains(profile: Profile) -> tuple[str, ...]:
    """The names a profile's DNS claims: "" (the root: every name) for mode all."""
    if profile.dns.mode == "all":
        return ("",)
    return profile.dns.domains if profile.dns.mode == "split" else ()


def _under(name: str, domain: str) -> bool:
    return not domain or name == domain or name.endswith("." + domain)


def domain_overlaps(a: Iterable[str], b: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of domains one of which holds the other (the root "" holds everything)."""
    return [(x, y) for x, y in itertools.product(a, b) if _under(x, y) or _under(y, x)]


def check_overlaps(profiles: Iterable[Profile]) -> None:
    """Refuse active profiles that would capture the same destinations, or DNS names.

    Host-name subnets are not resolved here (they are checked when resolved).
    Two profiles may not both send a name through their tunnels: their DNS
    domains may not overlap, and `dns: all` (every name) overlaps any DNS.
    """
    profiles = list(profiles)
    nets = [(p, p.networks(resolve=False)) for p in profiles]
    problems = []
    for (a, nets_a), (b, nets_b) in itertools.combinations(nets, 2):
        pairs = overlaps(nets_a, nets_b)
        if pairs:
            detail = ", ".join(f"{_subnet_text(x)} and {_subnet_text(y)}" for x, y in pairs)
            problems.append(f"profiles {a.name!r} and {b.name!r} overlap: {detail}")
        names = domain_overlaps(dns_domains(a), dns_domains(b))
        if names:
            detail = ", ".join(f"{x or 'every name'} and {y or 'every name'}" for x, y in names)
            problems.append(f"profiles {a.name!r} and {b.name!r} overlap in DNS: {detail}")
    if problems:
        raise ConfigError("\n".join(problems))


__all__ = [
    "PROFILE_KEYS",
    "Config",
    "ConfigErrors",
    "DnsSettings",
    "InvalidProfile",
    "KeySpec",
    "LanSettings",
    "Profile",
    "check_config",
    "check_overlaps",
    "config_files",
    "dns_domains",
    "domain_overlaps",
    "load_config",
    "overlaps",
    "profile_reference",
    "profile_reference_man",
]
