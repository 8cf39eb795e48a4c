"""DNS with `shuttled run` in the lab, through the firewall (no systemd-resolved in cli):
split DNS, `all` without a leak, a silent remote resolver, the remote's host names.

The remote's resolver is the lab's responder in tgt, the only one that knows
*.corp.shuttled.test, and it logs every query (lab.dns_queries()). The client's own
resolver (its resolv.conf names lab.fake_dns_v4) is a responder this module puts on
that address in cli: it knows only *.public.test and logs too.
"""

from __future__ import annotations

import ipaddress
import signal
from collections.abc import Iterator

import pytest

from tests.integration.dns_util import (
    PUBLIC_ADDRESS,
    PUBLIC_NAME,
    REMOTE_ONLY_NAME,
    REMOTE_ONLY_SHORT,
    ask,
    dns_lab,
    leak_counter,
    local_resolver,
    our_links,
    timed_ask,
)
from tests.lab import Lab
from tests.lab.runner import start_run, stop_run

pytestmark = pytest.mark.integration

SERVFAIL, NXDOMAIN = 2, 3


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from dns_lab()


def remote_names(lab: Lab) -> list[str]:
    return [name for _, name, _ in lab.dns_queries()]


@pytest.mark.parametrize("method", ["nft", "iptables"])
def test_split_private_name_through_the_tunnel_public_name_stays_local(
    lab: Lab, method: str
) -> None:
    before = lab.firewall_snapshot()
    reverse = ipaddress.ip_address(lab.tgt_v4).reverse_pointer
    with local_resolver(lab) as local:
        lab.clear_dns_queries()
        proc = start_run(
            lab,
            "--dns-domain",
            lab.dns_zone,
            *lab.target_nets,
            method=method,
            name=f"split-{method}",
        )
        try:
            private = ask(lab, lab.fake_dns_v4, lab.dns_name)
            private6 = ask(lab, lab.fake_dns_v4, lab.dns_name, "AAAA", tcp=True)
            public = ask(lab, lab.fake_dns_v4, PUBLIC_NAME)
            public_tcp = ask(lab, lab.fake_dns_v4, PUBLIC_NAME, tcp=True)
            ptr = ask(lab, lab.fake_dns_v4, reverse, "PTR")
            glibc = lab.run("cli", ["getent", "ahostsv4", PUBLIC_NAME]).stdout
            glibc_private = lab.run("cli", ["getent", "ahostsv4", lab.dns_name]).stdout
            rules = lab.firewall_snapshot()
        finally:
            assert stop_run(lab, proc) == 0, lab.log_tail(f"split-{method}")
    assert private.addresses == [lab.tgt_v4] and private6.addresses == [lab.tgt_v6]
    assert public.addresses == public_tcp.addresses == [PUBLIC_ADDRESS]
    assert PUBLIC_ADDRESS in glibc and lab.tgt_v4 in glibc_private
    assert ptr.rcode == NXDOMAIN  # the remote's resolver answered it: its reverse zone
    seen_remote = remote_names(lab)
    assert lab.dns_name in seen_remote and reverse in seen_remote
    assert PUBLIC_NAME not in seen_remote
    assert PUBLIC_NAME in local.names() and lab.dns_name not in local.names()
    assert "0x5d1e0053" in (rules["nft"] if method == "nft" else rules["iptables-save"])
    assert lab.firewall_snapshot() == before
    assert our_links(lab) == []  # the firewall path makes no link


