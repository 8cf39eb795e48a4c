"""The D-Bus API: the verb table of shuttled.control.api, served on the system bus.

Bus name ``io.github.shuttled`` (const.DBUS_NAME); objects and interfaces::

    /io/github/shuttled                       io.github.shuttled.Manager1
        methods     one per non-streaming verb: List() Status(s profile)
                    Up(s profile, b wait, d timeout) Down(s profile) Stats(s profile)
                    Connections(s profile) Reload() Version(), each returning `s`
        property    Profiles (ao): the profile objects below
        signal      Event(s event): each event the streaming verb `watch` yields, as JSON
    /io/github/shuttled/profile/<escaped>     io.github.shuttled.Profile1
        methods     one per verb that takes a profile, the profile taken from the path:
                    Status() Up(b wait, d timeout) Down() Stats() Connections()
        properties  Name s, State s, Remote s, Since d, LastError s, Rx t, Tx t (read-only)
        signal      StateChanged(s state, s error); PropertiesChanged for State,
                    LastError and Since. Rx, Tx (too frequent) and Remote (reload) are
                    annotated EmitsChangedSignal=false: read them when needed

<escaped> is sd_bus_path_encode()'s escaping: any byte outside [A-Za-z0-9], and a leading
digit, becomes _XX (hex); "lab-2" -> "lab_2d2".

Generated, not written: the method names (the verb in CamelCase), their argument names,
order and types (Arg.dbus_signature) all come from api.VERBS, so a verb added to the table
appears here, on the Unix socket and in introspection at once. D-Bus has no optional
arguments: an empty string means "not given" (Status("") is every profile); numbers and
booleans are always passed.

Results are one JSON string, the same document as the `result` of a Unix-socket reply.
Chosen over a{sv} because results nest (lists of rows, subnets inside rows) and hold
nulls, which a{sv} cannot say without a per-verb signature that would change whenever a
field is added; JSON keeps one schema for both transports and a stable signature `s`. The
typed view D-Bus-native clients want is the Profile1 properties.

Errors are D-Bus errors named after the error's code (ShuttledError.dbus_name), e.g.
io.github.shuttled.Error.Denied / NoSuchProfile / BadRequest / Timeout / Failed, with
the same one-line message the socket gives.

Authorization is exactly the Unix socket's: the bus daemon tells us the caller's uid, pid
and groups (GetConnectionCredentials; GetConnectionUnixUser and GetConnectionUnixProcessID
on buses without it), /proc adds the effective gid, then api.prepare decides.

dbus-fast compatibility (PyPI 5.x and Debian bookworm's 1.84): dbus-fast's own method
dispatch cannot tell a method who is calling, so method calls to our objects are taken
first by a message handler (add_message_handler), answered from a task; the ServiceInterface
classes carry the same generated methods only so that introspection shows them, plus the
properties and signals. Avoided because 1.84 lacks them: `dbus_method`/`dbus_signal` (the
old names `method`/`signal` exist in both), `typing.Annotated` signatures and
dbus_fast.annotations, and annotations other than plain signature strings. Both read a
property through getattr(interface, getter.__name__), so generated getters carry the
attribute name they are stored under.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FunctionType
from typing import Any

from dbus_fast import (
    BusType,
    DBusError,
    ErrorType,
    Message,
    MessageFlag,
    MessageType,
    NameFlag,
    PropertyAccess,
    RequestNameReply,
)
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, dbus_property, method, signal

from shuttled import const
from shuttled.control import api, protocol
from shuttled.control.protocol import BusyError
from shuttled.control.schema import Event, ProfileStatus, Result
from shuttled.errors import ShuttledError

log = logging.getLogger(__name__)

MANAGER_INTERFACE = f"{const.DBUS_NAME}.Manager1"
PROFILE_INTERFACE = f"{const.DBUS_NAME}.Profile1"
PROFILE_PATH_PREFIX = f"{const.DBUS_PATH}/profile/"
RESULT_SIGNATURE = "s"
# Calls in flight at once; the socket's cap is on clients, the bus multiplexes them.
MAX_PENDING_CALLS = 256
# The effective gid when /proc cannot tell it: no group has it, so it grants nothing.
UNKNOWN_GID = -1
EMITS_CHANGED = "org.freedesktop.DBus.Property.EmitsChangedSignal"
_DRIVER = "org.freedesktop.DBus"  # the bus daemon's name, interface, and (as a path) object


# --- the API as data, generated from the verb table ----------------------------------------


@dataclass(frozen=True)
class BusMethod:
    """One D-Bus method: a verb and the arguments a caller passes, in table order."""

    member: str
    verb: api.Verb
    args: tuple[api.Arg, ...]

    @property
    def in_signature(self) -> str:
        return "".join(arg.dbus_signature for arg in self.args)

    def raw_args(self, body: Sequence[Any], profile: str | None = None) -> dict[str, object]:
        """The verb's arguments by name, as api.prepare takes them."""
        raw = {arg.name: _given(arg, value) for arg, value in zip(self.args, body, strict=True)}
        if profile is not None:
            raw["profile"] = profile
        return raw


