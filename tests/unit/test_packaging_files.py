"""The files packages install, checked without building a package: the launchd plist
against the systemd unit, the example profile, the Debian and RPM metadata."""

from __future__ import annotations

import configparser
import plistlib
import re
import shlex
import shutil
from pathlib import Path

import pytest

from shuttled import __version__
from shuttled.config import load_config

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "shuttled.service"
PLIST = REPO / "launchd" / "io.github.shuttled.plist"
EXAMPLE = REPO / "packaging" / "example.yaml"
DEBIAN = REPO / "packaging" / "debian"
SPEC = REPO / "packaging" / "rpm" / "shuttled.spec"


def unit_section(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser[name]


def exec_start() -> list[str]:
    return shlex.split(unit_section("Service")["ExecStart"])


def test_plist_runs_the_units_command_at_boot_and_keeps_it_alive() -> None:
    plist = plistlib.loads(PLIST.read_bytes())
    assert plist["Label"] == "io.github.shuttled"
    program, *args = plist["ProgramArguments"]
    unit_program, *unit_args = exec_start()
    # One source for both: the same arguments after the program (whose path differs:
    # /usr/bin from the distribution package, /usr/local/bin from `pipx install --global`).
    assert args == unit_args
    assert Path(program).name == Path(unit_program).name == "shuttled"
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] is True


def test_the_daemon_cleans_up_at_start_under_launchd() -> None:
    # launchd has no ExecStopPost: stale rules and anchors go when the daemon starts.
    daemon = (REPO / "shuttled" / "daemon.py").read_text()
    assert "cleanup_all()" in daemon.split("async def start")[1].split("def ")[0]


def test_unit_documentation_names_the_shipped_man_pages() -> None:
    pages = re.findall(r"man:([\w-]+)\((\d)\)", unit_section("Unit")["Documentation"])
    assert pages
    for name, section in pages:
        assert (REPO / "packaging" / "man" / f"{name}.{section}").is_file()


def test_example_profile_defines_nothing_until_uncommented(tmp_path: Path) -> None:
    # The loader reads every *.yaml in /etc/shuttled: the shipped file must not define
    # a profile (it would try to reach example.com at every boot).
    shutil.copy(EXAMPLE, tmp_path / "example.yaml")
    assert dict(load_config(tmp_path).profiles) == {}


def test_example_profile_is_valid_once_uncommented(tmp_path: Path) -> None:
    # Uncomment what an administrator would: "# name:" headers and their indented keys.
    lines = EXAMPLE.read_text().splitlines()
    body = [ln[2:] for ln in lines if re.fullmatch(r"# [\w-]+:", ln) or ln.startswith("#   ")]
    (tmp_path / "ssh").mkdir()
    (tmp_path / "ssh" / "id_ed25519").write_text("")
    (tmp_path / "uncommented.yaml").write_text("\n".join(body) + "\n")
    profiles = load_config(tmp_path).profiles
    assert set(profiles) == {"work", "boot-tunnel"}
    assert profiles["work"].dns.mode == "split"


def test_debian_dependencies() -> None:
    control = (DEBIAN / "control").read_text()
    depends = control.split("\nDepends:")[1].split("\nRecommends:")[0]
    for package in (
        "python3-yaml",
        "python3-psutil",
        "python3-dbus-fast",
        "nftables | iptables",
        "openssh-client",
        "adduser",
    ):
        assert package in depends, package
    assert "debhelper-compat (= 13)" in control
    assert "pybuild-plugin-pyproject" in control
    changelog = (DEBIAN / "changelog").read_text()
    assert changelog.startswith(f"shuttled ({__version__})")


def test_rpm_version_and_scriptlets() -> None:
    spec = SPEC.read_text()
    assert re.search(rf"^Version:\s+{re.escape(__version__)}$", spec, re.MULTILINE)
    for macro in (
        "%systemd_post shuttled.service",
        "%systemd_preun shuttled.service",
        "%systemd_postun_with_restart shuttled.service",
    ):
        assert macro in spec
    for package in (
        "python3-pyyaml",
        "python3-psutil",
        "python3-dbus-fast",
        "openssh-clients",
    ):
        assert re.search(rf"^Requires:\s+{package}$", spec, re.MULTILINE), package


@pytest.mark.parametrize(
    "path", ["packaging/build-deb.sh", "packaging/build-rpm.sh", "packaging/debian/rules"]
)
def test_build_scripts_are_executable(path: str) -> None:
    assert (REPO / path).stat().st_mode & 0o111


def test_upgrades_check_the_profiles_before_the_restart_and_never_fail_for_them() -> None:
    postinst = (DEBIAN / "shuttled.postinst").read_text()
    check = '/usr/bin/shuttled check || echo "shuttled: fix the profiles above'
    assert postinst.index(check) < postinst.index("#DEBHELPER#")  # the restart
    assert '[ -n "$2" ]' in postinst  # an upgrade: a first install has no profiles yet
    spec = SPEC.read_text()
    post = spec[spec.index("\n%post\n") : spec.index("\n%preun\n")]
    assert '%{_bindir}/shuttled check || echo "shuttled: fix the profiles above' in post
    assert "[ $1 -gt 1 ]" in post
