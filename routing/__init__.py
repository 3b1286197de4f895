"""Call routing, sans I/O: routing rules per consult category and the dispatcher that pairs calls with agents."""

from routing.model import Agent, CallPriority, CallRequest, Credential
from routing.router import AgentState, AgentStatus, Assignment, Dispatcher, EscalationDue, RoutingError, eligible
from routing.rules import DEFAULT_RULES, RoutingRules, RulesError, load_rules, parse_rules
from routing.store import AgentError, AgentStore, AgentView, CredentialRecord, RingRecord
from routing.validity import ValidityReport, validity_report

__all__ = [
    "DEFAULT_RULES",
    "Agent",
    "AgentError",
    "AgentState",
    "AgentStatus",
    "AgentStore",
    "AgentView",
    "Assignment",
    "CallPriority",
    "CallRequest",
    "Credential",
    "CredentialRecord",
    "Dispatcher",
    "EscalationDue",
    "RingRecord",
    "RoutingError",
    "RoutingRules",
    "RulesError",
    "ValidityReport",
    "eligible",
    "load_rules",
    "parse_rules",
    "validity_report",
]
