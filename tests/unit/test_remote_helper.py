"""The remote helper, run the way the remote runs it: `sh -c loader_command(...)` fed
helper_source() on stdin, then RFC 4254 channel messages over its stdio.

A few tests drive an in-process Helper over a socketpair instead, where they need
small limits (channel count, UDP idle time) or to look at its queues.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shuttled import const
from shuttled.remote import (
    HELPER_BANNER,
    HELPER_SYNC,
    HELPER_TRUNCATED_EXIT,
    helper_source,
    loader_command,
)
from shuttled.remote import helper as helper_mod
from shuttled.tunnel import sshmsg
from tests.helpers import async_test
from tests.unit.helper_client import (
    TIMEOUT,
    Chan,
    Proc,
    echo_server,
    helper_inprocess,
    helper_process,
    udp_echo,
)

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def python38() -> str | None:
    """A runnable Python 3.8 interpreter, if this machine has one."""
    candidates = [
        shutil.which("python3.8") or "",
        *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8"))),
    ]
    for path in candidates:
        probe = [path, "-c", "import sys; assert sys.version_info[:2] == (3, 8)"]
        if path and subprocess.run(probe, capture_output=True).returncode == 0:
            return path
    return None


def pyenv_python(version: str) -> str | None:
    found = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python")))
    return found[0] if found else None


# --- the loader ---------------------------------------------------------------------------------


def test_loader_command_is_one_line_and_quotes_names() -> None:
    command = loader_command(1234, const.REMOTE_PYTHONS)
    assert "\n" not in command and "\\" not in command and "!" not in command
    assert command.startswith("exec /bin/sh -c ")
    with pytest.raises(ValueError):
        loader_command(10, ("python3; rm -rf /",))
    with pytest.raises(ValueError):
        loader_command(10, ())


def test_missing_python_exits_97_naming_what_was_tried() -> None:
    command = loader_command(10, ("nonexistent-python-xyz", "nonexistent-python-abc"))
    result = subprocess.run(
        ["sh", "-c", command], input=b"0123456789", capture_output=True, timeout=10
    )
    assert result.returncode == const.HELPER_NO_PYTHON_EXIT == 97
    assert result.stderr.decode().splitlines() == [
        "shuttled: no Python 3.8 or newer on the remote (tried nonexistent-python-xyz, "
        "nonexistent-python-abc)"
    ]
    assert result.stdout == b""


def test_truncated_source_exits_96() -> None:
    source = helper_source()
    result = subprocess.run(
        ["sh", "-c", loader_command(len(source) + 5, ("python3",))],
        input=source,
        capture_output=True,
        timeout=10,
    )
    assert result.returncode == HELPER_TRUNCATED_EXIT
    assert result.stderr.decode().startswith("shuttled: helper source truncated at")
    assert len(result.stderr.decode().splitlines()) == 1


def test_too_old_pythons_are_skipped() -> None:
    old = [p for p in (pyenv_python("2.7"), pyenv_python("3.6"), pyenv_python("3.7")) if p]
    if not old:
        pytest.skip("no Python older than 3.8 here")
    source = helper_source()
    result = subprocess.run(
        ["sh", "-c", loader_command(len(source), (*old, "python3"))],
        input=source,
        capture_output=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert b"shuttled-helper 1" in result.stdout
    only_old = subprocess.run(
        ["sh", "-c", loader_command(len(source), tuple(old))],
        input=source,
        capture_output=True,
        timeout=20,
    )
    assert only_old.returncode == 97
    message = only_old.stderr.decode()
    assert "no Python 3.8 or newer on the remote" in message
    for python in old:  # each one named with the version it reported
        assert f"; {python} is {Path(python).parents[1].name}" in message, message


@pytest.mark.parametrize(
    "shell", ["sh", "bash", "dash", "zsh", "ksh", "mksh", "fish", "csh", "tcsh", "busybox"]
)
def test_login_shells_run_the_loader(shell: str) -> None:
    """sshd runs the exec command through the user's login shell: `SHELL -c COMMAND`."""
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed")
    argv = [shell, "sh", "-c"] if shell == "busybox" else [shell, "-c"]
    source = helper_source()
    result = subprocess.run(
        [*argv, loader_command(len(source), ("nonexistent-x", "python3"))],
        input=source,
        capture_output=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    before, sync, after = result.stdout.partition(HELPER_SYNC)
    assert (before, sync) == (b"", HELPER_SYNC)  # the loader's first line, then messages
    hello, _ = sshmsg.split_packets(bytearray(after), 1 << 16)
    assert [t for t, _ in hello] == [sshmsg.MSG_REQUEST_SUCCESS]


# --- the embedded program ---------------------------------------------------------------------


def test_helper_source_is_wire_then_helper() -> None:
    source = helper_source()
    wire = (ROOT / "shuttled/tunnel/sshmsg.py").read_bytes()
    assert source.startswith(wire)
    assert source.endswith((ROOT / "shuttled/remote/helper.py").read_bytes())
    compile(source, "<shuttled-helper>", "exec")


def test_helper_does_not_rebind_wire_names() -> None:
    """Embedded, both files share one namespace: rebinding a name sshmsg uses would
    change sshmsg's behaviour. Run the embedded program (without main) and compare."""
    namespace: dict[str, Any] = {"__name__": "embedded_check"}
    exec(compile((ROOT / "shuttled/tunnel/sshmsg.py").read_bytes(), "sshmsg", "exec"), namespace)
    before = dict(namespace)
    exec(compile((ROOT / "shuttled/remote/helper.py").read_bytes(), "helper", "exec"), namespace)
    rebound = sorted(
        k for k, v in before.items() if namespace[k] is not v and not k.startswith("__")
    )
    assert rebound == []
    # and the embedded helper found its wire functions in that namespace
    assert namespace["wire"].split_packets is before["split_packets"]


def test_imported_helper_uses_the_package_wire_module() -> None:
    assert helper_mod.wire is sshmsg


def test_vermin_says_python_38() -> None:
    if shutil.which("vermin") is None:
        pytest.skip("vermin not installed")
    result = subprocess.run(
        [
            "vermin",
            "-t=3.8-",
            "--no-tips",
            "--violations",
            "shuttled/remote",
            "shuttled/tunnel/sshmsg.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the helper over stdio ---------------------------------------------------------------------


@async_test(TIMEOUT)
async def test_hello_and_clean_exit_on_stdin_eof() -> None:
    async with helper_process() as h:
        banner, version = await asyncio.wait_for(h.peer.hello, 10)
        assert banner == HELPER_BANNER == helper_mod.HELPER_PROTOCOL
        assert version == "{}.{}.{}".format(*sys.version_info[:3])
        code, err = await h.finish()
        assert (code, err) == (0, "")


async def _round_trip(h: Proc) -> None:
    received: list[int] = []
    server, port = await echo_server(received)
    chan = await h.peer.open_tcp(port)
    assert isinstance(chan, Chan)
    assert (chan.rwin, chan.rmax) == (1 << 20, 32 * 1024)
    await chan.send(b"hello through the helper")
    await chan.wait_for(lambda: len(chan.data) == 24)
    assert bytes(chan.data) == b"hello through the helper"
    chan.send_eof()  # -> shutdown(SHUT_WR) -> echo server sees EOF and closes
    await chan.wait_for(lambda: chan.got_close)
    assert chan.events == [
        sshmsg.MSG_CHANNEL_DATA,
        sshmsg.MSG_CHANNEL_EOF,
        sshmsg.MSG_CHANNEL_CLOSE,
    ]
    assert received == [24]
    server.close()


@async_test(TIMEOUT)
async def test_tcp_round_trip_eof_both_ways_close() -> None:
    async with helper_process() as h:
        await _round_trip(h)
        # The freed id is not reused and no message arrived after CLOSE.
        await _round_trip(h)
        code, err = await h.finish()
        assert (code, err) == (0, "")


@async_test(TIMEOUT)
async def test_runs_on_python_38() -> None:
    path = python38()
    if path is None:
        pytest.skip("no Python 3.8 here (vermin is the check)")
    async with helper_process(pythons=("nonexistent-python-xyz", path)) as h:
        _, version = await asyncio.wait_for(h.peer.hello, 10)
        assert version.startswith("3.8.")
        await _round_trip(h)
        udp, port = await udp_echo("127.0.0.1")
        chan = await h.peer.open_udp("inet")
        chan.send_datagram("127.0.0.1", port, b"ping")
        await chan.wait_for(lambda: len(chan.datagrams) == 1)
        udp.close()
        assert await h.finish() == (0, "")


@async_test(TIMEOUT)
async def test_server_closes_first_and_client_half_close() -> None:
    """The target says its piece and half-closes; we still send and then finish."""
    got = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner\n")
        writer.write_eof()
        got.set_result(await reader.read())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with helper_process() as h:
        chan = await h.peer.open_tcp(server.sockets[0].getsockname()[1])
        await chan.wait_for(lambda: chan.got_eof)
        assert bytes(chan.data) == b"banner\n" and not chan.got_close
        await chan.send(b"late words")
        chan.send_eof()
        assert await asyncio.wait_for(got, 10) == b"late words"
        await chan.wait_for(lambda: chan.got_close)
        assert chan.events == [
            sshmsg.MSG_CHANNEL_DATA,
            sshmsg.MSG_CHANNEL_EOF,
            sshmsg.MSG_CHANNEL_CLOSE,
        ]
        assert await h.finish() == (0, "")
    server.close()


@async_test(TIMEOUT)
async def test_refused_port_fails_quickly_with_reason_2() -> None:
    async with helper_process() as h:
        await h.peer.hello
        start = time.monotonic()
        reason, text = await h.peer.open_tcp(free_port())
        assert time.monotonic() - start < 1.0
        assert reason == sshmsg.OPEN_CONNECT_FAILED
        assert "refused" in text.lower()
        assert await h.finish() == (0, "")


@async_test(TIMEOUT)
async def test_unknown_channel_type_and_requests() -> None:
    async with helper_process() as h:
        assert await h.peer.open("session", b"") == (
            sshmsg.OPEN_UNKNOWN_CHANNEL_TYPE,
            "unknown channel type 'session'",
        )
        server, port = await echo_server()
        chan = await h.peer.open_tcp(port)
        h.peer.write(sshmsg.channel_request(chan.rid, "keepalive@openssh.com", True))
        assert await asyncio.wait_for(chan.replies.get(), 5) == sshmsg.MSG_CHANNEL_FAILURE
        h.peer.write(sshmsg.channel_request(chan.rid, "env", False, sshmsg.sstring("x")))
        h.peer.write(
            sshmsg.packet(
                sshmsg.MSG_GLOBAL_REQUEST, sshmsg.sstring("ping@shuttled") + sshmsg.sbool(True)
            )
        )
        assert await asyncio.wait_for(h.peer.globals.get(), 5) == sshmsg.MSG_REQUEST_FAILURE
        assert chan.replies.empty()
        chan.send_close()
        await chan.wait_for(lambda: chan.got_close)
        assert await h.finish() == (0, "")
        server.close()


@async_test(TIMEOUT)
async def test_window_and_max_packet_respected_then_resumed() -> None:
    async with helper_process() as h:
        server, port = await echo_server()
        chan = await h.peer.open_tcp(port, window=1000, max_packet=300, grant=False)
        payload = os.urandom(10_000)
        await chan.send(payload)
        await chan.wait_for(lambda: len(chan.data) == 1000)
        await asyncio.sleep(0.3)  # the helper must now be waiting, not sending
        assert len(chan.data) == 1000 and max(chan.packet_sizes) <= 300
        chan.adjust(4000)
        await chan.wait_for(lambda: len(chan.data) == 5000)
        await asyncio.sleep(0.2)
        assert len(chan.data) == 5000
        chan.adjust(5000)
        await chan.wait_for(lambda: len(chan.data) == 10_000)
        assert bytes(chan.data) == payload and max(chan.packet_sizes) <= 300
        chan.send_eof()
        chan.adjust(1)
        await chan.wait_for(lambda: chan.got_close)
        assert await h.finish() == (0, "")
        server.close()


@async_test(TIMEOUT)
async def test_8_mib_each_way_sha256(capsys: pytest.CaptureFixture[str]) -> None:
    size = 8 << 20
    async with helper_process() as h:
        server, port = await echo_server()
        chan = await h.peer.open_tcp(port)
        payload = os.urandom(size)
        start = time.perf_counter()
        await chan.send(payload)
        chan.send_eof()
        await chan.wait_for(lambda: chan.got_close, timeout=60)
        elapsed = time.perf_counter() - start
        assert hashlib.sha256(chan.data).hexdigest() == hashlib.sha256(payload).hexdigest()
        with capsys.disabled():
            print(
                f"\n8 MiB up + 8 MiB down through the helper in {elapsed:.3f} s: "
                f"{size * 8 / elapsed / 1e6:.0f} Mbit/s each way"
            )
        assert await h.finish() == (0, "")
        server.close()


@async_test(TIMEOUT)
async def test_many_channels_at_once() -> None:
    async with helper_process() as h:
        server, port = await echo_server()
        chans = await asyncio.gather(*(h.peer.open_tcp(port) for _ in range(200)))
        payloads = [os.urandom(5000 + i) for i in range(len(chans))]
        await asyncio.gather(*(c.send(p) for c, p in zip(chans, payloads, strict=True)))
        for chan in chans:
            chan.send_eof()
        for chan, payload in zip(chans, payloads, strict=True):
            await chan.wait_for(lambda c=chan: c.got_close)
            assert bytes(chan.data) == payload
        assert await h.finish() == (0, "")
        server.close()


@async_test(TIMEOUT)
async def test_close_right_after_data_still_delivers_it() -> None:
    received: list[int] = []
    server, port = await echo_server(received)
    async with helper_process() as h:
        chan = await h.peer.open_tcp(port, grant=False)
        await chan.send(os.urandom(600_000))
        chan.send_eof()
        chan.send_close()
        await chan.wait_for(lambda: chan.got_close)
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.05)
        assert received == [600_000]
        assert chan.events.count(sshmsg.MSG_CHANNEL_CLOSE) == 1
        assert await h.finish() == (0, "")
    server.close()


@async_test(TIMEOUT)
async def test_stdin_eof_closes_every_socket() -> None:
    closed = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        closed.set_result(await reader.read())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with helper_process() as h:
        await h.peer.open_tcp(server.sockets[0].getsockname()[1])
        assert await h.finish() == (0, "")
        assert await asyncio.wait_for(closed, 5) == b""
    server.close()


@pytest.mark.parametrize("family, host", [("inet", "127.0.0.1"), ("inet6", "::1")])
@async_test(TIMEOUT)
async def test_udp_round_trip(family: str, host: str) -> None:
    try:
        udp, port = await udp_echo(host)
    except OSError:
        pytest.skip(f"no {family} loopback")
    async with helper_process() as h:
        chan = await h.peer.open_udp(family, max_packet=70_000)
        assert chan.rmax >= 65_536 + 64
        sizes = [0, 1, 1400, 9000, 65_000]
        for size in sizes:
            chan.send_datagram(host, port, bytes([size % 251]) * size)
        await chan.wait_for(lambda: len(chan.datagrams) == len(sizes))
        replies = [sshmsg.unpack_datagram(d) for d in chan.datagrams]
        assert sorted(len(p) for _, _, p in replies) == sizes
        assert {(a, p) for a, p, _ in replies} == {(host, port)}
        chan.send_close()
        await chan.wait_for(lambda: chan.got_close)
        assert await h.finish() == (0, "")
    udp.close()


@async_test(TIMEOUT)
async def test_udp_drops_what_the_window_cannot_take() -> None:
    udp, port = await udp_echo("127.0.0.1")
    async with helper_process() as h:
        chan = await h.peer.open_udp("inet", window=150, grant=False)
        chan.send_datagram("127.0.0.1", port, b"x" * 200)  # 221-byte echo frame: dropped
        await asyncio.sleep(0.2)
        chan.send_datagram("127.0.0.1", port, b"y" * 100)  # 121 bytes: fits
        await chan.wait_for(lambda: len(chan.datagrams) == 1)
        assert sshmsg.unpack_datagram(chan.datagrams[0])[2] == b"y" * 100
        chan.send_datagram("not-an-address", port, b"z")  # never resolved: dropped
        chan.send_close()
        await chan.wait_for(lambda: chan.got_close)
        code, err = await h.finish()
        assert code == 0
        assert err.splitlines() == [
            "shuttled-helper: udp: dropped 1 replies (client window or max packet, or stdout "
            "backed up) and 1 datagrams towards targets (send failed or not an address)"
        ]
    udp.close()


MALFORMED = {
    "length 1": b"\x00\x00\x00\x01\x00\x5e",
    "huge length": b"\x7f\x00\x00\x00\x00\x5e",
    "padding": sshmsg.HEADER.pack(6, 1, 96) + b"\x00\x00\x00\x00",
    "unknown type": sshmsg.packet(1, b"bye"),
    "unknown channel": sshmsg.eof(12345),
    "short data": sshmsg.packet(sshmsg.MSG_CHANNEL_DATA, b"\x00\x00"),
    "bad string": sshmsg.packet(sshmsg.MSG_CHANNEL_OPEN, b"\x00\x00\x10\x00tcp"),
    "trailing bytes": sshmsg.channel_open(
        sshmsg.UDP_CHANNEL_TYPE, 1, 100, 100, sshmsg.sstring("inet") + sshmsg.U32.pack(5) + b"junk"
    ),
    "open confirmation": sshmsg.open_confirmation(1, 2, 3, 4),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
@async_test(TIMEOUT)
async def test_malformed_packet_exits_3_with_one_line(name: str) -> None:
    async with helper_process() as h:
        await h.peer.hello
        h.peer.write(MALFORMED[name])
        code, err = await h.finish()
        assert code == helper_mod.EXIT_PROTOCOL == 3
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("shuttled-helper: protocol error: "), err
        assert "Traceback" not in err


async def sink_server() -> tuple[asyncio.AbstractServer, int]:
    """Accepts and never reads, with a tiny receive buffer: writes to it back up."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, sock=listener)
    return server, listener.getsockname()[1]


@pytest.mark.parametrize("violation", ["past max packet", "data after eof", "window overflow"])
@async_test(TIMEOUT)
async def test_state_violations_exit_3(violation: str) -> None:
    async with helper_process() as h:
        server, port = await sink_server()
        chan = await h.peer.open_tcp(port)
        if violation == "past max packet":
            h.peer.write(sshmsg.data_header(chan.rid, 40000) + bytes(40000))
        elif violation == "data after eof":
            chan.send_eof()
            h.peer.write(sshmsg.data_header(chan.rid, 1) + b"x")
        else:
            h.peer.write(sshmsg.window_adjust(chan.rid, 0xFFFFFFFF))
        code, err = await h.finish()
        assert code == 3 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        server.close()


# --- in-process: limits, timers and queues -------------------------------------------------


@async_test(TIMEOUT)
async def test_channel_limit_gives_reason_4() -> None:
    async with helper_inprocess(max_channels=2) as (_, peer):
        first = await peer.open_udp()
        await peer.open_udp()
        reason, text = await peer.open_udp()
        assert reason == sshmsg.OPEN_RESOURCE_SHORTAGE and "too many" in text
        first.send_close()
        await first.wait_for(lambda: first.got_close)
        assert isinstance(await peer.open_udp(), Chan)  # the freed slot is usable again


@async_test(TIMEOUT)
async def test_data_past_the_window_is_a_protocol_error(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A target that accepts nothing: the helper grants nothing, so 1 MiB + 1 is too much."""
    monkeypatch.setattr(helper_mod.TcpChannel, "flush_socket", lambda self: None)
    server, port = await sink_server()
    async with helper_inprocess(expect_exit=3) as (_, peer):
        chan = await peer.open_tcp(port)
        for _ in range(32):
            peer.write(sshmsg.data_header(chan.rid, 32768) + bytes(32768))
        peer.write(sshmsg.data_header(chan.rid, 1) + b"!")
    assert capfd.readouterr().err == (
        "shuttled-helper: protocol error: channel 0: 1 bytes of data exceed the window (0 left)\n"
    )
    server.close()


@async_test(TIMEOUT)
async def test_internal_error_exits_70_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A bug outside any one channel (here: global requests) ends the helper. A bug in
    a channel's callback ends that channel only: test_remote_helper_faults.py."""

    def broken(self: Any, payload: memoryview) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(helper_mod.Helper, "_m_global_request", broken)
    async with helper_inprocess(expect_exit=70) as (_, peer):
        peer.write(
            sshmsg.packet(
                sshmsg.MSG_GLOBAL_REQUEST, sshmsg.sstring("ping@shuttled") + sshmsg.sbool(True)
            )
        )
    err = capfd.readouterr().err
    assert err.startswith("shuttled-helper: internal error: RuntimeError: simulated bug (line ")
    assert len(err.splitlines()) == 1


@async_test(TIMEOUT)
async def test_udp_idle_timeout_sends_eof_and_close() -> None:
    async with helper_inprocess(udp_idle=0.3) as (helper, peer):
        chan = await peer.open_udp()
        await chan.wait_for(lambda: chan.got_close, timeout=5)
        assert chan.events == [sshmsg.MSG_CHANNEL_EOF, sshmsg.MSG_CHANNEL_CLOSE]
        await asyncio.sleep(0.05)
        assert helper.channels == {}


@async_test(TIMEOUT)
async def test_udp_channel_asks_for_its_own_idle_timeout() -> None:
    # The client's flow idle travels with the open: the helper's default (here 30 s)
    # must not outlive nor cut short what the client promised.
    async with helper_inprocess(udp_idle=30.0) as (_helper, peer):
        chan = await peer.open(sshmsg.UDP_CHANNEL_TYPE, sshmsg.sstring("inet") + sshmsg.U32.pack(1))
        await chan.wait_for(lambda: chan.got_close, timeout=10)
        assert chan.events == [sshmsg.MSG_CHANNEL_EOF, sshmsg.MSG_CHANNEL_CLOSE]


@async_test(TIMEOUT)
async def test_stdout_backlog_is_bounded_and_resumes() -> None:
    """A client that stops reading holds back every socket: bounded output queue."""
    blob = os.urandom(4 << 20)

    async def blast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(blob)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(blast, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with helper_inprocess() as (helper, peer):
        chans = [await peer.open_tcp(port) for _ in range(8)]  # 8 MiB of window in total
        peer.gate.clear()
        await asyncio.sleep(0.5)
        assert helper.out_paused
        assert helper.out_bytes <= helper_mod.OUT_HIGH + helper_mod.SOCKET_READ
        peer.gate.set()
        for chan in chans:
            await chan.wait_for(lambda c=chan: c.got_eof)
            chan.send_eof()
            await chan.wait_for(lambda c=chan: c.got_close)
            assert bytes(chan.data) == blob
    server.close()
