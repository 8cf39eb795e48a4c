"""Split DNS in the forwarder: routes, the cache, the remote's hosts, the local upstream."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shuttled.dns import wire
from shuttled.dns.cache import DnsCache, cache_lifetime
from shuttled.dns.forwarder import DnsForwarder, DnsPeers, DnsStats
from shuttled.dns.local import LocalUpstream
from shuttled.dns.routing import HostsTable, SplitRoutes, reverse_zones
from shuttled.dns.wire import FLAG_QR, FLAG_RA, FLAG_TC, Rcode
from tests.helpers import run_async
from tests.unit.dns_fakes import (
    BODY_TIMEOUT,
    FakeServer,
    direct,
    make_answer,
    make_query,
    qname,
)

TYPE_A, TYPE_NS, TYPE_SOA, TYPE_PTR, TYPE_MX, TYPE_AAAA, TYPE_OPT = 1, 2, 6, 12, 15, 28, 41
RCODE_NXDOMAIN = 3


def rcode(message: bytes) -> int:
    return wire.parse_header(message).flags & 0xF


def ttls(message: bytes) -> list[int]:
    from shuttled.dns.cache import _records

    return [r.ttl for r in _records(message)]


def answer_with(
    query: bytes, ttl: int, *, rcode_: int = 0, flags: int = 0, extra: bytes = b"", records: int = 1
) -> bytes:
    ident, qflags = struct.unpack_from(">HH", query)
    _, end = wire.read_questions(query)
    record = b"\xc0\x0c" + struct.pack(">HHIH", TYPE_A, 1, ttl, 4) + bytes([10, 0, 0, 1])
    header = struct.pack(
        ">6H", ident, qflags | FLAG_QR | FLAG_RA | flags | rcode_, 1, records, 0, 1 if extra else 0
    )
    return header + query[12:end] + record * records + extra


def soa_answer(query: bytes, ttl: int, minimum: int) -> bytes:
    """NXDOMAIN with an SOA in the authority section (RFC 2308)."""
    ident, qflags = struct.unpack_from(">HH", query)
    _, end = wire.read_questions(query)
    rdata = b"\x02ns\xc0\x0c" + b"\x04host\xc0\x0c" + struct.pack(">5I", 1, 2, 3, 4, minimum)
    soa = b"\xc0\x0c" + struct.pack(">HHIH", TYPE_SOA, 1, ttl, len(rdata)) + rdata
    header = struct.pack(">6H", ident, qflags | FLAG_QR | FLAG_RA | RCODE_NXDOMAIN, 1, 0, 1, 0)
    return header + query[12:end] + soa


OPT_DO = b"\0" + struct.pack(">HHIH", TYPE_OPT, 1232, 0x8000, 0)
OPT = b"\0" + struct.pack(">HHIH", TYPE_OPT, 1232, 0, 0)


def with_opt(query: bytes, opt: bytes) -> bytes:
    header = bytearray(query[:12])
    struct.pack_into(">H", header, 10, 1)
    return bytes(header) + query[12:] + opt


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the cache ---------------------------------------------------------------------------


def test_cache_hit_has_the_askers_id_and_aged_ttls() -> None:
    clock = Clock()
    cache = DnsCache(clock=clock)
    query = make_query("www.example", ident=1)
    assert cache.put(query, answer_with(query, 120))
    clock.now += 30.7
    hit = cache.get(make_query("www.example", ident=2))
    assert hit is not None and wire.query_id(hit) == 2 and ttls(hit) == [90]


def test_cache_entry_expires_with_its_ttl() -> None:
    clock = Clock()
    cache = DnsCache(clock=clock)
    query = make_query("short.example")
    cache.put(query, answer_with(query, 5))
    clock.now += 4.9
    assert cache.get(query) is not None
    clock.now += 0.2
    assert cache.get(query) is None and len(cache) == 0


def test_cache_is_short_whatever_the_ttl() -> None:
    clock = Clock()
    cache = DnsCache(clock=clock, max_ttl=300)
    query = make_query("long.example")
    cache.put(query, answer_with(query, 86400))
    clock.now += 301
    assert cache.get(query) is None


def test_negative_answer_lives_for_the_soa_minimum() -> None:
    query = make_query("nope.example")
    assert cache_lifetime(soa_answer(query, ttl=3600, minimum=60)) == 60
    assert cache_lifetime(soa_answer(query, ttl=30, minimum=600)) == 30


@pytest.mark.parametrize(
    "why,reply",
    [
        ("servfail", lambda q: answer_with(q, 60, rcode_=Rcode.SERVFAIL)),
        ("refused", lambda q: answer_with(q, 60, rcode_=Rcode.REFUSED)),
        ("truncated", lambda q: answer_with(q, 60, flags=FLAG_TC)),
        ("ttl zero", lambda q: answer_with(q, 0)),
        ("no records", lambda q: answer_with(q, 60, records=0)),
        ("other question", lambda q: answer_with(make_query("other.example"), 60)),
        ("garbage", lambda q: q[:20]),
    ],
)
def test_what_is_never_cached(why: str, reply: Any) -> None:
    cache = DnsCache()
    query = make_query("q.example")
    assert not cache.put(query, reply(query)), why
    assert cache.get(query) is None


def test_cache_key_tells_edns_and_do_apart() -> None:
    cache = DnsCache()
    plain, edns, dnssec = (
        make_query("k.example"),
        with_opt(make_query("k.example"), OPT),
        with_opt(make_query("k.example"), OPT_DO),
    )
    cache.put(dnssec, answer_with(dnssec, 60, extra=OPT_DO))
    assert cache.get(plain) is None and cache.get(edns) is None
    assert cache.get(dnssec) is not None


def test_cache_gives_back_the_askers_spelling_and_leaves_opt_alone() -> None:
    cache = DnsCache()
    query = with_opt(make_query("MiXeD.Example"), OPT_DO)
    cache.put(query, answer_with(query, 60, extra=OPT_DO))
    hit = cache.get(with_opt(make_query("mixed.EXAMPLE"), OPT_DO))
    assert hit is not None and qname(hit) == "mixed.EXAMPLE"
    assert ttls(hit)[-1] == 0x8000  # the OPT record's flags, not a TTL


def test_cache_bounded_in_entries_least_recently_used_first() -> None:
    cache = DnsCache(entries=3)
    queries = [make_query(f"n{i}.example") for i in range(4)]
    for query in queries[:3]:
        cache.put(query, answer_with(query, 60))
    cache.get(queries[0])  # now the most recently used
    cache.put(queries[3], answer_with(queries[3], 60))
    assert len(cache) == 3
    assert cache.get(queries[1]) is None and cache.get(queries[0]) is not None


def test_cache_bounded_in_bytes() -> None:
    cache = DnsCache(max_bytes=8 * 200)
    for i in range(50):
        query = make_query(f"b{i}.example")
        cache.put(query, answer_with(query, 60, records=4))
    assert 0 < cache.size_bytes <= 8 * 200


@settings(max_examples=300)
@given(st.binary(max_size=600), st.binary(max_size=600))
def test_fuzz_cache_never_raises(query: bytes, reply: bytes) -> None:
    cache = DnsCache()
    cache.put(query, reply)
    cache.get(query)


# --- routes and reverse zones ---------------------------------------------------------------


def test_routes_claim_names_under_domains_only_at_label_boundaries() -> None:
    routes = SplitRoutes(domains=("corp.example",))
    assert routes.claims("corp.example") and routes.claims("www.CORP.example.")
    assert not routes.claims("xcorp.example") and not routes.claims("example")


def test_routes_claim_reverse_names_inside_their_networks() -> None:
    routes = SplitRoutes(
        networks=(ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00:1::/32"))
    )
    assert routes.claims("4.3.1.10.in-addr.arpa")
    assert routes.claims("1.10.in-addr.arpa")  # the zone itself
    assert not routes.claims("10.in-addr.arpa")  # wider than the network
    assert not routes.claims("4.3.2.10.in-addr.arpa")
    assert routes.claims(ipaddress.ip_address("fd00:1::5").reverse_pointer)
    assert not routes.claims(ipaddress.ip_address("fd00:2::5").reverse_pointer)


def test_routes_claim_exact_host_names_and_everything_in_mode_all() -> None:
    routes = SplitRoutes(names=frozenset({"build01"}))
    assert routes.claims("BUILD01") and not routes.claims("x.build01")
    assert SplitRoutes(everything=True).claims("anything.at.all")


def test_routing_domains_for_resolved() -> None:
    routes = SplitRoutes(
        domains=("corp.example",),
        networks=(ipaddress.ip_network("172.16.0.0/12"),),
        names=frozenset({"build01"}),
    )
    domains = routes.routing_domains()
    assert domains[0] == "corp.example" and domains[-1] == "build01"
    assert "16.172.in-addr.arpa" in domains and "31.172.in-addr.arpa" in domains
    assert len(domains) == 18


def test_reverse_zones_widen_instead_of_listing_too_many() -> None:
    assert reverse_zones(ipaddress.ip_network("10.1.2.0/25")) == ["2.1.10.in-addr.arpa"]
    assert reverse_zones(ipaddress.ip_network("128.0.0.0/1")) == ["in-addr.arpa"]
    assert reverse_zones(ipaddress.ip_network("fc00::/7")) == ["c.f.ip6.arpa", "d.f.ip6.arpa"]


# --- the remote's hosts -------------------------------------------------------------------------

HOSTS = HostsTable(
    {
        "build01.corp.example": [ipaddress.ip_address("10.20.0.11")],
        "build01": [ipaddress.ip_address("10.20.0.11")],
        "v6only": [ipaddress.ip_address("fd00::11")],
    },
    ttl=45,
)


def ask_hosts(name: str, qtype: int) -> bytes | None:
    query = make_query(name, ident=9, qtype=qtype)
    return HOSTS.answer(query, wire.read_questions(query)[0])


def test_hosts_answer_a_aaaa_and_ptr() -> None:
    reply = ask_hosts("Build01.corp.example", TYPE_A)
    assert reply is not None and wire.query_id(reply) == 9
    assert reply.endswith(bytes([10, 20, 0, 11])) and ttls(reply) == [45]
    six = ask_hosts("v6only", TYPE_AAAA)
    assert six is not None and six.endswith(ipaddress.ip_address("fd00::11").packed)
    ptr = ask_hosts("11.0.20.10.in-addr.arpa", TYPE_PTR)
    assert ptr is not None and ptr.endswith(b"\x07build01\x04corp\x07example\x00")


def test_hosts_known_name_without_that_family_is_nodata_not_a_trip() -> None:
    reply = ask_hosts("v6only", TYPE_A)
    assert reply is not None and rcode(reply) == 0 and wire.parse_header(reply).ancount == 0


def test_hosts_other_types_and_names_are_not_theirs() -> None:
    assert ask_hosts("build01", TYPE_MX) is None
    assert ask_hosts("build03", TYPE_A) is None


# --- a local resolver (UDP and TCP on one port) -------------------------------------------------


class LocalServer(asyncio.DatagramProtocol):
    """The machine's original resolver: UDP, with TCP on the same port for truncated answers."""

    def __init__(
        self, *, truncate: bool = False, silent: bool = False, spoof_first: bool = False
    ) -> None:
        self.truncate, self.silent, self.spoof_first = truncate, silent, spoof_first
        self.udp: list[bytes] = []
        self.tcp: list[bytes] = []
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> LocalServer:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # a free UDP port may be some other program's TCP port
            transport, _ = await loop.create_datagram_endpoint(
                lambda: self, local_addr=("127.0.0.1", 0)
            )
            self.port = transport.get_extra_info("sockname")[1]
            try:
                self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            except OSError:
                transport.close()
                continue
            self._transport = transport  # type: ignore[assignment]
            return self
        raise OSError("no port free for both UDP and TCP")

    async def __aexit__(self, *exc: object) -> None:
        assert self._transport is not None and self._server is not None
        self._transport.close()
        self._server.close()

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1@{self.port}"

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.udp.append(data)
        if self.silent or self._transport is None:
            return
        if self.spoof_first:
            self._transport.sendto(wire.with_id(make_answer(data), wire.query_id(data) ^ 1), addr)
        reply = answer_with(data, 60, flags=FLAG_TC if self.truncate else 0)
        self._transport.sendto(reply, addr)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        query = await wire.read_frame(reader)
        if query is not None:
            self.tcp.append(query)
            writer.write(wire.frame(answer_with(query, 60, records=3)))
        writer.close()


