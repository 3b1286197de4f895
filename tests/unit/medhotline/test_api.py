"""The HTTP API over httpx's ASGI transport, on a real migrated SQLite database: sign-in with a password and (for
supervisors and auditors) a TOTP code, every endpoint × role through the one access policy, the audit entry of
each request, and no patient identifier in any response."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session
from starlette.routing import Route

from compliance.access_records import AccessSession, Actor
from compliance.access_store import freeze_account
from compliance.accounts import AccountStore
from compliance.audit import AuditLog, SqlAuditStore, StoredEntry
from compliance.credentials import CredentialStore, hash_password, password_matches, totp_code, totp_step
from compliance.data_keys import KeyServicePort
from compliance.keyservice_client import KeyServiceClient
from compliance.totp_vault import TotpVault
from ground import db
from ground.errors import CommandError
from ground.models import Call
from medhotline.api import ApiSettings, create_app
from medhotline.api.auth import UNAVAILABLE
from medhotline.commands.api import check_bind
from medhotline.supervision import Supervision
from routing.ari_supervision import PhoneSettings
from routing.statistics import StatsSettings
from routing.store import AgentStore
from telephony.ari_client import AriClient
from tests.unit.medhotline.test_supervision import FakeAri

PASSWORD = "correct horse battery"
# The caller's number, written where a careless API would leak it: the channel name and the error text.
PHONE = "13812345678"
ROLES = {"nurse.li": "nurse", "sup.wang": "supervisor", "admin.zhao": "admin", "aud.chen": "auditor"}
ENDPOINTS = ["/api/queues", "/api/agents", "/api/statistics", "/api/calls", "/api/calls/call-waiting-1",
             "/api/flows"]  # fmt: skip
FLOWS_DIR = Path(__file__).resolve().parents[3] / "dialplans"


@pytest.fixture
def engine(tmp_path: Path) -> AsyncIterator[Engine]:  # type: ignore[misc]
    url = f"sqlite:///{tmp_path / 'api.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    yield engine
    engine.dispose()


async def _secrets(engine: Engine, keys: KeyServicePort) -> dict[str, str]:
    """Accounts of each role with the password; the TOTP secrets (sealed through the key service) of those who
    need one."""
    now = datetime.now(UTC)
    accounts, creds = AccountStore.for_engine(engine), CredentialStore.for_engine(engine)
    vault = TotpVault.for_engine(engine, keys)
    found = {}
    for account_id, role in ROLES.items():
        accounts.add(account_id, account_id.title(), [role], now)
        creds.set_password(account_id, PASSWORD, now)
        if role in ("supervisor", "auditor"):
            found[account_id] = await vault.enroll(account_id, now)
    AgentStore.for_engine(engine).add_agent("nurse.li", "ep-li", now)
    return found


def _code(secret: str, offset: int = 0) -> str:
    return totp_code(base64.b32decode(secret + "=" * (-len(secret) % 8)), totp_step(datetime.now(UTC)) + offset)


def _calls(engine: Engine) -> None:
    """A waiting emergency call and a waiting normal one, both from PHONE as the channel name shows it."""
    calls = db.CallRepository.for_engine(engine)
    now = datetime.now(UTC)
    for call_id, priority, category, ago in (("call-waiting-1", "emergency", "emergency", 30),
                                             ("call-waiting-2", "normal", "medication", 90)):  # fmt: skip
        calls.start(call_id=call_id, node="node1", transport="ari", channel_id=f"ch-{call_id}",
                    channel_name=f"PJSIP/{PHONE}-0000001", flow="hotline", flow_version=None,
                    started_at=now - timedelta(seconds=ago + 5))  # fmt: skip
        calls.add_step(call_id, flow="queue", node="queued", node_type="queue", edge=category, input=priority,
                       at=now - timedelta(seconds=ago), moves_last_step=False)  # fmt: skip


async def _client(
    engine: Engine, keys: KeyServicePort | None, supervision: Supervision | None = None
) -> httpx.AsyncClient:
    settings = ApiSettings(
        engine=engine, statistics=StatsSettings(), flows_dir=FLOWS_DIR, supervision=supervision, keys=keys
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(settings)), base_url="http://test")


async def _login(client: httpx.AsyncClient, account: str, secrets: dict[str, str]) -> str:
    code = _code(secrets[account]) if account in secrets else None
    response = await client.post("/api/login", json={"account": account, "password": PASSWORD, "code": code})
    assert response.status_code == 200, response.text
    token = response.json()["token"]
    assert isinstance(token, str)
    return token


def _entries(engine: Engine) -> list[StoredEntry]:
    return list(SqlAuditStore(engine).entries())


def test_passwords_are_scrypt_hashes_and_totp_follows_rfc_6238() -> None:
    stored = hash_password("s3cret-enough!")
    assert stored.startswith("scrypt$")
    assert "s3cret" not in stored
    assert password_matches("s3cret-enough!", stored)
    assert not password_matches("s3cret-enough?", stored)
    assert not password_matches("x", "not-a-hash")
    # RFC 6238 appendix B, SHA-1, T = 59 s → 94287082 (8 digits); its last 6 digits are the 6-digit code.
    assert totp_code(b"12345678901234567890", totp_step(datetime.fromtimestamp(59, UTC))) == "287082"
    assert totp_code(b"12345678901234567890", totp_step(datetime.fromtimestamp(1111111109, UTC))) == "081804"


async def test_supervisors_need_a_second_factor_that_is_good_once(engine: Engine, keys: KeyServiceClient) -> None:
    secrets = await _secrets(engine, keys)
    async with await _client(engine, keys) as client:
        no_code = await client.post("/api/login", json={"account": "sup.wang", "password": PASSWORD})
        assert no_code.status_code == 401
        wrong_pw = await client.post("/api/login", json={"account": "sup.wang", "password": "nope",
                                                          "code": _code(secrets["sup.wang"])})  # fmt: skip
        assert wrong_pw.status_code == 401
        code = _code(secrets["sup.wang"])
        ok = await client.post("/api/login", json={"account": "sup.wang", "password": PASSWORD, "code": code})
        assert ok.status_code == 200
        assert "httponly" in ok.headers["set-cookie"].lower()
        assert "samesite=strict" in ok.headers["set-cookie"].lower()
        replay = await client.post("/api/login", json={"account": "sup.wang", "password": PASSWORD, "code": code})
        assert replay.status_code == 401, "a TOTP code is good once"
        # A nurse has no second factor to give.
        assert (await client.post("/api/login", json={"account": "nurse.li", "password": PASSWORD})).status_code == 200
        unknown = await client.post("/api/login", json={"account": "ghost", "password": PASSWORD})
        assert unknown.status_code == 401
        assert unknown.json() == wrong_pw.json(), "no hint which part was wrong"
    whys = [json.loads(e.details).get("why") for e in _entries(engine) if e.action == "denied"]
    assert whys == ["the role needs a second factor code", "wrong password", "second factor code already used",
                    "there is no such account"]  # fmt: skip
    assert [e.actor for e in _entries(engine) if e.action == "login"] == ["sup.wang", "nurse.li"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_every_endpoint_by_role_through_the_access_policy_and_audited(
    engine: Engine, keys: KeyServiceClient, endpoint: str
) -> None:
    secrets = await _secrets(engine, keys)
    _calls(engine)
    allowed = {"nurse.li": False, "sup.wang": True, "admin.zhao": True, "aud.chen": True}
    async with await _client(engine, keys) as client:
        anonymous = await client.get(endpoint)
        assert anonymous.status_code == 401
        assert (await client.get(endpoint, headers={"Authorization": "Bearer s-" + "a" * 32})).status_code == 401
        for account, ok in allowed.items():
            token = await _login(client, account, secrets)
            before = len(_entries(engine))
            response = await client.get(endpoint, headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == (200 if ok else 403), (account, response.text)
            added = _entries(engine)[before:]
            assert len(added) == 1, "one audit entry per request"
            assert added[0].actor == account
            assert added[0].action == ("read" if ok else "denied")
            if ok:
                assert json.loads(added[0].details)["endpoint"] == f"GET {endpoint}"
    refusals = [json.loads(e.details) for e in _entries(engine) if e.actor == "anonymous"]
    assert len(refusals) == 2
    assert all(r["why"] == "no valid session" for r in refusals)


async def test_supervisor_actions_are_decided_under_the_supervision_kind_only(
    engine: Engine, keys: KeyServiceClient
) -> None:
    secrets = await _secrets(engine, keys)
    _calls(engine)
    AgentStore.for_engine(engine).add_agent("sup.wang", "ep-wang", datetime.now(UTC))  # the supervisor's phone
    ari = FakeAri(engine, {"talk-call-waiting-1": ["1700000000.1", "agent-6f1c"]})
    supervision = Supervision(engine, AuditLog(SqlAuditStore(engine)), cast(AriClient, ari),
                              lambda: datetime.now(UTC), PhoneSettings(poll_seconds=0.01))  # fmt: skip
    reason = "coaching the new agent on the script"
    good = {"call_id": "call-waiting-1", "reason": reason}
    async with await _client(engine, keys, supervision) as client:
        assert (await client.post("/api/supervise/whisper", json=good)).status_code == 401
        tokens = {account: await _login(client, account, secrets) for account in ROLES}  # a TOTP code is good once
        for account, body, status in (
            ("nurse.li", good, 403),  # not a supervisor (admins and auditors neither)
            ("admin.zhao", good, 403),
            ("aud.chen", good, 403),
            ("sup.wang", {"call_id": "call-waiting-1"}, 400),  # no reason
            ("sup.wang", {"call_id": "call-waiting-1", "reason": "why not"}, 400),  # too short to mean anything
            ("sup.wang", {"call_id": "no-such-call", "reason": reason}, 404),
            ("sup.wang", {"call_id": "call-waiting-2", "reason": reason}, 409),  # waiting, not talking
        ):
            before = len(_entries(engine))
            token = tokens[account]
            response = await client.post("/api/supervise/whisper", json=body,
                                         headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            assert response.status_code == status, (account, body, response.text)
            added = [json.loads(e.details) for e in _entries(engine)[before:]]
            # A refusal, by role or for want of a reason, is audited by the policy under the supervision kind
            # (never a statistics read); nothing is audited as done.
            assert [(d.get("kind"), d.get("attempted", "change")) for d in added] == (
                [("supervision", "change")] if status in (400, 403) else []
            )
        assert ari.acted == []
        headers = {"Authorization": f"Bearer {tokens['sup.wang']}"}
        response = await client.post("/api/supervise/whisper", json=good, headers=headers)
        assert response.status_code == 200, response.text
        assert (response.json()["spy"], response.json()["whisper"]) == ("both", "out")
    (done,) = [e for e in _entries(engine) if e.action == "change"]
    assert (done.actor, done.reason, json.loads(done.details)["call"]) == ("sup.wang", reason, "call-waiting-1")


async def test_no_response_carries_the_callers_number(engine: Engine, keys: KeyServiceClient) -> None:
    secrets = await _secrets(engine, keys)
    _calls(engine)
    with Session(engine) as session, session.begin():
        session.execute(update(Call).values(error=f"caller {PHONE} hung up", last_step=PHONE))
    async with await _client(engine, keys) as client:
        token = await _login(client, "sup.wang", secrets)
        bodies = [(await client.get(e, headers={"Authorization": f"Bearer {token}"})).text for e in ENDPOINTS]
        bodies.append((await client.get("/wallboard")).text)
    assert all(PHONE not in body for body in bodies)
    queues = json.loads(bodies[0])["queues"]
    assert [q["queue"] for q in queues] == ["emergency", "medication"], "the emergency queue first"
    assert queues[1]["calls"][0]["wait_seconds"] >= 90
    call = json.loads(bodies[4])
    assert call["route_category"] is None
    assert call["queue"]["emergency"] is True


async def test_a_frozen_account_is_refused_on_its_next_request(engine: Engine, keys: KeyServiceClient) -> None:
    secrets = await _secrets(engine, keys)
    async with await _client(engine, keys) as client:
        token = await _login(client, "aud.chen", secrets)
        headers = {"Authorization": f"Bearer {token}"}
        assert (await client.get("/api/agents", headers=headers)).status_code == 200
        freeze_account(engine, "aud.chen", "left the hospital", Actor.operator("root"), datetime.now(UTC))
        assert (await client.get("/api/agents", headers=headers)).status_code == 401
        with Session(engine) as session:
            assert session.scalars(select(AccessSession.closed_at)).one() is not None


async def test_an_expired_session_is_refused(engine: Engine, keys: KeyServiceClient) -> None:
    await _secrets(engine, keys)
    async with await _client(engine, keys) as client:
        token = await _login(client, "admin.zhao", {})
        with Session(engine) as session, session.begin():
            session.execute(update(AccessSession).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        assert (await client.get("/api/queues", headers={"Authorization": f"Bearer {token}"})).status_code == 401


async def test_a_posted_flow_gets_the_flow_checkers_problems(engine: Engine, keys: KeyServiceClient) -> None:
    await _secrets(engine, keys)
    async with await _client(engine, keys) as client:
        await _login(client, "admin.zhao", {})  # the cookie carries the session from here on
        bad = await client.post("/api/flows/validate", content="flow: x\nstart: nowhere\nnodes:\n  a: {type: hangup}\n")
        good = await client.post("/api/flows/validate", content=(FLOWS_DIR / "hotline.yaml").read_bytes())
        listed = await client.get("/api/flows")
    assert bad.status_code == 200
    assert bad.json()["valid"] is False
    assert any("nowhere" in p["message"] for p in bad.json()["problems"]), bad.json()
    assert good.json() == {"valid": True, "flow": "hotline", "problems": []}
    assert "hotline" in [f["flow"] for f in listed.json()["flows"]]


async def test_the_openapi_document_names_every_route(engine: Engine, keys: KeyServiceClient) -> None:
    async with await _client(engine, keys) as client:
        paths = (await client.get("/api/openapi.json")).json()["paths"]
    assert {"/api/login", "/api/queues", "/api/agents", "/api/statistics", "/api/calls", "/api/calls/{call_id}",
            "/api/flows", "/api/flows/validate", "/api/wallboard/events"} <= set(paths)  # fmt: skip


def test_a_non_loopback_bind_needs_tls(tmp_path: Path) -> None:
    check_bind("127.0.0.1", None, None)
    check_bind("::1", None, None)
    with pytest.raises(CommandError, match="not a loopback address, and TLS is not configured"):
        check_bind("0.0.0.0", None, None)
    with pytest.raises(CommandError, match="give both"):
        check_bind("10.1.2.3", tmp_path / "cert.pem", None)
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    check_bind("10.1.2.3", tmp_path / "cert.pem", tmp_path / "key.pem")


# -- every route × every caller, from the app's own route table ---------------------------------------------------
PUBLIC = "public"  # needs no session: sign-in, sign-out, the OpenAPI document, the page (which holds no data)
READERS = frozenset({"sup.wang", "admin.zhao", "aud.chen"})
SUPERVISORS = frozenset({"sup.wang"})
PAUSE = json.dumps({"agent_id": "nurse.li", "reason": "coaching the new agent on the script"}).encode()
# (method, route path) → (the request made, who is allowed). A new route without a row fails the test.
ROUTE_TABLE: dict[tuple[str, str], tuple[str, bytes, frozenset[str] | str]] = {
    ("POST", "/api/login"): ("/api/login", b"{}", PUBLIC),
    ("POST", "/api/logout"): ("/api/logout", b"", PUBLIC),
    ("GET", "/api/openapi.json"): ("/api/openapi.json", b"", PUBLIC),
    ("GET", "/"): ("/", b"", PUBLIC),
    ("GET", "/wallboard"): ("/wallboard", b"", PUBLIC),
    ("GET", "/api/queues"): ("/api/queues", b"", READERS),
    ("GET", "/api/agents"): ("/api/agents", b"", READERS),
    ("GET", "/api/statistics"): ("/api/statistics", b"", READERS),
    ("GET", "/api/calls"): ("/api/calls", b"", READERS),
    ("GET", "/api/calls/{call_id}"): ("/api/calls/call-waiting-1", b"", READERS),
    ("GET", "/api/flows"): ("/api/flows", b"", READERS),
    ("POST", "/api/flows/validate"): ("/api/flows/validate", b"flow: x\n", READERS),
    ("GET", "/api/wallboard/events"): ("/api/wallboard/events", b"", READERS),
    ("POST", "/api/supervise/{action}"): ("/api/supervise/pause", PAUSE, SUPERVISORS),
}


async def _asgi(app: object, method: str, path: str, token: str | None, body: bytes) -> int:
    """One request straight through ASGI; the client goes away after the first part of the body (an event
    stream never ends by itself). Returns the status."""
    headers = [(b"content-type", b"application/json")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("test", 80)}  # fmt: skip
    sent: list[dict[str, object]] = []
    gone = asyncio.Event()
    requested = False

    async def receive() -> dict[str, object]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            gone.set()

    await asyncio.wait_for(cast(Any, app)(scope, receive, send), timeout=10)
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    return cast(int, start["status"])


async def test_every_route_by_every_caller_is_refused_or_allowed_and_each_refusal_audited(
    engine: Engine, keys: KeyServiceClient
) -> None:
    """Over the app's route table: no session and a closed session get 401, a role the policy refuses 403, each
    refusal with exactly one ``denied`` audit entry naming who; allowed callers pass (2xx) and nothing is denied."""
    secrets = await _secrets(engine, keys)
    _calls(engine)
    ari = FakeAri(engine, {})
    supervision = Supervision(engine, AuditLog(SqlAuditStore(engine)), cast(AriClient, ari),
                              lambda: datetime.now(UTC), PhoneSettings(poll_seconds=0.01))  # fmt: skip
    settings = ApiSettings(
        engine=engine, statistics=StatsSettings(), flows_dir=FLOWS_DIR, supervision=supervision, keys=keys
    )
    app = create_app(settings)
    routes = {(m, r.path) for r in app.routes if isinstance(r, Route) for m in (r.methods or ()) if m != "HEAD"}
    assert routes == set(ROUTE_TABLE), "every route needs a row here (who may call it)"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        tokens: dict[str, str | None] = {a: await _login(client, a, secrets) for a in ROLES}
        closed = await _login(client, "admin.zhao", {})
        assert (await client.post("/api/logout", headers={"Authorization": f"Bearer {closed}"})).status_code == 200
    callers: dict[str, str | None] = {"anonymous": None, "closed-session": closed, **tokens}
    for (method, _), (path, body, allowed) in sorted(ROUTE_TABLE.items()):
        if allowed == PUBLIC:
            continue
        for caller, token in callers.items():
            before = len(_entries(engine))
            status = await _asgi(app, method, path, token, body)
            added = _entries(engine)[before:]
            denied = [e for e in added if e.action == "denied"]
            where = (method, path, caller, status, [(e.actor, e.action, e.details) for e in added])
            if caller in allowed:
                assert 200 <= status < 300, where
                assert added, where
                assert not denied, where
                continue
            assert status == (403 if caller in ROLES else 401), where
            assert len(added) == len(denied) == 1, where
            assert denied[0].actor == {"anonymous": "anonymous", "closed-session": "admin.zhao"}.get(caller, caller)
    assert [a[1] for a in ari.acted] == [], "pause goes to the database, not Asterisk"


async def test_supervise_refuses_by_role_before_anything_else(engine: Engine, keys: KeyServiceClient) -> None:
    """Without Asterisk (503) and without a reason or a body (400), a non-supervisor still gets 403 (audited); a
    supervisor gets the 400 and the 503."""
    secrets = await _secrets(engine, keys)
    async with await _client(engine, keys) as client:
        tokens = {a: await _login(client, a, secrets) for a in ("nurse.li", "sup.wang")}
        for account, body, status in (
            ("nurse.li", {"agent_id": "nurse.li", "reason": "coaching the new agent on the script"}, 403),
            ("nurse.li", {"agent_id": "nurse.li"}, 403),
            ("nurse.li", None, 403),
            ("sup.wang", {"agent_id": "nurse.li"}, 400),
            ("sup.wang", {"agent_id": "nurse.li", "reason": "why not"}, 400),
            ("sup.wang", {"agent_id": "nurse.li", "reason": "coaching the new agent on the script"}, 503),
        ):
            before = len(_entries(engine))
            response = await client.post("/api/supervise/pause", json=body,
                                         headers={"Authorization": f"Bearer {tokens[account]}"})  # fmt: skip
            assert response.status_code == status, (account, body, response.text)
            added = _entries(engine)[before:]
            if status == 403:
                assert [(e.actor, e.action) for e in added] == [(account, "denied")]
            assert not [e for e in added if e.action == "change"]
        nurse = {"Authorization": f"Bearer {tokens['nurse.li']}"}
        assert (await client.post("/api/supervise/no-such-action", json={}, headers=nurse)).status_code == 403


async def test_sign_in_fails_closed_and_audited_when_the_key_service_is_down(
    engine: Engine, keys: KeyServiceClient, short_dir: Path
) -> None:
    """The sealed second factor can't be opened: 503 with a message that says why, whatever the password (so an
    outage tells a guesser nothing about it), audited like any refused sign-in; staff without one sign in."""
    secrets = await _secrets(engine, keys)
    async with (
        KeyServiceClient.unix(short_dir / "run" / "gone.sock", "t" * 32) as down,
        await _client(engine, down) as client,
    ):
        for password in (PASSWORD, "a wrong password"):
            response = await client.post(
                "/api/login", json={"account": "sup.wang", "password": password, "code": _code(secrets["sup.wang"])}
            )
            assert response.status_code == 503
            assert response.json() == {"error": UNAVAILABLE}
            assert "key service" in response.json()["error"]
        assert (await client.post("/api/login", json={"account": "nurse.li", "password": PASSWORD})).status_code == 200
    denied = [(e.actor, json.loads(e.details)) for e in _entries(engine) if e.action == "denied"]
    assert [actor for actor, _ in denied] == ["sup.wang", "sup.wang"]
    assert all("key service is unavailable" in d["why"] for _, d in denied)
    assert not [e for e in _entries(engine) if e.action == "login" and e.actor == "sup.wang"]
    async with await _client(engine, keys) as client:
        await _login(client, "sup.wang", secrets)  # back as soon as the key service is
