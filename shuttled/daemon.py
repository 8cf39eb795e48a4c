"""The root daemon: wires config, firewall, tunnels, control servers and systemd.

It never forks itself (systemd or launchd supervise it). READY=1 is sent only
once the control socket, the bus name and our firewall table exist.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shuttled import __version__, const
from shuttled.config import Config, Profile, check_overlaps, load_config
from shuttled.control.protocol import PROTOCOL_VERSION
from shuttled.control.schema import (
    INVALID,
    ConnectionRow,
    ConnectStats,
    DoctorReport,
    Event,
    ProfileRow,
    ProfileStats,
    ProfileStatus,
    ReloadResult,
    RulesStats,
    SubnetRow,
    TunnelStats,
    VersionInfo,
)
from shuttled.control.tables import connect_mode
from shuttled.dns.resolved import cleanup_links
from shuttled.durable import write_durably
from shuttled.errors import (
    ConfigError,
    NoSuchProfileError,
    ShuttledError,
    TimeoutError_,
)
from shuttled.firewall import cleanup_all, detect
from shuttled.firewall.base import Capture
from shuttled.firewall.lockdown import LockdownFile, lockdown_backend, locked
from shuttled.instance import InstanceLock
from shuttled.journal import JournalHandler, notify
from shuttled.router import settings_from_profile as router_settings
from shuttled.supervisor import CaptureSet, State, Tunnel, TunnelSpec, current_profile
from shuttled.tunnel.accept import quiet_accept_failures, raise_nofile
from shuttled.tunnel.proxy import ConnLimits
from shuttled.tunnel.ssh import cleanup_control_dirs

log = logging.getLogger(__name__)


def spec_for(profile: Profile) -> TunnelSpec:
    """A profile as the supervisor's TunnelSpec: the one place the two meet."""
    return TunnelSpec(
        name=profile.name,
        target=profile.ssh_target(),
        subnets=profile.networks(),
        forward=profile.forward,
        connect=profile.connect,
        dns=profile.dns.enabled,
        dns_mode=profile.dns.mode if profile.dns.enabled else "all",
        dns_domains=profile.dns.domains,
        dns_upstream=tuple(profile.dns.nameservers),
        auto_nets=profile.auto_nets,
        remote_hosts=profile.remote_hosts,
        pythons=(profile.python,) if profile.python else const.REMOTE_PYTHONS,
        keepalive=profile.keepalive,
        reconnect=True,
        streams=profile.streams,
        router=router_settings(profile),
        limits=ConnLimits(profile.max_connections, profile.max_connections_per_user),
        remedies=profile.remedies(),
    )


