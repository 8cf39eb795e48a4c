"""`shuttled`'s command line with the real parser: where daemon options go, what `run`
refuses and why, sshuttle's names, and one `shuttled: ` prefix on every error."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from shuttled import const
from shuttled.__main__ import main
from shuttled.cli import REFUSED_RUN_FLAGS, build_parser, parse
from shuttled.const import ExitCode
from shuttled.daemon import LineFormatter, _state_text
from shuttled.supervisor import Tunnel
from shuttled.tunnel.ssh import ssh_line


def shuttled(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv",
    [
        ["--config-dir", "/c", "--socket", "/s", "--state-dir", "/d", "--method", "nft", "daemon"],
        ["daemon", "--config-dir", "/c", "--socket", "/s", "--state-dir", "/d", "--method", "nft"],
        ["--config-dir", "/c", "--method", "nft", "daemon", "--socket", "/s", "--state-dir", "/d"],
    ],
)
def test_daemon_options_go_before_or_after_daemon(argv: list[str]) -> None:
    args = parse([*argv, "--no-dbus", "-v"])
    assert (args.config_dir, args.socket, args.state_dir) == (Path("/c"), Path("/s"), Path("/d"))
    assert (args.method, args.no_dbus, args.verbose) == ("nft", True, 1)


@pytest.mark.parametrize(
    ("command", "flag", "attribute"),
    [
        (["cleanup"], "--state-dir", "state_dir"),
        (["lockdown"], "--state-dir", "state_dir"),
        (["check"], "--config-dir", "config_dir"),
        (["trust", "work"], "--config-dir", "config_dir"),
    ],
)
def test_the_paths_a_command_reads_go_before_or_after_it(
    command: list[str], flag: str, attribute: str
) -> None:
    after = parse([*command, flag, "/after", "-v"])
    before = parse([flag, "/before", *command])
    assert (getattr(after, attribute), after.verbose) == (Path("/after"), 1)
    assert getattr(before, attribute) == Path("/before")


def test_daemon_options_not_given_keep_their_defaults() -> None:
    args = parse(["daemon"])
    assert (args.config_dir, args.socket, args.method, args.no_dbus) == (
        const.CONFIG_DIR,
        const.CONTROL_SOCKET,
        "auto",
        False,
    )


def test_daemon_help_lists_the_daemon_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["daemon", "--help"])
    out = capsys.readouterr().out
    for flag in ("--config-dir", "--socket", "--state-dir", "--method", "--no-dbus", "-v", "-q"):
        assert f"  {flag}" in out, flag


@pytest.mark.parametrize(
    ("argv", "err"),
    [
        (["daemon", "--bogus"], "shuttled: unrecognized arguments: --bogus\n"),
        (
            ["--method", "x"],
            "shuttled: argument --method: invalid choice: 'x' "
            "(choose from 'auto', 'nft', 'iptables', 'pf')\n",
        ),
        (
            ["run", "-r", "h"],
            "shuttled: run: give at least one SUBNET (or --dns, "
            "--dns-domain, --auto-nets, --remote-hosts)\n",
        ),
        (
            ["run", "10.0.0.0/8"],
            "shuttled: run: the following arguments are required: -r/--remote\n",
        ),
        (
            ["run", "--config-dir", "X", "-r", "h", "10.0.0.0/8"],
            "shuttled: run: --config-dir: "
            "a daemon option (before or after `daemon`); run takes no profiles\n",
        ),
        (
            ["run", "-r", "h", "-D", "10.0.0.0/8"],
            "shuttled: run: -D: no daemon mode: use the service (shuttled daemon, shuttlectl)\n",
        ),
        (
            ["run", "-r", "h", "--pidfile", "p.pid", "10.0.0.0/8"],
            "shuttled: run: --pidfile: "
            "no daemon mode: use the service (shuttled daemon, shuttlectl)\n",
        ),
        (
            ["run", "-r", "h", "--no-latency-control", "10.0.0.0/8"],
            "shuttled: run: "
            "--no-latency-control: per-channel windows replace sshuttle's global one: nothing "
            "to turn off or size\n",
        ),
        (
            ["run", "-r", "h", "--seed-hosts", "a,b", "10.0.0.0/8"],
            "shuttled: run: "
            "--seed-hosts: -H answers the remote's names through the resolver instead of "
            "writing /etc/hosts\n",
        ),
        (
            ["run", "-r", "h", "--syslog", "10.0.0.0/8"],
            "shuttled: run: --syslog: logs go to stderr, or to the journal under systemd\n",
        ),
        (
            ["run", "-r", "h", "--sudoers-no-modify"],
            "shuttled: run: --sudoers-no-modify: "
            "root is the daemon's job: the service and shuttlectl (a profile's `allow`) "
            "instead of sudoers\n",
        ),
    ],
)
def test_usage_errors_are_one_line_with_one_prefix_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], err: str
) -> None:  # fmt: skip
    assert shuttled(capsys, *argv) == (ExitCode.USAGE, "", err)


@pytest.mark.parametrize("command", ["run", "cleanup", "lockdown"])
def test_root_only_commands_say_so_with_one_prefix(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    argv = ["run", "-r", "h", "10.0.0.0/8"] if command == "run" else [command]
    code, out, err = shuttled(capsys, *argv)
    assert (code, out) == (ExitCode.USAGE, "")
    assert err.startswith(f"shuttled: {command}: must run as root") and err.count("\n") == 1


def test_every_refused_flag_answers_with_its_reason(capsys: pytest.CaptureFixture[str]) -> None:
    for flags, _, reason in REFUSED_RUN_FLAGS:
        for flag in flags:
            code, _, err = shuttled(capsys, "run", "-r", "h", flag, "10.0.0.0/8")
            assert (code, err) == (ExitCode.USAGE, f"shuttled: run: {flag}: {reason}\n")


def test_run_help_names_what_is_left_out_on_purpose(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    out = capsys.readouterr().out.splitlines()
    start = out.index("left out on purpose:")
    assert out[start + 1 :] == [
        f"  {'/'.join(flags)}: {reason}" for flags, _, reason in REFUSED_RUN_FLAGS
    ]


@pytest.mark.parametrize(
    ("method", "backend", "udp"),
    [("nat", "auto", False), ("tproxy", "auto", True), ("nft", "nft", False)],
)
def test_sshuttle_methods_map_to_ours(method: str, backend: str, udp: bool) -> None:
    args = parse(["run", "-r", "h", "--method", method, "10.0.0.0/8"])
    assert (args.method, args.udp) == (backend, udp)


def test_auto_hosts_is_remote_hosts() -> None:
    assert parse(["run", "-r", "h", "--auto-hosts"]).remote_hosts is True


def test_the_daemon_refuses_sshuttle_methods(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = shuttled(capsys, "daemon", "--method", "nat")
    assert code == ExitCode.USAGE and err.startswith("shuttled: daemon: argument --method")


# --- messages ---------------------------------------------------------------------------


def _record(message: str) -> logging.LogRecord:
    record = logging.LogRecord("shuttled.run", logging.INFO, __file__, 1, message, (), None)
    record.created = 1_700_000_000.0
    return record


def test_log_lines_are_stamped_outside_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.setenv("TZ", "UTC")
    import time

    time.tzset()
    assert LineFormatter().format(_record("up")) == "2023-11-14 22:13:20 shuttled: up"
    assert LineFormatter(levels=True).format(_record("up")).endswith(" shuttled: INFO up")


def test_the_journal_stamps_lines_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    assert LineFormatter().format(_record("up")) == "shuttled: up"


@pytest.mark.parametrize(
    ("raw", "line", "needed"),
    [
        (
            b"ssh: connect to host srv port 22: Connection refused\n",
            "connect to host srv port 22: Connection refused",
            True,
        ),
        (b"Host key verification failed.\r\n", "Host key verification failed.", True),
        (
            b"alice@srv: Permission denied (publickey).\n",
            "alice@srv: Permission denied (publickey).",
            True,
        ),
        (
            b"chan_send_close2: channel 3: no remote_id\n",
            "chan_send_close2: channel 3: no remote_id",
            False,
        ),
        (
            b"channel 2: open failed: connect failed: Connection refused\n",
            "channel 2: open failed: connect failed: Connection refused",
            False,
        ),
        (
            b"mux_client_request_session: read from master failed\n",
            "mux_client_request_session: read from master failed",
            False,
        ),
        (b"\n", "", False),
    ],
)
def test_ssh_stderr_keeps_what_a_user_needs_with_no_prefix_of_its_own(
    raw: bytes, line: str, needed: bool
) -> None:  # fmt: skip
    assert ssh_line(raw) == (line, needed)


@pytest.mark.parametrize(
    ("state", "error", "text"),
    [("connecting", None, "connecting"), ("failed", "host unknown", "failed: host unknown")],
)
def test_a_state_without_an_error_never_says_none(state: str, error: str | None, text: str) -> None:
    tunnel = cast(Tunnel, SimpleNamespace(state=state, last_error=error))
    assert _state_text(tunnel) == text
