"""The SIP front's generated Kamailio config: what it says, what it refuses, and that Kamailio accepts it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ground.config import ConfigError, FrontConfig, load_config
from medhotline.kamailio_config import FrontConfigError, dispatcher_list, render_front, write_front
from medhotline.sandbox_pki import ensure_test_pki

# The TLS tests run Kamailio's own config check, which needs its TLS module.
needs_kamailio_tls = pytest.mark.skipif(
    not Path("/usr/lib/x86_64-linux-gnu/kamailio/modules/tls.so").exists() or shutil.which("kamailio") is None,
    reason="kamailio-tls-modules is not installed (scripts/bootstrap)",
)


def front(**values: object) -> FrontConfig:
    return FrontConfig.model_validate(
        {"listen": "127.0.0.1:15060", "nodes": ["10.0.0.5:5060", "10.0.0.6:5070"]} | values
    )


def _refused_front_toml(tmp_path: Path, toml: str, message: str) -> ConfigError:
    """Loading a config file whose [cluster.front] holds ``toml`` fails with a ConfigError matching ``message``."""
    path = tmp_path / "medhotline.toml"
    path.write_text(f"[cluster.front]\n{toml}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path, environ={})
    return caught.value


def _kamailio_accepts(cfg: Path) -> None:
    """Kamailio's own check of the generated config (``kamailio -c``) passes."""
    check = subprocess.run(["kamailio", "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr[-2000:]


def test_dispatcher_list_names_every_node_in_one_set() -> None:
    lines = dispatcher_list(front(probe="asterisk")).splitlines()[1:]
    assert lines == [
        "1 sip:10.0.0.5:5060 0 0 duid=node1;maxload=0",
        "1 sip:10.0.0.6:5070 0 0 duid=node2;maxload=0",
    ]
    assert "sip:[fd00::7]:5060" in dispatcher_list(front(nodes=["[fd00::7]:5060"], probe="asterisk"))


def test_service_probe_asks_for_the_health_user_and_accepts_only_2xx(tmp_path: Path) -> None:
    # The default: a node is up only while its service's ARI application is registered (docs/cluster.md).
    lines = dispatcher_list(front()).splitlines()[1:]
    assert lines[0] == "1 sip:medhotline-health@10.0.0.5:5060 0 0 duid=node1;maxload=0"
    assert "sip:medhotline-health@[fd00::7]:5060" in dispatcher_list(front(nodes=["[fd00::7]:5060"]))
    service = render_front(front(), tmp_path / "d.list").config
    assert 'modparam("dispatcher", "ds_ping_reply_codes", "class=2")' in service
    # Callers can't reach the health user through the front; a node's 503 takes it out and the call goes on.
    assert '$rU == "medhotline-health"' in service
    assert 'ds_mark_dst("ip")' in service.split('t_check_status("503")', 1)[1].split("}", 1)[0]
    asterisk = render_front(front(probe="asterisk"), tmp_path / "d.list").config
    assert "class=2;code=401;code=403;code=404;code=405" in asterisk


def test_config_carries_listen_probing_algorithm_and_failover(tmp_path: Path) -> None:
    files = render_front(front(ping_interval=3, probing_threshold=2, inactive_threshold=2), tmp_path / "d.list")
    cfg = files.config
    assert "listen=udp:127.0.0.1:15060" in cfg
    assert f'modparam("dispatcher", "list_file", "{tmp_path / "d.list"}")' in cfg
    assert 'modparam("dispatcher", "ds_ping_interval", 3)' in cfg
    assert 'modparam("dispatcher", "ds_probing_threshold", 2)' in cfg
    assert 'modparam("dispatcher", "ds_inactive_threshold", 2)' in cfg
    assert 'modparam("tm", "fr_timer", 1500)' in cfg
    assert 'ds_select_dst("1", "10")' in cfg
    assert "record_route();" in cfg
    assert "ds_next_dst()" in cfg
    assert "{{" not in cfg
    assert 'ds_select_dst("1", "4")' in render_front(front(algorithm="round_robin"), tmp_path / "d.list").config


def test_no_nodes_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(FrontConfigError, match=r"cluster\.front\.nodes: no nodes configured"):
        write_front(front(nodes=[]), tmp_path)
    assert not list(tmp_path.iterdir()), "nothing is written for a refused configuration"


def test_the_front_is_not_its_own_node(tmp_path: Path) -> None:
    with pytest.raises(FrontConfigError, match=r"cluster\.front\.nodes: 127\.0\.0\.1:15060 is the front's own"):
        render_front(front(nodes=["127.0.0.1:15060"]), tmp_path / "d.list")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("nodes", '["10.0.0.5:5060", "asterisk-b:5060"]', r"cluster\.front\.nodes: nodes\[1\]: .*not an IP address"),
        ("nodes", '["10.0.0.5"]', r"cluster\.front\.nodes: nodes\[0\]: .*not host:port"),
        ("nodes", '["10.0.0.5:70000"]', r"cluster\.front\.nodes: nodes\[0\]: .*outside 1-65535"),
        (
            "nodes",
            '["10.0.0.5:5060", "10.0.0.5:5060"]',
            r"cluster\.front\.nodes: the same node address is listed twice",
        ),
        ("listen", '"0.0.0:5060"', r"cluster\.front\.listen: .*not an IP address"),
        ("ping_interval", "0", r"cluster\.front\.ping_interval"),
    ],
)
def test_bad_addresses_name_the_file_and_key(tmp_path: Path, key: str, value: str, message: str) -> None:
    error = _refused_front_toml(tmp_path, f"{key} = {value}", message)
    assert str(tmp_path / "medhotline.toml") in str(error)


