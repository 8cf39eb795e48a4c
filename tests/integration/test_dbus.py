"""The D-Bus API end to end: a private dbus-daemon (with the shipped policy file), the
service on a fake core, and clients in other processes -- a dbus-fast script as root,
dbus-send as unprivileged uids -- so that the bus daemon, not the test, says who calls."""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shuttled import const
from shuttled.config import Config, Profile
from shuttled.control.dbus import (
    MANAGER_INTERFACE,
    PROFILE_INTERFACE,
    DbusControl,
    manager_methods,
    profile_methods,
    profile_path,
)
from shuttled.errors import ShuttledError
from tests.fake_core import FakeCore, fake_config
from tests.helpers import LoopThread
from tests.lab import require_root_tools, which
from tests.lab.bus import SYSTEM_LIKE_POLICY, Bus, private_bus

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "systemd" / "io.github.shuttled.conf"
# Accounts every Debian system has: dbus-daemon refuses uids that have no passwd entry.
MEMBER, STRANGER, TEAM = "daemon", "bin", "users"  # in work's allow list / in none / lab's
ERR = f"{const.DBUS_NAME}.Error."


# The root client: a separate Python process speaking dbus-fast through proxies built from
# the service's own introspection, so it also proves that the generated methods are real.
CLIENT = r"""
import asyncio, json, sys
from dbus_fast import DBusError
from dbus_fast.aio import MessageBus

NAME, ROOT = "io.github.shuttled", "/io/github/shuttled"
MANAGER, PROFILE = NAME + ".Manager1", NAME + ".Profile1"


async def proxy(bus, path, interface):
    node = await bus.introspect(NAME, path)
    methods = {i.name: {m.name: "".join(a.signature for a in m.in_args) for m in i.methods}
               for i in node.interfaces}
    return bus.get_proxy_object(NAME, path, node).get_interface(interface), methods


async def error_of(coro):
    try:
        await coro
    except DBusError as exc:
        return [exc.type, exc.text]
    return None


async def main(address):
    bus = await MessageBus(bus_address=address).connect()
    manager, manager_methods = await proxy(bus, ROOT, MANAGER)
    paths = await manager.get_profiles()
    work_path = [p for p in paths if p.endswith("/work")][0]
    work, profile_methods = await proxy(bus, work_path, PROFILE)
    props = bus.get_proxy_object(NAME, work_path, await bus.introspect(NAME, work_path)
                                 ).get_interface("org.freedesktop.DBus.Properties")
    signals, changed, events = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()
    work.on_state_changed(lambda state, error: signals.put_nowait([state, error]))
    manager.on_event(lambda event: events.put_nowait(json.loads(event)))
    props.on_properties_changed(
        lambda iface, values, _inv: changed.put_nowait({k: v.value for k, v in values.items()}))
    out = {"manager_methods": manager_methods[MANAGER],
           "profile_methods": profile_methods[PROFILE], "paths": paths}
    out["status"] = json.loads(await manager.call_status("work"))
    out["status_all"] = json.loads(await manager.call_status(""))
    out["name_prop"] = await work.get_name()
    out["up"] = json.loads(await manager.call_up("work", True, 5.0))
    out["signal_up"] = await asyncio.wait_for(signals.get(), 10)
    out["changed_up"] = await asyncio.wait_for(changed.get(), 10)
    out["event_up"] = await asyncio.wait_for(events.get(), 10)
    out["state_prop"] = await work.get_state()
    out["rx_prop"] = await work.get_rx()
    out["down"] = json.loads(await work.call_down())
    out["signal_down"] = await asyncio.wait_for(signals.get(), 10)
    out["version"] = json.loads(await manager.call_version())
    out["no_such_status"] = await error_of(manager.call_status("nope"))
    out["no_such_up"] = await error_of(manager.call_up("nope", True, 1.0))
    out["bad_timeout"] = await error_of(manager.call_up("work", True, -1.0))
    out["missing_profile"] = await error_of(manager.call_up("", True, 1.0))
    out["timeout"] = await error_of(manager.call_up("slow", True, 0.2))
    print(json.dumps(out))
    bus.disconnect()


asyncio.run(asyncio.wait_for(main(sys.argv[1]), 60))
"""


@pytest.fixture
def bus() -> Iterator[Bus]:
    """A private system-type dbus-daemon on a socket every uid can reach; killed after."""
    require_root_tools("dbus-daemon", "dbus-send", "setpriv")
    with private_bus(SYSTEM_LIKE_POLICY, POLICY, prefix="shuttled-dbus-") as running:
        yield running


