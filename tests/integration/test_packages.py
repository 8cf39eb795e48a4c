"""The packages, built and used for real: wheel and sdist in a fresh venv, the .deb
installed with apt and driven through the lab by the installed programs, then purged,
and the RPM's payload against the .deb's.

Heavy (two package builds, one apt install and purge, one tunnel): about a minute.
The .deb is installed on the machine running the tests (CI's throwaway one); the test
refuses to run where a shuttled package is already installed, and purges what it put.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.daemon_util import http_ok, root_profile, wait_for
from tests.lab import Lab, require_root_tools

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
UNIT = "/lib/systemd/system/shuttled.service"
PROFILE = Path("/etc/shuttled/pkgtest.yaml")
SOCKET = Path("/run/shuttled/control.sock")
POLICY_RC = Path("/usr/sbin/policy-rc.d")
DEB_TOOLS = ("dpkg-buildpackage", "dh", "lintian", "apt-get")
RPM_TOOLS = ("rpmbuild", "rpm")


def _run(
    argv: list[str],
    *,
    timeout: float = 300,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{shlex.join(argv)} exited {proc.returncode}:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def deb(dist: Path) -> Path:
    require_root_tools(*DEB_TOOLS)
    out = _run([str(REPO / "packaging" / "build-deb.sh"), str(dist / "deb")])
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rpm(dist: Path) -> Path:
    require_root_tools(*RPM_TOOLS)
    out = _run(
        [str(REPO / "packaging" / "build-rpm.sh"), str(dist / "rpm")],
        env={**os.environ, "PYTHON": sys.executable},
    )
    return Path(out.stdout.strip().splitlines()[-1])


# --- wheel and sdist ----------------------------------------------------------------------------

SDIST_MUST_HAVE = (
    "systemd/shuttled.service",
    "systemd/io.github.shuttled.conf",
    "launchd/io.github.shuttled.plist",
    "packaging/completion/shuttlectl.bash",
    "packaging/completion/_shuttlectl",
    "packaging/man/shuttled.8",
    "packaging/man/shuttlectl.1",
    "packaging/man/shuttled-profile.5",
    "packaging/rpm/shuttled.spec",
    "packaging/example.yaml",
    "packaging/sysusers.d/shuttled.conf",
    "packaging/debian/control",
)


def test_wheel_and_sdist_install_into_a_fresh_venv(dist: Path) -> None:
    out = dist / "py"
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)])
    (sdist,) = out.glob("shuttled-*.tar.gz")
    (wheel,) = out.glob("shuttled-*-py3-none-any.whl")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert set(SDIST_MUST_HAVE) <= names, set(SDIST_MUST_HAVE) - names
    with zipfile.ZipFile(wheel) as whl:
        metadata = whl.read(next(n for n in whl.namelist() if n.endswith("/METADATA")))
        names = set(whl.namelist())
    # Nothing to compile (no systemd-python); install-service finds its files in the wheel.
    requires = [line for line in metadata.splitlines() if line.startswith(b"Requires-Dist:")]
    assert requires and not [line for line in requires if b"systemd" in line], requires
    assert "shuttled/data/shuttled.service" in names
    # The dependencies come from the interpreter's own site-packages (no download);
    # the venv's copy of shuttled is the wheel's, not the repository's.
    venv = dist / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    _run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--no-index",
            "--disable-pip-version-check",
            str(wheel),
        ]
    )
    version = _run([str(venv / "bin" / "shuttled"), "--version"], cwd=dist)
    assert re.fullmatch(r"shuttled \d+\.\d+\.\d+\S*\n", version.stdout)
    helptext = _run([str(venv / "bin" / "shuttlectl"), "--help"], cwd=dist)
    assert "up" in helptext.stdout and "completion" in helptext.stdout
    where = _run(
        [str(venv / "bin" / "python"), "-c", "import shuttled; print(shuttled.__file__)"], cwd=dist
    )
    assert where.stdout.startswith(str(venv)), where.stdout


# --- the .deb ------------------------------------------------------------------------------------


def test_deb_passes_lintian(deb: Path) -> None:
    result = _run(
        [
            "lintian",
            "--fail-on",
            "error",
            "--suppress-tags",
            "package-supports-alternative-init-but-no-init.d-script",
            str(deb),
        ],
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [ln for ln in result.stdout.splitlines() if ln.startswith("E:")]


def _dpkg_list() -> list[str]:
    out = _run(["dpkg", "-L", "shuttled"]).stdout.splitlines()
    return [p for p in out if p.startswith("/") and p != "/."]


@contextlib.contextmanager
def no_service_starts() -> Iterator[None]:
    """policy-rc.d forbidding starts, as .ci/run does: a package script must not start a
    real shuttled on the machine (where systemd runs)."""
    made = not POLICY_RC.exists()
    if made:
        POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        yield
    finally:
        if made:
            POLICY_RC.unlink(missing_ok=True)


@pytest.fixture
def installed(deb: Path) -> Iterator[list[str]]:
    """The .deb installed with apt; purged at the end whatever happens."""
    if _run(["dpkg-query", "-W", "shuttled"], check=False).returncode == 0:
        pytest.fail("a shuttled package is already installed here: not touching it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": SYSTEM_PATH}
    try:
        with no_service_starts():
            _run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", str(deb)],
                env=env,
                timeout=600,
            )
        yield _dpkg_list()
    finally:
        PROFILE.unlink(missing_ok=True)
        with no_service_starts():
            _run(["apt-get", "purge", "-y", "-q", "shuttled"], env=env, check=False)


def _unit_exec(key: str) -> list[str]:
    for line in Path(UNIT).read_text().splitlines():
        if line.startswith(f"{key}="):
            return shlex.split(line.split("=", 1)[1])
    raise AssertionError(f"no {key}= in {UNIT}")


def _installed_ctl(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.run(
        "cli",
        ["/usr/bin/shuttlectl", *args],
        check=False,
        timeout=90,
        env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
        cwd="/",
    )


def test_deb_installs_a_working_service_and_purges_clean(installed: list[str], lab: Lab) -> None:
    files = set(installed)
    for path in (
        "/usr/bin/shuttled",
        "/usr/bin/shuttlectl",
        UNIT,
        "/usr/share/dbus-1/system.d/io.github.shuttled.conf",
        "/usr/share/bash-completion/completions/shuttlectl",
        "/usr/share/zsh/vendor-completions/_shuttlectl",
        "/usr/share/man/man8/shuttled.8.gz",
        "/usr/share/man/man1/shuttlectl.1.gz",
        "/usr/share/man/man5/shuttled-profile.5.gz",
        "/etc/shuttled/example.yaml",
    ):
        assert path in files, path
    assert (
        "/etc/shuttled/example.yaml"
        in Path("/var/lib/dpkg/info/shuttled.conffiles").read_text().split()
    )
    assert _run(["getent", "group", "shuttle"], check=False).returncode == 0
    # Enabled the Debian way (dh_installsystemd), even without systemd running here.
    assert Path("/etc/systemd/system/multi-user.target.wants/shuttled.service").is_symlink()
    # Debian's own python3 and dbus-fast (1.84 on bookworm) import the whole daemon.
    _run(
        [
            "/usr/bin/python3",
            "-c",
            "import shuttled.daemon, shuttled.control.dbus, "
            "shuttled.firewall.pf, shuttled.manpages",
        ],
        env={"PATH": SYSTEM_PATH},
        cwd=Path("/"),
    )

    _bring_a_profile_up_with_the_installed_programs(lab)

    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": SYSTEM_PATH}
    with no_service_starts():
        _run(["apt-get", "purge", "-y", "-q", "shuttled"], env=env, timeout=600)
    assert _run(
        ["dpkg-query", "-W", "-f", "${Status}", "shuttled"], check=False
    ).stdout.strip() in ("", "unknown ok not-installed")
    # Every file dpkg listed is gone, and every directory of ours (shared ones like
    # /usr/share/man stay).
    left = [
        p for p in sorted(files) if os.path.lexists(p) and (not os.path.isdir(p) or "shuttl" in p)
    ]
    assert not left, left
    # (/run/shuttled itself may hold other daemons' ssh directories: only our socket.)
    for path in (
        "/etc/shuttled",
        "/var/lib/shuttled",
        str(SOCKET),
        "/etc/systemd/system/multi-user.target.wants/shuttled.service",
    ):
        assert not os.path.lexists(path), path
    assert "shuttled" not in lab.run("cli", ["nft", "list", "tables"]).stdout


def _bring_a_profile_up_with_the_installed_programs(lab: Lab) -> None:
    """The unit's ExecStart in the lab's client namespace, its real default paths (a
    profile in /etc/shuttled, /run/shuttled/control.sock), driven by /usr/bin/shuttlectl;
    then SIGTERM (systemctl stop) and the unit's ExecStopPost."""
    PROFILE.write_text(yaml.safe_dump({"pkgtest": root_profile(lab, [lab.target_net_v4])}))
    argv = _unit_exec("ExecStart")
    assert argv[0] == "/usr/bin/shuttled"
    daemon = lab.popen(
        "cli", argv, name="pkg-daemon", cwd="/", env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}
    )
    try:
        wait_for(
            "the installed daemon's socket",
            lambda: daemon.poll() is not None or _installed_ctl(lab, "version").returncode == 0,
            30,
            detail=lambda: lab.log_tail("pkg-daemon"),
        )
        assert daemon.poll() is None, lab.log_tail("pkg-daemon")
        up = _installed_ctl(lab, "up", "pkgtest", "--timeout", "40")
        assert up.returncode == 0, up.stdout + up.stderr + lab.log_tail("pkg-daemon")
        assert http_ok(lab, lab.tgt_v4)
        status = _installed_ctl(lab, "status", "pkgtest")
        assert status.returncode == 0 and "up" in status.stdout
        down = _installed_ctl(lab, "down", "pkgtest")
        assert down.returncode == 0, down.stderr
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        try:
            assert daemon.wait(20) == 0, lab.log_tail("pkg-daemon")
        finally:
            lab.stop(daemon)
            lab.run("cli", _unit_exec("ExecStopPost"), check=False)
            PROFILE.unlink(missing_ok=True)  # the administrator's file, not the package's
    assert not SOCKET.exists()


