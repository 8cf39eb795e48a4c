"""One live ssh connection of a tunnel: the master, the proxy-mode mux client,
liveness, and the forwarding mode (sshd's direct-tcpip, or the remote helper)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from shuttled import const
from shuttled.errors import RemoteError, ShuttledError, SshError
from shuttled.tunnel import sshmsg
from shuttled.tunnel.channels import Channel, ChannelMux, MuxProtocol
from shuttled.tunnel.endpoints import CommandEndpoint, HelperPipe, open_stream, run_command
from shuttled.tunnel.nodelay import set_nodelay
from shuttled.tunnel.ssh import SshMaster, SshTarget

log = logging.getLogger(__name__)

HELPER_START_TIMEOUT = 30.0
# The master keeps a proxied channel whose open failed until the mux client
# that opened it goes away (channels.c frees proxy channels only on CLOSE), so
# after this many failures new connections move to a fresh mux connection and
# the old one is closed once its last channel ends.
ROTATE_AFTER_FAILED_OPENS = 256


class Forward(enum.StrEnum):
    AUTO = "auto"
    DIRECT = "direct"  # sshd makes the connections (direct-tcpip)
    HELPER = "helper"  # the uploaded python helper makes them


class _Probe(CommandEndpoint):
    """A throwaway direct-tcpip open whose only purpose is the server's answer."""

    def __init__(self) -> None:
        super().__init__()
        self.reason: int | None = None

    def on_open_failed(self, reason: int, description: str) -> None:
        self.reason = reason
        if not self.opened.done():
            self.opened.set_result(None)  # type: ignore[arg-type]


