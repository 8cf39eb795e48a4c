"""CaptureSet.heal: what differs from the kernel's view after our own last change is
someone else's doing, and is put back in one transaction; our own changes never are."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from shuttled.firewall.base import Capture
from shuttled.net import Subnet
from shuttled.supervisor import CaptureSet
from tests.helpers import RecordingBackend


class Kernel(RecordingBackend):
    """The recorder, with a listing of its 'kernel' that the test can tamper with."""

    name = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.listing = ""

    def render(self, captures: Sequence[Capture]) -> str:
        return "".join(f"chain {c.name} {c.tcp_port}\n" for c in captures) or "table\n"

    def apply(self, captures: Sequence[Capture]) -> None:
        super().apply(captures)
        self.listing = self.render(captures)

    def remove(self) -> None:
        super().remove()
        self.listing = ""

    def snapshot(self) -> str:
        return self.listing


def capture(port: int) -> Capture:
    return Capture("work", (Subnet(ipaddress.ip_network("10.1.0.0/16")),), tcp_port=port)


def test_our_own_changes_are_never_healed() -> None:
    kernel = Kernel()
    captures = CaptureSet(kernel)
    captures.install()
    captures.put(capture(1000))
    captures.put(capture(2000))
    assert captures.heal() is None and captures.restored == 0 and len(kernel.applied) == 3


def test_a_deleted_table_is_put_back_and_named() -> None:
    kernel = Kernel()
    captures = CaptureSet(kernel)
    captures.put(capture(1000))
    kernel.listing = ""  # nft flush ruleset
    lost = captures.heal()
    assert lost is not None and "fake rules of shuttled were deleted" in lost
    assert kernel.listing == "chain work 1000\n" and captures.restored == 1
    assert captures.heal() is None  # once restored, quiet again


def test_a_changed_rule_is_put_back() -> None:
    kernel = Kernel()
    captures = CaptureSet(kernel)
    captures.put(capture(1000))
    kernel.listing = "chain work 666\n"
    assert "were changed" in (captures.heal() or "")
    assert kernel.listing == "chain work 1000\n"
