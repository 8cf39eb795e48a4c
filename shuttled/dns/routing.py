"""Which names a profile's tunnel answers (split DNS), and the names it answers itself.

`SplitRoutes` says whether a query name belongs to the tunnel: a name under one
of the profile's domains, a reverse-lookup name (in-addr.arpa, ip6.arpa) of an
address inside one of its networks, one of the remote's host names, or, in
mode `all`, any name. `HostsTable` answers A, AAAA and PTR for the names read
from the remote's /etc/hosts, so the local /etc/hosts is never written.

Names are compared in the presentation form `dns.read_name` gives, lower-cased
(RFC 4343), without the trailing dot.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from shuttled.const import DNS_HOSTS_TTL
from shuttled.dns.wire import (
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    HEADER,
    Question,
    parse_header,
    read_questions,
)
from shuttled.net import IPAddress, IPNetwork

TYPE_A = 1
TYPE_PTR = 12
TYPE_AAAA = 28
CLASS_IN = 1
FLAG_AA = 0x0400
V4_SUFFIX = "in-addr.arpa"
V6_SUFFIX = "ip6.arpa"
MAX_ZONES_PER_NETWORK = 64  # beyond that a network's reverse zone is widened, not listed
_RECORD = struct.Struct(">HHHIH")  # name pointer, type, class, ttl, rdlength
_POINTER_TO_QUESTION = 0xC00C  # the question's name sits right after the 12-byte header


def normalize(name: str) -> str:
    return name.lower().rstrip(".")


def in_domain(name: str, domain: str) -> bool:
    """name is domain or below it; the root domain "" holds every name."""
    return not domain or name == domain or name.endswith("." + domain)


# --- reverse names ------------------------------------------------------------------


def reverse_network(name: str) -> IPNetwork | None:
    """The addresses a reverse-lookup name stands for, or None for any other name.

    `3.2.1.10.in-addr.arpa` is 10.1.2.3/32, `10.in-addr.arpa` is 10.0.0.0/8,
    `in-addr.arpa` all of IPv4; ip6.arpa names count nibbles the same way.
    """
    name = normalize(name)
    if name == V4_SUFFIX or name.endswith("." + V4_SUFFIX):
        return _v4_reverse(name.removesuffix(V4_SUFFIX).rstrip("."))
    if name == V6_SUFFIX or name.endswith("." + V6_SUFFIX):
        return _v6_reverse(name.removesuffix(V6_SUFFIX).rstrip("."))
    return None


def _v4_reverse(labels_text: str) -> IPNetwork | None:
    labels = labels_text.split(".") if labels_text else []
    if len(labels) > 4 or not all(_octet(label) for label in labels):
        return None
    octets = [int(label) for label in reversed(labels)]
    address = bytes(octets + [0] * (4 - len(octets)))
    return ipaddress.IPv4Network((address, 8 * len(octets)))


def _octet(label: str) -> bool:
    return (
        label.isascii()
        and label.isdigit()
        and len(label) <= 3
        and int(label) <= 255
        and (label == "0" or not label.startswith("0"))
    )


def _v6_reverse(labels_text: str) -> IPNetwork | None:
    labels = labels_text.split(".") if labels_text else []
    hexdigits = "0123456789abcdef"
    if len(labels) > 32 or not all(len(x) == 1 and x in hexdigits for x in labels):
        return None
    nibbles = "".join(reversed(labels)).ljust(32, "0")
    return ipaddress.IPv6Network((int(nibbles, 16), 4 * len(labels)))


def reverse_name(address: IPAddress) -> str:
    return address.reverse_pointer


def reverse_zones(network: IPNetwork, limit: int = MAX_ZONES_PER_NETWORK) -> list[str]:
    """Reverse zones (label boundaries: octets, nibbles) that together hold network's names.

    A /12 is the sixteen zones 16.172 ... 31.172.in-addr.arpa; where that would take
    more than `limit` zones, the one enclosing zone is given instead (it covers more
    than the network: fine for a routing domain, the remote's resolver answers it).
    """
    step = 8 if network.version == 4 else 4
    boundary = -(-network.prefixlen // step) * step
    if 2 ** (boundary - network.prefixlen) > limit:
        boundary = network.prefixlen // step * step
    if boundary == network.prefixlen:
        return [_zone_name(network, step)]
    if boundary < network.prefixlen:
        return [_zone_name(network.supernet(new_prefix=boundary), step)]
    return [_zone_name(sub, step) for sub in network.subnets(new_prefix=boundary)]


def _zone_name(network: IPNetwork, step: int) -> str:
    if network.version == 4:
        octets = network.network_address.packed[: network.prefixlen // 8]
        return ".".join([*(str(o) for o in reversed(octets)), V4_SUFFIX])
    nibbles = f"{int(network.network_address):032x}"[: network.prefixlen // 4]
    return ".".join([*reversed(nibbles), V6_SUFFIX])


# --- routes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitRoutes:
    """The names one profile's tunnel answers."""

    everything: bool = False  # mode all
    domains: tuple[str, ...] = ()  # these names and every name below them
    networks: tuple[IPNetwork, ...] = ()  # reverse names of addresses inside these
    names: frozenset[str] = field(default_factory=frozenset)  # exactly these (remote hosts)

    def claims(self, name: str) -> bool:
        if self.everything:
            return True
        name = normalize(name)
        if name in self.names or any(in_domain(name, d) for d in self.domains):
            return True
        reverse = reverse_network(name)
        return reverse is not None and any(
            reverse.version == net.version and reverse.subnet_of(net)  # type: ignore[arg-type]
            for net in self.networks
        )

    def routing_domains(self) -> list[str]:
        """Everything claimed, as routing domains for systemd-resolved (~domain)."""
        if self.everything:
            return ["."]
        zones = [z for net in self.networks for z in reverse_zones(net)]
        return list(dict.fromkeys([*self.domains, *zones, *sorted(self.names)]))


# --- answers from the remote's /etc/hosts -----------------------------------------------


class HostsTable:
    """Names read from the remote's /etc/hosts (validated by remote_info.parse_hosts)."""

    def __init__(
        self, entries: Mapping[str, Sequence[IPAddress]] | None = None, ttl: int = DNS_HOSTS_TTL
    ) -> None:
        self.ttl = ttl
        self._addresses = {normalize(n): tuple(a) for n, a in (entries or {}).items() if a}
        self._ptr: dict[str, str] = {}
        for name, addresses in self._addresses.items():
            for address in addresses:  # the first name given for an address is its name
                self._ptr.setdefault(reverse_name(address), name)

    def __len__(self) -> int:
        return len(self._addresses)

    def names(self) -> frozenset[str]:
        return frozenset(self._addresses)

    def answer(self, query: bytes, questions: Sequence[Question]) -> bytes | None:
        """The reply for an A, AAAA or PTR question about a known name; None otherwise.

        A known name without an address of the asked family gets an empty answer
        (NODATA), not a trip to the tunnel: the remote's hosts file is the authority.
        """
        if len(questions) != 1 or questions[0].qclass != CLASS_IN:
            return None
        question = questions[0]
        name = normalize(question.name)
        if question.qtype in (TYPE_A, TYPE_AAAA) and name in self._addresses:
            version = 4 if question.qtype == TYPE_A else 6
            rdatas = [a.packed for a in self._addresses[name] if a.version == version]
        elif question.qtype == TYPE_PTR and name in self._ptr:
            rdatas = [encode_name(self._ptr[name])]
        else:
            return None
        return build_reply(query, question.qtype, rdatas, self.ttl)


def encode_name(name: str) -> bytes:
    """A validated host name (letters, digits, '-', '_', dots) in wire form."""
    labels = [label.encode("ascii") for label in normalize(name).split(".") if label]
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def build_reply(query: bytes, rtype: int, rdatas: Iterable[bytes], ttl: int) -> bytes:
    """An authoritative-looking answer to a one-question query: its id, RD and question,
    then one record per rdata, each naming the question by a compression pointer."""
    header = parse_header(query)
    _, end = read_questions(query)
    records = [
        _RECORD.pack(_POINTER_TO_QUESTION, rtype, CLASS_IN, ttl, len(rdata)) + rdata
        for rdata in rdatas
    ]
    flags = FLAG_QR | FLAG_AA | FLAG_RA | (header.flags & FLAG_RD)
    return (
        HEADER.pack(header.ident, flags, 1, len(records), 0, 0) + query[12:end] + b"".join(records)
    )
