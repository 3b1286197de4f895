"""Kamailio with TLS, live: its TLS listener completes a verified handshake, and with ``node_transport = "tls"``
calls through the front reach the nodes over TLS only (``medhotline.cluster_sandbox``, one site CA for all).

The caller is SIPp over UDP into the front (Debian's SIPp has no TLS); the hop that must be encrypted is the
front's to the nodes. A capture on the loopback interface shows it: TLS records on the nodes' TLS ports with no
SIP readable in them, and nothing at all sent to the nodes' UDP SIP ports.
"""

from __future__ import annotations

import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ground.config import parse_sip_address
from medhotline.cluster_sandbox import ClusterSandbox
from medhotline.sandbox_pki import ensure_test_pki

from .loopback_capture import LoopbackCapture
from .test_cluster_front import calls_through, running_cluster, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[ClusterSandbox]:
    with running_cluster(tmp_path, "ftls", tls=True) as cluster:
        yield cluster


def _sip_request(method: str, uri: str, host: str, via: str, sender: str, *, contact: bool = False) -> bytes:
    """A SIP request without a body to ``uri`` (its To: the URI without parameters) from ``sender`` (From, and
    Contact when ``contact``) at ``host``; ``via`` is the transport and address of its Via (``UDP host:port``).
    A fresh branch, tag and Call-ID each time."""
    tag = uuid.uuid4().hex[:12]
    contact_header = f"Contact: <{sender}>\r\n" if contact else ""
    return (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/{via};branch=z9hG4bK{tag};rport\r\n"
        f"From: <{sender}>;tag={tag}\r\nTo: <{uri.split(';', 1)[0]}>\r\n"
        f"Call-ID: {tag}@{host}\r\nCSeq: 1 {method}\r\n{contact_header}"
        "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _invite_status(host: str, port: int, number: str) -> int | None:
    """One INVITE over UDP to the front; the status of its first final answer (None: none within 3 s)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        local = sock.getsockname()[1]
        sock.sendto(
            _sip_request(
                "INVITE",
                f"sip:{number}@{host}:{port}",
                host,
                f"UDP {host}:{local}",
                f"sip:caller@{host}:{local}",
                contact=True,
            ),
            (host, port),
        )
        sock.settimeout(3)
        while True:
            try:
                first = sock.recv(65535).split(b"\r\n", 1)[0].split()
            except TimeoutError:
                return None
            if len(first) > 1 and first[1].isdigit() and int(first[1]) >= 200:
                return int(first[1])


def _options_over_tls(
    context: ssl.SSLContext, host: str, port: int, server_hostname: str
) -> tuple[dict[str, object], bytes]:
    """A verified TLS handshake with the front, then one OPTIONS to it; (the peer's certificate, the answer)."""
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        local = tls.getsockname()[1]
        tls.sendall(
            _sip_request(
                "OPTIONS", f"sip:{host}:{port};transport=tls", host, f"TLS {host}:{local}", f"sip:probe@{host}"
            )
        )
        answer = tls.recv(65535)
        return dict(tls.getpeercert() or {}), answer


def test_front_tls_handshake_is_verified_and_calls_reach_the_nodes_over_tls(
    tls_cluster: ClusterSandbox, tmp_path: Path
) -> None:
    cluster = tls_cluster
    front = cluster.front
    pki = cluster.site_pki
    assert pki is not None
    tls_host, tls_port = parse_sip_address(front.tls_listen)

    # A client that trusts the site CA and checks the name: the handshake completes, the chain and the IP address in
    # the certificate are verified, and the front answers SIP over that connection.
    trusting = ssl.create_default_context(cafile=str(pki.ca_cert))
    cert, answer = _options_over_tls(trusting, tls_host, tls_port, tls_host)
    assert ("IP Address", tls_host) in cert["subjectAltName"], cert  # type: ignore[operator]
    assert answer.startswith(b"SIP/2.0 200 "), answer[:200]
    # A client that trusts another CA is refused its handshake; so is one that expects another name.
    stranger = ensure_test_pki(tmp_path / "other-ca", ["127.0.0.1"])
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _options_over_tls(ssl.create_default_context(cafile=str(stranger.ca_cert)), tls_host, tls_port, tls_host)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _options_over_tls(trusting, tls_host, tls_port, "front.invalid")

    # The generated list reaches every node on its TLS port, and the probes over TLS keep both in.
    tls_ports = [n.config.sip.tls_port for n in cluster.nodes]
    udp_ports = [n.config.asterisk.sip_port for n in cluster.nodes]
    assert front.nodes == tuple(f"127.0.0.1:{port}" for port in tls_ports)
    log_before = cluster.log_path.read_text(errors="replace")
    number = cluster.nodes[0].config.hotline.number
    with LoopbackCapture(udp_ports, tls_ports) as capture:
        spread = calls_through(cluster, number, 4, tmp_path)
        time.sleep(0.5)  # the last 200 OK of a BYE is on the wire before the capture closes
    udp, tcp = capture.snapshot()
    # Which node answered is read from the Contact of its 200 OK: its TLS port, as the call came in over TLS. Calls
    # in flight together go to the node with fewer calls: both take some.
    assert set(spread) == set(tls_ports), spread
    tried = cluster.log_path.read_text(errors="replace")[len(log_before) :]
    for port in tls_ports:
        assert tried.count(f"INVITE to sip:127.0.0.1:{port};transport=tls") >= 1, tried[-2000:]
    assert tried.count("front: INVITE to ") == tried.count(";transport=tls") == 4, tried[-2000:]

    # On the wire: nothing sent to the nodes' UDP SIP ports; TLS records on their TLS ports and no SIP in clear.
    assert udp == [], udp[:3]
    assert tcp, "nothing seen on the nodes' TLS ports"
    assert any(p[0] == 0x16 for p in tcp), "no TLS handshake record"
    wire = b"".join(tcp)
    for text in (b"INVITE sip:", b"OPTIONS sip:", b"SIP/2.0", number.encode()):
        assert text not in wire, text


def test_a_node_whose_certificate_the_front_does_not_trust_gets_no_call(tmp_path: Path) -> None:
    """The front trusts another CA than the one that signed the nodes' certificates: its TLS probes fail, both nodes
    are taken out, and a call gets the front's own 503 instead of reaching a node it could not verify."""
    stranger = ensure_test_pki(tmp_path / "other-ca", ["127.0.0.1"])
    with running_cluster(tmp_path, "ftls", tls=True, front_extra=f'node_ca_file = "{stranger.ca_cert}"') as cluster:
        number = cluster.nodes[0].config.hotline.number
        statuses: list[int | None] = []

        # The nodes count as up until their first probe fails (ping_interval), so ask until the front refuses.
        def front_refuses() -> bool:
            statuses.append(_invite_status(cluster.front_host, cluster.front_port, number))
            return statuses[-1] == 503

        refused = wait_until(front_refuses, 15)
        log_text = cluster.log_path.read_text(errors="replace")
    assert refused, (statuses, log_text[-2000:])
    assert "certificate verify failed" in log_text, log_text[-2000:]
    assert 200 not in statuses, statuses
