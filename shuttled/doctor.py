"""Diagnose a profile's remote: `shuttlectl doctor PROFILE` and `shuttled run --check`.

The same ssh connection a tunnel would make (the profile's user, keys, config),
with nothing captured: no firewall rule, no listener. Each check is one row
(check, status, result, and for a failure the fix in one line), in the order a
tunnel needs them: ssh, its host key, forwarding, the helper's python, DNS to each
nameserver over each transport, the routes auto_nets would take, /etc/hosts.

A row is `fail` only when this profile needs what failed (forwarding with
`forward: direct`, python where the helper must carry TCP or UDP, DNS with `dns`
on, ...); otherwise `warn`. Rows after a failed ssh connection are `skip`.
DNS transports are a table (DNS_TRANSPORTS): each is one more row per nameserver.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from shuttled.const import ExitCode, Forward
from shuttled.control.protocol import JSON_SCHEMA
from shuttled.control.schema import CheckRow, DoctorReport
from shuttled.control.tables import doctor as doctor_text
from shuttled.dns.datagram import DatagramUpstream, HelperUnavailableError
from shuttled.dns.resolvconf import parse_nameserver
from shuttled.dns.upstream import TunnelUpstream, describe
from shuttled.dns.wire import FLAG_RD, HEADER, RCODE_MASK, Rcode, parse_header
from shuttled.errors import ShuttledError
from shuttled.net import Subnet
from shuttled.supervisor import (
    TunnelSpec,
    auto_subnets,
    local_addresses,
    nameservers_or_error,
    ssh_excludes,
)
from shuttled.tunnel import sshmsg
from shuttled.tunnel.channels import ChannelMux
from shuttled.tunnel.endpoints import open_stream
from shuttled.tunnel.remote_info import read_remote_file, remote_hosts, remote_routes
from shuttled.tunnel.session import SshSession
from shuttled.tunnel.ssh import known_host_key

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 10.0  # one remote command (cat, ip)
DNS_CHECK_TIMEOUT = 5.0
# `. NS IN`, recursion desired: any answer at all proves the way to the nameserver.
_ROOT_NS_QUESTION = b"\x00" + (2).to_bytes(2, "big") + (1).to_bytes(2, "big")


@dataclass
class _Checks:
    """The rows so far, and what the later checks need from the earlier ones."""

    spec: TunnelSpec
    rows: list[CheckRow] = field(default_factory=list)
    session: SshSession | None = None
    data: ChannelMux | None = None  # what carries TCP: sshd's, or the helper's
    excludes: tuple[Subnet, ...] = ()
    refused: bool = False  # sshd refuses direct-tcpip

    def add(self, check: str, ok: bool, needed: bool, result: str, fix: str | None = None) -> None:
        status = "ok" if ok else "fail" if needed else "warn"
        self.rows.append(
            {"check": check, "status": status, "result": result, "fix": None if ok else fix}
        )

    def skip(self, check: str, why: str) -> None:
        self.rows.append({"check": check, "status": "skip", "result": why, "fix": None})

    async def run(self, command: str) -> tuple[int | None, bytes, bytes]:
        assert self.session is not None
        return await self.session.run(command, COMMAND_TIMEOUT)

    @property
    def user(self) -> str:
        user = self.spec.target.user
        return user.name if user is not None else "you"


async def check(spec: TunnelSpec, as_json: bool) -> int:
    """`shuttled run --check`: the report on stdout, exit 1 when a needed check fails."""
    report = await diagnose(spec)
    if as_json:
        print(json.dumps({"schema": JSON_SCHEMA, "doctor": report}, indent=2), flush=True)
    else:
        print(doctor_text(report), flush=True)
    return ExitCode.OK if report["ok"] else ExitCode.FAILED


async def diagnose(spec: TunnelSpec) -> DoctorReport:
    """Every check of the profile's remote; nothing is captured, and the ssh
    connection made for it is closed before this returns."""
    checks = _Checks(spec)
    session = SshSession(
        spec.target, f"doctor-{spec.name}", forward=Forward.DIRECT, pythons=spec.pythons
    )
    try:
        await _ssh(checks, session)
        for name, step in _STEPS:
            if checks.session is None:
                checks.skip(name, "not checked: no ssh connection")
                continue
            try:
                await step(checks)
            except (ShuttledError, OSError, TimeoutError) as exc:  # e.g. a restricted shell
                error = str(exc) or "no answer in time"
                checks.add(name, False, True, error, "see the ssh server's log for why")
    finally:
        await session.stop()
    return {
        "profile": spec.name,
        "remote": spec.target.remote,
        "ok": all(row["status"] != "fail" for row in checks.rows),
        "checks": checks.rows,
    }


# --- ssh and its host key ---------------------------------------------------------------


async def _ssh(checks: _Checks, session: SshSession) -> None:
    remote = checks.spec.target.remote
    known, where = await _host_key(checks)
    started = time.monotonic()
    try:
        if checks.spec.auto_exclude:
            checks.excludes = await ssh_excludes(checks.spec.target)
        await session.start()
    except (ShuttledError, OSError, TimeoutError) as exc:
        error = str(exc) or "no answer in time"
        key_problem = "Host key verification failed" in error or "HOST IDENTIFICATION" in error
        checks.add("ssh", False, True, error, _ssh_fix(error, remote, checks.user))
        checks.add(
            "host key",
            known and not key_problem,
            True,
            f"{where}, but ssh refused it: the server's key changed?"
            if known and key_problem
            else where,
            f"as {checks.user}, run `ssh {remote}` once, compare the fingerprint with "
            "the server's, and accept it (or fix known_hosts)",
        )
        return
    elapsed = time.monotonic() - started
    checks.session = session
    checks.add("ssh", True, True, f"{remote} answered and took the key in {elapsed:.2f} s")
    checks.add("host key", True, True, where if known else "accepted (StrictHostKeyChecking)")


async def _host_key(checks: _Checks) -> tuple[bool, str]:
    try:
        return await known_host_key(checks.spec.target)
    except (ShuttledError, OSError, TimeoutError) as exc:
        return False, f"cannot look it up: {exc}"


# ssh's error, and the fix for it (the first that matches).
_SSH_FIXES = (
    ("Connection refused", "nothing listens there: start sshd, or fix the profile's port"),
    ("Could not resolve", "the name does not resolve here: fix `remote` or ~/.ssh/config"),
    ("timed out", "no answer: check the address, the route and any firewall on the way"),
    ("No route to host", "no route there: check the address and this machine's network"),
    ("Host key verification failed", "see the host key row"),
    ("HOST IDENTIFICATION", "see the host key row"),
    (
        "Permission denied",
        "the server refused the key: add {user}'s public key to the "
        "remote's authorized_keys, or load it into {user}'s agent",
    ),
)


def _ssh_fix(error: str, remote: str, user: str) -> str:
    for needle, fix in _SSH_FIXES:
        if needle.lower() in error.lower():
            return fix.format(user=user)
    return f"as {user}, run `ssh -v {remote} true` to see why"


# --- what the tunnel needs on the remote ------------------------------------------------


async def _forwarding(checks: _Checks) -> None:
    assert checks.session is not None
    forward = checks.spec.forward
    reason = await checks.session.probe_forwarding()
    checks.refused = refused = reason == sshmsg.OPEN_ADMINISTRATIVELY_PROHIBITED
    direct = not refused and forward is not Forward.HELPER
    checks.data = checks.session.control if direct else None
    result = "sshd opens direct-tcpip channels"
    if refused:
        result = "sshd refuses direct-tcpip (AllowTcpForwarding no)" + (
            ": the helper carries TCP" if forward is Forward.AUTO else ""
        )
    checks.add(
        "forwarding",
        not refused,
        forward is Forward.DIRECT,
        result,
        "set `AllowTcpForwarding yes` in the server's sshd_config, or `forward: helper`",
    )


async def _python(checks: _Checks) -> None:
    session, spec = checks.session, checks.spec
    assert session is not None and session.control is not None
    carries = spec.forward is Forward.HELPER or (spec.forward is Forward.AUTO and checks.refused)
    needed = carries or spec.router.udp
    try:
        mux = await session.start_helper(session.control, lambda _exc: None)
    except (ShuttledError, OSError, TimeoutError) as exc:
        checks.add(
            "python",
            False,
            needed,
            str(exc) or "the helper did not start in time",
            "install python3 (3.8 or later) on the remote, or set `python:` (--python) to one",
        )
        return
    if carries:
        checks.data = mux
    use = "carries TCP" if carries else "for UDP" if spec.router.udp else "not needed"
    checks.add("python", True, needed, f"Python {session.helper_python}: the helper starts ({use})")


# --- DNS: the nameservers, and each transport to each ------------------------------------


async def _dns(checks: _Checks) -> None:
    needed = checks.spec.dns_plan() is not None
    servers = list(checks.spec.dns_upstream)
    if servers:
        checks.add("nameservers", True, needed, f"{', '.join(servers)} (the profile's)")
    else:
        try:
            servers = nameservers_or_error(await read_remote_file(checks.run, "/etc/resolv.conf"))
        except (ShuttledError, TimeoutError) as exc:
            fix = "set the profile's `dns: {nameservers: [...]}` (--to-ns) to the remote's"
            checks.add("nameservers", False, needed, str(exc) or "no answer in time", fix)
            return
        checks.add("nameservers", True, needed, f"{', '.join(servers)} (remote's resolv.conf)")
    for server in servers:
        first = len(checks.rows)
        for name, transport in DNS_TRANSPORTS:
            await transport(checks, server, f"dns {name} {server}", needed)
        _one_transport_is_enough(checks.rows[first:])


def _one_transport_is_enough(rows: list[CheckRow]) -> None:
    """A nameserver that answers over one transport needs no other: their failures warn."""
    if any(row["status"] == "ok" for row in rows):
        for row in rows:
            if row["status"] == "fail":
                row["status"] = "warn"


async def _dns_tcp(checks: _Checks, server: str, check: str, needed: bool) -> None:
    data = checks.data
    if data is None:
        checks.skip(check, "not checked: nothing carries TCP (see forwarding and python)")
        return
    upstream = TunnelUpstream(
        lambda host, port: open_stream(data, host, port),
        [server],
        connect_timeout=DNS_CHECK_TIMEOUT,
    )
    try:
        await _dns_query(checks, check, needed, upstream.query, server, "TCP")
    finally:
        upstream.close()


async def _dns_udp(checks: _Checks, server: str, check: str, needed: bool) -> None:
    """UDP from the remote through the helper: what DNS falls back to where the
    nameserver refuses or drops TCP. Needed only where TCP failed."""
    session = checks.session
    assert session is not None
    tcp_failed = any(
        row["check"] == f"dns tcp {server}" and row["status"] != "ok" for row in checks.rows
    )
    host, port = parse_nameserver(server)
    upstream = DatagramUpstream(session.udp_mux)

    async def ask(query: bytes, deadline: float) -> bytes:
        return await upstream.ask(host, port, query, deadline)

    try:
        await _dns_query(checks, check, needed and tcp_failed, ask, server, "UDP")
    finally:
        upstream.close()


async def _dns_query(
    checks: _Checks,
    check: str,
    needed: bool,
    ask: Callable[[bytes, float], Awaitable[bytes]],
    server: str,
    transport: str,
) -> None:
    """One `. NS` query through one transport: a row with the time taken, or the fix."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    query = HEADER.pack(random.getrandbits(16), FLAG_RD, 1, 0, 0, 0) + _ROOT_NS_QUESTION
    try:
        reply = await ask(query, started + DNS_CHECK_TIMEOUT)
        rcode = Rcode(parse_header(reply).flags & RCODE_MASK).name
    except HelperUnavailableError as exc:
        fix = "install Python 3.8+ on the remote (or name it with `python:`), or let it answer TCP"
        checks.add(check, False, needed, describe(exc), fix)
        return
    except Exception as exc:  # the upstream's failures are any transport's: say which
        host, port = parse_nameserver(server)
        fix = (
            f"the remote cannot reach {host} port {port} over {transport}: fix the nameserver "
            "(`dns: {nameservers: [...]}`, --to-ns) or let it answer"
        )
        checks.add(check, False, needed, describe(exc), fix)
        return
    elapsed = (loop.time() - started) * 1000
    checks.add(check, True, needed, f"answers in {elapsed:.0f} ms ({rcode})")


