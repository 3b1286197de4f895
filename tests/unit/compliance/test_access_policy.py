"""The access policy, table-driven: every role × kind of record × action, in every kind of scope.

:data:`MATRIX` below is written out by hand, cell by cell, independently of ``compliance.access.RULES``: it is
the table a regulator reads, and the test checks the policy's behaviour against it in each scope variation
(in / out of department, assigned, assignment ended, on a call with the patient, this very call, call ended,
break-glass for the patient or the department, expired, closed, stale, for another patient, frozen account),
with and without a reason. Scope letters as in the module docstring: G global, D department, A assigned,
K current call, T this call, B break-glass; ``!`` reason required; ``-`` never.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Final

import pytest

import compliance.access as access
from compliance.access import (
    ACTIONS,
    PATIENT_KINDS,
    RECORD_KINDS,
    AccessError,
    Assignment,
    Context,
    Grant,
    Resource,
    Subject,
    break_glass_problem,
    decide,
    reason_problem,
)
from compliance.accounts import ROLES

T0: Final = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
PATIENT: Final = "ab" * 16
OTHER_PATIENT: Final = "cd" * 16
HOME: Final = "cardiology"
AWAY: Final = "emergency"
EPOCH: Final = 2
REASON: Final = "quality review of a flagged consult"

# fmt: off
MATRIX: Final[list[tuple[str, str, str, str, str, str]]] = [
    # role         kind                read         export    change    delete
    ("agent",      "patient_identity", "K B",       "-",      "K",      "-"),
    ("agent",      "clinical_note",    "T",         "-",      "-",      "-"),
    ("agent",      "transcript",       "T",         "-",      "-",      "-"),
    ("agent",      "recording",        "-",         "-",      "-",      "-"),
    ("agent",      "call_record",      "T",         "-",      "T",      "-"),
    ("agent",      "audit_log",        "-",         "-",      "-",      "-"),
    ("agent",      "agent_admin",      "-",         "-",      "-",      "-"),
    ("agent",      "key_admin",        "-",         "-",      "-",      "-"),
    ("agent",      "flow_admin",       "-",         "-",      "-",      "-"),
    ("agent",      "statistics",       "-",         "-",      "-",      "-"),
    ("agent",      "quality_review",   "-",         "-",      "-",      "-"),
    ("agent",      "supervision",      "-",         "-",      "-",      "-"),
    ("agent",      "complaint",        "-",         "-",      "-",      "-"),
    ("nurse",      "patient_identity", "D A K B",   "-",      "D A K",  "-"),
    ("nurse",      "clinical_note",    "D A K B",   "-",      "-",      "-"),
    ("nurse",      "transcript",       "D A K B",   "-",      "-",      "-"),
    ("nurse",      "recording",        "D A !",     "-",      "-",      "-"),
    ("nurse",      "call_record",      "D A K B",   "-",      "D A K",  "-"),
    ("nurse",      "audit_log",        "-",         "-",      "-",      "-"),
    ("nurse",      "agent_admin",      "-",         "-",      "-",      "-"),
    ("nurse",      "key_admin",        "-",         "-",      "-",      "-"),
    ("nurse",      "flow_admin",       "-",         "-",      "-",      "-"),
    ("nurse",      "statistics",       "-",         "-",      "-",      "-"),
    ("nurse",      "quality_review",   "-",         "-",      "-",      "-"),
    ("nurse",      "supervision",      "-",         "-",      "-",      "-"),
    ("nurse",      "complaint",        "D",         "-",      "D",      "-"),
    ("pharmacist", "patient_identity", "D A K B",   "-",      "D A K",  "-"),
    ("pharmacist", "clinical_note",    "D A K B",   "-",      "-",      "-"),
    ("pharmacist", "transcript",       "D A K B",   "-",      "-",      "-"),
    ("pharmacist", "recording",        "D A !",     "-",      "-",      "-"),
    ("pharmacist", "call_record",      "D A K B",   "-",      "D A K",  "-"),
    ("pharmacist", "audit_log",        "-",         "-",      "-",      "-"),
    ("pharmacist", "agent_admin",      "-",         "-",      "-",      "-"),
    ("pharmacist", "key_admin",        "-",         "-",      "-",      "-"),
    ("pharmacist", "flow_admin",       "-",         "-",      "-",      "-"),
    ("pharmacist", "statistics",       "-",         "-",      "-",      "-"),
    ("pharmacist", "quality_review",   "-",         "-",      "-",      "-"),
    ("pharmacist", "supervision",      "-",         "-",      "-",      "-"),
    ("pharmacist", "complaint",        "D",         "-",      "D",      "-"),
    ("physician",  "patient_identity", "D A K B",   "-",      "D A K",  "-"),
    ("physician",  "clinical_note",    "D A K B",   "D A !",  "D A K",  "-"),
    ("physician",  "transcript",       "D A K B",   "D A !",  "-",      "-"),
    ("physician",  "recording",        "D A !",     "-",      "-",      "-"),
    ("physician",  "call_record",      "D A K B",   "D A !",  "D A K",  "-"),
    ("physician",  "audit_log",        "-",         "-",      "-",      "-"),
    ("physician",  "agent_admin",      "-",         "-",      "-",      "-"),
    ("physician",  "key_admin",        "-",         "-",      "-",      "-"),
    ("physician",  "flow_admin",       "-",         "-",      "-",      "-"),
    ("physician",  "statistics",       "-",         "-",      "-",      "-"),
    ("physician",  "quality_review",   "-",         "-",      "-",      "-"),
    ("physician",  "supervision",      "-",         "-",      "-",      "-"),
    ("physician",  "complaint",        "D",         "-",      "D",      "-"),
    ("supervisor", "patient_identity", "D B",       "-",      "-",      "-"),
    ("supervisor", "clinical_note",    "D B",       "-",      "-",      "-"),
    ("supervisor", "transcript",       "D B",       "D !",    "-",      "-"),
    ("supervisor", "recording",        "D !",       "D !",    "-",      "-"),
    ("supervisor", "call_record",      "D B",       "D !",    "-",      "-"),
    ("supervisor", "audit_log",        "-",         "-",      "-",      "-"),
    ("supervisor", "agent_admin",      "D",         "-",      "-",      "-"),
    ("supervisor", "key_admin",        "-",         "-",      "-",      "-"),
    ("supervisor", "flow_admin",       "G",         "-",      "-",      "-"),
    ("supervisor", "statistics",       "G",         "G !",    "-",      "-"),
    ("supervisor", "quality_review",   "G",         "-",      "G !",    "-"),
    ("supervisor", "supervision",      "-",         "-",      "G !",    "-"),
    ("supervisor", "complaint",        "G",         "G !",    "G",      "-"),
    ("admin",      "patient_identity", "-",         "-",      "-",      "-"),
    ("admin",      "clinical_note",    "-",         "-",      "-",      "-"),
    ("admin",      "transcript",       "-",         "-",      "-",      "-"),
    ("admin",      "recording",        "-",         "-",      "-",      "-"),
    ("admin",      "call_record",      "-",         "-",      "-",      "-"),
    ("admin",      "audit_log",        "-",         "-",      "-",      "-"),
    ("admin",      "agent_admin",      "G",         "G !",    "G",      "-"),
    ("admin",      "key_admin",        "G",         "-",      "G",      "-"),
    ("admin",      "flow_admin",       "G",         "G !",    "G",      "G !"),
    ("admin",      "statistics",       "G",         "G !",    "-",      "-"),
    ("admin",      "quality_review",   "-",         "-",      "-",      "-"),
    ("admin",      "supervision",      "-",         "-",      "-",      "-"),
    ("admin",      "complaint",        "-",         "-",      "-",      "-"),
    ("auditor",    "patient_identity", "-",         "-",      "-",      "-"),
    ("auditor",    "clinical_note",    "-",         "-",      "-",      "-"),
    ("auditor",    "transcript",       "-",         "-",      "-",      "-"),
    ("auditor",    "recording",        "G !",       "-",      "-",      "-"),
    ("auditor",    "call_record",      "-",         "-",      "-",      "-"),
    ("auditor",    "audit_log",        "G",         "G !",    "-",      "-"),
    ("auditor",    "agent_admin",      "G",         "-",      "-",      "-"),
    ("auditor",    "key_admin",        "G",         "-",      "-",      "-"),
    ("auditor",    "flow_admin",       "G",         "-",      "-",      "-"),
    ("auditor",    "statistics",       "G",         "G !",    "-",      "-"),
    ("auditor",    "quality_review",   "G",         "-",      "-",      "-"),
    ("auditor",    "supervision",      "-",         "-",      "-",      "-"),
    ("auditor",    "complaint",        "G",         "-",      "-",      "-"),
]
# fmt: on
CELLS: Final = [
    (role, kind, action, spec)
    for role, kind, *specs in MATRIX
    for action, spec in zip(("read", "export", "change", "delete"), specs, strict=True)
]


@dataclass(frozen=True)
class Scenario:
    """One scope situation: the scopes it gives (letters), and how to build the resource and context."""

    name: str
    held: frozenset[str]
    department: str = AWAY
    call_id: str | None = None
    assignments: tuple[Assignment, ...] = ()
    grants: tuple[Grant, ...] = ()
    frozen: bool = False


def _grant(**changes: object) -> Grant:
    base = Grant("bg-abcdefghijkl", T0 - timedelta(minutes=10), T0 + timedelta(minutes=50), PATIENT,
                 account_epoch=EPOCH)  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]


_CALL = Assignment(PATIENT, "call", T0 - timedelta(minutes=5), None, "call-a")
_ALL = (
    Assignment(PATIENT, "responsible", T0 - timedelta(days=1)),
    _CALL,
)
SCENARIOS: Final = [
    Scenario("other department, no scope", frozenset("G")),
    Scenario("own department", frozenset("GD"), department=HOME),
    Scenario("assigned", frozenset("GA"), assignments=(Assignment(PATIENT, "responsible", T0 - timedelta(days=1)),)),
    Scenario(
        "assignment ended",
        frozenset("G"),
        assignments=(Assignment(PATIENT, "responsible", T0 - timedelta(days=2), T0 - timedelta(days=1)),),
    ),
    Scenario(
        "assignment not yet started",
        frozenset("G"),
        assignments=(Assignment(PATIENT, "responsible", T0 + timedelta(1)),),
    ),
    Scenario("another patient assigned", frozenset("G"), assignments=(Assignment(OTHER_PATIENT, "responsible", T0),)),
    Scenario(
        "on a call with the patient, record of another call", frozenset("GK"), call_id="call-b", assignments=(_CALL,)
    ),
    Scenario(
        "on a call with the patient, record of this call", frozenset("GKT"), call_id="call-a", assignments=(_CALL,)
    ),
    Scenario("call ended", frozenset("G"), call_id="call-a", assignments=(replace(_CALL, ends_at=T0),)),
    Scenario(
        "call never ended, started 5 h ago",
        frozenset("G"),
        call_id="call-a",
        assignments=(replace(_CALL, starts_at=T0 - timedelta(hours=5)),),
    ),
    Scenario(
        "on a call with another patient",
        frozenset("G"),
        call_id="call-a",
        assignments=(replace(_CALL, patient_id=OTHER_PATIENT),),
    ),
    Scenario("break-glass for the patient", frozenset("GB"), grants=(_grant(),)),
    Scenario("break-glass for the department", frozenset("GB"), grants=(_grant(patient_id=None, department=AWAY),)),
    Scenario("break-glass expired", frozenset("G"), grants=(_grant(expires_at=T0),)),
    Scenario("break-glass closed", frozenset("G"), grants=(_grant(closed_at=T0 - timedelta(minutes=1)),)),
    Scenario("break-glass opened before a freeze", frozenset("G"), grants=(_grant(account_epoch=EPOCH - 1),)),
    Scenario("break-glass for another patient", frozenset("G"), grants=(_grant(patient_id=OTHER_PATIENT),)),
    Scenario(
        "break-glass for another department", frozenset("G"), grants=(_grant(patient_id=None, department="oncology"),)
    ),
    Scenario(
        "frozen, holding every scope",
        frozenset(),
        department=HOME,
        call_id="call-a",
        assignments=_ALL,
        grants=(_grant(),),
        frozen=True,
    ),
]


def _parse(spec: str) -> tuple[frozenset[str], bool]:
    if spec == "-":
        return frozenset(), False
    parts = spec.split()
    return frozenset(p for p in parts if p != "!"), "!" in parts


def _decide(role: str, kind: str, action: str, scenario: Scenario, reason: str | None) -> access.Decision:
    subject = Subject("staff.one", frozenset({role}), frozenset({HOME}), scenario.frozen, EPOCH)  # type: ignore[arg-type]
    patient = PATIENT if kind in PATIENT_KINDS else None
    resource = Resource(kind, patient, scenario.department, scenario.call_id)  # type: ignore[arg-type]
    context = Context(scenario.assignments, scenario.grants, reason)
    return decide(subject, action, resource, context, T0)  # type: ignore[arg-type]


def test_the_matrix_lists_every_role_kind_and_action_once() -> None:
    assert sorted((role, kind) for role, kind, *_ in MATRIX) == sorted((r, k) for r in ROLES for k in RECORD_KINDS)
    assert len(CELLS) == len(ROLES) * len(RECORD_KINDS) * len(ACTIONS) == 364


@pytest.mark.parametrize(("role", "kind", "action", "spec"), CELLS, ids=[f"{r}-{k}-{a}" for r, k, a, _ in CELLS])
def test_matrix_cell(role: str, kind: str, action: str, spec: str) -> None:
    allowed_in, needs_reason = _parse(spec)
    wrong = []
    for scenario in SCENARIOS:
        held = scenario.held if kind in PATIENT_KINDS else scenario.held & frozenset("GD")
        matched = allowed_in & held
        for reason in (None, REASON):
            decision = _decide(role, kind, action, scenario, reason)
            expected = bool(matched) and (reason is not None or not needs_reason)
            if decision.allowed != expected:
                wrong.append(f"{scenario.name}, reason={reason is not None}: got {decision.explanation!r}")
            if matched and needs_reason and reason is None and decision.reason_required is not True:
                wrong.append(f"{scenario.name}: a missing reason must be reported as reason_required")
            if decision.allowed and decision.basis is None:
                wrong.append(f"{scenario.name}: allowed without a basis")
            if scenario.frozen and decision.denial != "frozen":
                wrong.append(f"{scenario.name}: a frozen account must be refused as frozen, got {decision.denial}")
            assert PATIENT not in decision.explanation
            assert OTHER_PATIENT not in decision.explanation
    assert not wrong, f"{role} {action} {kind} ({spec}):\n" + "\n".join(wrong)


def test_the_module_docstring_table_is_the_tested_matrix() -> None:
    """The table regulators read in the module's documentation is exactly what is tested here."""
    documented = {}
    doc = access.__doc__ or ""
    for line in doc.splitlines():
        match = re.fullmatch(r"(\w+)\s+(\w+)\s+(.+?)\s{2,}(.+?)\s{2,}(.+?)\s{2,}(.+?)", line.strip())
        if match and match.group(1) in ROLES and match.group(2) in RECORD_KINDS:
            documented[(match.group(1), match.group(2))] = tuple(s.strip() for s in match.groups()[2:])
    assert "pharmacist  (same as nurse)" in doc
    for role, kind, *specs in MATRIX:
        source = "nurse" if role == "pharmacist" else role
        if any(s != "-" for s in specs):
            assert documented.get((source, kind)) == tuple(specs), (role, kind)
        else:  # an all-denied row may be listed or left out ("every cell not listed is -")
            assert documented.get((source, kind), ("-",) * 4) == ("-",) * 4, (role, kind)