def test_local_upstream_udp_then_tcp_when_truncated() -> None:
    async def main() -> None:
        async with LocalServer(truncate=True) as local:
            upstream = LocalUpstream([local.nameserver], mark=None)
            loop = asyncio.get_running_loop()
            reply = await upstream.query(make_query("big.example", ident=7), loop.time() + 2)
        assert wire.query_id(reply) == 7 and wire.parse_header(reply).ancount == 3
        assert len(local.udp) == 1 and len(local.tcp) == 1
        assert wire.query_id(local.udp[0]) != 7 or wire.query_id(local.tcp[0]) != 7  # fresh ids

    run_async(main(), BODY_TIMEOUT)


def test_local_upstream_ignores_a_reply_with_the_wrong_id() -> None:
    async def main() -> None:
        async with LocalServer(spoof_first=True) as local:
            upstream = LocalUpstream([local.nameserver], mark=None)
            loop = asyncio.get_running_loop()
            reply = await upstream.query(make_query("s.example", ident=3), loop.time() + 2)
        assert wire.query_id(reply) == 3 and wire.parse_header(reply).ancount == 1

    run_async(main(), BODY_TIMEOUT)


def test_local_upstream_fails_over_from_a_silent_resolver() -> None:
    async def main() -> None:
        async with LocalServer(silent=True) as mute, LocalServer() as good:
            upstream = LocalUpstream([mute.nameserver, good.nameserver], mark=None)
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            reply = await upstream.query(make_query("f.example"), loop.time() + 1.0)
            assert time.monotonic() - started < 1.0
        assert wire.parse_header(reply).ancount == 1 and len(mute.udp) == 1

    run_async(main(), BODY_TIMEOUT)


