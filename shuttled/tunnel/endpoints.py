"""Channel endpoints that are not app sockets: remote commands, stream adapters
for our own clients (DNS), and the pipe that carries the remote helper."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from shuttled.errors import ProtocolError, RemoteError
from shuttled.remote import HELPER_SYNC
from shuttled.tunnel import faults, sshmsg
from shuttled.tunnel.channels import Channel, ChannelMux

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 1 << 20
# What a remote prints before the helper loader's sync line is kept this far, to
# say in the error what ran instead (a ForceCommand's output, a shell's banner).
PRELUDE_LIMIT = 4096
# Our command's output starts after this line: a login shell's rc files may print
# before it (see run_command).
OUTPUT_MARK = b"shuttled-output-begin"


class OpenRefused(RemoteError):
    """sshd refused to open a channel (MaxSessions reached, forwarding off...)."""

    def __init__(self, reason: int, description: str) -> None:
        super().__init__(f"channel open refused: {description} (reason {reason})")
        self.reason = reason


class BaseEndpoint:
    """Opening bookkeeping shared by our own endpoints: a future for the open."""

    def __init__(self) -> None:
        self.channel: Channel | None = None
        self.opened: asyncio.Future[Channel] = asyncio.get_running_loop().create_future()

    def on_open(self, channel: Channel) -> None:
        self.channel = channel
        if not self.opened.done():
            self.opened.set_result(channel)

    def on_open_failed(self, reason: int, description: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(OpenRefused(reason, description))

    def on_extended_data(self, code: int, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def abort_connection(self) -> None:
        """The fault boundary ended our channel: whoever waits for the open stops."""
        if not self.opened.done():
            self.opened.set_exception(RemoteError("channel aborted by a local error"))


class CommandEndpoint(BaseEndpoint):
    """A session channel running one remote command; output kept up to a bound."""

    def __init__(self) -> None:
        super().__init__()
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.status: int | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_data(self, data: memoryview) -> None:
        if len(self.stdout) + len(data) <= OUTPUT_LIMIT:
            self.stdout += data
        assert self.channel is not None
        self.channel.consumed(len(data))

    def on_extended_data(self, code: int, data: bytes) -> None:
        if len(self.stderr) + len(data) <= OUTPUT_LIMIT:
            self.stderr += data

    def on_exit_status(self, status: int) -> None:
        self.status = status

    def on_eof(self) -> None:
        pass

    def on_close(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def run_command(
    mux: ChannelMux, command: str, timeout: float = 30.0
) -> tuple[int | None, bytes, bytes]:
    """Run `command` on the remote (an exec channel): (status, stdout, stderr).

    sshd runs it through the user's login shell, whose rc files may print first;
    an echo of OUTPUT_MARK (the same in every shell) says where ours begins."""
    endpoint = CommandEndpoint()
    mux.open("session", endpoint)
    async with asyncio.timeout(timeout):
        channel = await endpoint.opened
        marked = f"echo {OUTPUT_MARK.decode()}; {command}"
        reply = channel.request("exec", sshmsg.sstring(marked))
        assert reply is not None
        if not await reply:
            channel.close()
            raise RemoteError(f"the server refused to run {command!r}")
        channel.send_eof()
        await endpoint.done
    return endpoint.status, _after_mark(bytes(endpoint.stdout)), bytes(endpoint.stderr)


def _after_mark(stdout: bytes) -> bytes:
    """Our command's output: what follows the mark line (all of it without one)."""
    before, mark, after = stdout.partition(OUTPUT_MARK + b"\n")
    return after if mark and (not before or before.endswith(b"\n")) else stdout


