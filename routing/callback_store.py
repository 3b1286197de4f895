"""Callbacks and the hotline's mode in the database (see ``routing.callback_tables``).

The stores hold what they are given: the number arrives already encrypted and blind-indexed (the application does
that through the key service, ``medhotline.callbacks``), so nothing here ever sees it in clear. Each public method
is one short transaction; state changes are conditional UPDATEs, so two nodes or a retried step never dial one
callback twice or lose one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from ground.db import DatabaseError, Repository, rowcount
from routing.callback_tables import OPEN_STATES, CallbackRow, HotlineModeRow

__all__ = ["CallbackError", "CallbackRecord", "CallbackStore", "ModeRecord", "ModeStore", "SwitchConflict"]

_REASON_MAX: Final = 256


class CallbackError(DatabaseError):
    """A callback or mode operation that cannot be done; the message says which and why (never a number)."""


class SwitchConflict(CallbackError):
    """Another switch of the hotline's mode was made at the same moment; nothing was changed by this one."""


@dataclass(frozen=True, slots=True)
class CallbackRecord:
    id: str
    call_id: str
    node: str
    category: str
    priority: str
    requested_at: datetime
    patient_id: str | None
    state: str
    attempts: int
    next_attempt_at: datetime
    attempt_call_id: str | None
    agent_id: str | None
    last_outcome: str | None
    task_id: str | None
    data_key_id: int
    phone_bidx: str


def _record(row: CallbackRow) -> CallbackRecord:
    return CallbackRecord(
        row.id, row.call_id, row.node, row.category, row.priority, row.requested_at, row.patient_id, row.state,
        row.attempts, row.next_attempt_at, row.attempt_call_id, row.agent_id, row.last_outcome, row.task_id,
        row.data_key_id, row.phone_bidx,
    )  # fmt: skip


