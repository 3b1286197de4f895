"""The consult category of an utterance, from the spotter's matches: sans-I/O, deterministic, explainable.

The decision, in order (the first that applies):

1. ``emergency`` when any emergency term counts (not denied, past, hypothetical or a topic). Recall comes
   first: an uncertain report (不知道是不是中风) is an emergency, and so is one about someone else.
2. ``adverse_reaction`` when a reaction term counts (副作用, 接种部位红肿), or a symptom (发烧, 起疹子) follows an
   exposure, a vaccine or a drug taken (打完疫苗后发烧, 吃了头孢以后起疹子). A symptom before the vaccine is a
   question about vaccinating (孩子发烧了还能打疫苗吗).
3. ``diagnosis`` (是不是得了, 会不会是, 什么病) — answered by physicians only.
4. ``medication`` (怎么吃, 剂量, 漏服, 降压药).
5. ``vaccination`` (疫苗, 接种, 九价) — before appointment: booking a vaccine (预约疫苗) is vaccination.
6. ``appointment`` (挂号, 预约, 复诊, 处方, 取药).
7. ``general`` otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from keywords.lexicon import Category, Lexicon
from keywords.spotter import Classification, Match, Spotter

__all__ = ["Classifier", "decide"]

PRECEDENCE: tuple[Category, ...] = ("diagnosis", "medication", "vaccination", "appointment")
EXPOSURE_CATEGORIES: frozenset[str] = frozenset({"vaccination", "medication"})
EXPOSURE_LOOKBEHIND = 2  # characters before the exposure term that may say it was taken (打了疫苗, 吃了头孢)


def _after_exposure(text: str, symptom: Match, counted: Sequence[Match], cues: Sequence[str]) -> Match | None:
    """The exposure (vaccine or drug) the symptom followed, if any: before it, with a 了/完/后 in between."""
    for exposure in counted:
        if exposure.category not in EXPOSURE_CATEGORIES or exposure.end > symptom.start:
            continue
        window = text[max(0, exposure.start - EXPOSURE_LOOKBEHIND) : symptom.start]
        if any(cue in window for cue in cues):
            return exposure
    return None


def decide(text: str, matches: Sequence[Match], cues: Sequence[str] = ("了", "完", "后", "过")) -> Classification:
    """The category and the emergency flag for ``matches`` (from :meth:`Spotter.spot` on ``text``)."""
    rules = [m.reason for m in matches if m.reason]
    rules.extend(f"homophone: {m.term} → {m.variant} ({m.canonical})" for m in matches if m.via == "homophone")
    counted = [m for m in matches if m.counts]
    emergencies = [m for m in counted if m.category == "emergency"]
    if emergencies:
        rules.append("emergency: " + ", ".join(dict.fromkeys(m.canonical for m in emergencies)))
        return Classification(text, True, "emergency", tuple(matches), tuple(rules), level="emergency")
    reactions = [m for m in counted if m.category == "adverse_reaction" and not m.symptom]
    for symptom in (m for m in counted if m.category == "adverse_reaction" and m.symptom):
        exposure = _after_exposure(text, symptom, counted, cues)
        if exposure is not None:
            rules.append(f"after exposure: {exposure.term} … {symptom.term}")
            reactions.append(symptom)
    if reactions:
        rules.append("adverse_reaction: " + ", ".join(dict.fromkeys(m.canonical for m in reactions)))
        return Classification(text, False, "adverse_reaction", tuple(matches), tuple(rules))
    for category in PRECEDENCE:
        found = [m for m in counted if m.category == category]
        if found:
            rules.append(f"{category}: " + ", ".join(dict.fromkeys(m.canonical for m in found)))
            return Classification(text, False, category, tuple(matches), tuple(rules))
    rules.append("general: no consult term")
    return Classification(text, False, "general", tuple(matches), tuple(rules))


class Classifier:
    """Spotter + decision for one lexicon. Immutable; build a new one when the lexicon changes."""

    def __init__(self, lexicon: Lexicon) -> None:
        self.lexicon = lexicon
        self.spotter = Spotter(lexicon)
        self._cues = tuple(lexicon.markers.exposure_after) or ("了", "完", "后", "过")

    @property
    def version(self) -> str:
        return self.lexicon.version

    def classify(self, text: str) -> Classification:
        result = decide(text, self.spotter.spot(text), self._cues)
        return dataclasses.replace(result, lexicon_version=self.lexicon.version)