class StateFile:
    """Which profiles an admin wants up, so a restart or reboot brings them back."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> set[str]:
        try:
            data = json.loads(self.path.read_text())
            return {str(x) for x in data.get("wanted", [])}
        except (OSError, ValueError, AttributeError):
            return set()

    def save(self, wanted: set[str]) -> None:
        write_durably(self.path, json.dumps({"wanted": sorted(wanted)}))


class Daemon:
    """The Core behind every control transport (see shuttled.control.api)."""

    def __init__(self, config_dir: Path, state_dir: Path, method: str | None) -> None:
        self.config_dir = config_dir
        self.config = Config()
        self.method = method
        self.state = StateFile(state_dir / "state.json")
        self.captures: CaptureSet | None = None
        self.lockdown: CaptureSet | None = None  # see shuttled.firewall.lockdown
        self.lockdown_file = LockdownFile(state_dir)
        self._last_guard = 0.0
        self.tunnels: dict[str, Tunnel] = {}
        self.wanted: set[str] = set()
        self.started = time.time()
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._lock = asyncio.Lock()
        # Transports that mirror the profile list (D-Bus objects) re-sync here.
        self.on_reload: list[Callable[[], None]] = []

    async def start(self) -> None:
        removed = cleanup_all() + cleanup_links() + cleanup_control_dirs()
        if removed:
            log.info("removed stale rules: %s", ", ".join(removed))
        self.config = load_config(self.config_dir, partial=True)
        self._log_invalid()
        backend = detect(self.method, persistent=True)
        self.captures = CaptureSet(backend)
        self.captures.install()  # our (empty) table exists before READY=1
        self._start_lockdown(backend.name)
        autostart = {n for n, p in self.config.profiles.items() if p.autostart}
        # An invalid profile stays wanted (and locked down): fixed, a reload starts it.
        known = set(self.config.profiles) | set(self.config.invalid)
        self.wanted = (self.state.load() & known) | autostart
        for name in sorted(self.wanted - set(self.config.invalid)):
            try:
                self._check_overlap(name)
                self.tunnel_for(name).up()
            except ShuttledError as exc:
                log.error("not starting %s: %s", name, exc, extra={"PROFILE": name})

    def _log_invalid(self) -> None:
        """A broken file disables only its own profiles: say which, and why."""
        for error in self.config.errors:
            log.error("config: %s", error)
        for name, bad in sorted(self.config.invalid.items()):
            log.error("%s is invalid, not loaded: %s", name, bad.error(), extra={"PROFILE": name})

    # --- the kill switch's lockdown ---------------------------------------------------

    def _start_lockdown(self, method: str) -> None:
        """Keep what the boot unit (or the last daemon) locked down, until each profile's
        own capture takes its place; then follow every change of ours."""
        try:
            _, saved = self.lockdown_file.load()
        except ShuttledError as exc:
            log.error("%s: starting without it", exc)
            saved = {}
        assert self.captures is not None
        self.lockdown = CaptureSet(lockdown_backend(method))
        self.lockdown.captures = saved
        self.captures.on_change = self._sync_lockdown
        self._sync_lockdown()

    def _locked_down(self) -> dict[str, Capture]:
        """Every wanted kill-switched profile: its capture as it is now, else as it was."""
        assert self.captures is not None and self.lockdown is not None
        out: dict[str, Capture] = {}
        for name in sorted(self.wanted):
            profile = self.config.profiles.get(name)
            if profile is None and name in self.config.invalid:
                pass  # its kill switch is unknown: what was locked down stays
            elif profile is None or not profile.kill_switch:
                continue
            live = self.captures.captures.get(name)
            chosen = locked(live) if live is not None else self.lockdown.captures.get(name)
            if chosen is not None:
                out[name] = chosen
        return out

    def _sync_lockdown(self) -> None:
        if self.lockdown is None:
            return
        wanted = self._locked_down()
        if wanted == self.lockdown.captures and self.lockdown.seen:
            return
        try:
            self.lockdown.replace(wanted)
            self.lockdown_file.save(self.lockdown.backend.name, wanted)
        except (ShuttledError, OSError) as exc:
            log.error("kill switch lockdown not updated: %s", exc)

    # --- Core: reading ---------------------------------------------------------------

    def _profile(self, name: str) -> Profile:
        profile = self.config.profiles.get(name)
        if name in self.config.invalid:
            raise ConfigError(f"{name} is invalid: {self.config.invalid[name].error()}")
        if profile is None:
            raise NoSuchProfileError(f"no profile named {name!r}")
        return profile

    def _names(self) -> list[str]:
        return sorted({*self.config.profiles, *self.config.invalid})

    def tunnel_for(self, name: str) -> Tunnel:
        """The profile's Tunnel, made (down) on first use."""
        tunnel = self.tunnels.get(name)
        if tunnel is None:
            assert self.captures is not None
            tunnel = Tunnel(spec_for(self._profile(name)), self.captures, self.on_state)
            self.tunnels[name] = tunnel
        return tunnel

    def list_profiles(self) -> list[ProfileRow]:
        rows: list[ProfileRow] = []
        for name in self._names():
            profile = self.config.profiles.get(name)
            rows.append(
                {
                    "name": name,
                    "state": self._state(name),
                    "remote": profile.remote if profile else self.config.invalid[name].remote,
                    "autostart": profile.autostart if profile else False,
                    "wanted": name in self.wanted,
                }
            )
        return rows

    def _state(self, name: str) -> str:
        if name in self.config.invalid:
            return INVALID
        tunnel = self.tunnels.get(name)
        return str(tunnel.state) if tunnel else str(State.DOWN)

    def guard_rules(self, *, report: bool = False) -> None:
        """Put back what someone else took from our rules. Before a report too, so that
        `up` is never said while the rules behind it are missing; but a report runs
        the check at most once a second, or any user's `status` loop would run nft
        without end (the background check runs every second anyway)."""
        now = time.monotonic()
        if report and now - self._last_guard < const.RULE_CHECK_INTERVAL:
            return
        self._last_guard = now
        for captures in (self.captures, self.lockdown):
            if captures is None:
                continue
            try:
                lost = captures.heal()
            except ShuttledError as exc:
                log.error("cannot restore the firewall rules: %s", exc)
                continue
            if lost is not None:
                log.warning("%s: restored", lost)
                self._emit(
                    {
                        "type": "rules",
                        "lost": lost,
                        "restored": captures.restored,
                        "time": time.time(),
                    }
                )

    async def guard_forever(self) -> None:
        while True:
            await asyncio.sleep(const.RULE_CHECK_INTERVAL)
            self.guard_rules()

    def status(self, name: str | None) -> ProfileStatus | list[ProfileStatus]:
        self.guard_rules(report=True)
        if name is None:
            return [self._status_one(n) for n in self._names()]
        return self._status_one(name)

    def _status_one(self, name: str) -> ProfileStatus:
        if name in self.config.invalid:
            return self._invalid_status(name)
        profile = self._profile(name)
        tunnel = self.tunnels.get(name)
        stats = tunnel.stats() if tunnel else TunnelStats()
        return {
            "name": name,
            "state": self._state(name),
            "remote": profile.remote,
            "wanted": name in self.wanted,
            "mode": stats.get("mode"),
            "connect": _connect_mode(stats.get("connect")),
            "since": tunnel.since if tunnel else None,
            "uptime": stats.get("uptime", 0.0),
            "rx": stats.get("rx", 0),
            "tx": stats.get("tx", 0),
            "connections": stats.get("active", 0),
            "rtt": stats.get("rtt"),
            "last_error": tunnel.last_error if tunnel else None,
            "subnets": [
                *(SubnetRow(subnet=t, source="profile") for t in profile.subnets),
                *(
                    SubnetRow(subnet=str(s.network), source="auto_nets")
                    for s in (tunnel.auto_nets if tunnel else ())
                ),
                *(SubnetRow(subnet=f"!{t}", source="profile") for t in profile.exclude),
            ],
            "dns": tunnel.dns_status() if tunnel else None,
            "holding": tunnel.holding if tunnel else False,
            "health": tunnel.health if tunnel else [],
        }

    def _invalid_status(self, name: str) -> ProfileStatus:
        """A profile of a broken file: its error where a tunnel's last error goes."""
        return {
            "name": name,
            "state": INVALID,
            "remote": self.config.invalid[name].remote,
            "wanted": name in self.wanted,
            "mode": None,
            "connect": None,
            "since": self.started,
            "uptime": 0.0,
            "rx": 0,
            "tx": 0,
            "connections": 0,
            "rtt": None,
            "last_error": self.config.invalid[name].error(),
            "subnets": [],
            "dns": None,
            "holding": self.lockdown is not None and name in self.lockdown.captures,
            "health": [],
        }

    def stats(self, name: str) -> ProfileStats:
        self._profile(name)
        self.guard_rules(report=True)
        tunnel = self.tunnels.get(name)
        rules = (
            RulesStats(
                rules_restored=self.captures.restored, rules_last_loss=self.captures.last_loss
            )
            if self.captures
            else RulesStats()
        )
        return {
            "name": name,
            "state": self._state(name),
            **(tunnel.stats() if tunnel else TunnelStats()),
            **rules,
        }

    def connections(self, name: str) -> list[ConnectionRow]:
        self._profile(name)
        tunnel = self.tunnels.get(name)
        return tunnel.connections() if tunnel else []

    def version(self) -> VersionInfo:
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "firewall": self.captures.backend.name if self.captures else None,
            "uptime": time.time() - self.started,
        }

    async def doctor(self, name: str) -> DoctorReport:
        """The profile's remote checked with a connection of its own (shuttled.doctor)."""
        from shuttled.doctor import diagnose

        return await diagnose(spec_for(self._profile(name)))

    # --- Core: changing ---------------------------------------------------------------

    def _check_overlap(self, name: str) -> None:
        active = [
            self.config.profiles[n] for n in self.wanted | {name} if n in self.config.profiles
        ]
        check_overlaps(active)

    async def up(self, name: str, wait: bool = True, timeout: float = 30.0) -> ProfileStatus:
        async with self._lock:
            self._profile(name)
            self._check_overlap(name)
            tunnel = self.tunnel_for(name)
            if not tunnel.running:
                tunnel.up()
            self.wanted.add(name)
            self.state.save(self.wanted)
        if wait:
            try:
                async with asyncio.timeout(timeout):
                    state = await tunnel.wait_settled()
            except TimeoutError:
                raise TimeoutError_(
                    f"{name} is not up after {timeout:g} s ({_state_text(tunnel)})"
                ) from None
            if state is not State.UP:
                raise ShuttledError(f"{name} is {_state_text(tunnel)}")
        return self._status_one(name)

    async def down(self, name: str) -> ProfileStatus:
        async with self._lock:
            if name not in self.config.invalid:  # down of an invalid one: no longer wanted
                self._profile(name)
            self.wanted.discard(name)
            self.state.save(self.wanted)
            tunnel = self.tunnels.pop(name, None)
            # Inside the lock: an `up` right after must not meet this one's teardown
            # (it would drop the successor's capture, which has the same name).
            if tunnel is not None:
                await tunnel.down()
        return self._status_one(name)

    async def reload(self) -> ReloadResult:
        """Apply only what changed; a bad config is refused and the old one runs on.
        Under the lock up and down take: one of them never acts on a half-reloaded
        daemon (a tunnel started from the old config, a wanted set written twice)."""
        async with self._lock:
            try:
                return await self._reload()
            except ShuttledError as exc:
                log.warning("reload refused, the running config stays: %s", exc)
                raise

    async def _reload(self) -> ReloadResult:
        new = load_config(self.config_dir)
        diff = self.config.diff(new)
        added, removed, changed = diff["added"], diff["removed"], diff["changed"]
        # & new: profiles removed, and invalid ones still missing, are wanted no more.
        wanted = (self.wanted & set(new.profiles)) | {n for n in added if new.profiles[n].autostart}
        check_overlaps([new.profiles[n] for n in wanted])
        for name in (*removed, *changed):
            tunnel = self.tunnels.pop(name, None)
            if tunnel is not None:
                # A changed profile that keeps its kill switch stays held until
                # its successor takes over: the reload opens no gap.
                await tunnel.down(
                    keep_hold=name in changed and name in wanted and new.profiles[name].kill_switch
                )
        self.config = new
        self.wanted = wanted
        self.state.save(self.wanted)
        for name in sorted(wanted):
            if name not in self.tunnels or not self.tunnels[name].running:
                self.tunnel_for(name).up()
        self._sync_lockdown()  # kill_switch may have changed, or profiles gone
        log.info("reloaded: added %s, removed %s, changed %s", added, removed, changed)
        for hook in self.on_reload:
            hook()
        return ReloadResult(
            added=added, removed=removed, changed=changed, unchanged=diff["unchanged"]
        )

    # --- events ---------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=1000)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)

    def on_state(self, name: str, state: State, error: str | None) -> None:
        """A tunnel changed state: log it, tell watchers, update systemd's status line."""
        log.info("%s is %s%s", name, state, f": {error}" if error else "", extra={"PROFILE": name})
        self._emit(
            {
                "type": "state",
                "profile": name,
                "state": str(state),
                "error": error,
                "time": time.time(),
            }
        )
        notify(status_line(self))

    def _emit(self, event: Event) -> None:
        for queue in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)

    def summary(self) -> str:
        return status_line(self)

    async def stop(self) -> None:
        for tunnel in list(self.tunnels.values()):
            await tunnel.down()
        self.tunnels.clear()
        if self.captures is not None:
            with contextlib.suppress(ShuttledError):
                self.captures.backend.remove()


