"""The control protocol: the one module both `shuttlectl` and the daemon import.

Newline-delimited JSON over a stream socket, one object a line:

    request  {"v": 1, "id": 7, "verb": "up", "args": {"profile": "work"}}
    reply    {"v": 1, "id": 7, "ok": true, "result": {...}}
             {"v": 1, "id": 7, "ok": false, "error": {"code": "denied", "message": "..."}}
    event    {"v": 1, "event": {"type": "state", "profile": "work", "state": "up"}}

A streaming verb (`watch`) gets one ok reply, then events until either side
closes. Error codes are the `code` of the classes in shuttled.errors, so a
reply maps back to the same exception class and its exit code on the client.

What each verb's `result` and each event hold is typed in shuttled.control.schema
(TypedDicts, and why those): the daemon builds them, the client checks them there.

Only the standard library and shuttled.const/errors are imported here: the CLI
must stay a thin client that starts fast.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shuttled.const import ExitCode
from shuttled.control import schema
from shuttled.errors import ProtocolError, ShuttledError

PROTOCOL_VERSION = 1
# Version of the documents `shuttlectl --json` prints ({"schema": 1, ...}).
JSON_SCHEMA = 1
# A request is a verb and a few short arguments; anything longer is abuse.
MAX_REQUEST_BYTES = 64 * 1024
# Replies can carry thousands of connections; the client still wants a bound.
MAX_REPLY_BYTES = 64 * 1024 * 1024
# Request ids must survive a round trip through any JSON implementation (doubles).
MAX_ID = 2**53 - 1
VERB_RE = re.compile(r"[a-z][a-z_]{0,31}")
# `up --wait` gives up after this long unless told otherwise (CLI and daemon agree).
DEFAULT_UP_TIMEOUT = 30.0
MAX_UP_TIMEOUT = 3600.0


class BadRequestError(ProtocolError):
    """A request the daemon cannot act on: not JSON, wrong shape, unknown verb or argument."""

    code = "bad_request"
    exit_code = ExitCode.USAGE

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class BusyError(ShuttledError):
    """Too many control clients at once; the caller may retry."""

    code = "busy"


class InternalError(ShuttledError):
    """A bug in the daemon; its log has the traceback."""

    code = "internal"


@dataclass(frozen=True)
class Request:
    id: int
    verb: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorInfo:
    code: str
    message: str


@dataclass(frozen=True)
class Reply:
    id: int | None
    ok: bool
    # What the daemon sent: a schema.Result, unchecked until the client checks it.
    result: object = None
    error: ErrorInfo | None = None

    def unwrap(self) -> object:
        """The result (for schema.check), or the error raised as its own exception class."""
        if self.ok:
            return self.result
        assert self.error is not None
        raise exception_from(self.error)


@dataclass(frozen=True)
class Event:
    event: Mapping[str, object]  # a schema.Event, unchecked until schema.check_event


# --- errors <-> codes ----------------------------------------------------------------------


def _subclasses(cls: type[ShuttledError]) -> list[type[ShuttledError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _subclasses(sub)
    return found


def error_class(code: str) -> type[ShuttledError]:
    """The exception class for an error code; ShuttledError for codes we do not know.

    Walked at call time so that error classes defined by modules imported later
    (the daemon's own) are found too; the first class declaring a code wins.
    """
    for cls in _subclasses(ShuttledError):
        if cls.code == code:
            return cls
    return ShuttledError


def exception_from(error: ErrorInfo) -> ShuttledError:
    cls = error_class(error.code)
    exc = ShuttledError.__new__(cls)
    # Bypass subclass __init__ signatures (BadRequestError takes a request id).
    ShuttledError.__init__(exc, error.message)
    if cls is ShuttledError and error.code != ShuttledError.code:
        exc.code = error.code  # keep an unknown code visible to --json output
    return exc


def error_info(exc: BaseException) -> ErrorInfo:
    """What a client is told about an exception: typed errors as they are, bugs as internal."""
    if isinstance(exc, ShuttledError):
        return ErrorInfo(exc.code, str(exc) or exc.code)
    if isinstance(exc, TimeoutError):
        return ErrorInfo("timeout", str(exc) or "timed out")
    return ErrorInfo(InternalError.code, f"internal error: {type(exc).__name__}")


# --- encoding ------------------------------------------------------------------------------


def jsonable(obj: object) -> Any:
    """json.dumps fallback for what a daemon core naturally returns."""
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=str)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(
        obj,
        os.PathLike
        | ipaddress.IPv4Network
        | ipaddress.IPv6Network
        | ipaddress.IPv4Address
        | ipaddress.IPv6Address,
    ):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _dump(obj: Mapping[str, object]) -> bytes:
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=jsonable)
    return text.encode() + b"\n"


def encode_request(request: Request) -> bytes:
    return _dump(
        {"v": PROTOCOL_VERSION, "id": request.id, "verb": request.verb, "args": dict(request.args)}
    )


def encode_reply(reply: Reply) -> bytes:
    body: dict[str, object] = {"v": PROTOCOL_VERSION, "id": reply.id, "ok": reply.ok}
    if reply.ok:
        body["result"] = reply.result
    else:
        assert reply.error is not None
        body["error"] = schema.ErrorBody(code=reply.error.code, message=reply.error.message)
    return _dump(body)


def ok_reply(request_id: int | None, result: schema.Result | schema.Streaming) -> bytes:
    return encode_reply(Reply(request_id, True, result))


def error_reply(request_id: int | None, exc: BaseException) -> bytes:
    return encode_reply(Reply(request_id, False, error=error_info(exc)))


def encode_event(event: schema.Event) -> bytes:
    return _dump({"v": PROTOCOL_VERSION, "event": dict(event)})


# --- decoding ------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load_object(line: bytes | str, limit: int) -> dict[str, Any]:
    """Parse one line into a JSON object; ValueError says what is wrong, in one line."""
    if len(line) > limit:
        raise ValueError(f"message longer than {limit} bytes")
    try:
        # Decode ourselves: json.loads(bytes) would also guess UTF-16 and UTF-32.
        text = line.decode() if isinstance(line, bytes) else line
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_kind(obj)}")
    return obj


def _kind(value: object) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _check_version(obj: Mapping[str, Any]) -> None:
    version = obj.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ValueError(
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})"
        )


def _check_id(value: object, *, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise ValueError(f"id must be an integer 0..{MAX_ID}")
    return value


def decode_request(line: bytes | str) -> Request:
    """Validate one request line; every failure is a BadRequestError (with the id if known)."""
    request_id: int | None = None
    try:
        obj = _load_object(line, MAX_REQUEST_BYTES)
        request_id = _check_id(obj.get("id"), optional=False)
        _check_version(obj)
        unknown = sorted(set(obj) - {"v", "id", "verb", "args"})
        if unknown:
            raise ValueError(f"unknown request field {unknown[0]!r}")
        verb = obj.get("verb")
        if not isinstance(verb, str) or not VERB_RE.fullmatch(verb):
            raise ValueError("verb must be a lowercase word")
        args = obj.get("args", {})
        if not isinstance(args, dict):
            raise ValueError(f"args must be an object, got {_kind(args)}")
    except ValueError as exc:
        raise BadRequestError(f"bad request: {exc}", request_id) from None
    return Request(request_id if request_id is not None else 0, verb, args)


def _decode_error(obj: Mapping[str, Any]) -> ErrorInfo:
    error = obj.get("error")
    if not isinstance(error, dict):
        raise ValueError("a failed reply needs an error object")
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, str) or not isinstance(message, str):
        raise ValueError("error code and message must be strings")
    return ErrorInfo(code, message)


def decode_reply(line: bytes | str) -> Reply | Event:
    """Validate one line from the daemon; every failure is a ProtocolError."""
    try:
        obj = _load_object(line, MAX_REPLY_BYTES)
        _check_version(obj)
        if "event" in obj:
            if not isinstance(obj["event"], dict):
                raise ValueError("event must be an object")
            return Event(obj["event"])
        request_id = _check_id(obj.get("id"), optional=True)
        ok = obj.get("ok")
        if not isinstance(ok, bool):
            raise ValueError("ok must be true or false")
        if ok:
            return Reply(request_id, True, obj.get("result"))
        return Reply(request_id, False, error=_decode_error(obj))
    except ValueError as exc:
        raise ProtocolError(f"malformed reply from the daemon: {exc}") from None
