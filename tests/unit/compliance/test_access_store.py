"""AccessControl against a real database (SQLite and PostgreSQL): no cache, break-glass, freezing, the audit trail.

Times are passed explicitly (``at``), so expiry is tested with a fake clock, never by sleeping.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
from alembic import command
from sqlalchemy import Engine, inspect, text

from compliance.access import AccessError, Resource
from compliance.access_store import (
    AccessAuditFailed,
    AccessControl,
    AccessDenied,
    Actor,
    BreakGlassError,
    freeze_account,
)
from compliance.accounts import AccountError
from compliance.audit import AuditEntry, AuditError, AuditLog, MemoryAuditStore, SqlAuditStore, StoredEntry
from ground import db

T0: Final = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
P: Final = "ab" * 16  # an opaque hex patient id (its own audit reference)
P2: Final = "cd" * 16
PHONE: Final = "13812345678"
OP: Final = Actor.operator("root")


def _at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    db.upgrade(url)
    engine = db.make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def ac(engine: Engine) -> AccessControl:
    control = AccessControl.for_engine(engine)
    control.add_account("dr.li", "Li Na", ["physician"], T0, actor=OP, departments=["cardiology"])
    control.add_account("nurse.wu", "Wu Fang", ["nurse"], T0, actor=OP, departments=["cardiology"])
    control.add_account("ag.wang", "Wang Lei", ["agent"], T0, actor=OP)
    control.add_account("sup.chen", "Chen Jie", ["supervisor"], T0, actor=OP, departments=["cardiology"])
    control.add_account("adm.zhao", "Zhao Min", ["admin"], T0, actor=OP)
    control.add_account("aud.sun", "Sun Yu", ["auditor"], T0, actor=OP)
    return control


def _entries(engine: Engine) -> list[AuditEntry]:
    return [row.to_entry() for row in SqlAuditStore(engine).entries()]


def _since(engine: Engine, start: int) -> list[AuditEntry]:
    return [e for e in _entries(engine) if e.seq >= start]


def _note(patient: str = P, department: str = "cardiology") -> Resource:
    return Resource("clinical_note", patient, department)


# --- no cache: changes are effective on the very next request --------------------------------------------------


def test_a_revoked_role_is_refused_on_the_next_check(ac: AccessControl, engine: Engine) -> None:
    assert ac.check("dr.li", "change", _note(), _at(1)).allowed
    ac.set_roles("dr.li", ["nurse"], _at(2), actor=OP)
    decision = ac.check("dr.li", "change", _note(), _at(2))
    assert not decision.allowed
    assert decision.denial == "not_permitted"
    assert ac.check("dr.li", "read", _note(), _at(2)).allowed  # still a nurse of cardiology


def test_a_removed_department_is_refused_on_the_next_check(ac: AccessControl) -> None:
    assert ac.check("nurse.wu", "read", _note(), _at(1)).allowed
    ac.set_departments("nurse.wu", ["oncology"], _at(2), actor=OP)
    decision = ac.check("nurse.wu", "read", _note(), _at(2))
    assert not decision.allowed
    assert decision.denial == "out_of_scope"


def test_a_frozen_account_is_refused_on_the_next_check_on_every_node(ac: AccessControl, engine: Engine) -> None:
    other_node = AccessControl.for_engine(engine)  # a second service node over the same database
    assert other_node.check("dr.li", "read", _note(), _at(1)).allowed
    freeze_account(engine, "dr.li", "left the hospital", OP, _at(2))
    for node in (ac, other_node):
        decision = node.check("dr.li", "read", _note(), _at(2))
        assert not decision.allowed
        assert decision.denial == "frozen"
    with pytest.raises(AccessDenied, match=r"dr\.li \(physician\) may not read clinical_note: the account is frozen"):
        other_node.authorize("dr.li", "read", _note(), _at(2))


def test_a_new_assignment_and_its_end_take_effect_at_once(ac: AccessControl) -> None:
    away = _note(department="oncology")
    assert not ac.check("dr.li", "read", away, _at(1)).allowed
    ac.assign_patient("dr.li", P, _at(2), actor=Actor.account("sup.chen"))
    assert ac.check("dr.li", "read", away, _at(2)).basis == "assigned"
    assert ac.unassign_patient("dr.li", P, _at(3), actor=OP) == 1
    assert not ac.check("dr.li", "read", away, _at(3)).allowed


def test_call_assignment_gives_the_agent_the_caller_for_the_call_only(ac: AccessControl) -> None:
    identity = Resource("patient_identity", P)
    assert not ac.check("ag.wang", "read", identity, _at(0)).allowed
    ac.begin_call_assignment("ag.wang", P, "call-7", _at(1))
    assert ac.check("ag.wang", "read", identity, _at(2)).basis == "current_call"
    assert ac.check("ag.wang", "change", Resource("call_record", P, call_id="call-7"), _at(2)).allowed
    assert not ac.check("ag.wang", "read", Resource("call_record", P, call_id="call-6"), _at(2)).allowed
    assert not ac.check("ag.wang", "read", Resource("patient_identity", P2), _at(2)).allowed
    assert ac.end_call_assignment("call-7", _at(3)) == 1
    assert ac.end_call_assignment("call-7", _at(4)) == 0
    decision = ac.check("ag.wang", "read", identity, _at(3))
    assert not decision.allowed
    assert decision.denial == "out_of_scope"


def test_a_frozen_or_unknown_agent_gets_no_call_assignment(ac: AccessControl, engine: Engine) -> None:
    freeze_account(engine, "ag.wang", "suspended pending review", OP, _at(1))
    start = len(_entries(engine))
    with pytest.raises(AccessDenied, match=re.escape("call_assignment by ag.wang refused: the account is frozen")):
        ac.begin_call_assignment("ag.wang", P, "call-8", _at(2))
    with pytest.raises(AccessDenied, match="there is no such account"):
        ac.begin_call_assignment("ag.nobody", P, "call-9", _at(2))
    denied = _since(engine, start)
    assert [(e.actor, e.action, e.details["attempted"]) for e in denied] == [
        ("ag.wang", "denied", "call_assignment"),
        ("ag.nobody", "denied", "call_assignment"),
    ]
    assert ac.assignments("ag.wang") == []


# --- break-glass ----------------------------------------------------------------------------------------------


def test_break_glass_opens_expires_and_is_swept_and_audited(ac: AccessControl, engine: Engine) -> None:
    away = _note(department="oncology")
    assert not ac.check("nurse.wu", "read", away, _at(0)).allowed
    start = len(_entries(engine))
    grant = ac.open_break_glass("nurse.wu", "patient collapsed on the line, need allergies", _at(0), patient_id=P)
    assert grant.expires_at == _at(60)
    assert grant.is_open(_at(59))
    decision = ac.check("nurse.wu", "read", away, _at(59))
    assert decision.allowed
    assert decision.basis == "break_glass"
    assert decision.grant_id == grant.id
    # Break-glass extends reading only.
    assert not ac.check("nurse.wu", "change", Resource("call_record", P, "oncology"), _at(30)).allowed
    # Expired at 60 minutes, before any sweep ran.
    assert not ac.check("nurse.wu", "read", away, _at(60)).allowed
    swept = ac.sweep_break_glass(_at(75))
    assert [g.id for g in swept] == [grant.id]
    assert swept[0].closed_at == _at(60)
    assert swept[0].close_reason == "expired"
    assert ac.sweep_break_glass(_at(90)) == []  # nothing twice
    entries = _since(engine, start)
    start_entry, end_entry = entries[0], entries[-1]
    assert (start_entry.action, start_entry.actor, start_entry.role, start_entry.patient) == (
        "break_glass_start", "nurse.wu", "nurse", P,
    )  # fmt: skip
    assert start_entry.reason == "patient collapsed on the line, need allergies"
    assert start_entry.details["grant"] == grant.id
    assert start_entry.details["minutes"] == 60
    assert (end_entry.action, end_entry.actor, end_entry.reason, end_entry.patient) == (
        "break_glass_end", "medhotline", "expired", P,
    )  # fmt: skip
    assert [e.action for e in entries].count("break_glass_end") == 1


def test_a_department_grant_covers_that_department_only(ac: AccessControl) -> None:
    ac.open_break_glass("dr.li", "mass casualty event in the emergency room", _at(0), department="emergency",
                        minutes=240)  # fmt: skip
    assert ac.check("dr.li", "read", _note(P2, "emergency"), _at(239)).basis == "break_glass"
    assert not ac.check("dr.li", "read", _note(P2, "oncology"), _at(1)).allowed
    assert not ac.check("dr.li", "read", _note(P2, "emergency"), _at(240)).allowed


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"reason": ""}, AccessError, "break-glass reason is required"),
        ({"reason": "urgent"}, AccessError, "at least 10 characters"),
        ({"reason": f"caller {PHONE} collapsed"}, AccessError, "looks like a phone"),
        ({"department": "emergency"}, BreakGlassError, "exactly one patient or one department"),
        ({"patient_id": None}, BreakGlassError, "exactly one patient or one department"),
        ({"minutes": 0}, BreakGlassError, "1 to 240 minutes, not 0"),
        ({"minutes": 241}, BreakGlassError, "1 to 240 minutes, not 241"),
        ({"patient_id": PHONE}, AccessError, "not an opaque registry id"),
    ],
)
def test_bad_break_glass_requests_are_refused_and_nothing_is_stored(
    ac: AccessControl, engine: Engine, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    start = len(_entries(engine))
    args: dict[str, object] = {"reason": "patient unconscious, history needed", "patient_id": P, **kwargs}
    reason = str(args.pop("reason"))
    with pytest.raises(error, match=message) as caught:
        ac.open_break_glass("dr.li", reason, _at(0), **args)  # type: ignore[arg-type]
    assert PHONE not in str(caught.value)
    assert ac.list_break_glass() == []
    assert len(_entries(engine)) == start


@pytest.mark.parametrize(
    ("account", "why"),
    [
        ("adm.zhao", "administrators get no patient data and cannot break glass"),
        ("aud.sun", "no role of the account (auditor) may break glass"),
        ("no.such", "there is no such account"),
    ],
)
def test_who_may_not_break_glass_is_refused_and_audited(
    ac: AccessControl, engine: Engine, account: str, why: str
) -> None:
    start = len(_entries(engine))
    with pytest.raises(AccessDenied, match=re.escape(why)):
        ac.open_break_glass(account, "emergency review of a record", _at(0), patient_id=P)
    (entry,) = _since(engine, start)
    assert (entry.actor, entry.action, entry.outcome, entry.patient) == (account, "denied", "denied", P)
    assert entry.details == {"attempted": "break_glass_start", "why": why}
    assert ac.list_break_glass() == []


def test_closing_a_grant_by_holder_supervisor_or_operator_but_not_a_colleague(
    ac: AccessControl, engine: Engine
) -> None:
    grants = [ac.open_break_glass("dr.li", "deteriorating patient, need history", _at(0), patient_id=P)
              for _ in range(3)]  # fmt: skip
    start = len(_entries(engine))
    with pytest.raises(
        AccessDenied, match=re.escape("break_glass_end by nurse.wu refused: it needs the role admin or supervisor")
    ):
        ac.close_break_glass(grants[0].id, _at(5), "not needed", actor=Actor.account("nurse.wu"))
    closed = ac.close_break_glass(grants[0].id, _at(5), "patient stable now")
    assert (closed.closed_at, closed.close_reason, closed.closed_by) == (_at(5), "patient stable now", "dr.li")
    assert ac.close_break_glass(grants[1].id, _at(6), "wrong patient", actor=Actor.account("sup.chen")).closed_by == (
        "sup.chen"
    )
    assert ac.close_break_glass(grants[2].id, _at(7), "shift over", actor=OP).closed_by == "os:root"
    with pytest.raises(BreakGlassError, match=f"break-glass grant {grants[0].id} is already closed"):
        ac.close_break_glass(grants[0].id, _at(8), "again")
    with pytest.raises(BreakGlassError, match="not a break-glass grant id"):
        ac.close_break_glass("17", _at(8), "again")
    with pytest.raises(BreakGlassError, match="no break-glass grant bg-aaaaaaaaaaaa"):
        ac.close_break_glass("bg-aaaaaaaaaaaa", _at(8), "again")
    actions = [(e.actor, e.action) for e in _since(engine, start)]
    assert actions == [
        ("nurse.wu", "denied"),
        ("dr.li", "break_glass_end"),
        ("sup.chen", "break_glass_end"),
        ("os:root", "break_glass_end"),
    ]
    assert not ac.check("dr.li", "read", _note(department="oncology"), _at(9)).allowed


def test_supervisor_review_of_break_glass(ac: AccessControl, engine: Engine) -> None:
    mine = ac.open_break_glass("sup.chen", "quality review of an emergency call", _at(0), patient_id=P)
    theirs = ac.open_break_glass("dr.li", "patient unconscious, history needed", _at(1), patient_id=P2)
    assert [g.id for g in ac.pending_reviews()] == [mine.id, theirs.id]
    start = len(_entries(engine))
    with pytest.raises(AccessDenied, match="nobody reviews their own break-glass"):
        ac.review_break_glass(mine.id, "sup.chen", _at(2), "justified")
    with pytest.raises(AccessDenied, match="it needs the role supervisor"):
        ac.review_break_glass(theirs.id, "nurse.wu", _at(2), "justified")
    with pytest.raises(BreakGlassError, match="verdict 'fine'"):
        ac.review_break_glass(theirs.id, "sup.chen", _at(2), "fine")  # type: ignore[arg-type]
    reviewed = ac.review_break_glass(theirs.id, "sup.chen", _at(3), "unjustified")
    assert (reviewed.reviewed_by, reviewed.reviewed_at, reviewed.review_verdict) == ("sup.chen", _at(3), "unjustified")
    assert reviewed.is_open(_at(3))  # a review does not close the grant
    with pytest.raises(BreakGlassError, match="already reviewed"):
        ac.review_break_glass(theirs.id, "sup.chen", _at(4), "justified")
    assert [g.id for g in ac.pending_reviews()] == [mine.id]
    entries = _since(engine, start)
    assert [(e.actor, e.action) for e in entries] == [("sup.chen", "denied"), ("nurse.wu", "denied"),
                                                      ("sup.chen", "change")]  # fmt: skip
    assert entries[-1].details == {"object": "break_glass_grant", "grant": theirs.id, "holder": "dr.li",
                                   "verdict": "unjustified"}  # fmt: skip


# --- freezing -------------------------------------------------------------------------------------------------


def test_freezing_closes_grants_sessions_and_calls_at_once_and_audits(ac: AccessControl, engine: Engine) -> None:
    session = ac.open_session("dr.li", _at(0))
    open_grant = ac.open_break_glass("dr.li", "patient unconscious, history needed", _at(0), patient_id=P)
    lapsed = ac.open_break_glass("dr.li", "second emergency, history needed", _at(0), patient_id=P2, minutes=5)
    ac.begin_call_assignment("dr.li", P, "call-1", _at(1))
    assert ac.check("dr.li", "read", _note(department="oncology"), _at(6), session_id=session.id).allowed
    start = len(_entries(engine))
    result = freeze_account(engine, "dr.li", "left the hospital", Actor.account("adm.zhao"), _at(10))
    assert result.account.frozen
    assert result.account.session_epoch == 1
    assert sorted(result.grants_closed) == sorted([open_grant.id, lapsed.id])
    assert (result.sessions_closed, result.calls_ended) == (1, 1)
    by_id = {g.id: g for g in ac.list_break_glass(account_id="dr.li")}
    assert (by_id[open_grant.id].closed_at, by_id[open_grant.id].close_reason) == (_at(10), "account frozen")
    assert (by_id[lapsed.id].closed_at, by_id[lapsed.id].close_reason) == (_at(5), "expired")
    assert ac.assignments("dr.li", _at(10)) == []
    entries = _since(engine, start)
    assert entries[0].action == "account_freeze"
    assert entries[0].actor == "adm.zhao"
    assert entries[0].role == "admin"
    assert entries[0].reason == "left the hospital"
    assert entries[0].details == {"account": "dr.li", "epoch": 1, "grants_closed": 2, "sessions_closed": 1,
                                  "calls_ended": 1}  # fmt: skip
    assert sorted(e.details["grant"] for e in entries[1:] if e.action == "break_glass_end") == sorted(  # type: ignore[type-var]
        [open_grant.id, lapsed.id]
    )
    # Unfrozen, the old session and grants stay dead: they belong to the epoch before the freeze.
    ac.unfreeze("dr.li", "returned from leave", _at(20), actor=OP)
    stale = ac.check("dr.li", "read", _note(), _at(21), session_id=session.id)
    assert not stale.allowed
    assert stale.denial == "stale_session"
    assert ac.check("dr.li", "read", _note(), _at(21)).allowed
    assert not ac.check("dr.li", "read", _note(department="oncology"), _at(21)).allowed


def test_freeze_needs_a_reason_and_a_known_account(ac: AccessControl, engine: Engine) -> None:
    with pytest.raises(AccessError, match="freeze reason is required"):
        freeze_account(engine, "dr.li", "  ", OP, _at(1))
    with pytest.raises(AccountError, match=re.escape("no account 'dr.nobody'")):
        freeze_account(engine, "dr.nobody", "left the hospital", OP, _at(1))
    assert not ac.accounts.get("dr.li").frozen


def test_sessions_login_logout_and_frozen_login(ac: AccessControl, engine: Engine) -> None:
    session = ac.open_session("nurse.wu", _at(0), hours=8)
    assert ac.check("nurse.wu", "read", _note(), _at(1), session_id=session.id).allowed
    assert not ac.check("nurse.wu", "read", _note(), _at(8 * 60), session_id=session.id).allowed  # expired
    assert not ac.check("dr.li", "read", _note(), _at(1), session_id=session.id).allowed  # someone else's
    assert not ac.check("nurse.wu", "read", _note(), _at(1), session_id="s-" + "x" * 32).allowed
    assert ac.close_session(session.id, _at(2))
    assert not ac.close_session(session.id, _at(3))
    assert ac.check("nurse.wu", "read", _note(), _at(3), session_id=session.id).denial == "stale_session"
    freeze_account(engine, "nurse.wu", "left the hospital", OP, _at(4))
    with pytest.raises(AccessDenied, match=re.escape("login by nurse.wu refused: the account is frozen")):
        ac.open_session("nurse.wu", _at(5))
    assert [e.action for e in _entries(engine) if e.actor == "nurse.wu" and e.action in ("login", "logout")] == [
        "login", "logout",
    ]  # fmt: skip


# --- the audit trail ------------------------------------------------------------------------------------------


def test_every_decision_on_patient_data_is_audited_with_its_fields(ac: AccessControl, engine: Engine) -> None:
    start = len(_entries(engine))
    ac.check("nurse.wu", "read", _note(), _at(1))
    ac.check("nurse.wu", "change", _note(), _at(2))  # only physicians change notes
    ac.check("nurse.wu", "read", Resource("recording", P, "cardiology"), _at(3))  # reason required
    ac.check("ag.wang", "read", Resource("patient_identity", P2), _at(4))  # not on a call
    ac.check("adm.zhao", "read", Resource("patient_identity", P, "cardiology"), _at(5))
    ac.check("dr.li", "delete", _note(), _at(6))
    ac.check("dr.li", "export", _note(), _at(7), reason="referral to the heart surgery team")
    entries = _since(engine, start)
    assert [(e.actor, e.role, e.action, e.outcome, e.patient) for e in entries] == [
        ("nurse.wu", "nurse", "read", "success", P),
        ("nurse.wu", "nurse", "denied", "denied", P),
        ("nurse.wu", "nurse", "denied", "denied", P),
        ("ag.wang", "agent", "denied", "denied", P2),
        ("adm.zhao", "admin", "denied", "denied", P),
        ("dr.li", "physician", "denied", "denied", P),
        ("dr.li", "physician", "export", "success", P),
    ]
    assert entries[0].details == {"kind": "clinical_note", "roles": ["nurse"], "department": "cardiology",
                                  "basis": "department"}  # fmt: skip
    denied = entries[1:6]
    assert [(e.details["attempted"], e.details["why"]) for e in denied] == [
        ("change", "not_permitted"),
        ("read", "reason_required"),
        ("read", "out_of_scope"),
        ("read", "admin_no_patient_data"),
        ("delete", "not_permitted"),
    ]
    assert entries[-1].reason == "referral to the heart surgery team"


def test_denied_attempts_on_non_patient_records_are_audited_allowed_admin_reads_are_not(
    ac: AccessControl, engine: Engine
) -> None:
    start = len(_entries(engine))
    assert ac.check("adm.zhao", "read", Resource("flow_admin"), _at(1)).allowed
    assert not ac.check("adm.zhao", "read", Resource("audit_log"), _at(1)).allowed
    assert ac.check("aud.sun", "read", Resource("audit_log"), _at(1)).allowed
    assert not ac.check("aud.sun", "export", Resource("audit_log"), _at(1)).allowed
    assert ac.check("aud.sun", "export", Resource("audit_log"), _at(1), reason="quarterly external audit").allowed
    entries = _since(engine, start)
    assert [(e.actor, e.action, e.patient) for e in entries] == [
        ("adm.zhao", "denied", None),
        ("aud.sun", "read", None),
        ("aud.sun", "denied", None),
        ("aud.sun", "export", None),
    ]


def test_no_patient_identifier_in_audit_entries_messages_or_database(
    ac: AccessControl, engine: Engine, url: str, tmp_path: Path
) -> None:
    name = "Zhang Sanfeng"
    # A reason holding a phone number is refused, and not recorded.
    decision = ac.check("dr.li", "read", _note(), _at(1), reason=f"caller {PHONE} asked for results")
    assert not decision.allowed
    assert decision.denial == "reason_rejected"
    assert PHONE not in decision.explanation
    with pytest.raises(AccessDenied) as caught:
        ac.authorize("dr.li", "read", _note(), _at(1), reason=f"call back {PHONE} today")
    assert PHONE not in str(caught.value)
    assert P not in str(caught.value)
    # An account id that is really a phone number, or a patient id that is a phone number or a name.
    assert ac.check(PHONE, "read", _note(), _at(2)).denial == "unknown_account"
    for bad in (PHONE, name):
        with pytest.raises(AccessError) as error:
            ac.check("dr.li", "read", Resource("patient_identity", bad), _at(3))
        assert bad not in str(error.value)
        with pytest.raises(AccessError) as error:
            ac.begin_call_assignment("ag.wang", bad, "call-1", _at(3))
        assert bad not in str(error.value)
    with pytest.raises(AccessDenied) as denied:
        ac.authorize("ag.wang", "read", Resource("patient_identity", P), _at(4))
    assert P not in str(denied.value)
    entries = _entries(engine)
    rejected = [e for e in entries if e.details.get("reason_rejected")]
    assert len(rejected) == 2
    assert all(e.reason == "" for e in rejected)
    assert any(e.actor == "unknown-account" and e.action == "denied" for e in entries)
    for row in SqlAuditStore(engine).entries():
        assert PHONE not in row.canonical().decode()
        assert name not in row.canonical().decode()
    # Nowhere in the database either (the SQLite file and its WAL, or every text column on PostgreSQL).
    if url.startswith("sqlite"):
        engine.dispose()
        blob = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir() if p.name.startswith("medhotline.db"))
        assert PHONE.encode() not in blob
        assert name.encode() not in blob
    else:
        with engine.connect() as connection:
            dump = str(connection.execute(text("SELECT * FROM audit_entries")).all())
            dump += str(connection.execute(text("SELECT * FROM break_glass_grants")).all())
            dump += str(connection.execute(text("SELECT * FROM patient_assignments")).all())
        assert PHONE not in dump
        assert name not in dump


class _BrokenStore(MemoryAuditStore):
    def append_next(self, build: Callable[[int], StoredEntry]) -> StoredEntry:
        raise AuditError("audit disk full")


def test_no_audit_entry_no_access(engine: Engine) -> None:
    working = AccessControl.for_engine(engine)
    working.add_account("dr.li", "Li Na", ["physician"], T0, actor=OP, departments=["cardiology"])
    broken = AccessControl.for_engine(engine, AuditLog(_BrokenStore()))
    with pytest.raises(
        AccessAuditFailed, match=re.escape("read of clinical_note by dr.li: refused, the audit log could not")
    ):
        broken.check("dr.li", "read", _note(), _at(1))
    with pytest.raises(AccessAuditFailed, match="audit disk full"):
        broken.open_break_glass("dr.li", "patient unconscious, history needed", _at(1), patient_id=P)
    assert broken.list_break_glass() == []  # audited first: no grant without its entry
    with pytest.raises(AccessAuditFailed):
        broken.assign_patient("dr.li", P, _at(1), actor=OP)
    assert broken.assignments("dr.li") == []
    # A freeze holds even if its audit entry cannot be written (and says so).
    with pytest.raises(AccessAuditFailed, match=re.escape("account dr.li IS frozen, but recording the freeze")):
        broken.freeze("dr.li", "left the hospital", _at(2), actor=OP)
    assert working.accounts.get("dr.li").frozen


def test_record_allowed_false_leaves_allowed_reads_to_the_caller_but_audits_denials(
    ac: AccessControl, engine: Engine
) -> None:
    start = len(_entries(engine))
    assert ac.check("dr.li", "read", _note(), _at(1), record_allowed=False).allowed
    assert not ac.check("dr.li", "read", _note(department="oncology"), _at(1), record_allowed=False).allowed
    assert [e.action for e in _since(engine, start)] == ["denied"]


@dataclass(frozen=True)
class _Ref:
    blind_id: str
    department: str | None


class _Registry:
    """A fake of the registry's PatientStore.ref: registry ids are UUIDs, the audit log sees blind ids."""

    def __init__(self) -> None:
        self.refs: dict[str, _Ref] = {}

    def ref(self, patient_id: str) -> _Ref:
        return self.refs[patient_id]


