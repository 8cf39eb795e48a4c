"""`shuttled trust` against the lab's sshd, and daemon profiles that fail at once
(not after `up`'s timeout) when no retry can help: an untrusted host key, a key the
server refuses. Root profiles here read <config dir>/ssh/known_hosts, as in the service."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.integration.daemon_util import REPO_ROOT, UP_TIMEOUT, Daemon, DaemonSet
from tests.lab import Lab


def boot_profile(lab: Lab, identity: str | None = None) -> dict[str, object]:
    """A root profile as an admin writes one: no UserKnownHostsFile of the lab's."""
    return {
        "remote": f"root@{lab.srv_v4}",
        "identity": identity or lab.identity,
        "ssh_options": {"ConnectTimeout": 5},
        "subnets": list(lab.target_nets),
    }


def shuttled_trust(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "shuttled", "--config-dir", str(daemon.config_dir)]
    # stdin is not a terminal here: the asking path must refuse, not hang.
    return daemon.lab.run("cli", [*argv, "trust", *args], check=False, cwd=str(REPO_ROOT))


def lab_fingerprint(lab: Lab) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-lf", f"{lab.host_key}.pub"], capture_output=True, text=True, check=True
    ).stdout
    return out.split()[1]  # "256 SHA256:... comment (ED25519)"


def test_trust_shows_the_lab_fingerprint_and_writes_only_with_yes(
    lab: Lab, daemons: DaemonSet
) -> None:
    daemon = daemons.new()
    daemon.write_profile("work", boot_profile(lab))
    known = daemon.config_dir / "ssh" / "known_hosts"

    asked = shuttled_trust(daemon, "work")
    assert asked.returncode == 2, asked.stdout + asked.stderr
    assert f"ED25519 key fingerprint is {lab_fingerprint(lab)}" in asked.stdout
    assert "no terminal to ask on" in asked.stderr and "--yes" in asked.stderr
    assert not known.exists()

    written = shuttled_trust(daemon, "work", "--yes")
    assert written.returncode == 0, written.stdout + written.stderr
    assert f"written to {known}" in written.stdout
    # ssh itself, strict and batch, now accepts the server with that file alone
    check = lab.run(
        "cli",
        [
            "ssh",
            "-i",
            lab.identity,
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={known}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            f"root@{lab.srv_v4}",
            "true",
        ],
        check=False,
    )
    assert check.returncode == 0, check.stderr
    again = shuttled_trust(daemon, "work", "--yes")
    assert again.returncode == 0 and "already trusted" in again.stdout


def test_an_unknown_host_key_fails_up_at_once_with_the_trust_command(
    lab: Lab, daemons: DaemonSet
) -> None:
    daemon = daemons.new()
    daemon.write_profile("work", boot_profile(lab))
    daemon.start()
    started = time.monotonic()
    up = daemon.ctl("up", "work", "--timeout", str(UP_TIMEOUT))
    took = time.monotonic() - started
    trust = f"run `sudo shuttled --config-dir {daemon.config_dir} trust work`"
    assert up.returncode == 1, up.stdout + up.stderr
    assert f"host key for root@{lab.srv_v4} is not known: {trust}" in up.stderr
    assert took < UP_TIMEOUT, f"up ended by its timeout ({took:.0f} s), not at once"
    assert daemon.state("work") == "failed"

    assert shuttled_trust(daemon, "work", "--yes").returncode == 0
    daemon.up("work")  # the fix the error named is all it takes


def test_a_refused_key_fails_up_at_once_with_the_auth_reason(
    lab: Lab, daemons: DaemonSet, tmp_path: Path
) -> None:
    stranger = tmp_path / "id_stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    daemon = daemons.new()
    daemon.write_profile("work", boot_profile(lab, str(stranger)))
    assert shuttled_trust(daemon, "work", "--yes").returncode == 0  # the key exchange alone
    daemon.start()
    up = daemon.ctl("up", "work", "--timeout", str(UP_TIMEOUT))
    assert up.returncode == 1, up.stdout + up.stderr
    assert "refused the keys (Permission denied (publickey))" in up.stderr
    assert f"ssh-copy-id -i {stranger}" in up.stderr
    assert daemon.state("work") == "failed"
