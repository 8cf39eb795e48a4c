"""Plain-text tables, and the rendering of `doctor`, for both sides.

`shuttlectl doctor` renders a daemon's report and `shuttled run --check` its own:
one renderer for both, so it lives here, beside the schema it renders, and
imports nothing else (shuttlectl may import it, see tests/unit/test_layers.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from shuttled.control.schema import ConnectStats, DoctorReport

NONE = "-"


def text(value: object, width: int | None = None) -> str:
    if value is None or value == "":
        return NONE
    out = " ".join(str(value).split())  # one line, whatever the daemon sent
    if width is not None and len(out) > width:
        out = out[: width - 3] + "..."
    return out


def connect_mode(connect: ConnectStats) -> str:
    """When connect() returns: "remote", or "fast (why it could not be remote)"."""
    why = connect.get("why")
    return text(connect.get("mode")) + (f" ({why})" if why else "")


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    rows = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)), r[-1]])
        for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def doctor(report: DoctorReport) -> str:
    """One row a check; then one line a fix, for what failed or warned."""
    checks = report.get("checks") or []
    rows = [[text(c.get("check")), text(c.get("status")), text(c.get("result"))] for c in checks]
    lines = [
        f"{text(report.get('profile'))} ({text(report.get('remote'))}): "
        + ("all needed checks pass" if report.get("ok") else "a needed check fails"),
        table(["CHECK", "STATUS", "RESULT"], rows),
    ]
    fixes = [f"  {text(c.get('check'))}: {text(c.get('fix'))}" for c in checks if c.get("fix")]
    return "\n".join(lines + (["", "To fix:", *fixes] if fixes else []))
