"""The agent's one action that upgrades a call to emergency: a short key sequence on their SIP phone (e.g. ``*0``),
pressed during the conversation. Sans-I/O: keys and their times in, "upgrade now" out.

Agents have only a SIP phone (no desktop), so the action is on the phone; Asterisk reports each key of the agent's
leg as ARI ``ChannelDtmfReceived``. A sequence (not one key) so that a key pressed by accident, or tones the
patient's side plays into the conversation, never upgrade a call; keys further apart than ``gap`` seconds start
again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_KEYS = re.compile(r"^[0-9*#]{2,4}$")


@dataclass
class UpgradeKeys:
    """Feed every key of the agent's leg; :meth:`press` is True once, when the whole sequence has been pressed."""

    sequence: str
    gap: float = 3.0
    _typed: str = field(default="", init=False)
    _last: float | None = field(default=None, init=False)
    _done: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if not _KEYS.match(self.sequence):
            raise ValueError(f"an upgrade sequence is 2 to 4 keys of 0-9, * and # (got {self.sequence!r})")

    def press(self, key: str, at: float) -> bool:
        if self._done:
            return False
        if self._last is not None and at - self._last > self.gap:
            self._typed = ""
        self._last = at
        self._typed = (self._typed + key)[-len(self.sequence) :]
        if self._typed == self.sequence:
            self._done = True
            return True
        return False
