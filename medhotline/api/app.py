"""The HTTP API and the live wallboard, as one Starlette (ASGI) app: ``medhotline api`` serves it (docs/api.md).

Every endpoint but sign-in, the OpenAPI document and the wallboard's page (which holds no data) needs a session,
is decided by the one access policy (``compliance.access``) from the database as it is at that request, and is
audited. The data endpoints show operational data only (kind ``statistics``: supervisors, admins, auditors) and
the flows (kind ``flow_admin``); a call is its internal id, category, queue and wait, never who called.

The wallboard's data is pushed over Server-Sent Events: one poller per app reads the database every
:attr:`ApiSettings.poll_seconds` while at least one wallboard is open and sends each open stream the new
snapshot when it differs from the last one sent, so a change shows within a poll and a render.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from compliance.access import Action, RecordKind
from compliance.access_records import AccessAuditFailed
from compliance.data_keys import KeyServicePort
from ground.yaml_source import SourceProblem
from ivr.flow_loader import load_flow_text, scan_paths
from medhotline.api.auth import COOKIE, Authenticator, Refused, Signed
from medhotline.api.board import Board
from medhotline.api.openapi import OPENAPI
from medhotline.api.page import WALLBOARD_HTML
from medhotline.supervision import (
    ACTIONS,
    AccessDenied,
    Supervision,
    SupervisionError,
    Supervisor,
    authorize_supervisor,
)
from routing.statistics import StatsSettings
from scheduler.complaints import ComplaintRules

__all__ = ["ApiSettings", "create_app"]

MAX_FLOW_BYTES: Final = 256 * 1024
MAX_CALLS: Final = 500
_NO_STORE: Final = {"Cache-Control": "no-store"}
# HTTP status of each supervision problem (routing.supervision.Problem).
_STATUS: Final = {"unknown_call": 404, "not_talking": 409, "not_waiting": 409, "no_phone": 409,
                  "phone_unanswered": 504, "ended": 409, "bad_request": 400}  # fmt: skip


@dataclass(frozen=True)
class ApiSettings:
    """What the app needs, validated by the command that builds it."""

    engine: Engine
    statistics: StatsSettings
    flows_dir: Path
    # The cookie is marked Secure when the server speaks TLS.
    secure_cookie: bool = False
    poll_seconds: float = 0.5
    # Seconds between the stream's re-checks of its session and role (a freeze ends it within this).
    recheck_seconds: float = 5.0
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    # The supervisor actions (POST /api/supervise/...); None: they answer 503 (no Asterisk configured).
    supervision: Supervision | None = None
    # The key service that opens sealed TOTP secrets at sign-in; None: second-factor sign-ins are refused (503).
    keys: KeyServicePort | None = None
    # The 12320 complaint deadlines' calendar (``[complaints]``); None: Monday-Friday without holidays.
    complaints: ComplaintRules | None = None


class _Feed:
    """One poller for all open wallboards: reads a snapshot per tick while anyone listens, hands out the latest."""

    def __init__(self, board: Board, settings: ApiSettings) -> None:
        self._board = board
        self._settings = settings
        self._listeners: set[asyncio.Queue[str]] = set()
        self._task: asyncio.Task[None] | None = None
        self._last = ""

    async def _poll(self) -> None:
        while self._listeners:
            text = json.dumps(await asyncio.to_thread(self._board.snapshot, self._settings.clock()),
                              ensure_ascii=False, sort_keys=True)  # fmt: skip
            if text != self._last:
                self._last = text
                for queue in list(self._listeners):
                    if queue.full():  # a slow browser gets the newest snapshot, not a backlog
                        queue.get_nowait()
                    queue.put_nowait(text)
            await asyncio.sleep(self._settings.poll_seconds)
        self._task = None

    @contextlib.asynccontextmanager
    async def listen(self) -> AsyncIterator[asyncio.Queue[str]]:
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1)
        if self._last:
            queue.put_nowait(self._last)
        self._listeners.add(queue)
        if self._task is None:
            self._task = asyncio.create_task(self._poll())
        try:
            yield queue
        finally:
            self._listeners.discard(queue)


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.cookies.get(COOKIE)


def _refusal(exc: Refused) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers={**headers, **_NO_STORE})


class _Api:
    """The endpoints, over one authenticator, board and self.feed."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.auth = Authenticator(settings.engine, settings.clock, settings.keys)
        self.board = Board(settings.engine, settings.statistics, settings.complaints)
        self.feed = _Feed(self.board, settings)
        # The supervisions connected through this server, watched until they end (kept referenced here).
        self.watching: set[asyncio.Task[None]] = set()

    async def allowed(self, request: Request, action: Action, kind: RecordKind, *, audit: bool = True) -> Signed:
        endpoint = f"{request.method} {request.url.path}"
        try:
            return await asyncio.to_thread(self.auth.authorize, _token(request), action, kind, endpoint,
                                           audit_allowed=audit)  # fmt: skip
        except AccessAuditFailed:
            raise Refused(503, "refused: the audit log could not record the request") from None

    def guarded(self, action: Action, kind: RecordKind, handler: Callable[[Request], object]) -> Callable[..., object]:
        async def endpoint(request: Request) -> Response:
            try:
                await self.allowed(request, action, kind)
                result = await asyncio.to_thread(handler, request)
            except Refused as exc:
                return _refusal(exc)
            if isinstance(result, Response):
                return result
            return JSONResponse(result, headers=_NO_STORE)

        return endpoint

    async def login(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": 'send JSON: {"account", "password", "code"}'}, status_code=400)
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str) for k in ("account", "password")):
            return JSONResponse({"error": "account and password are required strings"}, status_code=400)
        code = body.get("code")
        try:
            token, expires = await self.auth.sign_in(
                body["account"], body["password"], code if isinstance(code, str) else None
            )
        except Refused as exc:
            return _refusal(exc)
        response = JSONResponse({"token": token, "expires_at": expires.isoformat()}, headers=_NO_STORE)
        max_age = int((expires - self.settings.clock()).total_seconds())
        response.set_cookie(COOKIE, token, max_age=max_age, httponly=True, samesite="strict",
                            secure=self.settings.secure_cookie, path="/")  # fmt: skip
        return response

    async def logout(self, request: Request) -> Response:
        token = _token(request)
        closed = token is not None and await asyncio.to_thread(self.auth.sign_out, token)
        response = JSONResponse({"signed_out": closed}, headers=_NO_STORE)
        response.delete_cookie(COOKIE, path="/")
        return response

    def queues(self, request: Request) -> object:
        now = self.settings.clock()
        return {"at": now.isoformat(), "queues": self.board.waiting(self.board.report(now)[1], now)}

    def agents(self, request: Request) -> object:
        return {"agents": self.board.agents(self.settings.clock())}

    def statistics(self, request: Request) -> object:
        return self.board.statistics(self.settings.clock())

    def calls(self, request: Request) -> object:
        raw = request.query_params.get("limit", "50")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_CALLS:
            return JSONResponse({"error": f"limit: a whole number from 1 to {MAX_CALLS}"}, status_code=400)
        return {"calls": self.board.recent_calls(self.settings.clock(), int(raw))}

    def call(self, request: Request) -> object:
        found = self.board.call(str(request.path_params["call_id"]), self.settings.clock())
        if found is None:
            return JSONResponse({"error": "no such call"}, status_code=404)
        return found

    def flows(self, request: Request) -> object:
        report = scan_paths([self.settings.flows_dir])
        return {
            "flows": [
                {"flow": n, "version": report.flows[n].version, "file": report.flows[n].path.name}
                for n in sorted(report.flows)
            ],
            "problems": [_problem(p) for p in report.problems],
        }

    async def validate(self, request: Request) -> Response:
        try:
            await self.allowed(request, "read", "flow_admin")
        except Refused as exc:
            return _refusal(exc)
        raw = await request.body()
        if len(raw) > MAX_FLOW_BYTES:
            return JSONResponse({"error": f"a flow is at most {MAX_FLOW_BYTES} bytes"}, status_code=413)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return JSONResponse({"valid": False, "problems": [{"line": raw[: exc.start].count(b"\n") + 1,
                                 "column": 0, "where": "", "message": "not UTF-8 text"}]})  # fmt: skip
        loaded, problems = await asyncio.to_thread(load_flow_text, text, Path("posted.yaml"))
        return JSONResponse({"valid": loaded is not None and not problems,
                             "flow": None if loaded is None else loaded.flow.flow,
                             "problems": [_problem(p) for p in problems]})  # fmt: skip

    async def events(self, request: Request) -> Response:
        try:
            signed = await self.allowed(request, "read", "statistics")
        except Refused as exc:
            return _refusal(exc)

        async def stream() -> AsyncIterator[str]:
            yield "retry: 1000\n\n"
            loop = asyncio.get_running_loop()
            next_check = loop.time() + self.settings.recheck_seconds
            async with self.feed.listen() as queue:
                while not await request.is_disconnected():
                    if loop.time() >= next_check:
                        next_check = loop.time() + self.settings.recheck_seconds
                        try:  # a frozen account or an expired session ends the stream
                            await self.allowed(request, "read", "statistics", audit=False)
                        except Refused:
                            yield "event: end\ndata: {}\n\n"
                            return
                    try:
                        text = await asyncio.wait_for(queue.get(), timeout=1.0)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    yield f"event: board\ndata: {text}\n\n"

        del signed
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})  # fmt: skip

    async def supervise(self, request: Request) -> Response:
        """``POST /api/supervise/{action}`` with ``{"call_id" | "agent_id", "reason"}``: decided by the policy
        (kind ``supervision``, change, with the reason) inside :class:`~medhotline.supervision.Supervision`."""
        action = str(request.path_params["action"])
        token = _token(request)
        endpoint = f"{request.method} {request.url.path}"
        try:
            # The session first (401), then the role under kind ``supervision`` with the reason (403, audited by
            # the policy), before anything about the request's contents or whether Asterisk is there.
            account_id = await asyncio.to_thread(self.auth.signed_in, token, "change", "supervision", endpoint)
        except Refused as exc:
            return _refusal(exc)
        try:
            body = await request.json()
        except ValueError:
            body = None
        fields = body if isinstance(body, dict) else {}
        reason = fields.get("reason") if isinstance(fields.get("reason"), str) else None
        who = Supervisor(account_id, token)
        try:
            await asyncio.to_thread(authorize_supervisor, self.auth.access, who, reason, action, self.settings.clock())
        except AccessDenied as exc:
            return _supervision_refused(exc)
        except SupervisionError as exc:
            return JSONResponse({"error": str(exc), "problem": exc.problem}, status_code=_STATUS[exc.problem])
        if action not in ACTIONS:
            return JSONResponse({"error": f"action {action!r}: use one of {', '.join(ACTIONS)}"}, status_code=404)
        if not isinstance(body, dict):
            return JSONResponse({"error": 'send JSON: {"call_id" or "agent_id", "reason"}'}, status_code=400)
        target_key = "agent_id" if action in ("pause", "unpause") else "call_id"
        target = body.get(target_key)
        if not isinstance(target, str) or not target:
            return JSONResponse({"error": f"{target_key} is required"}, status_code=400)
        if self.settings.supervision is None:
            return JSONResponse({"error": "supervision is not available: no Asterisk connection"}, status_code=503)
        supervision = self.settings.supervision
        try:
            if action == "pause":
                await supervision.pause(who, target, reason if isinstance(reason, str) else None)
            elif action == "unpause":
                await supervision.unpause(who, target, reason if isinstance(reason, str) else None)
            elif action == "escalate":
                await supervision.escalate(who, target, reason if isinstance(reason, str) else None)
            else:
                tap, watching = await supervision.step_in(who, action, target,
                                                          reason if isinstance(reason, str) else None)  # fmt: skip
                self.watching.add(watching)
                watching.add_done_callback(self.watching.discard)
                return JSONResponse({"action": action, "call_id": target, "spy": tap.spy, "whisper": tap.whisper},
                                    headers=_NO_STORE)  # fmt: skip
        except AccessDenied as exc:
            return _supervision_refused(exc)
        except SupervisionError as exc:
            return JSONResponse({"error": str(exc), "problem": exc.problem}, status_code=_STATUS[exc.problem])
        return JSONResponse({"action": action, target_key: target}, headers=_NO_STORE)

    async def wallboard(self, request: Request) -> Response:
        return HTMLResponse(WALLBOARD_HTML, headers={"Content-Security-Policy": "default-src 'self'; "
                            "script-src 'unsafe-inline'; style-src 'unsafe-inline'", **_NO_STORE})  # fmt: skip

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(OPENAPI)


