"""Which transport each of the remote's nameservers gets: TCP through a channel first,
UDP from the remote helper when TCP is refused or silent, the choice kept for the
session, failover between nameservers within the 2 s budget, and one line saying why
when none answers. TCP openers and the helper are fakes: this is the pure logic."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from typing import Any

from shuttled.const import DNS_TIMEOUT
from shuttled.dns import wire
from shuttled.dns.datagram import SENDS, DatagramError, DatagramUpstream
from shuttled.dns.forwarder import DnsForwarder
from shuttled.dns.wire import Rcode
from shuttled.errors import RemoteError
from tests.helpers import run_async
from tests.unit.dns_fakes import (
    BODY_TIMEOUT,
    FakeHelperMux,
    FakeServer,
    answer_udp,
    direct,
    make_answer,
    make_query,
)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Opener:
    """A direct-tcpip opener: refuses, never answers, or connects (to a FakeServer)."""

    def __init__(self, behave: Callable[[str], str], port: int = 0) -> None:
        self.behave = behave  # host -> "refuse", "hang" or "connect"
        self.port = port
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> Streams:
        self.calls.append(host)
        what = self.behave(host)
        if what == "refuse":
            raise ConnectionRefusedError("channel open refused: connect failed")
        if what == "hang":
            await asyncio.Event().wait()
        return await direct("127.0.0.1", self.port)


def rcode(reply: bytes) -> int:
    return wire.parse_header(reply).flags & 0xF


def answered(reply: bytes) -> bool:
    return wire.parse_header(reply).ancount == 1


def rows(forwarder: DnsForwarder) -> list[tuple[str, str, str]]:
    return [(r["address"], r["transport"], r["health"]) for r in forwarder.nameservers()]


def test_tcp_refused_falls_back_to_udp_and_the_choice_is_kept() -> None:
    async def main() -> None:
        opener, helper = Opener(lambda host: "refuse"), FakeHelperMux()
        forwarder = DnsForwarder(opener, ["10.0.0.2"], datagrams=helper)
        assert rows(forwarder) == [("10.0.0.2", "untried", "untried")]
        first = await forwarder.resolve(make_query("one.example", ident=7))
        second = await forwarder.resolve(make_query("two.example", ident=8))
        forwarder.close()
        assert answered(first) and wire.query_id(first) == 7
        assert answered(second) and wire.query_id(second) == 8
        assert opener.calls == ["10.0.0.2"]  # TCP asked once, then UDP only
        assert [(h, p) for h, p, _ in helper.sent] == [("10.0.0.2", 53)] * 2
        assert rows(forwarder) == [("10.0.0.2", "udp", "answering")]
        assert forwarder.problem() is None

    run_async(main(), BODY_TIMEOUT)


def test_tcp_black_hole_falls_back_to_udp_within_the_budget() -> None:
    async def main() -> None:
        opener, helper = Opener(lambda host: "hang"), FakeHelperMux()
        forwarder = DnsForwarder(opener, ["10.0.0.2"], datagrams=helper)
        started = time.monotonic()
        first = await forwarder.resolve(make_query("one.example"))
        elapsed = time.monotonic() - started
        again = time.monotonic()
        second = await forwarder.resolve(make_query("two.example"))
        second_elapsed = time.monotonic() - again
        forwarder.close()
        assert answered(first) and answered(second)
        assert DNS_TIMEOUT / 2 - 0.1 <= elapsed < DNS_TIMEOUT  # half the share on TCP
        assert second_elapsed < 0.5 and opener.calls == ["10.0.0.2"]
        assert rows(forwarder) == [("10.0.0.2", "udp", "answering")]

    run_async(main(), BODY_TIMEOUT)


class SlowHelper(FakeHelperMux):
    """A helper that takes `delay` seconds to start (uploading it is not instant)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.started_at: float | None = None

    async def __call__(self) -> Any:
        if self.started_at is None:
            self.started_at = time.monotonic()
        await asyncio.sleep(self.delay)
        return self


def test_a_slow_helper_starts_while_tcp_is_silent() -> None:
    async def main() -> None:
        helper = SlowHelper(DNS_TIMEOUT * 0.7)  # longer than UDP's half of the budget
        forwarder = DnsForwarder(Opener(lambda host: "hang"), ["10.0.0.2"], datagrams=helper)
        started = time.monotonic()
        reply = await forwarder.resolve(make_query("warm.example"))
        forwarder.close()
        assert answered(reply)
        assert helper.started_at is not None and helper.started_at - started < DNS_TIMEOUT / 2

    run_async(main(), BODY_TIMEOUT)


