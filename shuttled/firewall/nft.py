"""nftables backend: everything lives in our own `table inet <table>`, nothing else is touched.

Every change is one `nft -f -` script that declares the table, deletes it and
declares it again with the full new contents: the kernel applies the three as
one transaction, so the rules are replaced atomically or, when it refuses any
part, not at all.

Router mode, UDP and the kill switch add base chains (prerouting, route
output, filter output/forward) only to a table whose captures use them; they
are built in shuttled.firewall.tproxy.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence

from shuttled.const import (
    LOCKDOWN_TABLE,
    NFT_HOLD_PRIORITY,
    NFT_LOCKDOWN_PRIORITY,
    NFT_MANGLE_PRIORITY,
    NFT_NAT_PRIORITY,
)
from shuttled.errors import FirewallError
from shuttled.firewall import policy
from shuttled.firewall.base import (
    Backend,
    Capture,
    Rule,
    address_set,
    capture_rules,
    check_captures,
    is_instance_table,
)
from shuttled.firewall.tproxy import NftHooks, nft_chains, nft_family, nft_l4, router_rules
from shuttled.net import run_tool

NFT = "nft"
INDENT = "\t"


class NftBackend(Backend):
    name = "nft"
    tools = (NFT,)

    @classmethod
    def unsupported_reason(cls) -> str | None:
        if not cls.present():
            return "nft is not installed"
        try:
            run_tool([NFT, "-f", "-"], _probe_script())
        except FirewallError as e:
            return f"the kernel refused an nft nat probe: {e}"
        return None

    @classmethod
    def instances(cls) -> list[str]:
        out = run_tool([NFT, "list", "tables", "inet"])
        names = [line.split()[2] for line in out.splitlines() if line.startswith("table inet ")]
        return sorted(name for name in names if is_instance_table(name))

    def render(self, captures: Sequence[Capture]) -> str:
        check_captures(captures)
        script = self._delete_script()
        if not captures and not self.persistent:
            return script
        chains = [_output_chain(captures), *(_capture_chain(c) for c in captures)]
        # The lockdown's refusals come after our nat redirect (what the tunnel carries
        # is on its way to our listener by then); a held capture's come before it.
        hold = NFT_LOCKDOWN_PRIORITY if self.table == LOCKDOWN_TABLE else NFT_HOLD_PRIORITY
        chains += nft_chains(router_rules(captures), NftHooks(_chain, NFT_MANGLE_PRIORITY, hold))
        return script + f"table inet {self.table} {{\n" + "\n".join(chains) + "}\n"

    def _delete_script(self) -> str:
        # Declaring before deleting makes the delete safe when the table is absent.
        return f"table inet {self.table} {{}}\ndelete table inet {self.table}\n"

    def apply(self, captures: Sequence[Capture]) -> None:
        # Policy routing first: a TPROXY rule without it would forward, not deliver.
        tproxy = router_rules(captures).needs_policy
        if tproxy:
            policy.ensure(self.table)
        self._run(self.render(captures))
        if not tproxy:
            policy.release(self.table, only_if_made=True)

    def _run(self, script: str) -> None:
        try:
            run_tool([NFT, "-f", "-"], script)
        except FirewallError as e:
            raise FirewallError(f"table inet {self.table}: {e}") from None

    def remove(self) -> None:
        self._run(self._delete_script())
        policy.release(self.table)

    def snapshot(self) -> str:
        if self.table not in self.instances():
            return ""
        return run_tool([NFT, "list", "table", "inet", self.table])


def _chain(name: str, lines: Sequence[str]) -> str:
    body = "".join(f"{INDENT * 2}{line}\n" for line in lines)
    return f"{INDENT}chain {name} {{\n{body}{INDENT}}}\n"


def _chain_name(capture: Capture) -> str:
    return f"cap_{capture.name}"


def _output_chain(captures: Sequence[Capture]) -> str:
    hook = f"type nat hook output priority {NFT_NAT_PRIORITY}; policy accept;"
    # The uid test sits on the jump, not as "skuid != N return" inside the chain:
    # a packet without a socket fails any meta skuid match, so only the positive
    # form keeps it out of a per-user capture.
    jumps = [f"{_uid_match(c)}jump {_chain_name(c)}" for c in captures]
    return _chain("output", [hook, *jumps])


def _uid_match(capture: Capture) -> str:
    return "" if capture.uid is None else f"meta skuid {capture.uid} "


def _capture_chain(capture: Capture) -> str:
    rules = capture_rules(capture)
    lines = [] if rules.bypass_mark is None else [f"meta mark {rules.bypass_mark:#x} return"]
    lines += [_rule(r) for r in rules.dns]
    # While the kill switch holds, the subnets are rejected (firewall.tproxy), not
    # redirected: iptables' filter OUTPUT runs after nat and would see only our port.
    if rules.subnets and not capture.hold:
        # Connections to this host's own addresses are never tunnelled, whatever
        # the subnets say (0/0 includes them).
        lines.append("fib daddr type local return")
        lines += [_rule(r) for r in rules.subnets]
    return _chain(_chain_name(capture), lines)


def _rule(rule: Rule) -> str:
    verdict = "return" if rule.verdict == "return" else f"redirect to :{rule.to_port}"
    return " ".join(
        [
            f"{nft_family(rule.family)} daddr {address_set(rule.daddrs)}",
            *nft_l4(rule.protos, rule.ports),
            verdict,
        ]
    )


def _probe_script() -> str:
    """A table using every expression we emit, created and deleted in one batch.

    The kernel resolves each expression (loading nft_fib, nft_redir, ...) when the
    rule is added, so this fails where our rules would, and leaves nothing behind.
    Its name has a '-', which instance tables cannot, so it never hits one of ours.
    """
    table = f"shuttled-probe-{os.getpid()}"
    rules = [
        _rule(
            Rule(
                4,
                (ipaddress.IPv4Network("127.0.0.1/32"),),
                "redirect",
                1,
                protos=("tcp", "udp"),
                ports=(53, 53),
            )
        ),
        "meta skuid 0 fib daddr type local return",
        _rule(Rule(6, (ipaddress.IPv6Network("::1/128"),), "redirect", 1, ports=(1, 2))),
    ]
    hook = f"type nat hook output priority {NFT_NAT_PRIORITY}; policy accept;"
    chain = _chain("output", [hook, *rules])
    return f"table inet {table} {{\n{chain}}}\ndelete table inet {table}\n"
