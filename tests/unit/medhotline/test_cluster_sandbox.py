"""``cluster up``'s per-node configuration: each node's service must read, from the shared file plus its
variables, exactly the node ``node_config`` derived (else it would talk to another node's Asterisk)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ground.config import RTP_PORTS_PER_CALL, load_config
from medhotline.cluster_sandbox import (
    NODE_MAX_CALLS,
    ClusterSandbox,
    node_config,
    node_environment,
    services_problem,
)
from medhotline.phones import Press, patient_scenario
from medhotline.sandbox import SandboxError

BASE = """
[service]
state_dir = "{state}"
log_file = "{state}/service.jsonl"
[asterisk.sandbox]
instance = "clu"
[cluster]
enabled = {enabled}
[cluster.front]
listen = "127.0.0.1:15060"
"""


def write(tmp_path: Path, *, enabled: bool = True, url: str = "") -> Path:
    path = tmp_path / "medhotline.toml"
    text = BASE.format(state=tmp_path, enabled=str(enabled).lower())
    if url:
        text += f'[database]\nurl = "{url}"\n'
    path.write_text(text, encoding="utf-8")
    return path


def test_the_node_variables_over_the_shared_file_give_exactly_the_node_config(tmp_path: Path) -> None:
    path = write(tmp_path)
    base = load_config(path, environ={})
    nodes = [node_config(base, i, "127.0.0.1") for i in (1, 2)]
    for node in nodes:
        assert load_config(path, environ=node_environment(node)) == node
    one, two = nodes
    assert (one.service.node_name, two.service.node_name) == ("node1", "node2")
    assert one.service.log_file == tmp_path / "service-node1.jsonl"
    # Nothing a service binds or connects to is shared between the two nodes.
    assert one.fastagi.port != two.fastagi.port
    assert one.asterisk.sip_port != two.asterisk.sip_port
    assert one.asterisk.ari_port != two.asterisk.ari_port
    assert one.asterisk.sandbox.instance != two.asterisk.sandbox.instance
    # What they must share: the database and the state directory (the key service's socket and token).
    assert one.database_url == two.database_url == base.database_url
    assert one.keyservice_socket == two.keyservice_socket


def test_services_on_several_nodes_need_postgresql_and_the_cluster_queue(tmp_path: Path) -> None:
    sqlite = load_config(write(tmp_path), environ={})
    assert "[database] url" in (services_problem(sqlite, 2) or "")
    assert services_problem(sqlite, 1) is None
    pg = "postgresql+psycopg://medhotline@127.0.0.1:5432/medhotline"
    off = load_config(write(tmp_path, enabled=False, url=pg), environ={})
    assert "[cluster] enabled" in (services_problem(off, 2) or "")
    on = load_config(write(tmp_path, url=pg), environ={})
    assert services_problem(on, 2) is None
    # Refused before anything starts; without services the SQLite default is fine (Asterisk only).
    with pytest.raises(SandboxError, match=r"\[database\] url"):
        ClusterSandbox(sqlite, 2, tmp_path / "front", services=True)


def test_a_patient_through_the_front_sends_ack_and_bye_along_the_record_route() -> None:
    direct = patient_scenario([Press(300, "2")], 1000)
    proxied = patient_scenario([Press(300, "2")], 1000, proxied=True)
    assert "ACK sip:[service]@" in direct
    assert "[routes]" not in direct
    assert 'rrs="true"' in proxied
    assert "ACK [next_url] SIP/2.0" in proxied
    assert "BYE [next_url] SIP/2.0" in proxied
    assert proxied.count("[routes]") == 2
    assert "sip:[service]@[remote_ip]:[remote_port] SIP/2.0" not in proxied.replace("INVITE sip:", "")


def test_a_node_sized_for_more_calls_gets_an_rtp_range_for_them(tmp_path: Path) -> None:
    path = write(tmp_path)
    base = load_config(path, environ={})
    node = node_config(base, 1, "127.0.0.1", max_calls=40)
    assert node.asterisk.max_calls == 40
    assert node.asterisk.rtp_end - node.asterisk.rtp_start >= RTP_PORTS_PER_CALL * 40
    # The node's service reads the same size from its variables.
    assert load_config(path, environ=node_environment(node)) == node
    assert node_config(base, 1, "127.0.0.1").asterisk.max_calls == NODE_MAX_CALLS


def _tls_config(tmp_path: Path, *, sip_tls: bool) -> Path:
    path = write(tmp_path)
    text = path.read_text(encoding="utf-8") + 'node_transport = "tls"\n'
    if sip_tls:
        text += "[sip]\ntls = true\n"
    path.write_text(text, encoding="utf-8")
    return path


def test_each_node_gets_its_own_tls_port_and_its_service_reads_it(tmp_path: Path) -> None:
    path = _tls_config(tmp_path, sip_tls=True)
    base = load_config(path, environ={})
    one, two = (node_config(base, i, "127.0.0.1") for i in (1, 2))
    assert one.sip.tls
    assert two.sip.tls
    assert one.sip.tls_port != two.sip.tls_port
    assert load_config(path, environ=node_environment(one)) == one


@pytest.mark.skipif(shutil.which("kamailio") is None, reason="kamailio is not installed (scripts/bootstrap)")
def test_tls_to_the_nodes_gives_the_front_and_the_nodes_one_site_ca(tmp_path: Path) -> None:
    cluster = ClusterSandbox(load_config(_tls_config(tmp_path, sip_tls=True), environ={}), 2, tmp_path / "front")
    front, pki = cluster.front, cluster.site_pki
    assert pki is not None
    assert pki.directory == tmp_path / "front" / "pki"
    # The dispatcher reaches each node on its TLS port, verified against the site CA; the front has a TLS socket.
    assert front.nodes == tuple(node.tls_address for node in cluster.nodes)
    assert front.node_ca_file == pki.ca_cert
    assert (front.tls_cert_file, front.tls_key_file) == (pki.server_cert, pki.server_key)
    assert front.tls_listen.startswith("127.0.0.1:")
    assert front.tls_listen != front.listen


@pytest.mark.skipif(shutil.which("kamailio") is None, reason="kamailio is not installed (scripts/bootstrap)")
def test_tls_to_the_nodes_without_their_tls_transport_is_refused(tmp_path: Path) -> None:
    config = load_config(_tls_config(tmp_path, sip_tls=False), environ={})
    with pytest.raises(SandboxError, match=r'node_transport = "tls".*\[sip\] tls = true'):
        ClusterSandbox(config, 2, tmp_path / "front")
    assert not (tmp_path / "front").exists()