class Service(LoopThread):
    """DbusControl on its own event loop in a thread, so that clients may block."""

    def __init__(self, core: FakeCore, address: str) -> None:
        super().__init__()
        self.core = core
        self.control = DbusControl(core, bus_address=address)

    def __enter__(self) -> Service:
        self.start_loop()
        try:
            self.run(self.control.start)
        except BaseException:
            self.stop_loop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self.control.close()
            await self.control.wait_closed()

        try:
            self.run(stop)
        finally:
            self.stop_loop()


@pytest.fixture
def service(bus: Bus) -> Iterator[Service]:
    # work allows a user, lab a group: both must reach the decision as on the socket.
    allow = {"work": (f"user:{MEMBER}",), "lab": (f"group:{TEAM}",)}
    config = Config.of(
        *(
            dataclasses.replace(p, allow=allow.get(p.name, ()))
            for p in fake_config().profiles.values()
        )
    )
    core = FakeCore(config)
    with Service(core, bus.address) as running:
        yield running


def dbus_send(
    bus: Bus,
    path: str,
    member: str,
    *args: str,
    as_user: list[str] | None = None,
    dest: str = const.DBUS_NAME,
) -> subprocess.CompletedProcess[str]:
    """dbus-send, optionally through `setpriv` as another uid/gid/groups."""
    argv = [
        str(which("dbus-send")),
        f"--bus={bus.address}",
        "--print-reply",
        f"--dest={dest}",
        path,
        member,
        *args,
    ]
    if as_user is not None:
        argv = [str(which("setpriv")), *as_user, "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def error_name(result: subprocess.CompletedProcess[str]) -> str:
    """`Error io.github.shuttled.Error.Denied: message` -> the name."""
    assert result.returncode != 0, result.stdout
    return result.stderr.split()[1].rstrip(":")


NOBODY = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"]
UP = f"{MANAGER_INTERFACE}.Up"


def test_client_process_calls_status_and_up_and_gets_state_changed(
    service: Service, bus: Bus
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, bus.address], capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    # Introspection shows exactly the methods generated from the verb table.
    assert out["manager_methods"] == {m.member: m.in_signature for m in manager_methods().values()}
    assert out["manager_methods"]["Up"] == "sbd"
    assert out["profile_methods"] == {m.member: m.in_signature for m in profile_methods().values()}
    assert out["profile_methods"]["Up"] == "bd" and out["profile_methods"]["Down"] == ""
    assert sorted(out["paths"]) == sorted(profile_path(n) for n in service.core.config.profiles)

    assert out["status"]["name"] == "work" and out["status"]["state"] == "down"
    assert [row["name"] for row in out["status_all"]] == list(service.core.config.profiles)
    assert out["name_prop"] == "work"
    assert out["up"]["state"] == "up"
    assert out["signal_up"] == ["up", ""]
    assert out["changed_up"]["State"] == "up" and out["changed_up"]["Since"] > 0
    assert out["event_up"] == {
        "type": "state",
        "profile": "work",
        "state": "up",
        "error": None,
        "time": 1_700_000_000.0,
    }
    assert out["state_prop"] == "up" and out["rx_prop"] == 1288490188
    assert out["down"]["state"] == "down" and out["signal_down"] == ["down", ""]
    assert out["version"]["version"] == "9.9.9"
    assert out["no_such_status"][0] == ERR + "NoSuchProfile"
    assert "nope" in out["no_such_status"][1]
    assert out["no_such_up"][0] == ERR + "NoSuchProfile"
    assert out["bad_timeout"][0] == ERR + "BadRequest"
    assert "timeout" in out["bad_timeout"][1]
    assert out["missing_profile"][0] == ERR + "BadRequest"
    assert out["timeout"][0] == ERR + "Timeout"
    assert ("up", ("work", True, 5.0)) in service.core.calls


def test_unprivileged_caller_reads_but_is_denied_changes(service: Service, bus: Bus) -> None:
    status = dbus_send(
        bus, const.DBUS_PATH, f"{MANAGER_INTERFACE}.Status", "string:work", as_user=NOBODY
    )
    assert status.returncode == 0, status.stderr
    assert '\\"state\\":\\"down\\"' in status.stdout or '"state":"down"' in status.stdout

    denied = dbus_send(
        bus, const.DBUS_PATH, UP, "string:work", "boolean:true", "double:5", as_user=NOBODY
    )
    assert error_name(denied) == ERR + "Denied"
    assert "permission denied" in denied.stderr
    down = dbus_send(bus, profile_path("work"), f"{PROFILE_INTERFACE}.Down", as_user=NOBODY)
    assert error_name(down) == ERR + "Denied"
    reload = dbus_send(bus, const.DBUS_PATH, f"{MANAGER_INTERFACE}.Reload", as_user=NOBODY)
    assert error_name(reload) == ERR + "Denied"
    assert not any(name in ("up", "down", "reload") for name, _ in service.core.calls)


def test_allow_lists_decide_by_uid_and_groups(service: Service, bus: Bus) -> None:
    member = ["--reuid", MEMBER, "--regid", MEMBER, "--clear-groups"]
    ok = dbus_send(
        bus, const.DBUS_PATH, UP, "string:work", "boolean:true", "double:5", as_user=member
    )
    assert ok.returncode == 0, ok.stderr
    other = dbus_send(
        bus, const.DBUS_PATH, UP, "string:lab", "boolean:true", "double:5", as_user=member
    )
    assert error_name(other) == ERR + "Denied"

    # The group as a supplementary group (from the bus), then as the effective gid (/proc).
    for ids in (
        ["--regid", STRANGER, "--groups", str(grp.getgrnam(TEAM).gr_gid)],
        ["--regid", TEAM, "--clear-groups"],
    ):
        as_user = ["--reuid", STRANGER, *ids]
        lab = dbus_send(
            bus,
            profile_path("lab"),
            f"{PROFILE_INTERFACE}.Up",
            "boolean:false",
            "double:1",
            as_user=as_user,
        )
        assert lab.returncode == 0, (ids, lab.stderr)
        work = dbus_send(bus, profile_path("work"), f"{PROFILE_INTERFACE}.Down", as_user=as_user)
        assert error_name(work) == ERR + "Denied"


def test_wrong_signature_and_unknown_objects(service: Service, bus: Bus) -> None:
    wrong = dbus_send(bus, const.DBUS_PATH, UP, "string:work")
    assert error_name(wrong) == "org.freedesktop.DBus.Error.InvalidArgs"
    unknown = dbus_send(bus, const.DBUS_PATH, f"{MANAGER_INTERFACE}.Watch")
    assert error_name(unknown) == "org.freedesktop.DBus.Error.UnknownMethod"
    gone = dbus_send(bus, profile_path("nope"), f"{PROFILE_INTERFACE}.Down")
    assert error_name(gone).startswith("org.freedesktop.DBus.Error.Unknown")
    failed = dbus_send(
        bus, profile_path("broken"), f"{PROFILE_INTERFACE}.Up", "boolean:true", "double:1"
    )
    assert error_name(failed) == ERR + "Failed"
    assert "Permission denied (publickey)" in failed.stderr


def test_profile_objects_follow_the_configuration(service: Service, bus: Bus) -> None:
    def tree() -> str:
        result = dbus_send(
            bus, const.DBUS_PATH + "/profile", "org.freedesktop.DBus.Introspectable.Introspect"
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert 'node name="work"' in tree() and 'node name="slow"' in tree()

    async def reload() -> None:  # as a reload through the socket would, behind our back
        core = service.core
        core.config = Config.of(
            core.config.profiles["work"], Profile("new-one", "x@y", auto_nets=True)
        )
        core.states["new-one"] = "down"

    service.run(reload)
    listing = tree()
    assert 'node name="new_2done"' in listing and 'node name="slow"' not in listing
    status = dbus_send(bus, profile_path("new-one"), f"{PROFILE_INTERFACE}.Status")
    assert status.returncode == 0, status.stderr
    assert "new-one" in status.stdout


def test_a_second_service_cannot_take_the_name(service: Service, bus: Bus) -> None:
    async def second() -> None:
        other = DbusControl(FakeCore(), bus_address=bus.address)
        try:
            await other.start()
        finally:
            other.close()

    with pytest.raises(ShuttledError, match="already taken"):
        service.run(second)


def test_only_root_may_own_the_name(bus: Bus) -> None:
    """The shipped policy file: an unprivileged process cannot pose as the daemon."""
    result = dbus_send(
        bus,
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus.RequestName",
        f"string:{const.DBUS_NAME}",
        "uint32:4",
        as_user=NOBODY,
        dest="org.freedesktop.DBus",
    )
    assert error_name(result) == "org.freedesktop.DBus.Error.AccessDenied"


def test_unreachable_bus_is_a_clear_error(tmp_path: Path) -> None:
    async def start() -> None:
        control = DbusControl(FakeCore(), bus_address=f"unix:path={tmp_path}/none")
        await control.start()

    with pytest.raises(ShuttledError, match="cannot connect to the D-Bus system bus"):
        asyncio.run(start())
