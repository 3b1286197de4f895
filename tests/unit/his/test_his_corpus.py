"""Public sample messages (tests/data/hl7/, see its README for sources and licences) pass the receiver's rules and
are written back byte for byte: the parser keeps what it does not interpret (other versions, extra fields, escape
sequences, other sites' segments)."""

from __future__ import annotations

from pathlib import Path

import pytest

from his.hl7 import parse

CORPUS = Path(__file__).resolve().parents[2] / "data" / "hl7"
SAMPLES = sorted(CORPUS.glob("*.hl7"))


def test_the_corpus_has_its_licences_and_message_types() -> None:
    assert (CORPUS / "README.md").is_file()
    assert (CORPUS / "LICENSE.python-hl7").is_file()
    assert (CORPUS / "LICENSE.hl7apy").is_file()
    assert {parse(p.read_bytes()).message_code for p in SAMPLES} >= {"ADT", "ORU", "RSP"}


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.name for p in SAMPLES])
def test_a_public_sample_round_trips(sample: Path) -> None:
    data = sample.read_bytes()
    message = parse(data)  # the receiver's rules: MSH, encoding characters, MSH-9/10/11/12, segment ids
    assert message.control_id
    assert message.encode() == data
    again = parse(message.encode())
    assert (again.type, again.control_id) == (message.type, message.control_id)
