"""The SYN gate's decisions (tunnel/connect.py): which verdict each held SYN gets, and
when, from the channel's answer; the kernel and sshd's side are in the lab tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest

from shuttled import const
from shuttled.tunnel import sshmsg
from shuttled.tunnel.connect import Outcome, SynGate, outcome
from shuttled.tunnel.nfqueue import NF_ACCEPT, NF_DROP, NF_REPEAT, Syn
from tests.helpers import async_test

APP = ("10.0.0.1", 40000)
DST = ("10.9.0.2", 443)


class FakeConn:
    def __init__(self, src: tuple[str, int], dst: tuple[str, int]) -> None:
        self.key = (src, dst)
        self.gate: SynGate | None = None
        self.abandoned = False

    def abandon(self) -> None:
        self.abandoned = True


class Rig:
    """A gate with a queue that records verdicts and an opener that records opens."""

    def __init__(self, refuse: bool = False) -> None:
        self.opened: list[FakeConn] = []
        self.refuse = refuse
        self.gate = SynGate(self.open)
        self.verdicts: list[tuple[int, int, int | None]] = []
        self.gate.queue.verdict = self.record  # type: ignore[method-assign]

    def record(self, packet_id: int, verdict: int, mark: int | None = None) -> None:
        self.verdicts.append((packet_id, verdict, mark))

    def open(self, src: tuple[str, int], dst: tuple[str, int], uid: int | None) -> Any:
        if self.refuse:
            return None
        conn = FakeConn(src, dst)
        self.opened.append(conn)
        return conn

    def syn(self, packet_id: int, src: tuple[str, int] = APP) -> None:
        self.gate._on_syn(Syn(packet_id, src, DST, 1000))

    def conn(self) -> Any:
        return cast(Any, self.opened[-1])


@pytest.mark.parametrize(
    ("reason", "description", "expected"),
    [
        (sshmsg.OPEN_CONNECT_FAILED, "Connection refused", Outcome.REFUSED),
        (sshmsg.OPEN_CONNECT_FAILED, "No route to host", Outcome.HOST_UNREACHABLE),
        (sshmsg.OPEN_CONNECT_FAILED, "Network is unreachable", Outcome.NET_UNREACHABLE),
        (sshmsg.OPEN_CONNECT_FAILED, "open failed", Outcome.NET_UNREACHABLE),  # sshd, at once
        (sshmsg.OPEN_CONNECT_FAILED, "Connection timed out", Outcome.TIMED_OUT),
        (sshmsg.OPEN_CONNECT_FAILED, "helper: Connection timed out", Outcome.TIMED_OUT),
        (sshmsg.OPEN_ADMINISTRATIVELY_PROHIBITED, "open failed", Outcome.REFUSED),  # PermitOpen
        (sshmsg.OPEN_RESOURCE_SHORTAGE, "", Outcome.REFUSED),
        (sshmsg.OPEN_CONNECT_FAILED, "tunnel closed", Outcome.REFUSED),
    ],
)
def test_an_open_failure_becomes_the_errno_the_remote_got(
    reason: int, description: str, expected: Outcome
) -> None:
    assert outcome(reason, description) is expected


@async_test(5)
async def test_a_confirmed_open_lets_the_held_syn_through_and_the_accept_claims_it() -> None:
    rig = Rig()
    rig.syn(7)
    assert rig.verdicts == [] and rig.gate.stats()["pending"] == 1
    rig.gate.confirmed(rig.conn())
    assert rig.verdicts == [(7, NF_ACCEPT, None)]
    assert rig.gate.claim(APP, DST) is rig.conn()
    assert rig.gate.claim(APP, DST) is None and rig.gate.stats()["pending"] == 0


@async_test(5)
async def test_each_failure_answers_the_syn_with_its_mark_or_drops_it_on_timeout() -> None:
    cases = [
        ("Connection refused", (NF_REPEAT, const.CONNECT_MARK_REFUSED)),
        ("No route to host", (NF_REPEAT, const.CONNECT_MARK_HOST_UNREACHABLE)),
        ("Network is unreachable", (NF_REPEAT, const.CONNECT_MARK_NET_UNREACHABLE)),
        ("Connection timed out", (NF_DROP, None)),
    ]
    rig = Rig()
    for port, (description, verdict) in enumerate(cases, 1):
        rig.syn(port, ("10.0.0.1", port))
        rig.gate.failed(rig.conn(), sshmsg.OPEN_CONNECT_FAILED, description)
        assert rig.verdicts[-1] == (port, *verdict)
    stats = rig.gate.stats()
    assert (stats["refused"], stats["unreachable"], stats["timed_out"]) == (1, 2, 1)


@async_test(5)
async def test_a_retransmitted_syn_is_dropped_while_pending_not_opened_twice() -> None:
    rig = Rig()
    rig.syn(1)
    rig.syn(2)
    rig.syn(3)
    assert len(rig.opened) == 1 and rig.verdicts == [(2, NF_DROP, None), (3, NF_DROP, None)]
    rig.gate.confirmed(rig.conn())
    rig.syn(4)  # after the first went on: the listener may have lost it, let this one in
    assert rig.verdicts[-2:] == [(1, NF_ACCEPT, None), (4, NF_ACCEPT, None)]
    assert rig.gate.stats()["retransmits"] == 2


@async_test(5)
async def test_syns_after_a_timed_out_open_are_dropped_not_opened_again() -> None:
    rig = Rig()
    rig.syn(1)
    rig.gate.failed(rig.conn(), sshmsg.OPEN_CONNECT_FAILED, "Connection timed out")
    rig.syn(2)
    assert len(rig.opened) == 1 and rig.verdicts[-1] == (2, NF_DROP, None)
    rig.syn(3, ("10.0.0.1", 40001))  # another connection: opened
    assert len(rig.opened) == 2


@async_test(5)
async def test_a_syn_the_proxy_will_not_open_is_refused_at_once() -> None:
    rig = Rig(refuse=True)
    rig.syn(9)
    assert rig.verdicts == [(9, NF_REPEAT, const.CONNECT_MARK_REFUSED)]


@async_test(5)
async def test_a_connection_that_ends_while_held_gets_its_syn_refused() -> None:
    rig = Rig()
    rig.syn(5)
    rig.gate.forget(rig.conn())
    assert rig.verdicts == [(5, NF_REPEAT, const.CONNECT_MARK_REFUSED)]
    rig.gate.failed(rig.conn(), sshmsg.OPEN_CONNECT_FAILED, "Connection refused")
    assert len(rig.verdicts) == 1  # no second verdict for the same packet


@async_test(5)
async def test_a_channel_whose_syn_never_became_a_connection_is_closed_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig()
    rig.syn(1)
    rig.gate.confirmed(rig.conn())
    later = time.monotonic() + const.CONNECT_ACCEPT_WAIT + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    rig.gate._sweep()
    assert rig.conn().abandoned and rig.gate.stats()["abandoned"] == 1
    assert rig.gate.claim(APP, DST) is None


@async_test(5)
async def test_an_open_unanswered_past_the_hold_limit_drops_the_syn_and_the_late_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig()
    rig.syn(1)
    conn = rig.conn()
    later = time.monotonic() + const.CONNECT_HOLD_MAX + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    rig.gate._sweep()
    assert rig.verdicts == [(1, NF_DROP, None)] and rig.gate.stats()["timed_out"] == 1
    conn.abandoned = False
    rig.gate.confirmed(conn)  # the answer comes after all: its channel is closed
    assert conn.abandoned and rig.verdicts == [(1, NF_DROP, None)]


@async_test(5)
async def test_closing_refuses_every_syn_still_held() -> None:
    rig = Rig()
    rig.syn(1)
    rig.syn(2, ("10.0.0.1", 2))
    rig.gate.confirmed(rig.conn())  # the second went on already: nothing more to say
    rig.gate.close()
    assert (1, NF_REPEAT, const.CONNECT_MARK_REFUSED) in rig.verdicts
    assert [v for v in rig.verdicts if v[0] == 2] == [(2, NF_ACCEPT, None)]
    await asyncio.sleep(0)


def test_connect_fast_binds_no_queue() -> None:
    gate = SynGate(lambda *_: None, wanted=False)
    assert gate.start() is None and not gate.holding and gate.stats()["mode"] == "fast"
