"""True connect(): the app's SYN waits in the kernel until the remote has answered.

Without this, a transparent proxy accepts every captured connection before it
knows whether the destination exists: connect() succeeds for a closed port, a
host that is down, a network nobody routes, and the app finds out later (a reset,
a hang). Clients that try the next address when connect() fails (several A
records, Happy Eyeballs, database host lists, `nc -z`, health checks) cannot work.

So the firewall hands the first SYN of each captured connection to an NFQUEUE
(shuttled.tunnel.nfqueue). The gate opens the direct-tcpip channel at once, and:

- confirmed: the SYN goes on (NF_ACCEPT) to our redirect and listener; the
  accepted socket is matched to its already-open channel by its two ends;
- refused (or prohibited by PermitOpen): the SYN runs through the chain again
  with CONNECT_MARK_REFUSED (NF_REPEAT), whose reject rule resets it: the app gets
  ECONNREFUSED; no route / host unreachable: an ICMP unreachable of the same kind
  (ENETUNREACH / EHOSTUNREACH);
- the remote's own connect timed out: the SYN is dropped, so the app's own
  connect timeout applies, and its SYN retries are dropped too for a while.

A SYN the app sends again while its open is pending is dropped, not opened twice.
What the remote sends between the confirmation and our accept waits in the channel
(its window bounds it). A channel whose SYN never became a connection (the app gave
up meanwhile) is closed after CONNECT_ACCEPT_WAIT and counted as abandoned.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shuttled import const
from shuttled.control.schema import ConnectStats
from shuttled.tunnel import sshmsg
from shuttled.tunnel.nfqueue import NF_ACCEPT, NF_DROP, NF_REPEAT, NfQueue, Syn

if TYPE_CHECKING:
    from shuttled.tunnel.proxy import LocalConnection

log = logging.getLogger(__name__)

Address = tuple[str, int]
Key = tuple[Address, Address]  # (the app's end, the original destination)
SWEEP_EVERY = 1.0


class Outcome(enum.Enum):
    """What an open failure means to the app's connect()."""

    REFUSED = "refused"
    HOST_UNREACHABLE = "host unreachable"
    NET_UNREACHABLE = "network unreachable"
    TIMED_OUT = "timed out"


# Verdict and mark for each outcome: a mark sends the SYN to its reject rule.
_VERDICTS: dict[Outcome, tuple[int, int | None]] = {
    Outcome.REFUSED: (NF_REPEAT, const.CONNECT_MARK_REFUSED),
    Outcome.HOST_UNREACHABLE: (NF_REPEAT, const.CONNECT_MARK_HOST_UNREACHABLE),
    Outcome.NET_UNREACHABLE: (NF_REPEAT, const.CONNECT_MARK_NET_UNREACHABLE),
    Outcome.TIMED_OUT: (NF_DROP, None),
}

# sshd and the helper describe a failed connect by strerror(errno), but for one that
# failed at once sshd says only "open failed" (serverloop.c): measured, a destination
# its host has no route to (ENETUNREACH); that is what the app is told.
_SSHD_CONNECT_FAILED = "open failed"
_DESCRIPTIONS: tuple[tuple[str, Outcome], ...] = (
    ("timed out", Outcome.TIMED_OUT),
    ("network is unreachable", Outcome.NET_UNREACHABLE),
    ("network unreachable", Outcome.NET_UNREACHABLE),
    ("no route to host", Outcome.HOST_UNREACHABLE),
    ("host is unreachable", Outcome.HOST_UNREACHABLE),
    ("host unreachable", Outcome.HOST_UNREACHABLE),
)


def outcome(reason: int, description: str) -> Outcome:
    """The answer the app gets for an open failure. Anything not known to be an
    unreachable or a timeout is a refusal: PermitOpen's "administratively
    prohibited", a resource shortage, a tunnel that closed meanwhile."""
    if reason != sshmsg.OPEN_CONNECT_FAILED:
        return Outcome.REFUSED
    text = description.lower()
    if text == _SSHD_CONNECT_FAILED:
        return Outcome.NET_UNREACHABLE
    for words, result in _DESCRIPTIONS:
        if words in text:
            return result
    return Outcome.REFUSED


@dataclass
class ConnectCounters:
    refused: int = 0
    unreachable: int = 0
    timed_out: int = 0
    abandoned: int = 0  # channels opened for SYNs that never became connections
    retransmits: int = 0  # SYN copies dropped while the first one was held
    # Accepted with no held SYN (a full queue let it through, or it was unreadable):
    # connected at accept, as with `connect: fast`.
    passed: int = 0


@dataclass
class _Held:
    conn: LocalConnection
    packet_id: int
    since: float
    passed: bool = False  # the SYN went on; the accepted socket is awaited


# The proxy's side: open a channel for a held SYN, or say why not (a refusal).
Opener = Callable[[Address, Address, int | None], "LocalConnection | None"]


