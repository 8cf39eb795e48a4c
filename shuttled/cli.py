"""The `shuttled` command line: the daemon, `run` (one-shot) and `cleanup`.

The parser is built by one function so that man pages and completion are
generated from the very object that parses arguments.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from shuttled import __version__, const
from shuttled.const import ConnectMode, Forward
from shuttled.errors import ConfigError, UsageError
from shuttled.net import Subnet, host_bits_warning, parse_subnet, valid_host_name
from shuttled.router import add_run_arguments as add_router_arguments
from shuttled.router import settings_from_args as router_settings
from shuttled.supervisor import TunnelSpec
from shuttled.tunnel.ssh import LocalUser, SshTarget

ENV_ARGS = "SHUTTLED_ARGS"
METHODS = ("auto", "nft", "iptables", "pf")


# sshuttle's --method names, as what we do: nat is our default redirect (nft, else
# iptables); tproxy is how we carry UDP (TCP is still redirected).
SSHUTTLE_METHODS = {"nat": "auto", "tproxy": "auto"}
RUN_METHODS = (*METHODS, *SSHUTTLE_METHODS)


class _Parser(argparse.ArgumentParser):
    """argparse, but bad arguments become a UsageError (one line, exit code 2); the
    entry point adds the one `shuttled: ` prefix, so a subcommand names only itself."""

    def error(self, message: str) -> None:  # type: ignore[override]
        where = self.prog.removeprefix("shuttled").strip()
        raise UsageError(f"{where}: {message}" if where else message)


# The daemon's paths: option, default, what it is.
_DAEMON_PATHS = (
    ("--config-dir", const.CONFIG_DIR, "profile directory of the daemon"),
    ("--socket", const.CONTROL_SOCKET, "control socket of the daemon"),
    ("--state-dir", const.STATE_DIR, "where wanted-up profiles are kept"),
)

# Flags `run` refuses with a reason rather than "unrecognized": sshuttle's, left out
# on purpose (the README's "One-shot use"), and the daemon's, which `run` has no use
# for. (option strings, takes a value, why)
_USE_SERVICE = "no daemon mode: use the service (shuttled daemon, shuttlectl)"
_DAEMON_ONLY = "a daemon option (before or after `daemon`); run takes no profiles"
REFUSED_RUN_FLAGS: tuple[tuple[tuple[str, ...], bool, str], ...] = (
    (("-D", "--daemon"), False, _USE_SERVICE),
    (("--pidfile",), True, _USE_SERVICE),
    (("--syslog",), False, "logs go to stderr, or to the journal under systemd"),
    (
        ("--sudoers-no-modify", "--sudoers-user"),
        True,
        "root is the daemon's job: the service and shuttlectl (a profile's `allow`) "
        "instead of sudoers",
    ),
    (
        ("--no-latency-control", "--latency-buffer-size"),
        True,
        "per-channel windows replace sshuttle's global one: nothing to turn off or size",
    ),
    (
        ("--seed-hosts",),
        True,
        "-H answers the remote's names through the resolver instead of writing /etc/hosts",
    ),
    (("--config-dir", "--socket", "--state-dir"), True, _DAEMON_ONLY),
    (("--no-dbus",), False, _DAEMON_ONLY),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shuttled",
        fromfile_prefix_chars="@",
        description="A VPN over ssh: transparent TCP and DNS through an OpenSSH ControlMaster.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"shuttled {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    _add_daemon_options(parser, here=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    daemon = sub.add_parser("daemon", help="run the daemon in the foreground (the default)")
    _add_verbosity(daemon)
    _add_daemon_options(daemon, here=False)
    _add_run(
        sub.add_parser(
            "run",
            help="one tunnel in the foreground, sshuttle-style",
            fromfile_prefix_chars="@",
            epilog=_refused_epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,  # the epilog's lines
        )
    )
    cleanup = _after(
        sub.add_parser(
            "cleanup",
            help="remove the firewall rules a stopped or crashed "
            "shuttled left (ExecStopPost; after a crash)",
        ),
        "--state-dir",
    )
    cleanup.add_argument(
        "--force",
        action="store_true",
        help="also while a daemon or a `shuttled run` is running: its "
        "traffic then goes out unprotected",
    )
    cleanup.add_argument(
        "--all",
        action="store_true",
        help="also lift the kill switch's lockdown (blocking rules kept "
        "for wanted profiles while no daemon runs)",
    )
    _after(
        sub.add_parser(
            "check",
            help="validate the profiles (every file, every error and warning) and touch "
            "nothing else, like sshd -t; exit 2 on errors",
        ),
        "--config-dir",
    )
    _after(
        sub.add_parser(
            "lockdown",
            help="put the kill switch of every wanted profile in place "
            "from the state directory (at boot, before the network)",
        ),
        "--state-dir",
    )
    _add_install_service(sub)
    trust = _after(
        sub.add_parser(
            "trust",
            help="fetch a profile's server host key through its own ssh settings, show its "
            "fingerprint and, once confirmed, add it to the known_hosts that profile's "
            "ssh reads",
        ),
        "--config-dir",
    )
    trust.add_argument("profile", metavar="PROFILE", help="a profile of --config-dir")
    trust.add_argument("-y", "--yes", action="store_true", help="write without asking")
    return parser


def _add_install_service(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "install-service",
        help="after pip or pipx: install the systemd units (running this installation's "
        "shuttled), D-Bus policy, group shuttle, man pages, completion and /etc/shuttled",
    )
    p.add_argument("--uninstall", action="store_true", help="remove what install-service wrote")
    p.add_argument(
        "--root", type=Path, default=Path("/"), help="write under this directory (default /)"
    )


def _add_daemon_options(p: argparse.ArgumentParser, here: bool) -> None:
    """The daemon's options, before `daemon` (`here`: with the defaults) and after it
    (SUPPRESS: a flag not given after `daemon` keeps the value given before it)."""
    keep = argparse.SUPPRESS
    _add_paths(p, [flag for flag, _, _ in _DAEMON_PATHS], here)
    p.add_argument(
        "--method",
        choices=METHODS,
        default="auto" if here else keep,
        help="firewall backend of the daemon (default: nft, else iptables; "
        "pf on macOS and FreeBSD)",
    )
    p.add_argument(
        "--no-dbus",
        action="store_true",
        default=False if here else keep,
        help="do not export the API on the D-Bus system bus",
    )


def _add_paths(p: argparse.ArgumentParser, flags: Sequence[str], here: bool = False) -> None:
    """The daemon's path options a command reads (`here`: with their defaults; else
    SUPPRESS, so a flag given before the subcommand is kept)."""
    for flag, default, what in _DAEMON_PATHS:
        if flag in flags:
            p.add_argument(
                flag,
                type=Path,
                default=default if here else argparse.SUPPRESS,
                help=f"{what} (default {default})",
            )


def _after(p: argparse.ArgumentParser, *paths: str) -> argparse.ArgumentParser:
    """A subcommand that also takes -v/-q and its daemon paths after its name."""
    _add_verbosity(p)
    _add_paths(p, paths)
    return p


def _add_verbosity(p: argparse._ActionsContainer) -> None:
    # Also accepted after the subcommand, as sshuttle users type them; SUPPRESS
    # keeps the top-level value when the flag is not repeated here.
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more log output (repeat for debug)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="only warnings and errors",
    )


class _Refused(argparse.Action):
    """A flag we know but do not have: its reason, as a usage error."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        self.reason = str(kwargs.pop("reason"))
        super().__init__(option_strings, dest, **kwargs)  # type: ignore[arg-type]

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        parser.error(f"{option_string}: {self.reason}")