class CallbackStore(Repository):
    def create(
        self,
        *,
        callback_id: str,
        call_id: str,
        node: str,
        category: str,
        priority: str,
        requested_at: datetime,
        phone_enc: str,
        phone_bidx: str,
        data_key_id: int,
        patient_id: str | None,
        at: datetime,
    ) -> bool:
        """Store a new pending callback; False (nothing stored) when the number already has an open one."""
        if priority not in ("normal", "emergency"):
            raise CallbackError(f"callback priority {priority!r}: expected normal or emergency")
        if self.open_for(phone_bidx) is not None:
            return False
        row = CallbackRow(
            id=callback_id, call_id=call_id, node=node, category=category, priority=priority,
            requested_at=requested_at, phone_enc=phone_enc, phone_bidx=phone_bidx, data_key_id=data_key_id,
            patient_id=patient_id, state="pending", attempts=0, next_attempt_at=at, created_at=at, updated_at=at,
        )  # fmt: skip
        try:
            with self._sessions.begin() as session:
                session.add(row)
        except IntegrityError:
            # Another node stored one for this number a moment ago: the partial unique index refused ours.
            if self.open_for(phone_bidx) is not None:
                return False
            raise CallbackError(f"storing callback {callback_id} was refused by the schema") from None
        return True

    def open_for(self, phone_bidx: str) -> str | None:
        """The id of the number's open (pending or dialling) callback, if any."""
        with self._transaction("looking up an open callback") as session:
            return session.scalar(
                select(CallbackRow.id).where(CallbackRow.phone_bidx == phone_bidx, CallbackRow.state.in_(OPEN_STATES))
            )

    def get(self, callback_id: str) -> CallbackRecord:
        with self._transaction(f"reading callback {callback_id}") as session:
            row = session.get(CallbackRow, callback_id)
            if row is None:
                raise CallbackError(f"no callback {callback_id}")
            return _record(row)

    def token(self, callback_id: str) -> tuple[str, int]:
        """The encrypted number and its data key id (for decryption by the application, audited there)."""
        with self._transaction(f"reading the number token of callback {callback_id}") as session:
            row = session.get(CallbackRow, callback_id)
            if row is None:
                raise CallbackError(f"no callback {callback_id}")
            return row.phone_enc, row.data_key_id

    def pending(self, node: str) -> list[CallbackRecord]:
        """This node's callbacks waiting to be dialled, by place."""
        with self._transaction("listing pending callbacks") as session:
            rows = session.scalars(
                select(CallbackRow)
                .where(CallbackRow.node == node, CallbackRow.state == "pending")
                .order_by(CallbackRow.requested_at, CallbackRow.id)
            )
            return [_record(r) for r in rows]

    def listing(self, *, open_only: bool = False) -> list[CallbackRecord]:
        with self._transaction("listing callbacks") as session:
            query = select(CallbackRow).order_by(CallbackRow.requested_at, CallbackRow.id)
            if open_only:
                query = query.where(CallbackRow.state.in_(OPEN_STATES))
            return [_record(r) for r in session.scalars(query)]

    def claim(self, callback_id: str, attempt_call_id: str, agent_id: str, at: datetime) -> bool:
        """pending → dialling, one more attempt, for the agent reserved for it; False if it was not pending."""
        return self._change(
            callback_id,
            ("pending",),
            "claiming",
            state="dialling",
            attempts=CallbackRow.attempts + 1,
            attempt_call_id=attempt_call_id,
            agent_id=agent_id,
            updated_at=at,
        )

    def connected(self, callback_id: str, at: datetime) -> bool:
        """The patient answered: the callback is done (the conversation is the call's business now)."""
        return self._change(
            callback_id, ("dialling",), "finishing", state="connected", last_outcome="answered", updated_at=at
        )

    def attempt_failed(self, callback_id: str, outcome: str, retry_at: datetime | None, at: datetime) -> bool:
        """dialling → pending again at ``retry_at``, or → failed (None) when no attempt is left."""
        outcome = outcome[:32]
        if retry_at is None:
            return self._change(
                callback_id, ("dialling",), "failing", state="failed", last_outcome=outcome, updated_at=at,
                attempt_call_id=None,
            )  # fmt: skip
        return self._change(
            callback_id, ("dialling",), "rescheduling", state="pending", last_outcome=outcome,
            next_attempt_at=retry_at, attempt_call_id=None, agent_id=None, updated_at=at,
        )  # fmt: skip

    def cancel(self, callback_id: str, at: datetime) -> bool:
        return self._change(callback_id, OPEN_STATES, "cancelling", state="cancelled", updated_at=at)

    def set_task(self, callback_id: str, task_id: str) -> None:
        with self._transaction(f"linking callback {callback_id} to its task") as session:
            session.execute(update(CallbackRow).where(CallbackRow.id == callback_id).values(task_id=task_id))

    def recover(self, node: str, at: datetime) -> list[str]:
        """Callbacks this node was dialling when it stopped: pending again (the attempt is counted as made)."""
        with self._transaction(f"recovering the callbacks of node {node}") as session:
            ids = list(
                session.scalars(select(CallbackRow.id).where(CallbackRow.node == node, CallbackRow.state == "dialling"))
            )
            if ids:
                session.execute(
                    update(CallbackRow)
                    .where(CallbackRow.id.in_(ids), CallbackRow.state == "dialling")
                    .values(state="pending", last_outcome="interrupted", attempt_call_id=None, agent_id=None,
                            next_attempt_at=at, updated_at=at)
                )  # fmt: skip
            return ids

    def _change(self, callback_id: str, states: tuple[str, ...], doing: str, **values: object) -> bool:
        with self._transaction(f"{doing} callback {callback_id}") as session:
            result = session.execute(
                update(CallbackRow).where(CallbackRow.id == callback_id, CallbackRow.state.in_(states)).values(**values)
            )
            return bool(rowcount(result))


