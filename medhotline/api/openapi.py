"""The API's OpenAPI 3.1 document, written by hand (the app is Starlette, not FastAPI): ``GET /api/openapi.json``.

Kept beside the routes it describes; tests/unit/medhotline/test_api.py checks that every route is in it.
"""

from __future__ import annotations

from typing import Final

__all__ = ["OPENAPI"]


def _op(summary: str, kind: str, *, params: list[dict[str, object]] | None = None) -> dict[str, object]:
    return {
        "summary": summary,
        "description": f"Access policy kind `{kind}`, action `read`; audited.",
        "security": [{"bearer": []}, {"cookie": []}],
        "parameters": params or [],
        "responses": {
            "200": {"description": "OK (JSON)"},
            "401": {"description": "no valid session (sign in, or again)"},
            "403": {"description": "the access policy refuses this for the account's roles"},
        },
    }


OPENAPI: Final[dict[str, object]] = {
    "openapi": "3.1.0",
    "info": {"title": "medhotline API", "version": "1", "description": "Queues, agents, statistics, calls and "
             "flows of the patient hotline; see docs/api.md. No response carries a patient identifier."},
    "components": {"securitySchemes": {
        "bearer": {"type": "http", "scheme": "bearer", "description": "the token from POST /api/login"},
        "cookie": {"type": "apiKey", "in": "cookie", "name": "medhotline_session"},
    }},
    "paths": {
        "/api/login": {"post": {
            "summary": "sign in: password, and a TOTP code for supervisors and auditors",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["account", "password"],
                "properties": {"account": {"type": "string"}, "password": {"type": "string"},
                               "code": {"type": "string", "pattern": "^[0-9]{6}$"}}}}}},
            "responses": {"200": {"description": "token and expiry; also set as an HttpOnly cookie"},
                          "401": {"description": "sign-in refused (the audit log says why)"}},
        }},
        "/api/logout": {"post": {"summary": "sign out (closes the session)",
                                 "responses": {"200": {"description": "signed_out: true/false"}}}},
        "/api/queues": {"get": _op("waiting calls per queue, emergency first, longest wait first", "statistics")},
        "/api/agents": {"get": _op("agents by state: ready, ringing, talking, wrap_up, paused, offline", "statistics")},
        "/api/statistics": {"get": _op("today's figures by queue, in total and per agent", "statistics")},
        "/api/calls": {"get": _op("today's calls that reached the queue, newest first", "statistics", params=[
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}}])},
        "/api/calls/{call_id}": {"get": _op("one call: outcome, category, times, its wait", "statistics", params=[
            {"name": "call_id", "in": "path", "required": True, "schema": {"type": "string"}}])},
        "/api/flows": {"get": _op("the IVR flows in the flows directory, with versions and problems", "flow_admin")},
        "/api/flows/validate": {"post": {
            **_op("check a flow's YAML (schema and graph) as `medhotline flows check` does", "flow_admin"),
            "requestBody": {"required": True, "content": {"application/yaml": {"schema": {"type": "string"}}}},
        }},
        "/api/wallboard/events": {"get": _op("the wallboard's snapshots as Server-Sent Events (`event: board`)",
                                             "statistics")},
        "/api/supervise/{action}": {"post": {
            "summary": "a supervisor action: listen, whisper, barge (call_id), pause, unpause (agent_id), escalate "
                       "(call_id of a waiting call)",
            "description": "Access policy kind `supervision`, action `change`: supervisors only, with a reason; "
                           "audited before it is done. listen/whisper/barge dial the supervisor's own phone.",
            "security": [{"bearer": []}, {"cookie": []}],
            "parameters": [{"name": "action", "in": "path", "required": True, "schema": {"type": "string",
                            "enum": ["listen", "whisper", "barge", "pause", "unpause", "escalate"]}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["reason"],
                "properties": {"call_id": {"type": "string"}, "agent_id": {"type": "string"},
                               "reason": {"type": "string", "minLength": 10, "maxLength": 500}}}}}},
            "responses": {
                "200": {"description": "done (listen/whisper/barge: the phone answered and is connected)"},
                "400": {"description": "missing or unusable reason, or target"},
                "401": {"description": "no valid session"},
                "403": {"description": "not a supervisor"},
                "404": {"description": "unknown call or action"},
                "409": {"description": "the call is not talking to an agent / not waiting; no supervisor phone"},
                "503": {"description": "no Asterisk connection"},
                "504": {"description": "the supervisor's phone did not answer"},
            },
        }},
        "/wallboard": {"get": {"summary": "the wallboard page (HTML, no data of its own)",
                               "responses": {"200": {"description": "HTML"}}}},
    },
}  # fmt: skip
