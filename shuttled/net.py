"""The small shared vocabulary: addresses, subnets, names, and running system tools.

Every layer (configuration, the CLI, the data plane, the firewall backends, DNS)
checks an address, a host name or a profile name, and runs an external tool, in
one way: the one written here. Nothing in this module knows about profiles,
tunnels or rules.
"""

from __future__ import annotations

import asyncio
import functools
import grp
import ipaddress
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shuttled.errors import ConfigError, FirewallError, ShuttledError

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

TOOL_TIMEOUT = 60.0  # seconds; iptables -w may queue behind another xtables user
_PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_HOST_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
# The kernel's dev_valid_name(): under IFNAMSIZ, no "/", ":" or space, not "." or "..";
# narrower still, so that a name is always safe inside nft and iptables arguments.
_IFACE_RE = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.@+-]{1,15}")
_PORTS_RE = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")
_SHORT_V4_RE = re.compile(r"\d{1,3}(\.\d{1,3}){0,2}")  # "10", "192.168": iproute2 shorthand


# --- names and addresses -------------------------------------------------------------


def is_address(text: str) -> bool:
    """An IPv4 or IPv6 address (no prefix, no scope)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def valid_host_name(name: str) -> bool:
    """A DNS name without its trailing dot: labels of letters, digits, "_" and "-"."""
    labels = name.split(".")
    return len(name) <= 253 and all(_HOST_LABEL_RE.fullmatch(label) for label in labels)


def valid_profile_name(name: str) -> bool:
    """Profile names become part of chain, table and file names: a strict alphabet."""
    return _PROFILE_NAME_RE.fullmatch(name) is not None


def valid_interface_name(name: str) -> bool:
    """A network interface name that is also safe inside nft and iptables arguments."""
    return _IFACE_RE.fullmatch(name) is not None


def uid_of(name: str) -> int | None:
    """A local user's uid by name (digits are a uid already); None if there is none."""
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def gid_of(name: str) -> int | None:
    """A local group's gid by name (digits are a gid already); None if there is none."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def pf_flavour(platform: str | None = None) -> str | None:
    """Whose pf this system (or `platform`, a sys.platform value) has: "darwin",
    "freebsd", or None where there is no pf (Linux)."""
    platform = sys.platform if platform is None else platform
    if platform == "darwin":
        return "darwin"
    if platform.startswith("freebsd"):
        return "freebsd"
    return None


# --- subnets -------------------------------------------------------------------------


@functools.total_ordering
@dataclass(frozen=True)
class Subnet:
    """Destinations one include/exclude rule matches: a network and maybe a port range.

    Sorting subnets puts the most specific first, which is the order the rules
    must be evaluated in (first match wins); see `order_subnets`.
    """

    network: IPNetwork
    ports: tuple[int, int] | None = None  # inclusive range; None = every port
    exclude: bool = False

    def __post_init__(self) -> None:
        if self.ports is not None:
            first, last = self.ports
            if not 1 <= first <= last <= 65535:
                raise ValueError(f"bad port range {first}-{last} for {self.network}")

    @property
    def family(self) -> int:
        return self.network.version

    def _specificity(self) -> tuple[int, int, bool, int, int, tuple[int, int]]:
        # sshuttle's subnet_weight: narrower port range, then longer prefix, then
        # excludes before includes; the rest only makes the order total.
        first, last = self.ports or (0, 65535)
        return (
            last - first,
            -self.network.prefixlen,
            not self.exclude,
            self.family,
            int(self.network.network_address),
            self.ports or (0, 0),
        )

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Subnet):
            return NotImplemented
        return self._specificity() < other._specificity()


def order_subnets(subnets: Iterable[Subnet]) -> list[Subnet]:
    """Most specific first: the order in which first-match rules give each subnet its say."""
    return sorted(subnets)


def parse_subnet(text: str, *, exclude: bool = False, resolve: bool = True) -> list[Subnet]:
    """Parse sshuttle's subnet syntax into one Subnet per network.

    "10.0.0.0/8", "10.1.2.3", "10/8" (= 10.0.0.0/8), "0/0" (= 0.0.0.0/0 AND ::/0,
    so "everything" never leaks IPv6), "fd00::/8", "10.0.0.0/8:80",
    "10.0.0.0/8:8000-9000", "[fd00::/8]:443", "host.example:22". A host name
    becomes one /32 or /128 per address; with resolve=False it is only checked
    for syntax and yields nothing (resolve again when the capture is built).
    """
    host, port_text = _split_ports(text)
    ports = None if port_text is None else _parse_ports(text, port_text)
    return [Subnet(net, ports, exclude) for net in _parse_host(text, host, resolve)]


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"subnet {text!r}: {why}")


def _split_ports(text: str) -> tuple[str, str | None]:
    if not text.strip():
        raise _bad(text, "empty")
    if text.startswith("["):
        m = re.fullmatch(r"\[([^\[\]]+)\](?::(.*))?", text)
        if not m:
            raise _bad(text, "expected [address]:ports")
        return m[1], m[2]
    if text.count(":") > 1:  # bare IPv6: ports need the [address]:ports form
        return text, None
    host, sep, ports = text.partition(":")
    return host, (ports if sep else None)


def _parse_ports(text: str, ports: str) -> tuple[int, int]:
    m = _PORTS_RE.fullmatch(ports)
    if not m:
        raise _bad(text, f"bad port {ports!r} (expected PORT or FIRST-LAST)")
    first = int(m[1])
    last = int(m[2] or m[1])
    if not 1 <= first <= 65535 or not 1 <= last <= 65535:
        raise _bad(text, "ports must be within 1-65535")
    if first > last:
        raise _bad(text, f"port range {first}-{last} is reversed")
    return first, last


def _parse_host(text: str, host: str, resolve: bool) -> list[IPNetwork]:
    if host == "0/0":  # sshuttle's "everything": here it means both families (#45)
        return [ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0")]
    addr, slash, prefix = _expand_short(host)
    try:
        return [ipaddress.ip_network(f"{addr}/{prefix}" if slash else addr, strict=False)]
    except ValueError:
        if ":" in addr or re.fullmatch(r"[\d.]+", addr):  # meant as an address
            raise _bad(text, _why_not_network(addr, prefix if slash else None)) from None
    if slash:
        raise _bad(text, "a host name takes no /prefix")
    _check_hostname(text, addr)
    return _resolve(text, addr) if resolve else []


def _expand_short(host: str) -> tuple[str, str, str]:
    """ADDRESS, "/" and PREFIX, with iproute2's "10/8" read as 10.0.0.0/8."""
    addr, slash, prefix = host.partition("/")
    if slash and _SHORT_V4_RE.fullmatch(addr):
        addr = ".".join([*addr.split("."), "0", "0", "0"][:4])
    return addr, slash, prefix


