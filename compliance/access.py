"""Access policy, sans I/O: may this account read, export, change or delete this record, here and now?

:func:`decide` is a pure function of values: the subject (account id, roles, departments, frozen flag, session
epoch), the action, the resource (kind of record, the patient's opaque id, its department, the call it belongs
to), the context (the subject's assignments to patients, its break-glass grants, the reason given, the epoch of
the session asking) and the time. It reads no clock, no database and no cache; the database-backed service
(:class:`compliance.access_store.AccessControl`) loads all of that afresh for every request, so a revoked role, a
removed department, an ended call or a frozen account is refused on the very next request.

Rules, in the order they are applied:

1. A frozen account is refused everything. A session issued before the account's current epoch is refused.
2. An account holding ``admin`` gets no patient data at all, whatever else it holds, and cannot break glass.
   An account holding ``auditor`` changes and deletes nothing. (The account store also refuses to combine
   these roles with others; this is the second line.)
3. Each role grants an action on a kind of record only in the scopes listed in :data:`RULES` (the table below),
   some only with a reason. With several roles, any role that grants it in a scope the subject holds suffices.
4. Every export needs a reason; break-glass extends *reading* only, never export, change or delete; nobody
   deletes patient data (the medical record is kept 15 years; only the retention job, a system process, purges).

Scopes (letters in the table):

- ``G`` global: no patient scope needed (the administration kinds, the audit log, an auditor's reviews).
- ``D`` department: the record's department is one of the account's departments.
- ``A`` assigned: an active ``responsible`` assignment of the account to the patient (e.g. their physician).
- ``K`` current call: the account is on a call with the patient now (an active ``call`` assignment).
- ``T`` this call: as K, and the record belongs to that very call (an agent sees nothing beyond the call).
- ``B`` break-glass: an open, unexpired grant of the account (opened at its current epoch) for the patient or
  the record's department.
- ``!`` after the scopes: a reason is required for each access; ``-``: never allowed.

=========== ================ ============ ========= ========= ========
role        kind             read         export    change    delete
=========== ================ ============ ========= ========= ========
agent       patient_identity K B          -         K         -
agent       clinical_note    T            -         -         -
agent       transcript       T            -         -         -
agent       recording        -            -         -         -
agent       call_record      T            -         T         -
nurse       patient_identity D A K B      -         D A K     -
nurse       clinical_note    D A K B      -         -         -
nurse       transcript       D A K B      -         -         -
nurse       recording        D A !        -         -         -
nurse       call_record      D A K B      -         D A K     -
nurse       complaint        D            -         D         -
pharmacist  (same as nurse)
physician   patient_identity D A K B      -         D A K     -
physician   clinical_note    D A K B      D A !     D A K     -
physician   transcript       D A K B      D A !     -         -
physician   recording        D A !        -         -         -
physician   call_record      D A K B      D A !     D A K     -
physician   complaint        D            -         D         -
supervisor  patient_identity D B          -         -         -
supervisor  clinical_note    D B          -         -         -
supervisor  transcript       D B          D !       -         -
supervisor  recording        D !          D !       -         -
supervisor  call_record      D B          D !       -         -
supervisor  agent_admin      D            -         -         -
supervisor  flow_admin       G            -         -         -
supervisor  statistics       G            G !       -         -
supervisor  quality_review   G            -         G !       -
supervisor  supervision      -            -         G !       -
supervisor  complaint        G            G !       G         -
admin       agent_admin      G            G !       G         -
admin       key_admin        G            -         G         -
admin       flow_admin       G            G !       G         G !
admin       statistics       G            G !       -         -
auditor     recording        G !          -         -         -
auditor     audit_log        G            G !       -         -
auditor     agent_admin      G            -         -         -
auditor     key_admin        G            -         -         -
auditor     flow_admin       G            -         -         -
auditor     statistics       G            G !       -         -
auditor     quality_review   G            -         -         -
auditor     complaint        G            -         -         -
=========== ================ ============ ========= ========= ========

Every cell not listed is ``-``: no role reads the audit log but the auditor, no role touches keys but the admin
(``key_admin`` is key *administration*, rotation and status; no role ever exports key material), the admin reads
no patient data, accounts are frozen rather than deleted (their ids appear in the audit trail forever).

``statistics`` are the queue and agent figures of ``medhotline stats`` (docs/statistics.md): operational data, never
a patient's, read by those who run and check the hotline (supervisors, admins, auditors); a CSV or chart written to
a file is an export and needs a reason. Agents and clinical staff do not read each other's figures.

``quality_review`` is the review queue of quality control and the reviewers' scores (docs/quality.md): flags and
scores, never a patient's data. Supervisors (the quality reviewers) read the queue and score a call, each score with
a reason; auditors read. Nobody else does: an agent or a nurse never scores calls, their own or others'.

``supervision`` is stepping into live calls (docs/api.md, ``routing.supervision``): listening to, whispering to or
barging into an agent's conversation, pausing or unpausing an agent, moving a waiting call to the emergency queue.
Only supervisors do it, each time with a reason (the audit entry carries it); nobody reads it as a record.

``complaint`` is a 12320 complaint task (docs/complaints.md): category, deadlines, the department it is referred to,
a summary without patient identifiers. Supervisors (the hotline's complaint desk) open, refer, resolve and answer
any task; clinical staff read and resolve the tasks referred to their department (D: the task's department);
auditors read. Agents and admins do not see complaints.

Why these cells: an agent (non-clinical operator) needs the caller's identity and what is said on the call, not
the patient's history, and hears no recordings. Clinical staff work their department's and their assigned
patients' records and those of the caller they are talking to; only physicians change clinical (diagnosis)
notes. Supervisors review quality within their department and play recordings only with a logged reason.
Break-glass can be opened by agents, clinical staff and supervisors (:data:`BREAK_GLASS_ROLES`) and gives the
read cells marked ``B`` for the grant's patient or department, for at most :data:`MAX_BREAK_GLASS_MINUTES`.
Registering a new patient (a record with no scope yet) is by role alone (:data:`CREATE_PATIENT_ROLES`: agent,
nurse, pharmacist, physician; see :func:`create_problem`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final, Literal, get_args

from ground.errors import MedhotlineError
from ground.ids import is_patient_id

if TYPE_CHECKING:  # annotations only: the policy imports no database code
    from compliance.accounts import AccountRecord, Role

Action = Literal["read", "export", "change", "delete"]
ACTIONS: Final[tuple[Action, ...]] = get_args(Action)
RecordKind = Literal[
    "patient_identity",
    "clinical_note",
    "transcript",
    "recording",
    "call_record",
    "audit_log",
    "agent_admin",
    "key_admin",
    "flow_admin",
    "statistics",
    "quality_review",
    "supervision",
    "complaint",
]
RECORD_KINDS: Final[tuple[RecordKind, ...]] = get_args(RecordKind)
PATIENT_KINDS: Final[frozenset[RecordKind]] = frozenset(
    {"patient_identity", "clinical_note", "transcript", "recording", "call_record"}
)
Scope = Literal["global", "assigned", "department", "this_call", "current_call", "break_glass"]
# Order of preference when several scopes allow an access: the audit entry names the most ordinary one.
SCOPES: Final[tuple[Scope, ...]] = get_args(Scope)
Denial = Literal[
    "unknown_account",
    "frozen",
    "stale_session",
    "admin_no_patient_data",
    "auditor_read_only",
    "not_permitted",
    "out_of_scope",
    "reason_required",
    "reason_rejected",
]
AssignmentKind = Literal["responsible", "call"]
Verdict = Literal["justified", "unjustified"]
VERDICTS: Final[tuple[Verdict, ...]] = get_args(Verdict)

MIN_REASON_CHARS: Final = 10
MAX_REASON_CHARS: Final = 500
DEFAULT_BREAK_GLASS_MINUTES: Final = 60
MAX_BREAK_GLASS_MINUTES: Final = 240
# A call assignment a crashed node never ended still lapses: no call lasts this long.
MAX_CALL_ASSIGNMENT: Final = timedelta(hours=4)
BREAK_GLASS_ROLES: Final[frozenset[str]] = frozenset({"agent", "nurse", "pharmacist", "physician", "supervisor"})
# Opaque patient ids only: the registry's random UUID (lower case), or 32-128 lower-case hex digits
# (ground.ids.is_patient_id, allow="uuid_or_hex"). A name, phone number or record number never matches, so none
# can reach the assignment tables, a message or the audit log.
# How the audit log names a patient: the registry's blind id (keyed HMAC of the patient id), hex.
BLIND_ID: Final = re.compile(r"(?:[0-9a-f]{2}){16,64}")
# Who may register a new patient (a caller not yet in the registry): there is no scope on a record that does not
# exist yet, so it is by role alone; whoever creates it gets its read and change through their current call.
CREATE_PATIENT_ROLES: Final[frozenset[str]] = frozenset({"agent", "nurse", "pharmacist", "physician"})
_DEPARTMENT: Final = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_CALL_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
# As in the audit log's validation: seven or more digits, possibly separated, look like a phone or record number.
_NUMBER_LIKE: Final = re.compile(r"\d(?:[\s.()/-]*\d){6,}")


class AccessError(MedhotlineError):
    """A malformed access request (unknown action or kind, malformed patient id); the message says which.

    Messages never repeat a patient id, since a caller might have passed a phone number in its place.
    """


# --- the matrix ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One allowed cell: the scopes in which the role may do it, and whether each access needs a reason."""

    scopes: frozenset[Scope]
    reason: bool = False


