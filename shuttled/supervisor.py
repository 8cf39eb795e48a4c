"""Per-profile supervision: listeners and rules live while a tunnel is wanted;
ssh sessions come and go underneath with backoff.

States: down -> connecting -> up -> reconnecting -> up ... ; failed when an
error cannot heal by retrying (bad local user, firewall refused the rules).
While reconnecting the rules stay in place and the proxy resets new
connections, so traffic to the subnets fails closed instead of leaking.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import ipaddress
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shuttled import const
from shuttled.errors import FirewallError, ShuttledError, UsageError
from shuttled.firewall.base import Backend, Capture, Subnet
from shuttled.tunnel.dns import DnsForwarder, DnsListener, parse_resolv_conf
from shuttled.tunnel.proxy import TransparentProxy
from shuttled.tunnel.session import Forward, SshSession
from shuttled.tunnel.ssh import SshTarget, server_endpoints

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")
BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
STABLE_AFTER = 30.0  # an up period this long resets the backoff

# Set in each profile's task so every log line can carry PROFILE= (journal field).
current_profile: contextvars.ContextVar[str] = contextvars.ContextVar("profile", default="")


class State(enum.StrEnum):
    DOWN = "down"
    CONNECTING = "connecting"
    UP = "up"
    RECONNECTING = "reconnecting"
    FAILED = "failed"


@dataclass(frozen=True)
class TunnelSpec:
    """Everything one tunnel needs: `shuttled run` and daemon profiles both build it."""

    name: str
    target: SshTarget
    subnets: tuple[Subnet, ...]
    forward: Forward = Forward.AUTO
    dns: bool = False
    dns_capture: tuple[str, ...] = ()  # resolvers whose port 53 we catch; () = resolv.conf
    dns_upstream: tuple[str, ...] = ()  # remote nameservers; () = the remote's resolv.conf
    listen: tuple[str, ...] = ("127.0.0.1", "::1")
    port: int = 0
    uid: int | None = None
    pythons: tuple[str, ...] = const.REMOTE_PYTHONS
    keepalive: float = const.KEEPALIVE_INTERVAL
    auto_exclude: bool = True
    reconnect: bool = True


class CaptureSet:
    """All captures of one table; every change is one transaction of the whole set,
    and our record changes only once the kernel accepted it."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.captures: dict[str, Capture] = {}

    def put(self, capture: Capture) -> None:
        wanted = {**self.captures, capture.name: capture}
        self.backend.apply(list(wanted.values()))
        self.captures = wanted

    def drop(self, name: str) -> None:
        if name not in self.captures:
            return
        wanted = {k: v for k, v in self.captures.items() if k != name}
        self.backend.apply(list(wanted.values()))
        self.captures = wanted


async def ssh_excludes(target: SshTarget) -> tuple[Subnet, ...]:
    """The ssh server's own address and port, so reconnects are never captured."""
    addresses, port, warning = await server_endpoints(target)
    if warning:
        log.warning("%s", warning)
    return tuple(Subnet(ipaddress.ip_network(a), (port, port), exclude=True)
                 for a in addresses)


async def remote_nameservers(session: SshSession) -> list[str]:
    status, out, err = await session.run("cat /etc/resolv.conf")
    servers = parse_resolv_conf(out.decode(errors="replace")) if status == 0 else []
    if not servers:
        raise ShuttledError(f"no nameserver in the remote's /etc/resolv.conf "
                            f"({err.decode(errors='replace').strip() or 'empty'})")
    return servers


StateListener = Callable[[str, State, str | None], None]