def test_all_every_query_through_the_tunnel_none_leaves_another_way(lab: Lab) -> None:
    before = lab.firewall_snapshot()
    names = [lab.dns_name, PUBLIC_NAME, "anything.example"]
    with local_resolver(lab) as local, leak_counter(lab) as leaks:
        # The counter counts: a query straight to the target network leaves cli.
        with pytest.raises(TimeoutError):
            ask(lab, lab.tgt_v4, "control.example", timeout=0.5)
        assert leaks.packets() >= 1
        leaks.remove()
        leaks.__init__(lab)  # type: ignore[misc]
        lab.clear_dns_queries()
        proc = start_run(lab, "--dns", lab.target_net_v4, name="dns-all")
        try:
            answers = [ask(lab, lab.fake_dns_v4, name) for name in names]
            # An app asking a resolver of its own (routed out via srv), not resolv.conf's.
            own_resolver = lab.fake_dns_v4.rsplit(".", 1)[0] + ".99"
            own = ask(lab, own_resolver, lab.dns_name)
            own_tcp = ask(lab, own_resolver, "tcp.example", tcp=True)
            also = ask(lab, lab.tgt_v4, "direct.example")  # even to the target's own :53
            glibc = lab.run("cli", ["getent", "ahostsv4", lab.dns_name]).stdout
            leaked = leaks.packets()
        finally:
            assert stop_run(lab, proc) == 0, lab.log_tail("dns-all")
    assert leaked == 0
    assert local.queries == []
    seen_remote = remote_names(lab)
    for name in [*names, "tcp.example", "direct.example"]:
        assert name in seen_remote, name
    assert answers[0].addresses == own.addresses == [lab.tgt_v4]
    assert answers[1].rcode == NXDOMAIN  # the remote's resolver does not know public.test
    assert own_tcp.rcode == also.rcode == NXDOMAIN and lab.tgt_v4 in glibc
    assert lab.firewall_snapshot() == before


def test_silent_remote_resolver_fails_within_2_s_then_answers_again(lab: Lab) -> None:
    proc = start_run(lab, "--dns", lab.target_net_v4, name="dns-silent")
    try:
        lab.set_dns_silent(True)
        failed, seconds = timed_ask(lab, lab.fake_dns_v4, lab.dns_name)
        lab.set_dns_silent(False)
        again, again_seconds = timed_ask(lab, lab.fake_dns_v4, lab.dns_name)
    finally:
        lab.set_dns_silent(False)
        assert stop_run(lab, proc) == 0
    assert failed.rcode == SERVFAIL and seconds < 2.5, seconds
    assert again.addresses == [lab.tgt_v4] and again_seconds < 1.0


def test_remote_hosts_names_resolve_and_the_local_hosts_file_stays(lab: Lab) -> None:
    hosts_before = lab.run("cli", ["cat", "/etc/hosts"]).stdout
    reverse = ipaddress.ip_address(lab.tgt_v4).reverse_pointer
    with local_resolver(lab) as local:
        lab.clear_dns_queries()
        proc = start_run(
            lab,
            "--dns-domain",
            lab.dns_zone,
            "--remote-hosts",
            lab.target_net_v4,
            name="remote-hosts",
        )
        try:
            full = ask(lab, lab.fake_dns_v4, REMOTE_ONLY_NAME)
            six = ask(lab, lab.fake_dns_v4, REMOTE_ONLY_NAME, "AAAA", tcp=True)
            short = ask(lab, lab.fake_dns_v4, REMOTE_ONLY_SHORT)
            ptr = ask(lab, lab.fake_dns_v4, reverse, "PTR")
            glibc = lab.run("cli", ["getent", "ahosts", REMOTE_ONLY_NAME]).stdout
        finally:
            assert stop_run(lab, proc, signal.SIGINT) == 0
    assert full.addresses == short.addresses == [lab.tgt_v4]
    assert six.addresses == [lab.tgt_v6]
    assert lab.tgt_v4 in glibc and lab.tgt_v6 in glibc
    ptr_names = [a["data"] for a in ptr.raw["answers"]]
    assert ptr_names == [b"\x07build01\x0bremote-only\x04test\x00"]
    # Answered from the remote's hosts file: no resolver was asked.
    assert REMOTE_ONLY_NAME not in remote_names(lab) + local.names()
    assert lab.run("cli", ["cat", "/etc/hosts"]).stdout == hosts_before
