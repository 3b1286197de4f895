"""Agent and credential administration (``routing.admin``): account creation, verification and revocation each
audited, an entry the audit log would refuse stopping the change with nothing written, an existing account
never changed by ``add_agent``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from compliance.accounts import AccountStore
from compliance.audit import AuditError, AuditLog, SqlAuditStore
from routing.admin import AgentAdministration, NewAgent
from routing.store import AgentError, AgentStore

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
YEAR = timedelta(days=365)


@pytest.fixture
def admin(engine: Engine) -> AgentAdministration:
    return AgentAdministration(AgentStore.for_engine(engine), AccountStore.for_engine(engine), audit_of(engine))


def audit_of(engine: Engine) -> AuditLog:
    return AuditLog(SqlAuditStore(engine))


def entries(engine: Engine) -> list[tuple[str, str, str, dict[str, object]]]:
    return [(e.actor, e.role, e.reason, json.loads(e.details)) for e in SqlAuditStore(engine).entries()]


def test_a_created_account_is_audited_an_existing_one_is_not(admin: AgentAdministration, engine: Engine) -> None:
    new = NewAgent("nurse1", "phone-n1", name="Nurse One", roles=["nurse"], departments=["hotline"])
    view, created = admin.add_agent(new, operator="os:root", operator_role="operator", at=T0)
    assert created
    assert view.agent.roles == frozenset({"nurse"})
    assert entries(engine) == [
        (
            "os:root",
            "operator",
            "account created for an agent",
            {"account": "nurse1", "roles": ["nurse"], "departments": ["hotline"]},
        )
    ]
    AccountStore.for_engine(engine).add("phys1", "Doctor", ["physician"], T0)
    view, created = admin.add_agent(NewAgent("phys1", "phone-p1"), operator="os:root", operator_role="operator", at=T0)
    assert not created
    assert view.agent.endpoint == "phone-p1"
    assert len(entries(engine)) == 1


def test_add_agent_refuses_to_change_an_existing_account(admin: AgentAdministration, engine: Engine) -> None:
    AccountStore.for_engine(engine).add("phys1", "Doctor", ["physician"], T0)
    with pytest.raises(AgentError, match="already exists with roles physician"):
        admin.add_agent(NewAgent("phys1", "p", roles=["admin"]), operator="os:root", operator_role="operator", at=T0)
    with pytest.raises(AgentError, match="give --name"):
        admin.add_agent(NewAgent("ghost", "p"), operator="os:root", operator_role="operator", at=T0)
    assert admin.find_view("phys1") is None
    assert entries(engine) == []


def test_verify_and_revoke_are_audited(admin: AgentAdministration, engine: Engine) -> None:
    agents = AgentStore.for_engine(engine)
    AccountStore.for_engine(engine).add("sup1", "Supervisor", ["supervisor"], T0)
    admin.add_agent(NewAgent("phys1", "p", name="Doctor", roles=["physician"]), operator="os:root",
                    operator_role="operator", at=T0)  # fmt: skip
    credential = agents.add_credential("phys1", "physician_license", "N1", "Board", T0, T0 + YEAR, T0)
    record = admin.verify_credential(credential, by="sup1", at=T0)
    assert (record.account_id, record.kind) == ("phys1", "physician_license")
    assert agents.credential(credential).verified_by == "sup1"
    admin.revoke_credential(credential, "licence suspended by the board", operator="os:root",
                            operator_role="operator", at=T0)  # fmt: skip
    assert agents.credential(credential).status == "revoked"
    assert [(actor, details) for actor, _, _, details in entries(engine)[1:]] == [
        ("sup1", {"credential_id": credential, "account": "phys1", "kind": "physician_license"}),
        ("os:root", {"credential_id": credential, "account": "phys1", "kind": "physician_license", "revoked": True}),
    ]


def test_a_reason_the_audit_log_would_refuse_changes_nothing(admin: AgentAdministration, engine: Engine) -> None:
    agents = AgentStore.for_engine(engine)
    admin.add_agent(NewAgent("phys1", "p", name="Doctor", roles=["physician"]), operator="os:root",
                    operator_role="operator", at=T0)  # fmt: skip
    credential = agents.add_credential("phys1", "physician_license", "N1", "Board", T0, T0 + YEAR, T0)
    before = entries(engine)
    with pytest.raises(AuditError, match="nothing was changed"):
        admin.revoke_credential(credential, "patient 13800138000 complained", operator="os:root",
                                operator_role="operator", at=T0)  # fmt: skip
    assert agents.credential(credential).status != "revoked"
    assert entries(engine) == before
