"""A short DNS cache in front of a profile's upstreams: TTLs honoured, size bounded.

An answer is kept for the smallest TTL among its answer and authority records
(for a negative answer, also the SOA's MINIMUM: RFC 2308 5), never longer than
DNS_CACHE_MAX_TTL, and given back with every TTL lowered by the time it spent
here. Only complete NOERROR and NXDOMAIN answers to one-question queries are
kept: never SERVFAIL (a silent resolver must be asked again), never truncated.

The key is the question (name compared case-insensitively) plus what changes
the answer: the RD and CD bits, whether the query had EDNS, and its DO bit. A
hit is the stored reply with the asker's id and question bytes (so a resolver's
0x20 mixed case gets its own spelling back).
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from shuttled.const import DNS_CACHE_BYTES, DNS_CACHE_ENTRIES, DNS_CACHE_MAX_TTL
from shuttled.dns.wire import (
    FLAG_CD,
    FLAG_QR,
    FLAG_RD,
    FLAG_TC,
    HEADER_SIZE,
    OPCODE_MASK,
    RCODE_MASK,
    TYPE_OPT,
    DnsMessageError,
    parse_header,
    question_keys,
    read_name,
    read_questions,
    with_id,
)

TYPE_SOA = 6
RCODE_NXDOMAIN = 3
DO_BIT = 0x8000  # in the OPT record's TTL field (RFC 6891 6.1.3)
_RECORD_TAIL = struct.Struct(">HHIH")  # type, class, ttl, rdlength
_TTL = struct.Struct(">I")
_SOA_TIMERS = struct.Struct(">IIIII")  # serial, refresh, retry, expire, minimum

CacheKey = tuple[str, int, int, int, bool, bool]


@dataclass(frozen=True)
class _Record:
    section: int  # 0 answer, 1 authority, 2 additional
    rtype: int
    ttl: int
    ttl_offset: int
    rdata_offset: int
    rdlength: int


def _records(message: bytes) -> Iterator[_Record]:
    """Every resource record after the question section, in order; raises DnsMessageError."""
    header = parse_header(message)
    _, pos = read_questions(message)
    counts = (header.ancount, header.nscount, header.arcount)
    for section, count in enumerate(counts):
        for _ in range(count):
            _, pos = read_name(message, pos)
            if pos + _RECORD_TAIL.size > len(message):
                raise DnsMessageError("record cut short")
            rtype, _rclass, ttl, rdlength = _RECORD_TAIL.unpack_from(message, pos)
            rdata = pos + _RECORD_TAIL.size
            if rdata + rdlength > len(message):
                raise DnsMessageError("record data cut short")
            yield _Record(section, rtype, ttl, pos + 4, rdata, rdlength)
            pos = rdata + rdlength


def _opt(message: bytes) -> _Record | None:
    return next((r for r in _records(message) if r.section == 2 and r.rtype == TYPE_OPT), None)


def cache_key(query: bytes) -> CacheKey | None:
    """What identifies a query's answer, or None for a query we do not cache."""
    try:
        header = parse_header(query)
        keys = question_keys(query)
        opt = _opt(query)
    except DnsMessageError:
        return None
    if len(keys) != 1 or header.flags & OPCODE_MASK:
        return None
    name, qtype, qclass = keys[0]
    do = opt is not None and bool(opt.ttl & DO_BIT)
    return name, qtype, qclass, header.flags & (FLAG_RD | FLAG_CD), opt is not None, do


def cache_lifetime(reply: bytes, max_ttl: int = DNS_CACHE_MAX_TTL) -> int:
    """Seconds a reply may be kept: 0 when it must not be (raises DnsMessageError)."""
    header = parse_header(reply)
    rcode = header.flags & RCODE_MASK
    if not header.flags & FLAG_QR or header.flags & (FLAG_TC | OPCODE_MASK):
        return 0
    if rcode not in (0, RCODE_NXDOMAIN) or header.qdcount != 1:
        return 0
    ttls = [_ttl_of(reply, r) for r in _records(reply) if r.section < 2 and r.rtype != TYPE_OPT]
    return max(0, min([*ttls, max_ttl])) if ttls else 0


def _ttl_of(reply: bytes, record: _Record) -> int:
    if record.rtype != TYPE_SOA:
        return record.ttl
    # A negative answer lives for min(SOA TTL, SOA MINIMUM) (RFC 2308 5).
    end = record.rdata_offset + record.rdlength
    _, pos = read_name(reply, record.rdata_offset)
    _, pos = read_name(reply, pos)
    if pos + _SOA_TIMERS.size != end:
        raise DnsMessageError("SOA record of the wrong size")
    minimum: int = _SOA_TIMERS.unpack_from(reply, pos)[4]
    return min(record.ttl, minimum)


@dataclass
class _Entry:
    reply: bytes
    ttl_offsets: tuple[int, ...]
    question_end: int
    stored: float
    expires: float


class DnsCache:
    """Bounded in entries and bytes; the least recently used entry goes first."""

    def __init__(
        self,
        *,
        entries: int = DNS_CACHE_ENTRIES,
        max_bytes: int = DNS_CACHE_BYTES,
        max_ttl: int = DNS_CACHE_MAX_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = entries
        self.max_bytes = max_bytes
        self.max_ttl = max_ttl
        self._clock = clock
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get(self, query: bytes) -> bytes | None:
        """The cached answer to query, made out for it; None on a miss."""
        key = cache_key(query)
        entry = self._entries.get(key) if key is not None else None
        if key is None or entry is None:
            return None
        now = self._clock()
        if now >= entry.expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return _made_out(entry, query, int(now - entry.stored))

    def put(self, query: bytes, reply: bytes) -> bool:
        """Keep reply for query if it may be kept; whether it was."""
        key = cache_key(query)
        try:
            lifetime = cache_lifetime(reply, self.max_ttl)
            same = question_keys(reply) == question_keys(query)
            offsets = tuple(r.ttl_offset for r in _records(reply) if r.rtype != TYPE_OPT)
            question_end = read_questions(reply)[1]
        except DnsMessageError:
            return False
        # One answer may not take more than an eighth of the cache.
        if key is None or lifetime <= 0 or not same or len(reply) * 8 > self.max_bytes:
            return False
        now = self._clock()
        self._drop(key)
        self._entries[key] = _Entry(reply, offsets, question_end, now, now + lifetime)
        self._bytes += len(reply)
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.reply)


def _made_out(entry: _Entry, query: bytes, age: int) -> bytes:
    """The stored reply with the query's id and question bytes, every TTL lowered by age."""
    reply = bytearray(with_id(entry.reply, int.from_bytes(query[:2], "big")))
    _, end = read_questions(query)
    if end == entry.question_end:  # the same name but for case: same bytes, same length
        reply[HEADER_SIZE:end] = query[HEADER_SIZE:end]
    for offset in entry.ttl_offsets:
        ttl = _TTL.unpack_from(reply, offset)[0]
        _TTL.pack_into(reply, offset, max(0, ttl - age))
    return bytes(reply)
