"""`shuttlectl reload` with a real daemon: only what changed is touched; a broken
configuration is refused and the running one carries on."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import threading

import pytest

from tests.integration.daemon_util import DaemonSet, http_ok, root_profile, wait_for
from tests.lab import Lab, stream_sha256

pytestmark = pytest.mark.integration

SIZE = 64 << 20
SEED = 11


class PausedDownload:
    """A bulk DOWN from cli that reads 1 MiB, stops reading until resumed, then reads the
    rest: the connection is open (and the server blocked on flow control) meanwhile."""

    def __init__(self, lab: Lab, host: str) -> None:
        self.lab, self.host = lab, host
        self.started, self.resume = threading.Event(), threading.Event()
        self.digest = hashlib.sha256()
        self.count = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.lab.netns("cli"):
                sock = socket.create_connection((self.host, self.lab.ports.bulk), timeout=30)
            with sock:
                sock.sendall(f"DOWN {SIZE} {SEED}\n".encode())
                while chunk := sock.recv(1 << 16):
                    self.digest.update(chunk)
                    self.count += len(chunk)
                    if self.count >= 1 << 20 and not self.started.is_set():
                        self.started.set()
                        if not self.resume.wait(60):
                            raise TimeoutError("never resumed")
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()

    def finish(self, timeout: float = 60.0) -> None:
        self.resume.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "download did not finish in time"
        if self.error is not None:
            raise self.error
        assert self.count == SIZE, f"{self.count} of {SIZE} bytes"
        assert self.digest.hexdigest() == stream_sha256(SEED, SIZE)


def test_connection_opened_before_reload_keeps_transferring(lab: Lab, daemons: DaemonSet) -> None:
    d = daemons.work_up(autostart=True)
    ssh_pid = d.ssh_pid("work")

    download = PausedDownload(lab, lab.tgt_v4)
    assert download.started.wait(30) and download.error is None, download.error
    assert d.stats("work")["active"] == 1

    d.write_profile("extra", root_profile(lab, [f"10.{lab.net}.9.0/24"]))
    result = d.ctl_json("reload")["reload"]
    assert result["added"] == ["extra"] and result["unchanged"] == ["work"], result
    assert result["changed"] == [] and result["removed"] == [], result
    assert download.thread.is_alive() and download.count < SIZE  # still mid-transfer

    download.finish()
    assert d.ssh_pid("work") == ssh_pid
    assert d.state("work") == "up" and d.state("extra") == "down"
    assert http_ok(lab, lab.tgt_v4)


def test_broken_yaml_on_reload_is_refused_and_running_profiles_are_untouched(
    lab: Lab, daemons: DaemonSet
) -> None:
    d = daemons.work_up()
    ssh_pid = d.ssh_pid("work")
    rules = d.lab.run("cli", ["nft", "list", "table", "inet", "shuttled"]).stdout

    broken = d.write_file("broken.yaml", "other:\n  remote: srv\n  subnets: [10.1.0.0/16\n")
    refused = d.ctl("reload")
    assert refused.returncode != 0
    assert re.search(rf"{re.escape(str(broken))}:\d+: YAML syntax error", refused.stderr), (
        refused.stderr
    )

    # A profile that changed in the same edit is not applied either.
    d.write_profile("work", root_profile(lab, [lab.target_net_v4]))
    assert d.ctl("reload").returncode != 0
    assert d.state("work") == "up"
    assert d.ssh_pid("work") == ssh_pid
    assert d.lab.run("cli", ["nft", "list", "table", "inet", "shuttled"]).stdout == rules
    assert http_ok(lab, lab.tgt_v4) and http_ok(lab, lab.tgt_v6)

    # An unknown key is refused the same way, naming file:line and the key.
    d.remove_file("broken.yaml")
    bad = d.write_file(
        "bad.yaml", "other:\n  remote: srv\n  subnets: [10.1.0.0/16]\n  sunbets: [10.2.0.0/16]\n"
    )
    refused = d.ctl("reload")
    assert refused.returncode != 0
    assert f"{bad}:4" in refused.stderr and "sunbets" in refused.stderr, refused.stderr
    assert d.ssh_pid("work") == ssh_pid

    # Once fixed, the reload applies (work changed: it restarts with its new subnets).
    d.remove_file("bad.yaml")
    result = d.ctl_json("reload")["reload"]
    assert result["changed"] == ["work"], result
    d.wait_state("work", "up")
    assert http_ok(lab, lab.tgt_v4)


def test_sighup_reloads_and_a_broken_config_on_sighup_keeps_the_daemon_running(
    lab: Lab, daemons: DaemonSet
) -> None:
    d = daemons.work_up()
    ssh_pid = d.ssh_pid("work")

    d.write_profile("extra", root_profile(lab, [f"10.{lab.net}.9.0/24"]))
    os.kill(d.pid, signal.SIGHUP)
    wait_for(
        "SIGHUP to load the new profile",
        lambda: "extra" in {p["name"] for p in d.ctl_json("list")["profiles"]},
        10.0,
    )

    d.write_file("broken.yaml", "other: [\n")
    os.kill(d.pid, signal.SIGHUP)
    wait_for(
        "the refused reload to be logged", lambda: "reload refused" in d.log(), 10.0, detail=d.log
    )
    assert d.alive
    assert d.state("work") == "up" and d.ssh_pid("work") == ssh_pid
    assert http_ok(lab, lab.tgt_v4)


def test_a_broken_file_at_start_disables_only_its_profiles_and_a_fix_loads_them(
    lab: Lab, daemons: DaemonSet
) -> None:
    d = daemons.new()
    d.write_profile("work", root_profile(lab, lab.target_nets, autostart=True))
    broken = d.write_file("broken.yaml", f"bad:\n  remote: srv\n  subnets: [10.{lab.net}.9.0/33]\n")
    error = (
        f"{broken}:3: bad.subnets: subnet '10.{lab.net}.9.0/33': "
        f"prefix length 33 is over 32 for IPv4"
    )
    d.start()
    d.wait_state("work", "up")
    assert http_ok(lab, lab.tgt_v4)
    assert f"bad is invalid, not loaded: {error}" in d.log(), d.log()

    bad = d.status("bad")
    assert (bad["state"], bad["last_error"]) == ("invalid", error)
    human = d.ctl("status")
    assert human.returncode == 0, human.stdout  # invalid, but nobody asked for it up
    assert f"- bad: invalid: {error}" in human.stdout, human.stdout
    refused = d.ctl("up", "bad")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == f"shuttlectl: bad is invalid: {error}"

    # A reload keeps all or nothing: refused, logged with the error, work untouched.
    ssh_pid = d.ssh_pid("work")
    reload = d.ctl("reload")
    assert reload.returncode == 2 and error in reload.stderr, reload.stderr
    wait_for("the refused reload in the log", lambda: "reload refused" in d.log(), 10.0)
    assert error in d.log()
    assert d.state("work") == "up" and d.ssh_pid("work") == ssh_pid

    d.write_file("broken.yaml", f"bad:\n  remote: srv\n  subnets: [10.{lab.net}.9.0/24]\n")
    assert d.ctl_json("reload")["reload"]["added"] == ["bad"]
    assert d.state("bad") == "down" and d.ssh_pid("work") == ssh_pid
