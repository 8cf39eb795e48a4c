"""DNS to a remote nameserver that answers over UDP only, in the lab.

The remote's resolver is the lab's responder in tgt; `lab.dns_tcp_closed()` refuses
its TCP 53 (a reset) or black-holes it (no answer) while UDP keeps answering, as
many small resolvers, appliances and firewalls do. shuttled tries DNS over TCP
through a channel first, then sends the query over UDP from the remote through the
helper (srv has python3), and keeps that choice; with no python for the helper
(`--python /nonexistent`) it says why in one line. Through `shuttled run --dns`,
daemon profiles (dns all and split) and router mode's DNS for LAN hosts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.daemon_util import Daemon, DaemonSet, root_profile, split_profile, wait_for
from tests.integration.dns_util import ask, dns_lab, local_resolver, timed_ask
from tests.integration.router_util import start_lan_run
from tests.lab import Lab, clients
from tests.lab.runner import start_run, stop_run

pytestmark = pytest.mark.integration

SERVFAIL = 2
NO_PYTHON = "/nonexistent/python3"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from dns_lab()


def protocols_seen(lab: Lab, name: str) -> set[str]:
    """How the remote's resolver was asked for `name`: udp, tcp (-silent when dropped)."""
    return {proto for proto, seen, _ in lab.dns_queries() if seen == name}


def profile_up(daemons: DaemonSet, body: dict[str, Any]) -> Daemon:
    """A daemon with profile `corp` (body), brought up."""
    d = daemons.new()
    d.write_profile("corp", body)
    d.start()
    d.up("corp")
    return d


@pytest.mark.parametrize("how", ["refuse", "drop"])
def test_run_answers_over_udp_when_the_nameserver_closes_tcp(lab: Lab, how: str) -> None:
    name = f"run-{how}"
    lab.clear_dns_queries()
    with lab.dns_tcp_closed(how):
        proc = start_run(lab, "--dns", lab.target_net_v4, name=name)
        try:
            first, first_seconds = timed_ask(lab, lab.fake_dns_v4, lab.dns_name)
            second, second_seconds = timed_ask(lab, lab.fake_dns_v4, f"tgt.{lab.dns_zone}")
            log = lab.log_tail(name, 400)
        finally:
            assert stop_run(lab, proc) == 0, lab.log_tail(name)
    assert first.addresses == [lab.tgt_v4] and first_seconds < 2.5, first_seconds
    assert second.addresses == [lab.tgt_v4] and second_seconds < 1.0, second_seconds
    assert protocols_seen(lab, lab.dns_name) == {"udp"}
    assert f"nameserver {lab.dns_v4} " in log and "asking it over UDP from now on" in log
    # Once UDP is known to work, TCP is not tried again in this session.
    assert protocols_seen(lab, f"tgt.{lab.dns_zone}") == {"udp"}


def test_run_without_python_for_the_helper_says_why_in_one_line(lab: Lab) -> None:
    name = "run-no-python"
    with lab.dns_tcp_closed("refuse"):
        proc = start_run(lab, "--dns", "--python", NO_PYTHON, lab.target_net_v4, name=name)
        try:
            failed, seconds = timed_ask(lab, lab.fake_dns_v4, lab.dns_name)
            log = lab.log_tail(name, 400)
        finally:
            assert stop_run(lab, proc) == 0, lab.log_tail(name)
    assert failed.rcode == SERVFAIL and seconds < 2.5, seconds
    [line] = [ln for ln in log.splitlines() if "nameserver failed" in ln]
    assert f"{lab.dns_v4} refuses DNS over TCP" in line, line
    assert "needs the remote helper" in line and NO_PYTHON in line, line


@pytest.mark.parametrize("mode", ["all", "split"])
def test_profile_falls_back_to_udp_and_shows_it(lab: Lab, daemons: DaemonSet, mode: str) -> None:
    nets = [f"{lab.tgt_v4}/32"]
    body = (
        root_profile(lab, nets, dns={"mode": "all"})
        if mode == "all"
        else split_profile(lab, nets, lab.dns_zone)
    )
    with local_resolver(lab), lab.dns_tcp_closed("refuse"):
        d = profile_up(daemons, body)
        answer = ask(lab, lab.fake_dns_v4, lab.dns_name)
        stats = d.stats("corp")["dns"]
        status = d.status("corp")
        text = d.ctl("stats", "corp").stdout
    assert answer.addresses == [lab.tgt_v4]
    expected = {"address": lab.dns_v4, "transport": "udp", "health": "answering", "error": None}
    assert stats["nameservers"] == [expected]
    assert status["dns"]["nameservers"] == [expected] and status["health"] == []
    assert f"nameserver {lab.dns_v4}: udp, answering" in text


def test_profile_without_python_says_why_in_its_status(lab: Lab, daemons: DaemonSet) -> None:
    body = root_profile(lab, [f"{lab.tgt_v4}/32"], dns={"mode": "all"}, python=NO_PYTHON)
    with local_resolver(lab), lab.dns_tcp_closed("refuse"):
        d = profile_up(daemons, body)
        failed = ask(lab, lab.fake_dns_v4, lab.dns_name)
        health = wait_for("a DNS health line", lambda: d.status("corp")["health"], 5.0)
        text = d.ctl("status", "corp").stdout
    assert failed.rcode == SERVFAIL
    [line] = health
    assert line.startswith(f"DNS: no nameserver answers: {lab.dns_v4} refuses DNS over TCP")
    assert "needs the remote helper" in line and NO_PYTHON in line
    assert line in text


def test_lan_hosts_dns_takes_the_same_udp_fallback(rlab: Lab) -> None:
    name = "run-lan-udp-dns"
    rlab.clear_dns_queries()
    with rlab.dns_tcp_closed("refuse"):
        proc = start_lan_run(rlab, name)
        try:
            with rlab.netns("lan"):
                answer = clients.dns_query(rlab.fake_dns_v4, rlab.dns_name, "A")
        finally:
            assert stop_run(rlab, proc) == 0, rlab.log_tail(name)
    assert rlab.tgt_v4 in answer.addresses
    assert protocols_seen(rlab, rlab.dns_name) == {"udp"}
