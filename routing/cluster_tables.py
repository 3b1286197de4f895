"""The cluster-wide queue's table (migration ``0016_cluster_leases``): every waiting call of every node.

A row is a call waiting for an agent on the node that holds the caller (``node``, under lease ``epoch``). Any
node's dispatcher may choose it; the chooser reserves the agent and marks the row ``offered`` with the agent and
the ring in one transaction (``routing.cluster.ClusterStore.claim``), and the holding node dials. The row goes
when the call is answered or leaves the queue, and back to ``waiting`` when the agent does not answer.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, CheckConstraint, Index, Integer, String, false
from sqlalchemy.orm import Mapped, mapped_column

import ground.leases  # noqa: F401 - node_leases on Base.metadata beside this table
from ground.models import Base, UTCDateTime

__all__ = ["QueuedCall"]


class QueuedCall(Base):
    __tablename__ = "queued_calls"

    call_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    node: Mapped[str] = mapped_column(String(64))
    epoch: Mapped[int] = mapped_column(Integer)
    category: Mapped[str] = mapped_column(String(32))
    priority: Mapped[str] = mapped_column(String(16))
    # The place in the queue: kept when the call is reclassified or handed to a callback.
    enqueued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    callback: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    state: Mapped[str] = mapped_column(String(16), default="waiting", server_default="waiting")
    agent_id: Mapped[str | None] = mapped_column(String(64))
    ring_id: Mapped[int | None] = mapped_column(Integer)
    offered_by: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        CheckConstraint("priority IN ('emergency', 'normal')", name="priority"),
        CheckConstraint("state IN ('waiting', 'offered')", name="state"),
        CheckConstraint(
            "(state = 'waiting' AND agent_id IS NULL AND ring_id IS NULL AND offered_by IS NULL) OR "
            "(state = 'offered' AND agent_id IS NOT NULL AND ring_id IS NOT NULL AND offered_by IS NOT NULL)",
            name="offer",
        ),
        Index("ix_queued_calls_state", "state"),
        Index("ix_queued_calls_node", "node"),
    )