def _add_refused(p: argparse.ArgumentParser) -> None:
    for flags, takes_value, reason in REFUSED_RUN_FLAGS:
        # A value is taken ("?") so that it is never read as a SUBNET.
        nargs = "?" if takes_value else 0
        p.add_argument(*flags, action=_Refused, nargs=nargs, reason=reason, help=argparse.SUPPRESS)


def _refused_epilog() -> str:
    return "\n".join(
        ["left out on purpose:"]
        + [f"  {'/'.join(flags)}: {reason}" for flags, _, reason in REFUSED_RUN_FLAGS]
    )


def _add_run(p: argparse.ArgumentParser) -> None:
    _add_run_remote(p.add_argument_group("the ssh side"))
    _add_run_capture(p.add_argument_group("what to capture"))
    _add_run_dns(p.add_argument_group("DNS"))
    _add_run_local(p.add_argument_group("the local side"))
    add_router_arguments(p.add_argument_group("router mode and UDP"))
    _add_run_check(p.add_argument_group("diagnose"))
    _add_refused(p)


def _add_run_check(p: argparse._ActionsContainer) -> None:
    p.add_argument(
        "--check",
        action="store_true",
        help="check the remote as the tunnel would use it (ssh, host key, forwarding, "
        "python, DNS, routes), capture nothing, print a table and exit (1 when a "
        "needed check fails); needs no root",
    )
    p.add_argument("--json", action="store_true", help="with --check: the report as JSON")


