"""AMI ContactStatus events become the routing engine's view of which agent phones can be rung."""

from __future__ import annotations

import pytest

from medhotline.ami import AmiMonitor


@pytest.mark.parametrize(
    ("status", "online"),
    [
        ("Reachable", True),
        ("Created", True),
        ("NonQualified", True),
        ("Unknown", True),  # a static contact that is not qualified: assume it can be rung
        ("Unreachable", False),
        ("Removed", False),
    ],
)
async def test_contact_status_reaches_the_listener(status: str, online: bool) -> None:
    seen: list[tuple[str, bool]] = []
    monitor = AmiMonitor("127.0.0.1", 1, "u", "s", on_contact=lambda endpoint, up: seen.append((endpoint, up)))
    monitor._on_contact_status(None, {"EndpointName": "phys1", "AOR": "phys1", "ContactStatus": status})
    assert seen == [("phys1", online)]


async def test_an_event_without_an_endpoint_is_ignored() -> None:
    seen: list[tuple[str, bool]] = []
    monitor = AmiMonitor("127.0.0.1", 1, "u", "s", on_contact=lambda endpoint, up: seen.append((endpoint, up)))
    monitor._on_contact_status(None, {"ContactStatus": "Removed"})
    assert seen == []


async def test_a_moved_contact_keeps_the_endpoint_online() -> None:
    """A reload moves a static contact: the new one is reported before the old one is removed."""
    seen: list[tuple[str, bool]] = []
    monitor = AmiMonitor("127.0.0.1", 1, "u", "s", on_contact=lambda endpoint, up: seen.append((endpoint, up)))
    old, new = "sip:doc@127.0.0.1:5071", "sip:doc@127.0.0.1:5099"
    monitor._on_contact_status(None, {"EndpointName": "doc", "URI": old, "ContactStatus": "NonQualified"})
    monitor._on_contact_status(None, {"EndpointName": "doc", "URI": new, "ContactStatus": "NonQualified"})
    monitor._on_contact_status(None, {"EndpointName": "doc", "URI": old, "ContactStatus": "Removed"})
    assert seen[-1] == ("doc", True)
    monitor._on_contact_status(None, {"EndpointName": "doc", "URI": new, "ContactStatus": "Unreachable"})
    assert seen[-1] == ("doc", False)
