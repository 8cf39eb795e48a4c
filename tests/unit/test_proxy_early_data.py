"""Bytes an app sends before its channel is open are held, not dropped.

Python before 3.11.3 (Debian 12's python3 is 3.11.2, what the .deb runs on) starts
reading a new connection even though connection_made paused it, so data_received
can come while the direct-tcpip channel is still opening. The package test
(tests/integration/test_packages.py) found HTTP requests vanishing that way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from shuttled.tunnel.channels import State
from shuttled.tunnel.proxy import LocalConnection, TransparentProxy

_made: list[LocalConnection] = []


@pytest.fixture(autouse=True)
def no_fault_contained() -> Iterator[None]:
    """The fault boundary would swallow a failed assertion inside a fake: fail here."""
    _made.clear()
    yield
    assert all(not any(c.faults.counts.values()) for c in _made)


class FakeTransport:
    def __init__(self) -> None:
        self.reading = False
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.reading = False
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.reading = True
        self.calls.append("resume")

    def is_closing(self) -> bool:
        return False


class FakeChannel:
    def __init__(self) -> None:
        self.state = State.OPENING
        self.sent: list[bytes | None] = []

    def send(self, data: bytes) -> None:
        assert self.state is State.OPEN
        self.sent.append(bytes(data))

    def send_eof(self) -> None:
        assert self.state is State.OPEN
        self.sent.append(None)


def connection() -> tuple[LocalConnection, FakeTransport, FakeChannel]:
    conn = LocalConnection(TransparentProxy(lambda: None))
    _made.append(conn)
    transport, channel = FakeTransport(), FakeChannel()
    conn.transport = transport  # type: ignore[assignment]
    conn.channel = channel  # type: ignore[assignment]
    return conn, transport, channel


def open_(conn: LocalConnection, channel: Any) -> None:
    channel.state = State.OPEN
    conn.on_open(channel)


def test_data_before_open_is_sent_once_open_and_reading_stops_meanwhile() -> None:
    conn, transport, channel = connection()
    conn.data_received(b"GET / HTTP/1.0\r\n")
    assert channel.sent == [] and transport.reading is False
    conn.data_received(b"\r\n")
    open_(conn, channel)
    assert channel.sent == [b"GET / HTTP/1.0\r\n", b"\r\n"]
    assert transport.reading is True
    conn.data_received(b"more")
    assert channel.sent[-1] == b"more"


def test_eof_before_open_follows_the_data_and_reading_stays_off() -> None:
    conn, transport, channel = connection()
    conn.data_received(b"x")
    conn.eof_received()
    open_(conn, channel)
    assert channel.sent == [b"x", None]
    assert transport.calls[-1] == "pause"
