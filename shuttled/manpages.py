"""Man pages generated from the objects the programs run on, so they cannot drift.

shuttled(8) and shuttlectl(1) come from the two argparse parsers (every verb,
option and choice), shuttled-profile(5) from the profile schema PROFILE_KEYS.
packaging/man/ holds the output, installed by the packages; a unit test
regenerates it and compares. Regenerate with:

    python3 -m shuttled.manpages packaging/man
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from shuttled import __version__, const
from shuttled.const import ExitCode

_OPTION_DASH = re.compile(r"(?<![\w\\])-")

EXIT_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.FAILED: "failed",
    ExitCode.USAGE: "usage error, bad request or invalid configuration",
    ExitCode.NOT_RUNNING: "the daemon is not running",
    ExitCode.NO_SUCH_PROFILE: "no such profile",
    ExitCode.DENIED: "permission denied",
    ExitCode.TIMEOUT: "timeout",
    ExitCode.NOT_UP: "the profile is not up (status, up \\-\\-wait)",
}


# --- roff ----------------------------------------------------------------------------------------


def roff(text: str) -> str:
    """Plain text as roff: backslashes escaped, option dashes as \\-, no control lines."""
    text = _OPTION_DASH.sub(r"\\-", text.replace("\\", "\\e"))
    return "\n".join("\\&" + ln if ln.startswith((".", "'")) else ln for ln in text.splitlines())


def bold(text: str) -> str:
    return f"\\fB{roff(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{roff(text)}\\fR"


def header(name: str, section: int, title: str) -> list[str]:
    # No date: the page must come out the same whenever it is generated.
    return [f'.TH {name.upper()} {section} "" "shuttled {__version__}" "{title}"']


def section(title: str, *lines: str) -> list[str]:
    return [f".SH {title}", *lines]


def paragraph(text: str) -> list[str]:
    return [".PP", roff(text)]


def item(term: str, text: str) -> list[str]:
    return [".TP", term, roff(text)]


# --- argparse ------------------------------------------------------------------------------------


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None and action.metavar is None:
        return " {" + "|".join(bold(str(c)) for c in action.choices) + "}"
    metavar = action.metavar or action.dest.upper()
    return " " + italic(metavar if isinstance(metavar, str) else " ".join(metavar))


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    return argparse.HelpFormatter(parser.prog)._expand_help(action)


def option_items(parser: argparse.ArgumentParser) -> list[str]:
    """One .TP item per option and positional, in the parser's order."""
    lines: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            term = ", ".join(bold(flag) for flag in action.option_strings) + _value(action)
        else:
            many = "..." if action.nargs in ("*", "+") else ""
            if action.choices is not None:
                term = "{" + "|".join(bold(str(c)) for c in action.choices) + "}"
            else:
                term = italic(str(action.metavar or action.dest)) + many
        lines += item(term, _help(parser, action))
    return lines


# --- shuttled(8) ---------------------------------------------------------------------------------


def shuttled_page() -> str:
    from shuttled.cli import build_parser

    parser = build_parser()
    subs, helps = subcommands(parser), subcommand_help(parser)
    lines = header("shuttled", 8, "System Administration")
    lines += section(
        "NAME",
        "shuttled \\- VPN over ssh: the root daemon, one\\-shot tunnels and firewall cleanup",
    )
    lines += section(
        "SYNOPSIS",
        f"{bold('shuttled')} [{italic('OPTIONS')}] [{bold('daemon')}]",
        ".br",
        f"{bold('shuttled run')} {bold('-r')} {italic('DEST')} "
        f"[{italic('OPTIONS')}] {italic('SUBNET')}...",
        ".br",
        f"{bold('shuttled cleanup')}",
    )
    lines += section("DESCRIPTION", *_shuttled_description(parser))
    lines += section("OPTIONS", *option_items(parser))
    lines += section("COMMANDS")
    for name, sub in subs.items():
        lines += [f".SS {name}", roff(helps.get(name, "")) + "."]
        lines += option_items(sub) if sub._actions[1:] else []
        lines += paragraph(sub.epilog) if sub.epilog else []  # run: what it leaves out
    lines += section("FILES", *_files())
    lines += section("EXIT STATUS", *_exit_codes())
    lines += section(
        "SEE ALSO",
        _see_also(
            "shuttlectl(1)",
            "shuttled-profile(5)",
            "ssh(1)",
            "ssh_config(5)",
            "nft(8)",
            "iptables(8)",
            "pfctl(8)",
            "systemd.service(5)",
        ),
    )
    return "\n".join(lines) + "\n"


