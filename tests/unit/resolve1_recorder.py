"""A stand-in for systemd-resolved's D-Bus API that records the calls, and a private bus.

`Resolve1Recorder` owns org.freedesktop.resolve1 and implements the four Manager methods
shuttled uses (SetLinkDNS, SetLinkDomains, SetLinkDefaultRoute, RevertLink);
each call is appended to `calls` as (member, args). `no_such_link` makes the
first N SetLinkDNS calls fail the way resolved does for a link it has not seen
yet. `private_bus()` runs a dbus-daemon of the system type on a socket in a
temporary directory and stops it by PID.
"""

import contextlib
import subprocess
from collections.abc import Iterator
from typing import Any

from dbus_fast import DBusError
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method

from tests.lab import bus as lab_bus


@contextlib.contextmanager
def private_bus() -> Iterator[str]:
    """A private system-type dbus-daemon; yields its address; killed by PID after."""
    with lab_bus.private_bus(
        lab_bus.OPEN_POLICY, prefix="shuttled-resolve1-", stderr=subprocess.DEVNULL
    ) as bus:
        yield bus.address


class Resolve1Recorder(ServiceInterface):  # type: ignore[misc]
    def __init__(self, no_such_link: int = 0) -> None:
        super().__init__("org.freedesktop.resolve1.Manager")
        self.calls: list[tuple[str, list[Any]]] = []
        self.no_such_link = no_such_link

    @method()  # type: ignore[untyped-decorator]
    def SetLinkDNS(self, ifindex: "i", addresses: "a(iay)"):  # noqa: F821
        if self.no_such_link > 0:
            self.no_such_link -= 1
            raise DBusError("org.freedesktop.resolve1.NoSuchLink", f"Link {ifindex} not known")
        self.calls.append(("SetLinkDNS", [ifindex, [[f, bytes(a)] for f, a in addresses]]))

    @method()  # type: ignore[untyped-decorator]
    def SetLinkDomains(self, ifindex: "i", domains: "a(sb)"):  # noqa: F821
        self.calls.append(("SetLinkDomains", [ifindex, [list(d) for d in domains]]))

    @method()  # type: ignore[untyped-decorator]
    def SetLinkDefaultRoute(self, ifindex: "i", enable: "b"):  # noqa: F821
        self.calls.append(("SetLinkDefaultRoute", [ifindex, enable]))

    @method()  # type: ignore[untyped-decorator]
    def RevertLink(self, ifindex: "i"):  # noqa: F821
        self.calls.append(("RevertLink", [ifindex]))


async def serve_recorder(address: str, recorder: "Resolve1Recorder") -> MessageBus:
    bus = await MessageBus(bus_address=address).connect()
    bus.export("/org/freedesktop/resolve1", recorder)
    await bus.request_name("org.freedesktop.resolve1")
    return bus