_LETTERS: Final[Mapping[str, Scope]] = {
    "G": "global",
    "D": "department",
    "A": "assigned",
    "K": "current_call",
    "T": "this_call",
    "B": "break_glass",
}


def _rule(spec: str) -> Rule | None:
    """``"D A K B"`` → Rule; a trailing ``!`` requires a reason; ``"-"`` → None."""
    if spec == "-":
        return None
    parts = spec.split()
    reason = parts[-1] == "!"
    return Rule(frozenset(_LETTERS[p] for p in parts if p != "!"), reason)


def _rows(role: str, table: Mapping[str, tuple[str, str, str, str]]) -> dict[tuple[str, str, str], Rule]:
    rules: dict[tuple[str, str, str], Rule] = {}
    for kind, specs in table.items():
        for action, spec in zip(ACTIONS, specs, strict=True):
            rule = _rule(spec)
            if rule is not None:
                rules[(role, kind, action)] = rule
    return rules


# (read, export, change, delete) per kind; the module docstring shows the same table.
_CLINICAL: Final[dict[str, tuple[str, str, str, str]]] = {
    "patient_identity": ("D A K B", "-", "D A K", "-"),
    "clinical_note": ("D A K B", "-", "-", "-"),
    "transcript": ("D A K B", "-", "-", "-"),
    "recording": ("D A !", "-", "-", "-"),
    "call_record": ("D A K B", "-", "D A K", "-"),
    "complaint": ("D", "-", "D", "-"),
}
RULES: Final[Mapping[tuple[str, str, str], Rule]] = {
    **_rows(
        "agent",
        {
            "patient_identity": ("K B", "-", "K", "-"),
            "clinical_note": ("T", "-", "-", "-"),
            "transcript": ("T", "-", "-", "-"),
            "call_record": ("T", "-", "T", "-"),
        },
    ),
    **_rows("nurse", _CLINICAL),
    **_rows("pharmacist", _CLINICAL),
    **_rows(
        "physician",
        {
            **_CLINICAL,
            "clinical_note": ("D A K B", "D A !", "D A K", "-"),
            "transcript": ("D A K B", "D A !", "-", "-"),
            "call_record": ("D A K B", "D A !", "D A K", "-"),
        },
    ),
    **_rows(
        "supervisor",
        {
            "patient_identity": ("D B", "-", "-", "-"),
            "clinical_note": ("D B", "-", "-", "-"),
            "transcript": ("D B", "D !", "-", "-"),
            "recording": ("D !", "D !", "-", "-"),
            "call_record": ("D B", "D !", "-", "-"),
            "agent_admin": ("D", "-", "-", "-"),
            "flow_admin": ("G", "-", "-", "-"),
            "statistics": ("G", "G !", "-", "-"),
            "quality_review": ("G", "-", "G !", "-"),
            "supervision": ("-", "-", "G !", "-"),
            "complaint": ("G", "G !", "G", "-"),
        },
    ),
    **_rows(
        "admin",
        {
            "agent_admin": ("G", "G !", "G", "-"),
            "key_admin": ("G", "-", "G", "-"),
            "flow_admin": ("G", "G !", "G", "G !"),
            "statistics": ("G", "G !", "-", "-"),
        },
    ),
    **_rows(
        "auditor",
        {
            "recording": ("G !", "-", "-", "-"),
            "audit_log": ("G", "G !", "-", "-"),
            "agent_admin": ("G", "-", "-", "-"),
            "key_admin": ("G", "-", "-", "-"),
            "flow_admin": ("G", "-", "-", "-"),
            "statistics": ("G", "G !", "-", "-"),
            "quality_review": ("G", "-", "-", "-"),
            "complaint": ("G", "-", "-", "-"),
        },
    ),
}


