"""DNS messages on the wire (RFC 1035 4.1): headers, names, questions, errors, TCP framing.

Pure functions over bytes: no I/O, no state. Everything else in shuttled.dns
reads and writes messages only through these."""

from __future__ import annotations

import asyncio
import enum
import logging
import struct
from dataclasses import dataclass

log = logging.getLogger(__name__)

UDP_MAX_PAYLOAD = 65507  # largest UDP payload over IPv4

# --- wire format (RFC 1035 4.1) -------------------------------------------------------
HEADER = struct.Struct(">HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
HEADER_SIZE = HEADER.size
_U16 = struct.Struct(">H")
_QUESTION_TAIL = struct.Struct(">HH")  # qtype, qclass
_RECORD_TAIL = struct.Struct(">HHIH")  # type, class, ttl, rdlength

FLAG_QR = 0x8000
OPCODE_MASK = 0x7800
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_CD = 0x0010
RCODE_MASK = 0x000F
TYPE_OPT = 41
MAX_NAME_WIRE = 255
MIN_UDP_PAYLOAD = 512
# What we offer when we carry a query over UDP: DNS flag day 2020's size, which fits
# an IPv6 packet of the minimum MTU without fragments.
EDNS_UDP_PAYLOAD = 1232


class Rcode(enum.IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    REFUSED = 5


class DnsMessageError(ValueError):
    """A DNS message that does not parse; the text says what was wrong."""


# --- messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    ident: int
    flags: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int


@dataclass(frozen=True)
class Question:
    name: str  # presentation form: labels joined by dots, "." for the root
    qtype: int
    qclass: int

    def key(self) -> tuple[str, int, int]:
        """What identifies the question, names compared case-insensitively (RFC 4343)."""
        return self.name.lower(), self.qtype, self.qclass


def parse_header(message: bytes) -> Header:
    if len(message) < HEADER_SIZE:
        raise DnsMessageError(f"{len(message)} bytes is shorter than a DNS header")
    return Header(*HEADER.unpack_from(message))


def check_query(message: bytes) -> Header:
    """The header of a message we may answer: long enough, and not itself a response."""
    header = parse_header(message)
    if header.flags & FLAG_QR:
        raise DnsMessageError("a response where a query was expected")
    return header


def query_id(message: bytes) -> int:
    return parse_header(message).ident


def with_id(message: bytes, ident: int) -> bytes:
    return _U16.pack(ident) + message[2:]


def _label_text(byte: int) -> str:
    if byte in b".\\":
        return "\\" + chr(byte)
    return chr(byte) if 0x21 <= byte <= 0x7E else f"\\{byte:03d}"


_LABEL_TEXT = tuple(_label_text(byte) for byte in range(256))


def _byte_at(message: bytes, offset: int) -> int:
    if offset >= len(message):
        raise DnsMessageError("name runs past the end of the message")
    return message[offset]


def read_name(message: bytes, offset: int) -> tuple[str, int]:
    """The name at offset in presentation form, and the offset just past it.

    Each compression pointer must point before the name part that holds it, so
    pointer targets strictly decrease and no message, however crafted, loops.
    """
    labels: list[str] = []
    wire = 1  # the root label
    end = -1  # where the name ends in place, set at the first pointer
    pos = start = offset
    while (length := _byte_at(message, pos)) != 0:
        if length & 0xC0 == 0xC0:
            target = (length & 0x3F) << 8 | _byte_at(message, pos + 1)
            if target >= start:
                raise DnsMessageError("compression pointer does not point backwards")
            end = pos + 2 if end < 0 else end
            pos = start = target
            continue
        if length & 0xC0:
            raise DnsMessageError(f"unknown label type {length >> 6}")
        wire += length + 1
        if wire > MAX_NAME_WIRE or pos + length >= len(message):
            raise DnsMessageError("name too long or cut short")
        labels.append("".join(_LABEL_TEXT[b] for b in message[pos + 1 : pos + 1 + length]))
        pos += length + 1
    return ".".join(labels) or ".", (pos + 1 if end < 0 else end)


def read_questions(message: bytes) -> tuple[list[Question], int]:
    """The question section and the offset just past it."""
    header = parse_header(message)
    pos = HEADER_SIZE
    questions = []
    for _ in range(header.qdcount):
        name, pos = read_name(message, pos)
        if pos + _QUESTION_TAIL.size > len(message):
            raise DnsMessageError("question cut short")
        questions.append(Question(name, *_QUESTION_TAIL.unpack_from(message, pos)))
        pos += _QUESTION_TAIL.size
    return questions, pos


def question_keys(message: bytes) -> tuple[tuple[str, int, int], ...]:
    return tuple(question.key() for question in read_questions(message)[0])


def _opt_record(message: bytes) -> tuple[int, int, int] | None:
    """Where the OPT record of the additional section is (RFC 6891 6.1.1): its start,
    its end and its class (the UDP payload size); None when there is none."""
    header = parse_header(message)
    _, pos = read_questions(message)
    additional_from = header.ancount + header.nscount
    for index in range(additional_from + header.arcount):
        start = pos
        _, pos = read_name(message, pos)
        if pos + _RECORD_TAIL.size > len(message):
            raise DnsMessageError("record cut short")
        rtype, rclass, _ttl, rdlength = _RECORD_TAIL.unpack_from(message, pos)
        pos += _RECORD_TAIL.size + rdlength
        if rtype == TYPE_OPT and index >= additional_from:
            return start, pos, int(rclass)
    return None


def _edns_payload_size(message: bytes) -> int | None:
    """The UDP payload size of the query's OPT record (RFC 6891 6.1.2), if it has one."""
    opt = _opt_record(message)
    return None if opt is None else opt[2]


def with_edns(query: bytes, size: int = EDNS_UDP_PAYLOAD) -> bytes:
    """The query offering `size` bytes of UDP reply, unless it has an OPT record already:
    without one a nameserver truncates at 512 bytes (RFC 1035), and a query we carry over
    UDP would get only a TC reply however the client asked us."""
    if _opt_record(query) is not None:
        return query
    h = parse_header(query)
    opt = b"\0" + _RECORD_TAIL.pack(TYPE_OPT, size, 0, 0)
    header = HEADER.pack(h.ident, h.flags, h.qdcount, h.ancount, h.nscount, h.arcount + 1)
    return header + query[HEADER_SIZE:] + opt


def without_opt(reply: bytes) -> bytes:
    """The reply without its OPT record: for a client whose query had none (RFC 6891 7)."""
    opt = _opt_record(reply)
    if opt is None:
        return reply
    start, end, _ = opt
    h = parse_header(reply)
    header = HEADER.pack(h.ident, h.flags, h.qdcount, h.ancount, h.nscount, h.arcount - 1)
    return header + reply[HEADER_SIZE:start] + reply[end:]


def udp_payload_limit(query: bytes) -> int:
    """How large a UDP reply the client takes: its EDNS0 size, else 512 (RFC 1035 4.2.1)."""
    try:
        size = _edns_payload_size(query)
    except DnsMessageError:
        size = None
    return MIN_UDP_PAYLOAD if size is None else min(max(size, MIN_UDP_PAYLOAD), UDP_MAX_PAYLOAD)


def _questions_only(message: bytes, ident: int, flags: int) -> bytes:
    """A header with these id and flags, then the message's question section if it parses."""
    try:
        questions, end = read_questions(message)
    except DnsMessageError:
        return HEADER.pack(ident, flags, 0, 0, 0, 0)
    return HEADER.pack(ident, flags, len(questions), 0, 0, 0) + message[HEADER_SIZE:end]


def error_response(query: bytes, rcode: Rcode) -> bytes:
    """A reply carrying only rcode: the query's id, opcode, RD, CD and question; QR and RA."""
    header = parse_header(query)
    kept = header.flags & (OPCODE_MASK | FLAG_RD | FLAG_CD)
    return _questions_only(query, header.ident, FLAG_QR | FLAG_RA | kept | rcode)


def truncate(response: bytes, limit: int) -> bytes:
    """The response if it fits in limit bytes, else its header and question with TC set."""
    if len(response) <= limit:
        return response
    header = parse_header(response)
    flags = header.flags | FLAG_TC
    short = _questions_only(response, header.ident, flags)
    return short if len(short) <= limit else HEADER.pack(header.ident, flags, 0, 0, 0, 0)


def frame(message: bytes) -> bytes:
    """The message with its two-byte length prefix for TCP (RFC 1035 4.2.2)."""
    if len(message) > 0xFFFF:
        raise DnsMessageError(f"{len(message)} bytes is too long for DNS over TCP")
    return _U16.pack(len(message)) + message


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """One length-prefixed message, or None at end of stream between messages."""
    try:
        prefix = await reader.readexactly(_U16.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    return await reader.readexactly(_U16.unpack(prefix)[0])