# --- the hotline's mode ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModeRecord:
    id: int
    mode: str
    profile_name: str | None
    profile_text: str | None
    entry_flow: str | None
    previous_id: int | None
    actor: str
    reason: str
    at: datetime

    @property
    def surge(self) -> bool:
        return self.mode == "surge"

    def configuration(self) -> tuple[str, str | None, str | None, str | None]:
        """What is in force (mode, profile name, profile text, entry flow): equal before a surge and after it."""
        return self.mode, self.profile_name, self.profile_text, self.entry_flow


def _mode(row: HotlineModeRow) -> ModeRecord:
    return ModeRecord(
        row.id, row.mode, row.profile_name, row.profile_text, row.entry_flow, row.previous_id, row.actor, row.reason,
        row.at,
    )  # fmt: skip


def _check_reason(reason: str) -> str:
    text = reason.strip()
    if not text:
        raise CallbackError("a reason is required (it is kept with the switch and in the audit trail)")
    if len(text) > _REASON_MAX:
        raise CallbackError(f"the reason is longer than {_REASON_MAX} characters")
    return text


class ModeStore(Repository):
    """The hotline's mode history; the newest row is in force (no row yet: normal, as configured)."""

    def current(self) -> ModeRecord | None:
        with self._transaction("reading the hotline mode") as session:
            row = session.scalars(select(HotlineModeRow).order_by(HotlineModeRow.id.desc()).limit(1)).first()
            return None if row is None else _mode(row)

    def current_id(self) -> int:
        """The id of the row in force (0: none yet): a cheap poll for the service's nodes."""
        with self._transaction("polling the hotline mode") as session:
            return int(session.scalar(select(func.coalesce(func.max(HotlineModeRow.id), 0))) or 0)

    def history(self) -> list[ModeRecord]:
        with self._transaction("reading the hotline mode history") as session:
            return [_mode(r) for r in session.scalars(select(HotlineModeRow).order_by(HotlineModeRow.id))]

    def surge_on(
        self, *, profile_name: str, profile_text: str, entry_flow: str, actor: str, reason: str, at: datetime
    ) -> ModeRecord:
        """Surge mode with this profile; refused when surge mode is already on (switch off first)."""
        why = _check_reason(reason)
        current = self.current()
        if current is not None and current.surge:
            raise CallbackError(
                f"surge mode is already on (profile {current.profile_name}, since {current.at:%Y-%m-%d %H:%M} UTC); "
                "switch it off first"
            )
        return self._insert(
            HotlineModeRow(
                mode="surge", profile_name=profile_name, profile_text=profile_text, entry_flow=entry_flow,
                replaces=current.id if current else 0, previous_id=current.id if current else None, actor=actor,
                reason=why, at=at,
            )
        )  # fmt: skip

    def surge_off(self, *, actor: str, reason: str, at: datetime) -> ModeRecord:
        """Back to exactly what was in force before the surge (normal, as configured, if nothing was stored)."""
        why = _check_reason(reason)
        current = self.current()
        if current is None or not current.surge:
            raise CallbackError("surge mode is not on")
        before = None
        if current.previous_id is not None:
            with self._transaction("reading the mode before the surge") as session:
                row = session.get(HotlineModeRow, current.previous_id)
                before = None if row is None else _mode(row)
        mode, name, text, flow = before.configuration() if before else ("normal", None, None, None)
        return self._insert(
            HotlineModeRow(
                mode=mode, profile_name=name, profile_text=text, entry_flow=flow, replaces=current.id,
                previous_id=before.id if before else None, actor=actor, reason=why, at=at,
            )
        )  # fmt: skip

    def _insert(self, row: HotlineModeRow) -> ModeRecord:
        try:
            with self._sessions.begin() as session:
                session.add(row)
                session.flush()
                return _mode(row)
        except IntegrityError:
            raise SwitchConflict(
                "another switch of the hotline mode was made at the same moment; run `medhotline surge status`"
            ) from None
