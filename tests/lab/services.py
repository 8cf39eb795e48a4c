"""Target-side services of the namespace lab, and the wire formats they speak.

Run inside the target namespace by the lab (``ip netns exec TGT python3 services.py CONFIG``);
the same module is imported by the client helpers (``tests.lab.clients``) so that the tests,
the benchmarks and the servers share one definition of every protocol.  Standard library
only, no package-relative imports: it must run as a plain script.

Services (all TCP servers listen on ``::`` dual-stack, so every address of the target):

``ECHO_PORT`` (TCP 7)
    Echoes everything; on the client's EOF it finishes sending and closes (half-close).
``UDP_ECHO_PORT`` (UDP 7)
    Echoes each datagram to its sender (bound per address so replies come from the
    address the client used).
``BULK_PORT`` (TCP 5001), one ASCII command line per connection, then:
    ``UP <n>\\n``          client sends exactly n bytes; server replies
                          ``<sha256hex> <n>\\n`` and closes.
    ``SINK\\n``            client sends until it shuts down its write side; server replies
                          ``<sha256hex> <count>\\n`` and closes (tests the half-close path).
    ``DOWN <n> <seed>\\n`` server sends n bytes of ``stream_chunks(seed, n)`` and closes.
    ``HOLD <secs>\\n``     idle connection: kept until the client closes or secs pass (max 3600).
    ``STALL <secs>\\n``    the server reads nothing for secs (max 3600), then closes: a slow
                          reader for flow-control tests.
    Errors: ``ERR <text>\\n`` and close.
``CLOSE_FIRST_PORT`` (TCP 5003)
    Writes ``CLOSE_FIRST_LINE`` and closes at once.
``CLOSED_PORT`` (TCP 9)
    Nothing listens: connecting is refused (RST).
``FAST_HTTP_PORT`` (TCP 8080)
    Minimal HTTP/1.1 server (keep-alive aware) answering every GET with the index page;
    cheaper than ``http.server`` for connection-rate benchmarks.
``DNS_PORT`` (UDP and TCP 53)
    Authoritative for the lab's zone: A/AAAA from the configured records, NODATA for known
    names without that type, NXDOMAIN otherwise.  TCP is RFC 7766 (length-prefixed,
    pipelined, connection reused).  UDP answers larger than the client's limit (512 bytes,
    or its EDNS size) are truncated with TC set.  Every query is appended to the query log
    as ``<udp|tcp> <name> <TYPE>``; while the "silent" flag file exists queries are logged
    as ``<proto>-silent ...`` and not answered.

The lab's HTTP server on port 80 is ``python3 -m http.server``, started separately.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

HTTP_PORT = 80
FAST_HTTP_PORT = 8080
ECHO_PORT = 7
UDP_ECHO_PORT = 7
BULK_PORT = 5001
CLOSE_FIRST_PORT = 5003
CLOSED_PORT = 9
DNS_PORT = 53
IPERF3_PORT = 5201

CLOSE_FIRST_LINE = b"shuttled-lab: server closes first\n"
MAX_COMMAND_LINE = 256
MAX_HOLD_SECONDS = 3600.0
BULK_IDLE_TIMEOUT = 300.0
BULK_BUFFER = 256 << 10

# --- the deterministic byte stream --------------------------------------------------------------
STREAM_BLOCK = 1 << 20
STREAM_MARK_EVERY = 1 << 16


STREAM_BASE_SEED = 0x5EED


@functools.lru_cache(maxsize=1)
def _stream_base() -> bytes:
    return random.Random(STREAM_BASE_SEED).randbytes(STREAM_BLOCK)


def stream_chunks(seed: int, nbytes: int) -> Iterator[memoryview]:
    """Yield the first ``nbytes`` of the stream for ``seed`` as memoryviews of up to 1 MiB.

    The stream repeats one fixed 1 MiB pseudo-random block, except that every 64 KiB piece
    starts with 8 bytes: the seed (uint32) and the piece's index (uint32), big-endian.  So
    streams differ by seed and no two 64 KiB pieces of a stream are equal: a lost,
    reordered or duplicated piece changes the hash.  Cheap for any number of seeds.  The
    views share one buffer that is rewritten on the next iteration: consume (send, hash)
    each before asking for the next.
    """
    if nbytes < 0:
        raise ValueError("nbytes must be >= 0")
    if nbytes == 0:
        return
    buf = bytearray(_stream_base()[: min(nbytes, STREAM_BLOCK)])
    view = memoryview(buf)
    pieces = STREAM_BLOCK // STREAM_MARK_EVERY
    tag = seed & 0xFFFFFFFF
    block = 0
    left = nbytes
    while left > 0:
        take = min(left, STREAM_BLOCK)
        for off in range(0, take, STREAM_MARK_EVERY):
            mark = struct.pack(">II", tag, (block * pieces + off // STREAM_MARK_EVERY) & 0xFFFFFFFF)
            end = min(off + 8, take)
            buf[off:end] = mark[: end - off]
        yield view[:take]
        left -= take
        block += 1


def stream_sha256(seed: int, nbytes: int) -> str:
    """SHA-256 hex digest of ``stream_chunks(seed, nbytes)``."""
    h = hashlib.sha256()
    for chunk in stream_chunks(seed, nbytes):
        h.update(chunk)
    return h.hexdigest()


# --- DNS wire format ------------------------------------------------------------------------------
QTYPES = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    41: "OPT",
    65: "HTTPS",
    255: "ANY",
}
QTYPE_NUMBERS = {v: k for k, v in QTYPES.items()}
RCODE_NOERROR, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN = 0, 1, 2, 3


class DnsFormatError(ValueError):
    pass


def encode_name(name: str) -> bytes:
    out = bytearray()
    for label in name.rstrip(".").split("."):
        if not label:
            continue
        raw = label.encode("ascii")
        if len(raw) > 63:
            raise ValueError(f"label too long: {label!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    return bytes(out)


def decode_name(msg: bytes, off: int) -> tuple[str, int]:
    """Decode a (possibly compressed) name at ``off``; return (name, offset after it)."""
    labels: list[str] = []
    end = -1
    jumps = 0
    while True:
        if off >= len(msg):
            raise DnsFormatError("name runs past the message")
        length = msg[off]
        if length & 0xC0 == 0xC0:
            if off + 1 >= len(msg):
                raise DnsFormatError("truncated pointer")
            if end < 0:
                end = off + 2
            jumps += 1
            if jumps > 32:
                raise DnsFormatError("pointer loop")
            off = ((length & 0x3F) << 8) | msg[off + 1]
            continue
        if length & 0xC0:
            raise DnsFormatError("bad label type")
        off += 1
        if length == 0:
            break
        if off + length > len(msg):
            raise DnsFormatError("label runs past the message")
        labels.append(msg[off : off + length].decode("ascii", "replace"))
        off += length
    return ".".join(labels), (end if end >= 0 else off)


def build_query(
    name: str, qtype: str | int = "A", qid: int | None = None, rd: bool = True
) -> bytes:
    """A standard query for ``name``/``qtype`` (class IN)."""
    if qid is None:
        qid = random.randrange(0x10000)
    tnum = qtype if isinstance(qtype, int) else QTYPE_NUMBERS[qtype.upper()]
    flags = 0x0100 if rd else 0
    return (
        struct.pack(">HHHHHH", qid, flags, 1, 0, 0, 0)
        + encode_name(name)
        + struct.pack(">HH", tnum, 1)
    )


def parse_message(msg: bytes) -> dict[str, Any]:
    """Parse a DNS message into a dict: id, flags, rcode, tc, questions, answers.

    Answers are dicts with name, type (name string), ttl and data (address text for A and
    AAAA, raw bytes otherwise).
    """
    if len(msg) < 12:
        raise DnsFormatError("short message")
    qid, flags, qd, an, ns, ar = struct.unpack(">HHHHHH", msg[:12])
    off = 12
    questions = []
    for _ in range(qd):
        name, off = decode_name(msg, off)
        if off + 4 > len(msg):
            raise DnsFormatError("truncated question")
        qtype, qclass = struct.unpack(">HH", msg[off : off + 4])
        off += 4
        questions.append({"name": name, "type": QTYPES.get(qtype, str(qtype)), "class": qclass})
    answers = []
    for _ in range(an):
        name, off = decode_name(msg, off)
        if off + 10 > len(msg):
            raise DnsFormatError("truncated record")
        rtype, _rclass, ttl, rdlen = struct.unpack(">HHIH", msg[off : off + 10])
        off += 10
        rdata = msg[off : off + rdlen]
        if len(rdata) != rdlen:
            raise DnsFormatError("truncated rdata")
        off += rdlen
        data: Any = rdata
        if rtype == 1 and rdlen == 4:
            data = socket.inet_ntop(socket.AF_INET, rdata)
        elif rtype == 28 and rdlen == 16:
            data = socket.inet_ntop(socket.AF_INET6, rdata)
        answers.append(
            {"name": name, "type": QTYPES.get(rtype, str(rtype)), "ttl": ttl, "data": data}
        )
    return {
        "id": qid,
        "flags": flags,
        "qr": bool(flags & 0x8000),
        "tc": bool(flags & 0x0200),
        "rcode": flags & 0x000F,
        "questions": questions,
        "answers": answers,
        "authority_count": ns,
        "additional_count": ar,
    }


class DnsZone:
    """The responder's data: ``records`` maps lower-case names to {"A": [...], "AAAA": [...]}."""

    def __init__(self, zone: str, records: dict[str, dict[str, list[str]]], ttl: int = 60):
        self.zone = zone.lower().rstrip(".")
        self.records = {k.lower().rstrip("."): v for k, v in records.items()}
        self.ttl = ttl

    def answer(self, query: bytes, max_size: int | None) -> tuple[bytes, str, str]:
        """Build the response to ``query``; returns (response, qname, qtype name).

        ``max_size`` None means no limit (TCP).  Raises DnsFormatError on garbage.
        """
        if len(query) < 12:
            raise DnsFormatError("short query")
        qid, flags, qd, _an, _ns, ar = struct.unpack(">HHHHHH", query[:12])
        if flags & 0x8000 or qd != 1:
            raise DnsFormatError("not a single-question query")
        qname, off = decode_name(query, 12)
        if off + 4 > len(query):
            raise DnsFormatError("truncated question")
        qtype, qclass = struct.unpack(">HH", query[off : off + 4])
        question = query[12 : off + 4]
        limit = max_size
        if limit is not None:
            limit = max(512, min(self._edns_size(query, off + 4, ar), 4096))
        name = qname.lower().rstrip(".")
        tname = QTYPES.get(qtype, str(qtype))
        rcode = RCODE_NOERROR
        rrs: list[bytes] = []
        entry = self.records.get(name)
        if entry is None:
            rcode = RCODE_NXDOMAIN
        elif qclass == 1:
            for rtype, family, key in ((1, socket.AF_INET, "A"), (28, socket.AF_INET6, "AAAA")):
                if qtype not in (rtype, 255):
                    continue
                for addr in entry.get(key, []):
                    rdata = socket.inet_pton(family, addr)
                    rrs.append(
                        struct.pack(">HHHIH", 0xC00C, rtype, 1, self.ttl, len(rdata)) + rdata
                    )
        resp_flags = 0x8000 | (flags & 0x7800) | 0x0400 | (flags & 0x0100) | 0x0080 | rcode
        body = question
        count = 0
        for rr in rrs:
            if limit is not None and 12 + len(body) + len(rr) > limit:
                resp_flags |= 0x0200  # TC
                break
            body += rr
            count += 1
        header = struct.pack(">HHHHHH", qid, resp_flags, 1, count, 0, 0)
        return header + body, name, tname

    @staticmethod
    def _edns_size(query: bytes, off: int, arcount: int) -> int:
        """The UDP payload size from an OPT record in the additional section, else 512."""
        try:
            for _ in range(arcount):
                _name, off = decode_name(query, off)
                rtype, rclass = struct.unpack(">HH", query[off : off + 4])
                rdlen = struct.unpack(">H", query[off + 8 : off + 10])[0]
                if rtype == 41:
                    return max(512, int(rclass))
                off += 10 + rdlen
        except (DnsFormatError, struct.error):
            pass
        return 512


