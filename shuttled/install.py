"""`shuttled install-service`: after pip or pipx, what a package would put in place.

The units (their ExecStart the real path of this installation's `shuttled`, not the
packages' /usr/bin), the D-Bus policy, the sysusers file and the `shuttle` group, man
pages and completion (rendered from the installed parsers), /etc/shuttled with the
commented example. Admin locations (/etc, /usr/local), so a distribution package's files
in /usr are never touched. Idempotent: a second run writes nothing and says so.
`--uninstall` removes the same files, keeps a changed example profile and the group.
"""

from __future__ import annotations

import contextlib
import grp
import importlib.resources
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from shuttled import manpages
from shuttled.const import ExitCode
from shuttled.data import SOURCES
from shuttled.errors import UsageError

PACKAGED_EXE = "/usr/bin/shuttled"
UNITS = ("shuttled.service", "shuttled-lockdown.service")
GROUP = "shuttle"
# A path systemd takes as it is in ExecStart= (no quoting, no % specifier, no $ variable).
PLAIN_PATH = re.compile(r"/[A-Za-z0-9/._+@-]+")


@dataclass(frozen=True)
class Item:
    path: str  # relative to the root
    text: str
    config: bool = False  # the admin's once written: kept on --uninstall when changed


def data(name: str) -> str:
    return importlib.resources.files("shuttled.data").joinpath(name).read_text()


def _completion() -> dict[str, str]:
    from shuttlectl.cli import build_parser
    from shuttlectl.completion import script

    parser = build_parser()
    return {shell: script(shell, parser) for shell in ("bash", "zsh")}


def items(exe: str) -> list[Item]:
    units = [Item(f"etc/systemd/system/{u}", data(u).replace(PACKAGED_EXE, exe)) for u in UNITS]
    man = [
        Item(f"usr/local/share/man/man{name.rsplit('.', 1)[1]}/{name}", render())
        for name, render in manpages.PAGES.items()
    ]
    completion = _completion()
    return [
        *units,
        Item("etc/dbus-1/system.d/io.github.shuttled.conf", data("io.github.shuttled.conf")),
        Item("etc/sysusers.d/shuttled.conf", data("shuttled.sysusers.conf")),
        *man,
        Item("usr/local/share/bash-completion/completions/shuttlectl", completion["bash"]),
        Item("usr/local/share/zsh/site-functions/_shuttlectl", completion["zsh"]),
        Item("etc/shuttled/example.yaml", data("example.yaml"), config=True),
    ]


def installed_executable() -> str:
    """This installation's `shuttled`: next to its python (venv, pipx) or in its scripts."""
    for candidate in (
        Path(sysconfig.get_path("scripts")) / "shuttled",
        Path(sys.executable).parent / "shuttled",
        Path(sys.argv[0]).absolute(),
    ):
        if candidate.name == "shuttled" and candidate.is_file():
            path = str(candidate)
            if not PLAIN_PATH.fullmatch(path):
                raise UsageError(f"{path}: a path with spaces or specials cannot be ExecStart=")
            return path
    raise UsageError("cannot find the installed `shuttled` program (pip or pipx install first)")


def _only_root_can_change(path: Path) -> None:
    """A root service must run code no other user can replace (a venv in a home directory)."""
    for p in (path, *path.parents):
        st = p.stat()
        if st.st_uid != 0 or (st.st_mode & 0o002 and not st.st_mode & 0o1000):
            raise UsageError(
                f"{p} may be changed by uid {st.st_uid} or anyone: the root service would run "
                f"{path} (install as root: sudo pipx install --global, or a venv root owns)"
            )


def _check_host(root: Path) -> None:
    if root != Path("/"):
        return  # staging for a package or a test: no system to check
    if not Path("/run/systemd/system").is_dir():
        raise UsageError("install-service: no systemd here (/run/systemd/system is missing)")
    if os.geteuid() != 0:
        raise UsageError("install-service: must run as root; try sudo")


def install(root: Path) -> list[str]:
    """Write what differs; the lines say what was done."""
    exe = installed_executable()
    _only_root_can_change(Path(exe))
    _only_root_can_change(Path(manpages.__file__).parent)
    done = []
    for item in items(exe):
        path = root / item.path
        if path.exists() and (item.config or path.read_text() == item.text):
            continue  # an example the admin edited is theirs
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        path.write_text(item.text)
        path.chmod(0o644)
        done.append(f"wrote {path}")
    if root == Path("/"):
        done += _system_steps(changed=bool(done))
    return done


def _system_steps(changed: bool) -> list[str]:
    done = []
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", GROUP], check=True)
        done.append(f"added group {GROUP} (its members may bring profiles up and down)")
    if changed:
        _quiet(["systemctl", "daemon-reload"])
        # dbus-daemon and dbus-broker both: read the new policy now.
        _quiet(["busctl", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                "org.freedesktop.DBus", "ReloadConfig"])  # fmt: skip
    return done


def _quiet(argv: list[str]) -> None:
    if shutil.which(argv[0]):
        subprocess.run(argv, check=False, capture_output=True, timeout=60)


def uninstall(root: Path) -> list[str]:
    if root == Path("/"):
        _quiet(["systemctl", "disable", "--now", *UNITS])
    done = []
    for item in items(PACKAGED_EXE):
        path = root / item.path
        if not path.exists():
            continue
        if item.config and path.read_text() != item.text:
            done.append(f"kept {path} (changed since installed)")
            continue
        path.unlink()
        done.append(f"removed {path}")
        _prune(path.parent, root)
    if root == Path("/") and done:
        _quiet(["systemctl", "daemon-reload"])
    return done


def _prune(directory: Path, root: Path) -> None:
    """Empty directories go: all of ours in a staging root, only /etc/shuttled in /."""
    if root == Path("/"):
        if directory == Path("/etc/shuttled"):
            with contextlib.suppress(OSError):  # not empty: the admin's profiles
                directory.rmdir()
        return
    while directory != root and directory.is_relative_to(root):
        try:
            directory.rmdir()
        except OSError:  # not empty: someone else's too
            return
        directory = directory.parent


def install_service(root: Path, remove: bool) -> int:
    _check_host(root)
    done = uninstall(root) if remove else install(root)
    for line in done:
        print(line)
    if not done:
        state = "not installed" if remove else "already in place"
        print(f"nothing to do: shuttled's service files are {state} under {root}")
    elif remove and root == Path("/"):
        print(f"the group {GROUP} is kept (groupdel {GROUP} removes it)")
    elif not remove:
        print("next: systemctl enable --now shuttled")
    return ExitCode.OK


def sync_data(repo: Path) -> None:
    """Refresh shuttled/data/ from its sources in the tree."""
    target = Path(__file__).with_name("data")
    for name, source in SOURCES.items():
        shutil.copyfile(repo / source, target / name)


if __name__ == "__main__":
    if sys.argv[1:] != ["--sync-data"]:
        sys.exit("usage: python3 -m shuttled.install --sync-data")
    sync_data(Path(__file__).resolve().parents[1])