def test_registry_ids_are_audited_by_blind_id_and_give_the_patients_department(engine: Engine) -> None:
    registry = _Registry()
    patient = str(uuid.uuid4())
    blind = "ef" * 32
    registry.refs[patient] = _Ref(blind, "cardiology")
    control = AccessControl.for_engine(engine, patients=registry)
    control.add_account("nurse.wu", "Wu Fang", ["nurse"], T0, actor=OP, departments=["cardiology"])
    start = len(_entries(engine))
    decision = control.check("nurse.wu", "read", Resource("patient_identity", patient), _at(1))
    assert decision.allowed
    assert decision.basis == "department"
    grant = control.open_break_glass("nurse.wu", "verifying a transferred patient", _at(2), patient_id=patient)
    control.close_break_glass(grant.id, _at(3), "done checking")
    entries = _since(engine, start)
    assert [e.patient for e in entries] == [blind, blind, blind]
    assert all(patient not in e.canonical().decode() for e in entries)
    # Without the registry, a registry id cannot be audited: refused, not audited under another name.
    bare = AccessControl.for_engine(engine)
    with pytest.raises(AccessError, match="the audit log names a patient by blind id"):
        bare.check("nurse.wu", "read", Resource("patient_identity", patient, "cardiology"), _at(4))
    explicit = Resource("patient_identity", patient, "cardiology", audit_ref=blind)
    assert bare.check("nurse.wu", "read", explicit, _at(4)).allowed


