"""DNS forwarding and listeners, against fake DNS-over-TCP servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shuttled.const import DNS_TIMEOUT
from shuttled.dns import resolvconf, wire
from shuttled.dns.forwarder import DnsForwarder, DnsStats
from shuttled.dns.listeners import DnsListener
from shuttled.dns.wire import FLAG_QR, FLAG_RA, FLAG_RD, FLAG_TC, DnsMessageError, Rcode
from tests.helpers import run_async
from tests.unit.dns_fakes import (
    BODY_TIMEOUT,
    TYPE_TXT,
    FakeServer,
    direct,
    encode_name,
    make_answer,
    make_query,
    qname,
)

SLACK = 0.5


class CountingOpener:
    def __init__(self) -> None:
        self.calls: list[int] = []

    async def __call__(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.calls.append(port)
        return await asyncio.open_connection(host, port)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


# --- message helpers ----------------------------------------------------------------


def test_header_and_id() -> None:
    query = make_query("example.com", ident=0xBEEF)
    header = wire.check_query(query)
    assert (header.ident, header.qdcount, header.arcount) == (0xBEEF, 1, 0)
    assert wire.query_id(wire.with_id(query, 7)) == 7
    with pytest.raises(DnsMessageError):
        wire.check_query(query[:11])
    with pytest.raises(DnsMessageError):
        wire.check_query(make_answer(query))


def test_read_name_plain_and_compressed() -> None:
    message = b"\0" * 12 + encode_name("www.Example.com") + b"\x04mail\xc0\x10" + b"\xc0\x0c"
    assert wire.read_name(message, 12) == ("www.Example.com", 29)
    assert wire.read_name(message, 29) == ("mail.Example.com", 36)
    assert wire.read_name(message, 36) == ("www.Example.com", 38)
    assert wire.read_name(b"\0" * 12 + b"\0", 12) == (".", 13)


def test_read_name_escapes_odd_bytes() -> None:
    message = b"\0" * 12 + b"\x04a.b\\\x02\x00\xff\0"
    assert wire.read_name(message, 12)[0] == "a\\.b\\\\.\\000\\255"


@pytest.mark.parametrize(
    "tail",
    [
        b"\xc0\x0c",  # points at itself
        b"\x01a\xc0\x0c",  # points back at its own start
        b"\xc0\x0e\x01a\0",  # points forwards
        b"\x01a\xc0",  # pointer cut short
        b"\x05ab",  # label cut short
        b"\x41abc\0",  # reserved label type
        (b"\x3f" + b"a" * 63) * 4 + b"\0",  # 257 bytes: longer than a name may be
    ],
)
def test_read_name_rejects(tail: bytes) -> None:
    with pytest.raises(DnsMessageError):
        wire.read_name(b"\0" * 12 + tail, 12)


def test_pointer_chain_must_decrease() -> None:
    # name at 12 -> pointer to 14 -> label then pointer back to 14: a loop
    message = b"\0" * 12 + b"\x01a\x01b\xc0\x0e"
    with pytest.raises(DnsMessageError):
        wire.read_name(message, 12 + 2)


def test_error_response_copies_id_and_question() -> None:
    query = make_query("host.corp.example", ident=0x0A0B)
    reply = wire.error_response(query, Rcode.SERVFAIL)
    header = wire.parse_header(reply)
    assert header.ident == 0x0A0B
    assert header.flags == FLAG_QR | FLAG_RD | FLAG_RA | Rcode.SERVFAIL
    assert (header.qdcount, header.ancount, header.nscount, header.arcount) == (1, 0, 0, 0)
    assert wire.question_keys(reply) == wire.question_keys(query)
    broken = wire.error_response(query[:20], Rcode.FORMERR)
    assert wire.parse_header(broken).qdcount == 0 and len(broken) == 12


def test_udp_payload_limit_and_truncate() -> None:
    assert wire.udp_payload_limit(make_query("a.example")) == 512
    assert wire.udp_payload_limit(make_query("a.example", edns=4096)) == 4096
    assert wire.udp_payload_limit(make_query("a.example", edns=100)) == 512
    assert wire.udp_payload_limit(make_query("a.example", edns=65535)) == wire.UDP_MAX_PAYLOAD
    big = make_answer(make_query("a.example"), size=3000)
    assert wire.truncate(big, 4096) == big
    short = wire.truncate(big, 512)
    assert wire.parse_header(short).flags & FLAG_TC
    assert wire.question_keys(short) == wire.question_keys(big)
    assert wire.parse_header(wire.truncate(big, 12)).qdcount == 0


def test_frame_limit() -> None:
    assert wire.frame(b"abc") == b"\0\x03abc"
    with pytest.raises(DnsMessageError):
        wire.frame(b"x" * 0x10000)


def test_parse_resolv_conf() -> None:
    text = """# generated
