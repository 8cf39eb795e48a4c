"""Shell completion: generated from the parser, shipped in packaging/, completes profiles."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from shuttlectl.cli import build_parser
from shuttlectl.completion import script

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {
    "bash": REPO / "packaging/completion/shuttlectl.bash",
    "zsh": REPO / "packaging/completion/_shuttlectl",
}


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_shipped_scripts_match_the_generator(shell: str) -> None:
    # Regenerate with: shuttlectl completion bash > packaging/completion/shuttlectl.bash
    assert SHIPPED[shell].read_text() == script(shell, build_parser())


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_scripts_parse(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    subprocess.run([shell, "-n", str(SHIPPED[shell])], check=True)


def complete(tmp_path: Path, line: str) -> list[str]:
    """Run the bash completion function for `line` (the cursor at its end)."""
    fake = tmp_path / "bin" / "shuttlectl"
    fake.parent.mkdir(exist_ok=True)
    # A stand-in for the CLI: records its arguments, knows two profiles.
    fake.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n'
        'case "$*" in *"list --names"*) printf "work\\nlab\\n";; esac\n'
    )
    fake.chmod(0o755)
    words = line.split(" ")
    program = (
        f"source {SHIPPED['bash']}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        "_shuttlectl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "-c", program],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": f"{fake.parent}:/usr/bin:/bin"},
    )
    return [w for w in result.stdout.splitlines() if w]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "shuttlectl ",
            [
                "list",
                "status",
                "up",
                "down",
                "stats",
                "connections",
                "reload",
                "doctor",
                "watch",
                "version",
                "completion",
            ],
        ),
        ("shuttlectl st", ["status", "stats"]),
        ("shuttlectl up ", ["work", "lab"]),
        ("shuttlectl --json down w", ["work"]),
        ("shuttlectl up work ", []),
        ("shuttlectl up --timeout ", []),
        ("shuttlectl up --n", ["--no-wait"]),
        ("shuttlectl list --", ["--help", "--socket", "--json", "--names"]),
        ("shuttlectl completion ", ["bash", "zsh"]),
        ("shuttlectl reload ", []),
    ],
)
def test_bash_completes_verbs_options_and_profile_names(
    tmp_path: Path, line: str, expected: list[str]
) -> None:
    assert complete(tmp_path, line) == expected


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_asks_the_daemon_named_by_socket(tmp_path: Path) -> None:
    assert complete(tmp_path, "shuttlectl --socket /x.sock stats ") == ["work", "lab"]
    assert (tmp_path / "calls").read_text() == "--socket /x.sock list --names\n"
