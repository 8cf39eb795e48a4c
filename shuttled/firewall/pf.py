"""pf backend (macOS, FreeBSD): our own anchor, loaded whole with `pfctl -a ANCHOR -f -`.

The main ruleset is never loaded or edited (sshuttle's `pfctl -f` of it dropped
other software's anchors, #889). Our rules live in one anchor per instance,
`<root>/<table>`, under a wildcard the main ruleset already evaluates:

- macOS: `com.apple/shuttled` -- Apple's /etc/pf.conf ends with
  `rdr-anchor "com.apple/*"` and `anchor "com.apple/*"`;
- FreeBSD: `shuttled/shuttled` -- the administrator adds `rdr-anchor "shuttled/*"`
  and `anchor "shuttled/*"` to /etc/pf.conf once (unsupported_reason says so).

Capturing a locally made connection takes two steps, both built from the same
`CaptureRules` data as nft's and iptables' rules:

1. filter: `pass out quick on ! lo0 route-to lo0 ... to SUBNET` moves the SYN
   (or the DNS query) onto the loopback interface;
2. translation: `rdr pass on lo0 ... to SUBNET -> 127.0.0.1 port LISTENER`
   turns it into a connection to our listener, which asks the kernel for the
   original destination with DIOCNATLOOK (shuttled.tunnel.origdst).

Order and `quick`: translation rules are first-match (`no rdr` for excludes);
filter rules here are all `quick`, so they are first-match too, and both lists
are emitted most specific first (excludes before the includes they carve out
of). An exclude rule is `pass out quick` without route-to; it is only emitted
when a later include of the same capture overlaps it, so excludes never touch
traffic we would not capture anyway. Connections to this host's own addresses
(`(self)`, 127/8, ::1) are never redirected, like nft's `fib daddr type local`.

pf itself is enabled with a reference (`pfctl -E` prints a token; `pfctl -X
TOKEN` gives it back), so we never switch off a pf someone else enabled. The
token is kept in a file beside the control socket so that `shuttled cleanup`
releases it after a crash. FreeBSD's pfctl has no references: there pf must be
enabled by the administrator (pf_enable=YES), which the anchors need anyway.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shuttled import const
from shuttled.const import NFT_TABLE
from shuttled.errors import FirewallError
from shuttled.firewall.base import (
    Backend,
    Capture,
    Rule,
    address_set,
    capture_rules,
    check_captures,
    is_instance_table,
)
from shuttled.net import IPNetwork, one_line, pf_flavour, run_tool_output, which_tool

log = logging.getLogger(__name__)

PFCTL = "pfctl"
LOOPBACK = "lo0"
_LISTENER = {4: "127.0.0.1", 6: "::1"}
_AF = {4: "inet", 6: "inet6"}
# Never redirected, whatever the subnets say: this host's own addresses.
_LOCAL = {4: ("127.0.0.0/8", "(self)"), 6: ("::1", "(self)")}
_TOKEN_RE = re.compile(r"^Token\s*:\s*(\d+)\s*$", re.MULTILINE)


# --- platforms ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PfPlatform:
    os: str
    anchor_root: str  # our anchors are <root>/<table>, under the main ruleset's <root>/*
    references: bool  # pfctl -E / -X (reference-counted enable) exist

    def anchor(self, table: str) -> str:
        return f"{self.anchor_root}/{table}"


DARWIN = PfPlatform("darwin", "com.apple", references=True)
FREEBSD = PfPlatform("freebsd", "shuttled", references=False)


def current_platform(platform: str | None = None) -> PfPlatform | None:
    """pf's flavour on this system (or on `platform`), None where there is no pf."""
    return {"darwin": DARWIN, "freebsd": FREEBSD}.get(pf_flavour(platform) or "")


# --- rules as text ------------------------------------------------------------------------------


def _proto(rule: Rule) -> str:
    return rule.protos[0] if len(rule.protos) == 1 else "{ " + ", ".join(rule.protos) + " }"


def _ports(ports: tuple[int, int] | None) -> str:
    if ports is None:
        return ""
    first, last = ports
    return f" port {first}" if first == last else f" port {first}:{last}"


def _match(rule: Rule) -> str:
    to = address_set(rule.daddrs)
    return f"{_AF[rule.family]} proto {_proto(rule)} to {to}{_ports(rule.ports)}"


