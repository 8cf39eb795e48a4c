"""The pf backend without macOS or FreeBSD: anchor text, DIOCNATLOOK bytes, pfctl use.

No pf kernel is reachable from the Linux CI, so what the kernel would see is
pinned here byte for byte: the anchor text pfctl gets on stdin, and the
`struct pfioc_natlook` the ioctl gets, laid out by hand from the C
declarations (XNU bsd/net/pfvar.h, FreeBSD sys/net/pfvar.h) rather than
from the code under test.
"""

from __future__ import annotations

import ipaddress
import socket
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from shuttled.errors import FirewallError
from shuttled.firewall import BACKENDS, detect
from shuttled.firewall import pf as fwpf
from shuttled.firewall.base import Capture
from shuttled.firewall.pf import (
    DARWIN,
    FREEBSD,
    PfBackend,
    anchor_problems,
    current_platform,
    parse_anchors,
    parse_token,
)
from shuttled.net import parse_subnet
from shuttled.tunnel import origdst
from shuttled.tunnel.origdst import (
    DARWIN_NATLOOK,
    FREEBSD_NATLOOK,
    iowr,
    pack_natlook,
    unpack_natlook,
)


def subnets(*texts: str, exclude: Sequence[str] = ()) -> tuple:  # type: ignore[type-arg]
    inc = [s for t in texts for s in parse_subnet(t, resolve=False)]
    exc = [s for t in exclude for s in parse_subnet(t, exclude=True, resolve=False)]
    return tuple(inc + exc)


WORK = Capture(
    "work",
    subnets(
        "0/0",
        "192.168.1.0/24:8000-9000",
        exclude=["10.5.0.0/16", "172.16.0.0/12", "203.0.113.5:22", "fd00:5::/64"],
    ),
    tcp_port=12300,
    dns_port=12301,
    dns_servers=(ipaddress.ip_address("10.0.0.53"), ipaddress.ip_address("fd00::53")),
    uid=501,
)
LAB = Capture(
    "lab", subnets("198.51.100.0/24", exclude=["198.51.100.7", "100.64.0.0/10"]), tcp_port=12400
)

EXPECTED = textwrap.dedent("""\
    # shuttled: anchor com.apple/shuttled, replaced as a whole by pfctl -a com.apple/shuttled -f -
    # work
    rdr pass on lo0 inet proto { tcp, udp } to 10.0.0.53 port 53 -> 127.0.0.1 port 12301
    no rdr on lo0 inet proto tcp to 127.0.0.0/8
    no rdr on lo0 inet proto tcp to (self)
    no rdr on lo0 inet proto tcp to 203.0.113.5 port 22
    rdr pass on lo0 inet proto tcp to 192.168.1.0/24 port 8000:9000 -> 127.0.0.1 port 12300:*
    no rdr on lo0 inet proto tcp to { 10.5.0.0/16, 172.16.0.0/12 }
    rdr pass on lo0 inet proto tcp to 0.0.0.0/0 -> 127.0.0.1 port 12300
    rdr pass on lo0 inet6 proto { tcp, udp } to fd00::53 port 53 -> ::1 port 12301
    no rdr on lo0 inet6 proto tcp to ::1
    no rdr on lo0 inet6 proto tcp to (self)
    no rdr on lo0 inet6 proto tcp to fd00:5::/64
    rdr pass on lo0 inet6 proto tcp to ::/0 -> ::1 port 12300
    # lab
    no rdr on lo0 inet proto tcp to 127.0.0.0/8
    no rdr on lo0 inet proto tcp to (self)
    no rdr on lo0 inet proto tcp to 198.51.100.7
    rdr pass on lo0 inet proto tcp to 198.51.100.0/24 -> 127.0.0.1 port 12400
    # work
    pass out quick on ! lo0 route-to lo0 inet proto { tcp, udp } to 10.0.0.53 port 53 user 501 keep state
    pass out quick on ! lo0 inet proto tcp to 203.0.113.5 port 22 user 501
    pass out quick on ! lo0 route-to lo0 inet proto tcp to 192.168.1.0/24 port 8000:9000 user 501 keep state
    pass out quick on ! lo0 inet proto tcp to { 10.5.0.0/16, 172.16.0.0/12 } user 501
    pass out quick on ! lo0 route-to lo0 inet proto tcp to 0.0.0.0/0 user 501 keep state
    pass out quick on ! lo0 route-to lo0 inet6 proto { tcp, udp } to fd00::53 port 53 user 501 keep state
    pass out quick on ! lo0 inet6 proto tcp to fd00:5::/64 user 501
    pass out quick on ! lo0 route-to lo0 inet6 proto tcp to ::/0 user 501 keep state
    # lab
    pass out quick on ! lo0 inet proto tcp to 198.51.100.7
    pass out quick on ! lo0 route-to lo0 inet proto tcp to 198.51.100.0/24 keep state
""")  # noqa: E501


