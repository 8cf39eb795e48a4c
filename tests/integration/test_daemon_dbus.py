"""The daemon's D-Bus API on a private dbus-daemon configured like a system bus (deny by
default) plus our own policy file, with clients in other processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon_util import (
    REPO_ROOT,
    Daemon,
    DaemonSet,
    NotifyListener,
    http_ok,
    nft_table,
    root_profile,
    wait_for,
)
from tests.lab import Lab, LabUser, in_ci
from tests.lab.bus import SYSTEM_LIKE_POLICY, bus_config

pytestmark = pytest.mark.integration

BUS_NAME = "io.github.shuttled"
MANAGER_PATH = "/io/github/shuttled"
PROFILE_PATH = f"{MANAGER_PATH}/profile/work"
POLICY = REPO_ROOT / "systemd" / f"{BUS_NAME}.conf"


# A client in its own process: subscribes to StateChanged, calls Status and Up, waits for
# the "up" signal. One JSON document a line on stdout.
CLIENT = textwrap.dedent("""
    import asyncio, json, sys
    from dbus_fast.aio import MessageBus

    async def main(address, name, manager_path, profile_path):
        bus = await MessageBus(bus_address=address).connect()
        manager = bus.get_proxy_object(
            name, manager_path, await bus.introspect(name, manager_path)
        ).get_interface(name + ".Manager1")
        profile = bus.get_proxy_object(
            name, profile_path, await bus.introspect(name, profile_path)
        ).get_interface(name + ".Profile1")
        states, up = [], asyncio.Event()

        def changed(state, error):
            states.append(state)
            print(json.dumps({"StateChanged": [state, error]}), flush=True)
            if state == "up":
                up.set()

        profile.on_state_changed(changed)
        print(json.dumps({"profiles": await manager.get_profiles()}), flush=True)
        print(json.dumps({"status": json.loads(await manager.call_status("work"))}),
              flush=True)
        print(json.dumps({"up": json.loads(await profile.call_up(True, 30.0))}), flush=True)
        await asyncio.wait_for(up.wait(), 10)
        print(json.dumps({"State": await profile.get_state(), "states": states}), flush=True)
        bus.disconnect()

    asyncio.run(asyncio.wait_for(main(*sys.argv[1:]), 60))