# --- the forwarder, split -------------------------------------------------------------------------


async def split_forwarder(server: FakeServer, local: LocalServer, **kw: Any) -> DnsForwarder:
    return DnsForwarder(
        direct,
        [server.nameserver],
        routes=SplitRoutes(domains=("corp.example",)),
        local=LocalUpstream([local.nameserver], mark=None),
        **kw,
    )


def test_split_private_names_through_the_tunnel_the_rest_local() -> None:
    async def main() -> None:
        async with FakeServer() as tunnel, LocalServer() as local:
            forwarder = await split_forwarder(tunnel, local)
            private = await forwarder.resolve(make_query("www.corp.example", ident=1))
            public = await forwarder.resolve(make_query("www.public.example", ident=2))
            forwarder.close()
        assert qname(private) == "www.corp.example" and qname(public) == "www.public.example"
        assert [qname(q) for q in tunnel.received] == ["www.corp.example"]
        assert [qname(q) for q in local.udp] == ["www.public.example"]
        assert forwarder.stats == DnsStats(queries=2, answered=2, tunnel=1, local=1)

    run_async(main(), BODY_TIMEOUT)


def test_repeated_query_comes_from_the_cache() -> None:
    async def main() -> None:
        async with FakeServer() as tunnel, LocalServer() as local:
            forwarder = await split_forwarder(tunnel, local, cache=DnsCache())
            for ident in (1, 2, 3):
                reply = await forwarder.resolve(make_query("www.corp.example", ident=ident))
                assert wire.query_id(reply) == ident
            await forwarder.resolve(make_query("pub.example"))
            await forwarder.resolve(make_query("pub.example"))
            forwarder.close()
        assert len(tunnel.received) == 1 and len(local.udp) == 1
        assert forwarder.stats.cache_hits == 3 and forwarder.stats.answered == 5

    run_async(main(), BODY_TIMEOUT)


