"""The generated agents' endpoints bind their RTP to Asterisk's own address (no per-leg DNS look-ups)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from routing.agent_endpoints import ContactView, render_agent_endpoints


@dataclass(frozen=True)
class _Agent:
    endpoint: str


@dataclass(frozen=True)
class _View:
    agent: _Agent
    contact: str | None


VIEWS = cast("list[ContactView]", [_View(_Agent("nurse1"), "sip:nurse1@127.0.0.1:5071")])


def test_agents_rtp_is_bound_to_the_given_address() -> None:
    text = render_agent_endpoints(VIEWS, media_address="127.0.0.1")
    assert "media_address = 127.0.0.1\nbind_rtp_to_media_address = yes\n" in text


def test_without_an_address_or_with_a_host_name_asterisk_chooses() -> None:
    """A host name would itself be resolved by Asterisk; only an IP address is written."""
    for address in (None, "pbx.example"):
        text = render_agent_endpoints(VIEWS, media_address=address)
        assert "media_address" not in text
        assert "[nurse1]\ntype = endpoint" in text
