"""`streams: N`: one tunnel over several ssh connections, with a real daemon, sshd and
nft. New connections spread over the connections; losing an extra one resets only what
it carried, the tunnel stays up on the rest, and the lost one is replaced."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Iterator

import psutil
import pytest

from tests.integration.daemon_util import DaemonSet, http_ok, wait_for
from tests.lab import Lab, clients
from tests.lab.runner import start_run, stop_run

pytestmark = pytest.mark.integration

STREAMS = 3
HELD = 6  # app connections held open while the spread is looked at
BIG = 20 * 1024 * 1024


def ssh_masters(daemon_pid: int) -> list[int]:
    """The daemon's ssh ControlMaster children, oldest first."""
    found = [
        p
        for p in psutil.Process(daemon_pid).children()
        if p.name() == "ssh" and "-M" in p.cmdline()
    ]
    return [p.pid for p in sorted(found, key=lambda p: p.create_time())]


@contextlib.contextmanager
def held_connections(lab: Lab) -> Iterator[list[socket.socket]]:
    """HELD idle connections to the lab's bulk service, closed at the end."""
    with lab.netns("cli"):
        held = [clients.hold_connection(lab.tgt_v4, 60) for _ in range(HELD)]
    try:
        yield held
    finally:
        for sock in held:
            sock.close()


def test_streams_spread_connections_over_that_many_ssh_connections(
    lab: Lab, daemons: DaemonSet
) -> None:
    d = daemons.work_up(streams=STREAMS)
    assert len(ssh_masters(d.pid)) == STREAMS
    with held_connections(lab):
        stats = wait_for(
            "every app connection open", lambda: (s := d.stats("work"))["active"] == HELD and s, 10
        )
        assert stats["streams"] == STREAMS, stats
        # Each ssh connection carries its share (the first also has our own session).
        assert min(stats["stream_channels"]) >= HELD // STREAMS, stats
        rows = d.ctl_json("connections", "work")["connections"]
        assert len(rows) == HELD and {r["proto"] for r in rows} == {"tcp"}, rows
        assert {r["dst"] for r in rows} == {f"{lab.tgt_v4}:{clients.BULK_PORT}"}, rows


def test_transfers_over_several_ssh_connections_arrive_intact(lab: Lab, daemons: DaemonSet) -> None:
    d = daemons.work_up(streams=STREAMS)

    async def both() -> list[clients.TransferResult]:
        ups = [clients.abulk_upload(lab.tgt_v4, BIG, seed=i) for i in range(STREAMS)]
        downs = [clients.abulk_download(lab.tgt_v6, BIG, seed=i) for i in range(STREAMS)]
        return await asyncio.gather(*ups, *downs)

    with lab.netns("cli"):
        results = asyncio.run(both())
    for result in results:
        result.check()
    assert d.stats("work")["streams"] == STREAMS


def test_losing_an_extra_ssh_connection_resets_only_its_share_and_it_comes_back(
    lab: Lab, daemons: DaemonSet
) -> None:
    d = daemons.work_up(streams=STREAMS)
    primary = d.ssh_pid("work")
    with held_connections(lab):
        wait_for("every app connection open", lambda: d.stats("work")["active"] == HELD, 10)
        extra = next(pid for pid in ssh_masters(d.pid) if pid != primary)
        os.kill(extra, signal.SIGKILL)
        stats = wait_for(
            "one ssh connection fewer",
            lambda: (s := d.stats("work"))["streams"] == STREAMS - 1 and s,
            10,
        )
        assert d.state("work") == "up" and stats["reconnects"] == 0, stats
        alive = wait_for(
            "the lost share reset", lambda: (n := d.stats("work")["active"]) < HELD and n, 10
        )
        assert alive >= HELD - HELD // STREAMS, stats  # the others were not touched
        assert http_ok(lab, lab.tgt_v4) and http_ok(lab, lab.tgt_v6)
        wait_for(
            "the lost ssh connection replaced", lambda: d.stats("work")["streams"] == STREAMS, 10
        )
        assert d.state("work") == "up" and len(ssh_masters(d.pid)) == STREAMS


def test_run_streams_in_helper_mode_each_connection_has_its_own_helper(lab: Lab) -> None:
    proc = start_run(lab, "--streams", "2", *lab.target_nets, remote=lab.remote_nofwd)
    try:
        with lab.netns("cli"):

            async def four() -> list[clients.TransferResult]:
                return await asyncio.gather(
                    *(clients.abulk_download(lab.tgt_v4, BIG, seed=i) for i in range(4))
                )

            results = asyncio.run(four())
        helpers = lab.log_tail("shuttled", 200).count("remote helper started")
    finally:
        assert stop_run(lab, proc) == 0
    for result in results:
        result.check()
    assert helpers == 2, lab.log_tail("shuttled", 60)
