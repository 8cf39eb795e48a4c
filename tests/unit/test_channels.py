"""The channel layer against a scripted peer: windows, EOF/CLOSE state, validation."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shuttled import const
from shuttled.tunnel import sshmsg
from shuttled.tunnel.channels import Channel, ChannelMux
from tests.helpers import ChannelEvents, run_async

REMOTE_ID = 77


class FakePipe:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.buf += data

    def close(self) -> None:
        self.closed = True

    def take(self) -> list[tuple[int, bytes]]:
        messages, used = sshmsg.split_packets(self.buf, 1 << 24)
        out = [(t, bytes(p)) for t, p in messages]
        del messages
        del self.buf[:used]
        return out


def flush(mux: ChannelMux) -> None:
    mux.push()


def confirm(mux: ChannelMux, local_id: int, window: int = 1 << 20, max_packet: int = 32768) -> None:
    mux.feed(sshmsg.open_confirmation(local_id, REMOTE_ID, window, max_packet))


def opened(
    window: int = 1 << 20,
    max_packet: int = 32768,
    on_lost: Callable[[BaseException | None], None] | None = None,
) -> tuple[ChannelMux, FakePipe, ChannelEvents, Channel]:
    pipe = FakePipe()
    mux = ChannelMux(pipe, on_lost=on_lost)
    rec = ChannelEvents()
    channel = mux.open_direct_tcpip("10.1.2.3", 443, "127.0.0.1", 5555, rec)
    confirm(mux, channel.local_id, window, max_packet)
    flush(mux)
    pipe.take()
    return mux, pipe, rec, channel


def data_msgs(messages: list[tuple[int, bytes]]) -> list[bytes]:
    out = []
    for msg_type, payload in messages:
        if msg_type == sshmsg.MSG_CHANNEL_DATA:
            recipient, size = struct.unpack_from(">II", payload)
            assert recipient == REMOTE_ID
            out.append(payload[8 : 8 + size])
    return out


def test_open_sends_direct_tcpip_with_our_window_and_destination() -> None:
    async def body() -> None:
        pipe = FakePipe()
        mux = ChannelMux(pipe)
        mux.open_direct_tcpip("10.1.2.3", 443, "127.0.0.1", 5555, ChannelEvents())
        flush(mux)
        [(msg_type, payload)] = pipe.take()
        reader = sshmsg.Reader(payload)
        assert msg_type == sshmsg.MSG_CHANNEL_OPEN
        assert reader.text() == "direct-tcpip"
        assert (reader.u32(), reader.u32(), reader.u32()) == (
            0,
            const.CHANNEL_WINDOW,
            const.CHANNEL_MAX_PACKET,
        )
        assert (reader.text(), reader.u32()) == ("10.1.2.3", 443)

    run_async(body())


def test_send_never_exceeds_window_and_resumes_on_adjust() -> None:
    async def body() -> None:
        mux, pipe, rec, channel = opened(window=50_000, max_packet=20_000)
        channel.send(b"x" * 120_000)
        flush(mux)
        sent = data_msgs(pipe.take())
        assert [len(d) for d in sent] == [20_000, 20_000, 10_000]
        assert rec.paused
        mux.feed(sshmsg.window_adjust(channel.local_id, 100_000))
        flush(mux)
        assert sum(len(d) for d in data_msgs(pipe.take())) == 70_000
        assert not rec.paused

    run_async(body())


def test_eof_waits_for_queued_data() -> None:
    async def body() -> None:
        mux, pipe, _rec, channel = opened(window=10)
        channel.send(b"0123456789abc")
        channel.send_eof()
        flush(mux)
        assert [t for t, _ in pipe.take()] == [sshmsg.MSG_CHANNEL_DATA]
        mux.feed(sshmsg.window_adjust(channel.local_id, 10))
        flush(mux)
        assert [t for t, _ in pipe.take()] == [sshmsg.MSG_CHANNEL_DATA, sshmsg.MSG_CHANNEL_EOF]

    run_async(body())


def test_eof_both_ways_closes_and_frees_the_id() -> None:
    async def body() -> None:
        mux, pipe, rec, channel = opened()
        channel.send_eof()
        mux.feed(sshmsg.eof(channel.local_id))
        flush(mux)
        assert [t for t, _ in pipe.take()] == [sshmsg.MSG_CHANNEL_EOF, sshmsg.MSG_CHANNEL_CLOSE]
        assert "close" not in rec.events
        mux.feed(sshmsg.close(channel.local_id))
        assert rec.events[-1] == "close"
        assert mux.channels == {}
        assert mux.open("session", ChannelEvents()).local_id == channel.local_id

    run_async(body())


def test_nothing_is_sent_after_close() -> None:
    async def body() -> None:
        mux, pipe, _rec, channel = opened()
        mux.feed(sshmsg.close(channel.local_id))
        channel.send(b"late data")
        channel.send_eof()
        flush(mux)
        assert [t for t, _ in pipe.take()] == [sshmsg.MSG_CHANNEL_CLOSE]

    run_async(body())


def test_window_is_granted_only_after_consumption_and_not_while_held() -> None:
    async def body() -> None:
        mux, pipe, rec, channel = opened()
        half = const.CHANNEL_WINDOW_REFILL
        channel.set_hold_window(True)
        chunk = const.CHANNEL_MAX_PACKET
        for _ in range(half // chunk):
            mux.feed(sshmsg.data_header(channel.local_id, chunk) + b"a" * chunk)
        channel.consumed(half)
        flush(mux)
        assert pipe.take() == []
        channel.set_hold_window(False)
        flush(mux)
        [(msg_type, payload)] = pipe.take()
        assert msg_type == sshmsg.MSG_CHANNEL_WINDOW_ADJUST
        assert struct.unpack(">II", payload) == (REMOTE_ID, half)
        assert len(rec.data) == half

    run_async(body())


def test_data_past_our_window_ends_the_mux() -> None:
    async def body() -> None:
        mux, pipe, rec, channel = opened()
        size = const.CHANNEL_WINDOW + 1
        mux.feed(sshmsg.data_header(channel.local_id, size) + b"z" * size)
        assert mux.closed and pipe.closed
        assert rec.events[-1] == "close"

    run_async(body())


def test_open_failure_reports_reason_and_recycles_id() -> None:
    async def body() -> None:
        pipe = FakePipe()
        mux = ChannelMux(pipe)
        rec = ChannelEvents()
        channel = mux.open_direct_tcpip("10.9.9.9", 1, "127.0.0.1", 1, rec)
        mux.feed(sshmsg.open_failure(channel.local_id, sshmsg.OPEN_CONNECT_FAILED, "refused"))
        assert rec.events == [("failed", 2, "refused")]
        assert mux.channels == {}
        assert not mux.closed

    run_async(body())


@pytest.mark.parametrize(
    "packet",
    [
        sshmsg.eof(12345),  # unknown channel
        sshmsg.packet(sshmsg.MSG_CHANNEL_EOF, b"\x00\x00"),  # truncated
        sshmsg.packet(200, b""),  # unknown type
        b"\x00\x10\x00\x00\x00\x00",  # absurd length
        sshmsg.packet(sshmsg.MSG_GLOBAL_REQUEST, sshmsg.sstring("x") + b"\x00"),
    ],
)
def test_malformed_messages_end_the_mux_without_raising(packet: bytes) -> None:
    async def body() -> None:
        lost: list[BaseException | None] = []
        mux, _pipe, rec, _channel = opened(on_lost=lost.append)
        mux.feed(packet)
        assert mux.closed and lost and rec.events[-1] == "close"

    run_async(body())


def test_trailing_bytes_after_a_message_end_the_mux() -> None:
    async def body() -> None:
        mux, _pipe, rec, channel = opened()
        adjust = sshmsg.window_adjust(channel.local_id, 10)
        mux.feed(sshmsg.packet(sshmsg.MSG_CHANNEL_WINDOW_ADJUST, adjust[6:] + b"\x00"))
        assert mux.closed and rec.events[-1] == "close"

    run_async(body())


def test_an_open_failure_without_its_language_tag_is_malformed() -> None:
    async def body() -> None:
        mux = ChannelMux(FakePipe())
        channel = mux.open_direct_tcpip("10.9.9.9", 1, "127.0.0.1", 1, ChannelEvents())
        body = struct.pack(">II", channel.local_id, 2) + sshmsg.sstring("refused")
        mux.feed(sshmsg.packet(sshmsg.MSG_CHANNEL_OPEN_FAILURE, body))
        assert mux.closed

    run_async(body())


def test_reader_end_rejects_what_is_left() -> None:
    reader = sshmsg.Reader(struct.pack(">IB", 7, 1))
    assert reader.u32() == 7
    with pytest.raises(sshmsg.WireError, match="1 trailing bytes in a test message"):
        reader.end("a test message")
    reader.byte()
    reader.end("a test message")


def test_requests_get_replies_in_order() -> None:
    async def body() -> None:
        mux, _pipe, _rec, channel = opened()
        first = channel.request("keepalive@openssh.com")
        second = channel.request("keepalive@openssh.com")
        mux.feed(sshmsg.channel_reply(channel.local_id, False))
        mux.feed(sshmsg.channel_reply(channel.local_id, True))
        assert first is not None and second is not None
        assert (await first, await second) == (False, True)

    run_async(body())


def test_packets_split_across_reads_are_reassembled() -> None:
    async def body() -> None:
        mux, _pipe, rec, channel = opened()
        stream = (sshmsg.data_header(channel.local_id, 5) + b"hello") * 3
        for i in range(len(stream)):
            mux.feed(stream[i : i + 1])
        assert bytes(rec.data) == b"hello" * 3

    run_async(body())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_input_never_raises(junk: bytes) -> None:
    async def body() -> None:
        mux, _pipe, _rec, channel = opened()
        mux.feed(junk)
        mux.feed(sshmsg.eof(channel.local_id))

    run_async(body())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=8),
    st.lists(st.integers(min_value=1, max_value=9000), min_size=1, max_size=20),
)
def test_any_split_of_the_stream_delivers_the_same_bytes(sizes: list[int], cuts: list[int]) -> None:
    async def body() -> None:
        mux, _pipe, rec, channel = opened()
        payload = b"".join(bytes([i % 251]) * n for i, n in enumerate(sizes))
        stream = b"".join(
            sshmsg.data_header(channel.local_id, n) + payload[sum(sizes[:i]) : sum(sizes[: i + 1])]
            for i, n in enumerate(sizes)
        )
        pos = 0
        for cut in cuts:
            mux.feed(stream[pos : pos + cut])
            pos += cut
        mux.feed(stream[pos:])
        assert bytes(rec.data) == payload and not mux.closed

    run_async(body())
