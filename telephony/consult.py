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