def _given(arg: api.Arg, value: Any) -> Any:
    # D-Bus cannot leave an argument out; "" stands for "not given" (None to api).
    return None if arg.type is str and value == "" else value


def member_name(verb: str) -> str:
    """D-Bus member name of a verb: `up` -> `Up`, `some_verb` -> `SomeVerb`."""
    return "".join(part.title() for part in verb.split("_"))


def manager_methods() -> dict[str, BusMethod]:
    """Manager1: every verb that answers once (streaming verbs become signals)."""
    return {
        member_name(v.name): BusMethod(member_name(v.name), v, v.args)
        for v in api.VERBS.values()
        if not v.streams
    }


def profile_methods() -> dict[str, BusMethod]:
    """Profile1: every answering verb that takes a profile, which the object path gives."""
    return {
        member_name(v.name): BusMethod(
            member_name(v.name), v, tuple(a for a in v.args if a.name != "profile")
        )
        for v in api.VERBS.values()
        if not v.streams and any(a.name == "profile" for a in v.args)
    }


@dataclass(frozen=True)
class BusProperty:
    """A read-only property: a field of the status row (`key`), `empty` standing for null.

    `emits` is its org.freedesktop.DBus.Property.EmitsChangedSignal: "true" when a change
    is signalled, "false" when clients must read it again (caching proxies need to know).
    """

    member: str
    signature: str
    key: str
    empty: Any
    emits: str = "true"


@dataclass(frozen=True)
class BusSignal:
    member: str
    args: tuple[tuple[str, str], ...]  # (name, signature)


PROFILE_PROPERTIES = (
    BusProperty("Name", "s", "name", "", emits="const"),
    BusProperty("State", "s", "state", ""),
    BusProperty("Remote", "s", "remote", "", emits="false"),  # a reload may change it
    BusProperty("Since", "d", "since", 0.0),
    BusProperty("LastError", "s", "last_error", ""),
    BusProperty("Rx", "t", "rx", 0, emits="false"),
    BusProperty("Tx", "t", "tx", 0, emits="false"),
    # The kill switch can engage before the first state change is signalled: read it.
    BusProperty("Holding", "b", "holding", False, emits="false"),
)
# What a state change can alter; signalled with PropertiesChanged.
STATE_PROPERTIES = ("State", "LastError", "Since")
MANAGER_PROPERTIES = (BusProperty("Profiles", "ao", "profiles", []),)
STATE_CHANGED = BusSignal("StateChanged", (("state", "s"), ("error", "s")))
EVENT = BusSignal("Event", (("event", "s"),))


def profile_path(name: str) -> str:
    """The object path of a profile, escaped like sd_bus_path_encode()."""
    return PROFILE_PATH_PREFIX + bus_label(name)


def bus_label(name: str) -> str:
    if not name:
        return "_"
    return "".join(
        f"_{b:02x}"
        if not (chr(b).isascii() and chr(b).isalnum()) or (i == 0 and chr(b).isdigit())
        else chr(b)
        for i, b in enumerate(name.encode())
    )


# --- ServiceInterface classes built from that data ------------------------------------------