class Tunnel:
    """One profile's runtime: `up()` starts supervising, `down()` ends it."""

    def __init__(self, spec: TunnelSpec, captures: CaptureSet,
                 on_state: StateListener | None = None) -> None:
        self.spec = spec
        self.captures = captures
        self.state = State.DOWN
        self.since = time.time()
        self.last_error: str | None = None
        self.session: SshSession | None = None
        self.proxy = TransparentProxy(self._mux, addresses=spec.listen)
        self.dns_listener: DnsListener | None = None
        self.forwarder: DnsForwarder | None = None
        self.reconnects = 0
        self.up_since: float | None = None
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_state = on_state

    def _mux(self) -> Any:
        return self.session.current_mux() if self.session is not None else None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _set(self, state: State, error: str | None = None) -> None:
        self.state = state
        self.since = time.time()
        if error is not None:
            self.last_error = error
        self.up_since = self.since if state is State.UP else None
        self.changed.set()
        self.changed = asyncio.Event()
        if self._on_state is not None:
            self._on_state(self.spec.name, state, error)

    def up(self) -> None:
        if not self.running:
            current_profile.set(self.spec.name)
            self._task = asyncio.create_task(self._supervise(), name=f"tunnel {self.spec.name}")

    async def wait_settled(self) -> State:
        """Until the tunnel is up, or has failed, or has stopped."""
        while self.state in (State.CONNECTING, State.RECONNECTING) or (
                self.state is State.DOWN and self.running):
            await self.changed.wait()
        return self.state

    async def wait_not(self, state: State) -> State:
        while self.state is state:
            await self.changed.wait()
        return self.state

    async def down(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._teardown()
        self._set(State.DOWN)

    async def _supervise(self) -> None:
        backoff = BACKOFF_MIN
        self._set(State.CONNECTING)
        try:
            await self.proxy.start(self.spec.port)
        except OSError as exc:
            self._set(State.FAILED, f"cannot listen: {exc.strerror}")
            return
        while True:
            started = time.monotonic()
            error, permanent = await self._one_session()
            if permanent or not self.spec.reconnect:
                self._set(State.FAILED, error)
                return
            if time.monotonic() - started > STABLE_AFTER:
                backoff = BACKOFF_MIN
            self.reconnects += 1
            self._set(State.RECONNECTING, error)
            delay = backoff * random.uniform(0.8, 1.2)
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _one_session(self) -> tuple[str | None, bool]:
        """Run one ssh session to its end: (why it ended, whether retrying is futile)."""
        session = SshSession(self.spec.target, self.spec.name, forward=self.spec.forward,
                             pythons=self.spec.pythons, keepalive=self.spec.keepalive)
        self.session = session
        try:
            excludes = await ssh_excludes(self.spec.target) if self.spec.auto_exclude else ()
            await session.start()
            await self._capture(excludes)
        except (FirewallError, UsageError) as exc:
            await session.stop()
            return str(exc), True
        except ShuttledError as exc:
            await session.stop()
            return str(exc), False
        self._set(State.UP)
        try:
            # shield: a down() cancelling us must not cancel the session's own future
            reason = await asyncio.shield(session.closed)
        finally:
            await session.stop()
        return reason, False

    async def _capture(self, excludes: tuple[Subnet, ...]) -> None:
        dns_port, dns_servers = await self._start_dns() if self.spec.dns else (None, ())
        capture = Capture(name=self.spec.name, subnets=self.spec.subnets + excludes,
                          tcp_port=self.proxy.port, dns_port=dns_port,
                          dns_servers=dns_servers, uid=self.spec.uid)
        if self.captures.captures.get(self.spec.name) != capture:
            self.captures.put(capture)

    async def _start_dns(self) -> tuple[int, tuple[ipaddress.IPv4Address |
                                                    ipaddress.IPv6Address, ...]]:
        # One forwarder for the tunnel's life: it opens its channel through
        # whichever session is current, so a reconnect needs nothing here.
        assert self.session is not None
        spec = self.spec
        local = list(spec.dns_capture) or parse_resolv_conf(RESOLV_CONF.read_text())
        if not local:
            raise UsageError("DNS capture: no nameserver in /etc/resolv.conf")
        if self.dns_listener is None:
            upstream = list(spec.dns_upstream) or await remote_nameservers(self.session)
            self.forwarder = DnsForwarder(self._open_stream, upstream)
            self.dns_listener = DnsListener(self.forwarder)
            await self.dns_listener.start(spec.listen)
            log.info("DNS to %s answered by %s through the tunnel", ", ".join(local),
                     ", ".join(upstream))
        return self.dns_listener.port, tuple(ipaddress.ip_address(a) for a in local)

    async def _open_stream(self, host: str, port: int
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.session is None:
            raise ConnectionError("tunnel is not up")
        return await self.session.open_stream(host, port)

    async def _teardown(self) -> None:
        with contextlib.suppress(ShuttledError):
            self.captures.drop(self.spec.name)
        self.proxy.close()
        self.proxy = TransparentProxy(self._mux, addresses=self.spec.listen)
        if self.dns_listener is not None:
            self.dns_listener.close()
            self.dns_listener = None
        if self.forwarder is not None:
            self.forwarder.close()
            self.forwarder = None
        if self.session is not None:
            await self.session.stop()
            self.session = None

    # --- reporting ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        counters = self.proxy.counters
        live_up = sum(c.channel.bytes_up for c in self.proxy.connections if c.channel)
        live_down = sum(c.channel.bytes_down for c in self.proxy.connections if c.channel)
        session = self.session
        return {
            "tx": counters.bytes_up + live_up, "rx": counters.bytes_down + live_down,
            "active": len(self.proxy.connections), "total": counters.accepted,
            "failed": counters.failed, "reconnects": self.reconnects,
            "uptime": time.time() - self.up_since if self.up_since else 0.0,
            "rtt": session.rtt if session else None,
            "mode": str(session.mode) if session and session.mode else None,
            **_process_stats(session.master.pid if session else None),
            **({"dns": vars(self.forwarder.stats)} if self.forwarder else {}),
        }

    def connections(self) -> list[dict[str, Any]]:
        now = asyncio.get_running_loop().time()
        return [{"src": f"{c.src[0]}:{c.src[1]}", "dst": f"{c.dst[0]}:{c.dst[1]}",
                 "tx": c.channel.bytes_up if c.channel else 0,
                 "rx": c.channel.bytes_down if c.channel else 0,
                 "age": round(now - c.started, 3)} for c in self.proxy.connections]


def _process_stats(pid: int | None) -> dict[str, Any]:
    if pid is None:
        return {"ssh_pid": None, "ssh_cpu": None, "ssh_rss": None}
    import psutil

    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            cpu = proc.cpu_times()
            return {"ssh_pid": pid, "ssh_cpu": cpu.user + cpu.system,
                    "ssh_rss": proc.memory_info().rss}
    except psutil.Error:
        return {"ssh_pid": pid, "ssh_cpu": None, "ssh_rss": None}
