"""`python -m tests.lab.faulty ARGS...`: shuttled's CLI with fault injection points
(and SHUTTLED_TEST_CONST to lower a limit, see set_constants).

For tests of the fault boundary (tests/integration/test_fault_boundary.py): the same
`shuttled run` as usual, in which chosen per-connection callbacks raise a chosen
exception. What to raise, and where, is read from the file named by
SHUTTLED_FAULT_FILE at each call, one line `Class.method ERRNAME` (ERRNAME is an errno
name such as ENOTCONN, or `Exception` for a plain one); an empty file injects nothing.

Only connections that are meant to be hit are: TCP to VICTIM_PORTS, UDP flows to
UDP_VICTIM_PORTS, DNS queries naming VICTIM_LABEL. Everything else, the long transfer
the test watches among it, runs untouched.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from shuttled.dns.forwarder import DnsForwarder
from shuttled.tunnel import origdst, proxy, udp

VICTIM_PORTS = (80, 9)  # the lab's HTTP server, and its closed port (open failures)
UDP_VICTIM_PORTS = (7,)  # the lab's UDP echo
VICTIM_LABEL = b"\x05fault"  # DNS queries for fault.<anything>


def _tcp_victim(conn: proxy.LocalConnection, *_args: Any) -> bool:
    return conn.dst[1] in VICTIM_PORTS


def _destination_victim(_proxy: proxy.TransparentProxy, sock: socket.socket) -> bool:
    return origdst.original_dst(sock)[1] in VICTIM_PORTS


def _flow_victim(flow: udp.Flow, *args: Any) -> bool:
    if args and isinstance(args[0], tuple):  # send(dst, payload)
        return args[0][1] in UDP_VICTIM_PORTS
    return any(dst[1] in UDP_VICTIM_PORTS for dst in flow.replies)


def _dns_victim(_forwarder: DnsForwarder, query: bytes, *_args: Any) -> bool:
    return VICTIM_LABEL in query.lower()


TCP_POINTS = (
    "connection_made",
    "data_received",
    "_half_closed",
    "connection_lost",
    "on_open",
    "on_open_failed",
    "on_data",
    "on_eof",
    "on_close",
)
FLOW_POINTS = ("send", "on_open", "on_data")
POINTS: dict[str, tuple[type, Callable[..., bool], tuple[str, ...]]] = {
    "LocalConnection": (proxy.LocalConnection, _tcp_victim, TCP_POINTS),
    "TransparentProxy": (proxy.TransparentProxy, _destination_victim, ("destination",)),
    "Flow": (udp.Flow, _flow_victim, FLOW_POINTS),
    "DnsForwarder": (DnsForwarder, _dns_victim, ("resolve",)),
}


def _wanted() -> tuple[str, str] | None:
    try:
        with open(os.environ["SHUTTLED_FAULT_FILE"]) as fh:
            words = fh.read().split()
    except OSError:
        return None
    return (words[0], words[1]) if len(words) == 2 else None


def _exception(name: str) -> Exception:
    if name == "Exception":
        return Exception("injected fault")
    code = getattr(errno, name)
    return OSError(code, os.strerror(code))


def _raising(
    point: str, inner: Callable[..., Any], victim: Callable[..., bool]
) -> Callable[..., Any]:
    """`inner`, raising the wanted exception first when armed for this victim (after
    it, for connection_made, so that there is a connection to end)."""
    after = point.endswith("connection_made")

    def fire(self: Any, args: tuple[Any, ...]) -> None:
        wanted = _wanted()
        if wanted is not None and wanted[0] == point and victim(self, *args):
            raise _exception(wanted[1])

    if inspect.iscoroutinefunction(inner):

        @functools.wraps(inner)
        async def acall(self: Any, *args: Any, **kwargs: Any) -> Any:
            fire(self, args)
            return await inner(self, *args, **kwargs)

        return acall

    @functools.wraps(inner)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not after:
            fire(self, args)
        result = inner(self, *args, **kwargs)
        if after:
            fire(self, args)
        return result

    return call


def install() -> None:
    """Put a raising wrapper inside every point's own boundary: under @contained
    where the method has one (`__wrapped__`), else where the mux calls it."""
    from shuttled.tunnel.faults import contained

    for cls_name, (cls, victim, methods) in POINTS.items():
        for method in methods:
            current = getattr(cls, method)
            inner = getattr(current, "__wrapped__", None)
            point = f"{cls_name}.{method}"
            if inner is not None:
                setattr(cls, method, contained(_raising(point, inner, victim)))
            else:
                setattr(cls, method, _raising(point, current, victim))


def set_constants() -> None:
    """SHUTTLED_TEST_CONST="NAME=VALUE,...": smaller limits, so a test reaches them."""
    from shuttled import const

    for item in filter(None, os.environ.get("SHUTTLED_TEST_CONST", "").split(",")):
        name, _, value = item.partition("=")
        setattr(const, name, type(getattr(const, name))(value))


if __name__ == "__main__":
    set_constants()
    install()
    from shuttled.__main__ import main

    sys.argv[0] = "shuttled"
    sys.exit(main())