""")


@pytest.fixture
def system_bus(lab: Lab) -> Iterator[str]:
    """A private dbus-daemon (stopped by PID afterwards); its address."""
    missing = [t for t in ("dbus-daemon", "busctl") if shutil.which(t) is None]
    if missing:
        if in_ci():
            pytest.fail(f"missing in CI: {', '.join(missing)}")
        pytest.skip(f"not installed: {', '.join(missing)}")
    tool = shutil.which("dbus-daemon")
    assert tool is not None
    pytest.importorskip("dbus_fast")
    sock = Path(lab.tmpdir) / "system_bus_socket"
    config = Path(lab.tmpdir) / "system-bus.conf"
    config.write_text(bus_config(sock, SYSTEM_LIKE_POLICY, POLICY))
    proc = lab.popen(
        "cli", [tool, f"--config-file={config}", "--nofork", "--nopidfile"], name="dbus-daemon"
    )
    try:
        wait_for(
            "the private dbus-daemon's socket",
            lambda: (
                sock.exists() or (proc.poll() is not None and _fail(lab.log_tail("dbus-daemon")))
            ),
            10.0,
        )
        yield f"unix:path={sock}"
    finally:
        lab.stop(proc)


def _fail(text: str) -> bool:
    raise AssertionError(f"dbus-daemon exited:\n{text}")


def busctl(
    lab: Lab, address: str, *args: str, user: LabUser | None = None
) -> subprocess.CompletedProcess[str]:
    return lab.run(
        "cli",
        ["busctl", f"--address={address}", "--timeout=40", *args],
        check=False,
        user=user,
        timeout=60,
    )


def name_has_owner(lab: Lab, address: str) -> bool:
    result = busctl(
        lab,
        address,
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "NameHasOwner",
        "s",
        BUS_NAME,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip() == "b true"


def start_on_bus(d: Daemon, address: str, listener: NotifyListener | None = None) -> None:
    env = {"DBUS_SYSTEM_BUS_ADDRESS": address}
    if listener is not None:
        env["NOTIFY_SOCKET"] = str(listener.path)
    d.start(env=env, dbus=True, wait=listener is None)


def test_ready_only_once_the_bus_name_is_owned(
    lab: Lab, daemons: DaemonSet, system_bus: str
) -> None:
    d = daemons.new()
    d.write_profile("work", root_profile(lab, lab.target_nets))
    listener = NotifyListener(Path(lab.tmpdir) / "notify-dbus.sock")
    try:
        start_on_bus(d, system_bus, listener)
        listener.until("READY=1", timeout=30.0)
        os.kill(d.pid, signal.SIGSTOP)  # the bus daemon answers for it meanwhile
        try:
            owned = name_has_owner(lab, system_bus)
            table = nft_table(lab)
        finally:
            os.kill(d.pid, signal.SIGCONT)
        assert owned, "READY=1 before io.github.shuttled was owned"
        assert table is not None
        assert "D-Bus API unavailable" not in d.log(), d.log()
        assert d.stop() == 0
    finally:
        listener.close()
    assert not name_has_owner(lab, system_bus)


def test_dbus_client_in_another_process_calls_status_and_up_and_gets_state_changed(
    lab: Lab, daemons: DaemonSet, system_bus: str
) -> None:
    d = daemons.new()
    d.write_profile("work", root_profile(lab, lab.target_nets))
    start_on_bus(d, system_bus)
    wait_for("the daemon to own its bus name", lambda: name_has_owner(lab, system_bus), 10.0)

    script = Path(lab.tmpdir) / "dbus_client.py"
    script.write_text(CLIENT)
    result = lab.run(
        "cli",
        [sys.executable, str(script), system_bus, BUS_NAME, MANAGER_PATH, PROFILE_PATH],
        check=False,
        timeout=90,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{d.log()}"
    out: dict[str, object] = {}
    signals = []
    for line in result.stdout.splitlines():
        document = json.loads(line)
        if "StateChanged" in document:
            signals.append(document["StateChanged"])
        else:
            out.update(document)

    assert out["profiles"] == [PROFILE_PATH]
    status = out["status"]
    assert isinstance(status, dict) and status["name"] == "work" and status["state"] == "down"
    up = out["up"]
    assert isinstance(up, dict) and up["state"] == "up"
    assert out["State"] == "up"
    states = [state for state, _error in signals]
    assert states[-1] == "up" and "connecting" in states, signals
    assert d.state("work") == "up"
    assert http_ok(lab, lab.tgt_v4)


def test_dbus_refuses_an_unprivileged_up_and_names_errors(
    lab: Lab, lab_user: LabUser, daemons: DaemonSet, system_bus: str
) -> None:
    d = daemons.new()
    d.write_profile("work", root_profile(lab, lab.target_nets))
    start_on_bus(d, system_bus)
    wait_for("the daemon to own its bus name", lambda: name_has_owner(lab, system_bus), 10.0)

    status = busctl(
        lab,
        system_bus,
        "call",
        BUS_NAME,
        PROFILE_PATH,
        f"{BUS_NAME}.Profile1",
        "Status",
        user=lab_user,
    )
    assert status.returncode == 0, status.stderr
    assert '\\"state\\":\\"down\\"' in status.stdout, status.stdout

    denied = busctl(
        lab,
        system_bus,
        "call",
        BUS_NAME,
        PROFILE_PATH,
        f"{BUS_NAME}.Profile1",
        "Up",
        "bd",
        "true",
        "30",
        user=lab_user,
    )
    assert denied.returncode != 0
    assert "permission denied" in denied.stderr, denied.stderr
    assert d.state("work") == "down"

    missing = busctl(
        lab,
        system_bus,
        "call",
        BUS_NAME,
        MANAGER_PATH,
        f"{BUS_NAME}.Manager1",
        "Status",
        "s",
        "nope",
    )
    assert missing.returncode != 0 and "no profile named 'nope'" in missing.stderr, missing.stderr
