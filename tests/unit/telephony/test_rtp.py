"""RTP: parsing, G.711 decoding against the standard's values, reordering, and a receiver on a real UDP socket."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from telephony.rtp import (
    ALAW_TABLE,
    PT_PCMA,
    PT_PCMU,
    ULAW_TABLE,
    AudioLosses,
    RtpError,
    RtpPacket,
    RtpReassembler,
    RtpReceiver,
    decode_alaw,
    decode_payload,
    decode_ulaw,
    parse_rtp,
)


def rtp_bytes(
    seq: int,
    payload: bytes = b"\xff" * 160,
    *,
    pt: int = PT_PCMU,
    ts: int = 0,
    ssrc: int = 0x1234,
    marker: bool = False,
    csrcs: tuple[int, ...] = (),
    extension: bytes | None = None,
    padding: int = 0,
    version: int = 2,
) -> bytes:
    first = (version << 6) | (0x20 if padding else 0) | (0x10 if extension is not None else 0) | len(csrcs)
    header = struct.pack("!BBHII", first, (0x80 if marker else 0) | pt, seq & 0xFFFF, ts, ssrc)
    header += b"".join(struct.pack("!I", c) for c in csrcs)
    if extension is not None:
        assert len(extension) % 4 == 0
        header += struct.pack("!HH", 0xBEDE, len(extension) // 4) + extension
    pad = b"\x00" * (padding - 1) + bytes([padding]) if padding else b""
    return header + payload + pad


def packet(seq: int, ssrc: int = 1) -> RtpPacket:
    return RtpPacket(payload_type=PT_PCMU, sequence=seq % 65536, timestamp=seq * 160, ssrc=ssrc, payload=b"")


def seqs(packets: list[RtpPacket]) -> list[int]:
    return [p.sequence for p in packets]


# --- parsing ----------------------------------------------------------------------------------------------


def test_parse_valid_packet() -> None:
    parsed = parse_rtp(rtp_bytes(513, b"\x01\x02\x03", pt=8, ts=160000, ssrc=0xDEADBEEF, marker=True))
    assert parsed == RtpPacket(
        payload_type=8, sequence=513, timestamp=160000, ssrc=0xDEADBEEF, payload=b"\x01\x02\x03", marker=True
    )


def test_parse_csrc_list() -> None:
    parsed = parse_rtp(rtp_bytes(1, b"abc", csrcs=(7, 8, 9)))
    assert parsed.csrcs == (7, 8, 9)
    assert parsed.payload == b"abc"


def test_parse_header_extension_is_skipped() -> None:
    parsed = parse_rtp(rtp_bytes(1, b"payload", csrcs=(5,), extension=b"\x10\x20\x30\x40" * 2))
    assert parsed.payload == b"payload"
    assert parsed.csrcs == (5,)


def test_parse_padding_is_removed() -> None:
    assert parse_rtp(rtp_bytes(1, b"abcd", padding=4)).payload == b"abcd"
    assert parse_rtp(rtp_bytes(1, b"abcd", padding=1)).payload == b"abcd"


def test_parse_rejects_wrong_version() -> None:
    with pytest.raises(RtpError, match="version 1, expected 2"):
        parse_rtp(rtp_bytes(1, version=1))


@pytest.mark.parametrize("size", [0, 1, 11])
def test_parse_rejects_short_packet(size: int) -> None:
    with pytest.raises(RtpError, match=f"{size} bytes is shorter than the 12-byte header"):
        parse_rtp(rtp_bytes(1)[:size])


def test_parse_rejects_truncated_csrc_and_extension_and_bad_padding() -> None:
    with pytest.raises(RtpError, match="CSRC"):
        parse_rtp(rtp_bytes(1, b"", csrcs=(1, 2))[:16])
    with pytest.raises(RtpError, match="header extension"):
        parse_rtp(rtp_bytes(1, b"", extension=b"\x00" * 8)[:18])
    data = bytearray(rtp_bytes(1, b"ab", padding=2))
    data[-1] = 9  # more padding than payload
    with pytest.raises(RtpError, match="padding count 9"):
        parse_rtp(bytes(data))
    data[-1] = 0
    with pytest.raises(RtpError, match="padding count 0"):
        parse_rtp(bytes(data))


# --- G.711 ------------------------------------------------------------------------------------------------


def test_ulaw_known_values() -> None:
    # G.711 μ-law: 0xFF and 0x7F are the two zeros; 0x00 / 0x80 the extremes ±32124 (8159 × 4 on 16 bits).
    assert ULAW_TABLE[0xFF] == 0
    assert ULAW_TABLE[0x7F] == 0
    assert ULAW_TABLE[0x00] == -32124
    assert ULAW_TABLE[0x80] == 32124
    assert ULAW_TABLE[0xFE] == 8  # first step of segment 0: 2 on 14 bits
    assert ULAW_TABLE[0xEF] == 132  # first code of segment 1 (33 on 14 bits)
    assert decode_ulaw(b"\xff\x00\x80") == struct.pack("<hhh", 0, -32124, 32124)


def test_alaw_known_values() -> None:
    # G.711 A-law: 0xD5 / 0x55 are the smallest magnitudes ±8; 0xAA / 0x2A the extremes ±32256 (4032 × 8).
    assert ALAW_TABLE[0xD5] == 8
    assert ALAW_TABLE[0x55] == -8
    assert ALAW_TABLE[0xAA] == 32256
    assert ALAW_TABLE[0x2A] == -32256
    assert ALAW_TABLE[0xC5] == 264  # segment 1 starts at 256 + half a step
    assert decode_alaw(b"\xd5\x2a") == struct.pack("<hh", 8, -32256)


def test_g711_tables_are_odd_symmetric_and_monotonic() -> None:
    for code in range(128):
        assert ULAW_TABLE[code] == -ULAW_TABLE[code | 0x80]
        assert ALAW_TABLE[code] == -ALAW_TABLE[code | 0x80]
    positive_ulaw = [ULAW_TABLE[code] for code in range(0xFF, 0x7F, -1)]
    assert positive_ulaw == sorted(positive_ulaw)
    assert len(set(ULAW_TABLE)) == 255  # two codes for zero
    assert len(set(ALAW_TABLE)) == 256


def test_decode_payload_by_type() -> None:
    pcmu = parse_rtp(rtp_bytes(1, b"\xff\xff", pt=PT_PCMU))
    pcma = parse_rtp(rtp_bytes(1, b"\xd5", pt=PT_PCMA))
    dtmf = parse_rtp(rtp_bytes(1, b"\x01\x00\x00\xa0", pt=101))
    assert decode_payload(pcmu) == b"\x00" * 4
    assert decode_payload(pcma) == struct.pack("<h", 8)
    assert decode_payload(dtmf) is None


# --- reassembly -------------------------------------------------------------------------------------------


def test_in_order_packets_pass_straight_through() -> None:
    reassembler = RtpReassembler(window=4)
    out = [p for seq in range(10, 15) for p in reassembler.push(packet(seq))]
    assert seqs(out) == [10, 11, 12, 13, 14]
    assert reassembler.stats.lost == 0


def test_reordered_packets_come_out_in_order() -> None:
    reassembler = RtpReassembler(window=4)
    out: list[RtpPacket] = []
    for seq in [1, 3, 2, 5, 4, 6]:
        out += reassembler.push(packet(seq))
    assert seqs(out) == [1, 2, 3, 4, 5, 6]
    assert reassembler.stats.lost == reassembler.stats.late == 0


def test_duplicates_are_dropped() -> None:
    reassembler = RtpReassembler(window=4)
    out: list[RtpPacket] = []
    for seq in [1, 2, 2, 4, 4, 3, 1]:
        out += reassembler.push(packet(seq))
    assert seqs(out) == [1, 2, 3, 4]
    assert reassembler.stats.duplicates == 3


def test_loss_is_counted_once_the_window_is_full_and_late_packet_dropped() -> None:
    reassembler = RtpReassembler(window=3)
    out: list[RtpPacket] = []
    for seq in [1, 3, 4]:
        out += reassembler.push(packet(seq))
    assert seqs(out) == [1]  # still waiting for 2
    out += reassembler.push(packet(5))  # 3 buffered behind the gap: 2 is given up
    assert seqs(out) == [1, 3, 4, 5]
    assert reassembler.stats.lost == 1
    out += reassembler.push(packet(2))
    assert seqs(out) == [1, 3, 4, 5]
    assert reassembler.stats.late == 1


def test_flush_releases_the_rest_and_counts_gaps() -> None:
    reassembler = RtpReassembler(window=8)
    for seq in [1, 3, 6]:
        reassembler.push(packet(seq))
    assert seqs(reassembler.flush()) == [3, 6]
    assert reassembler.stats.lost == 3  # 2, 4, 5


def test_sequence_wraps_around() -> None:
    reassembler = RtpReassembler(window=4)
    out: list[RtpPacket] = []
    for seq in [65534, 0, 65535, 1]:
        out += reassembler.push(packet(seq))
    assert seqs(out) == [65534, 65535, 0, 1]


def test_new_ssrc_and_confirmed_jump_restart_the_sequence() -> None:
    reassembler = RtpReassembler(window=4)
    out = reassembler.push(packet(100)) + reassembler.push(packet(5000, ssrc=2))
    assert seqs(out) == [100, 5000]
    assert reassembler.push(packet(40000, ssrc=2)) == []  # a stray far packet is held back ...
    out = reassembler.push(packet(40001, ssrc=2))  # ... until the next one confirms a restart
    assert seqs(out) == [40000, 40001]
    assert reassembler.stats.restarts == 2
    assert reassembler.stats.received == reassembler.stats.released == 4
    assert reassembler.stats.lost == 0


# --- dropped frames: what a listening tap lost, per stream --------------------------------------------------


def losses_after(window: int, sequence: list[int]) -> AudioLosses:
    reassembler = RtpReassembler(window=window)
    for seq in sequence:
        reassembler.push(packet(seq))
    reassembler.flush()
    return AudioLosses.of(reassembler.stats)


def test_a_gap_across_the_wraparound_counts_only_the_missing_numbers() -> None:
    # 65535 and 1 never come: two gaps, not the 65 000 a naive difference across the wrap would make.
    losses = losses_after(4, [65533, 65534, 0, 2, 3, 4, 5, 6])
    assert (losses.gaps, losses.dropped, losses.late, losses.duplicates) == (2, 2, 0, 0)


def test_reordering_across_the_wraparound_drops_nothing() -> None:
    assert losses_after(4, [65534, 0, 65535, 2, 1, 3]).dropped == 0


def test_duplicates_across_the_wraparound_are_counted_but_are_no_loss() -> None:
    losses = losses_after(4, [65535, 0, 65535, 1, 0, 1, 2])
    assert (losses.duplicates, losses.dropped) == (3, 0)


def test_a_packet_after_its_turn_is_a_gap_once_and_late_too() -> None:
    # 2 is given up when the window fills, then arrives: the audio has one hole, not two.
    losses = losses_after(2, [1, 3, 4, 5, 2, 6])
    assert (losses.gaps, losses.late, losses.dropped) == (1, 1, 1)


def test_a_sender_restart_is_not_a_gap() -> None:
    reassembler = RtpReassembler(window=4)
    for seq, ssrc in [(10, 1), (11, 1), (40000, 2), (40001, 2)]:
        reassembler.push(packet(seq, ssrc=ssrc))
    losses = AudioLosses.of(reassembler.stats)
    assert (losses.dropped, losses.restarts) == (0, 1)


def test_losses_add_up_over_the_streams_of_a_call() -> None:
    total = AudioLosses(gaps=2, late=1, duplicates=3, overflow=4, restarts=1) + AudioLosses(gaps=1, overflow=1)
    assert total == AudioLosses(gaps=3, late=1, duplicates=3, overflow=5, restarts=1)
    assert total.dropped == 8
    assert AudioLosses().dropped == 0


async def test_frames_the_recognizer_had_no_room_for_are_counted_as_dropped() -> None:
    # Nobody reads the queue (a recognizer that fell behind): two frames fit, the other three are dropped.
    receiver = RtpReceiver(idle_timeout=30, queue_size=2)
    host, port = await receiver.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for seq in range(1, 6):
            sender.sendto(rtp_bytes(seq), (host, port))
        for _ in range(100):
            if receiver.stats.datagrams == 5:
                break
            await asyncio.sleep(0.02)
    losses = receiver.losses()
    assert (losses.overflow, losses.gaps, losses.dropped) == (3, 0, 3)
    await receiver.close()


# --- receiver ---------------------------------------------------------------------------------------------


async def test_receiver_decodes_reorders_and_ends_on_idle() -> None:
    async with RtpReceiver("127.0.0.1", 0, idle_timeout=0.3, window=4) as receiver:
        host, port = receiver.address
        assert host == "127.0.0.1"
        assert port > 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for seq in [1, 3, 2, 4]:
                sender.sendto(rtp_bytes(seq, bytes([0x80 - seq]) * 160), (host, port))  # distinct μ-law codes
            sender.sendto(b"garbage", (host, port))
            sender.sendto(rtp_bytes(5, b"\x01\x00\x00\xa0", pt=101), (host, port))  # DTMF event: not audio
            chunks = [chunk async for chunk in receiver]
    assert [chunk[:2] for chunk in chunks] == [decode_ulaw(bytes([0x80 - seq])) for seq in [1, 2, 3, 4]]
    assert all(len(chunk) == 320 for chunk in chunks)
    assert receiver.idle_timed_out
    assert receiver.stats.malformed == 1
    assert receiver.stats.unsupported == 1


async def test_receiver_ignores_a_second_sender_and_close_ends_iteration() -> None:
    receiver = RtpReceiver(idle_timeout=30)
    host, port = await receiver.start()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other,
    ):
        first.sendto(rtp_bytes(1, pt=PT_PCMA, payload=b"\xd5" * 160), (host, port))
        chunk = await asyncio.wait_for(receiver.queue.get(), 5)
        other.sendto(rtp_bytes(2), (host, port))
        first.sendto(rtp_bytes(2, pt=PT_PCMA, payload=b"\xd5" * 160), (host, port))
        second = await asyncio.wait_for(receiver.queue.get(), 5)
    await receiver.close()
    assert chunk == second == struct.pack("<h", 8) * 160
    assert receiver.stats.foreign == 1
    assert [c async for c in receiver] == []
    assert not receiver.idle_timed_out


async def test_receiver_port_in_use_is_a_clear_error() -> None:
    async with RtpReceiver() as first:
        with pytest.raises(RtpError, match=f"cannot listen for RTP on 127.0.0.1:{first.address[1]}"):
            await RtpReceiver(port=first.address[1]).start()
