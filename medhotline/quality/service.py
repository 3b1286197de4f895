"""Quality control with I/O: check every finished call once, fill the review queue, seal reviewers' scores.

``check_calls`` reads the finished calls without a check (``--since`` narrows them), runs the sans-I/O checker
(:mod:`medhotline.quality.checker`) and stores one check per call, so running it again checks only new calls.
``review_call`` goes through the access policy (kind ``quality_review``, change, with a reason: audited), validates
the scores against the form, and seals them as a signed amendment of the call's summary with the records' own
sealer (``recordings.records.RecordSealer.seal``), then stores which amendment holds the review.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine

from compliance.access import Resource, check_reason
from compliance.access_store import AccessControl
from compliance.audit import AuditError, AuditLog, JsonValue
from ground.errors import MedhotlineError
from medhotline.quality.checker import check, in_sample
from medhotline.quality.rules import QualityRules, ReviewForm
from medhotline.quality.store import QualityStore, StoredCheck
from recordings.records import RecordSealer, SealedRecord
from routing.statistics import StatsSettings

__all__ = ["CheckRun", "QualityError", "check_calls", "parse_scores", "review_call", "sample_key"]

KEY_BYTES: Final = 32


class QualityError(MedhotlineError):
    pass


@dataclass(frozen=True, slots=True)
class CheckRun:
    checked: int
    flagged: int
    queued: int


def sample_key(path: Path) -> bytes:
    """The sample's secret key, created (0600, write-then-rename) if the file does not exist yet."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(KEY_BYTES))
            os.link(temp, path)  # never replaces a key another run created meanwhile
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()
        data = path.read_bytes()
    except OSError as exc:
        raise QualityError(f"{path}: cannot read the sample key: {exc.strerror or exc}") from None
    if len(data) < 16:
        raise QualityError(f"{path}: the sample key is shorter than 16 bytes")
    return data


def check_calls(
    engine: Engine,
    rules: QualityRules,
    settings: StatsSettings,
    key: bytes,
    now: datetime,
    *,
    since: datetime | None = None,
) -> CheckRun:
    """Check every finished call not yet checked; each is stored once (a second run finds nothing to do)."""
    store = QualityStore.for_engine(engine)
    checked = flagged = queued = 0
    while batch := store.unchecked(since, limit=500):
        facts = store.facts([call_id for call_id, _ in batch], settings)
        for call_id, ended_at in batch:
            flags = check(facts[call_id], rules, emergency_target_seconds=settings.emergency_target_seconds)
            sampled = in_sample(call_id, key, rules.sample_rate)
            stored = StoredCheck(call_id, ended_at, tuple(flags), sampled, sampled or bool(flags))
            if store.store(stored, now):
                checked += 1
                flagged += bool(flags)
                queued += stored.for_review
    return CheckRun(checked, flagged, queued)


def parse_scores(text: str, form: ReviewForm) -> dict[str, int]:
    """``criterion=score,…`` → scores: every criterion of the form exactly once, each within the scale."""
    scores: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise QualityError(f"--scores {part!r}: write criterion=score, separated by commas")
        if name not in form.criteria:
            raise QualityError(f"--scores: unknown criterion {name!r}; the form has {', '.join(form.criteria)}")
        if name in scores:
            raise QualityError(f"--scores: {name} given twice")
        try:
            score = int(value.strip())
        except ValueError:
            raise QualityError(f"--scores: {name}={value.strip()!r} is not a whole number") from None
        if not form.scale.min <= score <= form.scale.max:
            raise QualityError(f"--scores: {name}={score} is outside the scale {form.scale.min}..{form.scale.max}")
        scores[name] = score
    missing = [c for c in form.criteria if c not in scores]
    if missing:
        raise QualityError(f"--scores: missing {', '.join(missing)} (the form scores every criterion)")
    return scores


async def review_call(
    engine: Engine,
    sealer: RecordSealer,
    audit: AuditLog,
    rules: QualityRules,
    *,
    call_id: str,
    scores: Mapping[str, int],
    reviewer: str,
    reason: str,
    now: datetime,
) -> SealedRecord:
    """Authorise (audited), then seal the score as a signed amendment of the call's summary.

    Raises AccessDenied (refused and audited) or QualityError; nothing is stored unless all of it succeeds."""
    reason = check_reason(reason, "--reason")
    access = AccessControl.for_engine(engine, audit)
    decision = await asyncio.to_thread(
        access.authorize, reviewer, "change", Resource("quality_review", call_id=call_id), now, reason=reason
    )
    store = QualityStore.for_engine(engine)
    checked = await asyncio.to_thread(store.check_of, call_id)
    if checked is None:
        raise QualityError(f"call {call_id} has not been checked yet: run `medhotline quality check` first")
    if not checked.for_review:
        raise QualityError(f"call {call_id} is not in the review queue")
    done = await asyncio.to_thread(store.reviewed, call_id)
    if done is not None:
        raise QualityError(f"call {call_id} was reviewed already (signed amendment {done})")
    summary = await asyncio.to_thread(sealer.records.summary_of, call_id)
    if summary is None:
        raise QualityError(f"call {call_id} has no sealed summary yet; review it after the wrap-up has sealed it")
    body: dict[str, Any] = {
        "call": call_id,
        "amends": summary.id,
        "quality_review": {
            "reviewer": reviewer,
            "scores": dict(scores),
            "scale": [rules.form.scale.min, rules.form.scale.max],
            "flags": [{"rule": f.rule, "severity": f.severity} for f in checked.flags],
            "sampled": checked.sampled,
            "reason": reason,
        },
    }
    role = decision.role or "supervisor"
    # The policy audits refusals; an allowed review is audited here, with its reason, before it is sealed.
    details: dict[str, JsonValue] = {"kind": "quality_review", "call": call_id, "summary": summary.id}
    try:
        await asyncio.to_thread(audit.append, actor=reviewer, role=role, action="change", outcome="success",
                                reason=reason, details=details)  # fmt: skip
    except AuditError as exc:
        raise QualityError(f"review not sealed: the audit log could not record it: {exc}") from None
    sealed = await sealer.seal(call_id, "amendment", body, amends=summary.id, agent=reviewer, actor=reviewer,
                               role=role)  # fmt: skip
    await asyncio.to_thread(store.add_review, call_id, reviewer, now, sealed.id)
    return sealed
