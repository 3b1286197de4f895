"""``medhotline his check``: files judged by the receiver's own readers (``his.check``), agreeing with the ADT
listener's answer message for message; several messages per file, any line ends; unreadable files named; no value
of a field in the output."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine

from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import DataKeyRing, DataKeyStore
from compliance.keyservice_client import KeyServiceClient
from his import PatientRegistry, PatientStore
from his.adt import AdtReceiver, build_adt
from his.audit import Hl7Audit
from his.check import check_bytes, split_messages
from his.hl7 import Party, parse
from his.messages import PdqPatient
from his.simulator import HOTLINE_PARTY, SIMULATOR_PARTY
from medhotline.cli import main

CORPUS = Path(__file__).resolve().parents[2] / "data" / "hl7"
AT = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
PATIENT = PdqPatient("SIM-000901", "测试患者壬", "13800138901", date(1971, 5, 6))
# The receiver refuses these public samples, and so does the check (see docs/his.md, "his check"): an ADT whose
# PID-3 has no MR identifier, an ORU whose PID-7 is not a date, an RSP whose candidate has no PID-13.
REFUSED_SAMPLES = {
    "adt_a04_vinah.hl7": "PID-3: no medical record number (identifier type MR)",
    "oru_r01_ghh_lab.hl7": "PID-7: date of birth must be YYYYMMDD",
    "rsp_k22_pdq.hl7": "PID-13: home phone number is missing",
}


def adt(pid: dict[str, str] | None = None, *, control_id: str = "MHCHECKAAAAAAAAAAAAA") -> bytes:
    """An ADT^A08 as the HIS sends it, with PID fields replaced raw (``{"7": "19711306"}``)."""
    pid = pid or {}
    text = build_adt("A08", PATIENT, sender=SIMULATOR_PARTY, receiver=HOTLINE_PARTY, at=AT,
                     control_id=control_id).encode().decode()  # fmt: skip
    lines = text.split("\r")
    for i, line in enumerate(lines):
        if line.startswith("PID|"):
            fields = line.split("|")
            for number, value in pid.items():
                fields += [""] * (int(number) + 1 - len(fields))
                fields[int(number)] = value
            lines[i] = "|".join(fields)
    return "\r".join(lines).encode()


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *files: Path | str) -> tuple[int, str, str]:
    config = tmp_path / "medhotline.toml"
    config.write_text(f'[service]\nstate_dir = "{tmp_path / "state"}"\n', encoding="utf-8")
    code = main(["--config", str(config), "his", "check", *map(str, files)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_public_samples_are_judged_as_the_receiver_judges_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = sorted(CORPUS.glob("*.hl7"))
    accepted = [p for p in samples if p.name not in REFUSED_SAMPLES]
    assert len(accepted) == 4
    code, out, err = run(tmp_path, capsys, *accepted)
    assert code == 0
    assert "4 accepted, 0 refused" in err
    assert all(": warning: " in line for line in out.splitlines())  # VXU without PID-13: accepted, warned
    for name, line in REFUSED_SAMPLES.items():
        code, out, _ = run(tmp_path, capsys, CORPUS / name)
        assert code == 1
        assert f"{CORPUS / name}: {line}" in out.splitlines()


@pytest.mark.parametrize(
    ("pid", "expected"),
    [
        ({"7": "19711306"}, "PID-7: date of birth must be YYYYMMDD"),
        ({"13": "call-me-maybe"}, "PID-13: patient phone must be 3-20 digits"),
        ({"13": ""}, "PID-13: home phone number is missing"),
        ({"3": ""}, "PID-3: no medical record number (identifier type MR)"),
        ({"7": "10130101"}, "PID-7: patient birth year must be a year from"),
    ],
)
def test_a_malformed_field_the_hotline_relies_on_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pid: dict[str, str], expected: str
) -> None:
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(adt(pid))
    code, out, _ = run(tmp_path, capsys, bad)
    assert code == 1
    assert out.startswith(f"{bad}: {expected}")
    for value in (PATIENT.name, PATIENT.phone, PATIENT.record_number, "19711306", "call-me-maybe", "10130101"):
        assert value not in out


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"EVN||20261201\rPID|1||X^^^HIS^MR\r", "MSH: the message does not start with an MSH segment"),
        (b"MSH|^~\\&|HIS|H|MH|H|20261201||ADT^A08|C1|P\rPID|1\r", "MSH-12: version id is missing"),
        (b"MSH|^~\\&|HIS|H|MH|H|20261201||ADT|C1|P|2.5\r", "MSH-9: message type must be a code and trigger"),
        (b"MSH|^~\\&|HIS|H|MH|H|20261201||ADT^A08||P|2.5\r", "MSH-10: message control id is missing"),
        (b"MSH|^~\\&|HIS|H|MH|H|20261201||ZZZ^Z01|C1|P|2.5\r", "MSH-9: message type not handled"),
        (b"", "MSH: no message"),
    ],
)
def test_a_missing_or_broken_msh_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes, expected: str
) -> None:
    bad = tmp_path / "msh.hl7"
    bad.write_bytes(data)
    code, out, _ = run(tmp_path, capsys, bad)
    assert code == 1
    assert out.startswith(f"{bad}: {expected}")


def test_several_messages_with_any_line_ends_are_judged_one_by_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = adt()
    bad = adt({"7": "19711306"}, control_id="MHCHECKBBBBBBBBBBBBB")
    data = good.replace(b"\r", b"\n") + b"\n\n" + bad.replace(b"\r", b"\r\n") + good  # MSH starts the third
    assert len(split_messages(data)) == 3
    assert [v.accepted for v in check_bytes(data, AT)] == [True, False, True]
    both = tmp_path / "batch.hl7"
    both.write_bytes(data)
    code, out, err = run(tmp_path, capsys, both)
    assert code == 1
    assert out.splitlines() == [f"{both}: PID-7: date of birth must be YYYYMMDD (message 2)"]
    assert "2 accepted, 1 refused" in err


def test_an_unreadable_file_is_named_and_the_others_still_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.hl7"
    good.write_bytes(adt())
    missing = tmp_path / "missing.hl7"
    code, _, err = run(tmp_path, capsys, missing, tmp_path, good)
    assert code == 4
    assert f"{missing}: cannot read: No such file or directory" in err
    assert f"{tmp_path}: cannot read: Is a directory" in err
    assert "1 accepted, 0 refused, 2 unreadable" in err


@pytest.mark.parametrize(
    "pid",
    [{}, {"7": "19711306"}, {"13": "call-me-maybe"}, {"13": ""}, {"3": ""}, {"5": ""}, {"7": "10130101"}],
    ids=["good", "bad-date", "bad-phone", "no-phone", "no-mrn", "no-name", "old-year"],
)
async def test_the_check_agrees_with_the_adt_listener(
    engine: Engine, his_keys: KeyServiceClient, pid: dict[str, str]
) -> None:
    audit = AuditLog(SqlAuditStore(engine))
    ring = DataKeyRing(DataKeyStore.for_engine(engine), his_keys, audit=audit)
    registry = PatientRegistry(PatientStore.for_engine(engine), ring, his_keys, audit=audit)
    receiver = AdtReceiver(registry, audit=Hl7Audit(audit), sender=Party("MEDHOTLINE", "HOTLINE"), clock=lambda: AT)
    data = adt(pid)

    ack = await receiver.handle(parse(data))
    msa, err = ack.first("MSA"), ack.first("ERR")
    assert msa is not None
    [verdict] = check_bytes(data, AT)
    assert verdict.accepted == (ack.value(msa, 1) == "AA")
    if err is not None:
        parts = ack.components(err, 2)
        assert verdict.problems[0].location == f"{parts[0]}-{parts[2]}"
