"""A tunnel's live ssh connections: the masters, their proxy-mode mux clients,
liveness, and the forwarding mode (sshd's direct-tcpip, or the remote helper)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from shuttled import const
from shuttled.const import Forward
from shuttled.control.schema import LinkStats, StreamStats
from shuttled.errors import RemoteError, ShuttledError, SshError
from shuttled.tunnel import sshmsg
from shuttled.tunnel.channels import Channel, ChannelMux, MuxProtocol
from shuttled.tunnel.endpoints import (
    CommandEndpoint,
    HelperPipe,
    OpenRefused,
    open_stream,
    run_command,
)
from shuttled.tunnel.faults import Faults
from shuttled.tunnel.nodelay import set_nodelay
from shuttled.tunnel.ssh import SshMaster, SshTarget

log = logging.getLogger(__name__)

HELPER_START_TIMEOUT = 30.0
# After closing our session for the helper (MaxSessions 1), sshd frees its slot
# once the session's command has exited: this is time enough for that.
SESSION_RELEASE_WAIT = 0.5
# The master keeps a proxied channel whose open failed for good (channels.c frees
# proxy channels only on CLOSE both ways), and closing the mux connection that
# holds one is fatal for it (the master then sends CLOSE for a channel that never
# had a remote id: nchan.c, "no remote_id"). Its table has room for 16,384 channels
# (CHANNELS_MAX_CHANNELS), failed and live together: past that it exits. So a
# session whose master has collected const.MASTER_FAILED_OPENS_MAX failed opens is
# `worn`, and the supervisor replaces it with a fresh one (make before break).

# pty-req: TERM, 80x24 characters, no pixel size, no terminal modes (RFC 4254 6.2).
_PTY_REQUEST = (
    sshmsg.sstring("dumb")
    + sshmsg.U32X2.pack(80, 24)
    + sshmsg.U32X2.pack(0, 0)
    + sshmsg.sstring(b"\x00")
)

# A lost extra ssh connection is replaced after this long, doubling while it fails.
REPLACE_BACKOFF_MIN = 1.0
REPLACE_BACKOFF_MAX = 60.0

LostHandler = Callable[[BaseException | None], None]


class _Probe(CommandEndpoint):
    """A throwaway direct-tcpip open whose only purpose is the server's answer."""

    def __init__(self) -> None:
        super().__init__()
        self.reason: int | None = None

    def on_open_failed(self, reason: int, description: str) -> None:
        self.reason = reason
        if not self.opened.done():
            self.opened.set_result(None)  # type: ignore[arg-type]


class _HeardProtocol(MuxProtocol):
    """A mux connection whose every packet from the master is a sign of life: a
    ping's answer may queue behind bulk data in the master, the data itself not."""

    def __init__(self, link: SshLink, name: str, on_lost: LostHandler, fault_log: Faults) -> None:
        super().__init__(name, on_lost, fault_log)
        self._link = link

    def data_received(self, data: bytes) -> None:
        self._link.heard = time.monotonic()
        super().data_received(data)


