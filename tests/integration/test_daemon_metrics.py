"""`shuttlectl stats --prometheus` with a real daemon in the lab: what node_exporter's
textfile collector would read, after real traffic through a profile."""

from __future__ import annotations

import pytest

from tests.helpers import parse_prometheus
from tests.integration.daemon_util import DaemonSet, root_profile
from tests.lab import Lab, LabUser, clients

pytestmark = pytest.mark.integration

DOWN_BYTES = 1 << 20
UP_BYTES = 256 << 10


def test_prometheus_text_counts_a_profiles_bytes_and_shows_every_profile_to_any_user(
    lab: Lab, lab_user: LabUser, daemons: DaemonSet
) -> None:
    d = daemons.new()
    d.write_profile("work", root_profile(lab, [lab.target_net_v4]))
    d.write_profile("idle", root_profile(lab, [lab.target_net_v4]))
    d.start()
    d.up("work")
    with lab.netns("cli"):
        clients.bulk_download(lab.tgt_v4, DOWN_BYTES, port=lab.ports.bulk)
        clients.bulk_upload(lab.tgt_v4, UP_BYTES, port=lab.ports.bulk)

    # stats is for any local user (like status): no PROFILE means every profile.
    result = d.ctl("stats", "--prometheus", user=lab_user)
    assert result.returncode == 0 and result.stderr == "", (result.stderr, d.log())
    samples = parse_prometheus(result.stdout)

    def value(name: str, profile: str, *labels: tuple[str, str]) -> float:
        return samples[(name, (("profile", profile), *labels))]

    assert value("shuttled_up", "work") == 1 and value("shuttled_up", "idle") == 0
    assert value("shuttled_state", "idle", ("state", "down")) == 1
    assert value("shuttled_receive_bytes_total", "work") >= DOWN_BYTES
    assert value("shuttled_transmit_bytes_total", "work") >= UP_BYTES
    assert value("shuttled_connections_opened_total", "work") >= 2
    assert value("shuttled_connections_active", "work") == 0
    assert ("shuttled_receive_bytes_total", (("profile", "idle"),)) not in samples

    one = d.ctl("stats", "work", "--prometheus")
    assert one.returncode == 0, one.stderr
    # Every series is work's, but the daemon's own (unlabelled) count of restored rules.
    assert {labels[:1] for _, labels in parse_prometheus(one.stdout)} == {
        (("profile", "work"),),
        (),
    }
