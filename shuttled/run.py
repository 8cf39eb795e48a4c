"""`shuttled run`: one tunnel in the foreground, sshuttle-style, no daemon.

The same Tunnel the daemon supervises, with reconnection off: when ssh goes,
the run ends (exit 1) and every rule it added goes with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from shuttled import const
from shuttled.control.tables import connect_mode
from shuttled.errors import ShuttledError
from shuttled.firewall import detect
from shuttled.supervisor import CaptureSet, State, Tunnel, TunnelSpec
from shuttled.tunnel.accept import quiet_accept_failures, raise_nofile

log = logging.getLogger(__name__)


async def run(spec: TunnelSpec, method: str | None = None) -> int:
    """Run until SIGINT/SIGTERM (exit 0) or until the tunnel drops (exit 1)."""
    loop = asyncio.get_running_loop()
    raise_nofile()  # a proxy needs a descriptor a connection: 1024 is far too few
    quiet_accept_failures(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    captures = CaptureSet(detect(method, table=f"{const.RUN_TABLE_PREFIX}{os.getpid()}"))
    tunnel = Tunnel(spec, captures)
    tunnel.up()
    try:
        settled = asyncio.create_task(tunnel.wait_settled())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([settled, stopper], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            return 0
        if tunnel.state is not State.UP:
            raise ShuttledError(tunnel.last_error or "tunnel did not come up")
        mode = tunnel.session.mode if tunnel.session else "?"
        log.info(
            "tunnel to %s is up (%s mode, %s, connect: %s); Ctrl-C to stop",
            spec.target.remote,
            mode,
            captures.backend.name,
            connect_mode(tunnel.proxy.gate.stats()),
        )
        ended = asyncio.create_task(tunnel.wait_not(State.UP))
        await asyncio.wait([ended, stopper], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            return 0
        raise ShuttledError(f"tunnel lost: {tunnel.last_error or 'ssh ended'}")
    finally:
        await tunnel.down()
        captures.backend.remove()
        if stop.is_set():
            log.info("stopped: rules removed, tunnel closed")
