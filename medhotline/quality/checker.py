"""The quality checker, sans I/O: one finished call's facts in, its flags out (docs/quality.md).

The facts are the statistics' own reading of the call (``routing.statistics.QueueVisit``: queue, wait, how the
wait ended, who answered, talk, wrap-up) plus what the statistics do not need: the answering agent's roles, whether
the flow asked for consent and whether a signed consent record exists, whether a call note exists. No clock, no
database, no patient identifier: call ids, categories, roles, seconds.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

from medhotline.quality.rules import QualityRules, Severity
from routing.statistics import QueueVisit

__all__ = ["FinishedCall", "Flag", "check", "in_sample"]

_SAMPLE_SPACE: Final = 2**64


@dataclass(frozen=True, slots=True)
class FinishedCall:
    """What the checker reads of one finished call."""

    call_id: str
    # calls.route_category (the visit's category where the call queued).
    category: str | None
    # None: the call never waited in the queue (IVR only, outbound).
    visit: QueueVisit | None = None
    # Roles of the agent who answered (empty: nobody answered, or the account is gone).
    agent_roles: frozenset[str] = frozenset()
    # A consent node was reached; the caller refused at it; signed ``consent`` records of the call.
    consent_asked: bool = False
    consent_refused: bool = False
    consent_records: int = 0
    # A call note (staged or sealed) exists for the call.
    has_note: bool = False


@dataclass(frozen=True, slots=True)
class Flag:
    rule: str
    severity: Severity
    why: str


def check(call: FinishedCall, rules: QualityRules, *, emergency_target_seconds: float) -> list[Flag]:
    """Every enabled rule the call breaks, in the file's order of rules."""
    r = rules.rules
    v = call.visit
    flags: list[Flag] = []
    answered = v is not None and v.end == "answered"
    if r.emergency_late.enabled and v is not None and v.emergency and v.end != "waiting":
        target = r.emergency_late.target_seconds or emergency_target_seconds
        if not answered:
            flags.append(Flag("emergency_late", r.emergency_late.severity, f"emergency not answered (ended {v.end})"))
        elif v.wait is not None and v.wait > target:
            flags.append(Flag("emergency_late", r.emergency_late.severity,
                              f"emergency answered after {v.wait:.1f} s (target {target:g} s)"))  # fmt: skip
    category = (v.category if v is not None else None) or call.category
    rule = r.diagnosis_non_physician
    if answered and category == rule.category and "physician" not in call.agent_roles:
        assert v is not None
        roles = ", ".join(sorted(call.agent_roles)) or "no role"
        flags.append(Flag("diagnosis_non_physician", rule.severity,
                          f"{rule.category} call answered by {v.agent_id} ({roles}), not a physician"))  # fmt: skip
    # A refusal honoured (nobody took the consultation) is the flow working, not a missing consent.
    honoured_refusal = call.consent_refused and not answered
    if r.consent_missing.enabled and call.consent_asked and call.consent_records == 0 and not honoured_refusal:
        why = "consent refused but the call was answered" if call.consent_refused else "no signed consent record"
        flags.append(Flag("consent_missing", r.consent_missing.severity, f"the flow asked for consent: {why}"))
    rule_a = r.abandoned_in_queue
    if rule_a.enabled and v is not None and v.end == "abandoned" and (v.wait or 0.0) >= rule_a.min_wait_seconds:
        flags.append(Flag("abandoned_in_queue", rule_a.severity, f"caller hung up after {v.wait or 0.0:.1f} s in "
                          f"queue {v.queue}"))  # fmt: skip
    if r.note_missing.enabled and answered and v is not None and v.talk is not None and not call.has_note:
        flags.append(Flag("note_missing", r.note_missing.severity, f"no wrap-up note by {v.agent_id}"))
    rule_h = r.hold_too_long
    if rule_h.enabled and v is not None and v.wait is not None and v.wait > rule_h.max_seconds:
        flags.append(Flag("hold_too_long", rule_h.severity,
                          f"{v.wait:.1f} s on hold (limit {rule_h.max_seconds:g} s)"))  # fmt: skip
    return flags


def in_sample(call_id: str, key: bytes, rate: float) -> bool:
    """Whether the random sample takes the call: HMAC-SHA256(key, call id) read as a fraction below ``rate``.

    Deterministic (the same call is always in or out, on every node, after every restart) yet unpredictable to
    anyone without the key, so agents cannot know which of their calls will be reviewed."""
    if rate <= 0:
        return False
    digest = hmac.new(key, call_id.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") < rate * _SAMPLE_SPACE