def _typed(
    fn: FunctionType, attr: str, params: Sequence[tuple[str, str]], returns: str = ""
) -> FunctionType:
    """Give a generated function the D-Bus types dbus-fast reads from annotations.

    Quoted signature strings ("'s'") parse as such in 1.84 and 5.x alike; setting them
    here rather than writing `-> "s"` in the source keeps mypy and ruff out of it.
    """
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params_ = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=repr(sig))
        for name, sig in params
    ]
    vars(fn)["__signature__"] = inspect.Signature(
        [self_param, *params_],
        return_annotation=repr(returns) if returns else inspect.Signature.empty,
    )
    fn.__name__ = fn.__qualname__ = attr  # dbus-fast finds getters by __name__
    return fn


def _method_stub(member: str) -> FunctionType:
    def stub(self: Any, *_args: Any) -> Any:
        # Calls never get here: DbusControl's message handler takes them first.
        raise DBusError(ErrorType.FAILED, f"{member}: not dispatched")

    return stub  # type: ignore[return-value]


def _getter(prop: BusProperty) -> FunctionType:
    def get(self: _Exported) -> Any:
        try:
            return self.property_value(prop)
        except Exception as exc:  # named like a method's error; never a traceback
            if not isinstance(exc, ShuttledError):
                log.exception("D-Bus: reading %s failed", prop.member)
            raise _dbus_error(exc) from None

    return get  # type: ignore[return-value]


def _emitter() -> FunctionType:
    def emit(self: Any, *values: Any) -> Any:
        # dbus-fast wants one value bare and several as a list.
        return values[0] if len(values) == 1 else list(values)

    return emit  # type: ignore[return-value]


def _members(
    methods: Mapping[str, BusMethod],
    properties: Sequence[BusProperty],
    signals: Sequence[BusSignal],
) -> dict[str, Any]:
    """Class attributes for ServiceInterface: prefixed, so none shadows its own names."""
    members: dict[str, Any] = {"bus_properties": tuple(properties)}
    for m in methods.values():
        attr = f"_method_{m.member}"
        members[attr] = method(name=m.member)(
            _typed(
                _method_stub(m.member),
                attr,
                [(a.name, a.dbus_signature) for a in m.args],
                RESULT_SIGNATURE,
            )
        )
    for p in properties:
        attr = f"_property_{p.member}"
        members[attr] = dbus_property(access=PropertyAccess.READ, name=p.member)(
            _typed(_getter(p), attr, [], p.signature)
        )
    for s in signals:
        attr = f"_signal_{s.member}"
        members[attr] = signal(name=s.member)(
            _typed(_emitter(), attr, s.args, "".join(sig for _, sig in s.args))
        )
    return members


class _AnnotatedProperty(intr.Property):
    """A property with its EmitsChangedSignal annotation, which 1.84 cannot add itself."""

    def __init__(self, prop: intr.Property, emits: str) -> None:
        super().__init__(prop.name, prop.signature, prop.access)
        self.emits = emits

    def to_xml(self) -> ET.Element:
        element = super().to_xml()
        if self.emits != "true":  # "true" is the default; saying it again is noise
            ET.SubElement(element, "annotation", name=EMITS_CHANGED, value=self.emits)
        return element


class _Exported(ServiceInterface):
    """What the generated members call back into."""

    bus_properties: tuple[BusProperty, ...] = ()

    def property_value(self, prop: BusProperty) -> Any:
        raise NotImplementedError

    def introspect(self) -> intr.Interface:
        interface = super().introspect()
        emits = {p.member: p.emits for p in self.bus_properties}
        interface.properties = [
            _AnnotatedProperty(p, emits.get(p.name, "true")) for p in interface.properties
        ]
        return interface

    def emit(self, sig: BusSignal, *values: Any) -> None:
        getattr(self, f"_signal_{sig.member}")(*values)


class _ManagerBase(_Exported):
    def __init__(self, control: DbusControl) -> None:
        super().__init__(MANAGER_INTERFACE)
        self.control = control

    def property_value(self, prop: BusProperty) -> Any:
        assert prop.key == "profiles"
        return self.control.profile_paths()


class _ProfileBase(_Exported):
    def __init__(self, control: DbusControl, profile: str) -> None:
        super().__init__(PROFILE_INTERFACE)
        self.control = control
        self.profile = profile

    def status(self) -> ProfileStatus:
        row = self.control.core.status(self.profile)
        assert not isinstance(row, list)
        return row

    def property_value(self, prop: BusProperty) -> Any:
        return _coerce(prop, self.status().get(prop.key))

    def state_changed(self, state: str, error: str | None) -> None:
        self.emit(STATE_CHANGED, state, error or "")
        row = self.status()
        by_member = {p.member: p for p in PROFILE_PROPERTIES}
        self.emit_properties_changed(
            {m: _coerce(by_member[m], row.get(by_member[m].key)) for m in STATE_PROPERTIES}
        )


