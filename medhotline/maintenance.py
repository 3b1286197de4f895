"""The service's background duties besides calls: patient directory connection, signed audit heads, the daily
credential check, closing expired break-glass grants.

Each runs as its own task and never takes the service down: a failure is logged and retried. The hotline keeps
answering calls when the key service is away (callers are then simply not identified; every flow has a
not-found path), because a patient in distress must reach a person even when a back-office part is down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy.orm import sessionmaker

from compliance.access_store import AccessControl
from compliance.audit import AuditLog, Ed25519Signer, SqlAuditStore
from compliance.audit_witness import HeadWitness
from compliance.keyservice_protocol import KeyServiceError
from ground import db
from ground.config import Config
from ground.logs import get_logger
from his import open_patient_directory
from his.link import HisLink, open_his_link, start_adt_listener
from his.messages import Ack
from his.outbox import AnswerHook
from his.transport import MllpServer
from routing.store import AgentStore
from routing.validity import validity_report
from scheduler.vaccination import VaccinationStore
from telephony.ports import HisMessages, PatientDirectory

if TYPE_CHECKING:
    from his.directory import PatientServices

log = get_logger(__name__)

# How often the audit log's tree head is signed (a head is signed only when entries were appended).
AUDIT_HEAD_INTERVAL = 60.0
DIRECTORY_RETRY = 15.0
CREDENTIAL_CHECK_INTERVAL = 24 * 3600.0
BREAK_GLASS_SWEEP_INTERVAL = 60.0


async def connect_patient_directory(
    config: Config,
    install: Callable[[PatientDirectory], None],
    *,
    ready: Callable[[PatientServices], None] | None = None,
    his_ready: Callable[[HisMessages], None] | None = None,
) -> None:
    """Open the patient registry through the key service, retrying until it answers; ``install`` gets its IVR
    directory, ``ready`` the registry services themselves (outreach reads numbers and birth years through them).

    Runs until cancelled; the connection is closed then.
    """

    services = None
    link: HisLink | None = None
    listener: MllpServer | None = None
    try:
        while services is None:
            try:
                services = await open_patient_directory(config)
            except (KeyServiceError, db.DatabaseError) as exc:
                log.error("patients.directory_unavailable", reason=str(exc), retry_in=DIRECTORY_RETRY)
                await asyncio.sleep(DIRECTORY_RETRY)
        # With the HIS configured, callers are identified by PDQ first and the outbox is sent from this node.
        link = open_his_link(config, services, on_answer=booking_answers(services)) if config.his.enabled else None
        if config.his.enabled:
            # The HIS's ADT keep the registry current; a listener that cannot bind (port taken) is an error in
            # the log, and the rest of the HIS link (PDQ, outbox) goes on: callers are still identified.
            try:
                started = await start_adt_listener(config, services)
            except OSError as exc:
                log.error("his.listener_failed", port=config.his.listen_port, reason=exc.strerror or str(exc))
                started = None
            if started is not None:
                listener = started[0]
                log.info("his.listener_started", port=started[1], tls=config.his.listen_cert_file is not None)
        install(services.directory if link is None else link.directory)
        if link is not None and his_ready is not None:
            his_ready(link.producer)
        if ready is not None:
            ready(services)
        log.info("patients.directory_ready", his=link is not None)
        if link is not None:
            await link.run_sender()
        await asyncio.Event().wait()  # hold the connection until the service stops
    finally:
        # The listener first: no ADT may arrive while the registry's connection closes under it.
        if listener is not None:
            await listener.aclose()
            log.info("his.listener_stopped")
        if link is not None:
            await link.aclose()
        if services is not None:
            await services.aclose()


def booking_answers(services: PatientServices) -> AnswerHook:
    """The outbox's answer hook: an appointment (SIU) becomes ``confirmed`` on AA, ``refused`` with where and why
    (location and code, never the HIS's free text) on AR or a final AE."""
    store = VaccinationStore.for_engine(services.engine)

    async def answered(control_id: str, message_type: str, ack: Ack) -> None:
        if not message_type.startswith("SIU^"):
            return
        reason = f"{ack.code} {ack.location} {ack.error_code}".strip()
        booking = await asyncio.to_thread(store.record_his_answer, control_id, ack.accepted, reason)
        log.info("his.booking_answered", control_id=control_id, ack=ack.code, booking_id=booking)

    return answered


async def sign_audit_heads(config: Config, interval: float = AUDIT_HEAD_INTERVAL) -> None:
    """Sign the audit log's tree head every ``interval`` and once more when stopped, so an auditor can check
    every entry against a signed head. Refusals (the log does not extend the last head) are loud errors."""

    signer = Ed25519Signer.load_or_create(config.audit_key_dir)
    # Remembered beside the key and published to the witness file, so a rollback can't pass `audit verify`.
    witness = HeadWitness(config.audit_key_dir, config.audit_witness_file)
    engine = db.make_engine(config.database_url)
    audit = AuditLog(SqlAuditStore(engine))

    async def sign() -> None:
        try:
            head = await asyncio.to_thread(lambda: audit.sign_head(signer, witness=witness))
            log.debug("audit.head_signed", size=head.size)
        except Exception:
            log.exception("audit.head_signing_failed")

    try:
        while True:
            await asyncio.sleep(interval)
            await sign()
    finally:
        await asyncio.shield(sign())
        engine.dispose()


async def check_credentials_daily(config: Config, interval: float = CREDENTIAL_CHECK_INTERVAL) -> None:
    """Report expired, expiring (30 days), unverified and revoked credentials at start and then daily.

    Routing never depends on this report: every decision checks validity itself. The report is for the people
    who renew licences before they lapse.
    """

    engine = db.make_engine(config.database_url)
    store = AgentStore(sessionmaker(engine, expire_on_commit=False))
    try:
        while True:
            try:
                report = await asyncio.to_thread(validity_report, store, datetime.now(UTC))
                if report.needs_attention:
                    log.warning("credentials.need_attention", summary=report.summary())
                else:
                    log.info("credentials.checked", summary=report.summary())
            except Exception:
                log.exception("credentials.check_failed")
            await asyncio.sleep(interval)
    finally:
        engine.dispose()  # closed when the service stops, not left to the garbage collector


async def sweep_break_glass(config: Config, interval: float = BREAK_GLASS_SWEEP_INTERVAL) -> None:
    """Close and audit expired break-glass grants. Expired grants are refused at check time anyway; the sweep
    puts each end on record (and into the supervisors' review list) within ``interval``."""

    engine = db.make_engine(config.database_url)
    access = AccessControl.for_engine(engine)
    try:
        while True:
            try:
                closed = await asyncio.to_thread(access.sweep_break_glass, datetime.now(UTC))
                if closed:
                    log.info("break_glass.expired_closed", count=len(closed))
            except Exception:
                log.exception("break_glass.sweep_failed")
            await asyncio.sleep(interval)
    finally:
        engine.dispose()
