"""Least privilege: the unit's `systemd-analyze security` exposure stays at 2.5 or below,
and the daemon still works under the unit's sandbox (capabilities, system-call filter,
MemoryDenyWriteExecute, hidden /proc, read-only /proc/sys), applied by unit_sandbox.py
since the lab has no systemd to run the unit itself."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.daemon_util import REPO_ROOT, DaemonSet, http_ok, user_profile, wait_for
from tests.lab import Lab, LabUser, in_ci

pytestmark = pytest.mark.integration

UNIT = REPO_ROOT / "systemd" / "shuttled.service"
SANDBOX = Path(__file__).with_name("unit_sandbox.py")
MAX_EXPOSURE = 2.5
NEEDED_CAPS = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID"}
CAP_KILL = 5


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if in_ci():
            pytest.fail(f"{name} is missing in CI")
        pytest.skip(f"{name} is not installed")
    return found


def exposure(unit: Path, cwd: Path) -> float:
    """The overall exposure `systemd-analyze security` gives the unit file, offline."""
    result = subprocess.run(
        [_tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert found, (result.returncode, result.stdout[-2000:], result.stderr)
    return float(found.group(1))


def test_unit_exposure_is_at_most_2_5(tmp_path: Path) -> None:
    score = exposure(UNIT, tmp_path)
    print(f"systemd-analyze security: {score}")
    assert score <= MAX_EXPOSURE


def test_unit_keeps_only_the_capabilities_the_daemon_needs() -> None:
    lines = [
        line for line in UNIT.read_text().splitlines() if line.startswith("CapabilityBoundingSet=")
    ]
    assert len(lines) == 1, lines
    assert set(lines[0].partition("=")[2].split()) == NEEDED_CAPS


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def test_daemon_under_the_units_sandbox_carries_a_user_profile(
    lab: Lab, lab_user: LabUser, daemons: DaemonSet
) -> None:
    """No CAP_SYS_PTRACE, CAP_KILL, CAP_CHOWN or CAP_DAC_*: the profile's ssh (run as
    the user) still gets its server connection from us, its control socket is still
    reached, and `down` still ends it."""
    d = daemons.new()
    plain = d.argv
    d.argv = lambda dbus=False: [
        sys.executable,
        str(SANDBOX),
        str(UNIT),
        "--",  # type: ignore[method-assign]
        *plain(dbus),
    ]
    d.write_profile("mine", user_profile(lab_user, lab.target_nets))
    d.start()
    status = _status(d.pid)
    assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1", status
    assert not int(status["CapEff"], 16) & (1 << CAP_KILL), status["CapEff"]

    d.up("mine")
    assert http_ok(lab, lab.tgt_v4)
    master = psutil.Process(d.ssh_pid("mine"))
    assert master.uids().real == lab_user.uid
    # The server connection is the daemon's own (fd passing), shared with ssh.
    sockets = lab.run("cli", ["ss", "-Htnp", "dst", f"{lab.srv_v4}:{lab.ports.ssh}"]).stdout
    assert f"pid={d.pid}," in sockets and f"pid={master.pid}," in sockets, sockets

    assert d.ctl("down", "mine").returncode == 0
    wait_for(
        "the user's ssh master to exit after down (no CAP_KILL)",
        lambda: not master.is_running() or master.status() == psutil.STATUS_ZOMBIE,
        10.0,
    )
    started = time.monotonic()
    assert d.stop() == 0, d.log()
    assert time.monotonic() - started < 10