def _check_matrix(rules: Mapping[tuple[str, str, str], Rule]) -> None:
    """The table's own invariants, checked at import: a typo here must not quietly widen access."""
    for (role, kind, action), rule in rules.items():
        where = f"access rule {role}/{kind}/{action}"
        if kind not in RECORD_KINDS or action not in ACTIONS:
            raise AssertionError(f"{where}: unknown kind or action")
        if action == "export" and not rule.reason:
            raise AssertionError(f"{where}: every export needs a reason")
        if action != "read" and "break_glass" in rule.scopes:
            raise AssertionError(f"{where}: break-glass extends reading only")
        if kind in PATIENT_KINDS and (action == "delete" or role == "admin"):
            raise AssertionError(f"{where}: patient data is never deleted and never the admin's")
        # The one role-wide cell on patient data: the auditor's reasoned playback of a recording under review.
        role_wide_patient_data = kind in PATIENT_KINDS and "global" in rule.scopes
        if role_wide_patient_data and ((role, kind, action) != ("auditor", "recording", "read") or not rule.reason):
            raise AssertionError(f"{where}: patient data is only ever in a patient or department scope")
        if role == "auditor" and action in ("change", "delete"):
            raise AssertionError(f"{where}: the auditor changes nothing")


_check_matrix(RULES)


