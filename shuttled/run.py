"""`shuttled run`: one tunnel in the foreground, sshuttle-style, no daemon.

Order matters: ssh first (so our rules can never catch ssh's own connection),
then listeners, then the firewall transaction; teardown in reverse, always.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from shuttled import const
from shuttled.errors import ShuttledError, UsageError
from shuttled.firewall import detect
from shuttled.firewall.base import Capture, Subnet
from shuttled.tunnel.dns import DnsForwarder, DnsListener, parse_resolv_conf
from shuttled.tunnel.proxy import TransparentProxy
from shuttled.tunnel.session import Forward, SshSession
from shuttled.tunnel.ssh import SshTarget, server_endpoints

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")


@dataclass(frozen=True)
class RunConfig:
    """Everything one tunnel needs; the daemon builds the same from a profile."""

    name: str
    target: SshTarget
    subnets: tuple[Subnet, ...]
    method: str | None = None
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
                            f"({err.decode(errors='replace').strip() or 'empty'}); "
                            "set one with --to-ns")
    return servers


class Runner:
    """Owns one tunnel's pieces for the life of `shuttled run`."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.backend = detect(config.method, table=f"{const.RUN_TABLE_PREFIX}{os.getpid()}")
        self.session = SshSession(config.target, config.name, forward=config.forward,
                                  pythons=config.pythons, keepalive=config.keepalive)
        self.proxy = TransparentProxy(self.session.current_mux, addresses=config.listen)
        self.dns_listener: DnsListener | None = None
        self.forwarder: DnsForwarder | None = None

    async def start(self) -> None:
        cfg = self.config
        excludes = await ssh_excludes(cfg.target) if cfg.auto_exclude else ()
        await self.session.start()
        port = await self.proxy.start(cfg.port)
        dns_port, dns_servers = await self._start_dns() if cfg.dns else (None, ())
        capture = Capture(name=cfg.name, subnets=cfg.subnets + excludes, tcp_port=port,
                          dns_port=dns_port, dns_servers=dns_servers, uid=cfg.uid)
        self.backend.apply([capture])
        log.info("capturing %s on %s (listener port %d)",
                 ", ".join(_subnet_text(s) for s in cfg.subnets), self.backend.name, port)

    async def _start_dns(self) -> tuple[int, tuple[ipaddress.IPv4Address |
                                                    ipaddress.IPv6Address, ...]]:
        cfg = self.config
        upstream = list(cfg.dns_upstream) or await remote_nameservers(self.session)
        local = list(cfg.dns_capture) or parse_resolv_conf(RESOLV_CONF.read_text())
        if not local:
            raise UsageError("--dns: no nameserver in /etc/resolv.conf; use --ns-hosts")
        self.forwarder = DnsForwarder(self.session.open_stream, upstream)
        self.dns_listener = DnsListener(self.forwarder)
        port = await self.dns_listener.start(cfg.listen)
        log.info("DNS for %s answered by %s through the tunnel", ", ".join(local),
                 ", ".join(upstream))
        return port, tuple(ipaddress.ip_address(a) for a in local)

    async def stop(self) -> None:
        with contextlib.suppress(ShuttledError):
            self.backend.remove()
        self.proxy.close()
        if self.dns_listener is not None:
            self.dns_listener.close()
        if self.forwarder is not None:
            self.forwarder.close()
        await self.session.stop()


def _subnet_text(subnet: Subnet) -> str:
    ports = f":{subnet.ports[0]}-{subnet.ports[1]}" if subnet.ports else ""
    return f"{'!' if subnet.exclude else ''}{subnet.network}{ports}"


async def run(config: RunConfig) -> int:
    """Run until SIGINT/SIGTERM (exit 0) or until the tunnel drops (exit 1)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = Runner(config)
    try:
        await runner.start()
        print(f"shuttled: tunnel to {config.target.remote} is up "
              f"({runner.session.mode} mode); Ctrl-C to stop", flush=True)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([stopper, runner.session.closed],
                           return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if runner.session.closed.done():
            raise ShuttledError(f"tunnel lost: {runner.session.closed.result()}")
        return 0
    finally:
        await runner.stop()
