"""Peer credentials of the control socket on macOS and FreeBSD: struct xucred, laid out
by hand from the C declarations (XNU bsd/sys/ucred.h, FreeBSD sys/sys/ucred.h)."""

from __future__ import annotations

import pytest

from shuttled.control.peercred import parse_xucred


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def test_xucred_macos_and_freebsd() -> None:
    groups = [20, 12, 61, 80] + [0] * 12
    head = _hex("00000000 f5010000 0400 0000")  # version 0, uid 501, 4 groups, padding
    body = b"".join(g.to_bytes(4, "little") for g in groups)
    mac = parse_xucred(head + body, freebsd=False)
    assert (mac.uid, mac.gid, mac.pid, mac.groups) == (501, 20, None, (20, 12, 61, 80))
    freebsd = head + body + _hex("00000000") + (4321).to_bytes(4, "little") + bytes(4)
    assert len(freebsd) == 88
    assert parse_xucred(freebsd, freebsd=True).pid == 4321
    with pytest.raises(OSError):
        parse_xucred(_hex("01000000") + bytes(72), freebsd=False)
