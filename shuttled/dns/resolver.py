"""One profile's resolver: the forwarder, where it listens, and how queries reach it.

Three ways in, picked once when the profile first connects:

- `all`: the firewall catches every port-53 packet (any destination, UDP and
  TCP) for the listener on 127.0.0.1/::1; every name goes through the tunnel.
- `split` with systemd-resolved in our network namespace: a link of our own
  whose DNS server is our listener and whose routing domains are the profile's
  names (dns.resolved); the firewall catches no DNS at all.
- `split` without it: the firewall catches port 53 to the resolvers of
  /etc/resolv.conf; our names go through the tunnel, the rest to those same
  resolvers from sockets carrying DNS_BYPASS_MARK, for which the capture
  chains return first.

The names are refreshed on each (re)connect (auto_nets give reverse zones,
remote_hosts gives host names); the forwarder and listener live as long as the
tunnel is wanted, so a reconnect changes nothing a client sees.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shuttled import const
from shuttled.control.schema import DnsStatus
from shuttled.dns.cache import DnsCache
from shuttled.dns.datagram import DatagramMux
from shuttled.dns.forwarder import DnsForwarder, DnsPeers
from shuttled.dns.listeners import DnsListener
from shuttled.dns.local import LocalUpstream
from shuttled.dns.resolvconf import parse_resolv_conf
from shuttled.dns.resolved import DnsLink, Resolved, ResolvedError, create_link, delete_link
from shuttled.dns.routing import HostsTable, SplitRoutes
from shuttled.dns.upstream import Opener
from shuttled.errors import ShuttledError, UsageError
from shuttled.net import IPAddress, IPNetwork
from shuttled.tunnel.faults import Faults

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")
Nameservers = Callable[[], Awaitable[list[str]]]


@dataclass(frozen=True)
class DnsPlan:
    """A profile's DNS settings as the supervisor hands them over."""

    mode: str  # "all" or "split" (remote_hosts alone is a split without domains)
    domains: tuple[str, ...] = ()
    capture: tuple[str, ...] = ()  # resolvers whose port 53 we catch; () = resolv.conf
    upstream: tuple[str, ...] = ()  # the remote's resolvers; () = its resolv.conf
    listen: tuple[str, ...] = ("127.0.0.1", "::1")
    use_resolved: bool = True

    def held(self) -> DnsCapture:
        """The DNS a kill switch must refuse before our listener exists (the first
        connect): what the capture will catch, with no port to send it to."""
        every = self.mode == "all" and not self.capture
        if every:
            return DnsCapture(every_server=True)
        try:
            local = list(self.capture) or parse_resolv_conf(RESOLV_CONF.read_text())
        except OSError:
            local = []
        return DnsCapture(servers=tuple(ipaddress.ip_address(a) for a in local))


@dataclass(frozen=True)
class DnsCapture:
    """What the profile's capture chain must do for DNS (fields of firewall.Capture)."""

    port: int | None = None
    servers: tuple[IPAddress, ...] = ()
    every_server: bool = False
    bypass_mark: int | None = None