def _shuttled_description(parser: argparse.ArgumentParser) -> list[str]:
    return [
        *paragraph(parser.description or ""),
        *paragraph(
            "Every TCP connection this machine makes to the chosen subnets, and its "
            "DNS, is caught by the local firewall (nft, iptables, or pf on macOS and "
            "FreeBSD, always in a table, chains or anchor of its own) and carried "
            "through one ssh connection: an OpenSSH ControlMaster reached in proxy "
            "mode. sshd on the remote makes the real connections; nothing is "
            "installed there."
        ),
        *paragraph(
            "Without a command, or with daemon, shuttled runs the service in the "
            "foreground (it never forks): it reads the profiles of the "
            "configuration directory (see shuttled-profile(5)), serves shuttlectl(1) "
            f"on the control socket {const.CONTROL_SOCKET} and on the D-Bus system "
            f"bus as {const.DBUS_NAME}, and brings up the profiles with autostart "
            "and those wanted up before a restart. SIGHUP reloads the "
            "configuration; SIGTERM and SIGINT stop every tunnel and remove every "
            "rule. At start it removes rules a crashed instance left behind."
        ),
        *paragraph(
            "run is sshuttle's experience: one tunnel in the foreground, no daemon, "
            "until Ctrl-C. Run through sudo, ssh runs as the invoking user, with "
            "that user's keys, agent and known_hosts."
        ),
        *paragraph(
            "cleanup removes every firewall rule shuttled owns: the daemon's and "
            "those of one-shot runs whose process is gone."
        ),
    ]


def _files() -> list[str]:
    lines: list[str] = []
    for path, text in (
        (
            f"{const.CONFIG_DIR}/*.yaml, {const.CONFIG_DIR}/profiles.d/*.yaml",
            "profiles, see shuttled-profile(5)",
        ),
        (f"{const.CONFIG_DIR}/ssh/", "keys and known_hosts of profiles without user"),
        (str(const.CONTROL_SOCKET), "the control socket (/var/run/shuttled on macOS and FreeBSD)"),
        (f"{const.STATE_DIR}/state.json", "which profiles are wanted up"),
    ):
        lines += item(bold(path), text)
    return lines


def _exit_codes() -> list[str]:
    lines: list[str] = []
    for code in ExitCode:
        lines += [".TP", bold(str(int(code))), EXIT_MEANINGS[code]]
    return lines


def _see_also(*pages: str) -> str:
    return ",\n".join(bold(p.split("(")[0]) + "(" + p.split("(")[1] for p in pages)


# --- shuttlectl(1) -------------------------------------------------------------------------------


def shuttlectl_page() -> str:
    from shuttlectl.cli import SOCKET_ENV, build_parser

    parser = build_parser()
    lines = header("shuttlectl", 1, "User Commands")
    lines += section("NAME", "shuttlectl \\- control the shuttled VPN\\-over\\-ssh daemon")
    lines += section(
        "SYNOPSIS",
        f"{bold('shuttlectl')} [{bold('--socket')} {italic('PATH')}] "
        f"[{bold('--json')}] {italic('VERB')} [{italic('ARGS')}]",
    )
    lines += section(
        "DESCRIPTION",
        *paragraph(
            (parser.description or "") + " shuttlectl is an unprivileged client of the daemon's "
            "control socket. Anyone may read; up and down need root, group "
            f"{const.ADMIN_GROUP}, or the profile's allow list; reload needs root or group "
            f"{const.ADMIN_GROUP}. --json, before or after the verb, prints JSON documents "
            'with a schema version ({"schema": 1, ...}), errors included.'
        ),
    )
    lines += section("OPTIONS", *option_items(parser))
    lines += section("VERBS", *_verb_items(parser))
    lines += section(
        "ENVIRONMENT", *item(bold(SOCKET_ENV), "the control socket, when --socket is not given")
    )
    lines += section("EXIT STATUS", *_exit_codes())
    lines += section("SEE ALSO", _see_also("shuttled(8)", "shuttled-profile(5)"))
    return "\n".join(lines) + "\n"


