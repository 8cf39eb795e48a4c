"""Per-profile supervision: listeners and rules live while a tunnel is wanted;
ssh sessions come and go underneath with backoff.

States: down -> connecting -> up -> reconnecting -> up ... ; failed when an
error cannot heal by retrying (bad local user, firewall refused the rules, an
untrusted host key, keys the server refuses: tunnel.ssh.refusal). While
reconnecting the rules stay in place and the proxy resets new connections, so
traffic to the subnets fails closed instead of leaking.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import difflib
import enum
import functools
import ipaddress
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from shuttled import const
from shuttled.const import Forward
from shuttled.control.schema import (
    ConnectionRow,
    DnsCounters,
    DnsStats,
    DnsStatus,
    LinkStats,
    ProcessStats,
    StreamStats,
    TunnelStats,
)
from shuttled.dns.forwarder import DnsForwarder, DnsPeers
from shuttled.dns.resolvconf import parse_resolv_conf
from shuttled.dns.resolver import DnsCapture, DnsPlan, ProfileResolver
from shuttled.errors import (
    FirewallError,
    ShuttledError,
    SshFailure,
    SshRefusedError,
    UsageError,
)
from shuttled.firewall import policy
from shuttled.firewall.base import Backend, Capture
from shuttled.firewall.tproxy import router_rules
from shuttled.net import IPAddress, IPNetwork, Subnet, is_address
from shuttled.router import RouterSettings, RouterSide
from shuttled.tunnel.channels import ChannelMux
from shuttled.tunnel.faults import Faults
from shuttled.tunnel.proxy import ConnLimits, TransparentProxy
from shuttled.tunnel.remote_info import Learnt, read_remote_file, remote_hosts, remote_routes
from shuttled.tunnel.session import SshSession
from shuttled.tunnel.ssh import SshTarget, resolve_host, server_host
from shuttled.tunnel.transparent import connection_row, endpoint_text

log = logging.getLogger(__name__)
T = TypeVar("T")

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
    connect: const.ConnectMode = const.ConnectMode.REMOTE
    dns: bool = False
    dns_mode: str = "all"  # with dns: all, or split (names under dns_domains)
    dns_domains: tuple[str, ...] = ()
    dns_capture: tuple[str, ...] = ()  # resolvers whose port 53 we catch; () = resolv.conf
    dns_upstream: tuple[str, ...] = ()  # remote nameservers; () = the remote's resolv.conf
    listen: tuple[str, ...] = ("127.0.0.1", "::1")
    port: int = 0
    uid: int | None = None
    pythons: tuple[str, ...] = const.REMOTE_PYTHONS
    keepalive: float = const.KEEPALIVE_INTERVAL
    auto_exclude: bool = True
    reconnect: bool = True
    auto_nets: bool = False  # the remote's routes are subnets too, learnt at each connect
    remote_hosts: bool = False  # the remote's /etc/hosts names answered by our resolver
    streams: int = 1  # ssh connections; new app connections go to the least busy
    router: RouterSettings = field(default_factory=RouterSettings)  # LAN, UDP, kill switch
    limits: ConnLimits = field(default_factory=ConnLimits)  # captured: in all, per user
    # What a person does about each failure no retry heals, e.g. the trust command.
    remedies: tuple[tuple[SshFailure, str], ...] = ()

    def refused(self, exc: SshRefusedError) -> str:
        """The one line `up` and `status` show: what failed, then how to fix it."""
        remedy = dict(self.remedies).get(exc.failure)
        return f"{exc}: {remedy}" if remedy else str(exc)

    def dns_plan(self) -> DnsPlan | None:
        """How this tunnel does DNS; None when it does none."""
        if not (self.dns or self.remote_hosts):
            return None
        mode = self.dns_mode if self.dns else "split"  # remote_hosts alone: split, no domains
        return DnsPlan(
            mode,
            self.dns_domains if mode == "split" else (),
            self.dns_capture,
            self.dns_upstream,
            self.listen,
        )


class CaptureSet:
    """All captures of one table; every change is one transaction of the whole set,
    and our record changes only once the kernel accepted it.

    It also remembers our rules as the kernel listed them right after our own last
    change: anything else that differs later is someone else's doing (`nft flush
    ruleset`, a firewall manager's reload), and heal() puts ours back."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.captures: dict[str, Capture] = {}
        # Profiles whose DNS capture shares this table shadow each other: their
        # forwarders hand each other's names over (dns.forwarder.DnsPeers).
        self.dns_peers = DnsPeers()
        self.seen = ""  # the kernel's view of our rules after our last change
        self.restored = 0  # times someone else's change was undone
        self.last_loss: str | None = None
        self.on_change: Callable[[], None] | None = None  # after each accepted change

    def put(self, capture: Capture) -> None:
        self._commit({**self.captures, capture.name: capture})

    def drop(self, name: str) -> None:
        if name not in self.captures:
            return
        self._commit({k: v for k, v in self.captures.items() if k != name})

    def replace(self, wanted: dict[str, Capture]) -> None:
        """Exactly these captures, in one transaction."""
        self._commit(dict(wanted))

    def _commit(self, wanted: dict[str, Capture]) -> None:
        self.backend.apply(list(wanted.values()))
        self.captures = wanted
        self.seen = self.kernel_view()
        if self.on_change is not None:
            self.on_change()

    def install(self) -> None:
        """Our (maybe empty) table as it should be now: at start, and to heal."""
        self._commit(self.captures)

    def kernel_view(self) -> str:
        view = self.backend.snapshot()
        if router_rules(list(self.captures.values())).needs_policy:
            view += policy.describe()
        return view

    def heal(self) -> str | None:
        """Put back what someone else removed or changed, in one transaction; what
        was lost (None when all is in place). Raises FirewallError."""
        now = self.kernel_view()
        if now == self.seen:
            return None
        lost = describe_loss(self.backend, self.seen, now)
        log.debug(
            "our rules, then and now:\n%s",
            "\n".join(
                difflib.unified_diff(
                    self.seen.splitlines(), now.splitlines(), "ours", "kernel", lineterm=""
                )
            ),
        )
        self.install()
        self.restored += 1
        self.last_loss = lost
        return lost


# Programs that replace firewall rules wholesale when they start or reload.
_RULE_REPLACERS = (
    "firewalld",
    "dockerd",
    "ufw",
    "netfilter-persistent",
    "iptables-restore",
    "nft",
    "kube-proxy",
    "podman",
    "shorewall",
)


def describe_loss(backend: Backend, seen: str, now: str) -> str:
    """One line: what of ours is gone, and who probably did it."""
    if not now.strip():
        what = f"the {backend.name} rules of {backend.table} were deleted"
    else:
        what = f"the {backend.name} rules of {backend.table} were changed"
    suspects = _running(_RULE_REPLACERS)
    who = (
        f" (running here: {', '.join(suspects)})"
        if suspects
        else " (by hand, e.g. `nft flush ruleset` or `iptables -t nat -F`, or a firewall "
        "manager's reload)"
    )
    return what + who


def _running(names: Iterable[str]) -> list[str]:
    import psutil

    wanted = set(names)
    found: set[str] = set()
    for proc in psutil.process_iter(["name"]):
        name = proc.info.get("name") or ""
        if name in wanted and proc.pid != os.getpid():
            found.add(name)
    return sorted(found)


async def ssh_excludes(
    target: SshTarget, pin: dict[str, tuple[IPAddress, ...]] | None = None
) -> tuple[Subnet, ...]:
    """The ssh server's own address and port, so reconnects are never captured.

    A server given by name is remembered in `pin` (name -> addresses): where our
    DNS capture would send that name through the tunnel, a reconnect must still
    resolve it, and the profile's resolver answers it from there.
    """
    host, port, warning = await server_host(target)
    if warning:
        log.warning("%s", warning)
    addresses = await resolve_host(host) if host else []
    if pin is not None and host and addresses and not is_address(host):
        pin[host.lower().rstrip(".")] = tuple(ipaddress.ip_address(a) for a in addresses)
    return tuple(Subnet(ipaddress.ip_network(a), (port, port), exclude=True) for a in addresses)


async def remote_nameservers(session: SshSession) -> list[str]:
    """The nameservers of the remote's /etc/resolv.conf; ShuttledError if none."""
    return nameservers_or_error(await read_remote_file(session.run, "/etc/resolv.conf"))


def nameservers_or_error(read: tuple[bytes | None, str, str]) -> list[str]:
    data, _, why = read
    servers = parse_resolv_conf(data.decode(errors="replace")) if data is not None else []
    if not servers:
        raise ShuttledError(
            f"dns: the remote has {why or 'no nameserver in /etc/resolv.conf'}: "
            "no nameservers learned (set the profile's dns nameservers, or --to-ns)"
        )
    return servers


StateListener = Callable[[str, State, str | None], None]


class Tunnel:
    """One profile's runtime: `up()` starts supervising, `down()` ends it."""

    def __init__(
        self, spec: TunnelSpec, captures: CaptureSet, on_state: StateListener | None = None
    ) -> None:
        self.spec = spec
        self.captures = captures
        self.state = State.DOWN
        self.since = time.time()
        self.last_error: str | None = None
        self.session: SshSession | None = None
        # One connection's fault ends that connection; counted here for every part.
        self.faults = Faults()
        self.proxy = self._new_proxy()
        self.router = RouterSide(spec.name, spec.router, self._udp_mux, self.faults)
        self._excludes: tuple[Subnet, ...] | None = None  # known once ssh -G answered
        self.resolver: ProfileResolver | None = None
        self.auto_nets: tuple[Subnet, ...] = ()  # learnt from the remote at the last connect
        self.unlearnt: tuple[str, ...] = ()  # what the remote could not tell (remote_info)
        self.server_pin: dict[str, tuple[IPAddress, ...]] = {}  # see ssh_excludes
        self.reconnects = 0
        self.recycled = 0  # worn sessions replaced (see SshSession.worn)
        self._draining: set[asyncio.Task[None]] = set()
        self.up_since: float | None = None
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_state = on_state
        self._holding_own = False  # our own capture is the one held (not a predecessor's)

    def _mux(self) -> Any:
        return self.session.current_mux() if self.session is not None else None

    def _new_proxy(self) -> TransparentProxy:
        # LAN connections arrive by TPROXY: the listener needs IP_TRANSPARENT.
        return TransparentProxy(
            self._mux,
            self.faults,
            addresses=self.spec.listen,
            transparent=self.spec.router.lan is not None,
            limits=self.spec.limits,
            connect=self.spec.connect,
        )

    async def _udp_mux(self) -> ChannelMux:
        if self.session is None:
            raise ConnectionError("tunnel is not up")
        return await self.session.udp_mux()

    @property
    def holding(self) -> bool:
        """The kill switch is rejecting this profile's traffic right now."""
        capture = self.captures.captures.get(self.spec.name)
        return capture is not None and capture.hold

    def hold(self, excludes: tuple[Subnet, ...]) -> None:
        """Engage the kill switch as a connect attempt does once ssh -G has answered:
        `excludes` (the ssh server's own addresses) stay out of the held capture, and
        later holds (between reconnects) keep them out. Raises FirewallError."""
        self._excludes = excludes
        self._hold()

    def _hold(self) -> None:
        """Kill switch: while not up, traffic to the subnets is rejected (TCP reset,
        ICMP unreachable), never routed around the tunnel. Raises FirewallError."""
        if not self.spec.router.kill_switch or self._excludes is None:
            return
        current = self.captures.captures.get(self.spec.name)
        # A predecessor's held capture (a reload changed the profile) is replaced
        # by ours in one transaction: the subnets are never let out in between.
        base = (
            current
            if current is not None and self._holding_own
            else self.router.fields(self._held_capture(self._excludes))
        )
        held = dataclasses.replace(base, hold=True)
        if held != current:
            self.captures.put(held)
        self._holding_own = True

    def _held_capture(self, excludes: tuple[Subnet, ...]) -> Capture:
        """The capture to hold when none is in place: with the DNS the profile will
        catch, refused until our listener exists (never let out in the clear)."""
        plan = self.spec.dns_plan()
        dns = plan.held() if plan is not None else DnsCapture()
        return Capture(
            name=self.spec.name,
            subnets=self.spec.subnets + self.auto_nets + excludes,
            tcp_port=self.proxy.port,
            dns_servers=dns.servers,
            dns_all=dns.every_server,
            uid=self.spec.uid,
            hold=True,
        )

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
            # Now, not when the task first runs: an `up` waiting right after this must
            # not read a previous attempt's `failed` as this attempt's result.
            self._set(State.CONNECTING)
            self._task = asyncio.create_task(self._supervise(), name=f"tunnel {self.spec.name}")

    async def wait_settled(self) -> State:
        """Until the tunnel is up, or has failed, or has stopped."""
        while self.state in (State.CONNECTING, State.RECONNECTING) or (
            self.state is State.DOWN and self.running
        ):
            await self.changed.wait()
        return self.state

    async def wait_not(self, state: State) -> State:
        while self.state is state:
            await self.changed.wait()
        return self.state

    async def down(self, keep_hold: bool = False) -> None:
        """Stop; with `keep_hold` a kill switch stays engaged for a successor (reload)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._teardown(keep_hold and self.spec.router.kill_switch)
        self._set(State.DOWN)

    async def _supervise(self) -> None:
        backoff = BACKOFF_MIN
        try:
            if self.proxy.gate.wanted:
                self.proxy.gate.why = _syn_queue_unsupported(type(self.captures.backend))
            await self.proxy.start(self.spec.port)
            await self.router.start()
        except OSError as exc:
            self._set(State.FAILED, f"cannot listen: {exc.strerror}")
            return
        log.info("listening on %s", ", ".join(self.proxy.listening))
        while True:
            started = time.monotonic()
            error, permanent = await self._one_session()
            if permanent or not self.spec.reconnect:
                self._set(State.FAILED, error)
                return
            if time.monotonic() - started > STABLE_AFTER:
                backoff = BACKOFF_MIN
            self.reconnects += 1
            self.router.session_lost()
            try:
                self._hold()
            except FirewallError as exc:
                self._set(State.FAILED, f"kill switch: {exc}")
                return
            self._set(State.RECONNECTING, error)
            delay = backoff * random.uniform(0.8, 1.2)
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _one_session(self) -> tuple[str | None, bool]:
        """Run one ssh session to its end: (why it ended, whether retrying is futile)."""
        session = self._new_session()
        self.session = session
        try:
            excludes = (
                await ssh_excludes(self.spec.target, self.server_pin)
                if self.spec.auto_exclude
                else ()
            )
            self.hold(excludes)  # from the very first connect: CONNECTING holds too
            await session.start()
            await self._capture(excludes)
        except (FirewallError, UsageError) as exc:
            await session.stop()
            return str(exc), True
        except SshRefusedError as exc:  # a host key, a refused key: retrying cannot help
            await session.stop()
            return self.spec.refused(exc), True
        except ShuttledError as exc:
            await session.stop()
            return str(exc), False
        self._set(State.UP)
        try:
            while (reason := await _ended_or_worn(session)) is None:
                session = await self._recycle(session)
        finally:
            await session.stop()
        return reason, False

    async def _recycle(self, worn: SshSession) -> SshSession:
        """Make before break: a fresh session takes the new connections; the worn one
        carries its own to their end (at most RECYCLE_DRAIN_MAX), then stops."""
        fresh = self._new_session()
        try:
            await fresh.start()
        except ShuttledError as exc:
            await fresh.stop()
            log.warning(
                "could not replace a worn ssh connection (%s): trying again in %g s",
                exc,
                const.RECYCLE_RETRY,
            )
            await asyncio.wait([worn.closed], timeout=const.RECYCLE_RETRY)
            worn.worn.clear()
            return worn
        self.session = fresh
        self.recycled += 1
        log.info(
            "the ssh master kept %d failed opens: new connections use a fresh ssh "
            "connection; the old one ends with its last connection",
            const.MASTER_FAILED_OPENS_MAX,
        )
        task = asyncio.create_task(self._drain(worn))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)
        return fresh

    async def _drain(self, old: SshSession) -> None:
        deadline = time.monotonic() + const.RECYCLE_DRAIN_MAX
        try:
            muxes = old.muxes()
            while (
                time.monotonic() < deadline
                and not old.closed.done()
                and any(
                    c.channel is not None and c.channel.mux in muxes for c in self.proxy.connections
                )
            ):
                await asyncio.sleep(1.0)
        finally:
            await old.stop()

    def _new_session(self) -> SshSession:
        return SshSession(
            self.spec.target,
            self.spec.name,
            forward=self.spec.forward,
            pythons=self.spec.pythons,
            keepalive=self.spec.keepalive,
            streams=self.spec.streams,
            fault_log=self.faults,
        )

    async def _capture(self, excludes: tuple[Subnet, ...]) -> None:
        self.unlearnt = ()
        self.auto_nets = await self._learn_routes(excludes) if self.spec.auto_nets else ()
        plan = self.spec.dns_plan()
        dns = await self._start_dns(plan) if plan is not None else DnsCapture()
        capture = Capture(
            name=self.spec.name,
            subnets=self.spec.subnets + self.auto_nets + excludes,
            tcp_port=self.proxy.port,
            dns_port=dns.port,
            dns_servers=dns.servers,
            dns_all=dns.every_server,
            bypass_mark=dns.bypass_mark,
            uid=self.spec.uid,
            syn_queue=self.proxy.syn_queue,
        )
        capture = await self.router.decorate(capture, self.forwarder)
        if self.captures.captures.get(self.spec.name) != capture:
            self.captures.put(capture)

    async def _learn_routes(self, excludes: tuple[Subnet, ...]) -> tuple[Subnet, ...]:
        assert self.session is not None
        routes = remote_routes(self.session.run)
        learnt = self._note(await _from_remote("routes", routes, [])).value
        others = [
            s
            for name, c in self.captures.captures.items()
            if name != self.spec.name
            for s in c.subnets
            if not s.exclude
        ]
        kept = auto_subnets(
            learnt, self.spec.subnets, [e.network for e in excludes], others, local_addresses()
        )
        log.info("auto_nets: the remote routes %s", ", ".join(map(str, kept)) or "nothing usable")
        return kept

    async def _start_dns(self, plan: DnsPlan) -> DnsCapture:
        # One resolver for the tunnel's life: it opens its channels through
        # whichever session is current; a reconnect only refreshes its names.
        session = self.session
        assert session is not None
        if self.resolver is None:
            self.resolver = ProfileResolver(
                self.spec.name,
                self.captures.backend.table,
                plan,
                self._open_stream,
                self.captures.dns_peers,
                self.faults,
                datagrams=self._udp_mux,
            )
        hosts = (
            self._note(await _from_remote("/etc/hosts", remote_hosts(session.run), {})).value
            if self.spec.remote_hosts
            else None
        )
        networks = [s.network for s in (*self.spec.subnets, *self.auto_nets) if not s.exclude]
        try:
            await self.resolver.refresh(networks, hosts, self.server_pin)
            return await self.resolver.start(lambda: remote_nameservers(session))
        except OSError as exc:  # our listener could not bind
            raise ShuttledError(f"DNS listener: {exc.strerror or exc}") from None

    def _note(self, learnt: Learnt[T]) -> Learnt[T]:
        self.unlearnt += learnt.missing
        return learnt

    @property
    def health(self) -> list[str]:
        """Problems worth a line after the status table: router mode's, what the remote
        did not tell, and why DNS answers nothing."""
        dns = self.resolver.problem() if self.resolver is not None else None
        return [*self.router.health, *self.unlearnt, *([dns] if dns else [])]

    @property
    def forwarder(self) -> DnsForwarder | None:
        return self.resolver.forwarder if self.resolver is not None else None

    async def _open_stream(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.session is None:
            raise ConnectionError("tunnel is not up")
        return await self.session.open_stream(host, port)

    async def _teardown(self, keep_hold: bool = False) -> None:
        with contextlib.suppress(ShuttledError):
            current = self.captures.captures.get(self.spec.name)
            if keep_hold and current is not None:
                if not current.hold:
                    self.captures.put(dataclasses.replace(current, hold=True))
            else:
                self.captures.drop(self.spec.name)
        self._holding_own = False
        draining = list(self._draining)
        for task in draining:
            task.cancel()  # each stops its old session on the way out
        await asyncio.gather(*draining, return_exceptions=True)
        self.proxy.close()
        self.proxy = self._new_proxy()
        self.router.close()
        if self.resolver is not None:
            await self.resolver.close()
            self.resolver = None
        self.auto_nets = ()
        self.unlearnt = ()
        if self.session is not None:
            await self.session.stop()
            self.session = None

    # --- reporting ----------------------------------------------------------------

    def stats(self) -> TunnelStats:
        counters = self.proxy.counters
        live_up = sum(c.channel.bytes_up for c in self.proxy.connections if c.channel)
        live_down = sum(c.channel.bytes_down for c in self.proxy.connections if c.channel)
        session = self.session
        return {
            "tx": counters.bytes_up + live_up,
            "rx": counters.bytes_down + live_down,
            "active": len(self.proxy.connections) - self.proxy.gate.stats()["pending"],
            "total": counters.accepted,
            "failed": counters.failed,
            "reconnects": self.reconnects,
            "recycled": self.recycled,
            **self.proxy.limit_stats(),
            "aborted": self.faults.snapshot(),
            "uptime": time.time() - self.up_since if self.up_since else 0.0,
            "rtt": session.rtt if session else None,
            "mode": str(session.mode) if session and session.mode else None,
            "connect": self.proxy.gate.stats(),
            **(session.stream_stats() if session else StreamStats(streams=0)),
            **(session.link_stats() if session else LinkStats()),
            **_process_stats(session.master_pids() if session else []),
            **({"dns": self._dns_stats()} if self.forwarder else {}),
            **self.router.stats(),
        }

    def _dns_stats(self) -> DnsStats:
        assert self.resolver is not None and self.resolver.forwarder is not None
        # DnsCounters is DnsStats field for field (a unit test pins it).
        counters = cast(DnsCounters, vars(self.resolver.forwarder.stats))
        return {
            "mode": self.resolver.plan.mode,
            "path": self.resolver.path,
            **counters,
            "nameservers": self.resolver.forwarder.nameservers(),
        }

    def dns_status(self) -> DnsStatus | None:
        return self.resolver.status() if self.resolver is not None else None

    def connections(self) -> list[ConnectionRow]:
        now = asyncio.get_running_loop().time()
        tcp = [
            connection_row(
                "tcp", c.src, endpoint_text(c.dst), c.channel, now - c.started, c.opening
            )
            for c in self.proxy.connections
        ]
        return tcp + self.router.flows()


@functools.cache
def _syn_queue_unsupported(backend: type[Backend]) -> str | None:
    """Why this firewall cannot hold SYNs here (asked once: it runs the tool)."""
    return backend.syn_queue_unsupported()


async def _ended_or_worn(session: SshSession) -> str | None:
    """Why the session ended, or None once it is worn and should be replaced."""
    # shield: a down() cancelling us must not cancel the session's own future
    worn = asyncio.create_task(session.worn.wait())
    waiters: list[asyncio.Future[Any]] = [asyncio.shield(session.closed), worn]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        worn.cancel()
    return session.closed.result() if session.closed.done() else None


async def _from_remote(what: str, coro: Awaitable[Learnt[T]], empty: T) -> Learnt[T]:
    """What remote commands gave, or nothing with the reason: a remote that will not
    run commands (a restricted shell) still gets its tunnel, without what it would tell."""
    try:
        return await coro
    except (ShuttledError, TimeoutError) as exc:
        missing = f"cannot read the remote's {what}: {exc or 'no answer in time'}"
        log.warning("%s", missing)
        return Learnt(empty, (), (missing,))


def local_addresses() -> list[IPAddress]:
    """This machine's own addresses, on every interface."""
    import psutil

    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            with contextlib.suppress(ValueError):
                found.append(ipaddress.ip_address(address.address.split("%")[0]))
    return found


def auto_subnets(
    learnt: Iterable[IPNetwork],
    profile: Iterable[Subnet],
    server: Iterable[IPNetwork],
    others: Iterable[Subnet],
    local: Iterable[IPAddress] = (),
) -> tuple[Subnet, ...]:
    """The remote's routes as include subnets, less what must not be captured.

    Left out: a route holding the ssh server's own address (the way to the
    server is not the remote's network), a route holding one of this machine's
    own addresses (the remote's 192.168.1.0/24 is not worth the LAN we sit in),
    a route inside one of the profile's excludes of every port (`exclude`
    applies to auto_nets too), and a route overlapping another active
    profile's subnets (that profile was there first).
    """
    excludes = [s.network for s in profile if s.exclude and s.ports is None]
    here = [ipaddress.ip_network(a) for a in local if not (a.is_loopback or a.is_link_local)]
    server, others = [*server, *here], list(others)
    kept = []
    for net in learnt:
        if any(
            x.version == net.version and net.subnet_of(x)  # type: ignore[arg-type]
            for x in excludes
        ) or any(
            x.version == net.version and x.subnet_of(net)  # type: ignore[arg-type]
            for x in server
        ):
            continue
        if clash := next(
            (o for o in others if o.network.version == net.version and o.network.overlaps(net)),
            None,
        ):  # type: ignore[arg-type]
            log.warning(
                "auto_nets: %s left out, it overlaps %s of another profile", net, clash.network
            )
            continue
        kept.append(Subnet(net))
    return tuple(kept)


def _process_stats(pids: list[int]) -> ProcessStats:
    """The ssh masters' CPU seconds and RSS, summed; ssh_pid is the first's."""
    if not pids:
        return {"ssh_pid": None, "ssh_cpu": None, "ssh_rss": None}
    import psutil

    cpu = rss = 0.0
    try:
        for pid in pids:
            proc = psutil.Process(pid)
            with proc.oneshot():
                times = proc.cpu_times()
                cpu += times.user + times.system
                rss += proc.memory_info().rss
    except psutil.Error:
        return {"ssh_pid": pids[0], "ssh_cpu": None, "ssh_rss": None}
    return {"ssh_pid": pids[0], "ssh_cpu": cpu, "ssh_rss": int(rss)}
