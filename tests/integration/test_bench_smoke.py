"""The bench harness must not rot: its quick mode runs in CI and must produce every figure.

`python3 -m bench --quick --runs 1 --only shuttled,ssh-L,raw-ssh` (a namespace lab, 1-second
iperf3 runs, a few hundred connections) and the JSON it writes must hold every figure of
each contender; speeds are not judged here (that is the full run's job, by hand).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root_tools

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONTENDERS = ("shuttled", "ssh-L", "raw-ssh")
TIMEOUT = 240


def test_quick_bench_produces_every_figure(tmp_path: Path) -> None:
    require_root_tools("ip", "sshd", "ssh", "ssh-keygen", "iperf3", "nft")
    from bench.contenders import ALL

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--runs",
            "1",
            "--only",
            ",".join(CONTENDERS),
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["mode"] == "quick" and doc["missing"] == []
    contenders = doc["ciphers"]["default"]["contenders"]
    assert set(contenders) == set(CONTENDERS)
    for name in CONTENDERS:
        summary = contenders[name]["summary"]
        for figure in ALL[name].figures:
            assert figure in summary, f"{name}: no {figure} ({contenders[name]['errors']})"
            assert summary[figure]["n"] == 1
    # The tables are rendered too.
    assert "| bulk up, 1 stream | Gbit/s |" in proc.stdout
    assert "vs ssh -L" in proc.stdout
