"""The SSH connection-protocol subset we speak (RFC 4254), as unencrypted packets.

This module is shared with the remote helper, which embeds its source verbatim:
standard library only, Python 3.8 syntax, no imports from the rest of shuttled.

Packet framing (what the ControlMaster expects after MUX_S_PROXY, and what the
helper speaks over its stdio): uint32 packet_length || byte 0 (padding length)
|| byte message_type || payload, where packet_length = len(payload) + 2.
"""

import struct
from typing import List, Tuple, Union

BytesLike = Union[bytes, bytearray, memoryview]

MSG_GLOBAL_REQUEST = 80
MSG_REQUEST_SUCCESS = 81
MSG_REQUEST_FAILURE = 82
MSG_CHANNEL_OPEN = 90
MSG_CHANNEL_OPEN_CONFIRMATION = 91
MSG_CHANNEL_OPEN_FAILURE = 92
MSG_CHANNEL_WINDOW_ADJUST = 93
MSG_CHANNEL_DATA = 94
MSG_CHANNEL_EXTENDED_DATA = 95
MSG_CHANNEL_EOF = 96
MSG_CHANNEL_CLOSE = 97
MSG_CHANNEL_REQUEST = 98
MSG_CHANNEL_SUCCESS = 99
MSG_CHANNEL_FAILURE = 100

CHANNEL_MESSAGES = frozenset(range(MSG_CHANNEL_OPEN, MSG_CHANNEL_FAILURE + 1))

# CHANNEL_OPEN_FAILURE reason codes (RFC 4254 section 5.1).
OPEN_ADMINISTRATIVELY_PROHIBITED = 1
OPEN_CONNECT_FAILED = 2
OPEN_UNKNOWN_CHANNEL_TYPE = 3
OPEN_RESOURCE_SHORTAGE = 4

# Our own channel type for UDP flows through the remote helper: each DATA
# message is one datagram framed by pack_datagram().
UDP_CHANNEL_TYPE = "udp@shuttled"

MAX_WINDOW = 0xFFFFFFFF
HEADER = struct.Struct(">IBB")  # packet_length, padding_length, message type
U32 = struct.Struct(">I")
U32X2 = struct.Struct(">II")
U32X3 = struct.Struct(">III")


class WireError(ValueError):
    """A packet or field that does not parse; the message says what was wrong."""


def packet(msg_type: int, payload: BytesLike = b"") -> bytes:
    """One framed packet: the 6-byte header followed by the payload."""
    return HEADER.pack(len(payload) + 2, 0, msg_type) + payload


def sstring(value: Union[str, BytesLike]) -> bytes:
    """An SSH `string`: uint32 length then the bytes (str is UTF-8 encoded)."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    return U32.pack(len(value)) + value


def sbool(value: bool) -> bytes:
    """boolean: one byte, 0 or 1."""
    return b"\x01" if value else b"\x00"


class Reader:
    """Cursor over one message payload; every read is bounds-checked."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: BytesLike, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def u32(self) -> int:
        """uint32 (RFC 4251 5)."""
        end = self.pos + 4
        if end > len(self.buf):
            raise WireError("truncated uint32 at offset %d" % self.pos)
        value = U32.unpack_from(self.buf, self.pos)[0]  # type: int
        self.pos = end
        return value

    def byte(self) -> int:
        """One byte."""
        if self.pos >= len(self.buf):
            raise WireError("truncated byte at offset %d" % self.pos)
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def boolean(self) -> bool:
        """boolean: one byte, any non-zero value is true."""
        return self.byte() != 0

    def string(self) -> bytes:
        """string: uint32 length, then that many bytes."""
        size = self.u32()
        end = self.pos + size
        if end > len(self.buf):
            raise WireError(
                "string of %d bytes overruns the message at offset %d" % (size, self.pos)
            )
        value = self.buf[self.pos : end]
        self.pos = end
        return bytes(value)

    def text(self) -> str:
        """A string that must be UTF-8."""
        try:
            return self.string().decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("string at offset %d is not UTF-8" % self.pos) from None

    def rest(self) -> BytesLike:
        """What is left of the message, taken whole (a field whose layout varies)."""
        value = self.buf[self.pos :]
        self.pos = len(self.buf)
        return value

    def end(self, what: str) -> None:
        """The message must end here: trailing bytes are a malformed `what`."""
        if self.pos != len(self.buf):
            raise WireError("%d trailing bytes in %s" % (len(self.buf) - self.pos, what))