# Transport name -> its check, in the order DNS tries them.
DnsCheck = Callable[[_Checks, str, str, bool], Awaitable[None]]
DNS_TRANSPORTS: list[tuple[str, DnsCheck]] = [("tcp", _dns_tcp), ("udp", _dns_udp)]


# --- the facts auto_nets and remote_hosts take --------------------------------------------


async def _routes(checks: _Checks) -> None:
    spec = checks.spec
    learnt = await remote_routes(checks.run)
    kept = auto_subnets(
        learnt.value,
        spec.subnets,
        [e.network for e in checks.excludes],
        [],
        local_addresses(),
    )
    text = ", ".join(str(s.network) for s in kept) or "no usable network"
    sources = f" (from {'; '.join(f'`{s}`' for s in learnt.sources)})" if learnt.sources else ""
    checks.add(
        "routes",
        not learnt.missing,
        spec.auto_nets,
        f"{text}{sources}" + "".join(f"; {line}" for line in learnt.missing),
        "give the profile its subnets by hand, or let the remote user run `ip` "
        "or read /proc/net/route",
    )


async def _hosts(checks: _Checks) -> None:
    learnt = await remote_hosts(checks.run)
    checks.add(
        "hosts",
        not learnt.missing,
        checks.spec.remote_hosts,
        "; ".join(learnt.missing) or f"{len(learnt.value)} names in /etc/hosts",
        "turn remote_hosts off, or make /etc/hosts readable to the remote user",
    )


# In the order a tunnel needs them; each name is that check's row when it cannot run.
_STEPS: tuple[tuple[str, Callable[[_Checks], Awaitable[None]]], ...] = (
    ("forwarding", _forwarding),
    ("python", _python),
    ("nameservers", _dns),
    ("routes", _routes),
    ("hosts", _hosts),
)