def test_frozen_account_is_denied_even_admin_and_auditor_role_wide_cells() -> None:
    for role, kind, action in (("admin", "flow_admin", "read"), ("auditor", "audit_log", "read")):
        subject = Subject("staff.one", frozenset({role}), frozen=True)  # type: ignore[arg-type]
        decision = decide(subject, action, Resource(kind), Context(reason=REASON), T0)  # type: ignore[arg-type]
        assert not decision.allowed
        assert decision.denial == "frozen"
        assert "frozen" in decision.explanation


def test_a_session_from_an_older_epoch_is_refused() -> None:
    subject = Subject("staff.one", frozenset({"physician"}), frozenset({HOME}), False, EPOCH)
    resource = Resource("clinical_note", PATIENT, HOME)
    assert decide(subject, "read", resource, Context(session_epoch=EPOCH), T0).allowed
    stale = decide(subject, "read", resource, Context(session_epoch=EPOCH - 1), T0)
    assert not stale.allowed
    assert stale.denial == "stale_session"


def test_admin_gets_no_patient_data_even_if_the_row_also_says_physician() -> None:
    # The account store refuses to combine admin with another role; this is the policy's own second line.
    subject = Subject("staff.one", frozenset({"admin", "physician"}), frozenset({HOME}))
    decision = decide(subject, "read", Resource("clinical_note", PATIENT, HOME), Context(), T0)
    assert not decision.allowed
    assert decision.denial == "admin_no_patient_data"
    assert decide(subject, "change", Resource("flow_admin"), Context(), T0).allowed
    assert break_glass_problem(subject) is not None


