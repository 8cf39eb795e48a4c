"""The bench's own tools: venvs for sshuttle and for py-spy/uvloop, and the machine facts."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("SHUTTLED_BENCH_CACHE", "/var/cache/shuttled-bench"))
SSHUTTLE_VERSION = "2.0.0"
# sshuttle lives alone in its venv (nothing of ours on its path).
SSHUTTLE_VENV = CACHE / "venv"
# py-spy and uvloop: with the system site-packages, so shuttled's own dependencies import.
TOOLS_VENV = CACHE / "tools"
REPO = Path(__file__).resolve().parent.parent
PIP_TIMEOUT = 300.0


@dataclass
class ToolStatus:
    path: str | None
    note: str


def _venv(path: Path, *packages: str, system_site: bool = False) -> str | None:
    """Create ``path`` (if needed) and pip-install ``packages``; None on success, else why."""
    python = path / "bin" / "python"
    try:
        if not python.exists():
            argv = [sys.executable, "-m", "venv", str(path)]
            if system_site:
                argv.insert(3, "--system-site-packages")
            subprocess.run(argv, check=True, capture_output=True, text=True, timeout=PIP_TIMEOUT)
        proc = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"venv {path}: {exc}"
    if proc.returncode != 0:
        return f"pip install {' '.join(packages)}: {proc.stderr.strip()[-400:]}"
    return None


def sshuttle() -> ToolStatus:
    """sshuttle from PyPI in the bench's own venv (created on first use)."""
    exe = SSHUTTLE_VENV / "bin" / "sshuttle"
    if exe.exists() and _installed_version(SSHUTTLE_VENV, "sshuttle") == SSHUTTLE_VERSION:
        return ToolStatus(str(exe), f"sshuttle {SSHUTTLE_VERSION} in {SSHUTTLE_VENV}")
    why = _venv(SSHUTTLE_VENV, f"sshuttle=={SSHUTTLE_VERSION}")
    if why or not exe.exists():
        return ToolStatus(None, f"sshuttle skipped: its venv could not be made ({why})")
    return ToolStatus(str(exe), f"sshuttle {SSHUTTLE_VERSION} in {SSHUTTLE_VENV}")


def tools_python(*packages: str) -> ToolStatus:
    """The tools venv's python with ``packages`` (py-spy, uvloop) installed."""
    python = TOOLS_VENV / "bin" / "python"
    missing = [p for p in packages if _installed_version(TOOLS_VENV, p) is None]
    if python.exists() and not missing:
        return ToolStatus(str(python), f"tools venv {TOOLS_VENV}")
    why = _venv(TOOLS_VENV, *packages, system_site=True)
    if why:
        return ToolStatus(None, why)
    return ToolStatus(str(python), f"tools venv {TOOLS_VENV}")


def _installed_version(venv: Path, package: str) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    proc = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))",
            package,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10, check=False)
    iperf = subprocess.run(
        ["iperf3", "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "openssh": (ssh.stderr or ssh.stdout).strip(),
        "iperf3": (iperf.stdout.splitlines() or ["?"])[0].strip(),
        "python": platform.python_version(),
    }


def snapshot(source: str, dest: Path) -> str:
    """Copy the shuttled and shuttlectl packages into ``dest`` so that one bench run
    measures one version even while the work tree changes under it.

    ``source`` is "head" (the last commit, via git archive) or "worktree" (the files as
    they are now).  Returns a description of what was copied."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    rev = commit.stdout.strip() or "?"
    if source == "head":
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "HEAD", "shuttled", "shuttlectl"],
            capture_output=True,
            timeout=60,
            check=True,
        )
        subprocess.run(
            ["tar", "-x", "-C", str(dest)],
            input=archive.stdout,
            check=True,
            capture_output=True,
            timeout=60,
        )
        return f"commit {rev}"
    import shutil

    for package in ("shuttled", "shuttlectl"):
        shutil.copytree(
            REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "shuttled", "shuttlectl"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return f"work tree at {rev}" + (" with local changes" if dirty.stdout.strip() else "")