class SynGate:
    """One proxy's held SYNs and the queue they arrive on."""

    def __init__(self, opener: Opener, *, wanted: bool = True) -> None:
        self.opener = opener
        self.wanted = wanted  # False: `connect: fast` was asked for
        self.queue = NfQueue(self._on_syn)
        self.number: int | None = None
        self.why: str | None = None  # why connect() answers at once, when it does
        self.counters = ConnectCounters()
        self._held: dict[Key, _Held] = {}
        self._timed_out: collections.OrderedDict[Key, float] = collections.OrderedDict()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> int | None:
        """Bind a free queue; its number, or None (and `why`) when there is none."""
        if not self.wanted or self.why is not None:
            return None
        try:
            self.number = self.queue.bind(const.SYN_QUEUE_FIRST, const.SYN_QUEUE_COUNT)
        except OSError as exc:
            self.why = f"no nfnetlink queue: {exc.strerror or exc}"
            log.warning("connect() answers at once, before the remote does: %s", self.why)
            return None
        self.queue.start()
        return self.number

    @property
    def holding(self) -> bool:
        return self.number is not None

    # --- SYNs from the kernel --------------------------------------------------------

    def _on_syn(self, syn: Syn) -> None:
        key = (syn.src, syn.dst)
        held = self._held.get(key)
        if held is not None:
            # Its retransmission: once its channel is open, let it through (the first
            # one was lost on the way to the listener); before, it changes nothing.
            if held.passed:
                self.queue.verdict(syn.packet_id, NF_ACCEPT)
            else:
                self.counters.retransmits += 1
                self.queue.verdict(syn.packet_id, NF_DROP)
            return
        if self._recently_timed_out(key):
            self.counters.retransmits += 1
            self.queue.verdict(syn.packet_id, NF_DROP)
            return
        conn = self.opener(syn.src, syn.dst, syn.uid)
        if conn is None:  # over a limit, or no tunnel: refused, as at accept
            self._answer(syn.packet_id, Outcome.REFUSED)
            return
        conn.gate = self
        self._held[key] = _Held(conn, syn.packet_id, time.monotonic())
        self._arm()

    def _recently_timed_out(self, key: Key) -> bool:
        until = self._timed_out.get(key)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._timed_out[key]
        return False

    def _answer(self, packet_id: int, result: Outcome) -> None:
        verdict, mark = _VERDICTS[result]
        self.queue.verdict(packet_id, verdict, mark)

    # --- the channel's answer ----------------------------------------------------------

    def confirmed(self, conn: LocalConnection) -> None:
        """The remote connected: let the SYN go on to the listener."""
        held = self._held.get(conn.key)
        if held is None or held.conn is not conn:
            conn.abandon()  # given up on before the answer came (CONNECT_HOLD_MAX)
            return
        held.passed = True
        held.since = time.monotonic()
        self.queue.verdict(held.packet_id, NF_ACCEPT)

    def failed(self, conn: LocalConnection, reason: int, description: str) -> Outcome | None:
        """The remote could not connect: answer the app as the remote was answered."""
        held = self._held.get(conn.key)
        if held is None or held.conn is not conn:
            return None
        del self._held[conn.key]
        result = outcome(reason, description)
        self._count(result)
        if result is Outcome.TIMED_OUT:
            self._remember_timeout(conn.key)
        self._answer(held.packet_id, result)
        return result

    def _count(self, result: Outcome) -> None:
        if result is Outcome.REFUSED:
            self.counters.refused += 1
        elif result is Outcome.TIMED_OUT:
            self.counters.timed_out += 1
        else:
            self.counters.unreachable += 1

    def _remember_timeout(self, key: Key) -> None:
        self._timed_out[key] = time.monotonic() + const.CONNECT_TIMED_OUT_MEMORY
        self._timed_out.move_to_end(key)
        while len(self._timed_out) > const.CONNECT_TIMED_OUT_ENTRIES:
            self._timed_out.popitem(last=False)

    # --- the listener's side ---------------------------------------------------------------

    def claim(self, src: Address, dst: Address) -> LocalConnection | None:
        """The held connection an accepted socket belongs to, if any."""
        held = self._held.get((src, dst))
        if held is None or not held.passed:
            return None
        del self._held[(src, dst)]
        return held.conn

    def forget(self, conn: LocalConnection) -> None:
        """`conn` ended before its socket was accepted: a SYN still held is refused."""
        held = self._held.get(conn.key)
        if held is None or held.conn is not conn:
            return
        del self._held[conn.key]
        if not held.passed:
            self._answer(held.packet_id, Outcome.REFUSED)

    # --- time -----------------------------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is None and self._held:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(SWEEP_EVERY, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = time.monotonic()
        for key, held in list(self._held.items()):
            if held.passed and now - held.since > const.CONNECT_ACCEPT_WAIT:
                del self._held[key]
                self.counters.abandoned += 1
                held.conn.abandon()
            elif not held.passed and now - held.since > const.CONNECT_HOLD_MAX:
                del self._held[key]
                self._count(Outcome.TIMED_OUT)
                self._remember_timeout(key)
                self._answer(held.packet_id, Outcome.TIMED_OUT)
                self.counters.abandoned += 1
                held.conn.abandon()
        self._arm()

    # --- reporting and the end -------------------------------------------------------------

    def pending(self) -> list[LocalConnection]:
        """Connections whose SYN is held or whose accept is awaited."""
        return [held.conn for held in self._held.values()]

    def stats(self) -> ConnectStats:
        mode = const.ConnectMode.REMOTE if self.holding else const.ConnectMode.FAST
        return {
            "mode": str(mode),
            "why": self.why,
            "pending": len(self._held),
            "refused": self.counters.refused,
            "unreachable": self.counters.unreachable,
            "timed_out": self.counters.timed_out,
            "abandoned": self.counters.abandoned,
            "retransmits": self.counters.retransmits,
            "passed": self.counters.passed + self.queue.unreadable,
        }

    def close(self) -> None:
        """Refuse what is held (the tunnel is going), and unbind the queue."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = list(self._held.values()), {}
        for each in held:
            if not each.passed:
                self._answer(each.packet_id, Outcome.REFUSED)
        self.queue.close()
        self.number = None
