"""Public sample messages (tests/data/hl7/, see its README for sources and licences) pass the receiver's rules and
are written back byte for byte: the parser keeps what it does not interpret (other versions, extra fields, escape
sequences, other sites' segments).

Some samples are stored as their publishers wrote them, with LF or CRLF line ends or a UTF-8 byte order mark; the
receiver accepts those, and what it writes back is the canonical form: no mark, every segment ended by one CR."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from his.hl7 import parse
from his.outbound import read_siu
from his.simulator import SimulatedHis

CORPUS = Path(__file__).resolve().parents[2] / "data" / "hl7"
SAMPLES = sorted(CORPUS.glob("*.hl7"))
LICENCES = ("LICENSE.python-hl7", "LICENSE.hl7apy", "LICENSE.FHIR-Converter", "LICENSE.CDC_IIS_Open_Tools")


def canonical(data: bytes) -> bytes:
    """``data`` as the receiver writes it back: no byte order mark, blank lines dropped, CR after each segment."""
    text = data.decode("utf-8").removeprefix("\ufeff")
    lines = [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    return ("\r".join(lines) + "\r").encode("utf-8")


def test_the_corpus_has_its_licences_and_message_types() -> None:
    readme = (CORPUS / "README.md").read_text(encoding="utf-8")
    for licence in LICENCES:
        assert (CORPUS / licence).is_file()
        assert licence in readme
    for sample in SAMPLES:
        assert f"`{sample.name}`" in readme, f"{sample.name} has no source in the README"
    assert {parse(p.read_bytes()).message_code for p in SAMPLES} >= {"ADT", "ORU", "RSP", "SIU", "VXU"}


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.name for p in SAMPLES])
def test_a_public_sample_round_trips(sample: Path) -> None:
    data = sample.read_bytes()
    message = parse(data)  # the receiver's rules: MSH, encoding characters, MSH-9/10/11/12, segment ids
    assert message.control_id
    assert message.encode() == canonical(data)
    again = parse(message.encode())
    assert again.encode() == message.encode()
    assert (again.type, again.control_id) == (message.type, message.control_id)


def test_the_samples_written_by_other_tools_are_not_all_canonical() -> None:
    """The canonical form is not a tautology here: the corpus holds a byte order mark, LF and CRLF line ends."""
    raw = [p.read_bytes() for p in SAMPLES]
    assert any(d.startswith(b"\xef\xbb\xbfMSH") for d in raw)
    assert any(b"\r\n" in d for d in raw)
    assert any(b"\n" in d and b"\r" not in d for d in raw)
    assert any(d == canonical(d) for d in raw)


@pytest.mark.parametrize("sample", [p for p in SAMPLES if p.name.startswith("siu_")], ids=lambda p: p.name)
def test_a_public_siu_reads_as_an_appointment(sample: Path) -> None:
    siu = read_siu(parse(sample.read_bytes()))
    assert (siu.event, siu.status) == ("S12", "Booked")
    assert siu.booking_id
    assert siu.record_number


ACCEPTED = [p for p in SAMPLES if p.name.split("_")[0] in ("adt", "oru", "siu", "vxu")]


@pytest.mark.parametrize("data", [p.read_bytes() for p in ACCEPTED], ids=[p.name for p in ACCEPTED])
async def test_the_simulated_his_accepts_a_public_sample(data: bytes) -> None:
    his = SimulatedHis()
    message = parse(data)
    ack = await his.handle(message)
    msa = ack.first("MSA")
    assert msa is not None
    assert (ack.value(msa, 1), ack.value(msa, 2)) == ("AA", message.control_id)
    assert his.received == {message.control_id: message.type}
