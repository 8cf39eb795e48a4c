"""`shuttled run` in the lab's client namespace, for the integration tests: start it and
wait until it says it is up, stop it by signal, and the tunnel variants (firewall backend x
forwarding mode) the suites run over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from .core import Lab, LabUser

UP_TIMEOUT = 30.0


VARIANTS = [
    pytest.param(("nft", False), id="nft-direct"),
    pytest.param(("iptables", False), id="iptables-direct"),
    pytest.param(("nft", True), id="nft-helper"),
    pytest.param(("iptables", True), id="iptables-helper"),
]


def start_run(
    lab: Lab,
    *args: str,
    method: str = "nft",
    remote: str | None = None,
    name: str = "shuttled",
    user: LabUser | None = None,
    module: str = "shuttled",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """`shuttled run` in cli; with `user`, as if started by that user through sudo.
    `module`: what runs it (tests.lab.faulty for fault injection); `env`: added."""
    ssh = [] if user else ["-e", lab.ssh_cmd]
    argv = [
        sys.executable,
        "-m",
        module,
        "run",
        "-v",
        "--method",
        method,
        *ssh,
        "-r",
        remote or lab.remote,
        *args,
    ]
    sudo = {"SUDO_UID": str(user.uid), "SUDO_GID": str(user.gid)} if user else {}
    env = {**os.environ, **sudo, **(env or {})} if user or env else None
    proc: subprocess.Popen[bytes] = lab.popen("cli", argv, name=name, env=env)
    deadline = time.monotonic() + UP_TIMEOUT
    while "is up" not in lab.log_tail(name, 200):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"shuttled did not come up:\n{lab.log_tail(name, 60)}")
        time.sleep(0.05)
    return proc


def stop_run(lab: Lab, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(10)
    finally:
        lab.stop(proc)
