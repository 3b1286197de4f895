"""AMI connection (panoramisk): Asterisk's own state, independent of any call.

panoramisk's ``Manager`` reconnects by itself after a lost connection; this wrapper turns its callbacks into
log lines and a ``connected`` flag the service can report. Agent phones' contact state (``ContactStatus``)
goes to the routing engine. Events are never logged whole: AMI events carry caller numbers.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from panoramisk import Manager

from ground.logs import get_logger

log = get_logger(__name__)

WATCHED_EVENTS = ("FullyBooted", "Shutdown", "Reload")
# PJSIP contact states that mean the phone can be rung (static contacts that are not qualified stay "Unknown").
_ONLINE = frozenset({"Created", "Reachable", "Unknown", "NonQualified", "Updated"})
ContactListener = Callable[[str, bool], None]


class AmiMonitor:
    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        secret: str,
        reconnect_timeout: int = 2,
        *,
        on_contact: ContactListener | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connected = False
        self._on_contact = on_contact
        self._contacts: dict[str, set[str]] = {}  # endpoint → contact URIs that can be rung
        self._manager = Manager(
            loop=asyncio.get_running_loop(),
            host=host,
            port=port,
            username=username,
            secret=secret,
            ping_delay=10,
            reconnect_timeout=reconnect_timeout,
            # AMI over TLS ([asterisk] tls): panoramisk passes this to the event loop's create_connection.
            ssl=ssl_context if ssl_context is not None else False,
            # "system" carries ContactStatus (agent phones registering, reachable or gone).
            events="system",
            on_login=self._on_login,
            on_disconnect=self._on_disconnect,
        )
        for name in WATCHED_EVENTS:
            self._manager.register_event(name, self._on_event)
        self._manager.register_event("ContactStatus", self._on_contact_status)

    def _on_login(self, manager: Any) -> None:
        self.connected = True
        log.info("ami.connected")

    def _on_disconnect(self, manager: Any, exc: BaseException | None) -> None:
        self.connected = False
        log.warning("ami.disconnected", reason=type(exc).__name__ if exc else "closed")

    def _on_event(self, manager: Any, event: Any) -> None:
        log.info("ami.event", ami_event=str(event.get("Event")), status=str(event.get("Status", "")))

    def _on_contact_status(self, manager: Any, event: Any) -> None:
        """An endpoint can be rung while any of its contacts can: a phone that re-registers (or whose static
        contact moves on a reload) gets its new contact before the old one is reported removed."""
        endpoint = str(event.get("EndpointName") or event.get("AOR") or "")
        status = str(event.get("ContactStatus", ""))
        if not endpoint:
            return
        contacts = self._contacts.setdefault(endpoint, set())
        uri = str(event.get("URI") or "")
        if status in _ONLINE:
            contacts.add(uri)
        else:
            contacts.discard(uri)
        online = bool(contacts)
        log.info("ami.contact_status", endpoint=endpoint, status=status, online=online)
        if self._on_contact is not None:
            self._on_contact(endpoint, online)

    def start(self) -> None:
        self._manager.connect()

    def close(self) -> None:
        # Stop the automatic reconnect before closing, or panoramisk would schedule another connect.
        self._manager.connection_lost = lambda exc: None
        self._manager.close()