class ChannelTransport(BaseEndpoint, asyncio.Transport):
    """An asyncio transport over one channel, so stream clients (DNS over TCP)
    can use StreamReader/StreamWriter through the tunnel."""

    fault_kind = faults.DNS  # its one user

    def __init__(self, protocol: asyncio.Protocol) -> None:
        BaseEndpoint.__init__(self)
        asyncio.Transport.__init__(self)
        self._protocol = protocol
        self._closing = False
        self._connected = False

    # Endpoint side
    def on_open(self, channel: Channel) -> None:
        if self.opened.cancelled():  # the opener gave up waiting: nobody wants it
            channel.close()
            return
        super().on_open(channel)
        self._connected = True
        self._protocol.connection_made(self)

    def on_data(self, data: memoryview) -> None:
        self._protocol.data_received(bytes(data))
        if self.channel is not None:
            self.channel.consumed(len(data))

    def on_eof(self) -> None:
        self._protocol.eof_received()

    def on_close(self) -> None:
        self._closing = True
        if self._connected:
            self._protocol.connection_lost(None)

    def pause_reading(self) -> None:
        self._protocol.pause_writing()

    def resume_reading(self) -> None:
        self._protocol.resume_writing()

    # asyncio.Transport side
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.channel is not None and not self._closing:
            self.channel.send(bytes(data))

    def write_eof(self) -> None:
        if self.channel is not None:
            self.channel.send_eof()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self._closing = True
        if self.channel is not None:
            self.channel.close()

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading_transport(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def open_stream(
    mux: ChannelMux, host: str, port: int, limit: int = 1 << 18
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A (reader, writer) pair over a direct-tcpip channel to host:port."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport = ChannelTransport(protocol)
    mux.open_direct_tcpip(host, port, "127.0.0.1", 0, transport)
    await transport.opened
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class HelperPipe(BaseEndpoint):
    """The session channel running the remote helper, seen from both sides: an
    endpoint of the outer mux and the pipe of the inner mux."""

    def __init__(self, on_stderr: Callable[[str], None]) -> None:
        super().__init__()
        self.inner: ChannelMux | None = None
        self.status: int | None = None
        self.stderr_tail: list[str] = []
        self._partial = b""
        self._on_stderr = on_stderr
        self.synced = False  # the loader's sync line came (see HELPER_SYNC)
        self.prelude = b""  # what came before it, kept up to PRELUDE_LIMIT
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # pipe side, used by the inner mux
    def write(self, data: bytes) -> None:
        if self.channel is not None:
            self.channel.send(data)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()

    # endpoint side
    def on_data(self, data: memoryview) -> None:
        if self.channel is not None:
            self.channel.consumed(len(data))
        chunk = bytes(data)
        if not self.synced:
            chunk = self._skip_prelude(chunk)
        if chunk and self.inner is not None:
            self.inner.feed(chunk)

    def _skip_prelude(self, chunk: bytes) -> bytes:
        """Drop what a login shell printed before the loader ran; the rest, once synced."""
        seen = self.prelude + chunk
        before, sync, after = seen.partition(HELPER_SYNC)
        if sync:
            self.synced = True
            self.prelude = before[:PRELUDE_LIMIT]
            return after
        # Keep the start (for the error) and the tail (a sync line split across chunks).
        tail = len(HELPER_SYNC) - 1
        self.prelude = seen if len(seen) <= PRELUDE_LIMIT else seen[:PRELUDE_LIMIT] + seen[-tail:]
        return b""

    def on_extended_data(self, code: int, data: bytes) -> None:
        text = self._partial + data
        *lines, self._partial = text.split(b"\n")
        for raw in lines:
            # The helper signs its lines for whoever reads the remote's stderr; ours
            # already say "remote helper".
            line = raw.decode(errors="replace").rstrip().removeprefix("shuttled: ")
            self.stderr_tail = [*self.stderr_tail[-9:], line]
            self._on_stderr(line)

    def on_exit_status(self, status: int) -> None:
        self.status = status

    def on_eof(self) -> None:
        pass

    def on_close(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)
        if self.inner is not None:
            self.inner.fail(
                ProtocolError(f"remote helper ended (status {self.status}): {self.last_error()}")
            )

    def last_error(self) -> str:
        return self.stderr_tail[-1] if self.stderr_tail else "no message"

    def pause_reading(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_reading(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