def test_new_routes_empty_the_cache() -> None:
    async def main() -> None:
        async with FakeServer() as tunnel, LocalServer() as local:
            forwarder = await split_forwarder(tunnel, local, cache=DnsCache())
            await forwarder.resolve(make_query("a.other.example"))
            forwarder.set_routes(SplitRoutes(domains=("other.example",)))
            await forwarder.resolve(make_query("a.other.example"))
            forwarder.close()
        assert len(local.udp) == 1 and len(tunnel.received) == 1

    run_async(main(), BODY_TIMEOUT)


def test_remote_hosts_answered_without_asking_anyone() -> None:
    async def main() -> None:
        async with FakeServer() as tunnel, LocalServer() as local:
            forwarder = await split_forwarder(tunnel, local)
            forwarder.set_routes(forwarder.routes, HOSTS)
            reply = await forwarder.resolve(make_query("build01", ident=4))
            forwarder.close()
        assert reply.endswith(bytes([10, 20, 0, 11])) and not tunnel.received and not local.udp
        assert forwarder.stats == DnsStats(queries=1, answered=1, hosts=1)

    run_async(main(), BODY_TIMEOUT)


def test_unclaimed_name_without_a_local_upstream_is_refused() -> None:
    async def main() -> None:
        async with FakeServer() as tunnel:
            forwarder = DnsForwarder(
                direct, [tunnel.nameserver], routes=SplitRoutes(domains=("corp.example",))
            )
            reply = await forwarder.resolve(make_query("elsewhere.example"))
            forwarder.close()
        assert rcode(reply) == Rcode.REFUSED and not tunnel.received

    run_async(main(), BODY_TIMEOUT)


