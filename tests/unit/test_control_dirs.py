"""`shuttled cleanup` and daemon start: control-socket directories left by killed masters."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from shuttled.tunnel.ssh import cleanup_control_dirs

OLD = time.time() - 3600


def _dir(base: Path, name: str, *, old: bool = True) -> Path:
    path = base / name
    path.mkdir()
    if old:
        os.utime(path, (OLD, OLD))
    return path


def test_dirs_whose_socket_is_gone_or_dead_are_removed(tmp_path: Path) -> None:
    empty = _dir(tmp_path, "ssh-work-a")
    dead = _dir(tmp_path, "ssh-work-b")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(dead / "ctl"))  # bound, never listening: connect is refused
    os.utime(dead, (OLD, OLD))
    removed = cleanup_control_dirs(tmp_path)
    assert not empty.exists() and not dead.exists()
    assert len(removed) == 2 and all("ssh control directory" in r for r in removed)


def test_a_live_master_and_a_starting_one_are_left_alone(tmp_path: Path) -> None:
    live = _dir(tmp_path, "ssh-live-a")
    starting = _dir(tmp_path, "ssh-new-b", old=False)
    other = _dir(tmp_path, "something-else")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(live / "ctl"))
        sock.listen()
        os.utime(live, (OLD, OLD))
        assert cleanup_control_dirs(tmp_path) == []
    assert live.exists() and starting.exists() and other.exists()


def test_a_missing_run_directory_is_nothing_to_do(tmp_path: Path) -> None:
    assert cleanup_control_dirs(tmp_path / "absent") == []
