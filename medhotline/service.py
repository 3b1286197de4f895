"""``medhotline serve``: the hotline service wired together.

One asyncio process per node. ARI is the primary path (Stasis app ``medhotline``), FastAGI serves legacy
dialplans, AMI watches Asterisk itself. Every call runs as its own task with ``call_id`` bound in the log
context; a call's failure is recorded and logged, never allowed to take other calls or the service down.
When Asterisk goes away the service keeps running and reconnects with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from compliance.access_store import AccessControl
from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import LazyKeyService
from ground import db
from ground.config import Config
from ground.db_at_once import make_at_once_writer
from ground.logs import get_logger
from his.directory import PatientServices
from his.tables import PatientStore
from ivr.fastagi import FastAgiCallChannel
from ivr.fastagi import start_server as start_fastagi
from ivr.flow_loader import FlowError
from ivr.flow_registry import FlowRegistry
from ivr.prompts import Voice, sound_name
from keywords.admission import budgeted
from keywords.lexicon import DEFAULT_LEXICON_DIR, LexiconError
from keywords.recognizer import ScriptedSpeech, SpeechEngine, StreamingRecognizer, registry_classifier
from keywords.registry import LexiconRegistry
from keywords.remote_speech import RemoteSettings, RemoteSpeech
from keywords.speech import SpeechModel
from medhotline import maintenance
from medhotline.ami import AmiMonitor
from medhotline.ari_events import AriEventRouter
from medhotline.asterisk_config import AsteriskCredentials, secure_endpoint_lines
from medhotline.call_lifecycle import (
    OVERFLOW_KEY_WAIT,
    QUEUE_ARG,
    QUEUE_CONTEXT,
    QUEUE_OUTCOMES,
    CallLifecycle,
    _AfterWrites,
    _CallConsent,
    _CallWrites,
)
from medhotline.callbacks import CallbackService
from medhotline.orphan_sweep import sweep_orphans, watch_conversation
from medhotline.orphans import KeepConversation
from medhotline.sandbox import Sandbox, asterisk_client_ssl
from medhotline.surge import SurgeState
from recordings.capture import CallRecordings
from recordings.ingest import Ingestor
from recordings.records import open_sealer
from recordings.retention import RetentionPolicy
from recordings.store import RecordingStore
from routing.agent_endpoints import FILE_NAME, ContactView, render_agent_endpoints
from routing.ari_queue import CallerQueue, EscalationTransfer, QueueSettings
from routing.callback_store import ModeStore
from routing.callbacks import CallbackPolicy
from routing.cluster import ClusterStore
from routing.engine import ClusterLink, EngineSettings, RoutingEngine
from routing.lease import LeaseKeeper, LeaseSettings
from routing.rules import DEFAULT_RULES, load_rules
from routing.store import AgentStore
from scheduler.leader import leader_lock_for
from scheduler.outreach import CallOutreach, Outreach
from scheduler.policy import DialPolicy
from scheduler.runner import OutreachScheduler
from telephony.ari_channel import (
    AriCallChannel,
    AriDispatcher,
)
from telephony.ari_client import AriClient
from telephony.channel import CallChannel
from telephony.ports import (
    HisMessages,
    NoPatientDirectory,
    NoRecognizer,
    PatientDirectory,
    Recognizer,
)

__all__ = [
    "OVERFLOW_KEY_WAIT",
    "QUEUE_ARG",
    "QUEUE_CONTEXT",
    "QUEUE_OUTCOMES",
    "HotlineService",
    "_AfterWrites",
    "_CallConsent",
    "_CallWrites",
    "run_service",
]

log = get_logger(__name__)

SHUTDOWN_GRACE = 20.0


def callback_policy(config: Config) -> CallbackPolicy:
    """``[routing]``'s callback settings (key "" : callbacks off)."""
    rc = config.routing
    return CallbackPolicy(
        threshold=rc.callback_threshold,
        handle_seconds=rc.callback_handle_seconds,
        max_attempts=rc.callback_attempts,
        retry_after=rc.callback_retry_after,
        key=rc.callback_key,
    )