def test_silent_local_resolver_servfail_within_the_timeout() -> None:
    async def main() -> None:
        async with FakeServer() as tunnel, LocalServer(silent=True) as local:
            forwarder = await split_forwarder(tunnel, local, timeout=0.5)
            started = time.monotonic()
            reply = await forwarder.resolve(make_query("pub.example"))
            elapsed = time.monotonic() - started
            forwarder.close()
        assert rcode(reply) == Rcode.SERVFAIL and elapsed < 0.5 + 0.3
        assert forwarder.stats.timeouts == 1

    run_async(main(), BODY_TIMEOUT)


def test_peer_profiles_answer_each_others_names() -> None:
    async def main() -> None:
        async with FakeServer() as tunnel_a, FakeServer() as tunnel_b, LocalServer() as local:
            peers = DnsPeers()
            a = DnsForwarder(
                direct,
                [tunnel_a.nameserver],
                peers=peers,
                routes=SplitRoutes(domains=("a.example",)),
                local=LocalUpstream([local.nameserver], mark=None),
            )
            b = DnsForwarder(
                direct,
                [tunnel_b.nameserver],
                peers=peers,
                routes=SplitRoutes(domains=("b.example",)),
                local=LocalUpstream([local.nameserver], mark=None),
            )
            peers.add("a", a)
            peers.add("b", b)
            # Everything reaches a (its capture chain is first): b's names go to b.
            for name in ("x.a.example", "x.b.example", "x.c.example"):
                assert qname(await a.resolve(make_query(name))) == name
            peers.remove("b", b)
            gone = await a.resolve(make_query("y.b.example"))
            a.close()
            b.close()
        assert [qname(q) for q in tunnel_a.received] == ["x.a.example"]
        assert [qname(q) for q in tunnel_b.received] == ["x.b.example"]
        assert [qname(q) for q in local.udp] == ["x.c.example", "y.b.example"]
        assert a.stats.peer == 1 and b.stats.tunnel == 1 and rcode(gone) == 0

    run_async(main(), BODY_TIMEOUT)
