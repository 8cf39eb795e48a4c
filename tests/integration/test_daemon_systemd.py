"""The daemon as a service: sd_notify messages on a NOTIFY_SOCKET the test listens on, the
unit file through `systemd-analyze verify`, and the launchd plist against the unit."""

from __future__ import annotations

import configparser
import itertools
import os
import plistlib
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.daemon_util import (
    REPO_ROOT,
    DaemonSet,
    NotifyListener,
    accepts,
    http_ok,
    nft_table,
    root_profile,
)
from tests.lab import Lab, in_ci

pytestmark = pytest.mark.integration

UNIT = REPO_ROOT / "systemd" / "shuttled.service"
LAUNCHD = REPO_ROOT / "launchd"


def test_ready_status_and_watchdog_arrive_on_the_notify_socket(
    lab: Lab, daemons: DaemonSet
) -> None:
    d = daemons.new()
    d.write_profile("work", root_profile(lab, lab.target_nets, autostart=True))
    listener = NotifyListener(Path(lab.tmpdir) / "notify.sock")
    try:
        d.start(env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000"}, wait=False)
        _, sender, ready = listener.until("READY=1", timeout=30.0)
        # Freeze the daemon the moment READY arrives: what it promised must exist already.
        os.kill(d.pid, signal.SIGSTOP)
        try:
            socket_ready = accepts(d.socket)
            table = nft_table(lab)
        finally:
            os.kill(d.pid, signal.SIGCONT)
        assert socket_ready, "READY=1 before the control socket accepts connections"
        assert table is not None, "READY=1 before table inet shuttled exists"
        assert sender == d.pid  # NotifyAccess=main: only the main process counts
        assert any(line.startswith("STATUS=") and "profiles up" in line for line in ready), ready

        d.wait_state("work", "up")
        listener.drain(2.5)  # pings every WATCHDOG_USEC/2 = 0.5 s from the event loop
        after_ready = [m for m in listener.messages if "READY=1" not in m[2]]
        pings = [t for t, _, lines in after_ready if "WATCHDOG=1" in lines]
        assert len(pings) >= 3, listener.lines()
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 1.0, gaps  # within WATCHDOG_USEC, with room to spare
        statuses = [line for line in listener.lines() if line.startswith("STATUS=")]
        assert "STATUS=1 of 1 profiles up" in statuses, statuses
        assert all(pid == d.pid for _, pid, _ in listener.messages)

        assert d.stop() == 0
        listener.drain(0.2)
        assert "STOPPING=1" in listener.lines()
    finally:
        listener.close()


def test_daemon_carries_on_when_its_notify_socket_goes_away(lab: Lab, daemons: DaemonSet) -> None:
    """sd_notify failing (systemd gone, a stale NOTIFY_SOCKET) must not matter."""
    d = daemons.new()
    d.write_profile("work", root_profile(lab, lab.target_nets))
    listener = NotifyListener(Path(lab.tmpdir) / "notify-gone.sock")
    try:
        d.start(env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000"}, wait=False)
        listener.until("READY=1", timeout=30.0)
    finally:
        listener.close()
    try:
        time.sleep(1.5)  # watchdog pings (every 0.5 s) now find no socket
        assert d.alive
        up = d.ctl("up", "work", "--timeout", "10")
        assert up.returncode == 0, (up.stderr, d.log())
        assert http_ok(lab, lab.tgt_v4)
        assert d.stop() == 0, d.log()
    finally:
        d.stop()  # the exit code is this test's to judge, not the fixture's


def test_no_notify_socket_means_no_notifications_and_a_normal_start(
    lab: Lab, daemons: DaemonSet
) -> None:
    d = daemons.new()
    d.write_profile("work", root_profile(lab, lab.target_nets))
    d.start()  # NOTIFY_SOCKET is removed from its environment
    assert d.ctl("status").returncode == 0
    assert d.stop() == 0


# --- unit and plist: static checks ---------------------------------------------------------------


def _shuttled_executable() -> str:
    """The installed `shuttled` entry point (next to this python first: pyenv shims are
    scripts that re-exec, the real entry point is what a package would install)."""
    beside = Path(sys.executable).parent / "shuttled"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("shuttled")
    if found is None:
        pytest.fail("the shuttled entry point is not installed (pip install -e .)")
    return found


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_analyze_verify_prints_nothing_for_the_unit(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if in_ci():
            pytest.fail("systemd-analyze is missing in CI")
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/bin/shuttled", _shuttled_executable()))
    result = subprocess.run(
        [tool, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_unit_is_a_notify_service_with_watchdog_and_cleanup_after_stop() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["WatchdogSec"]
    assert shlex.split(service["ExecStopPost"])[1:] == ["cleanup"]
    reload = [
        ln.partition("=")[2] for ln in UNIT.read_text().splitlines() if ln.startswith("ExecReload=")
    ]
    assert [shlex.split(c)[1:] for c in reload] == [["check"], ["-HUP", "$MAINPID"]]
    start = shlex.split(service["ExecStart"])
    assert Path(start[0]).name == "shuttled" and start[1:] == ["daemon"]


def test_launchd_plist_parses_and_runs_what_the_unit_runs() -> None:
    plists = sorted(LAUNCHD.glob("*.plist")) if LAUNCHD.is_dir() else []
    if not plists:
        pytest.skip("no launchd/*.plist yet")
    start = shlex.split(_unit()["Service"]["ExecStart"])
    for path in plists:
        with path.open("rb") as fh:
            plist = plistlib.load(fh)
        assert isinstance(plist, dict), path
        assert plist.get("Label"), f"{path}: no Label"
        args = plist.get("ProgramArguments")
        assert isinstance(args, list) and args, f"{path}: no ProgramArguments"
        assert Path(args[0]).name == Path(start[0]).name, (path, args, start)
        assert args[1:] == start[1:], (path, args, start)


def test_dbus_policy_is_well_formed_xml_owning_the_bus_name() -> None:
    import xml.etree.ElementTree as ET

    from shuttled.const import DBUS_NAME

    policy = REPO_ROOT / "systemd" / f"{DBUS_NAME}.conf"
    root = ET.parse(policy).getroot()
    assert root.tag == "busconfig"
    owners = [e.get("own") for e in root.iter("allow") if e.get("own")]
    assert DBUS_NAME in owners
