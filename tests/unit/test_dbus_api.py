"""The D-Bus API as data: what is generated from the verb table, without a bus.

(The bus itself, the policy and real callers: tests/integration/test_dbus.py.)
"""

from __future__ import annotations

import asyncio
import enum
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.validators import is_member_name_valid, is_object_path_valid

from shuttled import const
from shuttled.control import api, dbus
from shuttled.control.protocol import BadRequestError
from shuttled.errors import NoSuchProfileError, PermissionDeniedError, ShuttledError


def test_every_answering_verb_is_a_manager_method_with_the_table_arguments() -> None:
    methods = dbus.manager_methods()
    assert set(methods) == {dbus.member_name(v.name) for v in api.VERBS.values() if not v.streams}
    assert "Watch" not in methods  # streamed events are the Event signal instead
    for m in methods.values():
        assert is_member_name_valid(m.member)
        assert m.args == m.verb.args
    assert methods["Up"].in_signature == "sbd"
    assert [a.name for a in methods["Up"].args] == ["profile", "wait", "timeout"]
    assert methods["List"].in_signature == "" and methods["Status"].in_signature == "s"


def test_profile_methods_take_the_profile_from_the_object() -> None:
    methods = dbus.profile_methods()
    assert set(methods) == {"Status", "Up", "Down", "Stats", "Connections", "Doctor"}
    assert methods["Up"].in_signature == "bd" and methods["Down"].in_signature == ""
    assert methods["Up"].raw_args([False, 2.5], "work") == {
        "wait": False,
        "timeout": 2.5,
        "profile": "work",
    }


def test_an_empty_string_means_not_given() -> None:
    status = dbus.manager_methods()["Status"]
    assert status.raw_args([""]) == {"profile": None}
    assert status.raw_args(["lab"]) == {"profile": "lab"}
    with pytest.raises(ValueError):
        status.raw_args([])  # the signature check runs first; never silently short


def _introspect(cls: type[dbus._Exported], *args: Any) -> Any:
    return cls(*args).introspect()


def test_introspection_matches_the_generated_methods_properties_and_signals() -> None:
    manager = _introspect(dbus.ManagerInterface, None)
    assert manager.name == dbus.MANAGER_INTERFACE
    assert {m.name: [(a.name, a.signature) for a in m.in_args] for m in manager.methods} == {
        m.member: [(a.name, a.dbus_signature) for a in m.args]
        for m in dbus.manager_methods().values()
    }
    assert all([a.signature for a in m.out_args] == ["s"] for m in manager.methods)
    assert [(p.name, p.signature) for p in manager.properties] == [("Profiles", "ao")]
    assert [s.name for s in manager.signals] == ["Event"]

    profile = _introspect(dbus.ProfileInterface, None, "work")
    assert profile.name == dbus.PROFILE_INTERFACE
    assert {m.name for m in profile.methods} == set(dbus.profile_methods())
    assert {(p.name, p.signature) for p in profile.properties} == {
        ("Name", "s"),
        ("State", "s"),
        ("Remote", "s"),
        ("Since", "d"),
        ("LastError", "s"),
        ("Rx", "t"),
        ("Tx", "t"),
        ("Holding", "b"),
    }
    (changed,) = profile.signals
    assert changed.name == "StateChanged"
    assert [a.signature for a in changed.args] == ["s", "s"]


def test_properties_say_which_changes_are_signalled() -> None:
    xml = _introspect(dbus.ProfileInterface, None, "work").to_xml()
    emits = {
        p.get("name"): next(
            (a.get("value") for a in p.iter("annotation") if a.get("name") == dbus.EMITS_CHANGED),
            "true",
        )
        for p in xml.iter("property")
    }
    assert emits == {
        "Name": "const",
        "State": "true",
        "Remote": "false",
        "Since": "true",
        "LastError": "true",
        "Rx": "false",
        "Tx": "false",
        "Holding": "false",
    }
    assert set(dbus.STATE_PROPERTIES) == {n for n, v in emits.items() if v == "true"}


class _Core:
    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row

    def status(self, name: str | None) -> dict[str, Any]:
        if name != self.row["name"]:
            raise NoSuchProfileError(f"no profile named {name!r}")
        return self.row


def _control(row: dict[str, Any]) -> Any:
    """Just enough of a DbusControl for a profile object: its core."""
    return dbus.DbusControl(_Core(row))  # type: ignore[arg-type]


def test_properties_read_the_status_row_with_nulls_made_typed() -> None:
    row = {
        "name": "work",
        "state": "up",
        "remote": "a@b",
        "since": None,
        "last_error": None,
        "rx": 12,
        "tx": -1,
    }
    obj: Any = dbus.ProfileInterface(_control(row), "work")
    assert obj._property_State == "up"
    assert obj._property_Since == 0.0 and obj._property_LastError == ""
    assert obj._property_Rx == 12 and obj._property_Tx == 0
    assert obj._property_Holding is False


def test_a_vanished_profile_reads_as_its_error() -> None:
    from dbus_fast import DBusError

    obj: Any = dbus.ProfileInterface(_control({"name": "other"}), "work")
    with pytest.raises(DBusError) as info:
        obj._property_State  # noqa: B018
    assert info.value.type == "io.github.shuttled.Error.NoSuchProfile"


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("work", "work"),
        ("lab-2", "lab_2d2"),
        ("2nd", "_32nd"),
        ("a_b", "a_5fb"),
        ("X", "X"),
        ("", "_"),
    ],
)
def test_profile_paths_are_escaped_like_sd_bus(name: str, label: str) -> None:
    assert dbus.bus_label(name) == label
    assert dbus.profile_path(name) == f"{const.DBUS_PATH}/profile/{label}"
    assert is_object_path_valid(dbus.profile_path(name))


