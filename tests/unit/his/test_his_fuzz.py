"""Garbage in: the MLLP decoder, the HL7 parser and the readers of what the hotline receives never raise anything
but ``Hl7Error`` (the project's clear error naming segment and field); a valid frame after any garbage is still
received; and garbage thrown at the ADT listener over a real socket gets one answer per frame, leaves the
connection usable and loses no stored outbox row.

Sans-I/O properties run under hypothesis; the socket part is a seeded random loop (hypothesis does not drive an
event loop). Two settings profiles, chosen by ``MEDHOTLINE_FUZZ``:

- unset or ``short`` (CI): derandomized, 1 500 inputs per property, so CI runs the same inputs every time;
- ``long``: 35 000 random inputs per property (105 000 over the three), no example database, for the run recorded
  in docs/his.md: ``MEDHOTLINE_FUZZ=long pytest tests/unit/his/test_his_fuzz.py -k "not listener"
  --hypothesis-show-statistics``."""

from __future__ import annotations

import asyncio
import os
import random
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import DataKeyRing, DataKeyStore
from compliance.keyservice_client import KeyServiceClient
from his import PatientRegistry, PatientStore
from his.adt import AdtReceiver, build_adt, read_adt
from his.audit import Hl7Audit
from his.hl7 import Hl7Error, parse
from his.messages import build_pdq_query, new_control_id, read_ack, read_pdq_answer, read_pdq_query
from his.mllp import END_BLOCK, START_BLOCK, Frame, FramingError, MllpDecoder, encode_frame
from his.outbound import read_siu
from his.outbox import Outbox
from his.outbox_store import OutboxStore
from his.simulator import HOTLINE_PARTY, SIMULATOR_PARTY, SYNTHETIC_PATIENTS, SimulatedHis
from his.srm import read_srm, read_srr
from his.transport import MllpServer

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("his-short", max_examples=1500, derandomize=True, deadline=None, suppress_health_check=_SLOW)
# A hang shows as a per-input deadline miss; 2 s leaves room for a loaded shared machine.
settings.register_profile("his-long", max_examples=35_000, derandomize=False, database=None, deadline=2000,
                          suppress_health_check=_SLOW)  # fmt: skip
FUZZ_PROFILE = "his-long" if os.environ.get("MEDHOTLINE_FUZZ", "short") == "long" else "his-short"
FUZZ = settings.get_profile(FUZZ_PROFILE)
AT = datetime(2026, 12, 9, 8, 0, tzinfo=UTC)
VALID = build_adt("A08", SYNTHETIC_PATIENTS[0], sender=SIMULATOR_PARTY, receiver=HOTLINE_PARTY, at=AT,
                  control_id="MHFUZZVALIDMESSAGEX").encode()  # fmt: skip
PDQ = build_pdq_query("13800138101", sender=HOTLINE_PARTY, receiver=SIMULATOR_PARTY, at=AT,
                      control_id="MHFUZZQUERYMESSAGEX").encode()  # fmt: skip

# Bytes near HL7: pieces of real messages, delimiters, block characters and arbitrary bytes.
_PIECES = [b"MSH|^~\\&|", b"|", b"^", b"~", b"\\", b"&", b"\r", b"\n", b"PID|", b"MSA|AA|", b"ADT^A08", b"\x0b"]
_pieces = st.sampled_from([*_PIECES, b"\x1c", b"\x1c\r", b"\xff\xfe", b"MSH", VALID[:40], PDQ[:60]])
hl7ish = st.lists(st.one_of(_pieces, st.binary(max_size=12)), max_size=30).map(b"".join)
mutated = st.tuples(st.sampled_from([VALID, PDQ]), st.integers(0, 400), st.binary(max_size=8)).map(
    lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]
)


@FUZZ
@given(st.lists(st.one_of(hl7ish, st.binary(max_size=64)), max_size=8))
def test_the_decoder_never_raises_and_a_valid_frame_after_garbage_arrives(chunks: list[bytes]) -> None:
    decoder = MllpDecoder(max_size=256)
    events = [e for chunk in chunks for e in decoder.feed(chunk)]
    events += decoder.feed(encode_frame(b"MSH|after"))
    assert all(isinstance(e, Frame | FramingError) for e in events)
    frames = [e for e in events if isinstance(e, Frame)]
    assert frames[-1].payload == b"MSH|after"
    assert all(START_BLOCK not in f.payload and END_BLOCK not in f.payload for f in frames)
    assert all(len(f.payload) <= 256 for f in frames)
    decoder.end()