def asterisk_credentials(config: Config) -> AsteriskCredentials:
    """External mode: from the configuration. Sandbox mode: the instance's generated secrets."""
    ast = config.asterisk
    if ast.mode == "external":
        # Both are guaranteed by config validation in external mode.
        assert ast.ari_password is not None
        assert ast.ami_secret is not None
        return AsteriskCredentials(
            ast.ari_username,
            ast.ari_password.get_secret_value(),
            ast.ami_username,
            ast.ami_secret.get_secret_value(),
        )

    return Sandbox(config).credentials()


class HotlineService:
    """The composition root of one node: builds and holds the wiring (ARI, queue, recordings, access, outreach,
    flows, recognizer), runs the loops and shuts down. A call's life is
    :class:`~medhotline.call_lifecycle.CallLifecycle`, the ARI event stream's routing
    :class:`~medhotline.ari_events.AriEventRouter`."""

    def __init__(
        self,
        config: Config,
        repo: db.CallRepository,
        flows: FlowRegistry,
        creds: AsteriskCredentials,
        *,
        recognizer: Recognizer | None = None,
        lexicon: LexiconRegistry | None = None,
        directory: PatientDirectory | None = None,
        engine: RoutingEngine | None = None,
        connect_directory: bool = False,
        access: AccessControl | None = None,
        recordings: CallRecordings | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        # Where an agent's upgrade of a call to emergency is audited (None only in tests of the IVR and routing).
        self.audit = audit
        # Recording, ingest and signed records; None only in tests of the IVR and routing alone.
        self.recordings = recordings
        # Outbound calls and the outreach nodes (set by run_service when [outreach] is enabled).
        self.outreach: Outreach | None = None
        # The hotline's mode from the database (surge or normal), polled on the reload loop; None in unit tests.
        self.surge: SurgeState | None = None
        # Callbacks instead of waiting (set by enable_callbacks when routing and callbacks are on).
        self.callbacks: CallbackService | None = None
        self.scheduler: OutreachScheduler | None = None
        # The access policy: the agent who answers an identified caller may see that patient during the call.
        self.access = access
        # Connect the patient registry (through the key service) when running; tests inject a directory instead.
        self.connect_directory = connect_directory
        self.lexicon = lexicon
        self.config = config
        self.repo = repo
        self.flows = flows
        self.creds = creds
        self.recognizer: Recognizer = recognizer or NoRecognizer()
        self.directory: PatientDirectory = directory or NoPatientDirectory()
        self.voice = Voice(config.prompts.voice, config.prompts.speed)
        self.dispatcher = AriDispatcher()
        self.ari = AriClient(
            config.asterisk.host,
            config.asterisk.ari_connect_port or config.asterisk.ari_port,
            creds.ari_username,
            creds.ari_password,
            config.asterisk.ari_app,
            timeout=config.asterisk.ari_timeout,
            max_connections=config.asterisk.ari_connections,
            rest_transport=config.asterisk.rest_transport,
            ssl_context=asterisk_client_ssl(config),
        )
        self.engine = engine
        # When this process started: calls recorded before it, still in progress, were an earlier process's;
        # channels Asterisk created before it and left in Stasis are what that process left (medhotline.orphans).
        self.started_at = datetime.now(UTC)
        # The sweep of those leftovers and the watchers of the conversations it kept (cancelled at shutdown).
        self._sweeps: set[asyncio.Task[Any]] = set()
        # One call's life (composition: it reads this wiring) and the ARI event router feeding it.
        self.calls = CallLifecycle(self)
        self.events = AriEventRouter(
            lambda: self.ari,
            self.dispatcher,
            default_flow=lambda: self.config.hotline.flow,
            on_call=self.calls.handle_call,
            on_handed_over=self.calls.handle_handed_over,
            spawn=self.calls.spawn,
            on_first_connect=self._sweep_leftovers,
        )
        self.queue: CallerQueue | None = None
        if engine is not None:
            rc = config.routing
            self.queue = CallerQueue(
                self.ari,
                self.dispatcher,
                engine,
                settings=QueueSettings(
                    ring_timeout=rc.ring_timeout,
                    first_announcement=rc.first_announcement,
                    announce_every=rc.announce_every,
                    moh_class=rc.moh_class,
                    agent_caller_id=config.hotline.number,
                    emergency_key=rc.emergency_key,
                    upgrade_keys=rc.upgrade_keys,
                    callback=callback_policy(config),
                ),
                sound=lambda text: sound_name(text, self.voice),
                escalation_groups={
                    name: EscalationTransfer(g.number, g.trunk, g.ring_seconds, g.then_number, g.then_trunk)
                    for name, g in rc.escalation_groups.items()
                },
                recorder=recordings,
                on_upgrade=self.calls.upgraded,
            )

    # -- the parts' entry points, kept here for callers ---------------------------------------------

    async def handle_call(
        self, channel: CallChannel, *, flow: str | None = None, outreach: CallOutreach | None = None
    ) -> tuple[str, str]:
        return await self.calls.handle_call(channel, flow=flow, outreach=outreach)

    async def handle_handed_over(self, channel: AriCallChannel) -> None:
        await self.calls.handle_handed_over(channel)

    async def run_outbound(self, leg: AriCallChannel, flow: str, port: CallOutreach) -> tuple[str, str]:
        return await self.calls.run_outbound(leg, flow, port)

    async def speak(self, text: str) -> str:
        return await self.calls.speak(text)

    async def _fastagi_call(self, channel: FastAgiCallChannel) -> None:
        await self.calls.handle_call(channel)

    def on_ari_event(self, event: dict[str, Any]) -> None:
        self.events.on_ari_event(event)

    async def ari_loop(self) -> None:
        await self.events.ari_loop()

    # Pre-split private entry points that tests drive directly (a call's writes, surge overflow).
    async def _record(self, what: str, func: Any, *args: Any, **kwargs: Any) -> None:
        await self.calls._record(what, func, *args, **kwargs)

    async def _overflowed(self, *args: Any, **kwargs: Any) -> bool:
        return await self.calls._overflowed(*args, **kwargs)

    def _background(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(coro)
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    def _sweep_leftovers(self) -> None:
        """ARI connected for the first time: deal with what an earlier process left in Asterisk."""
        self._background(self.sweep_leftovers())

    async def sweep_leftovers(self) -> None:
        actions = await sweep_orphans(self.ari, owned=self.dispatcher.channel_ids, since=self.started_at)
        for action in actions:
            if isinstance(action, KeepConversation):
                self._background(watch_conversation(self.ari, action))

    async def close_left_behind(self) -> None:
        """Close as ``node_lost`` the call records an earlier process of this node left in progress. With
        ``[cluster]`` the lease's acquisition does it (routing.cluster), so it is not done twice here."""
        if self.config.cluster.enabled:
            return
        node = self.config.service.node_name
        reason = (
            f"node {node}: the service process stopped without ending the call (crash or kill); closed by the "
            f"process started {self.started_at.isoformat()}"
        )
        try:
            closed = await asyncio.to_thread(
                self.repo.close_left_behind, node, started_before=self.started_at, at=datetime.now(UTC), reason=reason
            )
        except Exception:
            log.exception("service.close_left_behind_failed")
            return
        if closed:
            log.warning("service.calls_left_behind_closed", node=node, count=closed)

    async def reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.hotline.reload_interval)
            try:
                await asyncio.to_thread(self.flows.refresh)
                if self.surge is not None:
                    await self.surge.poll()
                if self.lexicon is not None:
                    await asyncio.to_thread(self.lexicon.refresh)
            except Exception:
                log.exception("reload_failed")

    def _install_directory(self, directory: PatientDirectory) -> None:
        self.directory = directory  # calls starting from now identify their caller

    def _patients_ready(self, services: PatientServices) -> None:
        if self.outreach is not None:
            self.outreach.patients_ready(services)  # the dialer reads numbers, the nodes check identities
        if self.callbacks is not None:
            self.callbacks.patients_ready(services)  # callbacks' numbers are encrypted and indexed through it

    def _his_ready(self, his: HisMessages) -> None:
        if self.outreach is not None:
            self.outreach.core.his = his  # bookings, readings and reported vaccinations go to the HIS too

    def enable_callbacks(self, sessions: sessionmaker[Session]) -> None:
        """Callbacks instead of waiting: the queue's offer and this node's callback dialler."""

        if self.engine is None or self.queue is None or not self.config.routing.callback_key:
            return
        self.callbacks = CallbackService(
            self.config,
            sessions,
            self.ari,
            self.dispatcher,
            self.engine,
            callback_policy(self.config),
            serve_answered=self.calls.serve_callback,
        )
        self.queue.callbacks = self.callbacks

    def enable_outreach(self, sessions: sessionmaker[Session], bind: Engine) -> None:
        """Outbound calls: the scheduler (jobs, leader lock) and the dialer, over this service's ARI."""

        self.outreach = Outreach(
            self.config,
            sessions,
            self.ari,
            self.dispatcher,
            run_call=self.run_outbound,
            speak=self.speak,
            policy=DialPolicy.from_config(self.config.outreach),
        )
        self.scheduler = OutreachScheduler(
            bind,
            leader_lock_for(bind, self.config.service.state_dir),
            due_items=self.outreach.due_items,
            on_fire=self.outreach.on_fire,
            periodic_jobs=self.outreach.periodic_jobs(),
        )

    async def agent_endpoints_loop(self) -> None:
        """Sandbox only: keep the agents' PJSIP endpoints in Asterisk in step with the agent table."""

        assert self.engine is not None
        sandbox = Sandbox(self.config)
        # Over TLS with SRTP when [sip] tls is on: the agents' phones are then reached over TLS only.
        secure = (
            secure_endpoint_lines(self.config, await asyncio.to_thread(sandbox.tls_paths))
            if self.config.sip.tls
            else []
        )
        while True:
            try:
                # The engine's own last read of the agent table (refreshed every refresh_interval).
                await self.engine.refreshed.wait()
                text = render_agent_endpoints(
                    cast("list[ContactView]", list(self.engine.snapshot)),
                    media_address=self.config.asterisk.host,
                    secure_lines=secure,
                )
                if await asyncio.to_thread(sandbox.write_etc_file, FILE_NAME, text):
                    await self.ari.request("PUT", "/asterisk/modules/res_pjsip.so")
                    log.info("routing.agent_endpoints_reloaded", agents=text.count("type = aor"))
            except Exception:
                log.exception("routing.agent_endpoints_failed")
            await asyncio.sleep(max(1.0, self.config.routing.refresh_interval * 4))

    async def run(self, stop: asyncio.Event) -> None:
        fa = self.config.fastagi
        server = await start_fastagi(fa.host, fa.port, self._fastagi_call)
        log.info(
            "service.started",
            node=self.config.service.node_name,
            fastagi_port=fa.port,
            flows=sorted(self.flows.current),
        )
        ami = AmiMonitor(
            self.config.asterisk.host,
            self.config.asterisk.ami_port,
            self.creds.ami_username,
            self.creds.ami_secret,
            on_contact=self.engine.contact_state if self.engine is not None else None,
            ssl_context=asterisk_client_ssl(self.config),
        )
        ami.start()
        await self.close_left_behind()
        loops = [
            asyncio.create_task(self.ari_loop()),
            asyncio.create_task(self.reload_loop()),
            asyncio.create_task(maintenance.sign_audit_heads(self.config)),
            asyncio.create_task(maintenance.sweep_break_glass(self.config)),
        ]
        if self.connect_directory:
            loops.append(
                asyncio.create_task(
                    maintenance.connect_patient_directory(
                        self.config, self._install_directory, ready=self._patients_ready, his_ready=self._his_ready
                    )
                )
            )
        if self.recordings is not None:
            loops.append(asyncio.create_task(self.recordings.resume_loop(self.ari, datetime.now(UTC))))
        if self.callbacks is not None:
            loops.append(asyncio.create_task(self.callbacks.run()))
        if self.outreach is not None and self.scheduler is not None:
            loops.append(asyncio.create_task(self.scheduler.run()))
            loops.append(asyncio.create_task(self.outreach.dialer_loop(self.scheduler.leading)))
        if self.engine is not None:
            loops.append(asyncio.create_task(self.engine.run()))
            loops.append(asyncio.create_task(maintenance.check_credentials_daily(self.config)))
            if self.config.asterisk.mode == "sandbox":
                loops.append(asyncio.create_task(self.agent_endpoints_loop()))
        try:
            await stop.wait()
        finally:
            log.info("service.stopping", calls_in_progress=len(self.calls._calls))
            server.close()
            if self.calls._calls:
                _, pending = await asyncio.wait(self.calls._calls, timeout=SHUTDOWN_GRACE)
                for task in pending:
                    task.cancel()
            if self.outreach is not None:
                await self.outreach.drain(SHUTDOWN_GRACE)
            if self.callbacks is not None:
                await self.callbacks.drain(SHUTDOWN_GRACE)
            if self.recordings is not None:
                await self.recordings.drain(SHUTDOWN_GRACE)
            for loop in [*loops, *self._sweeps]:
                loop.cancel()
            await asyncio.gather(*loops, *self._sweeps, *self.calls._calls, return_exceptions=True)
            ami.close()
            if self.engine is not None:
                self.engine.close()
            await self.ari.aclose()
            log.info("service.stopped")


def build_recognizer(config: Config) -> tuple[Recognizer, LexiconRegistry | None]:
    """The ``listen`` nodes' recognizer from ``[speech]``; a missing or broken model stops the start-up here."""
    speech = config.speech
    if speech.engine == "none":
        return NoRecognizer(), None

    lexicon = LexiconRegistry(speech.lexicon_dir or DEFAULT_LEXICON_DIR)
    problems = lexicon.refresh()
    if lexicon.current is None:
        raise LexiconError(problems or [])
    classify = registry_classifier(lexicon)
    engine: SpeechEngine
    if speech.engine == "scripted":
        engine = ScriptedSpeech(list(speech.script))
    elif speech.engine == "servers":
        settings = RemoteSettings(speech.connect_timeout, speech.reply_timeout, speech.retry_after)
        engine = RemoteSpeech(speech.servers, settings)
    else:
        assert speech.model_path is not None  # guaranteed by config validation
        engine = SpeechModel.load(speech.model_path)
    # Whatever the engine, at most speech.max_streams callers are listened to at once (keywords.admission).
    return budgeted(StreamingRecognizer(engine, classify), speech_budget(config), os.cpu_count()), lexicon


def speech_budget(config: Config) -> int | None:
    """``speech.max_streams``; unset with speech servers, their summed capacity (this node only forwards the audio,
    the farm decodes it and refuses when full); unset otherwise, None: the per-core default of this node."""
    speech = config.speech
    if speech.max_streams is None and speech.engine == "servers":
        return sum(server.capacity for server in speech.servers)
    return speech.max_streams


def build_routing_engine(config: Config, sessions: sessionmaker[Session]) -> RoutingEngine:
    """The routing engine over the shared agent table; rules from ``routing.rules_file`` or the built-in ones."""

    rc = config.routing
    rules = load_rules(rc.rules_file) if rc.rules_file is not None else DEFAULT_RULES
    settings = EngineSettings(
        node=config.service.node_name,
        refresh_interval=rc.refresh_interval,
        wrap_up=rc.wrap_up,
        no_answer_pause=rc.no_answer_pause,
    )
    cluster = None
    if config.cluster.enabled:
        store = ClusterStore(sessions)
        lease = LeaseKeeper(store, config.service.node_name, LeaseSettings(config.cluster.lease_seconds))
        cluster = ClusterLink(store, lease)
    # The reservation is the one write before the agent's phone rings: on SQLite it waits neither for the disk
    # nor, made on the event loop, for a worker thread (in one when another writer holds the lock).
    reservations = db.make_reservation_sessionmaker(config.database_url, sessions)
    at_once = make_at_once_writer(config.database_url)
    agents = AgentStore(sessions, reservations=reservations, at_once=at_once)
    return RoutingEngine(agents, rules, settings, cluster=cluster, presence=agents)


def recording_spool(config: Config) -> Path:
    """Where this host reads the recordings Asterisk writes (astspooldir/recording)."""
    if config.recordings.spool_dir is not None:
        return config.recordings.spool_dir
    if config.asterisk.mode == "external":
        return Path("/var/spool/asterisk/recording")

    return Sandbox(config).instance_dir / "spool" / "recording"


def build_recordings(config: Config, sessions: sessionmaker[Session]) -> CallRecordings:
    """Capture, ingest and signed records over the key service (connected on first use, so the service starts
    and records even while the key service is still coming up; ingest waits for it)."""

    keys = LazyKeyService(config)
    audit = AuditLog(SqlAuditStore(db.make_engine(config.database_url)))
    store = RecordingStore(sessions)
    ingestor = Ingestor(
        store,
        keys,
        spool_dir=recording_spool(config),
        store_dir=config.recordings_store,
        policy=RetentionPolicy.from_config(config.recordings.retention_years),
        calls=db.CallRepository(sessions),
        audit=audit,
    )
    sealer = open_sealer(config, sessions, keys, audit)
    return CallRecordings(store, ingestor, sealer, department=config.recordings.department)


def run_service(config: Config) -> int:
    db.ensure_current(config.database_url)
    flows = FlowRegistry(config.hotline.flows_dir)
    problems = flows.refresh() or []
    if config.hotline.flow not in flows.current:
        raise FlowError(
            config.hotline.flows_dir, problems or [f"the hotline flow {config.hotline.flow!r} is not defined"]
        )
    sessions = db.make_sessionmaker(config.database_url)
    repo = db.CallRepository(sessions)
    recognizer, lexicon = build_recognizer(config)
    engine = build_routing_engine(config, sessions)

    bind = db.make_engine(config.database_url)
    access = AccessControl.for_engine(bind, patients=PatientStore.for_engine(bind))

    recordings = build_recordings(config, sessions) if config.recordings.enabled else None

    audit = AuditLog(SqlAuditStore(bind))

    async def main() -> None:
        service = HotlineService(
            config,
            repo,
            flows,
            asterisk_credentials(config),
            recognizer=recognizer,
            lexicon=lexicon,
            engine=engine,
            connect_directory=True,
            access=access,
            recordings=recordings,
            audit=audit,
        )
        if config.outreach.enabled:
            service.enable_outreach(sessions, bind)
        service.enable_callbacks(sessions)

        service.surge = SurgeState(
            ModeStore(sessions),
            flows,
            engine,
            config.hotline.flow,
            service.speak,
            callback_key=config.routing.callback_key if service.callbacks is not None else "",
        )
        try:
            await service.surge.poll()  # a node started during a surge serves it from its first call
        except Exception:
            log.exception("surge.poll_failed")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service.run(stop)

    asyncio.run(main())
    return 0