# --- servers -----------------------------------------------------------------------------------
def _log(msg: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} services: {msg}\n")
    sys.stderr.flush()


class _QueryLog:
    def __init__(self, path: str | None, silent_flag: str | None):
        self.silent_flag = silent_flag
        self.fh = open(path, "a", buffering=1) if path else None  # noqa: SIM115 (lives forever)

    def silent(self) -> bool:
        return bool(self.silent_flag) and os.path.exists(self.silent_flag or "")

    def record(self, proto: str, name: str, qtype: str) -> None:
        if self.fh is not None:
            self.fh.write(f"{proto} {name} {qtype}\n")


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # the transport flushes what is buffered, then closes: FIN after the data


class CloseFirstProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = cast(asyncio.Transport, transport)
        tr.write(CLOSE_FIRST_LINE)
        tr.close()


class UdpEchoProtocol(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


class DnsUdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, zone: DnsZone, qlog: _QueryLog):
        self.zone, self.qlog = zone, qlog

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            resp, name, qtype = self.zone.answer(data, 512)
        except (DnsFormatError, struct.error, UnicodeError) as exc:
            _log(f"dns/udp: bad query from {addr}: {exc}")
            return
        if self.qlog.silent():
            self.qlog.record("udp-silent", name, qtype)
            return
        self.qlog.record("udp", name, qtype)
        self.transport.sendto(resp, addr)