def test_registering_a_new_patient_is_by_role(ac: AccessControl, engine: Engine) -> None:
    start = len(_entries(engine))
    ac.authorize_new_patient("ag.wang", _at(1))
    ac.authorize_new_patient("dr.li", _at(1))
    for account, why in (("sup.chen", "may register patients"), ("adm.zhao", "administrators get no patient data")):
        with pytest.raises(AccessDenied, match=why):
            ac.authorize_new_patient(account, _at(1))
    assert [(e.actor, e.action, e.details["attempted"]) for e in _since(engine, start)] == [
        ("sup.chen", "denied", "create"),
        ("adm.zhao", "denied", "create"),
    ]


# --- account administration ---------------------------------------------------------------------------------


def test_permission_changes_are_audited_with_before_and_after(ac: AccessControl, engine: Engine) -> None:
    start = len(_entries(engine))
    ac.set_roles("nurse.wu", ["nurse", "supervisor"], _at(1), actor=Actor.account("adm.zhao"))
    ac.set_departments("nurse.wu", ["cardiology", "emergency"], _at(2), actor=OP)
    roles, departments = _since(engine, start)
    assert (roles.actor, roles.role, roles.action) == ("adm.zhao", "admin", "permission_change")
    assert roles.details == {"account": "nurse.wu", "change": "roles", "roles": ["nurse", "supervisor"],
                             "previous": ["nurse"]}  # fmt: skip
    assert (departments.actor, departments.role) == ("os:root", "operator")
    assert departments.details == {"account": "nurse.wu", "change": "departments",
                                   "departments": ["cardiology", "emergency"], "previous": ["cardiology"]}  # fmt: skip


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ac: ac.set_roles("nurse.wu", ["physician"], _at(1), actor=Actor.account("sup.chen")),
         "role_change by sup.chen refused: it needs the role admin"),
        (lambda ac: ac.set_roles("adm.zhao", ["physician"], _at(1), actor=Actor.account("adm.zhao")),
         "role_change by adm.zhao refused: an account may not change its own roles"),
        (lambda ac: ac.add_account("x.new", "New", ["agent"], _at(1), actor=Actor.account("dr.li")),
         "account_create by dr.li refused: it needs the role admin"),
        (lambda ac: ac.unfreeze("dr.li", "mistake", _at(1), actor=Actor.account("dr.li")),
         "account_unfreeze by dr.li refused: it needs the role admin"),
        (lambda ac: ac.freeze("dr.li", "left", _at(1), actor=Actor.account("nurse.wu")),
         "account_freeze by nurse.wu refused: it needs the role admin or supervisor"),
        (lambda ac: ac.assign_patient("dr.li", P, _at(1), actor=Actor.account("nurse.wu")),
         "patient_assignment by nurse.wu refused"),
    ],
)  # fmt: skip
def test_changes_by_an_account_without_the_role_are_refused_and_audited(
    ac: AccessControl, engine: Engine, call: Callable[[AccessControl], object], message: str
) -> None:
    before = {r.id: r for r in ac.accounts.list()}
    start = len(_entries(engine))
    with pytest.raises(AccessDenied, match=message):
        call(ac)
    (entry,) = _since(engine, start)
    assert entry.action == "denied"
    assert entry.outcome == "denied"
    assert {r.id: r for r in ac.accounts.list()} == before
    assert ac.assignments("dr.li") == []