# --- the anchor --------------------------------------------------------------------------------


def test_anchor_text_is_pinned() -> None:
    assert PfBackend("shuttled", platform=DARWIN).render([WORK, LAB]) == EXPECTED


def test_anchor_names_per_platform() -> None:
    assert PfBackend("shuttled", platform=DARWIN).anchor == "com.apple/shuttled"
    assert PfBackend("shuttled_run_42", platform=DARWIN).anchor == "com.apple/shuttled_run_42"
    assert PfBackend("shuttled", platform=FREEBSD).anchor == "shuttled/shuttled"
    text = PfBackend("shuttled_run_7", platform=FREEBSD).render([LAB])
    assert text.startswith("# shuttled: anchor shuttled/shuttled_run_7,")


def test_translation_rules_come_before_filter_rules() -> None:
    # pfctl refuses a file whose rdr rules follow filter rules.
    lines = [ln for ln in EXPECTED.splitlines() if not ln.startswith("#")]
    kinds = ["filter" if ln.startswith("pass") else "rdr" for ln in lines]
    assert kinds == sorted(kinds, key=lambda k: k == "filter")


def test_first_match_order_most_specific_first() -> None:
    # With `quick` the first matching rule wins, so an exclude nested inside an
    # include must come first (sshuttle 2.0 emits widest first: its #1014).
    lines = EXPECTED.splitlines()
    assert lines.index(
        "no rdr on lo0 inet proto tcp to { 10.5.0.0/16, 172.16.0.0/12 }"
    ) < lines.index("rdr pass on lo0 inet proto tcp to 0.0.0.0/0 -> 127.0.0.1 port 12300")
    excl = "pass out quick on ! lo0 inet proto tcp to { 10.5.0.0/16, 172.16.0.0/12 } user 501"
    incl = "pass out quick on ! lo0 route-to lo0 inet proto tcp to 0.0.0.0/0 user 501 keep state"
    assert lines.index(excl) < lines.index(incl)


def test_excludes_outside_every_include_are_left_out() -> None:
    # 100.64.0.0/10 is in no include of `lab`: a `pass out quick` for it would
    # only override the administrator's rules for traffic we never capture.
    assert "100.64.0.0/10" not in EXPECTED
    only_excludes = Capture("x", subnets("10.0.0.0/8", exclude=["192.0.2.0/24"]), 1)
    assert "192.0.2.0" not in PfBackend(platform=DARWIN).render([only_excludes])


def test_port_ranges_map_onto_one_listener_port() -> None:
    # "port 8000:9000 -> ... port 12300" would map the range onto 12300-13300.
    assert "port 8000:9000 -> 127.0.0.1 port 12300:*" in EXPECTED
    assert "port 53 -> 127.0.0.1 port 12301\n" in EXPECTED


