"""Locked-down OpenSSH servers and unusual login shells: each case a real sshd_config
(`Lab.start_sshd`) or a real rc file, its behaviour pinned: it works where it can, and
where it cannot, `shuttled run` ends with one line naming the cause and the fix.

The README's "OpenSSH, locked down" table says the same for users.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.integration.daemon_util import DaemonSet, http_ok, root_profile, user_python, wait_for
from tests.lab import Lab, LabUser, clients, require_root_tools
from tests.lab.runner import start_run, stop_run

pytestmark = pytest.mark.usefixtures("tools")

EXIT_TIMEOUT = 30.0
# With --keepalive 1 our own liveness gives up after 3 s of silence: a tunnel that
# stays up for HOLD seconds was not judged dead (and did not reconnect).
HOLD = 6.0


@pytest.fixture(scope="module")
def tools() -> None:
    require_root_tools("ip", "sshd", "ssh", "ssh-keygen", "nft")


def via(lab: Lab, port: int) -> list[str]:
    """`shuttled run` arguments for the lab's root ssh to the sshd on ``port``."""
    return ["-e", f"{lab.ssh_cmd} -p {port}"]


def failed_run(lab: Lab, port: int, *args: str, name: str) -> str:
    """`shuttled run` that must fail: its exit code is 1 and its last line is returned."""
    argv = [sys.executable, "-m", "shuttled", "run", *via(lab, port), "-r", lab.remote]
    proc = lab.popen("cli", [*argv, *args, lab.target_net_v4], name=name)
    try:
        code = proc.wait(EXIT_TIMEOUT)
    finally:
        lab.stop(proc)
    lines = lab.log_tail(name, 60).strip().splitlines()
    assert code == 1 and lines, lab.log_tail(name, 60)
    return lines[-1]


def echo_ok(lab: Lab) -> bool:
    with lab.netns("cli"):
        return clients.echo(lab.tgt_v4, b"ping", timeout=5) == b"ping"


def held_up(lab: Lab, proc: subprocess.Popen[bytes], name: str) -> None:
    """The tunnel stays up and working, without a reconnect, for HOLD seconds."""
    time.sleep(HOLD)
    assert proc.poll() is None, lab.log_tail(name, 60)
    assert http_ok(lab, lab.tgt_v4) and echo_ok(lab)
    assert "lost" not in lab.log_tail(name, 200), lab.log_tail(name, 60)


# --- 1, 4: no TCP forwarding ----------------------------------------------------------------


@pytest.mark.parametrize("option", ["AllowTcpForwarding no", "DisableForwarding yes"])
def test_no_forwarding_falls_back_to_the_helper_and_works(lab: Lab, option: str) -> None:
    port = lab.start_sshd([option])
    name = f"nofwd-{option.split()[0]}"
    proc = start_run(lab, *via(lab, port), lab.target_net_v4, name=name)
    try:
        assert "helper mode" in lab.log_tail(name, 200)
        assert http_ok(lab, lab.tgt_v4) and echo_ok(lab)
    finally:
        stop_run(lab, proc)


def test_no_forwarding_and_no_python_fails_in_one_line_naming_cause_and_fix(lab: Lab) -> None:
    port = lab.start_sshd(["AllowTcpForwarding no"])
    line = failed_run(lab, port, "--python", "/nonexistent", name="nofwd-nopython")
    assert "refuses TCP forwarding" in line  # the cause
    assert "no Python 3.8 or newer on the remote (tried /nonexistent)" in line
    assert "install Python 3.8+ there" in line and "AllowTcpForwarding yes" in line  # fixes


# --- 2: PermitOpen ------------------------------------------------------------------------


def test_permit_open_in_direct_mode_allows_the_listed_and_resets_the_rest(
    lab: Lab, daemons: DaemonSet
) -> None:
    port = lab.start_sshd([f"PermitOpen {lab.tgt_v4}:{lab.ports.http}"])
    d = daemons.new()
    profile = root_profile(lab, [lab.target_net_v4], forward="direct", ssh_options={"Port": port})
    d.write_profile("po", profile)
    d.start()
    d.up("po")
    assert http_ok(lab, lab.tgt_v4)
    for _ in range(3):  # refused by sshd: reset at once, each one counted
        t0 = time.monotonic()
        with pytest.raises(ConnectionError), lab.netns("cli"):
            clients.echo(lab.tgt_v4, b"x", timeout=10)
        assert time.monotonic() - t0 < 5
    stats = wait_for(
        "3 refused connections counted", lambda: (s := d.stats("po"))["failed"] >= 3 and s, 10
    )
    # Refusals never switch the profile to the helper: the listed destination still
    # goes through sshd's own forwarding.
    assert stats["mode"] == "direct"
    assert http_ok(lab, lab.tgt_v4)


def test_permit_open_in_auto_mode_takes_the_helper_and_says_why(lab: Lab) -> None:
    # sshd answers a PermitOpen miss exactly as AllowTcpForwarding no (same reason
    # code, same text), so auto cannot tell them apart: the log names the way out.
    port = lab.start_sshd([f"PermitOpen {lab.tgt_v4}:{lab.ports.http}"])
    proc = start_run(lab, *via(lab, port), lab.target_net_v4, name="po-auto")
    try:
        log = lab.log_tail("po-auto", 200)
        assert "helper mode" in log and "forward: direct keeps to that list" in log
    finally:
        stop_run(lab, proc)


