"""Call routing, sans I/O: routing rules per consult category and the dispatcher that pairs calls with agents."""

from routing.model import Agent, CallPriority, CallRequest, Credential
from routing.router import AgentState, AgentStatus, Assignment, Dispatcher, EscalationDue, RoutingError, eligible
from routing.rules import DEFAULT_RULES, RoutingRules, RulesError, load_rules, parse_rules

__all__ = [
    "DEFAULT_RULES",
    "Agent",
    "AgentState",
    "AgentStatus",
    "Assignment",
    "CallPriority",
    "CallRequest",
    "Credential",
    "Dispatcher",
    "EscalationDue",
    "RoutingError",
    "RoutingRules",
    "RulesError",
    "eligible",
    "load_rules",
    "parse_rules",
]