def test_dns_only_capture_has_no_subnet_rules() -> None:
    dns = Capture("dns", (), 1000, 1001, (ipaddress.ip_address("192.0.2.53"),))
    assert PfBackend(platform=FREEBSD).render([dns]) == textwrap.dedent("""\
        # shuttled: anchor shuttled/shuttled, replaced as a whole by pfctl -a shuttled/shuttled -f -
        # dns
        rdr pass on lo0 inet proto { tcp, udp } to 192.0.2.53 port 53 -> 127.0.0.1 port 1001
        # dns
        pass out quick on ! lo0 route-to lo0 inet proto { tcp, udp } to 192.0.2.53 port 53 keep state
    """)  # noqa: E501


# --- DIOCNATLOOK -------------------------------------------------------------------------------


def test_ioctl_numbers() -> None:
    # _IOWR('D', 23, struct pfioc_natlook): IOC_INOUT | sizeof << 16 | 'D' << 8 | 23
    assert FREEBSD_NATLOOK.size == 76  # 4 * 16 + 4 * 2 + 3, padded to 4
    assert DARWIN_NATLOOK.size == 84  # 4 * 16 + 4 * 4 + 4
    assert FREEBSD_NATLOOK.ioctl == 0xC04C4417
    assert DARWIN_NATLOOK.ioctl == 0xC0544417
    assert iowr(ord("D"), 23, 76) == 0xC0000000 | 76 << 16 | 0x44 << 8 | 23


def _hex(text: str) -> bytes:
    """Hex digits, with `#` comments and any spacing."""
    return bytes.fromhex("".join(ln.split("#")[0] for ln in text.splitlines()).replace(" ", ""))


V4_ADDRS = """
    c0a8010a 00000000 00000000 00000000  # saddr 192.168.1.10 (the accepted socket's peer)
    7f000001 00000000 00000000 00000000  # daddr 127.0.0.1 (our listener)
    00000000 00000000 00000000 00000000  # rsaddr
    00000000 00000000 00000000 00000000  # rdaddr
"""


def test_pack_darwin_ipv4() -> None:
    expected = _hex(
        V4_ADDRS
        + """
        c8220000  # sxport: 51234 in network order, then the rest of the 4-byte union
        300c0000  # dxport: 12300
        00000000  # rsxport
        00000000  # rdxport
        02 06 00 02  # af AF_INET, proto TCP, proto_variant, direction PF_OUT
    """
    )
    got = pack_natlook(DARWIN_NATLOOK, 4, ("192.168.1.10", 51234), ("127.0.0.1", 12300))
    assert len(got) == 84
    assert got == expected


def test_pack_freebsd_ipv4() -> None:
    expected = _hex(
        V4_ADDRS
        + """
        c822 300c 0000 0000  # sport dport rsport rdport (u_int16_t, network order)
        02 06 02 00  # af AF_INET, proto TCP, direction PF_OUT, padding
    """
    )
    got = pack_natlook(FREEBSD_NATLOOK, 4, ("192.168.1.10", 51234), ("127.0.0.1", 12300))
    assert len(got) == 76
    assert got == expected


V6_ADDRS = """
    fd000000 00000000 00000000 0000000a
    00000000 00000000 00000000 00000001
    00000000 00000000 00000000 00000000
    00000000 00000000 00000000 00000000
"""


def test_pack_ipv6_uses_each_systems_af_inet6() -> None:
    src, dst = ("fd00::a", 443), ("::1", 12300)
    darwin = pack_natlook(DARWIN_NATLOOK, 6, src, dst)
    freebsd = pack_natlook(FREEBSD_NATLOOK, 6, src, dst)
    # AF_INET6 is 30 on XNU, 28 on FreeBSD
    assert darwin == _hex(V6_ADDRS + "01bb0000 300c0000 00000000 00000000 1e 06 00 02")
    assert freebsd == _hex(V6_ADDRS + "01bb 300c 0000 0000 1c 06 02 00")