async def _dns_tcp_client(
    zone: DnsZone, qlog: _QueryLog, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            try:
                head = await asyncio.wait_for(reader.readexactly(2), 60)
                query = await asyncio.wait_for(reader.readexactly(struct.unpack(">H", head)[0]), 10)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            try:
                resp, name, qtype = zone.answer(query, None)
            except (DnsFormatError, struct.error, UnicodeError) as exc:
                _log(f"dns/tcp: bad query: {exc}")
                return
            if qlog.silent():
                qlog.record("tcp-silent", name, qtype)
                continue
            qlog.record("tcp", name, qtype)
            writer.write(struct.pack(">H", len(resp)) + resp)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _fast_http_client(
    body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        for _ in range(100000):
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            except (
                TimeoutError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ConnectionError,
            ):
                return
            lines = head.decode("latin-1").split("\r\n")
            request = lines[0].split()
            headers = {}
            for line in lines[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip().lower()
            version = request[2] if len(request) == 3 else "HTTP/1.0"
            conn = headers.get("connection", "")
            keep = (version == "HTTP/1.1" and conn != "close") or conn == "keep-alive"
            ok = len(request) == 3 and request[0] in ("GET", "HEAD")
            status = "200 OK" if ok else "405 Method Not Allowed"
            payload = body if ok and request[0] == "GET" else b""
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/html\r\n"
                f"Content-Length: {len(body) if ok else 0}\r\n"
                f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            if not keep:
                return
    except ConnectionError:
        pass
    finally:
        writer.close()


def _read_command(conn: socket.socket) -> tuple[str, bytes]:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(MAX_COMMAND_LINE)
        if not chunk:
            raise ConnectionError("EOF before the command line")
        data += chunk
        if len(data) > MAX_COMMAND_LINE and b"\n" not in data:
            raise ValueError("command line too long")
    line, _, rest = data.partition(b"\n")
    return line.decode("ascii", "replace").strip(), rest


def _bulk_receive(conn: socket.socket, rest: bytes, limit: int | None) -> tuple[str, int]:
    h = hashlib.sha256(rest)
    count = len(rest)
    if limit is not None and count > limit:
        raise ValueError("more data than announced")
    buf = bytearray(BULK_BUFFER if limit is None else max(1, min(BULK_BUFFER, limit)))
    view = memoryview(buf)
    while limit is None or count < limit:
        want = len(buf) if limit is None else min(len(buf), limit - count)
        k = conn.recv_into(view[:want])
        if k == 0:
            if limit is None:
                break
            raise ConnectionError(f"EOF after {count} of {limit} bytes")
        h.update(view[:k])
        count += k
    return h.hexdigest(), count


def _bulk_wait(conn: socket.socket, seconds: float, read: bool) -> None:
    deadline = time.monotonic() + min(max(seconds, 0.0), MAX_HOLD_SECONDS)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        if not read:
            time.sleep(min(left, 1.0))
            continue
        ready, _, _ = select.select([conn], [], [], min(left, 1.0))
        if ready and not conn.recv(65536):
            return


def _bulk_connection(conn: socket.socket) -> None:
    try:
        conn.settimeout(BULK_IDLE_TIMEOUT)
        line, rest = _read_command(conn)
        parts = line.split()
        cmd = parts[0].upper() if parts else ""
        if cmd == "UP" and len(parts) == 2:
            digest, count = _bulk_receive(conn, rest, int(parts[1]))
            conn.sendall(f"{digest} {count}\n".encode())
        elif cmd == "SINK" and len(parts) == 1:
            digest, count = _bulk_receive(conn, rest, None)
            conn.sendall(f"{digest} {count}\n".encode())
        elif cmd == "DOWN" and len(parts) == 3:
            for chunk in stream_chunks(int(parts[2]), int(parts[1])):
                conn.sendall(chunk)
        elif cmd in ("HOLD", "STALL") and len(parts) == 2:
            _bulk_wait(conn, float(parts[1]), read=cmd == "HOLD")
        else:
            conn.sendall(f"ERR unknown command {line[:60]!r}\n".encode())
    except (OSError, ValueError) as exc:
        with contextlib.suppress(OSError):
            conn.sendall(f"ERR {exc}\n".encode())
    finally:
        conn.close()


def _bulk_acceptor(sock: socket.socket) -> None:
    while True:
        try:
            conn, _addr = sock.accept()
        except OSError as exc:
            _log(f"bulk accept: {exc}")
            time.sleep(0.05)
            continue
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_bulk_connection, args=(conn,), daemon=True).start()


def _tcp_listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    sock.listen(4096)
    return sock


def _raise_nofile() -> None:
    try:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 65536), hard))
    except (ImportError, ValueError, OSError):
        pass