def test_auditor_changes_nothing_even_if_the_row_also_says_physician() -> None:
    subject = Subject("staff.one", frozenset({"auditor", "physician"}), frozenset({HOME}))
    decision = decide(subject, "change", Resource("clinical_note", PATIENT, HOME), Context(), T0)
    assert not decision.allowed
    assert decision.denial == "auditor_read_only"
    assert decide(subject, "read", Resource("clinical_note", PATIENT, HOME), Context(), T0).allowed


def test_several_roles_any_one_granting_suffices_and_the_most_ordinary_basis_is_named() -> None:
    subject = Subject("staff.one", frozenset({"agent", "supervisor"}), frozenset({HOME}))
    on_call = Context((_CALL,))
    # As agent on the call: identity; as supervisor: the department's transcripts, with a reason for export.
    identity = decide(subject, "read", Resource("patient_identity", PATIENT, AWAY), on_call, T0)
    assert identity.allowed
    assert identity.role == "agent"
    assert identity.basis == "current_call"
    transcript = decide(subject, "read", Resource("transcript", PATIENT, HOME), on_call, T0)
    assert transcript.allowed
    assert transcript.role == "supervisor"
    assert transcript.basis == "department"
    export = decide(subject, "export", Resource("transcript", PATIENT, HOME), on_call, T0)
    assert not export.allowed
    assert export.denial == "reason_required"
    assert export.reason_required


