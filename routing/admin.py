"""Agent and credential administration, each permission change audited: the operations behind ``medhotline
agents add/show`` and ``medhotline credentials verify/revoke``.

Creating an account with roles, verifying and revoking a credential change who may do what, so each appends an
entry to the audit trail. The entry is validated before the change is made (``compliance.audited_change``), so
an entry the audit log would refuse stops the operation with nothing changed. Making an existing account an
agent changes no permission and is not audited; it is refused when the caller asked for other roles, name or
departments than the account has, because this operation does not change accounts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from compliance.audited_change import AuditedChange
from routing.store import AgentError

if TYPE_CHECKING:
    from compliance.accounts import AccountRecord, AccountStore
    from compliance.audit import AuditLog
    from routing.store import AgentStore, AgentView, CredentialRecord

DEFAULT_ROLES = ("agent",)


@dataclass(frozen=True, slots=True)
class NewAgent:
    """What ``agents add`` asks for; ``name``, ``roles`` and ``departments`` describe an account to create."""

    account_id: str
    endpoint: str
    name: str | None = None
    roles: Sequence[str] = ()
    departments: Sequence[str] = ()
    contact: str | None = None
    languages: Sequence[str] = ("zh",)
    skills: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class AgentDetails:
    """One agent as ``agents show`` prints it."""

    view: AgentView
    account: AccountRecord
    credentials: list[CredentialRecord]
    rings: dict[str, int]


class AgentAdministration:
    """Agents and credentials over the stores, permission changes audited in ``audit``."""

    def __init__(self, agents: AgentStore, accounts: AccountStore, audit: AuditLog) -> None:
        self._agents, self._accounts, self._audit = agents, accounts, audit

    def add_agent(self, new: NewAgent, *, operator: str, operator_role: str, at: datetime) -> tuple[AgentView, bool]:
        """Make the account an agent, creating it (audited) if it does not exist: the view, and whether created."""
        existing = self._accounts.find(new.account_id)
        skills = new.skills or {}
        if existing is None:
            if not new.name:
                raise AgentError(f"account {new.account_id} does not exist: give --name to create it")
            roles = list(new.roles) or list(DEFAULT_ROLES)
            audited = AuditedChange(
                self._audit,
                actor=operator,
                role=operator_role,
                action="permission_change",
                reason="account created for an agent",
                details={
                    "account": new.account_id,
                    "roles": [*map(str, sorted(set(roles)))],
                    "departments": [*map(str, sorted(set(new.departments)))],
                },
            )
            view = self._agents.add_agent_with_account(
                new.account_id,
                new.name,
                roles,
                new.endpoint,
                at,
                departments=new.departments,
                contact=new.contact,
                languages=new.languages,
                skills=skills,
            )
            audited.done()
            return view, True
        differs = []
        if new.name and new.name.strip() != existing.display_name:
            differs.append(f"name {existing.display_name!r}")
        if new.roles and frozenset(new.roles) != existing.roles:
            differs.append(f"roles {', '.join(sorted(existing.roles))}")
        if new.departments and frozenset(new.departments) != existing.departments:
            differs.append(f"departments {', '.join(sorted(existing.departments)) or '(none)'}")
        if differs:
            raise AgentError(
                f"account {new.account_id} already exists with {'; '.join(differs)}: this command does not change "
                "accounts; leave those options out to make the existing account an agent"
            )
        view = self._agents.add_agent(
            new.account_id, new.endpoint, at, contact=new.contact, languages=new.languages, skills=skills
        )
        return view, False

    def details(self, account_id: str) -> AgentDetails:
        return AgentDetails(
            self._agents.view(account_id),
            self._accounts.get(account_id),
            self._agents.credentials(account_id),
            self._agents.ring_counts(account_id),
        )

    def find_view(self, account_id: str) -> AgentView | None:
        """The agent's view, or None when the account is no agent."""
        try:
            return self._agents.view(account_id)
        except AgentError:
            return None

    def verify_credential(self, credential_id: int, *, by: str, at: datetime) -> CredentialRecord:
        """Mark the credential checked against its certificate (audited, actor ``by``); the record before."""
        record = self._agents.credential(credential_id)
        audited = AuditedChange(
            self._audit,
            actor=by,
            action="permission_change",
            reason="credential verified against its certificate",
            details={"credential_id": credential_id, "account": record.account_id, "kind": record.kind},
        )
        self._agents.verify_credential(credential_id, by, at)
        audited.done()
        return record

    def revoke_credential(
        self, credential_id: int, reason: str, *, operator: str, operator_role: str, at: datetime
    ) -> CredentialRecord:
        """Revoke at once (audited); the record before."""
        record = self._agents.credential(credential_id)
        audited = AuditedChange(
            self._audit,
            actor=operator,
            role=operator_role,
            action="permission_change",
            reason=reason,
            details={
                "credential_id": credential_id,
                "account": record.account_id,
                "kind": record.kind,
                "revoked": True,
            },
        )
        self._agents.revoke_credential(credential_id, reason, at)
        audited.done()
        return record