class SshSession:
    """Start with `start()`; `closed` resolves with the reason it ended."""

    def __init__(self, target: SshTarget, name: str, *, forward: Forward = Forward.AUTO,
                 pythons: tuple[str, ...] = const.REMOTE_PYTHONS,
                 keepalive: float = const.KEEPALIVE_INTERVAL) -> None:
        self.target = target
        self.name = name
        self.forward = forward
        self.pythons = pythons
        self.keepalive = keepalive
        self.master = SshMaster(target, name)
        self.control: ChannelMux | None = None  # the mux on the master
        self.data: ChannelMux | None = None  # the mux that carries app connections
        self.mode: Forward | None = None
        self.rtt: float | None = None
        self.started_at: float | None = None
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._liveness: Channel | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._helper: HelperPipe | None = None
        # The helper for UDP in direct mode: started on first use, on this master,
        # in a session channel of its own; losing it costs UDP only, not the session.
        self._udp_helper: ChannelMux | None = None
        self._udp_starting: asyncio.Future[ChannelMux] | None = None
        self._udp_retry_at = 0.0
        self._udp_error = ""
        self._retired: list[ChannelMux] = []
        self._rotating = False
        self._last_answer = 0.0

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        await self.master.start()
        if self.master.pid is not None and set_nodelay(self.master.pid):
            log.debug("TCP_NODELAY set on the ssh master's connection")
        self.control = await self._connect_mux()
        self._liveness = await self._open_session()
        self.mode = await self._choose_mode()
        self.data = (self.control if self.mode is Forward.DIRECT
                     else await self._start_helper(self._lost))
        self._tasks.append(asyncio.create_task(self._watch_master()))
        self._tasks.append(asyncio.create_task(self._keepalive()))
        self.started_at = time.time()
        log.info("tunnel %s up via %s (%s mode)", self.name, self.target.remote, self.mode)

    async def _connect_mux(self, on_lost: Any = None) -> ChannelMux:
        sock = await self.master.connect_proxy()
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_unix_connection(
            lambda: MuxProtocol(f"ssh {self.target.remote}", on_lost or self._lost), sock=sock)
        assert isinstance(protocol, MuxProtocol) and protocol.mux is not None
        return protocol.mux

    async def _open_session(self) -> Channel:
        assert self.control is not None
        endpoint = CommandEndpoint()
        self.control.open("session", endpoint)
        return await asyncio.wait_for(endpoint.opened, const.MUX_HELLO_TIMEOUT)

    async def _choose_mode(self) -> Forward:
        if self.forward is not Forward.AUTO:
            return self.forward
        # Ask sshd for a harmless forward (port 1 on its own loopback): refused
        # means forwarding works, "administratively prohibited" means helper.
        assert self.control is not None
        probe = _Probe()
        self.control.open_direct_tcpip("127.0.0.1", 1, "127.0.0.1", 0, probe)
        channel = await asyncio.wait_for(probe.opened, const.MUX_HELLO_TIMEOUT)
        if channel is not None:
            channel.close()
        if probe.reason == sshmsg.OPEN_ADMINISTRATIVELY_PROHIBITED:
            log.info("%s refuses TCP forwarding: using the remote helper", self.target.remote)
            return Forward.HELPER
        return Forward.DIRECT

    async def _start_helper(self, on_lost: Callable[[BaseException | None], None]
                            ) -> ChannelMux:
        from shuttled.remote import helper_source, loader_command

        assert self.control is not None
        source = helper_source()
        pipe = HelperPipe(lambda line: log.info("remote helper: %s", line))
        self._helper = pipe
        self.control.open("session", pipe)
        hello: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def on_hello(_msg_type: int, payload: memoryview) -> None:
            if not hello.done():
                hello.set_result(bytes(payload))

        pipe.inner = ChannelMux(pipe, name=f"helper on {self.target.remote}",
                                on_lost=on_lost, on_global=on_hello)
        async with asyncio.timeout(HELPER_START_TIMEOUT):
            channel = await pipe.opened
            reply = channel.request("exec", sshmsg.sstring(
                loader_command(len(source), self.pythons)))
            assert reply is not None
            if not await reply:
                raise RemoteError(f"{self.target.remote} refused to run the helper")
            channel.send(source)
            waiters: list[asyncio.Future[Any]] = [hello, pipe.ended]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not hello.done():
            raise RemoteError(self._helper_failure(pipe))
        log.info("remote helper started: %s", sshmsg.Reader(hello.result()).text())
        return pipe.inner

    def _helper_failure(self, pipe: HelperPipe) -> str:
        if pipe.status == const.HELPER_NO_PYTHON_EXIT:
            return (f"no python on {self.target.remote} for the helper "
                    f"(tried {', '.join(self.pythons)})")
        return f"the remote helper did not start (status {pipe.status}): {pipe.last_error()}"

    async def _watch_master(self) -> None:
        status = await self.master.wait()
        self._lost(SshError(f"ssh exited with status {status}: {self.master.last_error()}"))

    async def _keepalive(self) -> None:
        # keepalive@openssh.com on our own session channel: the master forwards
        # channel requests, sshd answers FAILURE, and the round trip is our RTT.
        # One ping per interval without waiting for the last: the link is dead
        # once no answer came for KEEPALIVE_MISSES intervals.
        self._last_answer = time.monotonic()
        deadline = self.keepalive * const.KEEPALIVE_MISSES
        for tick in itertools.count(1):
            # Check four times per interval so death is seen soon after the deadline.
            await asyncio.sleep(self.keepalive / 4)
            if self._liveness is None or self.closed.done():
                return
            if time.monotonic() - self._last_answer > deadline:
                self._lost(SshError(f"no keepalive answer from {self.target.remote} in "
                                    f"{deadline:.0f} s"))
                return
            if tick % 4:
                continue
            try:
                reply = self._liveness.request("keepalive@openssh.com")
            except ShuttledError:
                return
            assert reply is not None
            reply.add_done_callback(functools.partial(self._answered, time.monotonic()))

    def _answered(self, sent: float, reply: asyncio.Future[bool]) -> None:
        if reply.cancelled() or self.closed.done():
            return
        now = time.monotonic()
        self._last_answer = now
        self.rtt = now - sent

    def _lost(self, exc: BaseException | None) -> None:
        if not self.closed.done():
            reason = str(exc) if exc is not None else "stopped"
            if exc is not None:
                log.warning("tunnel %s lost: %s", self.name, reason)
            self.closed.set_result(reason)
        for mux in (self._udp_helper, self.data, self.control, *self._retired):
            if mux is not None:
                mux.fail(None)

    # --- services for the layers above --------------------------------------------

    async def open_stream(self, host: str, port: int
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.data is None or self.data.closed:
            raise SshError("tunnel is not up")
        return await open_stream(self.data, host, port)

    async def run(self, command: str, timeout: float = 30.0
                  ) -> tuple[int | None, bytes, bytes]:
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
            self._udp_starting.add_done_callback(
                lambda f: None if f.cancelled() else f.exception())
        return await asyncio.shield(self._udp_starting)

    async def _start_udp_helper(self) -> ChannelMux:
        try:
            mux = await self._start_helper(self._udp_helper_lost)
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
        if self.closed.done():
            return None
        data = self.data
        if (data is not None and self.mode is Forward.DIRECT and not self._rotating
                and data.counters.open_failed >= ROTATE_AFTER_FAILED_OPENS):
            self._rotating = True
            self._tasks.append(asyncio.create_task(self._rotate()))
        self._close_idle_retired()
        return data

    async def _rotate(self) -> None:
        try:
            fresh = await self._connect_mux(on_lost=self._retired_lost)
        except SshError as exc:
            log.warning("could not open a fresh mux connection: %s", exc)
            return
        finally:
            self._rotating = False
        if self.data is not None and self.data is not self.control:
            self._retired.append(self.data)
        self.data = fresh
        log.info("%d opens failed: new connections now use a fresh mux connection",
                 ROTATE_AFTER_FAILED_OPENS)

    def _retired_lost(self, exc: BaseException | None) -> None:
        # A data-only mux connection: losing it ends the session like any other.
        if exc is not None:
            self._lost(exc)

    def _close_idle_retired(self) -> None:
        for mux in [m for m in self._retired if not m.channels]:
            self._retired.remove(mux)
            mux.fail(None)

    async def stop(self) -> None:
        self._lost(None)  # close our side first, so the master's exit is no surprise
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.master.stop()
