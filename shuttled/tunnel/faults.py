"""The fault boundary: what goes wrong for one connection ends that connection only.

Every per-connection and per-flow callback (a TCP connection's asyncio callbacks, a
channel endpoint's callbacks from the mux, a DNS query, a UDP flow) runs inside it. An
app that resets at the wrong moment makes the kernel answer ENOTCONN or EPIPE where we
expected a socket; a bug in one endpoint raises anything at all. Either way the
connection is ended and counted, and the ssh session and every other connection go on.
Only the session's own failures (the master's socket, the mux stream, a peer that
breaks the protocol) end the session.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Concatenate, ParamSpec, Protocol, TypeVar

log = logging.getLogger(__name__)

# What stats reports, by kind of connection.
TCP = "tcp"  # an app's TCP connection
UDP = "udp"  # a UDP flow
DNS = "dns"  # a DNS query or DNS client connection
CHANNEL = "channel"  # any other channel (commands, probes)
KINDS = (TCP, UDP, DNS, CHANNEL)


class Faults:
    """Faults contained at the boundary, counted by kind (one per tunnel)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)

    def record(self, kind: str, exc: BaseException, where: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        # Debug, not warning: an app that resets is ordinary. Bugs show their traceback.
        log.debug(
            "%s connection aborted in %s: %s",
            kind,
            where,
            describe(exc),
            exc_info=not isinstance(exc, OSError),
        )

    def end(
        self, kind: str, exc: BaseException, where: str, abort: Callable[[], None] | None
    ) -> None:
        """Count and log `exc`, then end the connection with `abort`; a failure while
        ending it is logged, not raised (nothing leaves the boundary)."""
        self.record(kind, exc, where)
        if abort is None:
            return
        try:
            abort()
        except Exception:
            log.debug("aborting a %s connection failed", kind, exc_info=True)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{name} ({exc.strerror or exc})"
    return f"{type(exc).__name__}: {exc}"


class Abortable(Protocol):
    """What the boundary can end: the object behind one connection or flow."""

    faults: Faults
    fault_kind: str

    def abort_connection(self) -> None: ...


P = ParamSpec("P")
T = TypeVar("T", bound=Abortable)


def contained(method: Callable[Concatenate[T, P], object]) -> Callable[Concatenate[T, P], None]:
    """Run a per-connection callback inside the boundary: whatever it raises ends
    that connection (abort_connection), is counted and logged once, and goes no
    further. For asyncio protocol callbacks and socket reader callbacks, whose
    exceptions would otherwise reach the loop's handler or tear down a transport
    that is not theirs."""

    def guarded(self: T, /, *args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as exc:
            abort(self, exc, where)

    where = method.__name__
    guarded.__name__ = guarded.__qualname__ = where
    guarded.__doc__ = method.__doc__
    guarded.__wrapped__ = method  # type: ignore[attr-defined]  # for fault injection
    return guarded


def abort(target: Abortable, exc: BaseException, where: str) -> None:
    """End `target` after `exc` (see Faults.end)."""
    target.faults.end(target.fault_kind, exc, where, target.abort_connection)
