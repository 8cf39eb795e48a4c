"""`shuttled run --method iptables` SIGKILLed, then `shuttled cleanup`: the kernel is as
before, for every iptables rule set (plain capture in nat; router mode with a LAN and
UDP in mangle; the kill switch held in filter) and both iptables variants.

The variant is chosen the way the backend finds its tools: by PATH. A directory of
links named like the plain tools (iptables-save, ...) to iptables-nft-* or
iptables-legacy-* goes first on the PATH of the run and of the cleanup.

After a SIGKILL nothing of the run can tidy up: cleanup (another process) finds the
run's chains, removes them, and drops the nft tables iptables-nft made for the run
from the run's record of what existed before (firewall.ipt). Legacy tables are
kernel built-ins that no one can remove once made, so that variant lists them all
first: the comparison is then of what is in them. Compared: `nft list ruleset` byte for
byte, iptables-save of both variants (the date comments and packet counters left out),
`ip rule` and every routing table (router mode's policy routing).

A module of its own (with its own router lab): no other shuttled runs meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from shuttled.const import RUN_DIR
from shuttled.firewall import ipt
from tests.integration.daemon_util import REPO_ROOT
from tests.integration.router_util import block_ssh, kernel_state
from tests.lab import Lab, require_root_tools

pytestmark = pytest.mark.integration

VARIANTS = ("nft", "legacy")
RULES_IN_TIMEOUT = 30.0


def variant_path(variant: str, bin_dir: Path) -> str:
    """A PATH on which the plain iptables names are this variant's tools."""
    path = os.environ.get("PATH", "/usr/bin:/bin")
    for family in ("iptables", "ip6tables"):
        for suffix in ("", "-save", "-restore"):
            tool = f"{family}-{variant}{suffix}"
            require_root_tools(tool)
            found = shutil.which(tool, path=f"{path}:/usr/local/sbin:/usr/sbin:/sbin")
            assert found is not None
            (bin_dir / f"{family}{suffix}").symlink_to(found)
    return f"{bin_dir}:{path}"


def legacy_saves(lab: Lab) -> dict[str, str]:
    """Every legacy table's rules (the save's date comments and counters left out)."""
    out = {}
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        text = lab.run("cli", [tool]).stdout
        out[tool] = "\n".join(
            re.sub(r"\[\d+:\d+\]", "[0:0]", line)
            for line in text.splitlines()
            if not line.startswith("#")
        )
    return out


def make_legacy_tables(lab: Lab) -> None:
    """Instantiate the legacy tables a run may use (listing one makes it)."""
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        for table in ipt.TABLES:
            lab.run("cli", [tool, "-w", "-t", table, "-S"])


def kernel(lab: Lab) -> dict[str, str]:
    """nft ruleset, policy rules and routes (kernel_state), and the legacy tables."""
    return {**kernel_state(lab), **legacy_saves(lab)}


def uncounted(state: dict[str, str]) -> dict[str, str]:
    """Without the counters of iptables-nft rules (traffic moves them)."""
    return {k: re.sub(r"counter packets \d+ bytes \d+", "counter", v) for k, v in state.items()}


def records(pid: int) -> list[Path]:
    return sorted(RUN_DIR.glob(f"iptables-tables-*-SHUTTLED_run_{pid}.json"))