def test_unpack_reads_rdaddr_and_rdport() -> None:
    # What the kernel writes back: rsaddr/rdaddr and rsxport/rdxport filled in.
    darwin = _hex("""
        c0a8010a 00000000 00000000 00000000  7f000001 00000000 00000000 00000000
        c0a8010a 00000000 00000000 00000000  0a010203 00000000 00000000 00000000
        c8220000 300c0000 c8220000 01bb0000  02 06 00 02
    """)
    assert unpack_natlook(DARWIN_NATLOOK, 4, darwin) == ("10.1.2.3", 443)
    freebsd = _hex("""
        c0a8010a 00000000 00000000 00000000  7f000001 00000000 00000000 00000000
        c0a8010a 00000000 00000000 00000000  0a010203 00000000 00000000 00000000
        c822 300c c822 1f90  02 06 02 00
    """)
    assert unpack_natlook(FREEBSD_NATLOOK, 4, freebsd) == ("10.1.2.3", 8080)
    v6 = bytearray(pack_natlook(FREEBSD_NATLOOK, 6, ("fd00::a", 443), ("::1", 12300)))
    v6[48:64] = socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    v6[70:72] = (22).to_bytes(2, "big")
    assert unpack_natlook(FREEBSD_NATLOOK, 6, bytes(v6)) == ("2001:db8::7", 22)


def test_original_dst_elsewhere_is_an_oserror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(origdst.sys, "platform", "linux")
    with socket.socket() as sock, pytest.raises(OSError, match="macOS and FreeBSD"):
        origdst.pf_original_dst(sock)


def test_natlook_layouts() -> None:
    assert origdst.natlook_layout("darwin") is DARWIN_NATLOOK
    assert origdst.natlook_layout("freebsd14") is FREEBSD_NATLOOK
    assert origdst.natlook_layout("linux") is None


def test_platforms() -> None:
    assert current_platform("darwin") is DARWIN
    assert current_platform("freebsd14") is FREEBSD
    assert current_platform("linux") is None


# --- pfctl ---------------------------------------------------------------------------------------


