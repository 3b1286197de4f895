"""MLLP framing, the HL7 codec's receiver rules, and ACK/NAK building and reading: sans-I/O."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from his.hl7 import Hl7Error, Message, Party, escape, parse, segment, unescape
from his.messages import (
    PdqPatient,
    build_ack,
    build_pdq_answer,
    build_pdq_query,
    build_reject,
    new_control_id,
    read_ack,
    read_pdq_answer,
    read_pdq_query,
)
from his.mllp import Frame, FramingError, MllpDecoder, encode_frame

AT = datetime(2026, 12, 9, 8, 30, tzinfo=UTC)
HOTLINE = Party("MEDHOTLINE", "HOSPITAL")
HIS = Party("HIS", "HOSPITAL")
QUERY = (
    b"MSH|^~\\&|MEDHOTLINE|HOSPITAL|HIS|HOSPITAL|20261209083000||QBP^Q22^QBP_Q21|MHABCDEFGH|P|2.5\r"
    b"QPD|Q22^Find Candidates^HL7|T1|@PID.13.1^5550100\rRCP|I\r"
)


# --- framing ---------------------------------------------------------------------------------------------------


def test_a_frame_split_at_every_byte_comes_out_whole() -> None:
    wire = encode_frame(b"MSH|one") + encode_frame(b"MSH|two")
    decoder = MllpDecoder()
    events = [e for byte in wire for e in decoder.feed(bytes([byte]))]
    assert events == [Frame(b"MSH|one"), Frame(b"MSH|two")]
    assert decoder.end() == []


def test_garbage_before_a_frame_is_reported_and_the_frame_kept() -> None:
    events = MllpDecoder().feed(b"GET / HTTP/1.0\r\n" + encode_frame(b"MSH|x"))
    assert isinstance(events[0], FramingError)
    assert "outside a frame" in events[0].reason
    assert events[0].offset == 0
    assert events[1] == Frame(b"MSH|x")


def test_a_stream_cut_mid_frame_is_an_error_at_end() -> None:
    decoder = MllpDecoder()
    assert decoder.feed(b"\x0bMSH|half") == []
    assert decoder.in_frame
    (cut,) = decoder.end()
    assert isinstance(cut, FramingError)
    assert "middle of a frame" in cut.reason


def test_an_oversize_frame_is_discarded_and_the_next_one_kept() -> None:
    decoder = MllpDecoder(max_size=32)
    events = decoder.feed(encode_frame(b"M" * 100) + encode_frame(b"MSH|small"))
    assert isinstance(events[0], FramingError)
    assert "larger than 32 bytes" in events[0].reason
    assert events[1] == Frame(b"MSH|small")


def test_a_start_block_inside_a_frame_restarts_the_frame() -> None:
    events = MllpDecoder().feed(b"\x0bMSH|lost\x0bMSH|kept\x1c\r")
    assert isinstance(events[0], FramingError)
    assert "start block inside a frame" in events[0].reason
    assert events[1] == Frame(b"MSH|kept")


def test_an_end_block_without_cr_is_reported_but_the_frame_kept() -> None:
    events = MllpDecoder().feed(b"\x0bMSH|a\x1c\x0bMSH|b\x1c\r")
    assert [type(e) for e in events] == [FramingError, Frame, Frame]


def test_a_payload_with_a_block_character_cannot_be_framed() -> None:
    with pytest.raises(ValueError, match="block characters"):
        encode_frame(b"MSH|\x1c")


@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_the_decoder_never_raises_and_keeps_what_is_framed(noise: bytes, chunk: int) -> None:
    decoder = MllpDecoder(max_size=256)
    wire = noise + encode_frame(b"MSH|after-noise")
    events = [e for i in range(0, len(wire), chunk) for e in decoder.feed(wire[i : i + chunk])]
    events += decoder.end()
    assert Frame(b"MSH|after-noise") == [e for e in events if isinstance(e, Frame)][-1]


# --- receiver rules --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "location", "why"),
    [
        (b"", "MSH", "empty message"),
        (b"PID|1\r", "MSH", "does not start with an MSH"),
        (b"MSH|^~\\&|A|B|C|D|20261209||QBP^Q22|X1|P|2.5\r\xff\xfe\r", "MSH-18", "not UTF-8"),
        (b"MSH|^~|A|B\r", "MSH-2", "encoding characters"),
        (b"MSH|^~\\&|A|B|C|D|20261209||QBP^Q22|X1|P|2.5\rpid|1\r", "segment 2", "segment id"),
        (b"MSH|^~\\&|A|B|C|D|20261209||||P|2.5\r", "MSH-9", "missing"),
        (b"MSH|^~\\&|A|B|C|D|20261209||Q^Q|X1|P|2.5\r", "MSH-9", "code and trigger"),
        (b"MSH|^~\\&|A|B|C|D|20261209||QBP^Q22|||2.5\r", "MSH-10", "missing"),
        (b"MSH|^~\\&|A|B|C|D|20261209||QBP^Q22|X1|X|2.5\r", "MSH-11", "P, D or T"),
        (b"MSH|^~\\&|A|B|C|D|20261209||QBP^Q22|X1|P|3.0\r", "MSH-12", "HL7 v2 version"),
        (b"MSH|^~\\&|A|B|C|D|20261209||QBP^Q22|X1|P|2.5\rMSH|^~\\&|A\r", "MSH(2)", "second MSH"),
    ],
)
def test_a_broken_message_is_refused_naming_segment_and_field(data: bytes, location: str, why: str) -> None:
    with pytest.raises(Hl7Error) as caught:
        parse(data)
    assert caught.value.location == location
    assert why in caught.value.reason


def test_errors_never_quote_the_value() -> None:
    query = QUERY.replace(b"@PID.13.1^5550100", b"@PID.99^5550100")
    with pytest.raises(Hl7Error) as caught:
        read_pdq_query(parse(query))
    assert caught.value.location == "QPD-3"
    assert "5550100" not in str(caught.value)


@given(st.text(max_size=60))
def test_escape_round_trips_any_text(text: str) -> None:
    assert unescape(escape(text)) == text


def test_a_message_round_trips_through_encode_and_parse() -> None:
    message = parse(QUERY)
    assert parse(message.encode()) == message
    assert message.type == "QBP^Q22"
    assert message.control_id == "MHABCDEFGH"


def test_control_ids_have_no_digit_runs_and_fit_v25() -> None:
    ids = {new_control_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 20 and not any(c.isdigit() for c in i) for i in ids)


# --- acknowledgements ------------------------------------------------------------------------------------------


def test_an_aa_is_read_back_as_accepted() -> None:
    query = parse(QUERY)
    ack = read_ack(parse(build_ack(query, "AA", sender=HIS, at=AT).encode()), "MHABCDEFGH")
    assert ack.accepted
    assert ack.code == "AA"
    assert ack.acknowledged == "MHABCDEFGH"


def test_an_ae_carries_segment_field_and_reason() -> None:
    query = parse(QUERY)
    error = Hl7Error("PID-13", "home phone number is missing", "101")
    ack = read_ack(parse(build_ack(query, "AE", sender=HIS, at=AT, error=error).encode()), "MHABCDEFGH")
    assert (ack.code, ack.location, ack.error_code) == ("AE", "PID-13", "101")
    assert "home phone number is missing" in ack.text


def test_a_reject_of_an_unparseable_message_is_an_ar_naming_msh() -> None:
    error = Hl7Error("MSH-2", "encoding characters must be 4 distinct characters")
    nak = parse(build_reject("X1", error, sender=HIS, at=AT).encode())
    ack = read_ack(nak, "X1")
    assert (ack.code, ack.location) == ("AR", "MSH-2")


def test_an_ack_for_another_control_id_is_refused() -> None:
    query = parse(QUERY)
    with pytest.raises(Hl7Error, match="MSA-2"):
        read_ack(parse(build_ack(query, "AA", sender=HIS, at=AT).encode()), "MHOTHER")


def test_a_reply_without_msa_is_refused() -> None:
    reply = Message((parse(QUERY).msh, segment("QAK", "T1", "OK")))
    with pytest.raises(Hl7Error, match="MSA"):
        read_ack(reply, "MHABCDEFGH")


# --- PDQ -------------------------------------------------------------------------------------------------------


def test_a_pdq_query_and_answer_round_trip() -> None:
    query = parse(build_pdq_query("5550100", sender=HOTLINE, receiver=HIS, at=AT, control_id="MHQUERY").encode())
    assert read_pdq_query(query) == ("MHQUERY", "5550100")
    patient = PdqPatient("MRN|7^X", "Test^Name", "5550100", date(1950, 3, 1))
    answer = parse(build_pdq_answer(query, [patient], sender=HIS, at=AT).encode())
    result = read_pdq_answer(answer, "MHQUERY")
    assert result.status == "OK"
    assert result.patients == (patient,)


def test_a_pdq_answer_with_no_patient_is_nf() -> None:
    query = parse(build_pdq_query("5550100", sender=HOTLINE, receiver=HIS, at=AT, control_id="MHQUERY").encode())
    answer = parse(build_pdq_answer(query, [], sender=HIS, at=AT).encode())
    assert read_pdq_answer(answer, "MHQUERY").status == "NF"


def test_a_pdq_answer_with_a_bad_birth_date_names_pid_7() -> None:
    query = parse(build_pdq_query("5550100", sender=HOTLINE, receiver=HIS, at=AT, control_id="MHQUERY").encode())
    good = build_pdq_answer(query, [PdqPatient("M1", "A", "5550100", date(1950, 3, 1))], sender=HIS, at=AT)
    broken = good.encode().replace(b"19500301", b"19501399")
    with pytest.raises(Hl7Error) as caught:
        read_pdq_answer(parse(broken), "MHQUERY")
    assert caught.value.location == "PID-7"