@contextlib.contextmanager
def killed_run(
    lab: Lab, args: list[str], path: str, name: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`shuttled run` in cli; on leaving, SIGKILLed by PID, its children (ssh) after it."""
    argv = [sys.executable, "-m", "shuttled", "run", "-v", "--method", "iptables"]
    argv += ["-e", lab.ssh_cmd, "-r", lab.remote, *args]
    env = {**os.environ, "PATH": path}
    proc: subprocess.Popen[bytes] = lab.popen("cli", argv, name=name, env=env, cwd=str(REPO_ROOT))
    children: list[psutil.Process] = []
    try:
        yield proc
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()  # psutil checks the create time: never a reused pid
        psutil.wait_procs(children, timeout=5)
        lab.stop(proc)


def wait_until(
    what: str, done: Callable[[], bool], proc: subprocess.Popen[bytes], log: str
) -> None:
    deadline = time.monotonic() + RULES_IN_TIMEOUT
    while not done():
        assert proc.poll() is None, f"the run ended before {what}: {log}"
        assert time.monotonic() < deadline, f"no {what} after {RULES_IN_TIMEOUT} s"
        time.sleep(0.05)


def settled(lab: Lab, proc: subprocess.Popen[bytes]) -> dict[str, str]:
    """The kernel once the run has put all of its rules in (two looks 0.5 s apart agree):
    a holding run goes on applying after its first reject rule shows, and a SIGKILL in
    between would catch it mid-way."""
    deadline = time.monotonic() + RULES_IN_TIMEOUT
    last = kernel(lab)
    while True:
        time.sleep(0.5)
        now = kernel(lab)
        if uncounted(now) == uncounted(last):
            return now
        assert proc.poll() is None, "the run ended while putting its rules in"
        assert time.monotonic() < deadline, f"rules still changing after {RULES_IN_TIMEOUT} s"
        last = now


def run_cleanup(lab: Lab, path: str) -> subprocess.CompletedProcess[str]:
    """`shuttled cleanup` in cli with this variant's tools first on the PATH."""
    return lab.run(
        "cli",
        [sys.executable, "-m", "shuttled", "cleanup"],
        env={**os.environ, "PATH": path},
        cwd=str(REPO_ROOT),
        check=False,
    )


RULE_SETS = ("capture", "router", "held")
MARKS = {"capture": "-j REDIRECT", "router": "-j TPROXY", "held": "-j REJECT"}


def ready(lab: Lab, rule_set: str, variant: str, name: str) -> Callable[[], bool]:
    """Up (capture, router), or holding: ssh is blocked, so the run never comes up."""
    if rule_set != "held":
        return lambda: "is up" in lab.log_tail(name, 200)
    save = [f"iptables-{variant}-save", "-t", "filter"]
    return lambda: MARKS[rule_set] in lab.run("cli", save).stdout


def run_args(lab: Lab, rule_set: str) -> list[str]:
    if rule_set == "router":  # TPROXY in mangle for the LAN and local UDP
        return ["--lan", lab.if_cli_lan, "--udp", *lab.target_nets]
    if rule_set == "held":  # ssh blocked: the kill switch holds (filter) while connecting
        return ["--kill-switch", *lab.target_nets]
    return list(lab.target_nets)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_cleanup_after_sigkill_restores_the_kernel(
    rlab: Lab, tmp_path: Path, rule_set: str, variant: str
) -> None:
    require_root_tools("iptables-legacy-save", "ip6tables-legacy-save", "nft", "ip")
    path = variant_path(variant, tmp_path)
    if variant == "legacy":
        make_legacy_tables(rlab)
    before = kernel(rlab)
    name = f"kill-{rule_set}-{variant}"
    block_ssh(rlab, rule_set == "held")
    try:
        with killed_run(rlab, run_args(rlab, rule_set), path, name) as proc:
            wait_until(rule_set, ready(rlab, rule_set, variant, name), proc, name)
            during = settled(rlab, proc)
            assert records(proc.pid), "no record of the tables before the run's rules"
        assert during != before
        ours = during["iptables-save" if variant == "nft" else "iptables-legacy-save"]
        assert f"SHUTTLED_run_{proc.pid}" in ours, during  # in the variant we meant
        assert MARKS[rule_set] in ours, during
        assert uncounted(kernel(rlab)) == uncounted(during)  # SIGKILL: nothing tidied up
        cleanup = run_cleanup(rlab, path)
        assert cleanup.returncode == 0, cleanup.stderr
        assert f"iptables shuttled_run_{proc.pid}" in cleanup.stdout + cleanup.stderr
        assert kernel(rlab) == before
        assert not records(proc.pid)
    finally:
        block_ssh(rlab, False)
        run_cleanup(rlab, path)  # after a failed assertion too: the next case starts clean