; comment
nameserver 10.0.0.2
nameserver   192.168.1.1   # trailing comment
nameserver 10.0.0.2
nameserver 2001:db8::53
nameserver fe80::1%eth0
nameserver fe80::2
nameserver fd00::1%eth1
nameserver ::ffff:172.16.0.1
nameserver 0.0.0.0
nameserver ff02::fb
nameserver 169.254.169.253
nameserver not-an-address
nameserver
#nameserver 1.1.1.1
search corp.example
options edns0 trust-ad\r
nameserver 127.0.0.53\r
"""
    assert resolvconf.parse_resolv_conf(text) == [
        "10.0.0.2",
        "192.168.1.1",
        "2001:db8::53",
        "fd00::1",
        "172.16.0.1",
        "169.254.169.253",
        "127.0.0.53",
    ]
    assert resolvconf.parse_resolv_conf("") == []


def test_parse_nameserver() -> None:
    assert resolvconf.parse_nameserver("10.0.0.53") == ("10.0.0.53", 53)
    assert resolvconf.parse_nameserver("10.0.0.53@5353") == ("10.0.0.53", 5353)
    assert resolvconf.parse_nameserver("2001:DB8::1@53") == ("2001:db8::1", 53)
    for bad in ("dns.example", "10.0.0.1@", "10.0.0.1@0", "10.0.0.1@65536", "10.0.0.1@x"):
        with pytest.raises(ValueError):
            resolvconf.parse_nameserver(bad)
    with pytest.raises(ValueError):
        DnsForwarder(direct, [])


# --- fuzzing ----------------------------------------------------------------------------


def _only_own_errors(call: Callable[[], object]) -> None:
    with contextlib.suppress(DnsMessageError):
        call()


@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _only_own_errors(lambda: wire.read_questions(data))
    _only_own_errors(lambda: wire.question_keys(data))
    _only_own_errors(lambda: wire.error_response(data, Rcode.SERVFAIL))
    _only_own_errors(lambda: wire.truncate(data, 512))
    assert wire.udp_payload_limit(data) >= 512


@given(
    st.tuples(*(st.integers(0, 4) for _ in range(4))),
    st.binary(max_size=300),
    st.integers(0, 320),
)
def test_fuzz_header_with_random_sections(
    counts: tuple[int, int, int, int], body: bytes, offset: int
) -> None:
    message = struct.pack(">6H", 1, 0, *counts) + body
    _only_own_errors(lambda: wire.read_questions(message))
    _only_own_errors(lambda: wire.read_name(message, offset))
    _only_own_errors(lambda: wire.error_response(message, Rcode.FORMERR))
    assert 512 <= wire.udp_payload_limit(message) <= wire.UDP_MAX_PAYLOAD


@given(st.lists(st.binary(min_size=1, max_size=20), max_size=8))
def test_fuzz_name_round_trip(labels: list[bytes]) -> None:
    encoded = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    name, end = wire.read_name(b"\0" * 12 + encoded, 12)
    assert end == 12 + len(encoded)
    assert unescape(name) == labels


def unescape(name: str) -> list[bytes]:
    """Labels back from the presentation form (RFC 1035 5.1 escapes)."""
    if name == ".":
        return []
    labels, current, i = [], bytearray(), 0
    while i < len(name):
        char = name[i]
        if char == "\\" and name[i + 1].isdigit():
            current.append(int(name[i + 1 : i + 4]))
            i += 4
        elif char == "\\":
            current.append(ord(name[i + 1]))
            i += 2
        elif char == ".":
            labels.append(bytes(current))
            current = bytearray()
            i += 1
        else:
            current.append(ord(char))
            i += 1
    labels.append(bytes(current))
    return labels


# --- the forwarder ------------------------------------------------------------------


def test_pipelined_out_of_order_on_one_connection() -> None:
    async def main() -> None:
        async with FakeServer(delay=lambda index: (10 - index) * 0.03) as server:
            forwarder = DnsForwarder(direct, [server.nameserver])
            queries = [make_query(f"q{i}.example", ident=1000 + i) for i in range(10)]
            replies = await asyncio.gather(*(forwarder.resolve(q) for q in queries))
            forwarder.close()
        assert server.connections == 1
        assert len({wire.query_id(q) for q in server.received}) == 10
        for i, reply in enumerate(replies):
            assert wire.query_id(reply) == 1000 + i
            assert qname(reply) == f"q{i}.example"
            assert wire.parse_header(reply).ancount == 1
        assert forwarder.stats == DnsStats(queries=10, answered=10, tunnel=10)

    run_async(main(), BODY_TIMEOUT)


def test_thousand_concurrent_queries_one_connection() -> None:
    async def main() -> None:
        async with FakeServer(delay=lambda index: (index % 7) * 0.01) as server:
            forwarder = DnsForwarder(direct, [server.nameserver])
            queries = [make_query(f"n{i}.example", ident=i) for i in range(1000)]
            replies = await asyncio.gather(*(forwarder.resolve(q) for q in queries))
            forwarder.close()
        assert [(wire.query_id(r), qname(r)) for r in replies] == [
            (i, f"n{i}.example") for i in range(1000)
        ]
        assert server.connections == 1
        assert forwarder.stats == DnsStats(queries=1000, answered=1000, tunnel=1000)

    run_async(main(), BODY_TIMEOUT)


def test_same_client_id_from_many_clients() -> None:
    async def main() -> None:
        async with FakeServer(delay=lambda index: (5 - index) * 0.02) as server:
            forwarder = DnsForwarder(direct, [server.nameserver])
            queries = [make_query(f"c{i}.example", ident=0x4242) for i in range(5)]
            replies = await asyncio.gather(*(forwarder.resolve(q) for q in queries))
            forwarder.close()
        assert [qname(r) for r in replies] == [f"c{i}.example" for i in range(5)]
        assert all(wire.query_id(r) == 0x4242 for r in replies)

    run_async(main(), BODY_TIMEOUT)


def test_silent_server_servfail_within_timeout() -> None:
    async def main() -> None:
        async with FakeServer(silent=lambda connection: True) as server:
            forwarder = DnsForwarder(direct, [server.nameserver])
            query = make_query("silent.example", ident=77)
            started = time.monotonic()
            reply = await forwarder.resolve(query)
            elapsed = time.monotonic() - started
            forwarder.close()
        assert DNS_TIMEOUT - 0.05 <= elapsed <= DNS_TIMEOUT + SLACK
        header = wire.parse_header(reply)
        assert header.ident == 77 and header.flags & 0xF == Rcode.SERVFAIL
        assert forwarder.stats == DnsStats(queries=1, timeouts=1, tunnel=1)

    run_async(main(), BODY_TIMEOUT)


def test_silent_connection_is_replaced() -> None:
    async def main() -> None:
        async with FakeServer(silent=lambda connection: connection == 1) as server:
            forwarder = DnsForwarder(direct, [server.nameserver], timeout=0.3)
            first = await forwarder.resolve(make_query("a.example"))
            second = await forwarder.resolve(make_query("b.example"))
            forwarder.close()
        assert wire.parse_header(first).flags & 0xF == Rcode.SERVFAIL
        assert wire.parse_header(second).ancount == 1
        assert server.connections == 2

    run_async(main(), BODY_TIMEOUT)


def test_slow_answer_keeps_a_busy_connection() -> None:
    async def main() -> None:
        slow = {0}
        async with FakeServer(delay=lambda index: 5.0 if index in slow else 0.0) as server:
            forwarder = DnsForwarder(direct, [server.nameserver], timeout=0.4)
            slow_reply, fast_reply = await asyncio.gather(
                forwarder.resolve(make_query("slow.example")),
                forwarder.resolve(make_query("fast.example")),
            )
            again = await forwarder.resolve(make_query("again.example"))
            forwarder.close()
        assert wire.parse_header(slow_reply).flags & 0xF == Rcode.SERVFAIL
        assert wire.parse_header(fast_reply).ancount == 1
        assert wire.parse_header(again).ancount == 1
        assert server.connections == 1

    run_async(main(), BODY_TIMEOUT)


def test_dropped_connection_retried_once() -> None:
    async def main() -> None:
        async with FakeServer(
            drop_after=lambda connection: 3 if connection == 1 else None,
            delay=lambda index: 0.05,
        ) as server:
            forwarder = DnsForwarder(direct, [server.nameserver])
            queries = [make_query(f"d{i}.example", ident=i) for i in range(3)]
            started = time.monotonic()
            replies = await asyncio.gather(*(forwarder.resolve(q) for q in queries))
            elapsed = time.monotonic() - started
            forwarder.close()
        assert [qname(r) for r in replies] == ["d0.example", "d1.example", "d2.example"]
        assert all(wire.parse_header(r).ancount == 1 for r in replies)
        assert server.connections == 2 and elapsed < 1.0
        assert forwarder.stats.answered == 3

    run_async(main(), BODY_TIMEOUT)


def test_always_dropping_server_fails_fast() -> None:
    async def main() -> None:
        async with FakeServer(drop_after=lambda connection: 1) as server:
            forwarder = DnsForwarder(direct, [server.nameserver])
            started = time.monotonic()
            reply = await forwarder.resolve(make_query("x.example"))
            elapsed = time.monotonic() - started
            forwarder.close()
        assert wire.parse_header(reply).flags & 0xF == Rcode.SERVFAIL
        assert server.connections == 2 and elapsed < 1.0
        assert forwarder.stats == DnsStats(queries=1, failed=1, tunnel=1)

    run_async(main(), BODY_TIMEOUT)


def test_failover_from_refusing_nameserver_and_preference() -> None:
    async def main() -> None:
        dead = closed_port()
        opener = CountingOpener()
        async with FakeServer() as server:
            forwarder = DnsForwarder(opener, [f"127.0.0.1@{dead}", server.nameserver])
            first = await forwarder.resolve(make_query("one.example"))
            second = await forwarder.resolve(make_query("two.example"))
            forwarder.close()
        assert wire.parse_header(first).ancount == 1
        assert wire.parse_header(second).ancount == 1
        assert opener.calls == [dead, server.port]  # the dead one tried once, not again
        assert forwarder.stats == DnsStats(queries=2, answered=2, tunnel=2)

    run_async(main(), BODY_TIMEOUT)


def test_failover_from_silent_nameserver_within_timeout() -> None:
    async def main() -> None:
        async with (
            FakeServer(silent=lambda connection: True) as mute,
            FakeServer() as good,
        ):
            forwarder = DnsForwarder(direct, [mute.nameserver, good.nameserver], timeout=1.0)
            started = time.monotonic()
            reply = await forwarder.resolve(make_query("failover.example"))
            elapsed = time.monotonic() - started
            forwarder.close()
        assert wire.parse_header(reply).ancount == 1
        assert 0.4 <= elapsed < 1.0
        assert len(mute.received) == 1 and len(good.received) == 1

    run_async(main(), BODY_TIMEOUT)


def test_all_nameservers_refuse() -> None:
    async def main() -> None:
        forwarder = DnsForwarder(direct, [f"127.0.0.1@{closed_port()}", f"::1@{closed_port()}"])
        started = time.monotonic()
        reply = await forwarder.resolve(make_query("none.example", ident=9))
        assert time.monotonic() - started < 1.0
        assert wire.parse_header(reply).flags & 0xF == Rcode.SERVFAIL
        assert wire.query_id(reply) == 9
        assert forwarder.stats == DnsStats(queries=1, failed=1, tunnel=1)
        forwarder.close()

    run_async(main(), BODY_TIMEOUT)


def test_opener_errors_of_any_kind_mean_failover() -> None:
    class Refused(Exception):
        pass

    async def main() -> None:
        async with FakeServer() as server:

            async def opener(
                host: str, port: int
            ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                if port != server.port:
                    raise Refused("channel open refused: administratively prohibited")
                return await asyncio.open_connection(host, port)

            forwarder = DnsForwarder(opener, ["10.9.9.9", server.nameserver])
            reply = await forwarder.resolve(make_query("ok.example"))
            forwarder.close()
        assert wire.parse_header(reply).ancount == 1

    run_async(main(), BODY_TIMEOUT)


def test_garbage_replies_are_dropped() -> None:
    def junk(query: bytes) -> list[bytes]:
        wrong_question = make_answer(make_query("other.example", ident=wire.query_id(query)))
        return [
            b"\x01\x02\x03",
            query,  # QR clear
            wire.with_id(make_answer(query), (wire.query_id(query) + 1) & 0xFFFF),
            wrong_question,
            b"",
        ]

    async def main() -> None:
        async with FakeServer(before_reply=junk) as server:
            forwarder = DnsForwarder(direct, [server.nameserver])
            reply = await forwarder.resolve(make_query("real.example", ident=5))
            forwarder.close()
        assert qname(reply) == "real.example" and wire.query_id(reply) == 5
        assert wire.parse_header(reply).ancount == 1

    run_async(main(), BODY_TIMEOUT)


def test_outstanding_bound() -> None:
    async def main() -> None:
        async with FakeServer(silent=lambda connection: True) as server:
            forwarder = DnsForwarder(direct, [server.nameserver], timeout=0.5, max_outstanding=2)
            held = [asyncio.create_task(forwarder.resolve(make_query(f"h{i}.x"))) for i in range(2)]
            await asyncio.sleep(0.05)
            started = time.monotonic()
            over = await forwarder.resolve(make_query("over.x", ident=3))
            assert time.monotonic() - started < 0.1
            await asyncio.gather(*held)
            forwarder.close()
        assert wire.parse_header(over).flags & 0xF == Rcode.SERVFAIL
        assert forwarder.stats == DnsStats(queries=3, failed=1, timeouts=2, tunnel=2)

    run_async(main(), BODY_TIMEOUT)


def test_malformed_queries() -> None:
    async def main() -> None:
        forwarder = DnsForwarder(direct, ["127.0.0.1"])
        with pytest.raises(DnsMessageError):
            await forwarder.resolve(b"\x00\x01")
        with pytest.raises(DnsMessageError):
            await forwarder.resolve(make_answer(make_query("r.example")))
        broken = make_query("cut.example", ident=11)[:18]
        reply = await forwarder.resolve(broken)
        header = wire.parse_header(reply)
        assert header.ident == 11 and header.flags & 0xF == Rcode.FORMERR
        assert forwarder.stats == DnsStats(queries=1, failed=1)
        forwarder.close()

    run_async(main(), BODY_TIMEOUT)


def test_closed_forwarder_answers_servfail() -> None:
    async def main() -> None:
        forwarder = DnsForwarder(direct, ["127.0.0.1"])
        forwarder.close()
        reply = await forwarder.resolve(make_query("late.example"))
        assert wire.parse_header(reply).flags & 0xF == Rcode.SERVFAIL

    run_async(main(), BODY_TIMEOUT)


def test_close_answers_queries_in_flight_at_once() -> None:
    async def main() -> None:
        async with FakeServer(silent=lambda connection: True) as server:
            forwarder = DnsForwarder(direct, [server.nameserver])
            held = [asyncio.create_task(forwarder.resolve(make_query(f"h{i}.x"))) for i in range(3)]
            await asyncio.sleep(0.05)
            started = time.monotonic()
            forwarder.close()
            replies = await asyncio.gather(*held)
            assert time.monotonic() - started < 0.1
        assert all(wire.parse_header(r).flags & 0xF == Rcode.SERVFAIL for r in replies)
        assert forwarder.stats == DnsStats(queries=3, failed=3, tunnel=3)

    run_async(main(), BODY_TIMEOUT)


# --- listeners ------------------------------------------------------------------------


async def udp_ask(address: str, port: int, query: bytes, timeout: float = 3.0) -> bytes:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_sendto(sock, query, (address, port))
        data, _ = await asyncio.wait_for(loop.sock_recvfrom(sock, 65535), timeout)
        return data


async def tcp_ask(
    address: str, port: int, queries: list[bytes], junk: tuple[bytes, ...] | list[bytes] = ()
) -> list[bytes]:
    """Replies to queries sent pipelined on one connection, after junk that gets none."""
    reader, writer = await asyncio.open_connection(address, port)
    writer.write(b"".join(wire.frame(q) for q in [*junk, *queries]))
    replies = []
    for _ in queries:
        reply = await asyncio.wait_for(wire.read_frame(reader), 3)
        assert reply is not None
        replies.append(reply)
    writer.close()
    return replies


async def listening(server: FakeServer, addresses: list[str]) -> tuple[DnsForwarder, DnsListener]:
    forwarder = DnsForwarder(direct, [server.nameserver])
    listener = DnsListener(forwarder)
    port = await listener.start(addresses)
    assert port == listener.port and port > 0
    return forwarder, listener


def test_udp_listener_large_answer_whole() -> None:
    async def main() -> None:
        async with FakeServer(answer_size=4500) as server:
            forwarder, listener = await listening(server, ["127.0.0.1"])
            query = make_query("big.example", ident=0x5151, qtype=TYPE_TXT, edns=8192)
            reply = await udp_ask("127.0.0.1", listener.port, query)
            listener.close()
            forwarder.close()
        assert len(reply) > 4500
        assert wire.query_id(reply) == 0x5151 and not wire.parse_header(reply).flags & FLAG_TC
        assert reply == wire.with_id(make_answer(server.received[0], 4500), 0x5151)

    run_async(main(), BODY_TIMEOUT)


def test_udp_too_large_sets_tc_then_tcp_gets_it() -> None:
    async def main() -> None:
        async with FakeServer(answer_size=4500) as server:
            forwarder, listener = await listening(server, ["127.0.0.1"])
            query = make_query("big.example", ident=0x6161, qtype=TYPE_TXT)
            short = await udp_ask("127.0.0.1", listener.port, query)
            (full,) = await tcp_ask("127.0.0.1", listener.port, [query])
            listener.close()
            forwarder.close()
        assert len(short) <= 512 and wire.parse_header(short).flags & FLAG_TC
        assert qname(short) == "big.example"
        assert len(full) > 4500 and wire.query_id(full) == 0x6161

    run_async(main(), BODY_TIMEOUT)


def test_tcp_listener_pipelined() -> None:
    async def main() -> None:
        async with FakeServer(delay=lambda index: (6 - index) * 0.02) as server:
            forwarder, listener = await listening(server, ["127.0.0.1"])
            queries = [make_query(f"t{i}.example", ident=200 + i) for i in range(6)]
            replies = await tcp_ask("127.0.0.1", listener.port, queries)
            listener.close()
            forwarder.close()
        assert {(wire.query_id(r), qname(r)) for r in replies} == {
            (200 + i, f"t{i}.example") for i in range(6)
        }
        assert server.connections == 1

    run_async(main(), BODY_TIMEOUT)


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
def test_same_port_on_every_address_and_protocol() -> None:
    async def main() -> None:
        async with FakeServer() as server:
            forwarder, listener = await listening(server, ["127.0.0.1", "::1"])
            for address in ("127.0.0.1", "::1"):
                udp = await udp_ask(address, listener.port, make_query("u.example", ident=1))
                (tcp,) = await tcp_ask(address, listener.port, [make_query("t.example", ident=2)])
                assert qname(udp) == "u.example" and wire.query_id(udp) == 1
                assert qname(tcp) == "t.example" and wire.query_id(tcp) == 2
            port = listener.port
            listener.close()
            forwarder.close()
        for family, kind, address in (
            (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1"),
            (socket.AF_INET6, socket.SOCK_STREAM, "::1"),
        ):
            with socket.socket(family, kind) as sock:  # free again after close()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT
                sock.bind((address, port))

    run_async(main(), BODY_TIMEOUT)


def test_malformed_udp_dropped_listener_survives() -> None:
    async def main() -> None:
        async with FakeServer() as server:
            forwarder, listener = await listening(server, ["127.0.0.1"])
            for bad in (b"\x00\x01", make_answer(make_query("r.example"))):
                with pytest.raises(TimeoutError):
                    await udp_ask("127.0.0.1", listener.port, bad, timeout=0.2)
            broken = make_query("cut.example", ident=12)[:18]
            formerr = await udp_ask("127.0.0.1", listener.port, broken)
            good = await udp_ask("127.0.0.1", listener.port, make_query("fine.example"))
            (tcp_good,) = await tcp_ask(
                "127.0.0.1", listener.port, [make_query("tcp.example")], junk=[b"\x00", b""]
            )
            listener.close()
            forwarder.close()
        assert wire.parse_header(formerr).flags & 0xF == Rcode.FORMERR
        assert qname(good) == "fine.example"
        assert qname(tcp_good) == "tcp.example"
        assert server.received and all(len(q) >= 12 for q in server.received)

    run_async(main(), BODY_TIMEOUT)


def test_explicit_busy_port_raises() -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            listener = DnsListener(DnsForwarder(direct, ["127.0.0.1"]))
            with pytest.raises(OSError):
                await listener.start(["127.0.0.1"], port)

    run_async(main(), BODY_TIMEOUT)


def test_port_collision_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    real_start_server = asyncio.start_server
    taken: list[int] = []

    async def start_server_once_taken(*args: Any, **kwargs: Any) -> asyncio.Server:
        if not taken:
            taken.append(args[2])
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return await real_start_server(*args, **kwargs)

    async def main() -> None:
        monkeypatch.setattr(asyncio, "start_server", start_server_once_taken)
        listener = DnsListener(DnsForwarder(direct, ["127.0.0.1"]))
        port = await listener.start(["127.0.0.1"])
        assert port > 0 and len(taken) == 1
        listener.close()

    run_async(main(), BODY_TIMEOUT)


def test_address_without_ipv6_is_skipped() -> None:
    async def main() -> None:
        async with FakeServer() as server:
            forwarder = DnsForwarder(direct, [server.nameserver])
            listener = DnsListener(forwarder)
            port = await listener.start(["127.0.0.1", "2001:db8::53"])  # not on this host
            reply = await udp_ask("127.0.0.1", port, make_query("v4.example"))
            listener.close()
            forwarder.close()
        assert qname(reply) == "v4.example"

    run_async(main(), BODY_TIMEOUT)


def test_with_edns_adds_one_opt_record_and_without_opt_takes_it_away() -> None:
    query = make_query("a.example")
    offered = wire.with_edns(query)
    assert wire.parse_header(offered).arcount == 1
    assert wire.udp_payload_limit(offered) == wire.EDNS_UDP_PAYLOAD
    assert wire.with_edns(offered) is offered  # one OPT at most
    assert wire.without_opt(offered) == query
    assert wire.without_opt(query) is query
