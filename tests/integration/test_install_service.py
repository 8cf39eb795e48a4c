"""The pip route as README's Install section gives it: the checkout pip-installed (not
editable) into a fresh venv, then that venv's `shuttled install-service --root`: the unit
passes `systemd-analyze verify` (its ExecStart the venv's program, its man pages found
where they were written), a second run changes nothing, `--uninstall` leaves nothing.

No build tools are needed: systemd-python is no dependency (shuttled/journal.py). The
test stays offline: the venv sees the system's site-packages for the dependencies."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import require_root_tools

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _run(argv: list[str], **kw: object) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{shlex.join(argv)}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return str(proc.stdout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root_tools("systemd-analyze", "man")
    venv = tmp_path_factory.mktemp("install") / "venv"
    # Offline (tests reach no other host): the dependencies, and `wheel` for the build,
    # come from the system's site-packages, where .ci/run put them; pip still checks
    # that each is there.
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    pip = [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "--no-index", "--no-build-isolation", str(REPO)])
    return venv


def test_the_install_requires_no_systemd_python(venv: Path) -> None:
    code = "import importlib.metadata as m; print(m.requires('shuttled'))"
    requires = _run([str(venv / "bin/python"), "-c", code])
    assert "systemd" not in requires.lower()


def test_installed_unit_passes_systemd_analyze_verify(venv: Path, tmp_path: Path) -> None:
    shuttled = str(venv / "bin/shuttled")
    _run([shuttled, "install-service", "--root", str(tmp_path)], cwd="/")
    unit = tmp_path / "etc/systemd/system/shuttled.service"
    assert f"ExecStart={shuttled} daemon" in unit.read_text().splitlines()
    # man:shuttled(8) and the others resolve to the pages install-service wrote.
    env = {**os.environ, "MANPATH": str(tmp_path / "usr/local/share/man")}
    for name in ("shuttled.service", "shuttled-lockdown.service"):
        out = subprocess.run(
            ["systemd-analyze", "verify", "--man=yes", str(tmp_path / "etc/systemd/system" / name)],
            capture_output=True, text=True, timeout=60, check=False, env=env,
        )  # fmt: skip
        assert (out.returncode, out.stdout, out.stderr) == (0, "", ""), name


def test_second_run_says_nothing_to_do_and_uninstall_leaves_nothing(
    venv: Path, tmp_path: Path
) -> None:
    argv = [str(venv / "bin/shuttled"), "install-service", "--root", str(tmp_path)]
    _run(argv)
    assert _run(argv).startswith("nothing to do:")
    _run([*argv, "--uninstall"])
    assert list(tmp_path.iterdir()) == []