def _status(tmp_path: Path, pid: int, uid: str, gid: str, groups: str) -> Path:
    (tmp_path / str(pid)).mkdir()
    (tmp_path / str(pid) / "status").write_text(
        f"Name:\tx\nUid:\t{uid}\nGid:\t{gid}\nGroups:\t{groups}\n"
    )
    return tmp_path


def test_caller_gets_the_effective_gid_from_proc(tmp_path: Path) -> None:
    proc = _status(tmp_path, 42, "1000\t1000\t1000\t1000", "100\t55\t55\t55", "7 8 ")
    assert dbus.proc_ids(42, 1000, proc) == (55, (7, 8))
    # Groups the bus reported win; /proc only adds the gid.
    assert dbus.make_caller(1000, 42, (9,), proc) == api.Caller(1000, 55, 42, (9,))
    assert dbus.make_caller(1000, 42, None, proc) == api.Caller(1000, 55, 42, (7, 8))


def test_a_reused_or_changed_pid_tells_nothing(tmp_path: Path) -> None:
    proc = _status(tmp_path, 42, "0\t0\t0\t0", "0\t0\t0\t0", "0")
    assert dbus.proc_ids(42, 1000, proc) is None
    assert dbus.proc_ids(43, 1000, proc) is None
    caller = dbus.make_caller(1000, 42, None, proc)
    assert caller == api.Caller(1000, dbus.UNKNOWN_GID, 42, ())
    assert dbus.make_caller(1000, None, (3,), proc).gids == (dbus.UNKNOWN_GID, 3)


def _call() -> Message:
    return Message(
        destination=const.DBUS_NAME,
        path=const.DBUS_PATH,
        interface=dbus.MANAGER_INTERFACE,
        member="Up",
        serial=7,
        sender=":1.9",
    )


@pytest.mark.parametrize(
    ("exc", "name", "text"),
    [
        (
            PermissionDeniedError("up work: permission denied"),
            "Error.Denied",
            "up work: permission denied",
        ),
        (NoSuchProfileError("no profile named 'x'"), "Error.NoSuchProfile", "no profile named 'x'"),
        (
            BadRequestError("up: missing argument 'profile'"),
            "Error.BadRequest",
            "up: missing argument 'profile'",
        ),
        (ShuttledError("first line\nsecond line"), "Error.Failed", "first line"),
        (TimeoutError(), "Error.Timeout", "timed out"),
        (RuntimeError("secret detail"), "Error.Internal", "internal error: RuntimeError"),
    ],
)
def test_errors_are_named_after_their_code(exc: BaseException, name: str, text: str) -> None:
    reply = dbus.error_message(_call(), exc)
    assert reply.error_name == f"{const.DBUS_NAME}.{name}"
    assert reply.body == [text]
    assert reply.reply_serial == 7 and reply.destination == ":1.9"


class _Mode(enum.Enum):
    DIRECT = "direct"


def test_results_are_the_sockets_json() -> None:
    assert dbus.result_json({"mode": _Mode.DIRECT, "path": Path("/x"), "none": None}) == (
        '{"mode":"direct","path":"/x","none":null}'
    )


class _Driver(dbus.DbusControl):
    """A DbusControl whose bus daemon answers from a table (member -> reply)."""

    def __init__(self, replies: dict[str, Message]) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.replies = replies
        self.asked: list[str] = []

    async def _driver(self, member: str, sender: str) -> Message:
        self.asked.append(member)
        return self.replies[member]


def _ok(signature: str, value: Any) -> Message:
    return Message(
        message_type=MessageType.METHOD_RETURN, reply_serial=1, signature=signature, body=[value]
    )


def _error(name: str) -> Message:
    return Message(
        message_type=MessageType.ERROR, reply_serial=1, error_name=name, signature="s", body=["no"]
    )


def test_credentials_come_from_one_call_on_current_buses() -> None:
    driver = _Driver(
        {
            "GetConnectionCredentials": _ok(
                "a{sv}",
                {
                    "UnixUserID": Variant("u", 1000),
                    "ProcessID": Variant("u", 77),
                    "UnixGroupIDs": Variant("au", [1000, 27]),
                },
            )
        }
    )
    assert asyncio.run(driver.credentials(":1.5")) == (1000, 77, (1000, 27))
    assert driver.asked == ["GetConnectionCredentials"]


def test_old_buses_are_asked_the_two_older_questions() -> None:
    driver = _Driver(
        {
            "GetConnectionCredentials": _error("org.freedesktop.DBus.Error.UnknownMethod"),
            "GetConnectionUnixUser": _ok("u", 1000),
            "GetConnectionUnixProcessID": _error("org.freedesktop.DBus.Error.Failed"),
        }
    )
    assert asyncio.run(driver.credentials(":1.5")) == (1000, None, None)


def test_a_caller_the_bus_does_not_know_is_refused() -> None:
    driver = _Driver(
        {"GetConnectionCredentials": _error("org.freedesktop.DBus.Error.NameHasNoOwner")}
    )
    with pytest.raises(ShuttledError, match="cannot read the caller's credentials"):
        asyncio.run(driver.caller(":1.5"))
    with pytest.raises(ShuttledError, match="no sender"):
        asyncio.run(driver.caller(None))
