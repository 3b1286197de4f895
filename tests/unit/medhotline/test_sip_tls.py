"""SIP over TLS with SRTP: the sandbox's private CA, the generated TLS transport and endpoints, config errors."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import ValidationError

from ground.config import Config, ConfigError, load_config
from medhotline.asterisk_config import (
    TLS_FILE,
    AsteriskCredentials,
    TemplateError,
    TlsPaths,
    render_all,
    render_pjsip_tls,
    secure_endpoint_lines,
    template_values,
)
from medhotline.sandbox import Sandbox
from routing.agent_endpoints import ContactView, render_agent_endpoints

PATHS = TlsPaths("/srv/x/tls/server.crt", "/srv/x/tls/server.key", "/srv/x/tls/ca.crt")
PASSWORD = "p" * 32


def _config(**sip: Any) -> Config:
    return Config.model_validate({"sip": sip})


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_tls_off_writes_only_a_comment() -> None:
    text = render_pjsip_tls(_config(), None, "")
    assert "type = transport" not in text
    assert "tls is off" in text


def test_tls_transport_and_trunk_with_sdes() -> None:
    text = render_pjsip_tls(_config(tls=True, tls_port=15061), PATHS, PASSWORD)
    assert "[transport-tls]\ntype = transport\nprotocol = tls\nbind = 127.0.0.1:15061\n" in text
    assert f"cert_file = {PATHS.cert_file}\npriv_key_file = {PATHS.key_file}\nca_list_file = {PATHS.ca_file}" in text
    assert "media_encryption = sdes\nmedia_encryption_optimistic = no" in text
    assert "context = from-patients" in text
    assert f"password = {PASSWORD}" in text
    assert "dtls" not in text


def test_dtls_gives_the_certificate_for_the_handshake() -> None:
    lines = secure_endpoint_lines(_config(tls=True, media_encryption="dtls"), PATHS)
    assert "media_encryption = dtls" in lines
    assert f"dtls_cert_file = {PATHS.cert_file}" in lines
    assert "dtls_verify = fingerprint" in lines


def test_dtls_endpoints_take_the_avpf_profile_and_sdes_ones_do_not() -> None:
    # A DTLS-SRTP phone offers UDP/TLS/RTP/SAVPF; without use_avpf Asterisk answers 488 (test_sip_dtls.py).
    dtls = render_pjsip_tls(_config(tls=True, media_encryption="dtls"), PATHS, PASSWORD)
    assert "media_encryption = dtls\n" in dtls
    assert "use_avpf = yes" in dtls.split("[patients-tls]\ntype = endpoint")[1]
    assert "use_avpf" not in render_pjsip_tls(_config(tls=True), PATHS, PASSWORD)


def test_tls_without_certificate_or_with_a_bad_password_is_refused() -> None:
    with pytest.raises(TemplateError, match="no certificate"):
        render_pjsip_tls(_config(tls=True), None, PASSWORD)
    with pytest.raises(TemplateError, match=TLS_FILE):
        render_pjsip_tls(_config(tls=True), PATHS, "short\nline")


def test_bad_media_encryption_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "medhotline.toml"
    path.write_text('[sip]\ntls = true\nmedia_encryption = "none"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert "sip.media_encryption" in str(err.value)
    assert str(path) in str(err.value)
    assert "'sdes'" in str(err.value)


def test_tls_port_equal_to_ari_port_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "medhotline.toml"
    path.write_text("[asterisk]\nari_port = 18088\n[sip]\ntls = true\ntls_port = 18088\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"sip.tls_port 18088 is also asterisk.ari_port"):
        load_config(path, environ={})


class _Agent:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint


class _View:
    def __init__(self, endpoint: str, contact: str) -> None:
        self.agent = _Agent(endpoint)
        self.contact = contact


def test_agents_over_tls_get_srtp_and_a_tls_contact() -> None:
    views = cast(
        "list[ContactView]",
        [_View("nurse1", "sip:nurse1@127.0.0.1:5071"), _View("nurse2", "sip:nurse2@127.0.0.1:5072;transport=tls")],
    )
    secure = secure_endpoint_lines(_config(tls=True), PATHS)
    text = render_agent_endpoints(views, media_address="127.0.0.1", secure_lines=secure)
    assert "contact = sip:nurse1@127.0.0.1:5071;transport=tls\n" in text
    assert "contact = sip:nurse2@127.0.0.1:5072;transport=tls\n" in text  # not twice
    assert text.count("transport = transport-tls\nmedia_encryption = sdes\n") == 2
    plain = render_agent_endpoints(views, media_address="127.0.0.1")
    assert "media_encryption" not in plain
    assert "contact = sip:nurse1@127.0.0.1:5071\n" in plain


def test_sandbox_renders_tls_with_its_own_ca(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib/x86_64-linux-gnu/asterisk/modules").mkdir(parents=True)
    config = Config.model_validate(
        {"asterisk": {"sandbox": {"root": str(root), "instance": "t1"}}, "sip": {"tls": True, "tls_port": 15061}}
    )
    sandbox = Sandbox(config)
    sandbox.render()
    text = (sandbox.instance_dir / "etc" / TLS_FILE).read_text(encoding="utf-8")
    assert "cert_file = /srv/medhotline/t1/tls/server.crt" in text
    assert f"password = {sandbox.tls_trunk_password()}" in text
    assert _mode(sandbox.trunk_secret_file) == 0o600
    assert _mode(sandbox.tls_dir / "server.key") == 0o600
    assert "#tryinclude pjsip_tls.conf" in (sandbox.instance_dir / "etc" / "pjsip.conf").read_text(encoding="utf-8")
    # Turned off again: the file stays, without a transport, so no stale TLS endpoint lingers.
    Sandbox(config.model_copy(update={"sip": _config().sip})).render()
    assert "type = transport" not in (sandbox.instance_dir / "etc" / TLS_FILE).read_text(encoding="utf-8")


def test_ari_and_ami_off_loopback_need_tls(tmp_path: Path) -> None:
    path = tmp_path / "medhotline.toml"
    path.write_text('[asterisk]\nhost = "10.0.0.11"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"asterisk: host '10.0.0.11' is not a loopback address.*asterisk.tls"):
        load_config(path, environ={})
    path.write_text('[asterisk]\nhost = "pbx.example"\ntls = true\n', encoding="utf-8")
    assert load_config(path, environ={}).asterisk.tls
    for loopback in ("127.0.0.2", "::1", "localhost"):
        assert Config.model_validate({"asterisk": {"host": loopback}}).asterisk.host == loopback


def test_external_asterisk_over_tls_needs_its_ca() -> None:
    external = {"mode": "external", "ari_password": "a", "ami_secret": "b", "tls": True}
    with pytest.raises(ValidationError, match="tls_ca_file"):
        Config.model_validate({"asterisk": external, "prompts": {"sounds_dir": "s"}})


def test_ari_and_ami_listen_only_over_tls_when_on() -> None:
    creds = AsteriskCredentials("u", "p", "u", "s")
    config = Config.model_validate({"asterisk": {"tls": True, "ari_port": 18088, "ami_port": 15038}})
    files = render_all(template_values(config, creds, instance_dir="/i", module_dir="/m", tls=PATHS))
    http, manager = files["http.conf"], files["manager.conf"]
    assert "tlsenable = yes\ntlsbindaddr = 127.0.0.1:18088\n" in http
    assert f"tlscertfile = {PATHS.cert_file}\ntlsprivatekey = {PATHS.key_file}" in http
    assert "bindaddr = 127.0.0.1\n" not in http  # no plain HTTP listener
    assert "enabled = no\ntlsenable = yes\ntlsbindaddr = 127.0.0.1:15038\n" in manager  # no plain AMI listener
    plain = render_all(template_values(_config(), creds, instance_dir="/i", module_dir="/m"))
    assert "bindaddr = 127.0.0.1\nbindport = 8088" in plain["http.conf"]
    assert "tlsenable" not in plain["http.conf"] + plain["manager.conf"]
    with pytest.raises(TemplateError, match="no certificate"):
        template_values(config, creds, instance_dir="/i", module_dir="/m")