def _verb_items(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    helps = subcommand_help(parser)
    for name, sub in subcommands(parser).items():
        args = [a for a in sub._actions if not a.option_strings]
        usage = " ".join(_positional(a) for a in args)
        lines += [f".SS {bold(name)} {usage}".rstrip(), roff(helps.get(name, "")) + "."]
        own = [
            a
            for a in sub._actions
            if a.option_strings and a.dest not in ("help",) and a.dest not in ("socket", "json")
        ]
        if own:
            lines += [".RS", *_items_for(sub, own), ".RE"]
    return lines


def _positional(action: argparse.Action) -> str:
    if action.choices is not None:
        return "{" + "|".join(bold(str(c)) for c in action.choices) + "}"
    text = italic(str(action.metavar or action.dest))
    return f"[{text}]" if action.nargs == "?" else text


def _items_for(parser: argparse.ArgumentParser, actions: Iterable[argparse.Action]) -> list[str]:
    lines: list[str] = []
    for action in actions:
        term = ", ".join(bold(flag) for flag in action.option_strings) + _value(action)
        lines += item(term, _help(parser, action))
    return lines


# --- shuttled-profile(5) -------------------------------------------------------------------------

EXAMPLE = """\
work:
  remote: alice@bastion.example.com
  user: alice
  subnets: [10.0.0.0/8, "fd00::/8"]
  exclude: [10.5.0.0/24]
  dns: {mode: split, domains: [corp.example.com]}
  autostart: true
  allow: [group:netops]
"""


def profile_page() -> str:
    from shuttled.config import PROFILE_KEYS, PROFILES_KEY, PROFILES_SUBDIR

    lines = header("shuttled-profile", 5, "File Formats")
    lines += section("NAME", "shuttled\\-profile \\- tunnel profiles of shuttled(8)")
    lines += section(
        "SYNOPSIS",
        bold(f"{const.CONFIG_DIR}/*.yaml"),
        ".br",
        bold(f"{const.CONFIG_DIR}/{PROFILES_SUBDIR}/*.yaml"),
    )
    lines += section("DESCRIPTION", *_profile_description(PROFILES_KEY, PROFILES_SUBDIR))
    lines += section("KEYS")
    for spec in PROFILE_KEYS.values():
        lines += [
            ".TP",
            bold(spec.name),
            italic(f"{spec.type}; default: {spec.default_doc()}"),
            ".br",
            roff(spec.help + "."),
        ]
    lines += section(
        "DNS",
        *paragraph(
            "dns is off (or false), all (or true), split, or a map {mode, domains, "
            "nameservers}: mode is off, all or split; split needs domains, the names whose "
            "queries go through the tunnel; nameservers are the remote resolvers to ask "
            "(default: the remote's /etc/resolv.conf)."
        ),
    )
    lines += section("EXAMPLE", ".PP", ".nf", ".RS", roff(EXAMPLE.rstrip("\n")), ".RE", ".fi")
    lines += section("SEE ALSO", _see_also("shuttled(8)", "shuttlectl(1)", "ssh_config(5)"))
    return "\n".join(lines) + "\n"


def _profile_description(profiles_key: str, subdir: str) -> list[str]:
    return [
        *paragraph(
            f"Profiles are YAML files in {const.CONFIG_DIR} (shuttled --config-dir) "
            f"and in its {subdir}/ directory: every *.yaml and *.yml file is read. A "
            "file either maps profile names to profiles, or holds a single top-level "
            f"{profiles_key}: map that does; a file with only comments defines "
            "nothing. Profile names are 1 to 32 characters from A-Z a-z 0-9 _ -, "
            "each used once across all files. Unknown keys are errors. A profile "
            "needs subnets, auto_nets: true or dns."
        ),
        *paragraph(
            "Errors are reported all at once, each as file:line: profile.key: "
            "problem. A reload (shuttlectl reload, SIGHUP) with a broken file is "
            "refused and the running configuration stays. Two active profiles whose "
            "subnets overlap are refused."
        ),
        *paragraph(
            "An unprivileged caller can only act on profiles the administrator "
            "wrote: no ssh option or command ever comes from shuttlectl."
        ),
    ]


# --- output ---------------------------------------------------------------------------------------

PAGES: dict[str, Callable[[], str]] = {
    "shuttled.8": shuttled_page,
    "shuttlectl.1": shuttlectl_page,
    "shuttled-profile.5": profile_page,
}


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, render in PAGES.items():
        path = directory / name
        path.write_text(render())
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python3 -m shuttled.manpages DIRECTORY", file=sys.stderr)
        return ExitCode.USAGE
    for path in write(Path(args[0])):
        print(path)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