def _add_run_remote(p: argparse._ActionsContainer) -> None:
    p.add_argument(
        "-r",
        "--remote",
        required=True,
        metavar="[USER@]HOST[:PORT]",
        help="ssh destination (anything ssh accepts, including Host aliases)",
    )
    p.add_argument(
        "-e",
        "--ssh-cmd",
        default=const.SSH_BIN,
        metavar="CMD",
        help="the ssh command and options, e.g. 'ssh -i key -p 2222'",
    )
    p.add_argument(
        "--forward",
        choices=[f.value for f in Forward],
        default="auto",
        help="who makes the remote connections: sshd (direct) or the uploaded "
        "helper; auto uses the helper only where sshd refuses forwarding",
    )
    p.add_argument(
        "--connect",
        choices=[m.value for m in ConnectMode],
        default=ConnectMode.REMOTE.value,
        help="when the app's connect() returns: once the remote end answered "
        "(remote: a closed port is refused, as on the real network) or at once (fast)",
    )
    p.add_argument(
        "--python",
        metavar="PATH",
        help="python on the remote for the helper (default: python3 and others)",
    )
    p.add_argument(
        "--keepalive",
        type=float,
        default=const.KEEPALIVE_INTERVAL,
        metavar="SECONDS",
        help="health ping interval (pings go at least every "
        "2 s); dead after three misses or 6 s of silence",
    )
    p.add_argument(
        "--streams",
        type=_streams,
        default=1,
        metavar="N",
        help=f"ssh connections to spread new connections over (1-{const.MAX_STREAMS}; default 1)",
    )


def _add_run_capture(p: argparse._ActionsContainer) -> None:
    p.add_argument(
        "subnets",
        nargs="*",
        metavar="SUBNET",
        help="IP/MASK[:PORT[-PORT]] to capture; 0/0 means all IPv4 and IPv6; hostnames allowed",
    )
    p.add_argument(
        "-s",
        "--subnets",
        dest="subnet_file",
        type=Path,
        metavar="FILE",
        help="read more subnets from FILE, one per line",
    )
    p.add_argument(
        "-x",
        "--exclude",
        action="append",
        default=[],
        metavar="SUBNET",
        help="do not capture SUBNET (repeatable)",
    )
    p.add_argument(
        "-X", "--exclude-from", type=Path, metavar="FILE", help="read excluded subnets from FILE"
    )
    p.add_argument(
        "-N",
        "--auto-nets",
        action="store_true",
        help="also capture the networks the remote routes (learnt at connect)",
    )
    p.add_argument(
        "--disable-ipv6", action="store_true", help="do not listen on ::1 nor capture IPv6"
    )
    p.add_argument(
        "--no-auto-exclude",
        action="store_true",
        help="do not exclude the ssh server's own address and port",
    )


def _add_run_dns(p: argparse._ActionsContainer) -> None:
    p.add_argument(
        "--dns",
        action="store_true",
        help="all DNS through the tunnel: catch every query (port 53, any "
        "address) and answer it from the remote's resolver",
    )
    p.add_argument(
        "--dns-domain",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="split DNS: only names under DOMAIN (repeatable) and the reverse "
        "zones of the subnets go through the tunnel; the rest stay local",
    )
    p.add_argument(
        "-H",
        "--remote-hosts",
        "--auto-hosts",
        action="store_true",
        help="answer the names of the remote's /etc/hosts (nothing is written to the local one)",
    )
    p.add_argument(
        "--ns-hosts",
        metavar="IP[,IP]",
        help="capture DNS to these resolvers instead of /etc/resolv.conf's",
    )
    p.add_argument(
        "--to-ns",
        metavar="IP[,IP]",
        help="remote nameservers to ask (default: the remote's /etc/resolv.conf)",
    )


def _add_run_local(p: argparse._ActionsContainer) -> None:
    _add_verbosity(p)
    p.add_argument(
        "-l",
        "--listen",
        metavar="[IP:]PORT",
        help="listener port (default: any free port on 127.0.0.1 and ::1)",
    )
    p.add_argument(
        "--method",
        choices=RUN_METHODS,
        default="auto",
        help="firewall backend (default: nft, else iptables; pf on macOS and FreeBSD); "
        "sshuttle's nat is that default (a redirect to our listener), its tproxy is "
        "the default plus --udp (UDP by TPROXY, TCP still redirected)",
    )
    p.add_argument(
        "--user", metavar="USER", help="capture only connections made by this local user"
    )


def _streams(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= const.MAX_STREAMS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number from 1 to {const.MAX_STREAMS}"
        )
    return int(text)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    args = list(argv)
    env = os.environ.get(ENV_ARGS)
    if env and args[:1] == ["run"]:
        args = ["run", *shlex.split(env), *args[1:]]
    parsed = build_parser().parse_args(args)
    if parsed.command == "run" and parsed.method in SSHUTTLE_METHODS:
        parsed.udp = parsed.udp or parsed.method == "tproxy"
        parsed.method = SSHUTTLE_METHODS[parsed.method]
    return parsed


