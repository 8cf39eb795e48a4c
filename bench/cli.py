"""`python3 -m bench`: build the lab, run every contender through every figure, report."""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import figures, report, tools
from bench.contenders import ALL, DEFAULT_CIPHER, DEFAULT_ORDER, Contender, Context
from bench.figures import Sizes
from bench.report import ContenderResult
from tests.lab import Lab, missing_root_tools

log = logging.getLogger("bench")
AES = "aes128-gcm@openssh.com"
APP_ROLES = ("remote-other", "local-other")
TOOLS = ("ip", "sshd", "ssh", "ssh-keygen", "iperf3", "nft")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, 1-second iperf3 runs, few connections (smoke test)",
    )
    p.add_argument(
        "--runs", type=int, default=None, help="runs per contender (default 3; 1 with --quick)"
    )
    p.add_argument(
        "--cipher",
        choices=(DEFAULT_CIPHER, AES, "both"),
        default=DEFAULT_CIPHER,
        help="ssh cipher for every contender (-c; default: ssh's own choice)",
    )
    p.add_argument(
        "--only",
        default="",
        help=f"comma-separated contenders (default {','.join(DEFAULT_ORDER)}; "
        f"also: {','.join(n for n in ALL if n not in DEFAULT_ORDER)})",
    )
    p.add_argument(
        "--source",
        choices=("head", "worktree"),
        default="head",
        help="which shuttled to measure: the last commit (default) or the work "
        "tree as it is now; either way a snapshot taken at the start",
    )
    p.add_argument("--json", metavar="FILE", help="write the results as JSON here")
    p.add_argument("--markdown", metavar="FILE", help="write the markdown tables here too")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if not 1 <= args.runs <= 20:
        p.error("--runs must be 1..20")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(DEFAULT_ORDER)
    unknown = [n for n in names if n not in ALL]
    if unknown:
        p.error(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(ALL)}")
    args.names = names
    return args


def _guard(res: ContenderResult, figure: str, fn: Callable[[], Any]) -> Any:
    """Run one measurement; a failure becomes an error entry, not the end of the bench."""
    try:
        return fn()
    except Exception as exc:
        log.warning("  %s %s failed: %s", res.name, figure, exc)
        res.error(figure, f"{type(exc).__name__}: {exc}")
        return None


def measure(contender: Contender, sizes: Sizes, res: ContenderResult) -> None:
    t0 = time.monotonic()
    try:
        contender.start()
    except Exception as exc:
        log.warning("  %s did not start: %s", contender.name, exc)
        res.error("start", f"{type(exc).__name__}: {exc}")
        contender.stop()
        return
    log.info("  %s up in %.1fs", contender.name, time.monotonic() - t0)
    try:
        cpu: dict[str, float] = {}
        nbytes = 0
        for down in (False, True):
            for streams in (1, 4):
                figure = f"bulk_{'down' if down else 'up'}_{streams}"
                b = _guard(
                    res,
                    figure,
                    functools.partial(figures.bulk, contender, sizes, down=down, streams=streams),
                )
                if b is not None:
                    res.add(figure, b.gbit_per_s)
                    figures.add_cpu(cpu, b.cpu)
                    nbytes += b.nbytes
                    log.info("  %s %s: %.2f Gbit/s", contender.name, figure, b.gbit_per_s)
        if nbytes:
            gb = nbytes / 1e9
            for role, seconds in cpu.items():
                res.add(f"cpu_s_per_gb.{role}", seconds / gb)
            # The applications (iperf3, or cat/wc for raw ssh) are not the contender's cost.
            res.add(
                "cpu_s_per_gb.total",
                sum(v for role, v in cpu.items() if role not in APP_ROLES) / gb,
            )
        if not contender.forwards:
            return
        for c in (1, 8):
            load = _guard(
                res, f"conn_rate_c{c}", functools.partial(figures.conn_rate, contender, sizes, c)
            )
            if load is not None:
                res.add(f"conn_rate_c{c}", load.rate)
                if c == 1:
                    res.add("ttfb_ms", load.ttfb_median_ms)
                if load.errors:
                    res.notes.append(
                        f"conn_rate_c{c}: {load.errors} failed requests ({load.first_error})"
                    )
                log.info(
                    "  %s c=%d: %.0f conn/s, %d errors", contender.name, c, load.rate, load.errors
                )
        rtt = _guard(res, "rtt_us_median", lambda: figures.rtt(contender, sizes))
        if rtt is not None:
            res.add("rtt_us_median", rtt[0])
            res.add("rtt_us_p99", rtt[1])
            log.info("  %s rtt: median %.0f µs, p99 %.0f µs", contender.name, *rtt)
        conc = _guard(res, "concurrent_ok", lambda: figures.concurrent(contender, sizes))
        if conc is not None:
            res.add("concurrent_ok", conc.ok)
            res.add("rss_before_mb", conc.rss_before_mb)
            res.add("rss_held_mb", conc.rss_held_mb)
            res.add("rss_growth_mb", conc.growth_mb)
            if conc.ok < conc.wanted:
                res.notes.append(
                    f"{conc.ok}/{conc.wanted} concurrent connections succeeded ({conc.first_error})"
                )
            log.info(
                "  %s concurrent: %d/%d ok in %.1fs, RSS %s -> %s MB",
                contender.name,
                conc.ok,
                conc.wanted,
                conc.seconds,
                _mb(conc.rss_before_mb),
                _mb(conc.rss_held_mb),
            )
        if not contender.alive():
            res.notes.append(
                "the contender's process had exited by the end of its run:\n"
                + contender.log_tail(5)
            )
    finally:
        contender.stop()


