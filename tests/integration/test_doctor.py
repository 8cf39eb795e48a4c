"""`shuttled run --check` and `shuttlectl doctor` against the lab's real sshd: every row
passes on a good setup; on a broken one the right row fails, with its fix; a BusyBox
shell on the remote still gives routes and /etc/hosts, from what it has."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.integration.daemon_util import DaemonSet, root_profile
from tests.lab import Lab, LabUser
from tests.lab.env import require_root_tools

CHECK_TIMEOUT = 120.0


def check(lab: Lab, *args: str, ssh: str | None = None) -> tuple[int, dict[str, Any]]:
    """`shuttled run --check --json` in cli: (exit status, the report)."""
    proc = lab.run(
        "cli",
        [
            sys.executable,
            "-m",
            "shuttled",
            "run",
            "--check",
            "--json",
            "-e",
            ssh or lab.ssh_cmd,
            *args,
        ],
        check=False,
        timeout=CHECK_TIMEOUT,
    )
    assert proc.stdout, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)["doctor"]
    return proc.returncode, report


def rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["check"]: row for row in report["checks"]}


def test_every_check_passes_against_the_lab(lab: Lab) -> None:
    status, report = check(lab, "-r", lab.remote, "--dns", "-N", "-H", "--udp")
    found = rows(report)
    assert status == 0 and report["ok"], report
    assert {row["status"] for row in report["checks"]} == {"ok"}, report
    assert list(found)[:4] == ["ssh", "host key", "forwarding", "python"]
    assert f"dns tcp {lab.dns_v4}" in found
    assert lab.target_net_v4 in found["routes"]["result"]


def test_an_unknown_host_key_fails_its_row_with_the_fix(lab: Lab) -> None:
    ssh = f"{lab.ssh_cmd} -o UserKnownHostsFile=/dev/null"
    status, report = check(lab, "-r", lab.remote, ssh=ssh)
    found = rows(report)
    assert status == 1 and not report["ok"]
    assert found["host key"]["status"] == "fail"
    assert "run `ssh srv` once" in found["host key"]["fix"]
    assert found["ssh"]["status"] == "fail"
    assert found["routes"]["status"] == "skip"


def test_a_closed_port_fails_the_ssh_row_and_not_the_host_key(lab: Lab) -> None:
    ssh = f"{lab.ssh_cmd} -o Port=1"  # nothing listens on srv:1
    status, report = check(lab, "-r", lab.srv_v4, ssh=ssh)
    found = rows(report)
    assert status == 1
    assert found["ssh"]["status"] == "fail"
    assert "Connection refused" in found["ssh"]["result"]
    assert found["ssh"]["fix"].startswith("nothing listens there")
    # The lab's known_hosts holds srv's key for every port ([host]:*), so the key is
    # known: a closed port fails the ssh row alone.
    assert found["host key"]["status"] == "ok"


def test_forwarding_refused_fails_only_where_the_profile_needs_it(lab: Lab) -> None:
    status, report = check(lab, "-r", lab.remote_nofwd, "--forward", "direct")
    assert status == 1
    assert rows(report)["forwarding"]["status"] == "fail"
    status, report = check(lab, "-r", lab.remote_nofwd)  # auto: the helper carries TCP
    found = rows(report)
    assert status == 0, report
    assert found["forwarding"]["status"] == "warn"
    assert "carries TCP" in found["python"]["result"]


def busybox_shell(user: LabUser, applets: tuple[str, ...]) -> None:
    """Make the user's login shell BusyBox ash with only `applets` on its PATH."""
    home = Path(user.home)
    bin_dir = home / "bb"
    bin_dir.mkdir(exist_ok=True)
    for applet in applets:
        (bin_dir / applet).symlink_to("/bin/busybox")
    shell = home / "bbsh"
    shell.write_text(f'#!/bin/sh\nPATH={bin_dir} exec /bin/busybox sh "$@"\n')
    os.chmod(shell, 0o755)
    subprocess.run(["usermod", "-s", str(shell), user.name], check=True, timeout=30)


def test_a_busybox_remote_gives_routes_and_hosts_from_what_it_has(
    lab: Lab, lab_user: LabUser
) -> None:
    require_root_tools("busybox")
    busybox_shell(lab_user, ("ip",))  # BusyBox's ip (no -j), and no cat
    ssh = f"ssh -F {shlex.quote(lab_user.ssh_config)} -l {lab_user.name}"
    status, report = check(lab, "-r", lab.remote, "-N", "-H", ssh=ssh)
    found = rows(report)
    assert found["ssh"]["status"] == "ok", report
    assert found["routes"]["status"] == "ok", report
    assert "`ip route show table main`" in found["routes"]["result"]
    assert lab.target_net_v4 in found["routes"]["result"]
    assert found["hosts"]["status"] == "ok", report
    assert found["python"]["status"] in ("ok", "warn")
    assert status == 0, report


def test_busybox_without_ip_names_what_was_not_learned(lab: Lab, lab_user: LabUser) -> None:
    require_root_tools("busybox")
    busybox_shell(lab_user, ())
    ssh = f"ssh -F {shlex.quote(lab_user.ssh_config)} -l {lab_user.name}"
    _, report = check(lab, "-r", lab.remote, ssh=ssh)
    routes = rows(report)["routes"]
    # /proc is still there: read by the shell's own `read`, without cat.
    assert "the shell's read < /proc/net/route" in routes["result"], report


def test_shuttlectl_doctor_through_the_daemon(lab: Lab) -> None:
    with DaemonSet(lab) as daemons:
        d = daemons.new()
        d.write_profile("work", root_profile(lab, [lab.target_net_v4], auto_nets=True))
        d.start()
        done = d.ctl("--json", "doctor", "work")
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)["doctor"]
        assert {row["status"] for row in report["checks"]} == {"ok"}, report
        human = d.ctl("doctor", "work")
        assert human.stdout.splitlines()[0] == f"work ({lab.srv_v4}): all needed checks pass"


def test_a_nameserver_without_tcp_passes_on_udp_through_the_helper(lab: Lab) -> None:
    with lab.dns_tcp_closed("refuse"):
        status, report = check(lab, "-r", lab.remote, "--dns")
    found = rows(report)
    assert status == 0 and report["ok"], report
    assert found[f"dns tcp {lab.dns_v4}"]["status"] == "warn"  # UDP is enough
    assert "refused" in found[f"dns tcp {lab.dns_v4}"]["result"].lower()
    assert found[f"dns udp {lab.dns_v4}"]["status"] == "ok"
