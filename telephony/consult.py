"""The consult categories a call is sorted into (requirement 6): one vocabulary for flows, keywords and routing.

It lives below the features so the flow model (``ivr``), the classifier (``keywords``) and the routing rules
(``routing``) share it without importing each other.
"""

from __future__ import annotations

from typing import Literal, get_args

ConsultCategory = Literal[
    "emergency", "diagnosis", "medication", "adverse_reaction", "vaccination", "appointment", "general"
]
CONSULT_CATEGORIES: tuple[ConsultCategory, ...] = get_args(ConsultCategory)
# What a ``route`` node hands to routing: a consult category, or ``triage`` (the nurse-triage tier of callers with
# symptoms but no red flag; docs/triage.md). The classifier never returns ``triage``: it is a level, not a topic.
RouteCategory = Literal[
    "emergency", "diagnosis", "medication", "adverse_reaction", "vaccination", "appointment", "general", "triage"
]
ROUTE_CATEGORIES: tuple[RouteCategory, ...] = get_args(RouteCategory)
