"""Quality control against a real database (SQLite and PostgreSQL): every finished call is checked once, the
review queue holds the flagged and sampled calls, and a review goes through the access policy (a nurse is refused)
and is sealed as a signed amendment of the call record that verifies, with the real key service."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from compliance.access_records import AccessDenied
from compliance.accounts import AccountStore
from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import DataKey, DataKeyRing, DataKeyStore
from compliance.keyservice_client import KeyServiceClient
from ground import db
from medhotline.quality.checker import in_sample
from medhotline.quality.rules import load_rules
from medhotline.quality.service import QualityError, check_calls, parse_scores, review_call, sample_key
from medhotline.quality.store import QualityStore
from medhotline.quality.tables import QualityCheck, QualityReview
from recordings.records import CallRecordStore, KeyServiceTimestamper, RecordSealer, verify_records
from routing.statistics import StatsSettings
from tests.unit.recordings.helpers import (
    AGENT,
    start_call,
)

RULES = load_rules(Path(__file__).parents[3] / "dialplans" / "quality" / "rules.yaml")
T0 = datetime(2026, 12, 5, 1, 0, tzinfo=UTC)
SETTINGS = StatsSettings()
KEY = b"q" * 32
REASON = "monthly quality review of consults"
SCORES = "greeting=4,accuracy=5,empathy=4,safety=5"


def _call(engine: Engine, *, category: str, agent: str | None, wait: float, end: float | None,
          outcome: str = "completed") -> str:  # fmt: skip
    calls = db.CallRepository.for_engine(engine)
    call_id = str(uuid.uuid4())
    calls.start(call_id=call_id, node="n1", transport="ari", channel_id=f"ch-{call_id[:8]}",
                channel_name="PJSIP/trunk-1", flow="hotline", flow_version=None, started_at=T0)  # fmt: skip
    calls.add_step(call_id, flow="queue", node="queued", node_type="queue", edge=category, input="normal", at=T0,
                   moves_last_step=False)  # fmt: skip
    if agent is not None:
        calls.add_step(call_id, flow="queue", node="answered", node_type="queue", edge=agent, input=None,
                       at=T0 + timedelta(seconds=wait), moves_last_step=False)  # fmt: skip
    if end is not None:
        calls.finish(call_id, outcome=outcome, ended_at=T0 + timedelta(seconds=end),  # type: ignore[arg-type]
                     route_category=category, route_priority="normal")  # fmt: skip
    return call_id


def test_every_finished_call_is_checked_once_and_flagged_ones_queue_first(engine: Engine) -> None:
    accounts = AccountStore.for_engine(engine)
    accounts.add("nur.one", "Nurse", ["nurse"], T0)
    accounts.add("doc.one", "Physician", ["physician"], T0)
    accounts.add("sup.one", "Supervisor", ["supervisor"], T0)
    nurse_diagnosis = _call(engine, category="diagnosis", agent="nur.one", wait=5, end=300)
    physician_diagnosis = _call(engine, category="diagnosis", agent="doc.one", wait=5, end=300)
    abandoned = _call(engine, category="general", agent=None, wait=0, end=30, outcome="caller_hangup")
    ongoing = _call(engine, category="general", agent="doc.one", wait=5, end=None)
    # A note for the physician's call: only the nurse's lacks one.
    with Session(engine) as session, session.begin():
        key = DataKey(purpose="call_records", version=1, wrapped=b"w" * 40, kek_version=1, created_at=T0)
        session.add(key)
        session.flush()
        key_id = key.id
    CallRecordStore.for_engine(engine).stage_note(physician_diagnosis, "doc.one", T0 + timedelta(seconds=320),
                                                  "not-a-real-token", key_id)  # fmt: skip

    run = check_calls(engine, RULES, SETTINGS, KEY, T0 + timedelta(hours=1))
    assert (run.checked, run.flagged) == (3, 2)
    assert check_calls(engine, RULES, SETTINGS, KEY, T0 + timedelta(hours=1)).checked == 0  # idempotent
    store = QualityStore.for_engine(engine)
    first = store.check_of(nurse_diagnosis)
    assert first is not None
    assert {f.rule for f in first.flags} == {"diagnosis_non_physician", "note_missing"}
    clean = store.check_of(physician_diagnosis)
    assert clean is not None
    assert clean.flags == ()
    assert clean.for_review == in_sample(physician_diagnosis, KEY, 0.05)
    queue = store.queue()
    assert queue[0].call_id == nurse_diagnosis  # the critical flag first
    assert abandoned in [e.call_id for e in queue]
    assert {f.rule for e in queue if e.call_id == abandoned for f in e.flags} == {"abandoned_in_queue"}
    # A call that finishes later is checked by the next run, and --since leaves older ones alone.
    db.CallRepository.for_engine(engine).finish(ongoing, outcome="completed", ended_at=T0 + timedelta(hours=2),
                                                route_category="general", route_priority="normal")  # fmt: skip
    assert check_calls(engine, RULES, SETTINGS, KEY, T0, since=T0 + timedelta(hours=3)).checked == 0
    assert check_calls(engine, RULES, SETTINGS, KEY, T0, since=T0 + timedelta(hours=1)).checked == 1
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(QualityCheck)) == 4


@pytest.fixture
def sealer(sessions: sessionmaker[Session], keys: KeyServiceClient, audit: AuditLog, engine: Engine) -> RecordSealer:
    ring = DataKeyRing(DataKeyStore.for_engine(engine), keys, audit=audit)
    return RecordSealer(sessions, keys, KeyServiceTimestamper(keys), ring, audit=audit)


async def _reviewable(engine: Engine, sealer: RecordSealer) -> str:
    accounts = AccountStore.for_engine(engine)
    accounts.add("sup.one", "Supervisor", ["supervisor"], T0)
    accounts.add("nur.one", "Nurse", ["nurse"], T0)
    call_id = start_call(engine, agent=AGENT)
    assert await sealer.seal_call_summary(call_id, []) is not None
    everything = RULES.__class__(RULES.path, 1.0, RULES.rules, RULES.form)  # sample every call
    assert check_calls(engine, everything, SETTINGS, KEY, datetime.now(UTC)).queued == 1
    return call_id


async def test_a_review_is_sealed_as_a_signed_amendment_that_verifies(
    engine: Engine, sealer: RecordSealer, keys: KeyServiceClient, audit: AuditLog, store_dir: Path
) -> None:
    call_id = await _reviewable(engine, sealer)
    scores = parse_scores(SCORES, RULES.form)
    sealed = await review_call(engine, sealer, audit, RULES, call_id=call_id, scores=scores, reviewer="sup.one",
                               reason=REASON, now=datetime.now(UTC))  # fmt: skip
    record = sealer.records.get(sealed.id)
    summary = sealer.records.summary_of(call_id)
    assert record is not None
    assert summary is not None
    assert (record.kind, record.amends) == ("amendment", summary.id)
    body = json.loads(await sealer.body(record))
    assert body["quality_review"]["scores"] == scores
    assert body["quality_review"]["reviewer"] == "sup.one"
    checks = {c.record_id: c for c in await verify_records(sealer, keys, store_dir, call_id=call_id)}
    assert checks[sealed.id].ok, checks[sealed.id].problems
    assert QualityStore.for_engine(engine).reviewed(call_id) == sealed.id
    assert QualityStore.for_engine(engine).queue() == []
    entries = list(SqlAuditStore(engine).entries())
    assert any(e.actor == "sup.one" and e.action == "change" and e.outcome == "success" for e in entries)
    assert any(e.actor == "sup.one" and e.action == "sign" for e in entries)
    with pytest.raises(QualityError, match="reviewed already"):
        await review_call(engine, sealer, audit, RULES, call_id=call_id, scores=scores, reviewer="sup.one",
                          reason=REASON, now=datetime.now(UTC))  # fmt: skip


async def test_a_nurse_may_not_review_and_nothing_is_sealed(
    engine: Engine, sealer: RecordSealer, audit: AuditLog
) -> None:
    call_id = await _reviewable(engine, sealer)
    before = len(sealer.records.for_call(call_id))
    with pytest.raises(AccessDenied):
        await review_call(engine, sealer, audit, RULES, call_id=call_id, scores=parse_scores(SCORES, RULES.form),
                          reviewer="nur.one", reason=REASON, now=datetime.now(UTC))  # fmt: skip
    assert len(sealer.records.for_call(call_id)) == before
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(QualityReview)) == 0
    refused = [e for e in SqlAuditStore(engine).entries() if e.actor == "nur.one"]
    assert [(e.action, e.outcome) for e in refused] == [("denied", "denied")]


async def test_a_review_without_reason_or_of_an_unchecked_call_is_refused(
    engine: Engine, sealer: RecordSealer, audit: AuditLog
) -> None:
    call_id = await _reviewable(engine, sealer)
    scores = parse_scores(SCORES, RULES.form)
    with pytest.raises(Exception, match="reason"):
        await review_call(engine, sealer, audit, RULES, call_id=call_id, scores=scores, reviewer="sup.one",
                          reason=" ", now=datetime.now(UTC))  # fmt: skip
    with pytest.raises(QualityError, match="not been checked"):
        await review_call(engine, sealer, audit, RULES, call_id="no-such-call", scores=scores, reviewer="sup.one",
                          reason=REASON, now=datetime.now(UTC))  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("greeting=4,accuracy=5,empathy=4", "missing safety"),
        ("greeting=4,accuracy=5,empathy=4,safety=9", "outside the scale 1..5"),
        ("greeting=4,accuracy=5,empathy=4,safety=x", "not a whole number"),
        ("greeting=4,greeting=4,accuracy=5,empathy=4,safety=5", "given twice"),
        ("tone=3,greeting=4,accuracy=5,empathy=4,safety=5", "unknown criterion 'tone'"),
        ("greeting", "criterion=score"),
    ],
)
def test_scores_are_checked_against_the_form(text: str, expected: str) -> None:
    with pytest.raises(QualityError, match=expected):
        parse_scores(text, RULES.form)


def test_the_sample_key_is_created_once_private(tmp_path: Path) -> None:
    path = tmp_path / "quality" / "sample.key"
    key = sample_key(path)
    assert len(key) == 32
    assert sample_key(path) == key
    assert path.stat().st_mode & 0o777 == 0o600