# --- values ----------------------------------------------------------------------------------------------------


def check_patient_id(patient_id: str) -> str:
    """The id, if it is an opaque patient id; AccessError otherwise (without repeating the value)."""
    if not is_patient_id(patient_id, allow="uuid_or_hex"):
        raise AccessError(
            "patient id is not an opaque registry id (a lower-case UUID or 32-128 lower-case hex digits); never pass "
            "a name, phone number or record number where a patient id is expected"
        )
    return patient_id


def check_blind_id(blind_id: str) -> str:
    if not isinstance(blind_id, str) or not BLIND_ID.fullmatch(blind_id):
        raise AccessError("a patient's audit reference must be their blind id (32-128 lower-case hex digits)")
    return blind_id


def check_department(department: str) -> str:
    if not _DEPARTMENT.fullmatch(department) or _NUMBER_LIKE.search(department):
        raise AccessError(f"department {department!r}: use a-z 0-9 _ - starting with a letter")
    return department


def check_call_id(call_id: str) -> str:
    if not _CALL_ID.fullmatch(call_id):
        raise AccessError("call id: use 1-64 of A-Z a-z 0-9 _ . : - (the service's call id)")
    return call_id


def reason_problem(reason: str | None, min_chars: int = MIN_REASON_CHARS) -> str | None:
    """Why a given reason is unusable (it is written to the audit log), or None if it is fine or absent."""
    if reason is None:
        return None
    text = reason.strip()
    if len(text) < min_chars:
        return f"the reason must say why in at least {min_chars} characters"
    if len(text) > MAX_REASON_CHARS:
        return f"the reason is longer than {MAX_REASON_CHARS} characters"
    if any(ord(c) < 0x20 and c not in "\t" for c in text):
        return "the reason contains control characters"
    if _NUMBER_LIKE.search(text):
        return (
            "the reason contains a number that looks like a phone, record number or date; the audit log holds no "
            "patient identifiers, so say why without them"
        )
    return None


