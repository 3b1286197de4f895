"""Capture in the running service: start and stop recordings, hand finished files to ingest, seal records.

Two ways a call is recorded, both writing ``<name>.wav`` into Asterisk's recording spool:

- the conversation: when caller and agent are joined, the mixing bridge is recorded (``POST
  /bridges/{id}/record``), so both parties are in one file from the moment the agent joins;
- a recorded flow step (``consent``) or, with ``recordings.record_ivr``, the IVR part: through the call
  channel's own recording (ARI snoop channel, or MixMonitor over FastAGI), see ``telephony.channel``.

Every recording is registered in the database *before* Asterisk is asked to start it, so a crash leaves a row
to resume from. When it stops, the file is awaited (Asterisk closes it asynchronously), the row is marked
finished and the ingest runs in the background. The call's summary is sealed after the wrap-up, once the
call's recordings are stored; a consent as soon as its recording is.

A recording that can't start never drops the caller: the call goes on, and the failure is logged as an error
(the operator must see an unrecorded call) and left in the row.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from ground.db import DatabaseUnavailable
from ground.db_retry import while_unavailable
from ground.errors import MedhotlineError
from ground.logs import get_logger
from recordings.ingest import Ingestor
from recordings.records import RecordSealer
from recordings.signed import format_time
from recordings.store import RecordingRow, RecordingStore
from telephony.ari_client import AriClient, AriError, AriNotFound
from telephony.channel import CallChannel, ChannelError
from telephony.ports import ConsentExchange

log = get_logger(__name__)

# Asterisk closes a recording's file a moment after it is told to stop; this long at most is waited for it.
FILE_SETTLE_TIMEOUT: Final = 10.0
_SETTLE_POLL: Final = 0.2


def _retrying(doing: str) -> Callable[[DatabaseUnavailable, float], None]:
    def warn(exc: DatabaseUnavailable, pause: float) -> None:
        log.warning("recording.database_retry", doing=doing, reason=str(exc), pause=pause)

    return warn


async def wait_for_file(path: Path, timeout: float = FILE_SETTLE_TIMEOUT) -> bool:
    """True once ``path`` exists and its size has stopped changing (Asterisk has finished writing it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = -1
    while loop.time() < deadline:
        size = await asyncio.to_thread(_size, path)
        if size >= 0 and size == last:
            return True
        last = size
        await asyncio.sleep(_SETTLE_POLL)
    return await asyncio.to_thread(path.exists)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


@dataclass
class _CallState:
    ingests: list[asyncio.Task[None]] = field(default_factory=list)
    patient_id: str | None = None
    department: str | None = None


class CallRecordings:
    """One per service node (see the module docstring)."""

    def __init__(
        self,
        store: RecordingStore,
        ingestor: Ingestor,
        sealer: RecordSealer | None,
        *,
        department: str,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._store = store
        self._ingestor = ingestor
        self._sealer = sealer
        self._department = department
        self._tasks: set[asyncio.Task[None]] = set()
        self._ingesting: set[str] = set()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._calls: dict[str, _CallState] = {}

    @property
    def store(self) -> RecordingStore:
        return self._store

    @property
    def ingestor(self) -> Ingestor:
        return self._ingestor

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Background work (ingest, sealing) that outlives the call's task; drained by :meth:`drain`."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float) -> None:
        """At shutdown: let ingests and seals finish; what doesn't is resumed at the next start."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _state(self, call_id: str) -> _CallState:
        return self._calls.setdefault(call_id, _CallState())

    def identify(self, call_id: str, patient_id: str | None, department: str | None = None) -> None:
        """The IVR identified the caller: the call's recordings belong to that patient (access scope)."""
        state = self._state(call_id)
        state.patient_id, state.department = patient_id, department
        self.spawn(self._link_patient(call_id, patient_id, department))

    async def _link_patient(self, call_id: str, patient_id: str | None, department: str | None) -> None:
        try:
            await while_unavailable(
                self._store.set_patient, call_id, patient_id, department, on_retry=_retrying("link patient")
            )
        except MedhotlineError:
            log.exception("recording.link_patient_failed")

    async def _begin(self, call_id: str, kind: str) -> RecordingRow:
        state = self._state(call_id)
        return await asyncio.to_thread(
            self._store.begin,
            call_id,
            kind,
            self._clock(),
            patient_id=state.patient_id,
            department=state.department or (None if state.patient_id else self._department),
        )

    # --- the conversation (bridge) ---------------------------------------------------------------------------

    async def start_bridge(self, ari: AriClient, bridge_id: str, call_id: str) -> RecordingRow | None:
        """Record the mixing bridge of caller and agent. None (and an error logged) when it can't start."""
        try:
            row = await self._begin(call_id, "conversation")
        except MedhotlineError:
            log.exception("recording.not_started", reason="database")
            return None
        try:
            await ari.request(
                "POST",
                f"/bridges/{bridge_id}/record",
                {"name": row.name, "format": "wav", "ifExists": "fail", "beep": "false", "terminateOn": "none"},
            )
        except ChannelError as exc:
            log.error("recording.not_started", recording_id=row.id, reason=str(exc))
            await self._finished(row, started=False)
            return None
        log.info("recording.started", recording_id=row.id, kind=row.kind)
        return row

    async def stop_bridge(self, ari: AriClient, row: RecordingRow) -> None:
        try:
            await ari.request("POST", f"/recordings/live/{row.name}/stop")
        except AriNotFound:
            pass  # it ended with the conversation (the parties left the bridge): the file is complete
        except AriError as exc:
            log.warning("recording.stop_failed", recording_id=row.id, reason=str(exc))
        await self._finished(row)

    # --- a recorded flow step or the IVR part (the channel's own recording) -----------------------------------

    def recorder(self, call_id: str, kind: str = "consent") -> ChannelRecorder:
        return ChannelRecorder(self, call_id, kind)

    async def _finished(self, row: RecordingRow, *, started: bool = True) -> None:
        """Asterisk was told to stop: once the file is complete, mark it finished and ingest it."""
        spool = self._ingestor.spool_file(row)
        if started:
            await wait_for_file(spool)
        try:
            # Retried through a failover: a finish not recorded would leave the file to the resume loop only.
            await while_unavailable(self._store.finish, row.id, self._clock(), on_retry=_retrying("finish"))
        except MedhotlineError:
            log.exception("recording.finish_failed", recording_id=row.id)
            return
        task: asyncio.Task[None] = asyncio.ensure_future(self._ingest(row.id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._state(row.call_id).ingests.append(task)

    async def _ingest(self, recording_id: str) -> None:
        if recording_id in self._ingesting:
            return
        self._ingesting.add(recording_id)
        try:
            await self._ingestor.ingest(recording_id)
        except Exception:
            # The spool file stays; the resume loop (or `recordings ingest --pending`) retries it.
            log.exception("recording.ingest_failed", recording_id=recording_id)
        finally:
            self._ingesting.discard(recording_id)

    async def resume(self, ari: AriClient, since: datetime) -> int:
        """Finish what a crash, a lost key service or a lost Asterisk left: recordings still marked capturing
        from before ``since`` (this process's start) whose recording Asterisk no longer has live, finished ones
        not yet stored, and stored ones whose plaintext is still in the spool. Returns how many it took up."""
        taken = 0
        for row in await asyncio.to_thread(self._store.pending):
            if row.id in self._ingesting or row.started_at >= since:
                continue
            if row.state == "capturing":
                try:
                    await ari.request("GET", f"/recordings/live/{row.name}")
                    continue  # still recording (a call that survived our restart)
                except AriNotFound:
                    pass
                except ChannelError:
                    continue  # Asterisk unreachable: can't tell yet
                await asyncio.to_thread(self._store.finish, row.id, self._clock())
            await self._ingest(row.id)
            taken += 1
        return taken

    async def resume_loop(self, ari: AriClient, since: datetime, every: float = 60.0) -> None:
        while True:
            try:
                taken = await self.resume(ari, since)
                if taken:
                    log.info("recording.resumed", recordings=taken)
            except Exception:
                log.exception("recording.resume_failed")
            await asyncio.sleep(every)

    async def _stored(self, call_id: str) -> list[RecordingRow]:
        state = self._calls.get(call_id)
        if state is not None and state.ingests:
            await asyncio.gather(*state.ingests, return_exceptions=True)
        return [r for r in await asyncio.to_thread(self._store.for_call, call_id) if r.state == "stored"]

    # --- signed records --------------------------------------------------------------------------------------

    async def consent_given(self, call_id: str, exchange: ConsentExchange) -> None:
        """Seal the consent once its recording is stored (the record names the recording's hash)."""
        try:
            stored = await self._stored(call_id)
            recording = next((r for r in stored if r.name == exchange.recording), None)
            if exchange.recording is not None and recording is None:
                raise MedhotlineError(f"the consent's recording {exchange.recording} was not stored")
            if self._sealer is None:
                raise MedhotlineError("no record sealer configured")
            body = {
                "call": call_id,
                "document": exchange.document,
                "text": exchange.text,
                "confirm_text": exchange.confirm_text,
                "flow": exchange.flow,
                "node": exchange.node,
                "asked_at": format_time(exchange.asked_at),
                "confirmed_at": [format_time(t) for t in exchange.confirmed_at],
                "recording": recording.id if recording else None,
            }
            sealed = await self._sealer.seal_consent(call_id, body, recording)
            log.info("consent.sealed", record_id=sealed.id, document=exchange.document)
        except Exception:
            log.exception("consent.seal_failed", document=exchange.document)

    async def call_ended(self, call_id: str, *, wrap_up: float, answered_by_agent: bool) -> None:
        """After the wrap-up (the agent's time for the note), seal the call's summary; then forget the call."""
        try:
            stored = await self._stored(call_id)
            if not answered_by_agent and not stored:
                return
            await asyncio.sleep(wrap_up)
            stored = await self._stored(call_id)
            if self._sealer is not None:
                sealed = await self._sealer.seal_call_summary(call_id, stored)
                if sealed is not None:
                    log.info("record.summary_sealed", record_id=sealed.id, recordings=len(stored))
        except Exception:
            log.exception("record.summary_failed")
        finally:
            self._calls.pop(call_id, None)


class ChannelRecorder:
    """The IVR's ``CallRecorder`` port for one call: the channel records itself, the row comes first."""

    def __init__(self, recordings: CallRecordings, call_id: str, kind: str) -> None:
        self._recordings = recordings
        self._call_id = call_id
        self._kind = kind
        self._rows: dict[str, RecordingRow] = {}

    async def start(self, channel: CallChannel, label: str) -> str:
        row = await self._recordings._begin(self._call_id, self._kind)
        try:
            await channel.start_recording(row.name)
        except ChannelError:
            await self._recordings._finished(row, started=False)
            raise
        self._rows[row.name] = row
        log.info("recording.started", recording_id=row.id, kind=row.kind, label=label)
        return row.name

    async def stop(self, channel: CallChannel, name: str) -> None:
        row = self._rows.pop(name, None)
        if row is None:
            return
        with contextlib.suppress(ChannelError):
            await channel.stop_recording(name)
        await self._recordings._finished(row)
