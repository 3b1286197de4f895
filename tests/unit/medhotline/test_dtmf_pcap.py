"""Key presses as RFC 4733 captures: each capture is parsed back here, byte by byte, with a reader written from
the libpcap, Ethernet, IPv4, UDP and RTP layouts (not with the module's own code), so a shared mistake cannot hide.
SIPp replaying these captures on a real call is checked in test_patient_phone.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from medhotline.phones import PhoneError
from medhotline.phones.dtmf_pcap import RtpStream, dtmf_pcap, play_ms, write_dtmf_pcap

ALL_KEYS = "0123456789*#"
CODES = {**{str(d): d for d in range(10)}, "*": 10, "#": 11}


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@dataclass(frozen=True)
class Event:
    """One RTP packet of a capture, decoded: its capture time and the RTP and RFC 4733 fields."""

    at_us: int
    marker: bool
    payload_type: int
    seq: int
    timestamp: int
    ssrc: int
    code: int
    end: bool
    volume: int
    duration: int


def read_capture(data: bytes) -> list[Event]:
    """Every packet of a classic little-endian libpcap file of Ethernet/IPv4/UDP/RTP telephone events."""
    magic, major, minor, _zone, _sigfigs, snaplen, linktype = struct.unpack_from("<IHHiIII", data, 0)
    assert (magic, major, minor, linktype) == (0xA1B2C3D4, 2, 4, 1)
    offset, events = 24, []
    while offset < len(data):
        ts_s, ts_us, incl, orig = struct.unpack_from("<IIII", data, offset)
        assert incl == orig <= snaplen, "a packet is truncated in the capture: SIPp refuses those"
        frame = data[offset + 16 : offset + 16 + incl]
        assert len(frame) == incl
        offset += 16 + incl
        assert frame[12:14] == b"\x08\x00"  # IPv4
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        assert ip[0] >> 4 == 4
        assert ip[9] == 17  # UDP
        assert int.from_bytes(ip[2:4], "big") == len(ip)
        assert _sum16(ip[:ihl]) == 0xFFFF, "bad IPv4 header checksum"
        udp = ip[ihl:]
        assert int.from_bytes(udp[4:6], "big") == len(udp)  # SIPp takes the packet length from here
        pseudo = ip[12:20] + bytes([0, 17]) + len(udp).to_bytes(2, "big")
        assert _sum16(pseudo + udp) == 0xFFFF, "bad UDP checksum"
        rtp = udp[8:]
        assert len(rtp) == 16
        assert rtp[0] == 0x80  # version 2, no padding, extension or CSRC
        seq, timestamp, ssrc = struct.unpack("!HII", rtp[2:12])
        events.append(
            Event(
                at_us=ts_s * 1_000_000 + ts_us,
                marker=bool(rtp[1] & 0x80),
                payload_type=rtp[1] & 0x7F,
                seq=seq,
                timestamp=timestamp,
                ssrc=ssrc,
                code=rtp[12],
                end=bool(rtp[13] & 0x80),
                volume=rtp[13] & 0x3F,
                duration=int.from_bytes(rtp[14:16], "big"),
            )
        )
    return events


def by_event(packets: list[Event]) -> list[list[Event]]:
    """The packets grouped per RFC 4733 event (one RTP timestamp each), in order."""
    groups: list[list[Event]] = []
    for packet in packets:
        if not groups or groups[-1][0].timestamp != packet.timestamp:
            groups.append([])
        groups[-1].append(packet)
    return groups


STREAM = RtpStream(ssrc=0x12345678, seq=1000, timestamp=50_000)


def test_every_key_is_a_marked_start_growing_continuations_and_three_end_packets() -> None:
    packets = read_capture(dtmf_pcap(ALL_KEYS, STREAM, 101))
    assert len(packets) == 13 * len(ALL_KEYS)
    events = by_event(packets)
    assert [group[0].code for group in events] == [CODES[key] for key in ALL_KEYS]
    assert [group[0].code for group in events][-2:] == [10, 11]  # * and #
    for group in events:
        assert len(group) == 13
        assert [p.marker for p in group] == [True] + [False] * 12
        assert [p.end for p in group] == [False] * 10 + [True] * 3
        assert [p.duration for p in group] == [160 * n for n in range(1, 11)] + [1600] * 3
        assert {p.code for p in group} == {group[0].code}
        assert {p.volume for p in group} == {10}
    assert {p.payload_type for p in packets} == {101}
    assert {p.ssrc for p in packets} == {0x12345678}
    assert [p.seq for p in packets] == list(range(1000, 1000 + len(packets)))


def test_packets_are_20_ms_apart_keys_100_ms_of_silence_apart_and_timestamps_follow_the_clock() -> None:
    packets = read_capture(dtmf_pcap("19#", STREAM, 101))
    start = packets[0].at_us
    assert start > 0  # SIPp's replay takes a zero capture time for "nothing sent yet"
    offsets_ms = [(p.at_us - start) / 1000 for p in packets]
    key_starts = [0, 360, 720]
    assert offsets_ms == [k + 20 * n for k in key_starts for n in range(13)]
    # Between keys: the last end packet's 20 ms, then 100 ms with nothing sent.
    assert offsets_ms[13] - offsets_ms[12] - 20 == 100
    # Each event is stamped with its start on the 8 kHz clock, the play continuing one clock.
    assert [group[0].timestamp for group in by_event(packets)] == [50_000 + 8 * k for k in key_starts]
    assert offsets_ms[-1] + 20 == play_ms("19#")


@pytest.mark.parametrize(("keys", "expected_ms"), [("1", 260), ("12", 620), ("1956", 1340), ("182#", 1340)])
def test_a_press_lasts_360_ms_a_key_less_the_last_gap(keys: str, expected_ms: int) -> None:
    assert play_ms(keys) == expected_ms == 360 * len(keys) - 100
    packets = read_capture(dtmf_pcap(keys, STREAM, 101))
    assert (packets[-1].at_us - packets[0].at_us) // 1000 + 20 == expected_ms


@pytest.mark.parametrize("payload_type", [96, 101, 127])
def test_the_payload_type_is_the_one_asked_for(payload_type: int) -> None:
    packets = read_capture(dtmf_pcap("5", STREAM, payload_type))
    assert {p.payload_type for p in packets} == {payload_type}


@pytest.mark.parametrize("payload_type", [0, 8, 95, 128, -1])
def test_a_payload_type_outside_the_dynamic_range_is_refused(payload_type: int) -> None:
    with pytest.raises(PhoneError, match=f"payload type must be dynamic \\(96-127\\), got {payload_type}"):
        dtmf_pcap("5", STREAM, payload_type)


def test_sequence_numbers_and_timestamps_wrap_around() -> None:
    packets = read_capture(dtmf_pcap("12", RtpStream(ssrc=7, seq=65530, timestamp=2**32 - 100), 101))
    assert [p.seq for p in packets[:8]] == [65530, 65531, 65532, 65533, 65534, 65535, 0, 1]
    assert [group[0].timestamp for group in by_event(packets)] == [2**32 - 100, 360 * 8 - 100]


def test_the_stream_carries_on_from_one_press_to_the_next() -> None:
    first = read_capture(dtmf_pcap("19", STREAM, 101))
    following = STREAM.after("19", 2000)
    assert following == RtpStream(0x12345678, 1000 + 26, 50_000 + 2000 * 8)
    second = read_capture(dtmf_pcap("5", following, 101))
    assert second[0].seq == first[-1].seq + 1
    assert second[0].timestamp == 50_000 + 16_000
    assert {p.ssrc for p in first + second} == {0x12345678}


def test_the_next_press_cannot_start_before_this_one_has_played() -> None:
    assert STREAM.after("12", 620).seq == 1026
    with pytest.raises(PhoneError, match=r"starts 619 ms in, before 2 key\(s\) have played"):
        STREAM.after("12", 619)


@pytest.mark.parametrize(
    ("keys", "message"),
    [("", "no keys to play"), ("12A4", "key 3 of 4 is not a DTMF key"), ("9 ", "key 2 of 2 is not a DTMF key")],
)
def test_what_is_not_a_key_is_refused_by_position_never_by_value(keys: str, message: str) -> None:
    with pytest.raises(PhoneError, match=message) as info:
        dtmf_pcap(keys, STREAM, 101)
    assert "12A4" not in str(info.value)


@pytest.mark.parametrize(
    ("ssrc", "seq", "timestamp", "field"),
    [(-1, 0, 0, "SSRC"), (2**32, 0, 0, "SSRC"), (0, 65536, 0, "sequence number"), (0, 0, 2**32, "timestamp")],
)
def test_rtp_stream_fields_out_of_range_are_refused(ssrc: int, seq: int, timestamp: int, field: str) -> None:
    with pytest.raises(PhoneError, match=f"RTP {field}"):
        RtpStream(ssrc, seq, timestamp)


def test_written_capture_is_the_capture(tmp_path: Path) -> None:
    path = tmp_path / "press1.pcap"
    write_dtmf_pcap(path, "7#", STREAM, 101)
    assert path.read_bytes() == dtmf_pcap("7#", STREAM, 101)
    assert [group[0].code for group in by_event(read_capture(path.read_bytes()))] == [7, 11]


def test_a_capture_that_cannot_be_written_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "press1.pcap"
    with pytest.raises(PhoneError, match=f"{path}: cannot write the key capture"):
        write_dtmf_pcap(path, "7", STREAM, 101)


def test_the_reader_notices_a_tampered_or_truncated_capture() -> None:
    """The checks above are only as good as the reader: it must reject damaged captures."""
    data = bytearray(dtmf_pcap("7", STREAM, 101))
    flipped = bytearray(data)
    flipped[-1] ^= 0x01  # the last packet's duration: the UDP checksum no longer matches
    with pytest.raises(AssertionError, match="bad UDP checksum"):
        read_capture(bytes(flipped))
    with pytest.raises((AssertionError, struct.error)):
        read_capture(bytes(data[:-3]))
    ip_damaged = bytearray(data)
    ip_damaged[24 + 16 + 14 + 8] ^= 0x01  # the first packet's TTL
    with pytest.raises(AssertionError, match="bad IPv4 header checksum"):
        read_capture(bytes(ip_damaged))