class ProfileResolver:
    def __init__(
        self,
        name: str,
        owner: str,
        plan: DnsPlan,
        opener: Opener,
        peers: DnsPeers | None = None,
        fault_log: Faults | None = None,
        datagrams: DatagramMux | None = None,
    ) -> None:
        self.name = name
        self.faults = fault_log if fault_log is not None else Faults()
        self.owner = owner  # the firewall table: names our link, decides its cleanup
        self.plan = plan
        self.forwarder: DnsForwarder | None = None
        self.path = ""  # "firewall" or "resolved", once started
        self._opener = opener
        self._datagrams = datagrams  # the helper's UDP, for nameservers closed to TCP
        self._peers = peers
        self._listener: DnsListener | None = None
        self._link: DnsLink | None = None  # the resolved path's link
        self._watch: Resolved | None = None  # told when resolved restarts
        self._local: list[str] = []
        self._capture = DnsCapture()
        self._routes = SplitRoutes(everything=plan.mode == "all", domains=plan.domains)
        self._hosts: HostsTable | None = None

    async def start(self, nameservers: Nameservers) -> DnsCapture:
        """Everything but the names; once per tunnel (later calls return the same)."""
        if self.forwarder is not None:
            return self._capture
        upstream = list(self.plan.upstream) or await nameservers()
        try:
            capture = await self._try_resolved(upstream)
            self._capture = capture or await self._start_firewall(upstream)
        except BaseException:
            await self.close()
            raise
        return self._capture

    async def _try_resolved(self, upstream: Sequence[str]) -> DnsCapture | None:
        """The resolved path where it is usable; None (all undone) where it is not."""
        if self.plan.mode != "split" or not self.plan.use_resolved:
            return None
        resolved = await Resolved.connect()
        if resolved is None:
            return None
        try:
            capture = await self._start_resolved(resolved, upstream)
            await resolved.watch_restarts(self._resolved_restarted)
        except (ResolvedError, OSError, TimeoutError) as exc:
            log.warning(
                "split DNS through systemd-resolved failed (%s): catching DNS in the "
                "firewall instead",
                exc,
            )
            resolved.close()
            await self.close()
            return None
        self._watch = resolved  # its bus connection stays open, for the signal
        return capture

    async def _resolved_restarted(self) -> None:
        if self._link is None:
            return
        log.info("systemd-resolved restarted: configuring link %s again", self._link.name)
        try:
            await self._reconfigure(self._link)
        except ShuttledError as exc:
            log.warning("%s", exc)

    def _forwarder(self, upstream: Sequence[str], local: LocalUpstream | None) -> DnsForwarder:
        forwarder = DnsForwarder(
            self._opener,
            upstream,
            local=local,
            cache=DnsCache(),
            peers=self._peers,
            datagrams=self._datagrams,
        )
        forwarder.set_routes(self._forwarder_routes(), self._hosts)
        if self._peers is not None:
            self._peers.add(self.name, forwarder)
        self.forwarder = forwarder
        return forwarder

    async def _start_firewall(self, upstream: Sequence[str]) -> DnsCapture:
        self.path = "firewall"
        self._local = list(self.plan.capture) or parse_resolv_conf(RESOLV_CONF.read_text())
        split = self.plan.mode == "split"
        if not self._local and (split or self.plan.capture):
            raise UsageError("DNS capture: no nameserver in /etc/resolv.conf")
        local = LocalUpstream(self._local, mark=const.DNS_BYPASS_MARK) if split else None
        self._listener = DnsListener(self._forwarder(upstream, local), self.faults)
        port = await self._listener.start(self.plan.listen)
        every = self.plan.mode == "all" and not self.plan.capture
        log.info(
            "DNS (%s): %s answered %s",
            self.plan.mode,
            "every port-53 query" if every else "queries to " + ", ".join(self._local),
            f"by {', '.join(upstream)} through the tunnel"
            + (", other names by the same resolvers" if split else ""),
        )
        return DnsCapture(
            port,
            tuple(ipaddress.ip_address(a) for a in self._local),
            every,
            const.DNS_BYPASS_MARK if split else None,
        )

    async def _start_resolved(self, resolved: Resolved, upstream: Sequence[str]) -> DnsCapture:
        self.path = "resolved"
        self._link = await create_link(self.name, self.owner)
        self._listener = DnsListener(self._forwarder(upstream, None), self.faults)
        await self._listener.start([str(self._link.address)], const.DNS_PORT)
        await resolved.configure(self._link, self._routes.routing_domains())
        log.info(
            "DNS (split): systemd-resolved sends %s to link %s (%s), answered by %s "
            "through the tunnel",
            ", ".join(self._routes.routing_domains()) or "nothing",
            self._link.name,
            self._link.address,
            ", ".join(upstream),
        )
        return DnsCapture()

    async def refresh(
        self,
        networks: Sequence[IPNetwork],
        hosts: Mapping[str, Sequence[IPAddress]] | None,
        pinned: Mapping[str, Sequence[IPAddress]] | None = None,
    ) -> None:
        """The names of this connection: domains, reverse zones of networks, host names.

        `pinned` names (the ssh server's) are answered here when they are the tunnel's:
        a reconnect must resolve the server while the tunnel is down (mode all).
        """
        claimed = SplitRoutes(everything=self.plan.mode == "all", domains=self.plan.domains)
        table = {n: a for n, a in (pinned or {}).items() if claimed.claims(n)}
        table |= dict(hosts or {})
        self._hosts = HostsTable(table) if table else None
        routes = SplitRoutes(
            everything=self.plan.mode == "all",
            domains=self.plan.domains,
            networks=tuple(networks),
            names=self._hosts.names() if self._hosts else frozenset(),
        )
        self._routes = routes
        if self.forwarder is not None:
            self.forwarder.set_routes(self._forwarder_routes(), self._hosts)
            self.forwarder.new_session()  # a reconnect: maybe another remote's resolvers
        if self._link is not None:
            await self._reconfigure(self._link)

    async def _reconfigure(self, link: DnsLink) -> None:
        # All of it again on every connect, on a new bus connection: a resolved (or
        # bus) restarted meanwhile has forgotten the link's settings.
        resolved = await Resolved.connect()
        if resolved is None:
            log.warning("systemd-resolved is gone: link %s keeps its old settings", link.name)
            return
        try:
            await resolved.configure(link, self._routes.routing_domains())
        except (ResolvedError, TimeoutError) as exc:
            raise ShuttledError(f"systemd-resolved: {exc}") from None
        finally:
            resolved.close()

    def _forwarder_routes(self) -> SplitRoutes | None:
        # None: every name goes through the tunnel, and other profiles' forwarders
        # never see this one claim theirs (mode all is refused next to any other).
        return None if self.plan.mode == "all" else self._routes

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._link is not None:
            resolved = await Resolved.connect()
            if resolved is not None:
                await resolved.revert(self._link)
                resolved.close()
            await delete_link(self._link.name)  # resolved forgets a link that goes away
            self._link = None
        self.path = ""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.forwarder is not None:
            if self._peers is not None:
                self._peers.remove(self.name, self.forwarder)
            self.forwarder.close()
            self.forwarder = None

    def status(self) -> DnsStatus:
        info: DnsStatus = {
            "mode": self.plan.mode,
            "path": self.path or None,
            "domains": self._routes.routing_domains(),
        }
        if self._link is not None:
            info |= {"link": self._link.name, "server": str(self._link.address)}
        elif self.path == "firewall":
            info["resolvers"] = list(self._local) or "all"
        if self.forwarder is not None:
            info["nameservers"] = self.forwarder.nameservers()
        return info

    def problem(self) -> str | None:
        """Why DNS through the tunnel answers nothing, in one line; None while it works."""
        problem = self.forwarder.problem() if self.forwarder is not None else None
        return f"DNS: no nameserver answers: {problem}" if problem else None