def test_after_tcp_failed_once_udp_goes_first() -> None:
    async def main() -> None:
        helper = SlowHelper(DNS_TIMEOUT * 1.5)  # too slow for the first query
        opener = Opener(lambda host: "refuse")
        forwarder = DnsForwarder(opener, ["10.0.0.2"], datagrams=helper)
        first = await forwarder.resolve(make_query("one.example"))
        helper.delay = 0.0
        second = await forwarder.resolve(make_query("two.example"))
        forwarder.close()
        assert rcode(first) == Rcode.SERVFAIL and answered(second)
        assert opener.calls == ["10.0.0.2"]  # TCP asked once only
        assert rows(forwarder) == [("10.0.0.2", "udp", "answering")]

    run_async(main(), BODY_TIMEOUT)


def test_tcp_that_answers_is_kept_and_udp_never_used() -> None:
    async def main() -> None:
        helper = FakeHelperMux()
        async with FakeServer() as server:
            opener = Opener(lambda host: "connect", server.port)
            forwarder = DnsForwarder(opener, ["10.0.0.2"], datagrams=helper)
            replies = [await forwarder.resolve(make_query(f"q{i}.example")) for i in range(3)]
            forwarder.close()
        assert all(answered(r) for r in replies)
        assert helper.sent == [] and helper.opened == []
        assert rows(forwarder) == [("10.0.0.2", "tcp", "answering")]

    run_async(main(), BODY_TIMEOUT)


def test_no_helper_says_why_in_one_line_and_fails_fast() -> None:
    async def no_python() -> Any:
        raise RemoteError("UDP unavailable: no python on srv for the helper (tried /nonexistent)")

    async def main() -> None:
        forwarder = DnsForwarder(Opener(lambda host: "refuse"), ["10.0.0.2"], datagrams=no_python)
        started = time.monotonic()
        reply = await forwarder.resolve(make_query("none.example"))
        elapsed = time.monotonic() - started
        problem = forwarder.problem()
        forwarder.close()
        assert rcode(reply) == Rcode.SERVFAIL and elapsed < 0.5
        assert problem is not None and "\n" not in problem
        assert problem.startswith("10.0.0.2 refuses DNS over TCP (channel open refused")
        assert "needs the remote helper" in problem and "(tried /nonexistent)" in problem
        [row] = forwarder.nameservers()
        assert row["transport"] == "untried" and row["health"] == "failing"
        assert row["error"] == problem

    run_async(main(), BODY_TIMEOUT)


def test_failover_to_the_next_nameserver_when_neither_transport_answers() -> None:
    async def main() -> None:
        # 10.0.0.2: TCP refused and UDP silent; 10.0.0.3: TCP black hole, UDP answers.
        def udp(host: str, port: int, query: bytes) -> list[tuple[str, int, bytes]]:
            return answer_udp(host, port, query) if host == "10.0.0.3" else []

        opener = Opener(lambda host: "refuse" if host == "10.0.0.2" else "hang")
        forwarder = DnsForwarder(opener, ["10.0.0.2", "10.0.0.3"], datagrams=FakeHelperMux(udp))
        started = time.monotonic()
        first = await forwarder.resolve(make_query("one.example"))
        elapsed = time.monotonic() - started
        second = await forwarder.resolve(make_query("two.example"))
        forwarder.close()
        assert answered(first) and answered(second) and elapsed < DNS_TIMEOUT
        assert rows(forwarder) == [
            ("10.0.0.2", "untried", "failing"),
            ("10.0.0.3", "udp", "answering"),
        ]
        assert opener.calls == ["10.0.0.2", "10.0.0.3"]  # the one that answered is preferred
        assert forwarder.problem() is None

    run_async(main(), BODY_TIMEOUT)


def test_lost_datagram_is_sent_again_before_the_deadline() -> None:
    async def main() -> None:
        sends: list[bytes] = []

        def first_lost(host: str, port: int, query: bytes) -> list[tuple[str, int, bytes]]:
            sends.append(query)
            return answer_udp(host, port, query) if len(sends) > 1 else []

        helper = FakeHelperMux(first_lost)
        forwarder = DnsForwarder(Opener(lambda host: "refuse"), ["10.0.0.2"], datagrams=helper)
        reply = await forwarder.resolve(make_query("again.example"))
        forwarder.close()
        assert answered(reply) and len(sends) == 2 and sends[0] == sends[1]

    run_async(main(), BODY_TIMEOUT)