def _read_list(path: Path | None, what: str) -> list[tuple[str, str]]:
    """The subnets of a file, one a line ("#" starts a comment), each with FILE:LINE."""
    if path is None:
        return []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    items = [(f"{path}:{n}", line.split("#")[0].strip()) for n, line in enumerate(lines, 1)]
    return [(where, text) for where, text in items if text]


def _parse_subnets(items: Sequence[tuple[str | None, str]], exclude: bool) -> list[Subnet]:
    result = []
    for where, text in items:
        prefix = f"{where}: " if where else ""
        try:
            result += parse_subnet(text, exclude=exclude)
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None
        warning = host_bits_warning(text)
        if warning:
            logging.getLogger(__name__).warning("%s%s", prefix, warning)
    return result


def _subnets(args: argparse.Namespace) -> tuple[Subnet, ...]:
    includes = [*((None, t) for t in args.subnets), *_read_list(args.subnet_file, "--subnets")]
    excludes = [
        *((None, t) for t in args.exclude),
        *_read_list(args.exclude_from, "--exclude-from"),
    ]
    wants = (args.dns, args.dns_domain, args.auto_nets, args.remote_hosts, args.check)
    if not (includes or any(wants)):
        raise UsageError(
            "run: give at least one SUBNET (or --dns, --dns-domain, --auto-nets, --remote-hosts)"
        )
    result = _parse_subnets(includes, exclude=False) + _parse_subnets(excludes, exclude=True)
    if args.disable_ipv6:
        result = [s for s in result if s.network.version == 4]
    return tuple(result)


def _addresses(text: str | None, flag: str) -> tuple[str, ...]:
    if not text:
        return ()
    out = []
    for item in text.split(","):
        try:
            out.append(str(ipaddress.ip_address(item.strip())))
        except ValueError:
            raise UsageError(f"{flag}: {item.strip()!r} is not an IP address") from None
    return tuple(out)


def _domains(texts: Sequence[str]) -> tuple[str, ...]:
    domains = []
    for text in texts:
        name = text.strip().lower().removesuffix(".")
        if not valid_host_name(name):
            raise UsageError(f"--dns-domain: {text!r} is not a DNS name")
        domains.append(name)
    return tuple(dict.fromkeys(domains))


def _listen(args: argparse.Namespace) -> tuple[tuple[str, ...], int]:
    default = ("127.0.0.1",) if args.disable_ipv6 else ("127.0.0.1", "::1")
    if not args.listen:
        return default, 0
    host, _, port = args.listen.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen: {args.listen!r} needs a port 1-65535")
    return ((_addresses(host.strip("[]"), "--listen") if host else default), int(port))


def _uid(name: str | None) -> int | None:
    if name is None:
        return None
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise UsageError(f"--user: no local user named {name!r}") from None


def run_spec(args: argparse.Namespace) -> TunnelSpec:
    """Validate `shuttled run` arguments once, into a frozen TunnelSpec."""
    try:
        ssh_command = tuple(shlex.split(args.ssh_cmd))
    except ValueError as exc:
        raise UsageError(f"--ssh-cmd: {exc}") from None
    if not ssh_command:
        raise UsageError("--ssh-cmd is empty")
    listen, port = _listen(args)
    target = SshTarget(args.remote, ssh_command, user=LocalUser.invoking())
    return TunnelSpec(
        name="run",
        target=target,
        subnets=_subnets(args),
        reconnect=False,
        forward=Forward(args.forward),
        connect=ConnectMode(args.connect),
        dns=bool(args.dns or args.ns_hosts or args.dns_domain),
        dns_mode="split" if args.dns_domain else "all",
        dns_domains=_domains(args.dns_domain),
        auto_nets=args.auto_nets,
        remote_hosts=args.remote_hosts,
        dns_capture=_addresses(args.ns_hosts, "--ns-hosts"),
        dns_upstream=_addresses(args.to_ns, "--to-ns"),
        listen=listen,
        port=port,
        uid=_uid(args.user),
        keepalive=args.keepalive,
        auto_exclude=not args.no_auto_exclude,
        streams=args.streams,
        pythons=(args.python,) if args.python else const.REMOTE_PYTHONS,
        router=router_settings(args),
    )


def setup_logging(verbose: int, quiet: bool) -> None:
    from shuttled.daemon import LineFormatter

    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(levels=verbose > 0))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # `shuttled run`'s own milestones (up, stopped) are shown even with -q.
    logging.getLogger("shuttled.run").setLevel(logging.INFO)