def test_separation_of_duties_is_enforced_on_role_changes(ac: AccessControl) -> None:
    with pytest.raises(AccountError, match="role admin cannot be combined with physician"):
        ac.set_roles("adm.zhao", ["admin", "physician"], _at(1), actor=OP)
    with pytest.raises(AccountError, match="role auditor cannot be combined with supervisor"):
        ac.set_roles("aud.sun", ["auditor", "supervisor"], _at(1), actor=OP)
    assert ac.accounts.get("adm.zhao").roles == frozenset({"admin"})


# --- schema -----------------------------------------------------------------------------------------------------


def test_migration_creates_and_drops_the_access_tables(url: str) -> None:
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"patient_assignments", "break_glass_grants", "access_sessions"} <= tables
        columns = {c["name"] for c in inspect(engine).get_columns("break_glass_grants")}
        assert {"reason", "expires_at", "closed_at", "reviewed_by", "review_verdict", "account_epoch"} <= columns
        with engine.begin() as connection:
            config = db._alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "0006_patients")
        engine.dispose()
        remaining = set(inspect(engine).get_table_names())
        assert not {"patient_assignments", "break_glass_grants", "access_sessions"} & remaining
        assert "accounts" in remaining
    finally:
        engine.dispose()
    db.upgrade(url)
    assert db.current_revision(url) == db.head_revision()
