"""`shuttled install-service` in a staging root: what it writes, twice, and --uninstall.

The route from a fresh venv (pip install of the checkout, then the installed program) is
tests/integration/test_install_service.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from shuttled import manpages
from shuttled.data import SOURCES
from shuttled.install import PACKAGED_EXE, data, install, uninstall

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_packaged_data_matches_its_source(name: str) -> None:
    # Refresh with: python3 -m shuttled.install --sync-data
    assert data(name) == (REPO / SOURCES[name]).read_text()


def test_every_data_file_has_a_source() -> None:
    shipped = {p.name for p in (REPO / "shuttled" / "data").iterdir() if p.suffix != ".py"}
    assert shipped - {"__pycache__"} == set(SOURCES)


def test_units_run_the_installed_program_not_usr_bin(tmp_path: Path) -> None:
    install(tmp_path)
    for unit in ("shuttled.service", "shuttled-lockdown.service"):
        text = (tmp_path / "etc/systemd/system" / unit).read_text()
        assert PACKAGED_EXE not in text
        assert "ExecStart=/" in text


def test_man_pages_are_the_generated_ones(tmp_path: Path) -> None:
    install(tmp_path)
    page = tmp_path / "usr/local/share/man/man8/shuttled.8"
    assert page.read_text() == manpages.PAGES["shuttled.8"]()


def test_second_install_changes_nothing(tmp_path: Path) -> None:
    assert install(tmp_path)
    assert install(tmp_path) == []


def test_an_edited_example_is_neither_overwritten_nor_removed(tmp_path: Path) -> None:
    install(tmp_path)
    example = tmp_path / "etc/shuttled/example.yaml"
    example.write_text("profiles: {}\n")
    install(tmp_path)
    assert example.read_text() == "profiles: {}\n"
    assert f"kept {example} (changed since installed)" in uninstall(tmp_path)
    assert example.exists()


def test_uninstall_leaves_nothing(tmp_path: Path) -> None:
    install(tmp_path)
    uninstall(tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert uninstall(tmp_path) == []
