"""The daemon's authorization model and profile isolation, with a real daemon in the lab:
who may bring a profile up, as whom its ssh runs, and profiles side by side."""

from __future__ import annotations

import psutil
import pytest

from tests.integration.daemon_util import (
    DaemonSet,
    http_ok,
    root_profile,
    user_profile,
)
from tests.lab import Lab, LabUser, clients

pytestmark = pytest.mark.integration

DENIED = 5


def test_unprivileged_user_reads_status_and_may_up_only_once_allowed(
    lab: Lab, lab_user: LabUser, daemons: DaemonSet
) -> None:
    d = daemons.new()
    d.write_profile("work", root_profile(lab, [lab.target_net_v4]))
    d.start()

    status = d.ctl("status", user=lab_user)
    assert status.returncode == 0, status.stderr
    assert "work" in status.stdout and "down" in status.stdout
    document = d.ctl_json("status", "work", user=lab_user, ok=(7,))
    assert document["profile"]["state"] == "down"

    # Who connects where through a profile is private: not for any local user.
    for verb in (["up", "work"], ["down", "work"], ["reload"], ["connections", "work"]):
        denied = d.ctl(*verb, user=lab_user)
        assert denied.returncode == DENIED, (verb, denied.stdout, denied.stderr)
        assert "permission denied" in denied.stderr
    assert d.state("work") == "down"
    with lab.netns("cli"):
        outcome, _ = clients.probe_tcp(lab.tgt_v4, lab.ports.http, timeout=1.0)
    assert outcome in ("timeout", "unreachable")

    d.write_profile("work", root_profile(lab, [lab.target_net_v4], allow=[lab_user.name]))
    reload = d.ctl_json("reload")
    assert reload["reload"]["changed"] == ["work"]

    up = d.ctl("up", "work", user=lab_user)
    assert up.returncode == 0, (up.stdout, up.stderr, d.log())
    assert d.state("work") == "up"
    assert http_ok(lab, lab.tgt_v4)
    assert d.ctl("connections", "work", user=lab_user).returncode == 0  # on the allow list
    down = d.ctl("down", "work", user=lab_user)
    assert down.returncode == 0, down.stderr
    assert d.state("work") == "down"
    # Still not an administrator: reload stays root's (or group shuttle's).
    assert d.ctl("reload", user=lab_user).returncode == DENIED


def test_profile_user_runs_the_ssh_master_as_that_user(
    lab: Lab, lab_user: LabUser, daemons: DaemonSet
) -> None:
    d = daemons.new()
    d.write_profile("mine", user_profile(lab_user, [lab.target_net_v4]))
    d.start()
    d.up("mine")

    master = psutil.Process(d.ssh_pid("mine"))
    assert master.name() == "ssh"
    assert master.uids().real == master.uids().effective == lab_user.uid
    assert master.gids().real == master.gids().effective == lab_user.gid
    assert master.environ().get("HOME") == lab_user.home
    assert http_ok(lab, lab.tgt_v4)
    # The connection went through this profile's tunnel.
    assert d.stats("mine")["total"] >= 1


def test_two_profiles_carry_their_own_networks_and_an_overlapping_third_is_refused(
    lab: Lab, daemons: DaemonSet
) -> None:
    n = lab.net
    low, high = f"10.{n}.2.0/25", f"10.{n}.2.128/25"  # tgt_v4 is in low, tgt_v4_alt in high
    d = daemons.new()
    d.write_profile("alpha", root_profile(lab, [low]))
    d.write_profile("beta", root_profile(lab, [high, lab.target_net_v6]))
    d.write_profile("gamma", root_profile(lab, [f"10.{n}.2.0/26"]))
    d.start()
    d.up("alpha")
    d.up("beta")
    pids = {name: d.ssh_pid(name) for name in ("alpha", "beta")}
    assert pids["alpha"] != pids["beta"]

    assert http_ok(lab, lab.tgt_v4)
    assert d.stats("alpha")["total"] == 1 and d.stats("beta")["total"] == 0
    assert http_ok(lab, lab.tgt_v4_alt)
    assert http_ok(lab, lab.tgt_v6)
    assert d.stats("alpha")["total"] == 1 and d.stats("beta")["total"] == 2

    refused = d.ctl("up", "gamma")
    assert refused.returncode != 0
    message = refused.stderr.strip()
    assert "\n" not in message, message
    assert "'alpha'" in message and "'gamma'" in message and "overlap" in message, message
    assert "'beta'" not in message, message

    listing = {p["name"]: p for p in d.ctl_json("list")["profiles"]}
    assert listing["gamma"]["state"] == "down" and not listing["gamma"]["wanted"]
    assert listing["alpha"]["state"] == listing["beta"]["state"] == "up"
    assert {name: d.ssh_pid(name) for name in ("alpha", "beta")} == pids
    assert http_ok(lab, lab.tgt_v4) and http_ok(lab, lab.tgt_v4_alt)
    assert http_ok(lab, lab.tgt_v6)
