"""Routing's tables: agents, their skills, credentials and ring history (migration ``0005_agents``).

An agent *is* an account (``compliance.accounts.Account``): the agent row adds what routing needs (the PJSIP
endpoint, languages, pause and reservation) and points at the account for roles, departments and the frozen flag,
so freezing the account is what takes the agent out of routing, on every node at once.

The reservation columns are the cross-node lock on an agent: a node owns an agent for one call while
``reserved_call_id`` is set, and only a conditional UPDATE (see ``routing.store.AgentStore.reserve``) sets it.
The CHECK constraints keep each group of columns consistent (all set or all empty) whichever tool wrote them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal, get_args

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

# The accounts table must be on Base.metadata for the foreign keys below to resolve.
import compliance.accounts  # noqa: F401
from ground.models import Base, UTCDateTime

__all__ = ["RING_OUTCOMES", "AgentRing", "AgentRow", "AgentSkill", "CredentialRow", "RingOutcome"]

RingOutcome = Literal["answered", "no_answer", "caller_gone", "released", "failed"]
RING_OUTCOMES: Final[tuple[RingOutcome, ...]] = get_args(RingOutcome)


class AgentRow(Base):
    __tablename__ = "agents"

    account_id: Mapped[str] = mapped_column(String(64), ForeignKey("accounts.id"), primary_key=True)
    # The PJSIP endpoint the telephony side dials (``PJSIP/<endpoint>``).
    endpoint: Mapped[str] = mapped_column(String(64), unique=True)
    # A static SIP URI for phones that do not register (the sandbox's simulated phones); None: dial the endpoint.
    contact: Mapped[str | None] = mapped_column(String(256))
    # Comma-separated language tags, in order of preference.
    languages: Mapped[str] = mapped_column(String(128), default="zh", server_default="zh")
    paused_reason: Mapped[str | None] = mapped_column(String(256))
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reserved_call_id: Mapped[str | None] = mapped_column(String(36))
    reserved_by: Mapped[str | None] = mapped_column(String(64))
    reserved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Why the agent's phone cannot be rung ("not registered", "unreachable"), as the node that saw it last wrote;
    # None: it can. For the wallboard only: routing decides on each node's own view (docs/api.md).
    offline_reason: Mapped[str | None] = mapped_column(String(64))
    offline_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint("endpoint <> ''", name="endpoint"),
        CheckConstraint("languages <> ''", name="languages"),
        CheckConstraint(
            "(reserved_call_id IS NULL AND reserved_by IS NULL AND reserved_at IS NULL) OR "
            "(reserved_call_id IS NOT NULL AND reserved_by IS NOT NULL AND reserved_at IS NOT NULL)",
            name="reservation",
        ),
        CheckConstraint(
            "(paused_reason IS NULL AND paused_at IS NULL) OR (paused_reason IS NOT NULL AND paused_at IS NOT NULL)",
            name="pause",
        ),
        CheckConstraint("(offline_reason IS NULL) = (offline_since IS NULL)", name="offline"),
        Index("ix_agents_reserved_call_id", "reserved_call_id"),
    )


class AgentSkill(Base):
    __tablename__ = "agent_skills"

    account_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("agents.account_id", ondelete="CASCADE"), primary_key=True
    )
    skill: Mapped[str] = mapped_column(String(64), primary_key=True)
    proficiency: Mapped[int] = mapped_column(Integer)

    __table_args__ = (CheckConstraint("proficiency BETWEEN 1 AND 5", name="proficiency"),)


class CredentialRow(Base):
    """A professional credential of an account; never deleted, only revoked (it is evidence of who was allowed)."""

    __tablename__ = "credentials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(64), ForeignKey("accounts.id"))
    kind: Mapped[str] = mapped_column(String(64))
    number: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(String(128))
    valid_from: Mapped[datetime] = mapped_column(UTCDateTime())
    valid_until: Mapped[datetime] = mapped_column(UTCDateTime())
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    verified_by: Mapped[str | None] = mapped_column(String(64))
    # SHA-256 (hex) of the uploaded certificate copy; the copy itself is kept by the hospital's document system.
    certificate_sha256: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_reason: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint("valid_from < valid_until", name="validity_order"),
        CheckConstraint("status IN ('active', 'revoked')", name="status"),
        CheckConstraint(
            "(status = 'active' AND revoked_at IS NULL) OR (status = 'revoked' AND revoked_at IS NOT NULL)",
            name="revocation",
        ),
        CheckConstraint(
            "(verified_at IS NULL AND verified_by IS NULL) OR (verified_at IS NOT NULL AND verified_by IS NOT NULL)",
            name="verification",
        ),
        CheckConstraint("certificate_sha256 IS NULL OR length(certificate_sha256) = 64", name="certificate_sha256"),
        Index("ix_credentials_account_id", "account_id"),
    )


class AgentRing(Base):
    """One ring of an agent's phone for a call: when, from which node, and how it ended."""

    __tablename__ = "agent_rings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(String(36))
    account_id: Mapped[str] = mapped_column(String(64), ForeignKey("agents.account_id"))
    node: Mapped[str] = mapped_column(String(64))
    rung_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    outcome: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (
        CheckConstraint(
            "outcome IS NULL OR outcome IN ('answered', 'no_answer', 'caller_gone', 'released', 'failed')",
            name="outcome",
        ),
        CheckConstraint(
            "(ended_at IS NULL AND outcome IS NULL) OR (ended_at IS NOT NULL AND outcome IS NOT NULL)",
            name="ended",
        ),
        Index("ix_agent_rings_call_id", "call_id"),
        Index("ix_agent_rings_account_id", "account_id"),
        # The agents' statistics over a window (0014_stats).
        Index("ix_agent_rings_rung_at", "rung_at"),
    )
