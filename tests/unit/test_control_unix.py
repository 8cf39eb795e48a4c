"""The control socket end to end: real Unix sockets in tmp, a fake core, hostile clients."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from shuttled.control import api
from shuttled.control.protocol import MAX_REQUEST_BYTES, Request, encode_request
from shuttled.control.unix import UnixControlServer, peer_credentials, proc_groups
from shuttled.errors import ShuttledError
from tests.fake_core import MEMBER_UID, STRANGER_UID, FakeCore, caller
from tests.helpers import run_async

Test = Callable[[UnixControlServer, Path], Awaitable[None]]


def with_server(
    test: Test, tmp_path: Path, core: FakeCore | None = None, uid: int | None = None, **kw: Any
) -> None:
    """Start a server in tmp (credentials of `uid` injected, else from the kernel)."""
    path = tmp_path / "run" / "control.sock"
    if uid is not None:
        kw["credentials"] = lambda _sock: caller(uid)

    async def main() -> None:
        server = UnixControlServer(core or FakeCore(), **kw)
        await server.start(path)
        try:
            await asyncio.wait_for(test(server, path), 60)
        finally:
            server.close()
            await server.wait_closed()

    run_async(main())


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: Path) -> Conn:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), 10)
        assert line, "connection closed"
        return json.loads(line)  # type: ignore[no-any-return]

    async def ask(self, verb: str, request_id: int = 1, **args: Any) -> dict[str, Any]:
        await self.send(encode_request(Request(request_id, verb, args)))
        return await self.recv()

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 10) == b""

    def close(self) -> None:
        self.writer.close()


async def ask(path: Path, verb: str, **args: Any) -> dict[str, Any]:
    conn = await Conn.open(path)
    try:
        return await conn.ask(verb, **args)
    finally:
        conn.close()


# --- basics ------------------------------------------------------------------------------------


def test_status_over_the_socket_with_kernel_credentials(tmp_path: Path) -> None:
    async def test(server: UnixControlServer, path: Path) -> None:
        reply = await ask(path, "status", profile="work")
        assert reply["ok"] and reply["id"] == 1 and reply["result"]["name"] == "work"
        assert stat.S_IMODE(path.stat().st_mode) == 0o666
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755

    with_server(test, tmp_path)


def test_peer_credentials_are_the_connecting_process(tmp_path: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        who = peer_credentials(a)
    assert (who.uid, who.gid, who.pid) == (os.getuid(), os.getgid(), os.getpid())
    assert set(who.groups) >= set(os.getgroups()) - {os.getgid()}


def test_proc_groups_only_trusts_a_process_that_still_has_the_uid(tmp_path: Path) -> None:
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "status").write_text(
        "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t27 100 \n"
    )
    assert proc_groups(77, 1000, tmp_path) == (27, 100)
    assert proc_groups(77, 1001, tmp_path) is None
    assert proc_groups(78, 1000, tmp_path) is None


def test_up_is_denied_to_a_stranger_and_allowed_to_a_member(tmp_path: Path) -> None:
    core = FakeCore()

    async def stranger(server: UnixControlServer, path: Path) -> None:
        reply = await ask(path, "up", profile="work")
        assert not reply["ok"] and reply["error"]["code"] == "denied"
        assert (await ask(path, "status", profile="work"))["ok"]

    async def member(server: UnixControlServer, path: Path) -> None:
        reply = await ask(path, "up", profile="work")
        assert reply["ok"] and reply["result"]["state"] == "up"

    with_server(stranger, tmp_path, core, uid=STRANGER_UID)
    assert core.states["work"] == "down"
    with_server(member, tmp_path, core, uid=MEMBER_UID)
    assert core.states["work"] == "up"


def test_requests_on_one_connection_are_answered_in_order_with_their_ids(tmp_path: Path) -> None:
    async def test(server: UnixControlServer, path: Path) -> None:
        conn = await Conn.open(path)
        await conn.send(
            b"".join(encode_request(Request(i, "version", {})) for i in range(10, 15)) + b"\n\n"
        )
        assert [(await conn.recv())["id"] for _ in range(5)] == [10, 11, 12, 13, 14]
        conn.close()

    with_server(test, tmp_path)


def test_a_bug_in_the_core_is_an_internal_error_and_the_server_carries_on(tmp_path: Path) -> None:
    core = FakeCore()

    def broken_stats(name: str) -> dict[str, Any]:
        raise ZeroDivisionError

    core.stats = broken_stats  # type: ignore[method-assign]

    async def test(server: UnixControlServer, path: Path) -> None:
        reply = await ask(path, "stats", profile="work")
        assert reply["error"] == {
            "code": "internal",
            "message": "internal error: ZeroDivisionError",
        }
        assert (await ask(path, "version"))["ok"]

    with_server(test, tmp_path, core)


def test_a_connection_error_inside_the_core_is_not_mistaken_for_the_client_leaving(
    tmp_path: Path,
) -> None:
    core = FakeCore()

    def refused(name: str) -> list[dict[str, Any]]:
        raise ConnectionRefusedError(111, "Connection refused")

    core.connections = refused  # type: ignore[method-assign]

    async def test(server: UnixControlServer, path: Path) -> None:
        reply = await ask(path, "connections", profile="work")
        assert reply["error"]["code"] == "internal"

    with_server(test, tmp_path, core)


def test_unreadable_credentials_get_an_error_reply(tmp_path: Path) -> None:
    def broken(_sock: Any) -> api.Caller:
        raise OSError(95, "Operation not supported")

    async def test(server: UnixControlServer, path: Path) -> None:
        # Turned away at accept, before the request: the reply waits, then EOF.
        conn = await Conn.open(path)
        reply = await conn.recv()
        assert "peer credentials" in reply["error"]["message"]
        assert await conn.closed()

    with_server(test, tmp_path, credentials=broken)


# --- socket file lifecycle -----------------------------------------------------------------------


def test_stale_socket_is_replaced_and_removed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # bound, never listening: what a SIGKILLed daemon leaves

    async def test(server: UnixControlServer, p: Path) -> None:
        assert (await ask(p, "version"))["ok"]

    with_server(test, tmp_path)
    assert not path.exists()


def test_a_live_socket_or_a_plain_file_is_not_stolen(tmp_path: Path) -> None:
    async def second(server: UnixControlServer, path: Path) -> None:
        with pytest.raises(ShuttledError, match="already listening"):
            await UnixControlServer(FakeCore()).start(path)
        assert (await ask(path, "version"))["ok"]

    with_server(second, tmp_path)
    plain = tmp_path / "plain.sock"
    plain.write_text("")
    with pytest.raises(ShuttledError, match="not a socket"):
        asyncio.run(UnixControlServer(FakeCore()).start(plain))


# --- hostile and slow clients --------------------------------------------------------------------


def test_oversized_request_gets_an_error_and_is_hung_up(tmp_path: Path) -> None:
    async def test(server: UnixControlServer, path: Path) -> None:
        conn = await Conn.open(path)
        await conn.send(b"x" * (MAX_REQUEST_BYTES + 10) + b"\n")
        reply = await conn.recv()
        assert "longer than 65536 bytes" in reply["error"]["message"]
        assert await conn.closed()

    with_server(test, tmp_path)


def test_slow_client_gets_an_error_and_is_hung_up(tmp_path: Path) -> None:
    async def test(server: UnixControlServer, path: Path) -> None:
        conn = await Conn.open(path)
        await conn.send(b'{"v":1,"id":1,')
        reply = await conn.recv()
        assert reply["error"]["message"] == "no complete request within 0.2 s"
        assert await conn.closed()

    with_server(test, tmp_path, idle_timeout=0.2)


def test_too_many_clients_are_told_busy(tmp_path: Path) -> None:
    async def test(server: UnixControlServer, path: Path) -> None:
        idle = [await Conn.open(path) for _ in range(2)]
        await asyncio.sleep(0.05)
        extra = await Conn.open(path)
        assert (await extra.recv())["error"]["code"] == "busy"
        for conn in idle:
            conn.close()
        await asyncio.sleep(0.05)
        assert (await ask(path, "version"))["ok"]

    with_server(test, tmp_path, uid=STRANGER_UID, max_clients=2)


def _garbage(rng: random.Random, i: int) -> bytes:
    kinds = [
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
        lambda: b"{" * rng.randrange(1, 5000),
        lambda: b"[" * rng.randrange(1, 60000),
        lambda: json.dumps(rng.choice([[], 1, "up", None, {"v": 1}, {"v": 1, "id": i}])).encode(),
        lambda: json.dumps(
            {
                "v": 1,
                "id": i,
                "verb": rng.choice(["up", "fly", "down", "x"]),
                "args": rng.choice([{}, {"profile": i}, {"profile": "nope"}, {"timeout": "x"}, []]),
            }
        ).encode(),
        lambda: json.dumps(
            {"v": rng.choice([0, 2, "1", True]), "id": i, "verb": "status"}
        ).encode(),
    ]
    data = rng.choice(kinds)().replace(b"\n", b" ")
    return b"!" + data if not data.strip() else data


def test_a_thousand_malformed_requests_leave_the_server_answering(tmp_path: Path) -> None:
    rng = random.Random(1234)

    async def flood(path: Path, count: int, offset: int) -> None:
        conn = await Conn.open(path)
        for i in range(count):
            await conn.send(_garbage(rng, offset + i) + b"\n")
            reply = await conn.recv()
            assert reply["ok"] is False and reply["error"]["code"] in (
                "bad_request",
                "no_such_profile",
                "denied",
            ), reply
        conn.close()

    async def huge(path: Path) -> None:
        conn = await Conn.open(path)
        await conn.send(os.urandom(MAX_REQUEST_BYTES + 1).replace(b"\n", b"x") + b"\n")
        assert (await conn.recv())["error"]["code"] == "bad_request"
        assert await conn.closed()

    async def test(server: UnixControlServer, path: Path) -> None:
        await asyncio.gather(*(flood(path, 190, k * 1000) for k in range(5)))  # 950
        await asyncio.gather(*(huge(path) for _ in range(50)))  # + 50 = 1000
        assert (await ask(path, "status", profile="work"))["result"]["name"] == "work"
        assert server.client_count <= 1

    with_server(test, tmp_path, uid=STRANGER_UID, max_per_uid=64)


def test_one_user_cannot_hold_more_than_its_share_but_root_always_gets_in(tmp_path: Path) -> None:
    async def test(server: UnixControlServer, path: Path) -> None:
        held = [await Conn.open(path) for _ in range(3)]
        await asyncio.sleep(0.05)
        extra = await Conn.open(path)
        assert (await extra.recv())["error"]["code"] == "busy"
        for conn in held:
            conn.close()

    with_server(test, tmp_path, uid=STRANGER_UID, max_per_uid=3)
    with_server(lambda server, path: _root_gets_in(path), tmp_path, uid=0, max_clients=1)


async def _root_gets_in(path: Path) -> None:
    held = [await Conn.open(path) for _ in range(3)]
    assert (await ask(path, "version"))["ok"]
    for conn in held:
        conn.close()


# --- watch ---------------------------------------------------------------------------------------


def test_watch_streams_events_until_the_client_goes(tmp_path: Path) -> None:
    core = FakeCore()

    async def test(server: UnixControlServer, path: Path) -> None:
        watcher = await Conn.open(path)
        first = await watcher.ask("watch", request_id=9)
        assert first == {"v": 1, "id": 9, "ok": True, "result": {"streaming": "watch"}}
        assert (await ask(path, "up", profile="lab"))["ok"]
        assert (await ask(path, "down", profile="lab"))["ok"]
        events = [await watcher.recv(), await watcher.recv()]
        assert [e["event"]["state"] for e in events] == ["up", "down"]
        assert all(e["v"] == 1 and e["event"]["profile"] == "lab" for e in events)
        await watcher.send(b"ignored while watching\n")
        watcher.close()
        for _ in range(100):
            if not core.queues:
                break
            await asyncio.sleep(0.01)
        assert core.queues == []

    with_server(test, tmp_path, core, idle_timeout=0.2)


def test_close_ends_watching_clients(tmp_path: Path) -> None:
    core = FakeCore()
    holder: list[Conn] = []

    async def test(server: UnixControlServer, path: Path) -> None:
        watcher = await Conn.open(path)
        await watcher.ask("watch")
        holder.append(watcher)
        server.close()
        await server.wait_closed()
        assert await watcher.closed()
        assert not path.exists()
        assert core.queues == []

    with_server(test, tmp_path, core)
