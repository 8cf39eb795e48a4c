"""Config messages in our words, `shuttled check`, and profiles of broken files (invalid)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from shuttlectl import render
from shuttled.__main__ import main
from shuttled.cli import parse, run_spec
from shuttled.config import ConfigErrors, load_config
from shuttled.control.schema import PROFILE_STATES
from shuttled.daemon import Daemon
from shuttled.errors import ConfigError
from shuttled.supervisor import State
from tests.helpers import config_errors, write_config

GOOD = "good:\n  remote: g.example\n  subnets: [10.9.0.0/16]\n"


write = write_config
errors_of = config_errors


# --- the messages -------------------------------------------------------------------------


def test_a_prefix_length_over_the_familys_is_named_with_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "a:\n  remote: h\n  subnets: [10.79.0.0/33]\n")
    assert errors_of(tmp_path) == [
        f"{path}:3: a.subnets: subnet '10.79.0.0/33': prefix length 33 is over 32 for IPv4"
    ]


def test_host_bits_set_are_a_warning_naming_the_network_meant(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "a:\n  remote: h\n  subnets:\n    - 10.81.0.1/24\n")
    config = load_config(tmp_path)
    assert config.warnings == (
        f"{path}:4: a.subnets: subnet '10.81.0.1/24': host bits set: means 10.81.0.0/24",
    )
    assert config.profiles["a"].subnets == ("10.81.0.1/24",)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a:\n\tremote: h\n", 2),  # "found character that cannot start any token"
        ("a:\n  remote: h\n\tsubnets: [10.0.0.0/8]\n", 3),  # "... violates indentation"
        ("a:\n  subnets:\n\t- 10.0.0.0/8\n", 3),
    ],
)
def test_a_tab_in_the_yaml_is_named_with_its_line(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, "p.yaml", text)
    assert errors_of(tmp_path) == [f"{path}:{line}: tabs are not allowed in YAML; use spaces"]


@pytest.mark.parametrize("flag", ["-s", "-X"])
def test_run_subnet_files_name_the_file_and_line_of_a_bad_subnet(tmp_path: Path, flag: str) -> None:
    path = tmp_path / "nets"
    path.write_text("# ours\n10.1.0.0/16\n\n10.79.0.0/33  # typo\n")
    with pytest.raises(ConfigError) as info:
        run_spec(parse(["run", "-r", "h", "10.0.0.0/8", flag, str(path)]))
    assert str(info.value) == (
        f"{path}:4: subnet '10.79.0.0/33': prefix length 33 is over 32 for IPv4"
    )


def test_run_warns_of_host_bits_with_the_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "nets"
    path.write_text("10.1.0.0/16\n10.2.0.1/16\n")
    with caplog.at_level(logging.WARNING):
        spec = run_spec(parse(["run", "-r", "h", "-s", str(path), "10.81.0.1/24"]))
    assert [str(s.network) for s in spec.subnets] == ["10.81.0.0/24", "10.1.0.0/16", "10.2.0.0/16"]
    assert [r.getMessage() for r in caplog.records] == [
        "subnet '10.81.0.1/24': host bits set: means 10.81.0.0/24",
        f"{path}:2: subnet '10.2.0.1/16': host bits set: means 10.2.0.0/16",
    ]


# --- shuttled check ---------------------------------------------------------------------------


def test_check_lists_every_error_of_every_file_and_warnings_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "a.yaml", GOOD)
    tabs = write(tmp_path, "b.yaml", "bad:\n\tremote: h\n")
    two = write(
        tmp_path,
        "c.yaml",
        "c:\n  remote: h\n  subnets: [10.81.0.1/24, 10.79.0.0/33]\n  bogus: 1\n",
    )
    assert main(["check", "--config-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"warning: {two}:3: c.subnets: subnet '10.81.0.1/24': host bits set: means 10.81.0.0/24",
        f"{tabs}:2: tabs are not allowed in YAML; use spaces",
        f"{two}:3: c.subnets: subnet '10.79.0.0/33': prefix length 33 is over 32 for IPv4",
        f"{two}:4: c.bogus: unknown key",
        f"3 errors in {tmp_path}",
    ]


def test_check_of_a_good_config_says_ok_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "a.yaml", GOOD)
    write(tmp_path, "b.yaml", "b: {remote: h, subnets: [10.8.0.0/16]}\n")
    # --config-dir is taken before the command as well as after it
    assert main(["--config-dir", str(tmp_path), "check"]) == 0
    assert capsys.readouterr() == ("configuration OK: 2 profiles\n", "")


def test_check_of_a_missing_directory_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--config-dir", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{tmp_path / 'nope'}: not a directory",
        f"1 error in {tmp_path / 'nope'}",
    ]


# --- partial loading: the daemon's start ------------------------------------------------------


def test_a_broken_file_disables_only_the_profiles_it_defines(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD)
    broken = write(
        tmp_path,
        "b.yaml",
        "fine:\n  remote: f\n  subnets: [10.1.0.0/16]\nbad:\n  remote: b@h\n  streams: 0\n",
    )
    config = load_config(tmp_path, partial=True)
    assert list(config.profiles) == ["good"]
    assert sorted(config.invalid) == ["bad", "fine"]
    assert config.invalid["bad"].remote == "b@h"
    assert config.invalid["bad"].error() == f"{broken}:6: bad.streams: 0 is not within 1-8"
    assert config.invalid["fine"].error() == config.invalid["bad"].error()
    assert config.errors == (f"{broken}:6: bad.streams: 0 is not within 1-8",)
    with pytest.raises(ConfigErrors):  # a reload stays all or nothing
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("one:\n\tremote: h\ntwo:\n  remote: h\n", ["one", "two"]),
        ("profiles:\n  one:\n    remote: h\n\t  x: 1\n  two: {remote: h\n", ["one", "two"]),
        ("- [unclosed\n", ["broken"]),  # no names to guess: the file's
    ],
)
def test_the_profiles_of_a_file_that_does_not_parse_are_guessed(
    tmp_path: Path, text: str, names: list[str]
) -> None:
    write(tmp_path, "broken.yaml", text)
    assert sorted(load_config(tmp_path, partial=True).invalid) == names


def test_a_profile_defined_first_in_a_good_file_stands(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD)
    write(tmp_path, "b.yaml", "good: {remote: other, subnets: [10.7.0.0/16]}\nx: {remote: h}\n")
    config = load_config(tmp_path, partial=True)
    assert list(config.profiles) == ["good"] and list(config.invalid) == ["x"]
    assert config.invalid["x"].error().endswith("(and 1 more: shuttled check)")


def test_the_daemon_shows_an_invalid_profile_and_refuses_to_bring_it_up(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD)
    broken = write(tmp_path, "b.yaml", "bad:\n  remote: b@h\n  subnets: [10.79.0.0/33]\n")
    daemon = Daemon(tmp_path, tmp_path, None)
    daemon.config = load_config(tmp_path, partial=True)
    error = f"{broken}:3: bad.subnets: subnet '10.79.0.0/33': prefix length 33 is over 32 for IPv4"
    rows = {r["name"]: r for r in daemon.list_profiles()}
    assert rows["bad"]["state"] == "invalid" and rows["bad"]["remote"] == "b@h"
    assert rows["good"]["state"] == "down"
    status = daemon.status("bad")
    assert not isinstance(status, list)
    assert (status["state"], status["last_error"]) == ("invalid", error)
    assert render.health([status]) == [f"bad: invalid: {error}"]
    with pytest.raises(ConfigError) as info:
        asyncio.run(daemon.up("bad", wait=False))
    assert str(info.value) == f"bad is invalid: {error}"


def test_every_supervisor_state_and_invalid_are_the_schemas_states() -> None:
    assert set(PROFILE_STATES) == {str(s) for s in State} | {"invalid"}