def test_break_glass_decision_names_the_grant() -> None:
    subject = Subject("staff.one", frozenset({"nurse"}), frozenset({HOME}), session_epoch=EPOCH)
    decision = decide(subject, "read", Resource("clinical_note", PATIENT, AWAY), Context(grants=(_grant(),)), T0)
    assert decision.allowed
    assert decision.basis == "break_glass"
    assert decision.grant_id == "bg-abcdefghijkl"
    # In department too: the ordinary basis wins, so the audit entry does not blame the grant.
    in_home = decide(subject, "read", Resource("clinical_note", PATIENT, HOME), Context(grants=(_grant(),)), T0)
    assert in_home.basis == "department"
    assert in_home.grant_id is None


def test_grant_validity_is_half_open() -> None:
    grant = _grant()
    assert grant.valid(grant.opened_at, EPOCH)
    assert not grant.valid(grant.opened_at - timedelta(microseconds=1), EPOCH)
    assert grant.valid(grant.expires_at - timedelta(microseconds=1), EPOCH)
    assert not grant.valid(grant.expires_at, EPOCH)
    assert not grant.covers(Resource("agent_admin", department=AWAY))  # break-glass is for patient data only


@pytest.mark.parametrize(
    ("reason", "problem"),
    [
        ("too short", "at least 10 characters"),
        ("call back on 138 1234 5678 please", "looks like a phone"),
        ("born 1980-01-02, check history", "looks like a phone"),
        ("x" * 501, "longer than 500"),
        ("line one\x00line two", "control characters"),
    ],
)
def test_an_unusable_reason_is_refused_without_repeating_it(reason: str, problem: str) -> None:
    subject = Subject("staff.one", frozenset({"physician"}), frozenset({HOME}))
    decision = decide(subject, "read", Resource("clinical_note", PATIENT, HOME), Context(reason=reason), T0)
    assert not decision.allowed
    assert decision.denial == "reason_rejected"
    assert problem in decision.explanation
    assert "1234" not in decision.explanation
    assert "1980" not in decision.explanation
    assert reason_problem(reason) is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "clinical_note", "patient_id": "13812345678"}, "not an opaque registry id"),
        ({"kind": "clinical_note", "patient_id": "Zhang San"}, "not an opaque registry id"),
        ({"kind": "clinical_note", "patient_id": "AB" * 16}, "not an opaque registry id"),
        ({"kind": "clinical_note"}, "must name its patient"),
        ({"kind": "flow_admin", "patient_id": PATIENT}, "takes no patient id"),
        ({"kind": "x_rays", "patient_id": PATIENT}, "unknown kind of record 'x_rays'"),
        ({"kind": "clinical_note", "patient_id": PATIENT, "department": "Cardiology!"}, "department 'Cardiology!'"),
        ({"kind": "clinical_note", "patient_id": PATIENT, "call_id": "call id with spaces"}, "call id"),
    ],
)
def test_a_malformed_resource_is_refused_clearly(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(AccessError, match=re.escape(message)) as caught:
        Resource(**kwargs)  # type: ignore[arg-type]
    assert "13812345678" not in str(caught.value)
    assert "Zhang" not in str(caught.value)


def test_an_unknown_action_is_refused() -> None:
    subject = Subject("staff.one", frozenset({"physician"}))
    with pytest.raises(AccessError, match="unknown action 'print'"):
        decide(subject, "print", Resource("flow_admin"), Context(), T0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("roles", "frozen", "expected"),
    [
        ({"agent"}, False, None),
        ({"nurse"}, False, None),
        ({"pharmacist"}, False, None),
        ({"physician"}, False, None),
        ({"supervisor"}, False, None),
        ({"admin"}, False, "administrators get no patient data"),
        ({"auditor"}, False, "may break glass"),
        ({"physician"}, True, "frozen"),
    ],
)
def test_who_may_break_glass(roles: set[str], frozen: bool, expected: str | None) -> None:
    problem = break_glass_problem(Subject("staff.one", frozenset(roles), frozen=frozen))  # type: ignore[arg-type]
    if expected is None:
        assert problem is None
    else:
        assert problem is not None
        assert expected in problem


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (("physician", "clinical_note", "export", access.Rule(frozenset({"department"}))), "every export needs"),
        (("nurse", "clinical_note", "change", access.Rule(frozenset({"break_glass"}))), "reading only"),
        (("physician", "clinical_note", "delete", access.Rule(frozenset({"department"}))), "never deleted"),
        (("admin", "patient_identity", "read", access.Rule(frozenset({"global"}))), "never the admin's"),
        (("nurse", "transcript", "read", access.Rule(frozenset({"global"}))), "patient or department scope"),
        (("auditor", "audit_log", "change", access.Rule(frozenset({"global"}))), "changes nothing"),
    ],
)
def test_the_matrix_invariants_catch_a_widening_typo(rule: tuple[str, str, str, access.Rule], message: str) -> None:
    role, kind, action, value = rule
    with pytest.raises(AssertionError, match=message):
        access._check_matrix({**access.RULES, (role, kind, action): value})


def test_registry_uuids_and_hex_ids_are_patient_ids_nothing_else_is() -> None:
    registry_id = "3f2b8c1e-9a4d-4e6f-8b2a-1c3d5e7f9a0b"
    assert Resource("patient_identity", registry_id).patient_id == registry_id
    assert Resource("patient_identity", PATIENT, audit_ref="ef" * 32).audit_ref == "ef" * 32
    for bad in (registry_id.upper(), registry_id.replace("-", "_"), "ab" * 15, "ab" * 65):
        with pytest.raises(AccessError, match="not an opaque registry id"):
            Resource("patient_identity", bad)
    with pytest.raises(AccessError, match="must be their blind id"):
        Resource("patient_identity", registry_id, audit_ref=registry_id)