def _coerce(prop: BusProperty, value: Any) -> Any:
    """A status field as the property's D-Bus type; null becomes the property's `empty`."""
    if value is None:
        return prop.empty
    if prop.signature == "s":
        return str(value)
    if prop.signature == "d":
        return float(value)
    if prop.signature == "t":
        return max(0, int(value))
    return value


ManagerInterface: type[_ManagerBase] = type(
    "ManagerInterface", (_ManagerBase,), _members(manager_methods(), MANAGER_PROPERTIES, [EVENT])
)
ProfileInterface: type[_ProfileBase] = type(
    "ProfileInterface",
    (_ProfileBase,),
    _members(profile_methods(), PROFILE_PROPERTIES, [STATE_CHANGED]),
)


# --- who is calling -----------------------------------------------------------------------


def proc_ids(pid: int, uid: int, proc: Path = Path("/proc")) -> tuple[int, tuple[int, ...]] | None:
    """(effective gid, supplementary groups) of PID, if it still runs as `uid`."""
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return None
    fields = dict(line.partition(":")[::2] for line in text.splitlines())
    uids, gids = fields.get("Uid", "").split(), fields.get("Gid", "").split()
    # The pid may have been reused, or the process changed uid since it connected.
    if len(uids) < 2 or uids[1] != str(uid) or len(gids) < 2:
        return None
    try:
        return int(gids[1]), tuple(int(g) for g in fields.get("Groups", "").split())
    except ValueError:
        return None


def make_caller(
    uid: int, pid: int | None, groups: Sequence[int] | None, proc: Path = Path("/proc")
) -> api.Caller:
    """api.Caller from what the bus said, completed from /proc."""
    ids = proc_ids(pid, uid, proc) if pid else None
    gid = ids[0] if ids else UNKNOWN_GID
    if groups is None:
        groups = ids[1] if ids else ()
    return api.Caller(uid, gid, pid, tuple(groups))


def _one_line(text: str) -> str:
    return (text.splitlines() or [""])[0][:500]


def _dbus_error(exc: BaseException) -> DBusError:
    """An exception as the D-Bus error named after its code, with its one-line message."""
    info = protocol.error_info(exc)  # bugs become "internal", without their details
    return DBusError(protocol.exception_from(info).dbus_name, _one_line(info.message))


def error_message(call: Message, exc: BaseException) -> Message:
    """The error reply to a method call."""
    error = _dbus_error(exc)
    return Message.new_error(call, error.type, error.text)


def result_json(result: Result | Event) -> str:
    # The socket's own encoder, so both transports serialize a result identically.
    return json.dumps(result, separators=(",", ":"), allow_nan=False, default=protocol.jsonable)


# --- the service ---------------------------------------------------------------------------


