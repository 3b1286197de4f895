"""``medhotline serve``: the hotline service wired together.

One asyncio process per node. ARI is the primary path (Stasis app ``medhotline``), FastAGI serves legacy
dialplans, AMI watches Asterisk itself. Every call runs as its own task with ``call_id`` bound in the log
context; a call's failure is recorded and logged, never allowed to take other calls or the service down.
When Asterisk goes away the service keeps running and reconnects with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from ivr.ari_channel import AriCallChannel, AriDispatcher
from ivr.ari_client import AriClient, AriError
from ivr.channel import CallChannel, CallInfo, ConnectionLost
from ivr.fastagi import FastAgiCallChannel
from ivr.fastagi import start_server as start_fastagi
from ivr.flow_loader import LoadedFlow, load_flows
from ivr.interpreter import FlowResult, run_flow
from ivr.prompts import Voice, sound_name
from medhotline import db
from medhotline.ami import AmiMonitor
from medhotline.asterisk_config import AsteriskCredentials
from medhotline.config import Config

log = structlog.get_logger(__name__)

SHUTDOWN_GRACE = 20.0


@dataclass
class Backoff:
    """Capped exponential backoff with jitter, so several nodes don't reconnect in lockstep."""

    initial: float = 0.5
    cap: float = 10.0
    _current: float = 0.0

    def next(self) -> float:
        self._current = self.initial if self._current == 0 else min(self.cap, self._current * 2)
        return self._current * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not security

    def reset(self) -> None:
        self._current = 0.0


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
    from medhotline.sandbox import Sandbox

    return Sandbox(config).credentials()


class HotlineService:
    def __init__(
        self,
        config: Config,
        repo: db.CallRepository,
        flows: dict[str, LoadedFlow],
        creds: AsteriskCredentials,
    ) -> None:
        self.config = config
        self.repo = repo
        self.flows = flows
        self.creds = creds
        self.voice = Voice(config.prompts.voice, config.prompts.speed)
        self.dispatcher = AriDispatcher()
        self.ari = AriClient(
            config.asterisk.host,
            config.asterisk.ari_port,
            creds.ari_username,
            creds.ari_password,
            config.asterisk.ari_app,
        )
        self._calls: set[asyncio.Task[None]] = set()

    # -- calls ------------------------------------------------------------------------------------

    async def handle_call(self, channel: CallChannel) -> None:
        """Run one call from arrival to hang-up and keep its record. Never raises."""
        info = channel.info
        call_id = str(uuid.uuid4())
        with structlog.contextvars.bound_contextvars(call_id=call_id):
            loaded = self.flows.get(info.flow) or self.flows[self.config.hotline.flow]
            log.info("call.start", transport=info.transport, channel=info.channel_name, flow=loaded.flow.flow)
            try:
                await asyncio.to_thread(
                    self.repo.start,
                    call_id=call_id,
                    node=self.config.service.node_name,
                    transport=info.transport,
                    channel_id=info.channel_id,
                    channel_name=info.channel_name,
                    flow=loaded.flow.flow,
                    flow_version=loaded.version,
                    started_at=datetime.now(UTC),
                )
            except Exception:
                # Without a record we must not run the call silently: the caller still hears the service, but
                # the failure is loud in the log (a hotline that drops calls because a disk is full is worse).
                log.exception("call.record_start_failed")
            answered = False

            async def on_step(node_id: str) -> None:
                nonlocal answered
                if not answered:
                    answered = True
                    await asyncio.to_thread(self.repo.mark_answered, call_id, datetime.now(UTC))
                await asyncio.to_thread(self.repo.set_step, call_id, node_id)

            try:
                result = await run_flow(loaded.flow, channel, lambda text: sound_name(text, self.voice), on_step)
            except Exception as exc:
                log.exception("call.crashed")
                result = FlowResult("error", "unknown", f"{type(exc).__name__}")
                with contextlib.suppress(Exception):
                    await channel.hangup()
            try:
                await asyncio.to_thread(
                    self.repo.finish,
                    call_id,
                    outcome=result.outcome,
                    ended_at=datetime.now(UTC),
                    last_step=result.last_step,
                    error=result.error,
                )
            except Exception:
                log.exception("call.record_finish_failed")
            log.info("call.end", outcome=result.outcome, last_step=result.last_step)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    # -- ARI --------------------------------------------------------------------------------------

    def on_ari_event(self, event: dict[str, Any]) -> None:
        if event["type"] == "StasisStart":
            chan = event.get("channel") or {}
            args = event.get("args") or []
            if not isinstance(chan.get("id"), str):
                log.warning("ari.bad_event", reason="StasisStart without channel id")
                return
            info = CallInfo(
                channel_id=chan["id"],
                channel_name=str(chan.get("name", "")),
                transport="ari",
                flow=str(args[0]) if args else self.config.hotline.flow,
                dialed=str((chan.get("dialplan") or {}).get("exten", "")),
            )
            channel = AriCallChannel(self.ari, info)
            self.dispatcher.register(channel)

            async def run() -> None:
                try:
                    await self.handle_call(channel)
                finally:
                    self.dispatcher.unregister(info.channel_id)

            self._spawn(run())
            return
        self.dispatcher.dispatch(event)

    async def ari_loop(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async for event in self.ari.events():
                    backoff.reset()
                    self.on_ari_event(event)
            except ConnectionLost as exc:
                log.warning("ari.disconnected", reason=str(exc), calls_in_progress=len(self.dispatcher))
                self.dispatcher.fail_all(exc)
            except AriError as exc:
                log.error("ari.refused", reason=str(exc))
            await asyncio.sleep(backoff.next())

    # -- AMI --------------------------------------------------------------------------------------

    # -- FastAGI ----------------------------------------------------------------------------------

    async def fastagi_call(self, channel: FastAgiCallChannel) -> None:
        await self.handle_call(channel)

    # -- lifecycle --------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        fa = self.config.fastagi
        server = await start_fastagi(fa.host, fa.port, self.fastagi_call)
        log.info(
            "service.started",
            node=self.config.service.node_name,
            fastagi_port=fa.port,
            flows=sorted(self.flows),
        )
        ami = AmiMonitor(
            self.config.asterisk.host,
            self.config.asterisk.ami_port,
            self.creds.ami_username,
            self.creds.ami_secret,
        )
        ami.start()
        loops = [asyncio.create_task(self.ari_loop())]
        try:
            await stop.wait()
        finally:
            log.info("service.stopping", calls_in_progress=len(self._calls))
            server.close()
            if self._calls:
                _, pending = await asyncio.wait(self._calls, timeout=SHUTDOWN_GRACE)
                for task in pending:
                    task.cancel()
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, *self._calls, return_exceptions=True)
            ami.close()
            await self.ari.aclose()
            log.info("service.stopped")


def run_service(config: Config) -> int:
    db.ensure_current(config.database_url)
    flows = load_flows(config.hotline.flows_dir)
    if config.hotline.flow not in flows:
        from ivr.flow_loader import FlowError

        raise FlowError(config.hotline.flows_dir, [f"the hotline flow {config.hotline.flow!r} is not defined"])
    repo = db.CallRepository(db.make_sessionmaker(config.database_url))
    service = HotlineService(config, repo, flows, asterisk_credentials(config))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service.run(stop)

    asyncio.run(main())
    return 0
