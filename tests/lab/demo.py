"""`python3 -m tests.lab.demo` (as root, from the repo root): shuttled in a throwaway lab.

Builds three network namespaces (client, ssh server with IP forwarding off, target), shows
that the client cannot reach the target, starts ``shuttled run`` in the client, fetches a
page from the target through the tunnel, stops shuttled with SIGINT, checks that the
client's firewall ruleset is exactly what it was, and tears everything down.
Exit status 0 only when every step did what it should.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from .core import Lab, LabError
from .env import missing_root_tools

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


class Out:
    """Terminal output: steps, commands, results; colour only on a terminal."""

    def __init__(self) -> None:
        self.color = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
        self.failures: list[str] = []

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def title(self, text: str) -> None:
        print(self._c("1", text))
        print(self._c("1", "=" * len(text)))

    def step(self, n: int, text: str) -> None:
        print()
        print(self._c("1;36", f"Step {n}. {text}"))

    def cmd(self, ns: str, argv: list[str] | str) -> None:
        shown = argv if isinstance(argv, str) else shlex.join(argv)
        print(self._c("2", f"  [{ns}] $ {shown}"))

    def ok(self, text: str) -> None:
        print(f"  {self._c('32', 'ok')}    {text}")

    def bad(self, text: str) -> None:
        self.failures.append(text)
        print(f"  {self._c('1;31', 'FAIL')}  {text}")

    def say(self, text: str = "", indent: int = 2) -> None:
        for line in text.splitlines() or [""]:
            print(" " * indent + line)

    def quote(self, text: str, limit: int = 20) -> None:
        lines = text.rstrip("\n").splitlines()
        for line in lines[:limit]:
            print(self._c("2", "      | ") + line)
        if len(lines) > limit:
            print(self._c("2", f"      | ... ({len(lines) - limit} more lines)"))


def curl(lab: Lab, url: str, max_time: float) -> tuple[int, str, str]:
    """curl in cli: (exit code, body, HTTP status or curl's error)."""
    r = lab.run(
        "cli",
        ["curl", "-sS", "--max-time", str(max_time), "-w", "\n%{http_code}", url],
        check=False,
        timeout=max_time + 10,
    )
    body, _, status = r.stdout.rpartition("\n")
    return r.returncode, body, status if r.returncode == 0 else r.stderr.strip()


def start_shuttled(lab: Lab, args: argparse.Namespace) -> tuple[subprocess.Popen[Any], list[str]]:
    argv = [sys.executable, "-m", "shuttled", "run", "-e", lab.ssh_cmd, "-r", lab.remote]
    if args.method:
        argv += ["--method", args.method]
    if args.dns:
        argv += ["--dns"]
    argv += lab.target_nets
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = lab.popen("cli", argv, name="shuttled", env=env, cwd=str(REPO))
    return proc, argv


def wait_ready(lab: Lab, proc: subprocess.Popen[Any], out: Out) -> float | None:
    """Poll curl through the would-be tunnel (bounded); seconds to ready, or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < READY_TIMEOUT:
        if proc.poll() is not None:
            out.bad(f"shuttled exited with code {proc.returncode} before the tunnel came up")
            return None
        code, body, _status = curl(lab, lab.http_url_v4, 1.0)
        if code == 0 and lab.http_marker in body:
            return time.monotonic() - t0
        time.sleep(0.2)
    out.bad(f"the target was still unreachable {READY_TIMEOUT:.0f} s after starting shuttled")
    return None


def stop_shuttled(lab: Lab, proc: subprocess.Popen[Any], out: Out) -> None:
    if proc.poll() is not None:
        out.bad(f"shuttled had already exited (code {proc.returncode})")
        return
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        out.bad(f"shuttled still running {STOP_TIMEOUT:.0f} s after SIGINT; killing it")
        lab.stop(proc)
        return
    took = time.monotonic() - t0
    if code == 0:
        out.ok(f"shuttled exited with code 0, {took:.2f} s after SIGINT")
    else:
        out.bad(f"shuttled exited with code {code} after SIGINT")


def compare_rules(before: dict[str, str], after: dict[str, str], out: Out) -> None:
    changed = [k for k in before if before.get(k) != after.get(k)]
    if not changed:
        out.ok(
            "the client's firewall rules are exactly what they were before the run ("
            + ", ".join(sorted(before))
            + ")"
        )
        return
    out.bad("firewall rules differ from before the run: " + ", ".join(changed))
    for k in changed:
        diff = difflib.unified_diff(
            before[k].splitlines(),
            after.get(k, "").splitlines(),
            f"{k} before",
            f"{k} after",
            lineterm="",
        )
        out.quote("\n".join(diff), limit=30)


def demo(lab: Lab, args: argparse.Namespace, out: Out) -> None:
    out.say(lab.describe())

    out.step(1, "Without the tunnel the client cannot reach the target network")
    out.cmd("cli", ["curl", "--max-time", "2", lab.http_url_v4])
    code, body, status = curl(lab, lab.http_url_v4, 2.0)
    if code != 0 and lab.http_marker not in body:
        out.ok("curl failed, as it should: " + (status.removeprefix("curl: ") or f"exit {code}"))
        out.say("      The client routes the target network via srv, and srv does not forward")
        out.say("      packets (net.ipv4.ip_forward = 0): they are dropped there.")
    else:
        out.bad("the target answered without any tunnel: the lab is not isolating it")
        return

    out.step(2, "Start shuttled in the client namespace")
    before = lab.firewall_snapshot("cli")
    proc, argv = start_shuttled(lab, args)
    out.cmd("cli", ["python3", *argv[1:]])
    ready = wait_ready(lab, proc, out)
    log_text = lab.log_tail("shuttled", 12)
    if ready is None:
        out.say("  shuttled's output:")
        out.quote(log_text or "(no output)", limit=40)
        if proc.poll() is None:
            lab.stop(proc)
        return
    out.ok(f"the target answers through the tunnel {ready:.1f} s after start (pid {proc.pid})")
    if log_text.strip():
        out.quote(log_text, limit=6)

    out.step(3, "Fetch the page from the target, through the tunnel")
    for url in (lab.http_url_v4, lab.http_url_v6):
        out.cmd("cli", ["curl", url])
        t0 = time.monotonic()
        code, body, status = curl(lab, url, 10.0)
        ms = (time.monotonic() - t0) * 1000
        if code == 0 and status == "200" and lab.http_marker in body:
            out.ok(
                f"HTTP {status}, {len(body.encode())} bytes in {ms:.0f} ms "
                "(including ip netns exec)"
            )
            if url == lab.http_url_v4:
                out.quote(body, limit=8)
        else:
            out.bad(f"curl {url}: exit {code}, {status}")
    seen = {line.split()[0] for line in lab.http_requests()}
    if seen and seen <= {lab.srv_tgt_v4, lab.srv_tgt_v6}:
        out.say(
            "      The web server saw every request come from " + " and ".join(sorted(seen)) + ":"
        )
        out.say(f"      srv's own addresses, not the client's {lab.cli_v4}. sshd on srv made the")
        out.say("      connections; nothing was installed there.")
    else:
        out.say(f"      The web server saw requests from: {', '.join(sorted(seen))}")

    if args.dns:
        out.step(4, f"Resolve {lab.dns_name}, a name only the remote's resolver knows")
        out.cmd("cli", ["getent", "hosts", lab.dns_name])
        r = lab.run("cli", ["getent", "hosts", lab.dns_name], check=False, timeout=20)
        if r.returncode == 0 and (lab.tgt_v4 in r.stdout or lab.tgt_v6 in r.stdout):
            out.ok(
                f"{lab.dns_name} -> {' '.join(r.stdout.split()[::2])} (the client's resolver "
                f"{lab.fake_dns_v4} exists only through the tunnel)"
            )
        else:
            out.bad(f"getent hosts {lab.dns_name}: exit {r.returncode} {r.stderr.strip()}")

    out.step(5 if args.dns else 4, "Stop shuttled with SIGINT (Ctrl-C) and check the rules")
    stop_shuttled(lab, proc, out)
    compare_rules(before, lab.firewall_snapshot("cli"), out)
    code, _body, _status = curl(lab, lab.http_url_v4, 1.0)
    if code != 0:
        out.ok("the target is unreachable again")
    else:
        out.bad("the target is still reachable after shuttled stopped")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m tests.lab.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--method", choices=("nft", "iptables"), help="firewall backend to use")
    ap.add_argument("--dns", action="store_true", help="also tunnel DNS (shuttled run --dns)")
    args = ap.parse_args(argv)

    out = Out()
    out.title("shuttled demo: a VPN over ssh, in a throwaway network")
    problems = missing_root_tools("ip", "sshd", "ssh", "ssh-keygen", "curl", "nft")
    if problems:
        print("cannot run the demo: " + "; ".join(problems))
        print("run it as root after installing the tools (see README: `bash .ci/run` does).")
        return 2

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    print()
    print("Building the lab: namespaces, veth links, sshd with fresh keys, target services ...")
    t0 = time.monotonic()
    lab = Lab()
    try:
        lab.open()
        print(f"  ready in {time.monotonic() - t0:.1f} s")
        demo(lab, args, out)
    except KeyboardInterrupt:
        out.bad("interrupted")
    except (LabError, subprocess.SubprocessError, OSError) as exc:
        out.bad(f"{type(exc).__name__}: {exc}")
    finally:
        print()
        print("Tearing down: stopping processes by PID, deleting namespaces and temp files ...")
        lab.close()
        if lab.teardown_errors:
            for err in lab.teardown_errors:
                out.bad(f"teardown: {err}")
        else:
            print("  done: nothing of the lab is left on this machine.")

    print()
    if out.failures:
        print(out._c("1;31", f"The demo did not go as it should ({len(out.failures)} problem(s)):"))
        for f in out.failures:
            print(f"  - {f}")
        return 1
    print(out._c("1;32", "The demo succeeded."))
    print("What happened: shuttled added firewall rules in the client that send connections for")
    print(f"{', '.join(lab.target_nets)} to its own listener, started one OpenSSH ControlMaster")
    print(f"to {lab.remote}, and carried each connection as an ssh channel (direct-tcpip); sshd on")
    print("the server opened the real connection to the target. Ctrl-C removed every rule.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