def _rdr(rule: Rule) -> str:
    if rule.verdict == "return":
        return f"no rdr on {LOOPBACK} {_match(rule)}"
    # A port range on the left maps onto a range on the right unless it ends in ":*".
    many = rule.ports is not None and rule.ports[0] != rule.ports[1]
    target = f"{_LISTENER[rule.family]} port {rule.to_port}{':*' if many else ''}"
    return f"rdr pass on {LOOPBACK} {_match(rule)} -> {target}"


def _pass(rule: Rule, uid: int | None) -> str:
    route = "" if rule.verdict == "return" else f"route-to {LOOPBACK} "
    user = "" if uid is None else f" user {uid}"
    state = "" if rule.verdict == "return" else " keep state"
    return f"pass out quick on ! {LOOPBACK} {route}{_match(rule)}{user}{state}"


def _overlaps(a: Rule, b: Rule) -> bool:
    if a.ports and b.ports and (a.ports[1] < b.ports[0] or b.ports[1] < a.ports[0]):
        return False
    return any(_nets_overlap(x, y) for x in a.daddrs for y in b.daddrs)


def _nets_overlap(a: IPNetwork, b: IPNetwork) -> bool:
    if isinstance(a, ipaddress.IPv4Network) and isinstance(b, ipaddress.IPv4Network):
        return a.overlaps(b)
    if isinstance(a, ipaddress.IPv6Network) and isinstance(b, ipaddress.IPv6Network):
        return a.overlaps(b)
    return False


def _needed(rules: Sequence[Rule]) -> list[Rule]:
    """Drop excludes that no later include overlaps: they would only pass traffic
    we never capture, overriding the administrator's own rules for nothing."""
    return [
        r
        for i, r in enumerate(rules)
        if r.verdict == "redirect"
        or any(later.verdict == "redirect" and _overlaps(r, later) for later in rules[i + 1 :])
    ]


@dataclass(frozen=True)
class _Section:
    rdr: list[str]
    filter: list[str]


def _capture_section(capture: Capture) -> _Section:
    section = _Section([f"# {capture.name}"], [f"# {capture.name}"])
    rules = capture_rules(capture)
    for family in (4, 6):
        fam = rules.family(family)
        section.rdr.extend(_rdr(r) for r in fam.dns)
        section.filter.extend(_pass(r, capture.uid) for r in fam.dns)
        subnets = _needed(fam.subnets)
        if not subnets:
            continue
        section.rdr.extend(
            f"no rdr on {LOOPBACK} {_AF[family]} proto tcp to {host}" for host in _LOCAL[family]
        )
        section.rdr.extend(_rdr(r) for r in subnets)
        section.filter.extend(_pass(r, capture.uid) for r in subnets)
    return section


def render_anchor(anchor: str, captures: Sequence[Capture]) -> str:
    """The whole anchor: translation rules first (pf insists), then filter rules."""
    check_captures(captures)
    sections = [_capture_section(c) for c in captures]
    head = [f"# shuttled: anchor {anchor}, replaced as a whole by pfctl -a {anchor} -f -"]
    lines = (
        head + [ln for s in sections for ln in s.rdr] + [ln for s in sections for ln in s.filter]
    )
    return "\n".join(lines) + "\n"


# --- pfctl ---------------------------------------------------------------------------------------


def run_pfctl(args: Sequence[str], stdin: str | None = None) -> tuple[str, str]:
    """pfctl's stdout and stderr (pfctl -E prints its token on stderr), or FirewallError."""
    argv = [PFCTL, *args]
    return run_tool_output(argv, stdin, name=" ".join(argv))


def parse_token(output: str) -> str:
    """The reference token from `pfctl -E` ("Token : 1234...")."""
    m = _TOKEN_RE.search(output)
    if m is None:
        raise FirewallError(f"pfctl -E printed no token: {one_line(output)}")
    return m[1]


def parse_anchors(output: str, root: str) -> list[str]:
    """Instance tables from `pfctl -a ROOT -s Anchors` (one `ROOT/child` a line)."""
    names = [
        ln.strip().removeprefix(f"{root}/")
        for ln in output.splitlines()
        if ln.strip().startswith(f"{root}/")
    ]
    return sorted(n for n in names if "/" not in n and is_instance_table(n))