# --- the RPM against the .deb ---------------------------------------------------------------------

# Where the two distributions put the same file in different places, on purpose:
NORMALIZE = [
    # Python modules: Debian's dist-packages for every python3, Fedora's per-version site.
    (re.compile(r"^/usr/lib/python3/dist-packages/"), "PYTHON/"),
    (re.compile(r"^/usr/lib/python3\.\d+/site-packages/"), "PYTHON/"),
    # Units: bookworm packages still ship /lib (not yet merged /usr), Fedora %_unitdir.
    (re.compile(r"^/lib/systemd/system/"), "/usr/lib/systemd/system/"),
    # zsh: Debian's vendor-completions, Fedora's site-functions.
    (re.compile(r"^/usr/share/zsh/(vendor-completions|site-functions)/"), "ZSH/"),
]
# Documentation follows each distribution's policy: Debian's changelog and copyright in
# /usr/share/doc/shuttled, Fedora's /usr/share/doc/shuttled-VERSION with README only.
DOCS = re.compile(r"^/usr/share/doc/")


def _normalized(paths: list[str]) -> set[str]:
    out = set()
    for path in paths:
        if DOCS.match(path) or "__pycache__" in path:
            continue
        for pattern, replacement in NORMALIZE:
            path = pattern.sub(replacement, path)
        out.add(path)
    return out


def _deb_files(deb: Path) -> list[str]:
    lines = _run(["dpkg-deb", "-c", str(deb)]).stdout.splitlines()
    return [ln.split()[5].removeprefix(".") for ln in lines if not ln.startswith("d")]


def _rpm_files(rpm: Path) -> list[str]:
    dump = _run(["rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEMODES:perms}\n]", str(rpm)])
    return [ln.split()[0] for ln in dump.stdout.splitlines() if not ln.split()[1].startswith("d")]


def test_rpm_holds_the_same_files_as_the_deb(rpm: Path, deb: Path) -> None:
    assert _normalized(_rpm_files(rpm)) == _normalized(_deb_files(deb))


def test_rpmlint_finds_no_errors(rpm: Path) -> None:
    if shutil.which("rpmlint") is None:
        pytest.skip("rpmlint is not installed")
    rc = REPO / "packaging" / "rpm" / "shuttled.rpmlintrc"
    result = _run(
        ["rpmlint", "-r", str(rc), str(rpm), str(REPO / "packaging/rpm/shuttled.spec")], check=False
    )
    assert " 0 errors" in result.stdout, result.stdout
