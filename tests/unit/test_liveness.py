"""When the session declares its first ssh connection dead (session.py, _dead): silence
on every channel we can see, with or without the kernel's view of the TCP connection."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest

from shuttled import const
from shuttled.tunnel.nodelay import TcpInfo
from shuttled.tunnel.session import SshSession
from shuttled.tunnel.ssh import SshTarget


def _tcp(heard: float) -> TcpInfo:
    return TcpInfo(state=1, heard=heard, unacked=0, backoff=0, rtt=0.001, retrans=0)


def _verdict(
    keepalive: float, heard_ago: float, tcp_heard_ago: float | None, pings: bool = True
) -> str | None:
    async def main() -> str | None:
        session = SshSession(SshTarget("h"), "t", keepalive=keepalive)
        link = session.primary
        link.interactive = cast(Any, object()) if pings else None  # a session to ping on
        link.heard = time.monotonic() - heard_ago
        tcp = None if tcp_heard_ago is None else _tcp(tcp_heard_ago)
        link.master.tcp_info = lambda: tcp  # type: ignore[method-assign]
        return session.link_dead(link)

    return asyncio.run(main())


def test_a_silent_link_is_dead_after_the_silence_limit() -> None:
    silence = const.LINK_SILENCE_DEAD
    assert _verdict(10, silence - 1, silence - 1) is None
    assert "link dead" in (_verdict(10, silence + 1, silence + 1) or "")


def test_segments_from_the_server_keep_a_link_alive_whose_master_is_quiet() -> None:
    # Pings' answers behind bulk data: the kernel still sees the server's segments.
    assert _verdict(10, const.LINK_SILENCE_DEAD + 2, 0.1) is None
    # ... but not for ever: sshd itself must answer within three keepalive intervals.
    assert "no answer" in (_verdict(10, 31, 0.1) or "")


def test_without_the_kernels_view_the_limit_is_longer() -> None:
    blind = const.LINK_SILENCE_DEAD_BLIND
    assert _verdict(10, const.LINK_SILENCE_DEAD + 1, None) is None
    assert "link dead" in (_verdict(10, blind + 1, None) or "")


@pytest.mark.parametrize("keepalive", [1.0, 2.0])
def test_a_short_keepalive_shortens_the_limit(keepalive: float) -> None:
    limit = keepalive * const.KEEPALIVE_MISSES
    assert _verdict(keepalive, limit + 0.5, limit + 0.5) is not None
    assert _verdict(keepalive, limit - 0.5, limit - 0.5) is None


def test_without_a_session_to_ping_on_only_the_kernels_view_counts() -> None:
    # MaxSessions 0, or a ForceCommand that ended our session: no pings, so a quiet
    # master is no sign of death (else an idle tunnel would reconnect for ever).
    assert _verdict(10, 10_000, None, pings=False) is None
    assert _verdict(10, 10_000, 0.1, pings=False) is None
    assert "link dead" in (_verdict(10, 10_000, const.LINK_SILENCE_DEAD + 1, pings=False) or "")
