"""The active scheduler: APScheduler jobs persisted in the database, run by the leader only.

The database rows (plans, reminders) say *what* is due and *when* (``next_due_at``); APScheduler's SQLAlchemy
job store holds one job per due item, so a restart loses none and a job that came due while every node was down
is handled by the misfire policy instead of being forgotten:

- ``coalesce``: several missed runs of one job run once;
- follow-ups: ``misfire_grace_time`` of 12 hours; a follow-up missed by longer is still called once, as soon
  as the calling hours allow (a missed check is worth making late);
- medication reminders: 30 minutes; a reminder missed by longer is skipped (logged) and the next dose's
  reminder scheduled (a dose reminder hours late could make the patient take a double dose).

The leader reconciles rows and jobs every few seconds (a plan added, run-now, ended), and its job functions
advance ``next_due_at`` with a conditional UPDATE: a job that fires twice (a leader that lost its lock, a
restart mid-run) opens its round once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine

from ground.logs import get_logger
from scheduler.leader import LeaderLock

log = get_logger(__name__)

JOB_TABLE: Final = "apscheduler_jobs"
FOLLOWUP_GRACE: Final = timedelta(hours=12)
MEDICATION_GRACE: Final = timedelta(minutes=30)

# The job functions are found by reference ("scheduler.runner:fire"), as a persistent job store requires; they
# reach the running scheduler through this module-level slot, set while a scheduler leads.
_ACTIVE: dict[str, OutreachScheduler] = {}


async def fire(kind: str, subject_id: str, due: str | None = None) -> None:
    """The one job function: a plan or reminder came due (``due``: the due time the job was made for)."""
    active = _ACTIVE.get("leader")
    if active is None:
        log.warning("scheduler.job_without_scheduler", kind=kind)
        return
    await active.fire(kind, subject_id, datetime.fromisoformat(due) if due else None)


async def periodic(name: str) -> None:
    active = _ACTIVE.get("leader")
    if active is not None:
        await active.periodic(name)


Due = tuple[str, str, datetime]  # (kind, subject id, next due at)


class OutreachScheduler:
    """Leads when it holds ``lock``; ``due_items`` lists what should have a job; ``on_fire`` handles a job."""

    def __init__(
        self,
        engine: Engine,
        lock: LeaderLock,
        *,
        due_items: Callable[[], list[Due]],
        on_fire: Callable[[str, str], Awaitable[None]],
        periodic_jobs: dict[str, tuple[float, Callable[[], Awaitable[None]]]] | None = None,
        beat: float = 2.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._engine = engine
        self._lock = lock
        self._due_items = due_items
        self._on_fire = on_fire
        self._periodic = periodic_jobs or {}
        self._beat = beat
        self._clock = clock or (lambda: datetime.now(UTC))
        self._scheduler: AsyncIOScheduler | None = None
        # The due time each job last fired for: the row may not show the advance yet when reconciling.
        self._fired: dict[str, datetime] = {}
        self.leading = asyncio.Event()

    async def fire(self, kind: str, subject_id: str, due: datetime | None = None) -> None:
        if due is not None:
            # Until the row's due time moves on, the reconciliation must not schedule this due time again.
            self._fired[f"{kind}:{subject_id}"] = due
        try:
            await self._on_fire(kind, subject_id)
        except Exception:
            log.exception("scheduler.job_failed", kind=kind, subject_id=subject_id)

    async def periodic(self, name: str) -> None:
        entry = self._periodic.get(name)
        if entry is None:
            return
        try:
            await entry[1]()
        except Exception:
            log.exception("scheduler.periodic_failed", job=name)

    async def run(self) -> None:
        """Until cancelled: try to lead; while leading, run the jobs and keep them in step with the rows."""
        try:
            while True:
                leader = await asyncio.to_thread(self._lock.try_acquire)
                if leader and self._scheduler is None:
                    self._start()
                    _ACTIVE["leader"] = self
                    self.leading.set()
                if leader:
                    try:
                        await asyncio.to_thread(self._reconcile)
                    except Exception:
                        log.exception("scheduler.reconcile_failed")
                    if not await asyncio.to_thread(self._lock.held):
                        self._stop()
                await asyncio.sleep(self._beat)
        finally:
            self._stop()
            await asyncio.to_thread(self._lock.release)

    def _start(self) -> None:
        store = SQLAlchemyJobStore(engine=self._engine, tablename=JOB_TABLE)
        scheduler = AsyncIOScheduler(
            jobstores={"default": store},
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": int(FOLLOWUP_GRACE.total_seconds()),
            },
            timezone=UTC,
        )
        scheduler.start()
        for name, (seconds, _) in self._periodic.items():
            scheduler.add_job(
                periodic, IntervalTrigger(seconds=seconds), args=[name], id=f"periodic:{name}", replace_existing=True
            )
        self._scheduler = scheduler
        log.info("scheduler.leading", periodic=sorted(self._periodic))

    def _stop(self) -> None:
        if self._scheduler is not None:
            with contextlib.suppress(Exception):
                self._scheduler.shutdown(wait=False)
            self._scheduler = None
            log.info("scheduler.stopped_leading")
        if _ACTIVE.get("leader") is self:
            del _ACTIVE["leader"]
        self.leading.clear()

    def _reconcile(self) -> None:
        """Every due item has exactly one job at its due time; jobs of ended items go."""
        scheduler = self._scheduler
        if scheduler is None:
            return
        wanted = {f"{kind}:{subject}": (kind, subject, due) for kind, subject, due in self._due_items()}
        jobs: dict[str, Any] = {job.id: job for job in scheduler.get_jobs() if not job.id.startswith("periodic:")}
        for job_id in jobs:
            if job_id not in wanted:
                scheduler.remove_job(job_id)
        for job_id, (kind, subject, due) in wanted.items():
            job = jobs.get(job_id)
            if job is not None and job.next_run_time is not None and job.next_run_time == due:
                continue
            if job is None and self._fired.get(job_id) == due:
                continue  # fired for this due time already; its job function is moving the row on
            grace = MEDICATION_GRACE if kind == "medication" else FOLLOWUP_GRACE
            scheduler.add_job(
                fire,
                DateTrigger(run_date=due),
                args=[kind, subject, due.isoformat()],
                id=job_id,
                replace_existing=True,
                misfire_grace_time=int(grace.total_seconds()),
            )
