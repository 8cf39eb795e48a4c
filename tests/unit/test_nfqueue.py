"""nfnetlink_queue's wire format as tunnel/nfqueue.py writes and reads it (the layouts of
include/uapi/linux/netfilter/nfnetlink_queue.h); the kernel's side is in the lab tests."""

from __future__ import annotations

import socket
import struct

from shuttled.tunnel import nfqueue as nq

_HEADER = struct.Struct("=IHHII")


def _tcp_syn(src: str, sport: int, dst: str, dport: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x02, 64240, 0, 0)
    if ":" in src:
        head = struct.pack("!IHBB", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64)
        return (
            head
            + socket.inet_pton(socket.AF_INET6, src)
            + socket.inet_pton(socket.AF_INET6, dst)
            + tcp
        )
    head = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), 0, 0, 64, socket.IPPROTO_TCP, 0)
    return head + socket.inet_aton(src) + socket.inet_aton(dst) + tcp


def _packet_message(packet_id: int, payload: bytes, uid: int | None = None) -> bytes:
    attrs = nq.attr(nq.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 3))
    if uid is not None:
        attrs += nq.attr(nq.NFQA_UID, struct.pack("!I", uid))
    attrs += nq.attr(nq.NFQA_PAYLOAD, payload)
    return nq.message(nq.NFQNL_MSG_PACKET, 5318, attrs)


def test_a_verdict_names_the_queue_the_packet_and_the_mark_big_endian() -> None:
    msg = nq.verdict_message(5318, 7, nq.NF_REPEAT, 0x53480C01)
    length, kind, flags, _seq, _pid = _HEADER.unpack_from(msg)
    assert length == len(msg) and kind == (3 << 8) | 1 and flags == 1
    assert struct.unpack_from("!BBH", msg, 16) == (socket.AF_UNSPEC, 0, 5318)
    # NFQA_VERDICT_HDR {verdict, id}, then NFQA_MARK
    assert msg[20:32] == struct.pack("=HH", 12, 2) + struct.pack("!II", nq.NF_REPEAT, 7)
    assert msg[32:40] == struct.pack("=HH", 8, 3) + struct.pack("!I", 0x53480C01)


def test_a_verdict_without_a_mark_leaves_the_mark_alone() -> None:
    assert len(nq.verdict_message(1, 2, nq.NF_ACCEPT)) == 16 + 4 + 12


def test_binding_asks_for_an_ack_and_sets_copy_range_maxlen_and_fail_open() -> None:
    bind, params = nq.config_messages(9)
    assert _HEADER.unpack_from(bind)[2] == nq.NLM_F_REQUEST | nq.NLM_F_ACK
    assert bind[20:28] == struct.pack("=HH", 8, 1) + struct.pack("!BxH", 1, 0)
    attrs = nq._attributes(memoryview(params)[20:])
    assert struct.unpack("!IB", attrs[nq.NFQA_CFG_PARAMS][:5]) == (nq.COPY_RANGE, 2)
    assert struct.unpack("!I", attrs[nq.NFQA_CFG_QUEUE_MAXLEN]) == (nq.QUEUE_MAXLEN,)
    flags = nq.NFQA_CFG_F_FAIL_OPEN | nq.NFQA_CFG_F_UID_GID
    assert struct.unpack("!I", attrs[nq.NFQA_CFG_FLAGS]) == (flags,)


def test_a_queued_ipv4_syn_gives_its_two_ends_and_its_user() -> None:
    msg = _packet_message(41, _tcp_syn("10.0.0.1", 40000, "10.9.0.2", 443), uid=1000)
    syns, errors = nq.parse_messages(msg)
    assert syns == [nq.Syn(41, ("10.0.0.1", 40000), ("10.9.0.2", 443), 1000)] and errors == []


def test_a_queued_ipv6_syn_spells_addresses_as_accept_does() -> None:
    msg = _packet_message(3, _tcp_syn("fd00:0:0::1", 5, "fd00:9::0:2", 22))
    (syn,), _ = nq.parse_messages(msg)
    assert (syn.src, syn.dst, syn.uid) == (("fd00::1", 5), ("fd00:9::2", 22), None)


def test_several_messages_in_one_read_and_an_ack_among_them() -> None:
    ack = _HEADER.pack(36, nq.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", 0) + bytes(16)
    busy = _HEADER.pack(36, nq.NLMSG_ERROR, 0, 2, 0) + struct.pack("=i", -16) + bytes(16)
    one = _packet_message(1, _tcp_syn("10.0.0.1", 1, "10.0.0.2", 2))
    syns, errors = nq.parse_messages(one + ack + one + busy)
    assert [s.packet_id for s in syns] == [1, 1] and errors == [0, 16]


def test_a_packet_we_cannot_read_still_comes_back_for_its_verdict() -> None:
    udp = bytearray(_tcp_syn("10.0.0.1", 1, "10.0.0.2", 2))
    udp[9] = socket.IPPROTO_UDP
    for payload in (bytes(udp), b"", b"\x45\x00"):
        (syn,), _ = nq.parse_messages(_packet_message(5, payload))
        assert syn.packet_id == 5 and syn.src == ("", 0)


def test_a_truncated_message_ends_the_parse_without_raising() -> None:
    msg = _packet_message(1, _tcp_syn("10.0.0.1", 1, "10.0.0.2", 2))
    assert nq.parse_messages(msg[:-7]) == ([], [])
    assert nq.parse_messages(b"\xff" * 3) == ([], [])