def _mb(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def missing_figures(contender: type[Contender], res: ContenderResult, wanted: int) -> list[str]:
    """Figures the contender should have produced and did not.  A proxy that died under
    the concurrency load (sshuttle at about 1,000) has no RSS figure: that is its result."""
    ok = res.samples.get("concurrent_ok")
    died = bool(ok) and min(ok or [0.0]) < wanted
    return [
        f
        for f in contender.figures
        if not res.samples.get(f) and not (died and f == "rss_growth_mb")
    ]


def run(args: argparse.Namespace) -> int:
    sizes = Sizes.for_mode(args.quick)
    ciphers = [DEFAULT_CIPHER, AES] if args.cipher == "both" else [args.cipher]
    doc: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "runs": args.runs,
        "command": " ".join(["python3 -m bench", *sys.argv[1:]]),
        "machine": tools.machine(),
        "sizes": sizes.__dict__,
        "notes": [],
        "ciphers": {},
    }
    missing: list[str] = []
    with tempfile.TemporaryDirectory(prefix="shuttled-bench-src-") as src:
        doc["machine"]["shuttled"] = tools.snapshot(args.source, Path(src))
        os.chmod(src, 0o755)
        for cipher in ciphers:
            notes: list[str] = []
            results: dict[str, ContenderResult] = {}
            for name in args.names:
                why = ALL[name].unavailable_here()
                if why:
                    log.warning("%s skipped: %s", name, why)
                    doc["notes"].append(f"{name} skipped: {why}")
                    continue
                results[name] = ContenderResult(name, ALL[name].description)
            for i in range(args.runs):
                for name in results:
                    log.info("cipher %s, run %d/%d: %s", cipher, i + 1, args.runs, name)
                    # A fresh lab for every contender: no conntrack entries, TIME_WAIT
                    # sockets or leftover nat tables of one contender meet the next.
                    with Lab() as lab:
                        lab.start_iperf3()
                        ctx = Context(lab, cipher, args.quick, source=src)
                        contender = ALL[name](ctx)
                        measure(contender, sizes, results[name])
                        notes += ctx.notes
            doc["ciphers"][cipher] = {
                "contenders": {n: r.to_json() for n, r in results.items()},
                "ratios": report.ratios(results),
                "targets": [t.to_json() for t in report.targets(results, sizes.concurrent)],
                "markdown": report.markdown(cipher, results, args.runs, sizes.concurrent),
            }
            doc["notes"] += notes
            for name, res in results.items():
                for figure in missing_figures(ALL[name], res, sizes.concurrent):
                    missing.append(f"{cipher}/{name}/{figure}")
    doc["missing"] = missing
    doc["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    text = _render(doc)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text)
    if missing:
        print(f"bench: figures missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def _render(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    head = [
        f"## Bench results ({doc['mode']}, {doc['runs']} run(s), {doc['started']})",
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu']}, kernel {m['kernel']}, {m['openssh']}, "
        f"{m['iperf3']}, Python {m['python']}, shuttled {m['shuttled']}.",
        f"Command: `sudo {doc['command']}`",
        "",
    ]
    head += [f"- {n}" for n in doc["notes"]]
    parts = ["\n".join(head)]
    parts += [c["markdown"] for c in doc["ciphers"].values()]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    return run_lab_program("bench", args, run, TOOLS, verbose=args.verbose)


def run_lab_program(
    prog: str,
    args: argparse.Namespace,
    body: Callable[[argparse.Namespace], int],
    tools: Sequence[str],
    *,
    verbose: bool = False,
) -> int:
    """What every bench program does around its body: logging, the root-tools check
    (exit 2), and SIGINT/SIGTERM turned into a teardown of the lab (exit 130)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s {prog}: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    problems = missing_root_tools(*tools)
    if problems:
        print(f"{prog}: cannot run: {'; '.join(problems)}", file=sys.stderr)
        return 2
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # SIGINT may arrive ignored (started in the background) and SIGTERM would skip the
    # lab's teardown: both become KeyboardInterrupt, so `with Lab()` cleans up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return body(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the lab was torn down", file=sys.stderr)
        return 130