@pytest.mark.skipif(shutil.which("kamailio") is None, reason="kamailio is not installed (scripts/bootstrap)")
@pytest.mark.parametrize(("algorithm", "probe"), [("call_load", "service"), ("round_robin", "asterisk")])
def test_kamailio_accepts_the_generated_config(tmp_path: Path, algorithm: str, probe: str) -> None:
    nodes = ["127.0.0.1:5070", "[::1]:5080"]
    cfg = write_front(front(algorithm=algorithm, nodes=nodes, probe=probe), tmp_path / "front")
    _kamailio_accepts(cfg)
    assert (tmp_path / "front" / "dispatcher.list").read_text().count("\n1 sip:") == 2


def _tls_front(tmp_path: Path, **values: object) -> FrontConfig:
    pki = ensure_test_pki(tmp_path / "pki", ["127.0.0.1"])
    return front(
        **{
            "nodes": ["127.0.0.1:5070"],
            "tls_listen": "127.0.0.1:15061",
            "tls_cert_file": str(pki.server_cert),
            "tls_key_file": str(pki.server_key),
        }
        | values
    )


def test_tls_listener_for_the_trunks(tmp_path: Path) -> None:
    pki = ensure_test_pki(tmp_path / "pki", ["127.0.0.1"])
    files = render_front(_tls_front(tmp_path, tls_ca_file=str(pki.ca_cert)), tmp_path / "front" / "d.list")
    assert "enable_tls=yes\nlisten=tls:127.0.0.1:15061\n" in files.config
    assert f'loadmodule "tls.so"\nmodparam("tls", "config", "{tmp_path / "front" / "tls.cfg"}")' in files.config
    assert files.tls is not None
    assert f"certificate = {pki.server_cert}\nprivate_key = {pki.server_key}\n" in files.tls
    assert "method = TLSv1.2+" in files.tls
    assert f"ca_list = {pki.ca_cert}\nverify_certificate = yes\nrequire_certificate = yes" in files.tls
    plain = render_front(front(), tmp_path / "d.list")
    assert plain.tls is None
    assert "tls.so" not in plain.config
    assert "listen=tls" not in plain.config


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('tls_listen = "127.0.0.1:5061"', r"cluster\.front: tls_listen: set tls_cert_file and tls_key_file"),
        ('tls_cert_file = "/etc/c.pem"', r"cluster\.front: tls_cert_file/.* tls_listen is empty"),
        ('tls_listen = "127.0.0.1:5061:x"', r"cluster\.front\.tls_listen"),
        (
            'listen = "127.0.0.1:5061"\ntls_listen = "127.0.0.1:5061"\ntls_cert_file = "c"\ntls_key_file = "k"',
            r"tls_listen 127\.0\.0\.1:5061 is also listen",
        ),
    ],
)
def test_bad_tls_settings_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    _refused_front_toml(tmp_path, toml, message)


