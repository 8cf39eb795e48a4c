"""The daemon in the foreground, as a user starts it by hand: options after `daemon`,
stamped log lines that say where it listens, and what its stop removed."""

from __future__ import annotations

import re

import pytest

from tests.integration.daemon_util import DaemonSet, http_ok, root_profile

pytestmark = pytest.mark.integration

_STAMPED = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d shuttled: ")


def test_foreground_daemon_with_options_after_daemon_says_where_it_listens(
    daemons: DaemonSet,
) -> None:
    daemon = daemons.new()
    daemon.options_after = True
    daemon.write_profile("work", root_profile(daemons.lab, daemons.lab.target_nets))
    daemon.start()
    assert daemon.ctl("up", "work").returncode == 0
    daemon.wait_state("work", "up")
    assert http_ok(daemons.lab, daemons.lab.tgt_v4)
    assert daemon.stop() == 0
    lines = daemon.log(400).splitlines()
    assert lines and all(_STAMPED.match(line) for line in lines), lines
    assert any(line.endswith(f"shuttled: listening on {daemon.socket}") for line in lines)
    assert any(
        re.search(r"shuttled: \[work\] listening on 127\.0\.0\.1:\d+, \[::1\]:\d+$", line)
        for line in lines
    ), lines
    assert lines[-1].endswith("shuttled: stopped: rules removed, tunnels closed"), lines
    assert not any("no remote_id" in line or "ssh: ssh:" in line for line in lines), lines
