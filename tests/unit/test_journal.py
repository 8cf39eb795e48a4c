"""sd_notify and the journal's native protocol without systemd-python: one datagram each."""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from shuttled.journal import JournalHandler, journal_field, notify


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "sock"
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_notify_sends_the_message_to_a_path(
    listener: tuple[socket.socket, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notify("READY=1")
    assert sock.recv(4096) == b"READY=1"


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"shuttled-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notify("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_without_a_manager_is_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    notify("READY=1")  # a stale socket: nothing raised


def parse_entry(datagram: bytes) -> dict[str, str]:
    """The native protocol read back: FIELD=value lines, or FIELD, length, bytes."""
    fields = {}
    while datagram:
        line, _, rest = datagram.partition(b"\n")
        if b"=" in line:
            name, _, value = line.partition(b"=")
            datagram = rest
        else:
            (size,) = struct.unpack("<Q", rest[:8])
            name, value, datagram = line, rest[8 : 8 + size], rest[8 + size + 1 :]
        fields[name.decode()] = value.decode()
    return fields


def test_a_record_becomes_an_entry_with_priority_and_profile(
    listener: tuple[socket.socket, Path],
) -> None:
    sock, path = listener
    handler = JournalHandler(str(path))
    record = logging.LogRecord("shuttled.x", logging.WARNING, "f.py", 7, "lost %s", ("it",), None)
    record.PROFILE = "work"
    handler.emit(record)
    handler.close()
    entry = parse_entry(sock.recv(65536))
    assert entry["MESSAGE"] == "lost it"
    assert entry["PRIORITY"] == "4"
    assert entry["PROFILE"] == "work"
    assert entry["SYSLOG_IDENTIFIER"] == "shuttled"


def test_a_multi_line_value_is_length_prefixed() -> None:
    assert parse_entry(journal_field("MESSAGE", "a\nb=c")) == {"MESSAGE": "a\nb=c"}


def test_without_a_journal_a_record_goes_to_stderr_with_its_priority(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = JournalHandler(str(tmp_path / "no-journal"))
    handler.emit(logging.LogRecord("x", logging.ERROR, "f.py", 1, "broken", None, None))
    handler.close()
    assert capsys.readouterr().err == "<3>shuttled: broken\n"