@FUZZ
@given(st.one_of(hl7ish, mutated, st.binary(max_size=300)))
def test_parsing_and_reading_garbage_raises_only_hl7error(data: bytes) -> None:
    errors: list[Hl7Error] = []
    try:
        message = parse(data)
    except Hl7Error as exc:
        message = None
        errors.append(exc)
    if message is not None:
        for reader in (read_adt, read_pdq_query, read_siu, read_srm, lambda m: read_ack(m, "MHX"),
                       lambda m: read_pdq_answer(m, "MHX"), lambda m: read_srr(m, m)):  # fmt: skip
            try:
                reader(message)
            except Hl7Error as exc:
                errors.append(exc)
        message.encode()  # what parsed can be written back
    # Anything but Hl7Error propagates and fails the test; each error names where.
    assert all(e.location for e in errors)


# The receiver minus the socket: the server's own path from bytes to ACK (decoder, parse, the simulated HIS's handler
# that reads PDQ queries and SIUs, AR/AE building), on one event loop reused across inputs.
_RUNNER = asyncio.Runner()
_RECEIVER = MllpServer(SimulatedHis().handle, sender=SIMULATOR_PARTY, max_size=512)


async def _answers(chunks: list[bytes]) -> list[str]:
    decoder = MllpDecoder(max_size=512)
    codes: list[str] = []
    for event in [e for chunk in chunks for e in decoder.feed(chunk)] + decoder.end():
        if isinstance(event, Frame):
            reply, _, error = await _RECEIVER._answer(event.payload)
            ack = parse(reply.encode())  # every answer is itself a readable message
            msa = ack.first("MSA")
            assert msa is not None
            codes.append(ack.value(msa, 1))
            assert error is None or error.location
    return codes


def _framed(payload: bytes) -> bytes:
    """A frame around anything (block characters inside are what the raw binary chunks are for)."""
    return encode_frame(payload.replace(b"\x0b", b"").replace(b"\x1c", b""))


@FUZZ
@given(st.lists(st.one_of(hl7ish, mutated, st.binary(max_size=64)).map(_framed) | st.binary(max_size=64), max_size=6))
def test_the_receiver_answers_every_frame_of_garbage_with_an_ack(chunks: list[bytes]) -> None:
    codes = _RUNNER.run(_answers(chunks))
    assert all(code in ("AA", "AE", "AR") for code in codes)


@pytest.fixture
def registry(engine: Engine, his_keys: KeyServiceClient) -> tuple[PatientRegistry, DataKeyRing, AuditLog]:
    audit = AuditLog(SqlAuditStore(engine))
    ring = DataKeyRing(DataKeyStore.for_engine(engine), his_keys, audit=audit)
    return PatientRegistry(PatientStore.for_engine(engine), ring, his_keys, audit=audit), ring, audit


def _outbox_rows(engine: Engine) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT * FROM his_outbox ORDER BY id"))]


async def test_garbage_at_the_listener_gets_answers_and_loses_no_outbox_row(
    engine: Engine, registry: tuple[PatientRegistry, DataKeyRing, AuditLog]
) -> None:
    reg, ring, audit = registry
    outbox = Outbox(OutboxStore.for_engine(engine), ring, audit=Hl7Audit(audit), node="n1")
    for _ in range(3):
        query = build_pdq_query("13800138101", sender=HOTLINE_PARTY, receiver=SIMULATOR_PARTY, at=AT,
                                control_id=new_control_id())  # fmt: skip
        await outbox.enqueue(query)
    before = _outbox_rows(engine)
    receiver = AdtReceiver(reg, audit=Hl7Audit(audit), sender=HOTLINE_PARTY)
    server = MllpServer(receiver.handle, sender=HOTLINE_PARTY, observer=receiver.observe, max_size=2048)
    port = await server.start()
    rng = random.Random(17)  # seeded: the same inputs every run
    pieces = [b"MSH|^~\\&|", b"|", b"^", b"\r", b"PID|", b"\x1c", b"\xff", VALID[:50], b"ADT^A08|", b"\x0b"]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(150):
            body = b"".join(rng.choice(pieces) if rng.random() < 0.6 else rng.randbytes(rng.randint(0, 20))
                            for _ in range(rng.randint(0, 12)))  # fmt: skip
            body = body.replace(b"\x0b", b"").replace(b"\x1c", b"")
            writer.write(rng.randbytes(rng.randint(0, 4)).replace(b"\x0b", b"") + encode_frame(body))
            await writer.drain()
            reply = await _one_frame(reader)
            ack = parse(reply)  # every frame is answered with a readable ACK
            assert ack.value(ack.first("MSA"), 1) in ("AE", "AR")  # type: ignore[arg-type]
        writer.write(encode_frame(VALID))  # the connection still works for a real message
        await writer.drain()
        final = parse(await _one_frame(reader))
        assert final.value(final.first("MSA"), 1) == "AA"  # type: ignore[arg-type]
        writer.close()
    finally:
        await server.aclose()
    assert _outbox_rows(engine) == before


async def _one_frame(reader: asyncio.StreamReader) -> bytes:
    decoder = MllpDecoder()
    async with asyncio.timeout(10):
        while True:
            for event in decoder.feed(await reader.read(4096)):
                if isinstance(event, Frame):
                    return event.payload