def create_app(settings: ApiSettings) -> Starlette:
    """The app over ``settings.engine`` (migrated already)."""
    api = _Api(settings)
    routes = [
        Route("/api/login", api.login, methods=["POST"]),
        Route("/api/logout", api.logout, methods=["POST"]),
        Route("/api/openapi.json", api.openapi),
        Route("/api/queues", api.guarded("read", "statistics", api.queues)),
        Route("/api/agents", api.guarded("read", "statistics", api.agents)),
        Route("/api/statistics", api.guarded("read", "statistics", api.statistics)),
        Route("/api/calls", api.guarded("read", "statistics", api.calls)),
        Route("/api/calls/{call_id}", api.guarded("read", "statistics", api.call)),
        Route("/api/flows", api.guarded("read", "flow_admin", api.flows)),
        Route("/api/flows/validate", api.validate, methods=["POST"]),
        Route("/api/wallboard/events", api.events),
        Route("/api/supervise/{action}", api.supervise, methods=["POST"]),
        Route("/", api.wallboard),
        Route("/wallboard", api.wallboard),
    ]
    return Starlette(routes=routes)


def _supervision_refused(exc: AccessDenied) -> Response:
    if exc.decision is not None and exc.decision.denial == "stale_session":
        return _refusal(Refused(401, "sign in again"))
    return JSONResponse({"error": "not allowed: supervisor actions need the supervisor role"},
                        status_code=403, headers=_NO_STORE)  # fmt: skip


def _problem(problem: SourceProblem) -> dict[str, object]:
    """A flow checker's problem without its path (the server's directory is not the client's business)."""
    return {"line": problem.line, "column": problem.column, "where": problem.where, "message": problem.message}
