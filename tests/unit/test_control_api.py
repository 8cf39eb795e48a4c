"""The verb table: validation, authorization and dispatch against a fake core."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from shuttled.control import api, auth
from shuttled.control.api import VERBS, Permission
from shuttled.control.protocol import BadRequestError
from shuttled.errors import NoSuchProfileError, PermissionDeniedError, TimeoutError_
from shuttled.net import gid_of
from tests.fake_core import MEMBER_UID, STRANGER_UID, FakeCore, caller

ROOT = caller(0)
STRANGER = caller(STRANGER_UID, 100)
MEMBER = caller(MEMBER_UID)
ADMIN_GID = 4000


@pytest.fixture(autouse=True)
def admin_group(monkeypatch: pytest.MonkeyPatch) -> None:
    real = gid_of
    monkeypatch.setattr(auth, "gid_of", lambda name: ADMIN_GID if name == "shuttle" else real(name))


def call(core: FakeCore, verb: str, args: dict[str, Any], who: api.Caller = ROOT) -> Any:
    async def go() -> Any:
        return await api.invoke(core, api.prepare(core, verb, args, who))

    return asyncio.run(go())


def test_every_verb_names_a_method_of_the_core_protocol() -> None:
    for verb in VERBS.values():
        method = getattr(api.Core, verb.handler)
        params = list(inspect.signature(method).parameters)[1:]
        assert len(params) == len(verb.args), verb.name
        if verb.streams:
            assert verb.release and hasattr(api.Core, verb.release)


def test_table_is_introspectable_for_other_transports() -> None:
    up = {d["name"]: d for d in api.describe()}["up"]
    assert up["permission"] == "mutate_profile" and not up["streams"]
    assert [(a["name"], a["type"], a["required"]) for a in up["args"]] == [
        ("profile", "str", True),
        ("wait", "bool", False),
        ("timeout", "float", False),
    ]
    assert [a.dbus_signature for a in VERBS["up"].args] == ["s", "b", "d"]
    assert VERBS["watch"].streams
    assert set(VERBS) == {
        "list",
        "status",
        "up",
        "down",
        "stats",
        "connections",
        "reload",
        "watch",
        "version",
        "doctor",
    }


def test_read_verbs_are_open_to_everyone() -> None:
    core = FakeCore()
    assert [p["name"] for p in call(core, "list", {}, STRANGER)] == list(core.config.profiles)
    assert call(core, "status", {"profile": "work"}, STRANGER)["name"] == "work"
    assert len(call(core, "status", {}, STRANGER)) == 4
    assert call(core, "stats", {"profile": "lab"}, STRANGER)["active"] == 3
    assert call(core, "version", {}, STRANGER)["version"] == "9.9.9"


def test_dispatch_passes_arguments_in_table_order_with_defaults() -> None:
    core = FakeCore()
    call(core, "up", {"profile": "work"})
    call(core, "up", {"profile": "lab", "wait": False, "timeout": 5})
    assert core.calls == [("up", ("work", True, 30.0)), ("up", ("lab", False, 5.0))]


@pytest.mark.parametrize("verb", ["up", "down"])
def test_up_down_are_denied_to_strangers(verb: str) -> None:
    core = FakeCore()
    with pytest.raises(PermissionDeniedError, match=f"{verb} work: permission denied"):
        call(core, verb, {"profile": "work"}, STRANGER)
    assert core.calls == []


def test_up_down_are_allowed_to_root_admins_and_the_allow_list() -> None:
    core = FakeCore()
    assert call(core, "up", {"profile": "work"}, MEMBER)["state"] == "up"
    assert call(core, "down", {"profile": "work"}, caller(STRANGER_UID, ADMIN_GID))
    assert call(core, "up", {"profile": "lab"}, ROOT)["state"] == "up"
    with pytest.raises(PermissionDeniedError):  # the allow list is per profile
        call(core, "up", {"profile": "lab"}, MEMBER)


def test_reload_needs_root_or_the_admin_group() -> None:
    core = FakeCore()
    with pytest.raises(PermissionDeniedError, match="group 'shuttle'"):
        call(core, "reload", {}, MEMBER)
    assert call(core, "reload", {}, caller(STRANGER_UID, ADMIN_GID))["added"] == ["new"]
    assert call(core, "reload", {}, ROOT)["changed"] == ["lab"]


def test_unknown_profile_is_reported_before_authorization() -> None:
    with pytest.raises(NoSuchProfileError, match="no profile named 'nope'"):
        call(FakeCore(), "up", {"profile": "nope"}, STRANGER)
    with pytest.raises(NoSuchProfileError):
        call(FakeCore(), "stats", {"profile": "nope"}, STRANGER)


@pytest.mark.parametrize(
    ("verb", "args", "message"),
    [
        ("fly", {}, "unknown verb 'fly'"),
        ("up", {}, "up: missing argument 'profile'"),
        ("up", {"profile": "work", "force": True}, "up: unknown argument 'force'"),
        ("up", {"profile": 1}, "up: argument 'profile' must be a string"),
        ("up", {"profile": ""}, "up: argument 'profile' must not be empty"),
        ("up", {"profile": "work", "wait": 1}, "argument 'wait' must be true or false"),
        ("up", {"profile": "work", "timeout": True}, "argument 'timeout' must be a number"),
        ("up", {"profile": "work", "timeout": "5"}, "argument 'timeout' must be a number"),
        ("up", {"profile": "work", "timeout": -1}, "argument 'timeout' must be between 0 and 3600"),
        ("up", {"profile": "work", "timeout": 1e9}, "must be between"),
        ("list", {"profile": "work"}, "list: unknown argument 'profile'"),
    ],
)
def test_bad_arguments_are_one_line_bad_requests(
    verb: str, args: dict[str, Any], message: str
) -> None:
    core = FakeCore()
    with pytest.raises(BadRequestError) as info:
        call(core, verb, args)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert core.calls == []


def test_core_errors_pass_through_typed() -> None:
    with pytest.raises(TimeoutError_):
        call(FakeCore(), "up", {"profile": "slow", "timeout": 0.01})


def test_watch_streams_events_and_unsubscribes_when_stopped() -> None:
    core = FakeCore()

    async def go() -> list[dict[str, Any]]:
        stream = api.stream(core, api.prepare(core, "watch", {}, STRANGER))
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        await api.invoke(core, api.prepare(core, "up", {"profile": "lab"}, ROOT))
        events = [await first]
        await stream.aclose()
        return events

    events = asyncio.run(go())
    assert events == [
        {"type": "state", "profile": "lab", "state": "up", "error": None, "time": 1_700_000_000.0}
    ]
    assert core.queues == []


def test_permissions_of_the_table() -> None:
    perms = {name: v.permission for name, v in VERBS.items()}
    mutating = {n for n, p in perms.items() if p is Permission.MUTATE_PROFILE}
    assert mutating == {"up", "down", "doctor"}
    assert {n for n, p in perms.items() if p is Permission.ADMIN} == {"reload"}
    assert api.profile_verbs() == ["status", "up", "down", "stats", "connections", "doctor"]