class SshLink:
    """One ssh connection of a session: its master, the mux on its control socket,
    and the mux that carries app connections over it (that same mux in direct
    mode, the helper's in helper mode)."""

    def __init__(self, session: SshSession, index: int) -> None:
        self.session = session
        self.index = index
        name = session.name if index == 0 else f"{session.name}.{index}"
        self.master = SshMaster(session.target, name)
        self.control: ChannelMux | None = None
        self.data: ChannelMux | None = None
        self.interactive: Channel | None = None  # our own session channel (see below)
        self._tasks: list[asyncio.Task[None]] = []
        self.dead = False  # lost while the session goes on without it
        self.heard = time.monotonic()  # the master's last packet on any of our mux connections

    @property
    def label(self) -> str:
        return f"ssh connection {self.index + 1} of {self.session.streams}"

    async def connect(self) -> None:
        await self.master.start()
        # Where ssh made the server connection itself (nodelay.py): borrow it, if we may.
        if (
            self.master.server is None
            and self.master.pid is not None
            and set_nodelay(self.master.pid)
        ):
            log.debug("TCP_NODELAY set on the ssh master's connection")
        self.control = await self.connect_mux(self.lost)
        try:
            self.interactive = await self._open_session()
        except OpenRefused as exc:
            # MaxSessions 0: forwarding only. The tunnel works without our session:
            # Nagle stays on at sshd, and liveness is ssh's own ServerAlive.
            log.info(
                "%s opens no session channel for us (%s; MaxSessions 0?): no RTT pings, "
                "liveness from ssh's ServerAliveInterval",
                self.session.target.remote,
                exc,
            )
        self._tasks.append(asyncio.create_task(self._watch_master()))

    async def connect_mux(self, on_lost: LostHandler) -> ChannelMux:
        sock = await self.master.connect_proxy()
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_unix_connection(
            lambda: _HeardProtocol(
                self, f"ssh {self.session.target.remote}", on_lost, self.session.faults
            ),
            sock=sock,
        )
        assert isinstance(protocol, MuxProtocol) and protocol.mux is not None
        return protocol.mux

    async def _open_session(self) -> Channel:
        assert self.control is not None
        endpoint = CommandEndpoint()
        self.control.open("session", endpoint)
        channel = await asyncio.wait_for(endpoint.opened, const.MUX_HELLO_TIMEOUT)
        await self._make_interactive(channel)
        return channel

    async def _make_interactive(self, channel: Channel) -> None:
        """A pty on our own session makes sshd treat the connection as interactive,
        which turns Nagle off on its side (session.c, do_exec_pty): without it sshd
        holds a small packet until our delayed ACK, ~40 ms on a new connection."""
        target = self.session.target.remote
        try:
            reply = channel.request("pty-req", _PTY_REQUEST)
            assert reply is not None
            if not await asyncio.wait_for(reply, const.MUX_HELLO_TIMEOUT):
                log.debug("%s refuses a pty (PermitTTY no): Nagle stays on there", target)
                return
            reply = channel.request("exec", sshmsg.sstring("exec cat >/dev/null"))
            assert reply is not None
            await asyncio.wait_for(reply, const.MUX_HELLO_TIMEOUT)
        except (TimeoutError, ShuttledError) as exc:
            log.debug("no interactive session on %s: %s", target, exc)

    async def start_data(self, mode: Forward) -> None:
        assert self.control is not None
        self.data = (
            self.control
            if mode is Forward.DIRECT
            else await self.session.start_helper(self.control, self.lost)
        )

    async def _watch_master(self) -> None:
        status = await self.master.wait()
        self.lost(SshError(f"ssh exited with status {status}: {self.master.last_error()}"))

    def lost(self, exc: BaseException | None) -> None:
        self.session.link_lost(self, exc)

    def fail(self) -> None:
        for mux in (self.data, self.control):
            if mux is not None:
                mux.fail(None)

    @property
    def load(self) -> int | None:
        """Open channels on the data mux; None when it cannot take more."""
        data = self.data
        return None if self.dead or data is None or data.closed else data.counters.active

    def current_mux(self) -> ChannelMux | None:
        return self.data

    @property
    def failed_opens(self) -> int:
        """Failed opens the master keeps (direct mode; the helper frees its own)."""
        control = self.control
        return (
            0
            if control is None or self.session.mode is not Forward.DIRECT
            else (control.counters.open_failed)
        )

    async def stop(self) -> None:
        self.fail()  # close our side first, so the master's exit is no surprise
        await _cancel(self._tasks)
        await self.master.stop()


