"""Render the SIP front (Kamailio's dispatcher) from ``[cluster.front]``: ``kamailio.cfg`` + ``dispatcher.list``.

Rendering is a pure function of the front's settings so every line Kamailio will read is checked by unit tests;
``write_front`` writes the two files whole and renames them into place, so a running Kamailio that reloads its
list (``dispatcher.reload``) never reads half a file. ``kamailio -c -f kamailio.cfg`` checks the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ground.config import FrontConfig, parse_sip_address
from ground.errors import MedhotlineError
from medhotline.asterisk_config import render_text

TEMPLATE = Path(__file__).resolve().parent.parent / "kamailio-config" / "kamailio.cfg"
CONFIG_NAME = "kamailio.cfg"
LIST_NAME = "dispatcher.list"
# Dispatcher algorithms by their numbers in Kamailio's dispatcher module (docs/decisions.md says why 10).
ALGORITHMS = {"call_load": "10", "round_robin": "4"}
DISPATCH_SET = 1
# The user a service probe asks each node's Asterisk for (asterisk-config/pjsip.conf, extensions.conf): it exists
# only while the node's ARI application is registered, so the node's OPTIONS answer is 200 then and 404 otherwise.
HEALTH_USER = "medhotline-health"


class FrontConfigError(MedhotlineError):
    """The front can't be generated from this configuration; the message names the key and why."""


@dataclass(frozen=True)
class FrontFiles:
    config: str
    dispatcher_list: str


def _sip_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def sip_uri(address: str, user: str | None = None) -> str:
    host, port = parse_sip_address(address)
    return f"sip:{'' if user is None else user + '@'}{_sip_host(host)}:{port}"


def dispatcher_list(front: FrontConfig) -> str:
    """One line per node: set, URI, flags, priority, attributes. ``duid`` names the node for call-load counting."""
    if not front.nodes:
        raise FrontConfigError("cluster.front.nodes: no nodes configured; list each node's Asterisk as host:port")
    lines = ["# set destination flags priority attributes (generated from cluster.front.nodes)"]
    # The destination is also the probes' request URI: with the service probe it names the health user.
    user = HEALTH_USER if front.probe == "service" else None
    for index, node in enumerate(front.nodes, start=1):
        lines.append(f"{DISPATCH_SET} {sip_uri(node, user)} 0 0 duid=node{index};maxload=0")
    return "\n".join(lines) + "\n"


def render_front(front: FrontConfig, list_path: Path, template: Path = TEMPLATE) -> FrontFiles:
    """The two files for a Kamailio whose dispatcher list will be at ``list_path``."""
    listen_host, listen_port = parse_sip_address(front.listen)
    if any(parse_sip_address(node) == (listen_host, listen_port) for node in front.nodes):
        raise FrontConfigError(f"cluster.front.nodes: {front.listen} is the front's own listen address")
    listed = dispatcher_list(front)
    values = {
        "listen": f"{_sip_host(listen_host)}:{listen_port}",
        "listen_host": _sip_host(listen_host),
        "dispatcher_list": str(list_path),
        "algorithm": ALGORITHMS[front.algorithm],
        "ping_interval": str(front.ping_interval),
        "ping_timeout_ms": str(round(front.ping_timeout * 1000)),
        "probing_threshold": str(front.probing_threshold),
        "inactive_threshold": str(front.inactive_threshold),
        "invite_timeout_ms": str(round(front.invite_timeout * 1000)),
        "health_user": HEALTH_USER,
        "service_probe": "1" if front.probe == "service" else "0",
        # service: only a 2xx (the health user exists: the application is registered); a 404 means it is not.
        "ping_reply_codes": "class=2" if front.probe == "service" else "class=2;code=401;code=403;code=404;code=405",
    }
    if '"' in str(list_path):
        raise FrontConfigError(f"{list_path}: a path with a double quote can't be written into kamailio.cfg")
    return FrontFiles(render_text(template.name, template.read_text(encoding="utf-8"), values), listed)


def write_front(front: FrontConfig, directory: Path) -> Path:
    """Write ``kamailio.cfg`` and ``dispatcher.list`` into ``directory``; return the config's path."""
    directory = directory.resolve()
    files = render_front(front, directory / LIST_NAME)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in ((LIST_NAME, files.dispatcher_list), (CONFIG_NAME, files.config)):
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, directory / name)
    return directory / CONFIG_NAME
