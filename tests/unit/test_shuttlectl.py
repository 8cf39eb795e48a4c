"""shuttlectl against a real control socket served from a fake core: output and exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from shuttlectl import render
from shuttlectl.__main__ import main
from shuttlectl.client import Client
from shuttled.const import ExitCode
from shuttled.control.schema import ProfileStats, ProfileStatus
from tests.fake_core import (
    MEMBER_UID,
    STRANGER_UID,
    FakeCore,
    ServerThread,
    caller,
    serving,
)
from tests.helpers import parse_prometheus

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "control.sock"


def ctl(capsys: pytest.CaptureFixture[str], sock: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--socket", str(sock), *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- status and list ---------------------------------------------------------------------------


def test_status_table_with_health_lines_exits_not_up_when_an_autostart_profile_is_down(
    capsys: pytest.CaptureFixture[str], sock: Path
) -> None:
    core = FakeCore()
    core.states["broken"] = "failed"
    with serving(sock, core):
        code, out, err = ctl(capsys, sock, "status")
    lines = out.splitlines()
    assert lines[0].split() == [
        "PROFILE",
        "STATE",
        "REMOTE",
        "UPTIME",
        "RX",
        "TX",
        "CONNS",
        "LAST",
        "ERROR",
    ]
    assert lines[1].split()[:3] == ["work", "down", "alice@bastion"]
    assert "# Health check:" in lines
    assert "#     - work: should be up but is down" in lines
    assert "#     - broken: failed: ssh: Permission denied (publickey)" in lines
    assert code == ExitCode.NOT_UP and err == ""


def test_status_of_an_up_profile_shows_units_and_exits_zero(
    capsys: pytest.CaptureFixture[str], sock: Path
) -> None:
    core = FakeCore()
    core.states["work"] = "up"
    with serving(sock, core):
        code, out, _ = ctl(capsys, sock, "status", "work")
        all_code, _, _ = ctl(capsys, sock, "status")
    row = out.splitlines()[1]
    assert row.split()[:4] == ["work", "up", "alice@bastion", "2h03m"]
    assert "1.2 GiB" in row and "310.0 MiB" in row and " 12 " in row
    assert "  subnets: 10.0.0.0/8 (config)" in out and "  health check: 23 ms" in out
    assert code == ExitCode.OK
    assert all_code == ExitCode.OK  # lab, slow, broken are neither wanted nor autostart


def test_status_of_a_down_profile_exits_not_up(
    capsys: pytest.CaptureFixture[str], sock: Path
) -> None:
    with serving(sock):
        assert ctl(capsys, sock, "status", "lab")[0] == ExitCode.NOT_UP
    assert int(ExitCode.NOT_UP) == 7


def test_json_output_has_a_schema_version_wherever_the_flag_goes(
    capsys: pytest.CaptureFixture[str], sock: Path
) -> None:
    with serving(sock):
        code, out, _ = ctl(capsys, sock, "--json", "status")
        doc = json.loads(out)
        assert doc["schema"] == 1 and [p["name"] for p in doc["profiles"]][:2] == ["work", "lab"]
        assert code == ExitCode.NOT_UP
        _, out, _ = ctl(capsys, sock, "status", "lab", "--json")
        assert json.loads(out)["profile"]["name"] == "lab"
        _, out, _ = ctl(capsys, sock, "list", "--json")
        assert json.loads(out)["profiles"][0] == {
            "name": "work",
            "state": "down",
            "remote": "alice@bastion",
            "autostart": True,
            "wanted": True,
        }


def test_list_table_and_names(capsys: pytest.CaptureFixture[str], sock: Path) -> None:
    with serving(sock):
        _, out, _ = ctl(capsys, sock, "list")
        assert out.splitlines()[0].split() == ["PROFILE", "STATE", "REMOTE", "AUTOSTART", "WANTED"]
        assert ctl(capsys, sock, "list", "--names")[1] == "work\nlab\nslow\nbroken\n"


# --- up and down -------------------------------------------------------------------------------


def test_up_and_down_print_the_new_state(capsys: pytest.CaptureFixture[str], sock: Path) -> None:
    core = FakeCore()
    with serving(sock, core):
        assert ctl(capsys, sock, "up", "work")[:2] == (ExitCode.OK, "work: up\n")
        assert ctl(capsys, sock, "up", "lab", "--no-wait")[:2] == (ExitCode.OK, "lab: connecting\n")
        assert ctl(capsys, sock, "down", "work")[:2] == (ExitCode.OK, "work: down\n")
        code, out, _ = ctl(capsys, sock, "up", "work", "--json", "--timeout", "5")
    assert code == ExitCode.OK and json.loads(out)["profile"]["state"] == "up"
    assert ("up", ("lab", False, 30.0)) in core.calls and ("up", ("work", True, 5.0)) in core.calls


def test_up_denied_for_a_non_member(capsys: pytest.CaptureFixture[str], sock: Path) -> None:
    with serving(sock, uid=STRANGER_UID):
        code, out, err = ctl(capsys, sock, "up", "work")
    assert code == ExitCode.DENIED and out == ""
    assert err == (
        "shuttlectl: up work: permission denied (only root, group 'shuttle' and "
        "the profile's allow list)\n"
    )


def test_up_allowed_for_a_member_of_the_allow_list(
    capsys: pytest.CaptureFixture[str], sock: Path
) -> None:
    with serving(sock, uid=MEMBER_UID):
        assert ctl(capsys, sock, "up", "work")[0] == ExitCode.OK
        assert ctl(capsys, sock, "reload")[0] == ExitCode.DENIED


@pytest.mark.parametrize(
    ("argv", "exit_code", "message"),
    [
        (("up", "nope"), ExitCode.NO_SUCH_PROFILE, "no profile named 'nope'"),
        (("up", "slow", "--timeout", "0.2"), ExitCode.TIMEOUT, "slow did not come up within 0.2 s"),
        (("up", "broken"), ExitCode.FAILED, "broken: ssh: Permission denied (publickey)"),
        (("stats", "nope"), ExitCode.NO_SUCH_PROFILE, "no profile named 'nope'"),
    ],
)
def test_errors_are_one_line_with_their_exit_code(
    capsys: pytest.CaptureFixture[str],
    sock: Path,
    argv: tuple[str, ...],
    exit_code: int,
    message: str,
) -> None:
    with serving(sock):
        code, _, err = ctl(capsys, sock, *argv)
    assert (code, err) == (exit_code, f"shuttlectl: {message}\n")


def test_json_errors_are_documents_too(capsys: pytest.CaptureFixture[str], sock: Path) -> None:
    with serving(sock):
        code, out, _ = ctl(capsys, sock, "--json", "up", "nope")
    assert code == ExitCode.NO_SUCH_PROFILE
    assert json.loads(out) == {
        "schema": 1,
        "error": {"code": "no_such_profile", "message": "no profile named 'nope'"},
    }


# --- stats, connections, reload, version ---------------------------------------------------------


def test_stats_look_like_wg_show(capsys: pytest.CaptureFixture[str], sock: Path) -> None:
    with serving(sock):
        _, out, _ = ctl(capsys, sock, "stats", "work")
    assert out.splitlines() == [
        "profile: work",
        "  state: down (direct)",
        "  uptime: 1m05s",
        "  transfer: 1.5 KiB received, 10.0 MiB sent",
        "  connections: 3 active, 120 total, 2 failed",
        "  reconnects: 1",
        "  latest health check: 12 ms round trip",
        "  ssh: pid 321, 1.25 s cpu, 12.0 MiB rss",
        "  connect: remote; 1 pending, 4 refused, 2 unreachable, 1 timed out, 0 abandoned, "
        "0 passed",
        "  dns: mode all, path firewall, queries 40, answered 38, failed 1, timeouts 1, "
        "cache hits 0, hosts 0, tunnel 40, local 0, peer 0",
        "  future counter: 7",
    ]


def test_stats_prometheus_shows_every_profile_without_a_name_and_one_with(
    capsys: pytest.CaptureFixture[str], sock: Path
) -> None:
    core = FakeCore()
    core.states["work"] = "up"
    with serving(sock, core):
        code, out, err = ctl(capsys, sock, "stats", "--prometheus")
        one_code, one, _ = ctl(capsys, sock, "stats", "lab", "--prometheus")
    assert code == one_code == ExitCode.OK and err == ""
    up = {labels: v for (name, labels), v in parse_prometheus(out).items() if name == "shuttled_up"}
    assert up == {
        (("profile", "work"),): 1,
        (("profile", "lab"),): 0,
        (("profile", "slow"),): 0,
        (("profile", "broken"),): 0,
    }
    assert {labels[0] for _, labels in parse_prometheus(one)} == {("profile", "lab")}
    assert 'shuttled_dns_queries_total{profile="lab"} 40\n' in one


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (
            ("stats",),
            ExitCode.USAGE,
            "stats: which PROFILE? (every profile's only with --prometheus)",
        ),
        (("stats", "--prometheus", "--json"), ExitCode.USAGE, "--json and --prometheus"),
        (("stats", "nope", "--prometheus"), ExitCode.NO_SUCH_PROFILE, "no profile named 'nope'"),
    ],
)
def test_stats_without_a_profile_needs_prometheus_and_prometheus_errors_are_one_line(
    capsys: pytest.CaptureFixture[str],
    sock: Path,
    argv: tuple[str, ...],
    code: ExitCode,
    message: str,
) -> None:
    with serving(sock):
        got, _, err = ctl(capsys, sock, *argv)
    assert got == code and message in err and err.count("\n") == 1


def test_connections_table(capsys: pytest.CaptureFixture[str], sock: Path) -> None:
    with serving(sock):
        _, out, _ = ctl(capsys, sock, "connections", "work")
        _, doc, _ = ctl(capsys, sock, "connections", "work", "--json")
    assert [ln.split() for ln in out.splitlines()] == [
        ["PROTO", "SOURCE", "DESTINATION", "RX", "TX", "AGE", "STATE"],
        ["tcp", "127.0.0.1:50000", "10.1.2.3:443", "2.0", "KiB", "100", "B", "3s", "open"],
    ]
    assert json.loads(doc)["connections"][0]["dst"] == "10.1.2.3:443"


def test_reload_summary(capsys: pytest.CaptureFixture[str], sock: Path) -> None:
    with serving(sock):
        code, out, _ = ctl(capsys, sock, "reload")
    assert code == ExitCode.OK
    assert out.splitlines() == [
        "configuration reloaded",
        "added: new",
        "changed: lab",
        "unchanged: work",
    ]


def test_version_shows_client_and_daemon(capsys: pytest.CaptureFixture[str], sock: Path) -> None:
    with serving(sock):
        _, out, _ = ctl(capsys, sock, "version")
        _, doc, _ = ctl(capsys, sock, "version", "--json")
    assert out.splitlines()[1] == "shuttled 9.9.9 (protocol 1, nft, up 2h03m)"
    assert json.loads(doc)["daemon"]["version"] == "9.9.9"


# --- watch ---------------------------------------------------------------------------------------


def test_watch_prints_one_line_per_event(capsys: pytest.CaptureFixture[str], sock: Path) -> None:
    core = FakeCore()
    result: list[int] = []
    with ServerThread(core, sock, credentials=lambda _s: caller(0)) as server:
        watcher = threading.Thread(
            target=lambda: result.append(main(["--socket", str(sock), "watch", "--json"]))
        )
        watcher.start()
        for _ in range(200):
            if core.queues:
                break
            time.sleep(0.01)
        Client(sock).call("up", {"profile": "lab"})
        Client(sock).call("down", {"profile": "lab"})
        time.sleep(0.2)
        server.run(server.stop)  # the daemon goes away: watch ends
        watcher.join(10)
    out, err = capsys.readouterr()
    *events, error = [json.loads(line) for line in out.splitlines()]
    assert [(e["schema"], e["event"]["state"]) for e in events] == [(1, "up"), (1, "down")]
    assert error["error"]["code"] == "failed"
    assert result == [ExitCode.FAILED] and "closed the connection" in err


def test_event_lines_for_humans() -> None:
    line = render.event(
        {"type": "state", "profile": "work", "state": "failed", "error": "no route"}, now=0
    )
    assert line.endswith(" work: failed (no route)")
    stamped = render.event({"type": "state", "profile": "w", "state": "up", "time": 3600.5})
    assert stamped == time.strftime("%H:%M:%S", time.localtime(3600.5)) + " w: up"
    other = render.event({"type": "reload", "added": ["x"]}, now=0)
    assert other.endswith(" reload added=['x']")


# --- no daemon, usage ----------------------------------------------------------------------------


def test_daemon_not_running_is_one_line_and_its_own_exit_code(
    capsys: pytest.CaptureFixture[str], sock: Path
) -> None:
    code, out, err = ctl(capsys, sock, "status")
    assert code == ExitCode.NOT_RUNNING and int(code) == 3 and out == ""
    assert err == f"shuttlectl: the shuttled daemon is not running (no socket at {sock})\n"


def test_a_socket_nobody_listens_on_means_not_running(
    capsys: pytest.CaptureFixture[str], sock: Path
) -> None:
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sock))
    dead.close()
    code, _, err = ctl(capsys, sock, "list")
    assert code == ExitCode.NOT_RUNNING and "not running" in err


@pytest.mark.parametrize(
    "argv",
    [
        (),
        ("up",),
        ("fly",),
        ("up", "w", "--timeout", "x"),
        ("status", "a", "b"),
        ("completion", "fish"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], sock: Path, argv: tuple[str, ...]
) -> None:
    code, out, err = ctl(capsys, sock, *argv)
    assert code == ExitCode.USAGE and out == ""
    assert err.startswith("shuttlectl: ") and err.count("\n") == 1


def test_installed_entry_point_behaviour_in_a_fresh_process(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from shuttlectl.__main__ import main; "
            "code = main(); bad = [m for m in sys.modules if m.startswith('shuttled.') and "
            "m.split('.')[1] not in ('const', 'errors', 'control')] + "
            "[m for m in sys.modules if m in ('yaml', 'shuttled.control.api', "
            "'shuttled.control.unix')]; print(bad, file=sys.stderr); sys.exit(code)",
            "--socket",
            str(tmp_path / "none.sock"),
            "status",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == ExitCode.NOT_RUNNING
    assert result.stderr.splitlines() == [
        f"shuttlectl: the shuttled daemon is not running (no socket at {tmp_path}/none.sock)",
        "[]",
    ]


# --- rendering -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1288490188, "1.2 GiB"),
        (None, "-"),
        (-1, "-"),
        (True, "-"),
        ("12", "-"),
    ],
)
def test_sizes_use_iec_units(value: Any, text: str) -> None:
    assert render.size(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0s"),
        (59.9, "59s"),
        (65, "1m05s"),
        (7384, "2h03m"),
        (3 * 86400 + 4 * 3600, "3d04h"),
        (None, "-"),
    ],
)
def test_durations_show_two_units(value: Any, text: str) -> None:
    assert render.duration(value) == text


def test_rendering_copes_with_odd_replies() -> None:
    odd: dict[str, Any] = {
        "name": ["x"],
        "state": 5,
        "rx": "many",
        "subnets": "x",
        "health": [1, "custom warning"],
    }
    assert "x" in render.status_table([odd])
    assert render.status_detail(odd)
    assert render.health([{**odd, "name": "p"}]) == ["p: custom warning"]
    assert render.stats("p", {"rtt": "fast"})


def test_stats_before_the_first_health_check_say_so() -> None:
    stats = cast(ProfileStats, {**FakeCore().stats("work"), "rtt": None})
    shown = render.stats("work", stats).splitlines()
    assert "  no health check yet" in shown
    assert not any("round trip" in line and "-" in line for line in shown)


def test_status_prints_a_cut_error_whole_on_a_health_line() -> None:
    error = "Host key verification failed for srv.example.com port 22: " + "x" * 40
    core = FakeCore()
    core.states["work"] = "connecting"
    profile = cast(ProfileStatus, {**core.status("work"), "last_error": error})
    table = render.status_table([profile])
    assert error not in table and error[: render.ERROR_WIDTH - 3] + "..." in table
    assert render.health([profile]) == [f"work: last error: {error}"]


def test_status_detail_without_a_health_check_says_none_yet() -> None:
    profile = cast(ProfileStatus, FakeCore().status("work"))
    assert "  health check: none yet" in render.status_detail(profile).splitlines()