class SshSession:
    """Start with `start()`; `closed` resolves with the reason it ended.

    With `streams` > 1 the session holds that many ssh connections: the first
    carries liveness, commands, DNS and UDP; each new app connection goes to the
    one with the fewest open channels, so bulk transfers spread over several
    encrypting processes (one ssh uses one CPU core at most). Losing an extra
    connection resets only the app connections it carried, and it is replaced
    in the background; losing the first ends the session.
    """

    def __init__(
        self,
        target: SshTarget,
        name: str,
        *,
        forward: Forward = Forward.AUTO,
        pythons: tuple[str, ...] = const.REMOTE_PYTHONS,
        keepalive: float = const.KEEPALIVE_INTERVAL,
        streams: int = 1,
        fault_log: Faults | None = None,
    ) -> None:
        self.target = target
        # Faults of single connections, contained by every mux of this session.
        self.faults = fault_log if fault_log is not None else Faults()
        self.name = name
        self.forward = forward
        self.pythons = pythons
        self.keepalive = keepalive
        self.streams = streams
        self.links = [SshLink(self, i) for i in range(streams)]
        self.mode: Forward | None = None
        self.rtt: float | None = None
        self.started_at: float | None = None
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.worn = asyncio.Event()  # a master's channel table is filling up (see above)
        self._tasks: list[asyncio.Task[None]] = []
        # The helper for UDP in direct mode: started on first use, on the first
        # master, in a session channel of its own; losing it costs UDP only.
        self._udp_helper: ChannelMux | None = None
        self._udp_starting: asyncio.Future[ChannelMux] | None = None
        self._udp_retry_at = 0.0
        self._udp_error = ""
        self.helper_python: str | None = None  # the version the last helper started in

    @property
    def primary(self) -> SshLink:
        return self.links[0]

    @property
    def master(self) -> SshMaster:
        return self.primary.master

    @property
    def control(self) -> ChannelMux | None:
        return self.primary.control

    @property
    def data(self) -> ChannelMux | None:
        return self.primary.data

    def live_links(self) -> list[SshLink]:
        return [link for link in self.links if link.load is not None]

    def stream_stats(self) -> StreamStats:
        """How many ssh connections carry the tunnel, and (when several) the app
        connections each one carries, so the spread can be seen."""
        live = self.live_links()
        if self.streams == 1:
            return {"streams": len(live)}
        return {"streams": len(live), "stream_channels": [link.load or 0 for link in live]}

    def master_pids(self) -> list[int]:
        return [link.master.pid for link in self.live_links() if link.master.pid is not None]

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        await self.primary.connect()
        self.mode = await self._choose_mode()
        await self.primary.start_data(self.mode)
        if self.streams > 1:
            await self._start_extras(self.mode)
        self._tasks.append(asyncio.create_task(self._keepalive()))
        self.started_at = time.time()
        extra = f", {len(self.links)} ssh connections" if self.streams > 1 else ""
        log.info("tunnel %s up via %s (%s mode%s)", self.name, self.target.remote, self.mode, extra)

    async def _start_extras(self, mode: Forward) -> None:
        # Side by side; one that fails leaves the tunnel up on fewer connections
        # (and is tried again) rather than refusing what would still work.
        extras = self.links[1:]
        results = await asyncio.gather(
            *(self._start_link(link, mode) for link in extras), return_exceptions=True
        )
        for link, result in zip(extras, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, (ShuttledError, OSError, TimeoutError)):
                    raise result
                log.warning("%s did not start: %s", link.label, result or "no answer in time")
                link.dead = True
                self._tasks.append(asyncio.create_task(self._replace(link)))

    @staticmethod
    async def _start_link(link: SshLink, mode: Forward) -> None:
        await link.connect()
        await link.start_data(mode)

    async def _choose_mode(self) -> Forward:
        if self.forward is not Forward.AUTO:
            return self.forward
        if await self.probe_forwarding() == sshmsg.OPEN_ADMINISTRATIVELY_PROHIBITED:
            # AllowTcpForwarding no and a PermitOpen list without our probe's address
            # answer alike (serverloop.c, channels.c: same reason, same text).
            log.info(
                "%s refuses TCP forwarding: using the remote helper (where sshd limits "
                "destinations with PermitOpen instead, forward: direct keeps to that list)",
                self.target.remote,
            )
            return Forward.HELPER
        return Forward.DIRECT

    async def probe_forwarding(self) -> int | None:
        """Ask sshd for a harmless forward (port 1 on its own loopback): the open's
        failure reason (OPEN_CONNECT_FAILED means forwarding works, "administratively
        prohibited" that sshd refuses it), None when it even opened."""
        assert self.control is not None
        probe = _Probe()
        self.control.open_direct_tcpip("127.0.0.1", 1, "127.0.0.1", 0, probe)
        channel = await asyncio.wait_for(probe.opened, const.MUX_HELLO_TIMEOUT)
        if channel is not None:
            channel.close()
        return probe.reason

    async def start_helper(self, control: ChannelMux, on_lost: LostHandler) -> ChannelMux:
        """Upload and start the remote helper in a session channel of `control`."""
        try:
            return await self._start_helper(control, on_lost)
        except OpenRefused:
            if not await self._give_up_session():
                raise
        return await self._start_helper(control, on_lost)

    async def _give_up_session(self) -> bool:
        """MaxSessions reached (1 counts our pty session): close our session so the
        helper gets its slot; its channel carries the pings from then on."""
        link = self.primary
        if link.interactive is None:
            return False
        log.info(
            "%s allows no second session (MaxSessions 1?): the helper takes our own "
            "session's place (Nagle stays on at sshd)",
            self.target.remote,
        )
        channel, link.interactive = link.interactive, None
        channel.close()
        # sshd counts the session until its command (our cat) exits, after the close.
        await asyncio.sleep(SESSION_RELEASE_WAIT)
        return True

    async def _start_helper(self, control: ChannelMux, on_lost: LostHandler) -> ChannelMux:
        from shuttled.remote import helper_source, loader_command

        source = helper_source()
        pipe = HelperPipe(lambda line: log.info("remote helper: %s", line))
        control.open("session", pipe)
        hello: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def on_hello(_msg_type: int, payload: memoryview) -> None:
            if not hello.done():
                hello.set_result(bytes(payload))

        pipe.inner = ChannelMux(
            pipe,
            name=f"helper on {self.target.remote}",
            on_lost=on_lost,
            on_global=on_hello,
            fault_log=self.faults,
        )
        async with asyncio.timeout(HELPER_START_TIMEOUT):
            channel = await pipe.opened
            reply = channel.request(
                "exec", sshmsg.sstring(loader_command(len(source), self.pythons))
            )
            assert reply is not None
            if not await reply:
                raise RemoteError(f"{self.target.remote} refused to run the helper")
            channel.send(source)
            waiters: list[asyncio.Future[Any]] = [hello, pipe.ended]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not hello.done():
            raise RemoteError(self._helper_failure(pipe))
        reader = sshmsg.Reader(hello.result())
        log.info("remote helper started: %s", reader.text())
        self.helper_python = reader.text() if reader.pos < len(reader.buf) else None
        if self.primary.interactive is None and control is self.control:
            self.primary.interactive = channel  # sshd answers pings on any session
        return pipe.inner

    def _helper_failure(self, pipe: HelperPipe) -> str:
        """One line: why the helper did not start, and what the user can change."""
        remote = self.target.remote
        why = (
            f"{remote} refuses TCP forwarding, so the helper must run there"
            if self.mode is Forward.HELPER
            else f"UDP needs the helper on {remote}"
        )
        if pipe.status == const.HELPER_NO_PYTHON_EXIT:
            found = pipe.last_error().removeprefix("shuttled: ")
            return (
                f"{why}, but there is {found}; install Python 3.8+ there or name one with --python "
                "(profile key python)"
                + (
                    "; or allow forwarding (AllowTcpForwarding yes)"
                    if self.mode is Forward.HELPER
                    else ""
                )
            )
        if not pipe.synced:
            # Our loader never ran: the server ran a command of its own instead.
            said = pipe.prelude.decode(errors="replace").strip().splitlines()
            printed = repr(said[0][:80]) if said else "nothing"
            return (
                f"{why}, but {remote} ran another command instead of ours (status "
                f"{pipe.status}, printed {printed}): a "
                "ForceCommand in sshd_config or command= in authorized_keys; use an account "
                "without one, or forward: direct where sshd forwards TCP"
            )
        return f"the remote helper did not start (status {pipe.status}): {pipe.last_error()}"

    async def _keepalive(self) -> None:
        """Liveness of the first ssh connection (the numbers: const, LIVENESS_PING).

        keepalive@openssh.com on our own session channel: the master forwards
        channel requests, sshd answers FAILURE, and the round trip is our RTT.
        The answer is only one sign of life among others: any packet from the
        master, and (where we made the TCP connection) any segment the kernel saw
        from the server. A saturated link is never silent; a cut one is, at once.
        Dropbear answers the same way (CHANNEL_FAILURE: its session channels fail
        every unknown request that wants a reply; measured with 2022.83, 100-380 us
        in the lab), so liveness and RTT need nothing of their own there.
        """
        link = self.primary
        ping_every = min(self.keepalive, const.LIVENESS_PING)
        last_ping = link.heard = time.monotonic()
        while not self.closed.done():
            await asyncio.sleep(const.LIVENESS_CHECK)
            if self.closed.done():
                return
            reason = self.link_dead(link)
            if reason is not None:
                self._lost(SshError(reason))
                return
            liveness = link.interactive
            if liveness is not None and time.monotonic() - last_ping >= ping_every:
                last_ping = time.monotonic()
                try:
                    reply = liveness.request("keepalive@openssh.com")
                except ShuttledError:
                    # Our session ended under us (ForceCommand ran instead of our cat):
                    # go on without pings rather than declare the link dead.
                    log.info("%s closed our session: no RTT pings", self.target.remote)
                    link.interactive = None
                    continue
                assert reply is not None
                reply.add_done_callback(functools.partial(self._answered, last_ping))

    def silence_limit(self, tcp_view: bool) -> float:
        """Seconds without any sign of life after which the link is dead."""
        silence = const.LINK_SILENCE_DEAD if tcp_view else const.LINK_SILENCE_DEAD_BLIND
        return min(silence, self.keepalive * const.KEEPALIVE_MISSES)

    def link_dead(self, link: SshLink) -> str | None:
        """Why the link is dead, or None while it lives."""
        now = time.monotonic()
        tcp = link.master.tcp_info()
        if link.interactive is None and tcp is None:
            return None  # no pings, no TCP view: ssh's ServerAlive is the judge (it exits)
        heard = link.heard if tcp is None else max(link.heard, now - tcp.heard)
        limit = self.silence_limit(tcp is not None)
        if now - heard > limit:
            return f"nothing heard from {self.target.remote} in {limit:.0f} s: link dead"
        # The TCP connection lives but sshd or the master does not answer our pings.
        limit = self.keepalive * const.KEEPALIVE_MISSES
        if link.interactive is not None and now - link.heard > limit:
            return f"no answer from {self.target.remote} in {limit:.0f} s"
        return None

    def _answered(self, sent: float, reply: asyncio.Future[bool]) -> None:
        if reply.cancelled() or self.closed.done():
            return
        self.rtt = time.monotonic() - sent

    def link_stats(self) -> LinkStats:
        """The kernel's view of the first ssh connection, for stats: its smoothed
        RTT (seconds) and retransmitted segments; empty where ssh made it."""
        tcp = self.primary.master.tcp_info()
        return {} if tcp is None else {"tcp_rtt": tcp.rtt, "tcp_retrans": tcp.retrans}

    def link_lost(self, link: SshLink, exc: BaseException | None) -> None:
        if link is self.primary or exc is None:
            self._lost(exc)
            return
        if not link.dead and not self.closed.done():
            link.dead = True
            log.warning(
                "%s lost (%s): the connections it carried were reset, %d left",
                link.label,
                exc,
                len(self.live_links()),
            )
            self._tasks.append(asyncio.create_task(self._replace(link)))

    async def _replace(self, link: SshLink) -> None:
        """Bring a lost extra connection back, with backoff, while the session lives."""
        await link.stop()
        delay = REPLACE_BACKOFF_MIN
        while not self.closed.done():
            await asyncio.sleep(delay)
            fresh = SshLink(self, link.index)
            self.links[self.links.index(link)] = fresh
            try:
                assert self.mode is not None
                await self._start_link(fresh, self.mode)
            except (ShuttledError, OSError, TimeoutError) as exc:
                log.warning("%s did not come back: %s", fresh.label, exc or "no answer in time")
                fresh.dead = True
                await fresh.stop()
                link, delay = fresh, min(delay * 2, REPLACE_BACKOFF_MAX)
                continue
            log.info("%s is back", fresh.label)
            return

    def _lost(self, exc: BaseException | None) -> None:
        if not self.closed.done():
            reason = str(exc) if exc is not None else "stopped"
            if exc is not None:
                log.warning("tunnel %s lost: %s", self.name, reason)
            self.closed.set_result(reason)
        if self._udp_helper is not None:
            self._udp_helper.fail(None)
        for link in self.links:
            link.fail()

    # --- services for the layers above --------------------------------------------

    async def open_stream(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.data is None or self.data.closed:
            raise SshError("tunnel is not up")
        return await open_stream(self.data, host, port)

    async def run(self, command: str, timeout: float = 30.0) -> tuple[int | None, bytes, bytes]:
        if self.control is None or self.control.closed:
            raise SshError("tunnel is not up")
        return await run_command(self.control, command, timeout)

    async def udp_mux(self) -> ChannelMux:
        """The mux that carries udp@shuttled channels: the helper's.

        In helper mode that is the data mux; in direct mode a helper is started
        on first use (concurrent callers share the one start). After a failed
        start, callers are refused at once for UDP_HELPER_RETRY seconds.
        """
        if self.closed.done() or self.control is None or self.control.closed:
            raise SshError("tunnel is not up")
        if self.mode is Forward.HELPER and self.data is not None:
            return self.data
        if self._udp_helper is not None and not self._udp_helper.closed:
            return self._udp_helper
        if self._udp_starting is None:
            if time.monotonic() < self._udp_retry_at:
                raise RemoteError(f"UDP unavailable: {self._udp_error}")
            self._udp_starting = asyncio.ensure_future(self._start_udp_helper())
            # Retrieved here too, so a start nobody waits for any more logs no warning.
            self._udp_starting.add_done_callback(lambda f: None if f.cancelled() else f.exception())
        return await asyncio.shield(self._udp_starting)

    async def _start_udp_helper(self) -> ChannelMux:
        try:
            assert self.control is not None
            mux = await self.start_helper(self.control, self._udp_helper_lost)
        except (ShuttledError, OSError, TimeoutError) as exc:
            self._udp_error = str(exc) or type(exc).__name__
            self._udp_retry_at = time.monotonic() + const.UDP_HELPER_RETRY
            log.warning("remote helper for UDP did not start: %s", self._udp_error)
            raise RemoteError(f"UDP unavailable: {self._udp_error}") from None
        finally:
            self._udp_starting = None
        self._udp_helper = mux
        return mux

    def _udp_helper_lost(self, exc: BaseException | None) -> None:
        if exc is not None and not self.closed.done():
            log.warning("remote helper for UDP ended: %s", exc)
        self._udp_helper = None

    def current_mux(self) -> ChannelMux | None:
        """The mux for a new app connection: the least busy ssh connection's."""
        if self.closed.done():
            return None
        live = self.live_links()
        if not self.worn.is_set() and any(
            link.failed_opens >= const.MASTER_FAILED_OPENS_MAX for link in live
        ):
            log.debug(
                "tunnel %s: a master holds %d failed opens",
                self.name,
                const.MASTER_FAILED_OPENS_MAX,
            )
            self.worn.set()
        return min(live, key=_by_load).current_mux() if live else None

    def muxes(self) -> set[ChannelMux]:
        """Every mux of this session: a connection on one of them is this session's."""
        return {mux for link in self.links for mux in (link.control, link.data) if mux is not None}

    async def stop(self) -> None:
        self._lost(None)  # close our side first, so the masters' exits are no surprise
        await _cancel(self._tasks)
        await asyncio.gather(*(link.stop() for link in self.links))


def _by_load(link: SshLink) -> tuple[int, int]:
    return (link.load or 0, link.index)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    tasks.clear()
