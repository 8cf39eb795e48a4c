"""The control protocol: shapes, validation, error mapping; decoding never raises oddly."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shuttled.const import ExitCode
from shuttled.control import protocol
from shuttled.control.protocol import (
    MAX_REQUEST_BYTES,
    BadRequestError,
    ErrorInfo,
    Event,
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_event,
    encode_reply,
    encode_request,
    error_reply,
    ok_reply,
)
from shuttled.errors import (
    ConfigError,
    NoSuchProfileError,
    PermissionDeniedError,
    ProtocolError,
    ShuttledError,
    TimeoutError_,
)


def test_request_round_trips_as_one_json_line() -> None:
    line = encode_request(Request(7, "up", {"profile": "work", "wait": True}))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "v": 1,
        "id": 7,
        "verb": "up",
        "args": {"profile": "work", "wait": True},
    }
    assert decode_request(line) == Request(7, "up", {"profile": "work", "wait": True})


def test_replies_and_events_round_trip() -> None:
    assert decode_reply(ok_reply(3, {"a": [1]})) == Reply(3, True, {"a": [1]})
    failed = decode_reply(error_reply(4, NoSuchProfileError("no profile named 'x'")))
    assert failed == Reply(4, False, error=ErrorInfo("no_such_profile", "no profile named 'x'"))
    assert decode_reply(encode_event({"type": "state"})) == Event({"type": "state"})
    assert json.loads(encode_reply(Reply(None, False, error=ErrorInfo("busy", "x")))) == {
        "v": 1,
        "id": None,
        "ok": False,
        "error": {"code": "busy", "message": "x"},
    }


@pytest.mark.parametrize(
    ("exc", "cls", "exit_code"),
    [
        (PermissionDeniedError("no"), PermissionDeniedError, ExitCode.DENIED),
        (NoSuchProfileError("no"), NoSuchProfileError, ExitCode.NO_SUCH_PROFILE),
        (TimeoutError_("slow"), TimeoutError_, ExitCode.TIMEOUT),
        (ConfigError("bad"), ConfigError, ExitCode.USAGE),
        (BadRequestError("bad"), BadRequestError, ExitCode.USAGE),
        (ShuttledError("x"), ShuttledError, ExitCode.FAILED),
    ],
)
def test_error_codes_map_back_to_their_class_and_exit_code(
    exc: ShuttledError, cls: type[ShuttledError], exit_code: int
) -> None:
    reply = decode_reply(error_reply(1, exc))
    assert isinstance(reply, Reply)
    with pytest.raises(cls) as info:
        reply.unwrap()
    assert type(info.value) is cls and info.value.exit_code == exit_code
    assert str(info.value) == str(exc)


def test_unknown_error_code_keeps_its_code_and_fails_generically() -> None:
    exc = protocol.exception_from(ErrorInfo("from_the_future", "new"))
    assert type(exc) is ShuttledError and exc.code == "from_the_future"
    assert exc.exit_code == ExitCode.FAILED


def test_bugs_are_reported_as_internal_without_details() -> None:
    info = protocol.error_info(KeyError("secret"))
    assert info == ErrorInfo("internal", "internal error: KeyError")
    assert protocol.error_info(TimeoutError()).code == "timeout"


def test_results_with_enums_sets_and_paths_are_encoded() -> None:
    from pathlib import Path

    from shuttled.const import Forward

    line = ok_reply(1, {"f": Forward.DIRECT, "s": {"b", "a"}, "p": Path("/x")})
    assert json.loads(line)["result"] == {"f": "direct", "s": ["a", "b"], "p": "/x"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1]", "expected a JSON object, got an array"),
        (b'{"v":1,"verb":"up"}', "id must be an integer"),
        (b'{"v":1,"id":-1,"verb":"up"}', "id must be an integer"),
        (b'{"v":1,"id":true,"verb":"up"}', "id must be an integer"),
        (b'{"v":2,"id":1,"verb":"up"}', "protocol version 2 is not supported"),
        (b'{"id":1,"verb":"up"}', "protocol version None"),
        (b'{"v":1,"id":1,"verb":"UP"}', "verb must be a lowercase word"),
        (b'{"v":1,"id":1,"verb":"up","args":[]}', "args must be an object"),
        (b'{"v":1,"id":1,"verb":"up","extra":1}', "unknown request field 'extra'"),
        (b'{"v":1,"id":1,"verb":"up","args":{"t":NaN}}', "NaN is not valid JSON"),
        (b"[" * 100_000, "message longer than"),
        (b"[" * 60_000, "nested too deeply"),
    ],
)
def test_bad_requests_are_one_line_errors(line: bytes, message: str) -> None:
    with pytest.raises(BadRequestError) as info:
        decode_request(line)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_request_keeps_the_id_when_it_was_readable() -> None:
    with pytest.raises(BadRequestError) as info:
        decode_request(b'{"v":1,"id":5,"verb":7}')
    assert info.value.request_id == 5


def test_request_size_limit_is_exact() -> None:
    base = encode_request(Request(1, "status", {"profile": ""})).rstrip(b"\n")
    pad = MAX_REQUEST_BYTES - len(base)
    ok = base.replace(b'"profile":""', b'"profile":"' + b"x" * pad + b'"')
    assert len(ok) == MAX_REQUEST_BYTES
    decode_request(ok)
    with pytest.raises(BadRequestError):
        decode_request(ok.replace(b'"x', b'"xx', 1))


@pytest.mark.parametrize(
    "line",
    [
        b"nonsense",
        b'{"v":1}',
        b'{"v":1,"id":1}',
        b'{"v":1,"id":1,"ok":false}',
        b'{"v":1,"id":1,"ok":false,"error":{"code":1}}',
        b'{"v":1,"event":[]}',
        b'{"v":3,"id":1,"ok":true}',
    ],
)
def test_malformed_replies_are_protocol_errors(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_reply(line)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


def _request_like() -> st.SearchStrategy[Any]:
    keys = st.sampled_from(["v", "id", "verb", "args", "x"])
    return st.dictionaries(keys, _json | st.just(1) | st.just("up"))


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        _json.map(lambda v: json.dumps(v).encode()),
        _request_like().map(lambda v: json.dumps(v).encode()),
    )
)
def test_decode_request_raises_only_bad_request(line: bytes) -> None:
    try:
        request = decode_request(line)
    except BadRequestError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(request.args, dict) and isinstance(request.id, int)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        _json.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(
            st.sampled_from(["v", "id", "ok", "result", "error", "event"]),
            _json | st.just(1) | st.booleans(),
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_decode_reply_raises_only_protocol_error(line: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_reply(line)


def test_protocol_module_imports_no_daemon_code() -> None:
    import subprocess
    import sys

    code = (
        "import sys, shuttled.control.protocol; "
        "bad = [m for m in sys.modules if m.startswith('shuttled.') and m not in "
        "('shuttled.control', 'shuttled.control.protocol', 'shuttled.control.schema', "
        "'shuttled.const', 'shuttled.errors')]; print(bad); "
        "sys.exit(bool(bad) or 'yaml' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