def _why_not_network(addr: str, prefix: str | None) -> str:
    """Which half of ADDRESS/PREFIX is wrong, in our words (ipaddress only says "does not
    appear to be an IPv4 or IPv6 network")."""
    try:
        version = ipaddress.ip_address(addr).version
    except ValueError:
        return f"{addr!r} is not an IPv4 or IPv6 address"
    most = 32 if version == 4 else 128
    if prefix is not None and prefix.isdigit() and int(prefix) > most:
        return f"prefix length {int(prefix)} is over {most} for IPv{version}"
    return f"prefix length {prefix!r} is not a number from 0 to {most} (nor a netmask)"


def host_bits_warning(text: str) -> str | None:
    """For ADDRESS/PREFIX with bits set past the prefix ("10.81.0.1/24"): what it
    means instead, since a typo there captures a different network than meant."""
    try:
        host, _ = _split_ports(text)
    except ConfigError:
        return None
    addr, slash, prefix = _expand_short(host)
    if not slash:
        return None
    try:
        network = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    except ValueError:
        return None  # not a network at all: parse_subnet says why
    if network.network_address == ipaddress.ip_address(addr):
        return None
    return f"subnet {text!r}: host bits set: means {network}"


def _check_hostname(text: str, name: str) -> None:
    if not valid_host_name(name.removesuffix(".")):
        raise _bad(text, "not an IP address, network or host name")


def _resolve(text: str, name: str) -> list[IPNetwork]:
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise _bad(text, f"cannot resolve {name!r}: {getattr(e, 'strerror', e)}") from None
    addrs = {str(info[4][0]).partition("%")[0] for info in infos}  # drop any %scope
    nets = [ipaddress.ip_network(a) for a in addrs]
    return sorted(nets, key=lambda n: (n.version, int(n.network_address)))


# --- running tools -------------------------------------------------------------------


def tool_path() -> str:
    """PATH plus the sbin directories: systemd units and sudo may leave those out."""
    return os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/local/sbin:/usr/sbin:/sbin"


def which_tool(tool: str) -> bool:
    """The tool is installed (says nothing about whether the kernel takes its rules)."""
    return shutil.which(tool, path=tool_path()) is not None


def run_tool(
    argv: Sequence[str],
    stdin: str | None = None,
    *,
    error: type[ShuttledError] = FirewallError,
    name: str | None = None,
    timeout: float = TOOL_TIMEOUT,
) -> str:
    """Run a system tool; its stdout, or `error` with its output on one line."""
    return run_tool_output(argv, stdin, error=error, name=name, timeout=timeout)[0]


def run_tool_output(
    argv: Sequence[str],
    stdin: str | None = None,
    *,
    error: type[ShuttledError] = FirewallError,
    name: str | None = None,
    timeout: float = TOOL_TIMEOUT,
) -> tuple[str, str]:
    """Run a system tool; its stdout and stderr. `name` names it in errors (argv[0])."""
    log.debug("running %s%s", " ".join(argv), f" with input:\n{stdin}" if stdin else "")
    name = name or argv[0]
    try:
        proc = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=tool_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise error(f"{argv[0]}: {e}") from None
    if proc.returncode != 0:
        raise error(f"{name} failed: {one_line(proc.stderr or proc.stdout)}")
    return proc.stdout, proc.stderr


def one_line(text: str, limit: int = 400) -> str:
    """A tool's error output on one line, without nft's ^^^ markers or usage hints."""
    lines = [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip().strip("^~") and not ln.startswith("Try `")
    ]
    summary = " | ".join(lines) or "no error output"
    return summary if len(summary) <= limit else summary[: limit - 3] + "..."


def tool_env() -> dict[str, str]:
    """A tool's environment: C locale (its messages are parsed) and the sbin PATH."""
    return {**os.environ, "LC_ALL": "C", "PATH": tool_path()}


async def communicate(proc: asyncio.subprocess.Process, timeout: float) -> tuple[bytes, bytes]:
    """A child's whole output; past `timeout` it is killed, reaped, and TimeoutError raised."""
    try:
        async with asyncio.timeout(timeout):
            return await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
