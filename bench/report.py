"""Results: samples per contender and figure, their medians and spread, the ratios against
ssh -L, raw ssh and sshuttle, the targets, and the markdown rendering."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

BASELINES = ("ssh-L", "raw-ssh", "sshuttle")
OURS = ("shuttled", "shuttled-helper", "shuttled-daemon", "shuttled-daemon-s4", "shuttled-uvloop")

# figure -> (label, unit, higher is better)
FIGURES: dict[str, tuple[str, str, bool]] = {
    "bulk_up_1": ("bulk up, 1 stream", "Gbit/s", True),
    "bulk_up_4": ("bulk up, 4 streams", "Gbit/s", True),
    "bulk_down_1": ("bulk down, 1 stream", "Gbit/s", True),
    "bulk_down_4": ("bulk down, 4 streams", "Gbit/s", True),
    "conn_rate_c1": ("new HTTP connections, c=1", "conn/s", True),
    "conn_rate_c8": ("new HTTP connections, c=8", "conn/s", True),
    "ttfb_ms": ("time to first byte (new conn)", "ms", False),
    "rtt_us_median": ("1-byte RTT, median", "µs", False),
    "rtt_us_p99": ("1-byte RTT, p99", "µs", False),
    "concurrent_ok": ("concurrent idle connections OK", "count", True),
    "rss_before_mb": ("proxy RSS before", "MB", False),
    "rss_held_mb": ("proxy RSS with all held", "MB", False),
    "rss_growth_mb": ("proxy RSS growth", "MB", False),
    "cpu_s_per_gb.total": ("CPU per GB, proxy+ssh+sshd+helper", "s/GB", False),
    "cpu_s_per_gb.proxy": ("CPU per GB, proxy (python)", "s/GB", False),
    "cpu_s_per_gb.ssh": ("CPU per GB, local ssh", "s/GB", False),
    "cpu_s_per_gb.sshd": ("CPU per GB, sshd", "s/GB", False),
    "cpu_s_per_gb.remote-python": ("CPU per GB, remote python", "s/GB", False),
    "cpu_s_per_gb.local-other": ("CPU per GB, other local", "s/GB", False),
    "cpu_s_per_gb.remote-other": ("CPU per GB, remote cat/wc (raw ssh app)", "s/GB", False),
}
RATIO_FIGURES = (
    "bulk_up_1",
    "bulk_up_4",
    "bulk_down_1",
    "bulk_down_4",
    "conn_rate_c1",
    "conn_rate_c8",
    "ttfb_ms",
    "rtt_us_median",
    "rtt_us_p99",
    "cpu_s_per_gb.total",
)


@dataclass
class ContenderResult:
    name: str
    description: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: str, value: float | None) -> None:
        if value is not None:
            self.samples.setdefault(figure, []).append(float(value))

    def error(self, figure: str, message: str) -> None:
        self.errors.setdefault(figure, []).append(message[:600])

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for figure, values in self.samples.items():
            out[figure] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "n": len(values),
            }
        return out

    def median(self, figure: str) -> float | None:
        values = self.samples.get(figure)
        return statistics.median(values) if values else None

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "samples": self.samples,
            "summary": self.summary(),
            "errors": self.errors,
            "notes": self.notes,
        }


def ratios(results: dict[str, ContenderResult]) -> dict[str, dict[str, dict[str, float]]]:
    """ours -> figure -> baseline -> median(ours) / median(baseline)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, res in results.items():
        if name in BASELINES:
            continue
        per: dict[str, dict[str, float]] = {}
        for figure in RATIO_FIGURES:
            mine = res.median(figure)
            if mine is None:
                continue
            for base in BASELINES:
                other = results.get(base)
                theirs = other.median(figure) if other else None
                if theirs:
                    per.setdefault(figure, {})[base] = mine / theirs
        out[name] = per
    return out


@dataclass
class Target:
    contender: str
    figure: str
    rule: str
    value: float | None
    met: bool | None

    def to_json(self) -> dict[str, Any]:
        return {
            "contender": self.contender,
            "figure": self.figure,
            "rule": self.rule,
            "value": self.value,
            "met": self.met,
        }