def check_reason(reason: str | None, what: str = "reason", min_chars: int = MIN_REASON_CHARS) -> str:
    """The stripped reason, or AccessError saying why it is missing or unusable."""
    if reason is None or not reason.strip():
        raise AccessError(f"a {what} is required")
    problem = reason_problem(reason, min_chars)
    if problem is not None:
        raise AccessError(f"{what}: {problem}")
    return reason.strip()


@dataclass(frozen=True, slots=True)
class Subject:
    """Who asks, as stored at the moment of the request."""

    account_id: str
    roles: frozenset[Role]
    departments: frozenset[str] = frozenset()
    frozen: bool = False
    session_epoch: int = 0

    @classmethod
    def from_account(cls, account: AccountRecord) -> Subject:
        return cls(account.id, account.roles, account.departments, account.frozen, account.session_epoch)

    def role_names(self) -> str:
        return ", ".join(sorted(self.roles)) or "no role"


@dataclass(frozen=True, slots=True)
class Resource:
    """What is asked for. ``patient_id`` (opaque registry id) is required for patient data and refused otherwise;
    ``department`` is the record's department if known; ``call_id`` the call the record belongs to, if any;
    ``audit_ref`` the patient's blind id as the audit log names them (the service can look it up instead)."""

    kind: RecordKind
    patient_id: str | None = None
    department: str | None = None
    call_id: str | None = None
    audit_ref: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in RECORD_KINDS:
            raise AccessError(f"unknown kind of record {self.kind!r}; kinds are {', '.join(RECORD_KINDS)}")
        if self.kind in PATIENT_KINDS:
            # A caller the IVR did not identify still has a call: such records are scoped by their call and their
            # department (patient-based scopes can't apply), never left unprotected.
            if self.patient_id is None and self.call_id is None:
                raise AccessError(f"a {self.kind} resource must name its patient (opaque id) or its call")
            if self.patient_id is not None:
                check_patient_id(self.patient_id)
        elif self.patient_id is not None:
            raise AccessError(f"a {self.kind} resource is not patient data and takes no patient id")
        if self.department is not None:
            check_department(self.department)
        if self.call_id is not None:
            check_call_id(self.call_id)
        if self.audit_ref is not None:
            check_blind_id(self.audit_ref)

    @property
    def is_patient_data(self) -> bool:
        return self.kind in PATIENT_KINDS


@dataclass(frozen=True, slots=True)
class Assignment:
    """The account is responsible for the patient (``responsible``), or on a call with them (``call``)."""

    patient_id: str
    kind: AssignmentKind
    starts_at: datetime
    ends_at: datetime | None = None
    call_id: str | None = None

    def active(self, at: datetime) -> bool:
        if at < self.starts_at or (self.ends_at is not None and at >= self.ends_at):
            return False
        return not (self.kind == "call" and at >= self.starts_at + MAX_CALL_ASSIGNMENT)


