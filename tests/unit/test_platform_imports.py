"""Every module imports on macOS and FreeBSD: nothing Linux-only at import time.

No Mac runs CI, so a fresh interpreter plays one: sys.platform says darwin (or
freebsd14), the systemd package cannot be imported (its environment marker keeps
pip from installing it there), and the socket module loses the Linux-only
constants. Then every module of both packages is imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PRETEND = """
import importlib, importlib.abc, json, pkgutil, socket, sys

sys.platform = PLATFORM

class NoSystemd(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "systemd" or name.startswith("systemd."):
            raise ImportError(f"no module named {name!r} on " + PLATFORM)
        return None

sys.meta_path.insert(0, NoSystemd())
# (SOL_IP stays: CPython defines it as 0 where the C headers do not.)
for name in ("SO_PEERCRED", "SO_PEERGROUPS", "SO_MARK", "IP_TRANSPARENT",
             "IP_RECVORIGDSTADDR", "IPV6_RECVORIGDSTADDR", "SO_BINDTODEVICE", "SO_PASSCRED"):
    if hasattr(socket, name):
        delattr(socket, name)

failed = {}
for package in ("shuttled", "shuttlectl"):
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed[info.name] = f"{type(exc).__name__}: {exc}"

from shuttled import const
from shuttled.firewall import BACKENDS
print(json.dumps({"failed": failed, "backends": list(BACKENDS),
                  "run_dir": str(const.RUN_DIR)}))
"""


@pytest.mark.parametrize("platform", ["darwin", "freebsd14"])
def test_every_module_imports_without_linux(platform: str) -> None:
    code = PRETEND.replace("PLATFORM", repr(platform))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}
    assert result["backends"][0] == "pf"  # auto picks pf there
    assert result["run_dir"] == "/var/run/shuttled"
