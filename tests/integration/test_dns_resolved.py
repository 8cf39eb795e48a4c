"""Split DNS through a real systemd-resolved: a link per profile, its DNS server and
`~domain` routing domains set over D-Bus, undone on down and by `shuttled cleanup`.

resolved runs in cli without systemd as PID 1: unpacked from its Debian package
(never installed), beside a private dbus-daemon; see tests/integration/dns_util.py.
The daemon finds it on that bus (DBUS_SYSTEM_BUS_ADDRESS) in its own network
namespace and takes the resolved path; the firewall then catches no DNS at all.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.integration.daemon_util import (
    REPO_ROOT,
    DaemonSet,
    nft_table,
    split_profile,
    wait_for,
)
from tests.integration.dns_util import (
    PUBLIC_ADDRESS,
    PUBLIC_NAME,
    ask,
    dns_lab,
    local_resolver,
    our_links,
    real_resolved,
)
from tests.lab import Lab

pytestmark = pytest.mark.integration

STUB = "127.0.0.53"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from dns_lab()


def test_split_dns_through_systemd_resolved_one_link_per_profile(
    lab: Lab, daemons: DaemonSet
) -> None:
    www, alt = lab.dns_name, f"alt.{lab.dns_zone}"
    with local_resolver(lab) as local, real_resolved(lab) as (resolved, bus):
        links_before = resolved.links()
        d = daemons.new()
        for name, subnet, domain in (
            ("corp", lab.target_net_v4, www),
            ("alt", lab.target_net_v6, alt),
        ):
            d.write_profile(name, split_profile(lab, [subnet], domain))
        d.start(env={"DBUS_SYSTEM_BUS_ADDRESS": bus})
        d.up("corp")
        d.up("alt")
        status = d.status("corp")["dns"]
        links = resolved.links()
        lab.clear_dns_queries()
        answers = {name: ask(lab, STUB, name) for name in (www, alt, PUBLIC_NAME)}
        six = ask(lab, STUB, www, "AAAA")
        table = nft_table(lab) or ""
        corp_dns, alt_dns = d.stats("corp")["dns"], d.stats("alt")["dns"]

        d.ctl_json("down", "alt")
        after_down = resolved.links()
        d.kill()  # corp's link and its resolved settings stay behind...
        left_by_kill = our_links(lab)
        cleanup = lab.run(
            "cli", [sys.executable, "-m", "shuttled", "cleanup"], cwd=str(REPO_ROOT), check=False
        )
        links_after = resolved.links()

    assert status["path"] == "resolved" and status["link"] == "shuttled-corp"
    corp = links["shuttled-corp"]
    assert f"DNS Servers: {status['server']}" in corp and f"~{www}" in corp
    assert f"~2.{lab.net}.10.in-addr.arpa" in links["shuttled-corp"]  # its reverse zone
    assert "-DefaultRoute" in corp and f"~{alt}" in links["shuttled-alt"]
    assert answers[www].addresses == [lab.tgt_v4] and six.addresses == [lab.tgt_v6]
    assert answers[alt].addresses == [lab.tgt_v4_alt]
    assert answers[PUBLIC_NAME].addresses == [PUBLIC_ADDRESS]
    remote = [q[1] for q in lab.dns_queries()]
    assert www in remote and alt in remote and PUBLIC_NAME not in remote
    assert PUBLIC_NAME in local.names() and www not in local.names()
    assert corp_dns["tunnel"] >= 1 and alt_dns["tunnel"] >= 1 and corp_dns["peer"] == 0
    assert "dport 53" not in table  # resolved routes the names: no DNS capture at all
    assert "shuttled-alt" not in after_down and "shuttled-corp" in after_down
    assert left_by_kill == ["shuttled-corp"]
    assert cleanup.returncode == 0 and "link shuttled-corp" in cleanup.stdout
    assert our_links(lab) == [] and links_after == links_before


def test_a_restarted_resolved_is_given_the_link_settings_again(
    lab: Lab, daemons: DaemonSet
) -> None:
    www = lab.dns_name
    with local_resolver(lab), real_resolved(lab) as (resolved, bus):
        d = daemons.new()
        d.write_profile("corp", split_profile(lab, [lab.target_net_v4], www))
        d.start(env={"DBUS_SYSTEM_BUS_ADDRESS": bus})
        d.up("corp")
        server = d.status("corp")["dns"]["server"]
        resolved.restart()  # a new resolved knows the link, not what we told the old one

        def configured() -> bool:
            section = resolved.links().get("shuttled-corp", "")
            return f"DNS Servers: {server}" in section and f"~{www}" in section

        wait_for("the link configured again", configured, 10, detail=d.log)
        answer = ask(lab, STUB, www)
    assert answer.addresses == [lab.tgt_v4]