class FakePfctl:
    """Records pfctl calls; answers like macOS's pfctl."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], str | None]] = []

    def __call__(self, args: Sequence[str], stdin: str | None = None) -> tuple[str, str]:
        self.calls.append((tuple(args), stdin))
        if list(args) == ["-E"]:
            return "", "No ALTQ support in kernel\npf enabled\nToken : 13402945385735185079\n"
        if list(args[-2:]) == ["-s", "Anchors"]:
            return "  com.apple/200.AirDrop\n  com.apple/shuttled\n  com.apple/shuttled_run_9\n", ""
        return "", ""

    @property
    def argv(self) -> list[tuple[str, ...]]:
        return [a for a, _ in self.calls]


@pytest.fixture
def pfctl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakePfctl:
    fake = FakePfctl()
    monkeypatch.setattr(fwpf, "run_pfctl", fake)
    monkeypatch.setattr(PfBackend, "token_dir", tmp_path)
    monkeypatch.setattr(fwpf, "current_platform", lambda platform=None: DARWIN)
    return fake


def test_apply_is_one_pfctl_load_of_our_anchor(pfctl: FakePfctl, tmp_path: Path) -> None:
    backend = PfBackend("shuttled", platform=DARWIN)
    backend.apply([WORK, LAB])
    assert pfctl.argv == [("-E",), ("-a", "com.apple/shuttled", "-f", "-")]
    assert pfctl.calls[-1][1] == EXPECTED
    assert (tmp_path / "pf-shuttled.token").read_text() == "13402945385735185079\n"
    backend.apply([LAB])  # the reference is taken once
    assert pfctl.argv[2:] == [("-a", "com.apple/shuttled", "-f", "-")]
    # Never the main ruleset: every load names our anchor.
    assert all("-f" not in a or a[:2] == ("-a", "com.apple/shuttled") for a in pfctl.argv)


def test_remove_flushes_the_anchor_and_releases_the_token(pfctl: FakePfctl, tmp_path: Path) -> None:
    backend = PfBackend("shuttled", platform=DARWIN)
    backend.apply([LAB])
    backend.remove()
    assert pfctl.argv[-2:] == [
        ("-a", "com.apple/shuttled", "-F", "all"),
        ("-X", "13402945385735185079"),
    ]
    assert not (tmp_path / "pf-shuttled.token").exists()
    backend.remove()  # idempotent: nothing more to release
    assert pfctl.argv[-1] == ("-a", "com.apple/shuttled", "-F", "all")


def test_persistent_empty_apply_keeps_pf_enabled(pfctl: FakePfctl, tmp_path: Path) -> None:
    PfBackend("shuttled", persistent=True, platform=DARWIN).apply([])
    assert pfctl.argv == [("-a", "com.apple/shuttled", "-F", "all"), ("-E",)]
    PfBackend("shuttled_run_5", platform=DARWIN).apply([])
    assert ("-E",) not in pfctl.argv[2:]


def test_freebsd_takes_no_reference(pfctl: FakePfctl, tmp_path: Path) -> None:
    PfBackend("shuttled", platform=FREEBSD).apply([LAB])
    assert pfctl.argv == [("-a", "shuttled/shuttled", "-f", "-")]
    assert not list(tmp_path.iterdir())


def test_instances_and_crash_cleanup(pfctl: FakePfctl, tmp_path: Path) -> None:
    (tmp_path / "pf-shuttled_run_3.token").write_text("77\n")  # a crashed run's reference
    assert PfBackend.instances() == ["shuttled", "shuttled_run_3", "shuttled_run_9"]
    PfBackend("shuttled_run_3").remove()
    assert ("-X", "77") in pfctl.argv


def test_parsers() -> None:
    assert parse_token("pf enabled\nToken : 42\n") == "42"
    with pytest.raises(FirewallError, match="no token"):
        parse_token("pf enabled\n")
    listing = "  com.apple/250.ApplicationFirewall\n  com.apple/shuttled\n  com.apple/x/y\n"
    assert parse_anchors(listing, "com.apple") == ["shuttled"]


MAC_NAT = 'nat-anchor "com.apple/*" all\nrdr-anchor "com.apple/*" all\n'
MAC_RULES = 'scrub-anchor "com.apple/*" all fragment reassemble\nanchor "com.apple/*" all\n'


def test_anchor_problems() -> None:
    assert anchor_problems(DARWIN, MAC_NAT, MAC_RULES, "lo0\n", "Status: Disabled") is None
    assert "pf.conf" in (anchor_problems(DARWIN, "", MAC_RULES, "lo0\n", "") or "")
    assert "set skip on lo0" in (
        anchor_problems(DARWIN, MAC_NAT, MAC_RULES, "lo0 (skip)\n", "") or ""
    )
    bsd_nat, bsd_rules = 'rdr-anchor "shuttled/*" all\n', 'anchor "shuttled/*" all\n'
    assert (
        anchor_problems(FREEBSD, bsd_nat, bsd_rules, "lo0\n", "Status: Enabled for 1 days") is None
    )
    assert "pf_enable" in (
        anchor_problems(FREEBSD, bsd_nat, bsd_rules, "lo0\n", "Status: Disabled") or ""
    )
    missing = anchor_problems(FREEBSD, "", "", "", "")
    assert missing is not None and 'rdr-anchor "shuttled/*"' in missing


def test_detect_knows_pf() -> None:
    assert "pf" in BACKENDS
    reason = PfBackend.unsupported_reason()
    assert reason is not None and "macOS and FreeBSD" in reason
    with pytest.raises(FirewallError, match="firewall method pf: pf is for macOS and FreeBSD"):
        detect("pf")
    assert not PfBackend.present()