async def _serve(cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    addresses: list[str] = cfg["addresses"]
    zone = DnsZone(cfg.get("zone", "lab.test"), cfg.get("records", {}))
    qlog = _QueryLog(cfg.get("query_log"), cfg.get("silent_flag"))
    body = cfg.get("index_html", "shuttled lab\n").encode()

    servers = [
        await loop.create_server(EchoProtocol, sock=_tcp_listener(ECHO_PORT), backlog=4096),
        await loop.create_server(
            CloseFirstProtocol, sock=_tcp_listener(CLOSE_FIRST_PORT), backlog=4096
        ),
        await asyncio.start_server(
            functools.partial(_dns_tcp_client, zone, qlog),
            sock=_tcp_listener(DNS_PORT),
            backlog=4096,
        ),
        await asyncio.start_server(
            functools.partial(_fast_http_client, body),
            sock=_tcp_listener(FAST_HTTP_PORT),
            backlog=4096,
        ),
    ]
    for addr in addresses:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        await loop.create_datagram_endpoint(
            UdpEchoProtocol, local_addr=(addr, UDP_ECHO_PORT), family=family
        )
        await loop.create_datagram_endpoint(
            lambda: DnsUdpProtocol(zone, qlog), local_addr=(addr, DNS_PORT), family=family
        )
    bulk = _tcp_listener(BULK_PORT)
    threading.Thread(target=_bulk_acceptor, args=(bulk,), daemon=True).start()

    ready = cfg.get("ready_file")
    if ready:
        with open(ready + ".tmp", "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(ready + ".tmp", ready)
    _log(f"ready on {', '.join(addresses)} (pid {os.getpid()})")
    await stop.wait()
    for server in servers:
        server.close()
    _log("stopping")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: services.py CONFIG.json\n")
        return 2
    with open(argv[1]) as fh:
        cfg = json.load(fh)
    _raise_nofile()
    asyncio.run(_serve(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
