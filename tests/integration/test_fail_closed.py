"""Fail closed, as an attacker or a crash would test it: a second daemon, a hand-run
cleanup, a first connect that cannot reach the server. Real daemon, real rules, and
nft counters on the client's outside link for what leaves in the clear."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import pytest

from tests.integration.daemon_util import (
    REPO_ROOT,
    Daemon,
    DaemonSet,
    http_ok,
    nft_table,
    root_profile,
)
from tests.integration.dns_util import leak_counter
from tests.integration.router_util import block_ssh
from tests.lab import Lab, clients
from tests.lab.runner import start_run, stop_run

pytestmark = pytest.mark.integration

METHODS = ["nft", "iptables"]


def shuttled(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.run(
        "cli", [sys.executable, "-m", "shuttled", *args], check=False, cwd=str(REPO_ROOT)
    )


def try_leaks(lab: Lab, seconds: float) -> None:
    """What an app would send meanwhile: DNS to the resolver and to the remote's
    nameserver, TCP and UDP to the target; every attempt short."""
    deadline = time.monotonic() + seconds
    with lab.netns("cli"):
        while time.monotonic() < deadline:
            for server, tcp in (
                (lab.fake_dns_v4, False),
                (lab.dns_v4, False),
                (lab.fake_dns_v4, True),
            ):
                with contextlib.suppress(OSError, clients.TransferError):
                    clients.dns_query(server, "leaktest.example", tcp=tcp, timeout=0.2)
            clients.probe_tcp(lab.tgt_v4, lab.ports.http, timeout=0.2)
            with contextlib.suppress(OSError):
                clients.udp_echo(lab.tgt_v4, b"leak?", timeout=0.2)


@pytest.mark.parametrize("method", METHODS)
def test_a_second_daemon_changes_nothing_and_names_the_first(
    lab: Lab, daemons: DaemonSet, method: str
) -> None:
    first = daemons.new(method=method)
    first.write_profile("work", root_profile(lab, lab.target_nets))
    first.start()
    first.up("work")
    rules = lab.firewall_snapshot()
    second = daemons.new(method=method)
    second.write_profile("other", root_profile(lab, lab.target_nets))
    proc = lab.popen("cli", second.argv(), name="second-daemon", cwd=str(REPO_ROOT))
    assert proc.wait(20) == 1
    said = lab.log_tail("second-daemon", 20)
    assert f"another shuttled daemon is running (pid {first.pid})" in said, said
    assert "removed" not in said, said
    assert lab.firewall_snapshot() == rules
    assert http_ok(lab, lab.tgt_v4) and first.state("work") == "up"


def test_hand_run_cleanup_refuses_while_a_daemon_runs_unless_forced(
    lab: Lab, daemons: DaemonSet
) -> None:
    d = daemons.work_up()
    rules = lab.firewall_snapshot()
    refused = shuttled(lab, "cleanup")
    assert refused.returncode != 0
    assert f"the daemon (pid {d.pid}) running" in refused.stderr, refused.stderr
    assert lab.firewall_snapshot() == rules and http_ok(lab, lab.tgt_v4)
    forced = shuttled(lab, "cleanup", "--force")
    assert forced.returncode == 0, forced.stderr
    assert nft_table(lab) is None


def test_cleanup_leaves_a_running_shuttled_run_alone(lab: Lab) -> None:
    proc = start_run(lab, *lab.target_nets, name="run-beside-cleanup")
    try:
        refused = shuttled(lab, "cleanup")
        assert refused.returncode != 0 and f"shuttled run (pid {proc.pid}" in refused.stderr, (
            refused.stderr
        )
        with lab.netns("cli"):
            assert clients.http_get(lab.tgt_v4).status == 200
    finally:
        assert stop_run(lab, proc) == 0


@pytest.mark.parametrize("method", METHODS)
def test_kill_switch_lets_no_dns_or_subnet_traffic_out_on_the_first_connect(
    lab: Lab, daemons: DaemonSet, method: str
) -> None:
    d = daemons.new(method=method)
    d.write_profile(
        "work", root_profile(lab, lab.target_nets, kill_switch=True, dns={"mode": "all"})
    )
    block_ssh(lab, True)
    try:
        d.start()
        with leak_counter(lab, list(lab.target_nets)) as leaks:
            assert d.ctl("up", "work", "--no-wait").returncode == 0
            deadline = time.monotonic() + 15
            while not d.status("work").get("holding") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert d.status("work")["state"] in ("connecting", "reconnecting")
            try_leaks(lab, 4.0)
            assert leaks.packets() == 0, nft_table(lab)
    finally:
        block_ssh(lab, False)
    d.wait_state("work", "up", timeout=40)
    assert http_ok(lab, lab.tgt_v4)
    assert d.ctl("down", "work").returncode == 0


def test_reload_racing_up_and_down_leaves_state_rules_and_wanted_in_agreement(
    lab: Lab, daemons: DaemonSet
) -> None:
    d = daemons.work_up(kill_switch=True)
    for round_ in range(6):
        # A changed profile: each reload replaces the running tunnel.
        d.write_profile(
            "work", root_profile(lab, lab.target_nets, kill_switch=True, keepalive=11 + round_)
        )
        verb = ("down",) if round_ % 2 == 0 else ("up", "--no-wait")
        racers = [
            subprocess.Popen(
                d.ctl_argv(*argv),
                cwd=str(REPO_ROOT),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for argv in (("reload",), (verb[0], "work", *verb[1:]), ("reload",))
        ]
        for racer in racers:
            racer.wait(60)
        wanted = d.status("work")["wanted"]
        assert wanted is (verb[0] == "up"), d.log()
        table = nft_table(lab) or ""
        assert table.count("chain cap_work") == (1 if wanted else 0), table
    d.up("work")
    assert http_ok(lab, lab.tgt_v4)
    assert d.ctl("down", "work").returncode == 0
    assert "cap_work" not in (nft_table(lab) or "")


DISRUPTIONS = [
    pytest.param("nft", ["nft flush ruleset"], id="nft-flush-ruleset"),
    pytest.param("nft", ["nft delete table inet shuttled"], id="nft-delete-table"),
    pytest.param("iptables", ["iptables -t nat -F", "iptables -t nat -X"], id="iptables-nat-F-X"),
    pytest.param("iptables", ["nft flush ruleset"], id="iptables-nft-flush-ruleset"),
]


def captured(lab: Lab) -> bool:
    """A new connection to the target goes through the tunnel (nothing else routes it)."""
    try:
        return http_ok(lab, lab.tgt_v4, timeout=1.0)
    except OSError:
        return False


@pytest.mark.parametrize(("method", "commands"), DISRUPTIONS)
def test_rules_someone_else_removes_are_restored_within_two_seconds_and_counted(
    lab: Lab, daemons: DaemonSet, method: str, commands: list[str]
) -> None:
    d = daemons.new(method=method)
    d.write_profile("work", root_profile(lab, lab.target_nets))
    d.start()
    d.up("work")
    watch = daemons.watch(d)
    with lab.netns("cli"):
        download = clients.hold_connection(lab.tgt_v4, 30)  # an established connection
    try:
        for command in commands:
            lab.run("cli", command.split())
        t0 = time.monotonic()
        while not captured(lab) and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        restored_after = time.monotonic() - t0
        print(f"{method} {commands}: captured again after {restored_after:.2f} s")
        assert captured(lab), d.log()
        assert restored_after < 2.5, restored_after
        download.settimeout(0.3)
        with pytest.raises(TimeoutError):  # still open: no reset, no EOF
            download.recv(1)
    finally:
        download.close()
    stats = d.stats("work")
    assert stats["rules_restored"] >= 1, stats
    assert (
        " were deleted " in stats["rules_last_loss"] or " were changed " in stats["rules_last_loss"]
    ), stats
    assert "restored" in d.log(200)
    assert any(e.get("type") == "rules" for e in watch.events()), watch.events()
    assert d.state("work") == "up"


def lockdown_table(lab: Lab) -> bool:
    return (
        lab.run("cli", ["nft", "list", "tables"]).stdout.count("shuttled_lockdown") > 0
        or "SHUTTLED_lockdown" in lab.run("cli", ["iptables-save"], check=False).stdout
    )


def kill_switched(daemons: DaemonSet, lab: Lab, method: str) -> Daemon:
    d = daemons.new(method=method)
    d.write_profile(
        "work", root_profile(lab, lab.target_nets, kill_switch=True, dns={"mode": "all"})
    )
    d.start()
    d.up("work")
    return d


@pytest.mark.parametrize("method", METHODS)
def test_lockdown_outlives_sigkill_and_sigterm_and_only_down_lifts_it(
    lab: Lab, daemons: DaemonSet, method: str
) -> None:
    d = kill_switched(daemons, lab, method)
    with leak_counter(lab, list(lab.target_nets)) as leaks:
        try_leaks(lab, 1.0)  # up: UDP and ICMP the tunnel does not carry are refused too
        lab.run("cli", ["ping", "-c", "2", "-i", "0.2", "-W", "0.3", lab.tgt_v4], check=False)
        assert leaks.packets() == 0 and http_ok(lab, lab.tgt_v4)
        d.kill()
        assert lockdown_table(lab)
        try_leaks(lab, 2.0)
        assert leaks.packets() == 0
        d.start()  # as systemd's Restart= would
        d.wait_state("work", "up")
        assert http_ok(lab, lab.tgt_v4)
        assert d.stop() == 0  # SIGTERM, the profile still wanted
        assert lockdown_table(lab)
        try_leaks(lab, 2.0)
        assert leaks.packets() == 0
        assert shuttled(lab, "cleanup").returncode == 0 and lockdown_table(lab)
        try_leaks(lab, 1.0)
        assert leaks.packets() == 0
    d.start()
    d.wait_state("work", "up")
    assert d.ctl("down", "work").returncode == 0
    assert not lockdown_table(lab)


@pytest.mark.parametrize("method", METHODS)
def test_boot_loads_the_lockdown_before_anything_else(
    lab: Lab, daemons: DaemonSet, method: str
) -> None:
    d = kill_switched(daemons, lab, method)
    d.kill()
    # A reboot: the kernel forgets every rule; the state directory stays.
    saved = (d.state_dir / "lockdown.json").read_text()
    assert shuttled(lab, "cleanup", "--force", "--all").returncode == 0
    assert not lockdown_table(lab)
    (d.state_dir / "lockdown.json").write_text(saved)
    booted = shuttled(lab, "--state-dir", str(d.state_dir), "lockdown")
    assert booted.returncode == 0, booted.stderr
    assert "locked down: work" in booted.stdout
    with leak_counter(lab, list(lab.target_nets)) as leaks:
        try_leaks(lab, 2.0)
        assert leaks.packets() == 0
    d.start()
    d.wait_state("work", "up")
    assert http_ok(lab, lab.tgt_v4)
    assert d.ctl("down", "work").returncode == 0
    assert not lockdown_table(lab)
