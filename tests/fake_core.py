"""A fake daemon core and a control server running in a thread, shared by the control
tests (the socket, D-Bus and shuttlectl ones, unit and integration)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shuttled.config import Config, DnsSettings, Profile
from shuttled.control import api
from shuttled.control.unix import UnixControlServer
from shuttled.errors import ShuttledError, TimeoutError_
from tests.helpers import LoopThread

MEMBER_UID = 4242  # in work's allow list
STRANGER_UID = 4343


def fake_config() -> Config:
    return Config.of(
        Profile(
            "work",
            "alice@bastion",
            subnets=("10.0.0.0/8",),
            autostart=True,
            allow=(f"user:{MEMBER_UID}",),
        ),
        Profile("lab", "root@lab", subnets=("192.168.50.0/24",), dns=DnsSettings("all")),
        Profile("slow", "slow@host", auto_nets=True),
        Profile("broken", "bad@host", auto_nets=True),
    )


class FakeCore:
    """Implements api.Core with canned data; records calls; `up slow` never finishes."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or fake_config()
        self.states = {name: "down" for name in self.config.profiles}
        # Like the daemon: autostart profiles are wanted until someone takes them down.
        self.wanted = {n for n, p in self.config.profiles.items() if p.autostart}
        self.queues: list[asyncio.Queue[dict[str, Any]]] = []
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def _row(self, name: str) -> dict[str, Any]:
        p = self.config.profiles[name]
        return {
            "name": name,
            "state": self.states[name],
            "remote": p.remote,
            "autostart": p.autostart,
            "wanted": name in self.wanted,
        }

    def _publish(self, name: str, error: str | None = None) -> None:
        for q in self.queues:
            q.put_nowait(
                {
                    "type": "state",
                    "profile": name,
                    "state": self.states[name],
                    "error": error,
                    "time": 1_700_000_000.0,
                }
            )

    def list_profiles(self) -> list[dict[str, Any]]:
        self.calls.append(("list_profiles", ()))
        return [self._row(n) for n in self.config.profiles]

    def _status(self, name: str) -> dict[str, Any]:
        up = self.states[name] == "up"
        return {
            **self._row(name),
            "mode": "direct" if up else None,
            "connect": "remote" if up else None,
            "since": 1_700_000_000.0 if up else None,
            "uptime": 7384.0 if up else 0.0,
            "rx": 1288490188 if up else 0,
            "tx": 325058560 if up else 0,
            "connections": 12 if up else 0,
            "last_error": "ssh: Permission denied (publickey)" if name == "broken" else None,
            "subnets": [
                {"subnet": s, "source": "config"} for s in self.config.profiles[name].subnets
            ],
            "rtt": 0.023 if up else None,
            "dns": None,
            "holding": False,
            "health": [],
        }

    def status(self, name: str | None) -> dict[str, Any] | list[dict[str, Any]]:
        self.calls.append(("status", (name,)))
        if name is not None:
            return self._status(name)
        return [self._status(n) for n in self.config.profiles]

    async def up(self, name: str, wait: bool, timeout: float) -> dict[str, Any]:
        self.calls.append(("up", (name, wait, timeout)))
        self.wanted.add(name)
        if name == "slow":
            await asyncio.sleep(timeout)
            raise TimeoutError_(f"{name} did not come up within {timeout:g} s")
        if name == "broken":
            self.states[name] = "failed"
            self._publish(name, "ssh: Permission denied (publickey)")
            raise ShuttledError(f"{name}: ssh: Permission denied (publickey)")
        self.states[name] = "up" if wait else "connecting"
        self._publish(name)
        return self._status(name)

    async def down(self, name: str) -> dict[str, Any]:
        self.calls.append(("down", (name,)))
        self.wanted.discard(name)
        self.states[name] = "down"
        self._publish(name)
        return self._status(name)

    def stats(self, name: str) -> dict[str, Any]:
        self.calls.append(("stats", (name,)))
        return {
            "name": name,
            "state": self.states[name],
            "mode": "direct",
            "rx": 1536,
            "tx": 10 << 20,
            "active": 3,
            "total": 120,
            "failed": 2,
            "reconnects": 1,
            "uptime": 65.0,
            "rtt": 0.0123,
            "ssh_pid": 321,
            "ssh_cpu": 1.25,
            "ssh_rss": 12 << 20,
            "connect": {
                "mode": "remote",
                "why": None,
                "pending": 1,
                "refused": 4,
                "unreachable": 2,
                "timed_out": 1,
                "abandoned": 0,
                "retransmits": 3,
                "passed": 0,
            },
            "dns": {
                "mode": "all",
                "path": "firewall",
                "queries": 40,
                "answered": 38,
                "failed": 1,
                "timeouts": 1,
                "cache_hits": 0,
                "hosts": 0,
                "tunnel": 40,
                "local": 0,
                "peer": 0,
            },
            "future_counter": 7,  # a newer daemon's: shown as it is
        }

    def connections(self, name: str) -> list[dict[str, Any]]:
        self.calls.append(("connections", (name,)))
        return [
            {
                "proto": "tcp",
                "src": "127.0.0.1:50000",
                "dst": "10.1.2.3:443",
                "rx": 2048,
                "tx": 100,
                "age": 3.5,
                "state": "open",
            }
        ]

    async def reload(self) -> dict[str, Any]:
        self.calls.append(("reload", ()))
        return {"added": ["new"], "removed": [], "changed": ["lab"], "unchanged": ["work"]}

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.queues.append(q)
        return q

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self.queues.remove(queue)

    def version(self) -> dict[str, Any]:
        return {"version": "9.9.9", "protocol": 1, "firewall": "nft", "uptime": 7384.0}


def caller(uid: int, *groups: int) -> api.Caller:
    return api.Caller(uid, uid, 1, groups)


class ServerThread(LoopThread):
    """A UnixControlServer on its own event loop in a thread, for blocking clients."""

    def __init__(self, core: FakeCore, path: Path, **kw: Any) -> None:
        super().__init__()
        self.core, self.path = core, path
        self.server = UnixControlServer(core, **kw)

    def __enter__(self) -> ServerThread:
        self.start_loop()
        self.run(lambda: self.server.start(self.path))
        return self

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    def __exit__(self, *exc: object) -> None:
        self.run(self.stop)
        self.stop_loop()


@contextmanager
def serving(
    path: Path, core: FakeCore | None = None, uid: int = 0, **kw: Any
) -> Iterator[ServerThread]:
    """A server whose every client is `uid` (credentials injected, not from the kernel)."""
    with ServerThread(
        core or FakeCore(), path, credentials=lambda _sock: caller(uid), **kw
    ) as thread:
        yield thread