def targets(results: dict[str, ContenderResult], wanted_concurrent: int) -> list[Target]:
    """The targets, the bar shuttled aims for, judged on ratios of medians from this one run."""
    rat = ratios(results)
    out: list[Target] = []

    def ratio_rule(name: str, figure: str, base: str, rule: str, test: Any) -> None:
        value = rat.get(name, {}).get(figure, {}).get(base)
        out.append(Target(name, figure, rule, value, None if value is None else test(value)))

    bulk = ("bulk_up_1", "bulk_up_4", "bulk_down_1", "bulk_down_4")
    for name in results:
        if name in ("shuttled", "shuttled-daemon", "shuttled-uvloop"):
            for fig in bulk:
                ratio_rule(name, fig, "ssh-L", "≥ 0.90 x ssh -L", lambda v: v >= 0.9)
                ratio_rule(name, fig, "sshuttle", "≥ 10 x sshuttle", lambda v: v >= 10)
            for fig in ("conn_rate_c1", "conn_rate_c8"):
                ratio_rule(name, fig, "sshuttle", "≥ 2 x sshuttle", lambda v: v >= 2)
            ratio_rule(name, "rtt_us_median", "ssh-L", "≤ 1.25 x ssh -L", lambda v: v <= 1.25)
            res = results[name]
            ok = res.samples.get("concurrent_ok")
            low = min(ok) if ok else None
            out.append(
                Target(
                    name,
                    "concurrent_ok",
                    f"all {wanted_concurrent} succeed (every run)",
                    low,
                    None if low is None else low >= wanted_concurrent,
                )
            )
            growth = res.samples.get("rss_growth_mb")
            high = max(growth) if growth else None
            out.append(
                Target(
                    name,
                    "rss_growth_mb",
                    "≤ 20 MB (every run)",
                    high,
                    None if high is None else high <= 20,
                )
            )
        if name == "shuttled-helper":
            for fig in bulk:
                ratio_rule(name, fig, "sshuttle", "≥ 3 x sshuttle", lambda v: v >= 3)
        if name == "shuttled-daemon-s4":
            ssh_l = results.get("ssh-L")
            for direction in ("up", "down"):
                mine = results[name].median(f"bulk_{direction}_4")
                theirs = ssh_l.median(f"bulk_{direction}_1") if ssh_l else None
                value = mine / theirs if mine and theirs else None
                out.append(
                    Target(
                        name,
                        f"bulk_{direction}_4",
                        "4 streams > ssh -L's single-stream figure",
                        value,
                        None if value is None else value > 1,
                    )
                )
    return out


# --- markdown ------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(res: ContenderResult, figure: str, runs: int) -> str:
    values = res.samples.get(figure)
    if not values:
        return "error" if figure in res.errors else "-"
    med = statistics.median(values)
    text = _fmt(med)
    if len(values) > 1:
        text += f" ({_fmt(min(values))}-{_fmt(max(values))})"
    if len(values) < runs:
        text += f" [{len(values)}/{runs}]"
    return text


def markdown(
    cipher: str, results: dict[str, ContenderResult], runs: int, wanted_concurrent: int
) -> str:
    names = list(results)
    lines = [
        f"### Cipher: {cipher}",
        "",
        f"Median of {runs} run(s), (min-max) when more than one; `[k/n]`: only k runs "
        "produced the figure.",
        "",
    ]
    lines.append("| figure | unit | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for figure, (label, unit, _higher) in FIGURES.items():
        if not any(figure in r.samples or figure in r.errors for r in results.values()):
            continue
        if figure == "concurrent_ok":
            label = f"{wanted_concurrent} concurrent idle connections OK"
        cells = [_cell(results[n], figure, runs) for n in names]
        lines.append(f"| {label} | {unit} | " + " | ".join(cells) + " |")
    rat = ratios(results)
    if any(rat.values()):
        lines += [
            "",
            "Ratios of medians (ours / baseline; >1 is better for throughput and "
            "rates, <1 is better for times and CPU):",
            "",
            "| contender | figure | vs ssh -L | vs raw ssh | vs sshuttle |",
            "|---|---|---|---|---|",
        ]
        for name, per in rat.items():
            for figure in RATIO_FIGURES:
                if figure not in per:
                    continue
                cells = [f"{per[figure][b]:.2f}x" if b in per[figure] else "-" for b in BASELINES]
                lines.append(f"| {name} | {FIGURES[figure][0]} | " + " | ".join(cells) + " |")
    tgt = targets(results, wanted_concurrent)
    if tgt:
        lines += [
            "",
            "Targets:",
            "",
            "| contender | figure | target | value | met |",
            "|---|---|---|---|---|",
        ]
        for t in tgt:
            met = "-" if t.met is None else "yes" if t.met else "**no**"
            value = (
                "-"
                if t.value is None
                else (f"{t.value:.2f}x" if "x" in t.rule or "ssh -L's" in t.rule else _fmt(t.value))
            )
            lines.append(
                f"| {t.contender} | {FIGURES.get(t.figure, (t.figure,))[0]} | "
                f"{t.rule} | {value} | {met} |"
            )
    errs = [(n, f, m) for n, r in results.items() for f, ms in r.errors.items() for m in ms]
    notes = [(n, m) for n, r in results.items() for m in r.notes]
    if errs or notes:
        lines += ["", "Errors and notes:", ""]
        for n, f, m in errs:
            lines.append(f"- {n} / {f}: {m.splitlines()[0] if m else ''}")
        for n, m in notes:
            parts = [x.strip() for x in m.splitlines() if x.strip()]
            text = parts[0] + (f" ... {parts[-1]}" if len(parts) > 1 else "") if parts else ""
            lines.append(f"- {n}: {text[:300]}")
    return "\n".join(lines) + "\n"