@needs_kamailio_tls
def test_kamailio_accepts_the_tls_config(tmp_path: Path) -> None:
    cfg = write_front(_tls_front(tmp_path), tmp_path / "front")
    assert (tmp_path / "front" / "tls.cfg").is_file()
    _kamailio_accepts(cfg)


def test_tls_to_the_nodes_names_the_transport_and_verifies_them(tmp_path: Path) -> None:
    pki = ensure_test_pki(tmp_path / "pki", ["127.0.0.1"])
    nodes = ["10.0.0.5:5061", "10.0.0.6:5071"]
    tls_front = _tls_front(tmp_path, nodes=nodes, node_transport="tls", node_ca_file=str(pki.ca_cert))
    # Calls and probes alike: every destination (the probes' request URI too) says transport=tls.
    assert dispatcher_list(tls_front).splitlines()[1:] == [
        "1 sip:medhotline-health@10.0.0.5:5061;transport=tls 0 0 duid=node1;maxload=0",
        "1 sip:medhotline-health@10.0.0.6:5071;transport=tls 0 0 duid=node2;maxload=0",
    ]
    files = render_front(tls_front, tmp_path / "front" / "d.list")
    assert files.tls is not None
    server, client = files.tls.split("[client:default]\n")
    assert "[server:default]" in server
    # Kamailio, as the nodes' TLS client, shows its own certificate and refuses a node the site CA did not sign.
    assert client.splitlines() == [
        "method = TLSv1.2+",
        f"certificate = {pki.server_cert}",
        f"private_key = {pki.server_key}",
        f"ca_list = {pki.ca_cert}",
        "verify_certificate = yes",
        "require_certificate = yes",
    ]
    # The default stays UDP: no transport parameter, no client profile.
    udp = render_front(_tls_front(tmp_path, nodes=nodes), tmp_path / "front" / "d.list")
    assert ";transport=" not in udp.dispatcher_list
    assert udp.tls is not None
    assert "[client:" not in udp.tls


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"node_transport": "tls"}, r"cluster\.front\.node_ca_file: node_transport = \"tls\" needs the CA"),
        ({"node_transport": "tls", "node_ca_file": 'ca"x.pem'}, r"cluster\.front\.node_ca_file: .*quote"),
    ],
)
def test_bad_node_tls_is_refused_naming_the_key(tmp_path: Path, values: dict[str, object], message: str) -> None:
    with pytest.raises(FrontConfigError, match=message):
        render_front(_tls_front(tmp_path, **values), tmp_path / "d.list")


def test_tls_to_the_nodes_without_a_tls_socket_is_refused_and_the_old_files_stay(tmp_path: Path) -> None:
    out = tmp_path / "front"
    write_front(front(), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    no_socket = front(node_transport="tls", node_ca_file="/etc/medhotline/site-ca.pem")
    with pytest.raises(FrontConfigError, match=r"node_transport = \"tls\": set tls_listen"):
        write_front(no_socket, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('node_ca_file = "/etc/ca.pem"', r"node_ca_file is set but node_transport is \"udp\""),
        ('node_transport = "tcp"', r"cluster\.front\.node_transport"),
    ],
)
def test_bad_node_transport_settings_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    _refused_front_toml(tmp_path, toml, message)


@needs_kamailio_tls
def test_kamailio_accepts_tls_to_the_nodes(tmp_path: Path) -> None:
    pki = ensure_test_pki(tmp_path / "pki", ["127.0.0.1"])
    cfg = write_front(_tls_front(tmp_path, node_transport="tls", node_ca_file=str(pki.ca_cert)), tmp_path / "front")
    _kamailio_accepts(cfg)
    assert ";transport=tls" in (tmp_path / "front" / "dispatcher.list").read_text()
