"""Man pages: generated from the parsers and PROFILE_KEYS, shipped in packaging/man/."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from shuttlectl.cli import COMMANDS
from shuttlectl.cli import build_parser as shuttlectl_parser
from shuttled import manpages
from shuttled.cli import REFUSED_RUN_FLAGS
from shuttled.cli import build_parser as shuttled_parser
from shuttled.config import PROFILE_KEYS
from shuttled.const import ExitCode

REPO = Path(__file__).resolve().parents[2]
MAN = REPO / "packaging" / "man"


@pytest.mark.parametrize("name", sorted(manpages.PAGES))
def test_shipped_pages_match_the_generator(name: str) -> None:
    # Regenerate with: python3 -m shuttled.manpages packaging/man
    assert (MAN / name).read_text() == manpages.PAGES[name]()


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """The documented flags: a hidden one (a refused sshuttle flag) is in the epilog."""
    return {
        flag for a in parser._actions if a.help != argparse.SUPPRESS for flag in a.option_strings
    }


def _escaped(flag: str) -> str:
    return manpages.bold(flag)


def test_shuttlectl_page_has_every_verb_and_option() -> None:
    page = (MAN / "shuttlectl.1").read_text()
    parser = shuttlectl_parser()
    subs = manpages.subcommands(parser)
    assert set(subs) == set(COMMANDS)
    for verb, sub in subs.items():
        assert f".SS {manpages.bold(verb)}" in page, verb
        for flag in _flags(sub):
            assert _escaped(flag) in page, (verb, flag)
        for action in sub._actions:
            for choice in action.choices or ():
                assert manpages.bold(str(choice)) in page, (verb, choice)
    for flag in _flags(parser):
        assert _escaped(flag) in page, flag


def test_shuttled_page_has_every_command_and_option() -> None:
    page = (MAN / "shuttled.8").read_text()
    parser = shuttled_parser()
    subs = manpages.subcommands(parser)
    assert set(subs) == {
        "daemon",
        "run",
        "check",
        "cleanup",
        "lockdown",
        "install-service",
        "trust",
    }
    for name, sub in subs.items():
        assert f".SS {name}\n" in page, name
        for flag in _flags(sub):
            assert _escaped(flag) in page, (name, flag)
    for flag in _flags(parser):
        assert _escaped(flag) in page, flag
    for method in ("auto", "nft", "iptables", "pf"):
        assert manpages.bold(method) in page
    for flags, _, reason in REFUSED_RUN_FLAGS:
        assert manpages.roff(f"  {'/'.join(flags)}: {reason}") in page


def test_profile_page_has_every_key() -> None:
    page = (MAN / "shuttled-profile.5").read_text()
    for key, spec in PROFILE_KEYS.items():
        assert f".TP\n{manpages.bold(key)}\n" in page, key
        assert manpages.roff(spec.help) in page, key


@pytest.mark.parametrize("name", ["shuttled.8", "shuttlectl.1"])
def test_exit_codes_are_documented(name: str) -> None:
    page = (MAN / name).read_text()
    for code in ExitCode:
        assert f".TP\n{manpages.bold(str(int(code)))}\n{manpages.EXIT_MEANINGS[code]}" in page


def test_roff_escaping() -> None:
    assert manpages.roff("--json and one-shot") == "\\-\\-json and one-shot"
    assert manpages.roff("a\\b") == "a\\eb"
    assert manpages.roff(".hidden\n'quoted") == "\\&.hidden\n\\&'quoted"


@pytest.mark.parametrize("name", sorted(manpages.PAGES))
def test_pages_render_without_warnings(name: str) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(MAN / name)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_main_writes_every_page(tmp_path: Path) -> None:
    assert manpages.main([str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(manpages.PAGES)
    assert manpages.main([]) == ExitCode.USAGE
