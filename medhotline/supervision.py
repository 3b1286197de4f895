"""Supervisor actions: listen, whisper, barge, pause, unpause, escalate; one place for the API and the CLI.

Each is decided by the one access policy (kind ``supervision``, action ``change``: supervisors only, a reason
every time; a refusal is audited by the policy) and audited *before* it is done, with the reason, the call and the
agent, so no supervisor is ever in a call without an audit entry. The telephony is ``routing.ari_supervision``
over the decisions of ``routing.supervision``; the supervisor's phone is their own agent row's PJSIP endpoint
(``medhotline agents add`` with the supervisor's account; kept paused so it is never offered calls).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sqlalchemy import Engine

from compliance.access import AccessError, Resource, check_call_id, check_reason, reason_problem
from compliance.access_records import AccessDenied
from compliance.access_store import AccessControl
from compliance.audit import AuditError, AuditLog, JsonValue
from ground import db
from routing.ari_supervision import PhoneSettings, ask_escalation, bridge_channels, connect, watch
from routing.store import AgentError, AgentStore
from routing.supervision import (
    SupervisionError,
    Tap,
    check_mode,
    conversation_bridge,
    holding_bridge,
    tap,
    waiting_caller,
)
from telephony.ari_client import AriClient

__all__ = ["ACTIONS", "AccessDenied", "Supervision", "SupervisionError", "Supervisor", "authorize_supervisor"]

ACTIONS: Final = ("listen", "whisper", "barge", "pause", "unpause", "escalate")


@dataclass(frozen=True, slots=True)
class Supervisor:
    """Who acts: the account, and the access-policy session it signed in with (the API's), if any."""

    account_id: str
    session_id: str | None = None


def authorize_supervisor(
    access: AccessControl, who: Supervisor, reason: str | None, what: str, at: datetime
) -> tuple[str, str]:
    """(role, reason) if the policy lets ``who`` step in (kind ``supervision``, change) with ``reason``.

    The role is decided first, whatever the reason: anyone but a supervisor gets AccessDenied (audited by the
    policy), even with no or an unusable reason, so a refusal never depends on how the request was filled in. A
    supervisor without a usable reason gets SupervisionError ``bad_request`` (the policy audits it as a denial
    for want of a reason; the unusable text itself is not written anywhere)."""
    usable = reason if reason is not None and reason.strip() and reason_problem(reason) is None else None
    try:
        decision = access.authorize(who.account_id, "change", Resource("supervision"), at, reason=usable,
                                    session_id=who.session_id, record_allowed=False)  # fmt: skip
    except AccessDenied as exc:
        if exc.decision is None or exc.decision.denial != "reason_required":
            raise
        try:
            check_reason(reason, "reason")
        except AccessError as problem:
            raise SupervisionError("bad_request", f"{what}: {problem}") from None
        raise  # a usable reason that the policy still wants: not expected, refuse as the policy said
    if usable is None:  # the policy asks a reason of every supervision; never step in without one
        raise SupervisionError("bad_request", f"{what}: a reason is required")
    return decision.role or "supervisor", usable.strip()


class Supervision:
    """Over one database, audit log and ARI client (REST only)."""

    def __init__(
        self,
        engine: Engine,
        audit: AuditLog,
        ari: AriClient,
        clock: Callable[[], datetime],
        phone: PhoneSettings | None = None,
    ) -> None:
        self._engine = engine
        self._audit = audit
        self.ari = ari
        self._clock = clock
        self._phone = phone or PhoneSettings()
        self._access = AccessControl.for_engine(engine, audit)
        self._agents = AgentStore.for_engine(engine)
        self._calls = db.CallRepository.for_engine(engine)

    # -- the checks every action makes first ------------------------------------------------------
    async def _authorize(self, who: Supervisor, reason: str | None, target: str) -> tuple[str, str]:
        """(role, reason) once the policy allows it; see :func:`authorize_supervisor`."""
        return await asyncio.to_thread(authorize_supervisor, self._access, who, reason, target, self._clock())

    async def _record(self, who: Supervisor, role: str, reason: str, details: dict[str, JsonValue]) -> None:
        entry: dict[str, JsonValue] = {"kind": "supervision", **details}
        try:
            await asyncio.to_thread(self._audit.append, actor=who.account_id, role=role, action="change",
                                    outcome="success", reason=reason, details=entry)  # fmt: skip
        except AuditError as exc:
            raise SupervisionError("bad_request", f"not done: the audit log could not record it: {exc}") from None

    async def _known_call(self, call_id: str) -> str:
        try:
            check_call_id(call_id)
        except AccessError as exc:
            raise SupervisionError("unknown_call", str(exc)) from None
        if await asyncio.to_thread(self._calls.get, call_id) is None:
            raise SupervisionError("unknown_call", f"no call {call_id!r}")
        return call_id

    # -- listen, whisper, barge -------------------------------------------------------------------
    async def step_in(
        self, who: Supervisor, mode: str, call_id: str, reason: str | None
    ) -> tuple[Tap, asyncio.Task[None]]:
        """Connect the supervisor's phone to the call as ``mode`` says. Returns the tap and the task that watches
        it (it ends, and takes everything down, when the supervisor or the call hangs up)."""
        checked = check_mode(mode)
        role, text = await self._authorize(who, reason, checked)
        await self._known_call(call_id)
        try:
            endpoint = (await asyncio.to_thread(self._agents.view, who.account_id)).agent.endpoint
        except AgentError:
            raise SupervisionError(
                "no_phone", f"{who.account_id} has no phone: add it as an agent row with its PJSIP endpoint"
            ) from None
        planned = tap(checked, call_id, await bridge_channels(self.ari, conversation_bridge(call_id)),
                      secrets.token_hex(8))  # fmt: skip
        agent = await asyncio.to_thread(self._agent_of, call_id)
        await self._record(who, role, text, {"action": checked, "call": call_id, "agent": agent,
                                             "spy": planned.spy, "whisper": planned.whisper})  # fmt: skip
        await connect(self.ari, planned, endpoint, self._phone)
        return planned, asyncio.create_task(watch(self.ari, planned, self._phone))

    def _agent_of(self, call_id: str) -> str | None:
        """The agent who answered the call (its ring history), for the audit entry."""
        answered = [r.account_id for r in self._agents.rings(call_id) if r.outcome == "answered"]
        return answered[-1] if answered else None

    # -- agents and the queue ---------------------------------------------------------------------
    async def pause(self, who: Supervisor, agent_id: str, reason: str | None) -> None:
        role, text = await self._authorize(who, reason, "pause")
        await self._agent(agent_id)
        await self._record(who, role, text, {"action": "pause", "agent": agent_id})
        await asyncio.to_thread(self._agents.pause, agent_id, text, self._clock())

    async def unpause(self, who: Supervisor, agent_id: str, reason: str | None) -> None:
        role, text = await self._authorize(who, reason, "unpause")
        await self._agent(agent_id)
        await self._record(who, role, text, {"action": "unpause", "agent": agent_id})
        await asyncio.to_thread(self._agents.unpause, agent_id, self._clock())

    async def escalate(self, who: Supervisor, call_id: str, reason: str | None) -> None:
        """Ask the call's queue task to move the waiting call to the emergency queue (it keeps its arrival time;
        the call's path records ``reclassified`` by ``supervisor``)."""
        role, text = await self._authorize(who, reason, "escalate")
        await self._known_call(call_id)
        if await asyncio.to_thread(self._calls.call_priority, call_id) == "emergency":
            raise SupervisionError("not_waiting", f"call {call_id} is an emergency already")
        caller = waiting_caller(call_id, await bridge_channels(self.ari, holding_bridge(call_id)))
        await self._record(who, role, text, {"action": "escalate", "call": call_id})
        await ask_escalation(self.ari, caller)

    async def _agent(self, agent_id: str) -> None:
        try:
            await asyncio.to_thread(self._agents.view, agent_id)
        except AgentError:
            raise SupervisionError("bad_request", f"no agent {agent_id!r}") from None
