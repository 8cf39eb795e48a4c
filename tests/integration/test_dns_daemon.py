"""The daemon's per-profile resolver and learnt routes, through the firewall (no
systemd-resolved in cli): auto_nets, two split profiles side by side, overlapping
names refused, and what a SIGKILL leaves for `shuttled cleanup`."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from tests.integration.daemon_util import (
    REPO_ROOT,
    DaemonSet,
    http_ok,
    nft_table,
    root_profile,
    split_profile,
    wait_for,
)
from tests.integration.dns_util import (
    PUBLIC_ADDRESS,
    PUBLIC_NAME,
    PUBLIC_ZONE,
    ask,
    dns_lab,
    local_resolver,
)
from tests.integration.dns_util import our_links as links_in
from tests.lab import Lab, clients

pytestmark = pytest.mark.integration

NXDOMAIN = 3
USAGE = 2


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from dns_lab()


@contextlib.contextmanager
def routes(lab: Lab, ns: str, *routes: list[str]) -> Iterator[None]:
    """Routes (`ip route add ...` arguments) in a namespace, deleted afterwards."""
    added = []
    try:
        for route in routes:
            lab._ip(lab.ns(ns), ["route", "add", *route])
            added.append(route)
        yield
    finally:
        for route in reversed(added):
            with contextlib.suppress(Exception):
                lab._ip(lab.ns(ns), ["route", "del", *route])


@contextlib.contextmanager
def addresses(lab: Lab, ns: str, *cidrs: str) -> Iterator[None]:
    try:
        for cidr in cidrs:
            lab._ip(lab.ns(ns), ["addr", "add", cidr, "dev", "lo"])
        yield
    finally:
        for cidr in cidrs:
            with contextlib.suppress(Exception):
                lab._ip(lab.ns(ns), ["addr", "del", cidr, "dev", "lo"])


def learnt(status: dict[str, Any]) -> set[str]:
    return {s["subnet"] for s in status["subnets"] if s["source"] == "auto_nets"}


def test_auto_nets_capture_what_the_remote_routes_and_never_its_default(
    lab: Lab, daemons: DaemonSet
) -> None:
    n = lab.net
    site_v4, site_v6 = f"10.{n}.5.0/24", f"fd00:{n}:5::/64"
    host_v4, host_v6 = f"10.{n}.5.5", f"fd00:{n}:5::5"
    later_v4, later_host = f"10.{n}.7.0/24", f"10.{n}.7.7"
    with (
        addresses(lab, "tgt", f"{host_v4}/32", f"{host_v6}/128", f"{later_host}/32"),
        # Known only to srv: a site behind tgt, and default routes (never to be taken).
        routes(
            lab,
            "srv",
            [site_v4, "via", lab.tgt_v4],
            [site_v6, "via", lab.tgt_v6],
            ["default", "via", lab.tgt_v4],
            ["default", "via", lab.tgt_v6],
        ),
        # cli gets a default route too: an uncaptured connection then leaves (and dies
        # at srv) instead of failing at once for want of a route.
        routes(lab, "cli", ["default", "via", lab.srv_v4], ["default", "via", lab.srv_v6]),
    ):
        d = daemons.new()
        d.write_profile("auto", root_profile(lab, [], auto_nets=True))
        d.start()
        with lab.netns("cli"):
            outcome_before, _ = clients.probe_tcp(host_v4, lab.ports.http, timeout=1.0)
        d.up("auto")
        status = d.status("auto")
        assert learnt(status) == {lab.target_net_v4, lab.target_net_v6, site_v4, site_v6}
        assert http_ok(lab, host_v4) and http_ok(lab, host_v6) and http_ok(lab, lab.tgt_v4)
        table = nft_table(lab) or ""
        assert "0.0.0.0/0" not in table and "::/0" not in table
        total = d.stats("auto")["total"]
        with lab.netns("cli"):
            outside, _ = clients.probe_tcp("192.0.2.1", 80, timeout=1.0)
        assert outside == "timeout" and d.stats("auto")["total"] == total

        # Refreshed on reconnect: a route srv learns meanwhile is captured after it.
        with routes(lab, "srv", [later_v4, "via", lab.tgt_v4]):
            psutil.Process(d.ssh_pid("auto")).kill()
            wait_for(
                "the new route after the reconnect",
                lambda: later_v4 in learnt(d.status("auto")),
                30,
                detail=d.log,
            )
            d.wait_state("auto", "up")
            assert http_ok(lab, later_host)
    assert outcome_before in ("timeout", "unreachable")


def test_two_split_profiles_each_get_their_own_names(lab: Lab, daemons: DaemonSet) -> None:
    www, alt = lab.dns_name, f"alt.{lab.dns_zone}"
    with local_resolver(lab) as local:
        d = daemons.new()
        d.write_profile("corp", split_profile(lab, [f"{lab.tgt_v4}/32"], www))
        d.write_profile("alt", split_profile(lab, [f"{lab.tgt_v6}/128"], alt))
        d.write_profile("over", split_profile(lab, [f"{lab.tgt_v4_alt}/32"], lab.dns_zone))
        d.start()
        d.up("corp")
        d.up("alt")
        refused = d.ctl("up", "over")
        assert refused.returncode == USAGE and "overlap in DNS" in refused.stderr
        lab.clear_dns_queries()
        answers = {name: ask(lab, lab.fake_dns_v4, name) for name in (www, alt, PUBLIC_NAME)}
        corp_dns, alt_dns = d.stats("corp")["dns"], d.stats("alt")["dns"]
        assert d.status("corp")["dns"]["path"] == "firewall"
        d.ctl_json("down", "alt")
        gone = ask(lab, lab.fake_dns_v4, alt)
        still = ask(lab, lab.fake_dns_v4, www)
    assert answers[www].addresses == still.addresses == [lab.tgt_v4]
    assert answers[alt].addresses == [lab.tgt_v4_alt]
    assert answers[PUBLIC_NAME].addresses == [PUBLIC_ADDRESS]
    # Each name through its own profile's tunnel; the other names stayed local.
    assert corp_dns["tunnel"] == 1 and alt_dns["tunnel"] == 1
    assert corp_dns["peer"] + alt_dns["peer"] == 1
    assert PUBLIC_NAME not in [q[1] for q in lab.dns_queries()]
    assert gone.rcode == NXDOMAIN and alt in local.names() and www not in local.names()


def test_down_exit_and_cleanup_after_sigkill_leave_the_firewall_as_before(
    lab: Lab, daemons: DaemonSet
) -> None:
    before = lab.firewall_snapshot()
    with local_resolver(lab):
        d = daemons.new()
        d.write_profile("corp", split_profile(lab, [lab.target_net_v4], lab.dns_zone))
        d.start()
        d.up("corp")
        assert "0x5d1e0053" in (nft_table(lab) or "")
        d.ctl_json("down", "corp")
        assert "dport 53" not in (nft_table(lab) or "")
        d.up("corp")
        assert ask(lab, lab.fake_dns_v4, lab.dns_name).addresses == [lab.tgt_v4]
        d.kill()
        assert "0x5d1e0053" in (nft_table(lab) or "")  # SIGKILL leaves the rules...
        cleanup = lab.run(
            "cli", [sys.executable, "-m", "shuttled", "cleanup"], cwd=str(REPO_ROOT), check=False
        )
        assert cleanup.returncode == 0, cleanup.stderr
    assert lab.firewall_snapshot() == before  # ...and `shuttled cleanup` removes them
    assert links_in(lab) == []


def test_all_mode_reconnects_to_a_server_known_only_by_name(lab: Lab, daemons: DaemonSet) -> None:
    """With every query caught, a reconnect still resolves the ssh server's name: the
    profile's resolver answers it from the first connect, and nothing leaks."""
    bastion = f"bastion.{PUBLIC_ZONE}"
    with local_resolver(lab, {bastion: {"A": [lab.srv_v4]}}) as local:
        d = daemons.new()
        profile = root_profile(
            lab, [lab.target_net_v4], dns="all", ssh_options={"HostKeyAlias": lab.srv_v4}
        )
        d.write_profile("all", {**profile, "remote": bastion})
        d.start()
        d.up("all")
        first_ssh = d.ssh_pid("all")
        asked_before = local.names().count(bastion)
        psutil.Process(first_ssh).kill()
        wait_for(
            "a new ssh master",
            lambda: (
                d.state("all") == "up" and d.stats("all").get("ssh_pid") not in (None, first_ssh)
            ),
            30,
            detail=d.log,
        )
        assert http_ok(lab, lab.tgt_v4)
        hosts_answers = d.stats("all")["dns"]["hosts"]
    assert asked_before >= 1 and local.names().count(bastion) == asked_before
    assert hosts_answers >= 1  # the reconnect's lookups, answered by the pin