def anchor_problems(platform: PfPlatform, nat: str, rules: str, lo0: str, info: str) -> str | None:
    """Why our anchors would not be evaluated here, from pfctl's own listings."""
    root = platform.anchor_root
    missing = [
        text
        for text, listing in ((f'rdr-anchor "{root}/*"', nat), (f'anchor "{root}/*"', rules))
        if text not in listing
    ]
    if missing:
        return (
            f"the main pf ruleset has no {' and no '.join(missing)}: add "
            f"'rdr-anchor \"{root}/*\"' and 'anchor \"{root}/*\"' to /etc/pf.conf and "
            f"load it (pfctl -f /etc/pf.conf)"
        )
    if "(skip)" in lo0:
        return f"pf skips {LOOPBACK} ('set skip on {LOOPBACK}' in /etc/pf.conf): remove that"
    if not platform.references and "Status: Enabled" not in info:
        return "pf is not enabled (FreeBSD: pf_enable=YES in /etc/rc.conf, service pf start)"
    return None


class PfBackend(Backend):
    name = "pf"
    tools = (PFCTL,)
    token_dir: Path = const.RUN_DIR

    def __init__(
        self,
        table: str = NFT_TABLE,
        *,
        persistent: bool = False,
        platform: PfPlatform | None = None,
    ) -> None:
        super().__init__(table, persistent=persistent)
        self.platform = platform or current_platform() or DARWIN
        self.anchor = self.platform.anchor(table)

    @classmethod
    def present(cls) -> bool:
        return current_platform() is not None and which_tool(PFCTL)

    @classmethod
    def unsupported_reason(cls) -> str | None:
        platform = current_platform()
        if platform is None:
            return f"pf is for macOS and FreeBSD, not {sys.platform}"
        if not which_tool(PFCTL):
            return "pfctl is not installed"
        if not os.path.exists(const.PF_DEVICE):
            return f"no {const.PF_DEVICE} (FreeBSD: kldload pf)"
        try:
            nat, rules, lo0, info = (
                run_pfctl(args)[0]
                for args in (
                    ["-s", "nat"],
                    ["-s", "rules"],
                    ["-s", "Interfaces", "-i", LOOPBACK, "-v"],
                    ["-s", "info"],
                )
            )
        except FirewallError as e:
            return str(e)
        return anchor_problems(platform, nat, rules, lo0, info)

    @classmethod
    def instances(cls) -> list[str]:
        platform = current_platform() or DARWIN
        out, _ = run_pfctl(["-a", platform.anchor_root, "-s", "Anchors"])
        tokens = [p.name[len("pf-") : -len(".token")] for p in cls._token_files()]
        return sorted(
            set(parse_anchors(out, platform.anchor_root))
            | {t for t in tokens if is_instance_table(t)}
        )

    def render(self, captures: Sequence[Capture]) -> str:
        return render_anchor(self.anchor, captures)

    def apply(self, captures: Sequence[Capture]) -> None:
        if not captures:
            self._flush()
            if self.persistent:
                self._take_reference()
            else:
                self._release_reference()
            return
        text = self.render(captures)
        self._take_reference()
        run_pfctl(["-a", self.anchor, "-f", "-"], text)

    def remove(self) -> None:
        self._flush()
        self._release_reference()

    def snapshot(self) -> str:
        nat, _ = run_pfctl(["-a", self.anchor, "-s", "nat"])
        rules, _ = run_pfctl(["-a", self.anchor, "-s", "rules"])
        return nat + rules

    # --- internals ---------------------------------------------------------------------------

    def _flush(self) -> None:
        run_pfctl(["-a", self.anchor, "-F", "all"])

    @property
    def token_file(self) -> Path:
        return self.token_dir / f"pf-{self.table}.token"

    @classmethod
    def _token_files(cls) -> list[Path]:
        try:
            return sorted(cls.token_dir.glob("pf-*.token"))
        except OSError:
            return []

    def _take_reference(self) -> None:
        if not self.platform.references or self.token_file.exists():
            return
        _, err = run_pfctl(["-E"])
        token = parse_token(err)
        try:
            self.token_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            self.token_file.write_text(token + "\n")
        except OSError:
            run_pfctl(["-X", token])
            raise

    def _release_reference(self) -> None:
        try:
            token = self.token_file.read_text().strip()
        except OSError:
            return
        if token.isdigit():
            try:
                run_pfctl(["-X", token])
            except FirewallError as e:  # a token from before a reboot: nothing to release
                log.debug("pf reference %s: %s", token, e)
        self.token_file.unlink(missing_ok=True)
