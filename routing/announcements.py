"""What a waiting caller hears from the queue, as prompt texts (rendered by ``medhotline prompts build``).

Positions are announced as whole sentences, one recording each, rather than spliced from number fragments:
prompts are rendered offline by espeak-ng, and a sentence rendered whole sounds natural where a spliced one
does not. Beyond :data:`MAX_SPOKEN_POSITION` the caller hears "many callers" instead of a number.
"""

from __future__ import annotations

from typing import Final

from routing.callbacks import callback_texts

MAX_SPOKEN_POSITION: Final = 20
# Every waiting caller is reminded that an emergency jumps the queue (the key is routing.emergency_key).
EMERGENCY_HINT: Final = "如病情紧急，请按0。"
NEXT_IN_LINE: Final = "您是下一位，工作人员马上为您服务，请不要挂机。"
MANY_AHEAD: Final = "目前来电较多，请您耐心等候，请不要挂机。" + EMERGENCY_HINT
ESCALATING: Final = "正在为您转接，请稍候。"
RECLASSIFIED: Final = "已为您转为急症优先接听，请不要挂机。"


def position_text(position: int) -> str:
    """The announcement for a caller at ``position`` (1 = next to be served)."""
    if position <= 1:
        return NEXT_IN_LINE
    if position - 1 > MAX_SPOKEN_POSITION:
        return MANY_AHEAD
    return f"您前面还有{position - 1}位来电在等候，请不要挂机。" + EMERGENCY_HINT


def announcement_texts(callback_key: str = "") -> list[str]:
    """Every text the queue may play, so prompts can be rendered ahead of time; with ``callback_key``
    (``routing.callback_key``) the callback offer and its answers too."""

    positions = [position_text(p) for p in range(1, MAX_SPOKEN_POSITION + 3)]
    return list(dict.fromkeys([*positions, ESCALATING, RECLASSIFIED, *callback_texts(callback_key)]))