# --- 3: MaxSessions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(["MaxSessions 0"], id="0-direct"),
        pytest.param(["MaxSessions 1"], id="1-direct"),
        pytest.param(["MaxSessions 1", "AllowTcpForwarding no"], id="1-helper"),
    ],
)
def test_max_sessions_keeps_the_tunnel_up_without_a_reconnect(
    lab: Lab, options: Sequence[str]
) -> None:
    port = lab.start_sshd(options)
    name = "maxsessions-" + "-".join(o.split()[1] for o in options)
    proc = start_run(lab, *via(lab, port), "--keepalive", "1", lab.target_net_v4, name=name)
    try:
        held_up(lab, proc, name)
    finally:
        stop_run(lab, proc)


def test_max_sessions_0_logs_why_there_are_no_pings(lab: Lab) -> None:
    port = lab.start_sshd(["MaxSessions 0"])
    proc = start_run(lab, *via(lab, port), lab.target_net_v4, name="maxs0-note")
    try:
        assert "opens no session channel for us" in lab.log_tail("maxs0-note", 200)
    finally:
        stop_run(lab, proc)


# --- 5: ForceCommand ------------------------------------------------------------------------


def test_force_command_leaves_direct_mode_working(lab: Lab) -> None:
    port = lab.start_sshd(["ForceCommand /bin/false"])
    name = "force-direct"
    proc = start_run(lab, *via(lab, port), "--keepalive", "1", lab.target_net_v4, name=name)
    try:
        held_up(lab, proc, name)
    finally:
        stop_run(lab, proc)


@pytest.mark.parametrize("command", ["/bin/false", "echo hello from ForceCommand"])
def test_force_command_stops_the_helper_in_one_line(lab: Lab, command: str) -> None:
    port = lab.start_sshd([f"ForceCommand {command}", "AllowTcpForwarding no"])
    line = failed_run(lab, port, name=f"force-{Path(command.split()[0]).name}")
    assert "ran another command instead of ours" in line and "ForceCommand" in line, line
    if command.startswith("echo"):
        assert "printed 'hello from ForceCommand'" in line


# --- 6, 7: the user's login shell -----------------------------------------------------------


@pytest.fixture
def noisy_user(lab: Lab, lab_user: LabUser) -> Iterator[LabUser]:
    """A user whose rc files print on stdout and stderr before anything else, and
    whose ~/bin (first in PATH) holds a python3 that says it is 3.6."""
    home = Path(lab_user.home)
    noise = 'echo "Welcome to $(hostname)! {0} stdout"; echo "{0} stderr junk" >&2\n'
    path = 'export PATH="$HOME/bin:$PATH"\n'
    # Before Debian's "not interactive: return", as so many real ones are.
    bashrc = home / ".bashrc"
    bashrc.write_text(noise.format("bashrc") + path + bashrc.read_text())
    profile = home / ".profile"
    profile.write_text(noise.format("profile") + profile.read_text())
    fake = home / "bin" / "python3"
    fake.parent.mkdir()
    # What our loader asks of it (sys.version_info, sys.version), a 3.6 answers.
    fake.write_text(
        f"#!{user_python()} -I\n"  # one the user may run (not under /root)
        "import sys\n"
        "sys.version_info = (3, 6, 15, 'final', 0)\n"
        "sys.version = '3.6.15 (faked by the lab)'\n"
        "exec(sys.argv[sys.argv.index('-c') + 1])\n"
    )
    fake.chmod(0o755)
    yield lab_user


def test_login_shell_output_confuses_neither_helper_nor_remote_commands(
    lab: Lab, noisy_user: LabUser
) -> None:
    banner = Path(lab.tmpdir, "banner")
    banner.write_text("Authorized use only\n")
    port = lab.start_sshd([f"Banner {banner}", "AllowTcpForwarding no"])
    # The rc files' output, seen by a plain ssh command: what the parsers must survive.
    seen = lab.run(
        "cli",
        ["ssh", "-p", str(port), noisy_user.remote, "true"],
        user=noisy_user,
        env=noisy_user.env(),
        check=False,
    )
    assert "bashrc stdout" in seen.stdout and "bashrc stderr junk" in seen.stderr
    name = "noisy"
    proc = start_run(
        lab,
        "-N",  # ip route on the remote
        "-H",  # its /etc/hosts
        "--dns",  # its /etc/resolv.conf
        "-e",
        f"ssh -p {port}",
        lab.target_net_v4,
        remote=noisy_user.remote,
        user=noisy_user,
        name=name,
    )
    try:
        assert "helper mode" in lab.log_tail(name, 200)
        assert http_ok(lab, lab.tgt_v4) and echo_ok(lab)
        with lab.netns("cli"):
            answer = clients.dns_query(lab.fake_dns_v4, lab.dns_name)
        assert answer.addresses == [lab.tgt_v4]
        log = lab.log_tail(name, 200)
        assert "malformed" not in log and "ignored" not in log, log
    finally:
        stop_run(lab, proc)


def test_a_too_old_python3_is_named_with_its_version(lab: Lab, noisy_user: LabUser) -> None:
    port = lab.start_sshd(["AllowTcpForwarding no"])
    name = "oldpy"
    argv = [sys.executable, "-m", "shuttled", "run", "--python", "python3"]
    argv += ["-e", f"ssh -p {port}", "-r", noisy_user.remote, lab.target_net_v4]
    env = {"SUDO_UID": str(noisy_user.uid), "SUDO_GID": str(noisy_user.gid)}
    proc = lab.popen("cli", argv, name=name, env={**os.environ, **env})
    try:
        assert proc.wait(EXIT_TIMEOUT) == 1, lab.log_tail(name, 60)
    finally:
        lab.stop(proc)
    line = lab.log_tail(name, 5).strip().splitlines()[-1]
    assert "no Python 3.8 or newer on the remote (tried python3); python3 is 3.6.15" in line