@dataclass(frozen=True, slots=True)
class Grant:
    """A break-glass grant for one patient or one department, valid in [opened_at, expires_at) unless closed."""

    id: str
    opened_at: datetime
    expires_at: datetime
    patient_id: str | None = None
    department: str | None = None
    closed_at: datetime | None = None
    account_epoch: int = 0

    def valid(self, at: datetime, epoch: int) -> bool:
        if self.account_epoch != epoch:
            return False  # opened before a freeze: stale even if someone forgot to close it
        if not self.opened_at <= at < self.expires_at:
            return False
        return self.closed_at is None or at < self.closed_at

    def covers(self, resource: Resource) -> bool:
        if not resource.is_patient_data:
            return False
        if self.patient_id is not None:
            return self.patient_id == resource.patient_id
        return self.department is not None and self.department == resource.department


@dataclass(frozen=True, slots=True)
class Context:
    """What else the decision depends on, loaded afresh for each request."""

    assignments: tuple[Assignment, ...] = ()
    grants: tuple[Grant, ...] = ()
    reason: str | None = None
    # The epoch of the session asking, if the request comes through a session; None: no session (service side).
    session_epoch: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer. ``basis`` is the scope that allowed it (or would have, for ``reason_required``);
    ``reason_required`` tells a user interface to ask for a reason; ``explanation`` names who, what and why, and
    never a patient identifier."""

    allowed: bool
    basis: Scope | None
    reason_required: bool
    explanation: str
    role: Role | None = None
    denial: Denial | None = None
    grant_id: str | None = None
    scopes_held: tuple[Scope, ...] = field(default=())


_WHY: Final[Mapping[Denial, str]] = {
    "unknown_account": "there is no such account",
    "frozen": "the account is frozen",
    "stale_session": "the session was issued before the account was last frozen, or has ended; sign in again",
    "admin_no_patient_data": "administrators get no patient data (use a clinical account)",
    "auditor_read_only": "auditors change and delete nothing",
    "not_permitted": "no role of the account permits it",
    "out_of_scope": (
        "the record is outside the account's scope (not its department, not an assigned patient, not the patient "
        "of its current call, no open break-glass grant)"
    ),
    "reason_required": "a reason is required for this access",
    "reason_rejected": "the reason given is unusable",
}
_BASIS_TEXT: Final[Mapping[Scope, str]] = {
    "global": "role-wide",
    "department": "record in the account's department",
    "assigned": "patient assigned to the account",
    "current_call": "patient of the account's current call",
    "this_call": "record of the account's current call",
    "break_glass": "break-glass grant",
}


def deny(
    subject: Subject,
    action: str,
    kind: str,
    denial: Denial,
    *,
    detail: str = "",
    basis: Scope | None = None,
    reason_required: bool = False,
    role: Role | None = None,
    held: Iterable[Scope] = (),
) -> Decision:
    why = _WHY[denial] + (f": {detail}" if detail else "")
    text = f"{subject.account_id} ({subject.role_names()}) may not {action} {kind}: {why}"
    return Decision(False, basis, reason_required, text, role=role, denial=denial, scopes_held=tuple(held))


def scopes_held(subject: Subject, resource: Resource, context: Context, at: datetime) -> dict[Scope, str | None]:
    """The scopes the subject holds on the resource at ``at``; the value is the grant id for ``break_glass``."""
    held: dict[Scope, str | None] = {"global": None}
    if resource.department is not None and resource.department in subject.departments:
        held["department"] = None
    if resource.is_patient_data:
        for assignment in context.assignments:
            if assignment.patient_id != resource.patient_id or not assignment.active(at):
                continue
            if assignment.kind == "responsible":
                held["assigned"] = None
            else:
                held["current_call"] = None
                if resource.call_id is not None and assignment.call_id == resource.call_id:
                    held["this_call"] = None
        for grant in sorted(context.grants, key=lambda g: g.id):
            if grant.covers(resource) and grant.valid(at, subject.session_epoch):
                held.setdefault("break_glass", grant.id)
    return {scope: held[scope] for scope in SCOPES if scope in held}


def decide(subject: Subject, action: Action, resource: Resource, context: Context, at: datetime) -> Decision:
    """Allow or deny ``action`` on ``resource`` for ``subject`` at ``at`` (see the module docstring)."""
    if action not in ACTIONS:
        raise AccessError(f"unknown action {action!r}; actions are {', '.join(ACTIONS)}")
    kind = resource.kind
    if subject.frozen:
        return deny(subject, action, kind, "frozen")
    if context.session_epoch is not None and context.session_epoch != subject.session_epoch:
        return deny(subject, action, kind, "stale_session")
    if "admin" in subject.roles and resource.is_patient_data:
        return deny(subject, action, kind, "admin_no_patient_data")
    if "auditor" in subject.roles and action in ("change", "delete"):
        return deny(subject, action, kind, "auditor_read_only")
    problem = reason_problem(context.reason)
    if problem is not None:
        return deny(subject, action, kind, "reason_rejected", detail=problem, reason_required=True)
    candidates = [(r, RULES[(r, kind, action)]) for r in sorted(subject.roles) if (r, kind, action) in RULES]
    if not candidates:
        return deny(subject, action, kind, "not_permitted")
    held = scopes_held(subject, resource, context, at)
    has_reason = context.reason is not None
    matches = [
        (rule.reason and not has_reason, SCOPES.index(scope), role, rule, scope)
        for role, rule in candidates
        for scope in held
        if scope in rule.scopes
    ]
    if not matches:
        needs_reason = any(rule.reason for _, rule in candidates)
        return deny(subject, action, kind, "out_of_scope", reason_required=needs_reason, held=held)
    missing_reason, _, role, rule, scope = min(matches, key=lambda m: (m[0], m[1], m[2]))
    if missing_reason:
        return deny(subject, action, kind, "reason_required", basis=scope, reason_required=True, role=role, held=held)
    return Decision(
        allowed=True,
        basis=scope,
        reason_required=rule.reason,
        explanation=f"{subject.account_id} may {action} {kind} as {role}: {_BASIS_TEXT[scope]}",
        role=role,
        grant_id=held[scope] if scope == "break_glass" else None,
        scopes_held=tuple(held),
    )


def break_glass_problem(subject: Subject) -> str | None:
    """Why the subject may not open a break-glass grant, or None if it may."""
    if subject.frozen:
        return "the account is frozen"
    if "admin" in subject.roles:
        return "administrators get no patient data and cannot break glass"
    if not subject.roles & BREAK_GLASS_ROLES:
        return f"no role of the account ({subject.role_names()}) may break glass"
    return None


def create_problem(subject: Subject) -> str | None:
    """Why the subject may not register a new patient, or None if it may (see :data:`CREATE_PATIENT_ROLES`)."""
    if subject.frozen:
        return "the account is frozen"
    if "admin" in subject.roles:
        return "administrators get no patient data"
    if not subject.roles & CREATE_PATIENT_ROLES:
        return f"no role of the account ({subject.role_names()}) may register patients"
    return None


def break_glass_role(subject: Subject) -> Role:
    """The role in which the subject breaks glass (for the audit entry): the first one that may."""
    for role in sorted(subject.roles):
        if role in BREAK_GLASS_ROLES:
            return role
    raise AccessError(f"{subject.account_id}: no role may break glass")


def primary_role(roles: Iterable[str]) -> str:
    """One role name for an audit entry's ``role`` field (the entry's details list them all)."""
    return min(roles, default="none")
