"""The kill switch that outlives the daemon ("lockdown").

While a kill-switched profile is wanted, its refusals also live in a table of their own
(const.LOCKDOWN_TABLE) that a daemon stop, a crash, ExecStopPost and `shuttled cleanup`
leave in place: only `shuttlectl down` (the user said so) or `shuttled cleanup --all`
lift them. Its hooks run after our nat redirect, so what the tunnel carries is on its
way to our listener by then and passes; everything else to the profile's subnets (and
its DNS) is refused: all of it while no daemon runs, and while one does, what the
tunnel does not carry (UDP when `udp` is off, ICMP).

The same captures are kept in STATE_DIR/lockdown.json, which `shuttled lockdown` loads
at boot, before any interface is up (systemd/shuttled-lockdown.service), and the
daemon again when it starts.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shuttled.const import LOCKDOWN_TABLE
from shuttled.durable import write_durably
from shuttled.errors import ConfigError, FirewallError
from shuttled.firewall.base import Backend, Capture, LanMatch
from shuttled.net import Subnet

log = logging.getLogger(__name__)

FILE_NAME = "lockdown.json"
VERSION = 1


def locked(capture: Capture) -> Capture:
    """A capture's lockdown form: the same destinations, DNS and LAN, refused only."""
    return Capture(
        name=capture.name,
        subnets=capture.subnets,
        tcp_port=capture.tcp_port,
        dns_servers=capture.dns_servers,
        dns_all=capture.dns_all,
        uid=capture.uid,
        bypass_mark=capture.bypass_mark,
        lan=capture.lan,
        hold=True,
        lockdown=True,
    )


# --- on disk ----------------------------------------------------------------------------


def to_json(capture: Capture) -> dict[str, Any]:
    lan = capture.lan
    return {
        "name": capture.name,
        "tcp_port": capture.tcp_port,
        "uid": capture.uid,
        "subnets": [
            [str(s.network), list(s.ports) if s.ports else None, s.exclude] for s in capture.subnets
        ],
        "dns_servers": [str(a) for a in capture.dns_servers],
        "dns_all": capture.dns_all,
        "bypass_mark": capture.bypass_mark,
        "lan": None
        if lan is None
        else {
            "interfaces": list(lan.interfaces),
            "sources": [str(n) for n in lan.sources],
            "every_interface": lan.every_interface,
        },
    }


def from_json(data: Mapping[str, Any]) -> Capture:
    """Raises ConfigError (a one-line reason) for anything that is not what to_json wrote."""
    try:
        lan = data.get("lan")
        return locked(
            Capture(
                name=str(data["name"]),
                tcp_port=int(data["tcp_port"]),
                uid=None if data.get("uid") is None else int(data["uid"]),
                subnets=tuple(
                    Subnet(
                        ipaddress.ip_network(net), tuple(ports) if ports else None, bool(exclude)
                    )
                    for net, ports, exclude in data["subnets"]
                ),
                dns_servers=tuple(ipaddress.ip_address(a) for a in data.get("dns_servers", ())),
                dns_all=bool(data.get("dns_all")),
                bypass_mark=data.get("bypass_mark"),
                lan=None
                if lan is None
                else LanMatch(
                    tuple(lan["interfaces"]),
                    tuple(ipaddress.ip_network(n) for n in lan["sources"]),
                    bool(lan["every_interface"]),
                ),
                hold=True,
            )
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{FILE_NAME}: a capture is not readable ({exc})") from None


class LockdownFile:
    """The lockdown's captures and the backend they were made with."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME

    def load(self) -> tuple[str | None, dict[str, Capture]]:
        """(method, captures); (None, {}) when there is none. Raises ConfigError."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None, {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path}: unreadable ({exc})") from None
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ConfigError(f"{self.path}: not a lockdown file of version {VERSION}")
        captures = [from_json(c) for c in data.get("captures", [])]
        return str(data.get("method")), {c.name: c for c in captures}

    def save(self, method: str, captures: Mapping[str, Capture]) -> None:
        if not captures:
            self.path.unlink(missing_ok=True)
            return
        body = {
            "version": VERSION,
            "method": method,
            "captures": [to_json(c) for c in captures.values()],
        }
        write_durably(self.path, json.dumps(body, indent=1))


def lockdown_backend(method: str | None) -> Backend:
    from shuttled.firewall import detect

    return detect(method, table=LOCKDOWN_TABLE)


def load_at_boot(state_dir: Path) -> list[str]:
    """`shuttled lockdown`: put the saved lockdown in place; the profiles it holds."""
    method, captures = LockdownFile(state_dir).load()
    if not captures:
        return []
    backend = lockdown_backend(method)
    try:
        backend.apply(list(captures.values()))
    except FirewallError as exc:
        raise FirewallError(f"lockdown: {exc}") from None
    return sorted(captures)
