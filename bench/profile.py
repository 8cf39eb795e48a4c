"""Profile shuttled's data path with py-spy during bulk transfers.

    sudo python3 -m bench.profile [--seconds 10] [--mode direct|helper] [--cipher C]
                                  [--load bulk|conn] [--out DIR]

Starts a lab and `shuttled run`, then for each direction runs a single-stream iperf3 while
`py-spy record` samples the shuttled process (and, in helper mode, also the remote helper);
writes the collapsed stacks (``*.txt``, flamegraph input) and an SVG flamegraph per
direction to --out, and prints the top functions by own samples and by inclusive samples.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import loadgen, tools
from bench.contenders import Contender, Context, ShuttledHelper, ShuttledRun, remote_processes
from tests.lab import Lab

TOP = 25


def record(pid: int, seconds: int, out: Path, fmt: str, py_spy: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            "200",
            "--nonblocking",
            "--format",
            fmt,
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def summarize(collapsed: Path, top: int = TOP) -> str:
    """Own and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "", "own (self) samples:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive samples:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    # py-spy frames look like "function (path/to/file.py:LINE)"; keep file name and line.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, line = where.rpartition(":")
    short = "/".join(Path(path).parts[-2:]) if path else where
    return f"{name} ({short}:{line})" if line else f"{name} ({short})"


def profile_direction(
    contender: Contender, down: bool, seconds: int, out: Path, py_spy: str
) -> str:
    lab = contender.lab
    tag = "down" if down else "up"
    iperf = ["iperf3", "-c", lab.tgt_v4, "-p", str(lab.ports.iperf3), "-t", str(seconds + 2)]
    if down:
        iperf.append("-R")
    client = lab.popen("cli", iperf, name=f"profile-iperf-{tag}")
    time.sleep(1.0)
    report = sample(contender, f"bulk {tag}", tag, seconds, out, py_spy)
    client.wait(seconds + 30)
    return report + "\n" + lab.log_tail(f"profile-iperf-{tag}", 4)


def profile_connections(contender: Contender, seconds: int, out: Path, py_spy: str) -> str:
    """Short HTTP requests at concurrency 8 (the bench's connection-rate load)."""
    ep = contender.endpoints().http
    assert ep is not None
    done: list[loadgen.LoadResult] = []

    def load() -> None:
        with contender.lab.netns("cli"):
            done.append(
                asyncio.run(
                    loadgen.http_load(ep[0], ep[1], concurrency=8, count=10**6, seconds=seconds + 2)
                )
            )

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(1.0)
    report = sample(contender, "new connections, c=8", "conn", seconds, out, py_spy)
    thread.join(seconds + 30)
    rate = f"{done[0].rate:.0f} requests/s" if done else "load did not finish"
    return report + "\n" + rate + "\n"


def sample(
    contender: Contender, what_load: str, tag: str, seconds: int, out: Path, py_spy: str
) -> str:
    """py-spy on shuttled (and the helper) for `seconds` while a load runs."""
    assert contender.proc is not None
    targets = {"shuttled": contender.proc.pid}
    for pid, role in remote_processes(contender.lab, contender.sshd_port).items():
        if role == "remote-python":
            targets["helper"] = pid
    spies = {}
    for what, pid in targets.items():
        for fmt, ext in (("raw", "txt"), ("flamegraph", "svg")):
            spies[(what, fmt)] = record(pid, seconds, out / f"{what}-{tag}.{ext}", fmt, py_spy)
    report = []
    for (what, fmt), spy in spies.items():
        _, err = spy.communicate(timeout=seconds + 60)
        if fmt == "raw":
            path = out / f"{what}-{tag}.txt"
            text = summarize(path) if path.exists() else f"py-spy failed: {err[-500:]}\n"
            report.append(f"== {what}, {what_load} ==\n{text}")
    return "\n".join(report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.profile", description=__doc__)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--mode", choices=("direct", "helper"), default="direct")
    p.add_argument("--cipher", default="default")
    p.add_argument(
        "--load",
        choices=("bulk", "conn"),
        default="bulk",
        help="iperf3 up then down (default), or new connections at c=8",
    )
    p.add_argument("--source", choices=("head", "worktree"), default="head")
    p.add_argument("--out", type=Path, default=Path("/tmp/shuttled-profile"))
    args = p.parse_args(argv)
    status = tools.tools_python("py-spy")
    if status.path is None:
        print(f"py-spy not available: {status.note}", file=sys.stderr)
        return 2
    venv_spy = Path(status.path).with_name("py-spy")
    py_spy = str(venv_spy) if venv_spy.exists() else shutil.which("py-spy")
    if py_spy is None:
        print("py-spy is installed but its program is not on PATH", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shuttled-bench-src-") as src, Lab() as lab:
        print(f"profiling shuttled {tools.snapshot(args.source, Path(src))}")
        os.chmod(src, 0o755)
        lab.start_iperf3()
        ctx = Context(lab, args.cipher, quick=False, source=src)
        contender: Contender = ShuttledRun(ctx) if args.mode == "direct" else ShuttledHelper(ctx)
        contender.start()
        try:
            if args.load == "conn":
                print(profile_connections(contender, args.seconds, args.out, py_spy))
            for down in (False, True) if args.load == "bulk" else ():
                print(profile_direction(contender, down, args.seconds, args.out, py_spy))
        finally:
            contender.stop()
    print(f"collapsed stacks and flamegraphs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