class DbusControl:
    """Serves the verb table of `api` on the system bus: `await start()`, then `close()`."""

    def __init__(self, core: api.Core, *, bus_address: str | None = None) -> None:
        self.core = core
        # None: the system bus, or DBUS_SYSTEM_BUS_ADDRESS (dbus-fast reads it).
        self.bus_address = bus_address
        self.bus: MessageBus | None = None
        self._manager: _ManagerBase | None = None
        self._profiles: dict[str, _ProfileBase] = {}  # by object path
        self._methods = {MANAGER_INTERFACE: manager_methods(), PROFILE_INTERFACE: profile_methods()}
        self._tasks: set[asyncio.Task[Any]] = set()  # the event watcher and calls in flight

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, export every object, then own the name (so it appears complete)."""
        self.bus = await self._connect()
        try:
            self.bus.add_message_handler(self._on_message)
            self._manager = ManagerInterface(self)
            self.bus.export(const.DBUS_PATH, self._manager)
            self.sync()
            self._spawn(self._watch())  # before the name: no state change goes unsignalled
            await self._own_name(self.bus)
        except BaseException:
            self.close()
            raise
        log.debug("D-Bus API on %s as %s", self.bus_address or "the system bus", const.DBUS_NAME)

    async def _connect(self) -> MessageBus:
        bus: MessageBus | None = None
        try:
            # 1.84 connects the socket in the constructor, 5.x in connect().
            bus = MessageBus(bus_address=self.bus_address, bus_type=BusType.SYSTEM)
            return await bus.connect()
        except Exception as exc:  # no socket, refused, auth: all mean "no bus" to us
            if bus is not None:
                with contextlib.suppress(Exception):
                    bus.disconnect()
            raise ShuttledError(f"cannot connect to the D-Bus system bus: {exc}") from None

    @staticmethod
    async def _own_name(bus: MessageBus) -> None:
        try:
            reply = await bus.request_name(const.DBUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as exc:
            raise ShuttledError(
                f"may not own the D-Bus name {const.DBUS_NAME}: {exc.text} (is "
                f"io.github.shuttled.conf installed in /usr/share/dbus-1/system.d?)"
            ) from None
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise ShuttledError(
                f"the D-Bus name {const.DBUS_NAME} is already taken (is another shuttled running?)"
            )

    def close(self) -> None:
        """Stop answering and disconnect; calls in flight get no reply."""
        for task in self._tasks:
            task.cancel()
        if self.bus is not None:
            self.bus.disconnect()
            self.bus = None
        self._profiles.clear()

    async def wait_closed(self) -> None:
        """Until every task of ours has ended (after close())."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- objects --------------------------------------------------------------------------------

    def profile_paths(self) -> list[str]:
        return sorted(self._profiles)

    def sync(self) -> None:
        """Export one object per configured profile and drop the rest (after a reload).

        Cheap (the core's list is in memory), so it runs on every event and before every
        call to our objects: a profile added by a reload through any transport is there
        when a client asks. The daemon may call it after a reload too.
        """
        if self.bus is None or self._manager is None:
            return
        wanted = {profile_path(row["name"]): row["name"] for row in self.core.list_profiles()}
        gone = [path for path in self._profiles if path not in wanted]
        new = [path for path in wanted if path not in self._profiles]
        for path in gone:
            self.bus.unexport(path)
            del self._profiles[path]
        for path in new:
            obj = ProfileInterface(self, wanted[path])
            self.bus.export(path, obj)
            self._profiles[path] = obj
        if gone or new:
            self._manager.emit_properties_changed({"Profiles": self.profile_paths()})

    async def _watch(self) -> None:
        """Turn the event stream of `watch` into signals, for as long as we run."""
        call = api.Call(api.VERBS["watch"], ())
        async for event in api.stream(self.core, call):
            try:
                self._on_event(event)
            except Exception:  # a bug; the next event must still get through
                log.exception("D-Bus: cannot signal event %r", event)

    def _on_event(self, event: Event) -> None:
        self.sync()
        if self._manager is not None:
            self._manager.emit(EVENT, result_json(event))
        if event["type"] == "state":
            obj = self._profiles.get(profile_path(event["profile"]))
            if obj is not None:
                obj.state_changed(event["state"], event["error"])

    # --- calls ----------------------------------------------------------------------------------

    def _on_message(self, msg: Message) -> bool | Message:
        """Take method calls to our objects; everything else is dbus-fast's to answer."""
        if msg.message_type is not MessageType.METHOD_CALL or not _ours(msg.path):
            return False
        try:
            return self._take(msg)
        except Exception as exc:  # a bug: answer here, as dbus-fast 1.84 would send the
            log.exception("D-Bus: %s failed", msg.member)  # traceback to the caller
            return error_message(msg, exc)

    def _take(self, msg: Message) -> bool | Message:
        self.sync()
        target = self._route(msg)
        if target is None:
            return False  # Properties, Introspectable, or unknown: dbus-fast answers
        bus_method, profile = target
        if msg.signature != bus_method.in_signature:
            return Message.new_error(
                msg,
                ErrorType.INVALID_ARGS,
                f"{bus_method.member} takes ({bus_method.in_signature}), not ({msg.signature})",
            )
        if len(self._tasks) >= MAX_PENDING_CALLS:
            return error_message(
                msg, BusyError(f"too many calls in flight ({MAX_PENDING_CALLS}); try again")
            )
        self._spawn(self._answer(msg, bus_method, profile))
        return True

    def _route(self, msg: Message) -> tuple[BusMethod, str | None] | None:
        profile: str | None = None
        if msg.path == const.DBUS_PATH:
            interface = MANAGER_INTERFACE
        elif (obj := self._profiles.get(msg.path or "")) is not None:
            interface, profile = PROFILE_INTERFACE, obj.profile
        else:
            return None
        if msg.interface not in (None, interface):
            return None
        bus_method = self._methods[interface].get(msg.member or "")
        return (bus_method, profile) if bus_method is not None else None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Message, bus_method: BusMethod, profile: str | None) -> None:
        uid: int | None = None
        try:
            caller = await self.caller(msg.sender)
            uid = caller.uid
            call = api.prepare(
                self.core, bus_method.verb.name, bus_method.raw_args(msg.body, profile), caller
            )
            result = await api.invoke(self.core, call)
            reply = Message.new_method_return(msg, RESULT_SIGNATURE, [result_json(result)])
        except ShuttledError as exc:
            log.debug("D-Bus %s from uid %s refused: %s", bus_method.member, uid, exc)
            reply = error_message(msg, exc)
        except Exception as exc:  # a bug in the core; the caller still gets an answer
            log.exception("D-Bus %s failed", bus_method.member)
            reply = error_message(msg, exc)
        self.sync()  # a reload may have added or removed profiles
        if not int(msg.flags) & int(MessageFlag.NO_REPLY_EXPECTED) and self.bus is not None:
            with contextlib.suppress(Exception):  # the caller or the bus went away
                await self.bus.send(reply)

    async def caller(self, sender: str | None) -> api.Caller:
        """Who sent a call, as the bus daemon vouches for it; ShuttledError if it cannot."""
        if not sender:
            raise ShuttledError("the call has no sender: cannot tell who is asking")
        try:
            uid, pid, groups = await self.credentials(sender)
        except DBusError as exc:
            raise ShuttledError(f"cannot read the caller's credentials: {exc.text}") from None
        return make_caller(uid, pid, groups)

    async def credentials(self, sender: str) -> tuple[int, int | None, tuple[int, ...] | None]:
        """uid, pid (if known) and groups (if the bus knows them) of a connection."""
        reply = await self._driver("GetConnectionCredentials", sender)
        if reply.message_type is MessageType.METHOD_RETURN:
            creds = {key: variant.value for key, variant in reply.body[0].items()}
            if "UnixUserID" in creds:
                groups = creds.get("UnixGroupIDs")
                return (
                    int(creds["UnixUserID"]),
                    creds.get("ProcessID"),
                    tuple(groups) if groups is not None else None,
                )
        elif reply.error_name != ErrorType.UNKNOWN_METHOD.value:
            raise DBusError(reply.error_name or ErrorType.FAILED, _reply_text(reply))
        # Buses older than GetConnectionCredentials (dbus < 1.7): the two older calls.
        uid_reply = await self._driver("GetConnectionUnixUser", sender)
        if uid_reply.message_type is not MessageType.METHOD_RETURN:
            raise DBusError(uid_reply.error_name or ErrorType.FAILED, _reply_text(uid_reply))
        pid_reply = await self._driver("GetConnectionUnixProcessID", sender)
        pid = pid_reply.body[0] if pid_reply.message_type is MessageType.METHOD_RETURN else None
        return int(uid_reply.body[0]), pid, None

    async def _driver(self, member: str, sender: str) -> Message:
        """Ask the bus daemon about a connection; its error replies are returned, not raised."""
        assert self.bus is not None
        reply = await self.bus.call(
            Message(
                destination=_DRIVER,
                path="/" + _DRIVER.replace(".", "/"),
                interface=_DRIVER,
                member=member,
                signature="s",
                body=[sender],
            )
        )
        assert reply is not None
        return reply


def _ours(path: str | None) -> bool:
    """Our objects and their ancestors (introspecting those lists the profiles)."""
    if path is None:
        return False
    return (
        path == const.DBUS_PATH
        or path.startswith(const.DBUS_PATH + "/")
        or const.DBUS_PATH.startswith(path.rstrip("/") + "/")
    )


def _reply_text(reply: Message) -> str:
    body = reply.body
    return str(body[0]) if body else reply.error_name or "error"
