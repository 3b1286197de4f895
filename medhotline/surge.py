"""Surge mode in the running service: every node follows the mode stored in the database.

Each node polls the newest ``hotline_modes`` row (one cheap query) on its reload loop. When it changes:

- surge: the profile is parsed, its entry flow is put beside the flow files through the flow registry (validated
  like any flow; a flow that does not validate leaves the node as it was and is logged), the prompts it needs are
  rendered, overflow agents may take the profile's categories, and calls starting from then on begin with the
  bulletin. Queues get the profile's capacity limits.
- normal: the entry flow is removed, overflow agents take nothing, no limits: the configuration as it was.

Calls already in progress keep the flow snapshot they started with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ground.logs import get_logger
from ivr.flow_registry import FlowRegistry
from routing.callback_store import ModeRecord, ModeStore
from routing.engine import RoutingEngine
from routing.surge import SURGE_FLOW, SurgeError, SurgeProfile, overflow_texts, parse_profile

log = get_logger(__name__)

Speak = Callable[[str], Awaitable[str]]


class SurgeState:
    """This node's view of the hotline mode; :meth:`poll` brings it up to date with the database."""

    def __init__(
        self,
        modes: ModeStore,
        flows: FlowRegistry,
        engine: RoutingEngine | None,
        hotline_flow: str,
        speak: Speak,
        *,
        callback_key: str = "",
    ) -> None:
        self._callback_key = callback_key
        self._modes = modes
        self._flows = flows
        self._engine = engine
        self._hotline_flow = hotline_flow
        self._speak = speak
        self._seen = -1
        self.profile: SurgeProfile | None = None

    def entry_flow(self, flow: str) -> str:
        """The flow a new call to ``flow`` starts with: the surge entry flow for the hotline in surge mode."""
        if self.profile is not None and flow == self._hotline_flow and SURGE_FLOW in self._flows.current:
            return SURGE_FLOW
        return flow

    async def poll(self) -> None:
        current_id = await asyncio.to_thread(self._modes.current_id)
        if current_id == self._seen:
            return
        record = await asyncio.to_thread(self._modes.current) if current_id else None
        await self._apply(record)
        self._seen = current_id

    async def _apply(self, record: ModeRecord | None) -> None:
        if record is None or not record.surge:
            if self.profile is not None:
                log.warning("surge.off", switch=record.id if record else None)
            self._flows.set_overlay({})
            self.profile = None
            if self._engine is not None:
                self._engine.set_volunteers(frozenset())
            return
        assert record.profile_text is not None
        assert record.entry_flow is not None
        try:
            profile = parse_profile(record.profile_text, f"surge switch #{record.id}")
        except SurgeError as exc:
            log.error("surge.profile_rejected", switch=record.id, problem=str(exc))
            return
        problems = self._flows.set_overlay({SURGE_FLOW: record.entry_flow})
        if problems:
            log.error("surge.flow_rejected", switch=record.id, problems=len(problems))
            return
        # Render what the callers will hear before the first call needs it.
        for text in [*self._flows.current[SURGE_FLOW].flow.prompt_texts(), *overflow_texts(profile, "")]:
            await self._speak(text)
        for text in overflow_texts(profile, self._callback_key):
            await self._speak(text)
        self.profile = profile
        if self._engine is not None:
            self._engine.set_volunteers(profile.volunteer_categories_set())
        log.warning("surge.on", switch=record.id, profile=profile.name)