def split_packets(buf: BytesLike, max_packet: int) -> Tuple[List[Tuple[int, memoryview]], int]:
    """Parse whole packets from the front of bytearray `buf`.

    Returns (messages, consumed): a list of (msg_type, payload memoryview) and
    how many bytes they used. An impossible length raises WireError.
    """
    out = []
    pos = 0
    size = len(buf)
    view = memoryview(buf)
    while size - pos >= 6:
        length, padding, msg_type = HEADER.unpack_from(buf, pos)
        if length < 2 or length > max_packet:
            raise WireError("packet length %d outside 2..%d" % (length, max_packet))
        if padding != 0:
            raise WireError("padding length %d in an unencrypted packet" % padding)
        end = pos + 4 + length
        if end > size:
            break
        out.append((msg_type, view[pos + 6 : end]))
        pos = end
    return out, pos


# --- builders ------------------------------------------------------------------


def channel_open(kind: str, sender: int, window: int, max_packet: int, extra: bytes = b"") -> bytes:
    """CHANNEL_OPEN of `kind` with our id, window and max packet, then `extra`."""
    return packet(MSG_CHANNEL_OPEN, sstring(kind) + U32X3.pack(sender, window, max_packet) + extra)


def direct_tcpip_extra(host: str, port: int, orig_host: str, orig_port: int) -> bytes:
    """The type-specific part of a direct-tcpip open: where to, and from where."""
    return sstring(host) + U32.pack(port) + sstring(orig_host) + U32.pack(orig_port)


def open_confirmation(recipient: int, sender: int, window: int, max_packet: int) -> bytes:
    """CHANNEL_OPEN_CONFIRMATION: the peer's id, then our id, window and max packet."""
    return packet(
        MSG_CHANNEL_OPEN_CONFIRMATION,
        U32X2.pack(recipient, sender) + U32X2.pack(window, max_packet),
    )


def open_failure(recipient: int, reason: int, description: str) -> bytes:
    """CHANNEL_OPEN_FAILURE with a reason code, its text and an empty language tag."""
    return packet(
        MSG_CHANNEL_OPEN_FAILURE, U32X2.pack(recipient, reason) + sstring(description) + sstring("")
    )


def window_adjust(recipient: int, amount: int) -> bytes:
    """CHANNEL_WINDOW_ADJUST: the peer may send `amount` more bytes."""
    return packet(MSG_CHANNEL_WINDOW_ADJUST, U32X2.pack(recipient, amount))


def data_header(recipient: int, size: int) -> bytes:
    """Header of a CHANNEL_DATA packet; the caller appends `size` bytes of data."""
    return HEADER.pack(size + 10, 0, MSG_CHANNEL_DATA) + U32X2.pack(recipient, size)


def extended_data(recipient: int, code: int, data: BytesLike) -> bytes:
    """CHANNEL_EXTENDED_DATA (stderr is code 1)."""
    return packet(MSG_CHANNEL_EXTENDED_DATA, U32X2.pack(recipient, code) + sstring(data))


def eof(recipient: int) -> bytes:
    """CHANNEL_EOF: we send no more data on this channel."""
    return packet(MSG_CHANNEL_EOF, U32.pack(recipient))


def close(recipient: int) -> bytes:
    """CHANNEL_CLOSE: the channel is done on our side."""
    return packet(MSG_CHANNEL_CLOSE, U32.pack(recipient))


def channel_request(recipient: int, name: str, want_reply: bool, extra: bytes = b"") -> bytes:
    """CHANNEL_REQUEST `name`, with its type-specific data."""
    return packet(
        MSG_CHANNEL_REQUEST, U32.pack(recipient) + sstring(name) + sbool(want_reply) + extra
    )


def channel_reply(recipient: int, ok: bool) -> bytes:
    """CHANNEL_SUCCESS or CHANNEL_FAILURE, the answer to a request."""
    return packet(MSG_CHANNEL_SUCCESS if ok else MSG_CHANNEL_FAILURE, U32.pack(recipient))


# --- UDP datagram framing inside a udp@shuttled channel ----------------------------


def pack_datagram(host: str, port: int, payload: BytesLike) -> bytes:
    """One datagram with its peer address: string host, uint32 port, string data."""
    return sstring(host) + U32.pack(port) + sstring(payload)


def unpack_datagram(buf: BytesLike) -> Tuple[str, int, bytes]:
    """A datagram packed by pack_datagram: (host, port, payload); WireError if malformed."""
    reader = Reader(buf)
    host = reader.text()
    port = reader.u32()
    if port > 0xFFFF:
        raise WireError("datagram port %d out of range" % port)
    payload = reader.string()
    reader.end("a datagram")
    return host, port, payload