def test_udp_replies_match_by_source_id_and_question() -> None:
    async def main() -> None:
        def impostors(host: str, port: int, query: bytes) -> list[tuple[str, int, bytes]]:
            other = make_answer(make_query("other.example", ident=wire.query_id(query)))
            return [
                ("10.6.6.6", port, make_answer(query)),  # another source
                (host, port, other),  # the same id, another question
                (host, port, make_answer(wire.with_id(query, wire.query_id(query) ^ 1))),
                (host, port, b"\x00"),  # garbage
                (host, port, make_answer(query)),  # the reply
            ]

        forwarder = DnsForwarder(
            Opener(lambda host: "refuse"), ["10.0.0.2"], datagrams=FakeHelperMux(impostors)
        )
        reply = await forwarder.resolve(make_query("real.example", ident=99))
        forwarder.close()
        assert answered(reply) and wire.query_id(reply) == 99
        assert wire.read_questions(reply)[0][0].name == "real.example"

    run_async(main(), BODY_TIMEOUT)


def test_a_new_session_tries_tcp_again() -> None:
    async def main() -> None:
        refuse = {"10.0.0.2"}
        async with FakeServer() as server:
            opener = Opener(lambda host: "refuse" if host in refuse else "connect", server.port)
            forwarder = DnsForwarder(opener, ["10.0.0.2"], datagrams=FakeHelperMux())
            await forwarder.resolve(make_query("one.example"))
            assert rows(forwarder) == [("10.0.0.2", "udp", "answering")]
            refuse.clear()  # the next remote's nameserver takes TCP
            forwarder.new_session()
            assert rows(forwarder) == [("10.0.0.2", "untried", "untried")]
            reply = await forwarder.resolve(make_query("two.example"))
            forwarder.close()
        assert answered(reply) and rows(forwarder) == [("10.0.0.2", "tcp", "answering")]

    run_async(main(), BODY_TIMEOUT)


def test_udp_queries_in_flight_are_bounded() -> None:
    async def main() -> None:
        silent = FakeHelperMux(lambda host, port, query: [])
        udp = DatagramUpstream(silent, max_pending=3)
        deadline = asyncio.get_running_loop().time() + 0.5
        results = await asyncio.gather(
            *(udp.ask("10.0.0.2", 53, make_query(f"q{i}.example"), deadline) for i in range(6)),
            return_exceptions=True,
        )
        udp.close()
        refused = [r for r in results if isinstance(r, DatagramError)]
        timed_out = [r for r in results if isinstance(r, TimeoutError)]
        assert len(refused) == 3 and len(timed_out) == 3
        assert len(silent.sent) <= 3 * SENDS

    run_async(main(), BODY_TIMEOUT)


def test_udp_queries_offer_edns_and_the_client_gets_no_opt_it_did_not_ask_for() -> None:
    async def main() -> None:
        def with_opt(host: str, port: int, query: bytes) -> list[tuple[str, int, bytes]]:
            # A nameserver answering EDNS with EDNS: its reply carries an OPT record.
            reply = make_answer(query)
            h = wire.parse_header(reply)
            opt = b"\0" + struct.pack(">HHIH", 41, 1232, 0, 0)
            header = wire.HEADER.pack(h.ident, h.flags, h.qdcount, h.ancount, 0, 1)
            return [(host, port, header + reply[wire.HEADER_SIZE :] + opt)]

        helper = FakeHelperMux(with_opt)
        upstream = DatagramUpstream(helper)
        loop = asyncio.get_running_loop()
        plain = make_query("big.example")
        reply = await upstream.ask("10.0.0.2", 53, plain, loop.time() + DNS_TIMEOUT)
        asked = make_query("big.example", edns=4096)
        kept = await upstream.ask("10.0.0.2", 53, asked, loop.time() + DNS_TIMEOUT)
        upstream.close()
        sent_plain, sent_edns = (payload for _, _, payload in helper.sent)
        assert wire.udp_payload_limit(sent_plain) == wire.EDNS_UDP_PAYLOAD
        assert wire.udp_payload_limit(sent_edns) == 4096  # the client's own, untouched
        assert wire.parse_header(reply).arcount == 0 and len(reply) == len(make_answer(plain))
        assert wire.parse_header(kept).arcount == 1

    run_async(main(), BODY_TIMEOUT)