def status_line(daemon: Daemon) -> str:
    states = [t.state for t in daemon.tunnels.values()]
    up = sum(1 for s in states if s is State.UP)
    return f"STATUS={up} of {len(daemon.config.profiles)} profiles up" + (
        f", {len(states) - up} connecting or failed" if len(states) > up else ""
    )


# --- systemd -----------------------------------------------------------------------


async def watchdog() -> None:
    """WATCHDOG=1 from the event loop itself: a stuck loop stops the pings."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit():
        return
    interval = int(usec) / 2e6
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


class _ProfileFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "PROFILE"):
            record.PROFILE = current_profile.get()
        return True


def _state_text(tunnel: Tunnel) -> str:
    """`failed: why`, or the state alone while there is no error yet (never `: None`)."""
    error = tunnel.last_error
    return f"{tunnel.state}: {error}" if error else str(tunnel.state)


def _journal_handler() -> logging.Handler | None:
    if not (os.environ.get("JOURNAL_STREAM") or os.environ.get("SHUTTLED_JOURNAL") == "1"):
        return None
    return JournalHandler()


class LineFormatter(logging.Formatter):
    """`2024-05-01 12:00:00 shuttled: [profile] message` on stderr; without the time
    when stderr is the journal (JOURNAL_STREAM), which stamps every line itself."""

    def __init__(self, levels: bool = False) -> None:
        super().__init__(datefmt="%Y-%m-%d %H:%M:%S")
        self.levels = levels
        self.stamped = not os.environ.get("JOURNAL_STREAM")

    def format(self, record: logging.LogRecord) -> str:
        profile = getattr(record, "PROFILE", "")
        line = (
            f"{f'{self.formatTime(record, self.datefmt)} ' if self.stamped else ''}shuttled: "
            f"{f'{record.levelname} ' if self.levels else ''}"
            f"{f'[{profile}] ' if profile else ''}{record.getMessage()}"
        )
        return f"{line}\n{self.formatException(record.exc_info)}" if record.exc_info else line


def setup_logging(verbose: int) -> None:
    """The journal (with a PROFILE= field) under systemd; stderr otherwise."""
    handler = _journal_handler()
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LineFormatter())
    handler.addFilter(_ProfileFilter())
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO, handlers=[handler], force=True
    )


async def serve(args: argparse.Namespace) -> int:
    from shuttled.control.unix import UnixControlServer

    lock = InstanceLock()
    lock.acquire()  # before anything is touched: a second daemon changes nothing
    daemon = Daemon(args.config_dir, Path(args.state_dir), args.method)
    loop = asyncio.get_running_loop()
    quiet_accept_failures(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload(daemon)))
    server = UnixControlServer(daemon)
    bus = None
    try:
        await daemon.start()
        await server.start(Path(args.socket))
        bus = await _start_dbus(daemon, args)
        log.info("listening on %s%s", args.socket, " and the D-Bus system bus" if bus else "")
        notify("READY=1\n" + status_line(daemon))
        dog = asyncio.create_task(watchdog())
        guard = asyncio.create_task(daemon.guard_forever())
        await stop.wait()
        dog.cancel()
        guard.cancel()
        notify("STOPPING=1")
        return 0
    finally:
        server.close()
        if bus is not None:
            bus.close()
        await daemon.stop()
        lock.close()
        if stop.is_set():
            log.info("stopped: rules removed, tunnels closed")


async def _reload(daemon: Daemon) -> None:
    notify("RELOADING=1")
    with contextlib.suppress(ShuttledError):  # logged by reload()
        await daemon.reload()
    notify("READY=1\n" + status_line(daemon))


async def _start_dbus(daemon: Daemon, args: argparse.Namespace) -> Any:
    if args.no_dbus:
        return None
    try:
        from shuttled.control.dbus import DbusControl
    except ImportError as exc:
        log.warning("D-Bus API disabled: %s", exc)
        return None
    bus = DbusControl(daemon)
    try:
        await bus.start()
    except Exception as exc:  # no system bus: the unix socket still serves
        log.warning("D-Bus API unavailable: %s", exc)
        return None
    daemon.on_reload.append(bus.sync)
    return bus


def main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    raise_nofile()  # a proxy needs a descriptor a connection: 1024 is far too few
    return asyncio.run(serve(args))


def _connect_mode(connect: ConnectStats | None) -> str | None:
    """`status`'s connect mode: "remote", or "fast (why)"."""
    if connect is None:
        return None
    return connect_mode(connect)
