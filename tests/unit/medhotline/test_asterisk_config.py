"""Rendering asterisk-config/: every placeholder filled, the configured values where Asterisk reads them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ground.config import Config
from medhotline.asterisk_config import (
    TEMPLATE_DIR,
    AsteriskCredentials,
    TemplateError,
    render_all,
    render_text,
    template_values,
)


@pytest.fixture(scope="module")
def config() -> Config:
    return Config.model_validate(
        {
            "asterisk": {
                "sip_port": 15060,
                "rtp_start": 21000,
                "rtp_end": 21050,
                "max_calls": 8,
                "ari_port": 18088,
                "ami_port": 15038,
            },
            "fastagi": {"port": 14573},
            "hotline": {"number": "96120"},
        }
    )


@pytest.fixture(scope="module")
def rendered(config: Config) -> dict[str, str]:
    values = template_values(
        config,
        AsteriskCredentials.generate(config),
        instance_dir="/srv/medhotline/test",
        module_dir="/usr/lib/x86_64-linux-gnu/asterisk/modules",
    )
    return render_all(values)


def _directives(text: str) -> str:
    """The text without Asterisk comments (asterisk.conf's header comment mentions the ``{{...}}`` syntax)."""
    return "\n".join(line.split(";", 1)[0] for line in text.splitlines())


def test_every_template_is_rendered_completely(rendered: dict[str, str]) -> None:
    assert set(rendered) == {p.name for p in TEMPLATE_DIR.glob("*.conf")}
    for name, text in rendered.items():
        assert "{{" not in _directives(text), name
        assert "}}" not in _directives(text), name


def test_default_config_renders_too() -> None:
    config = Config()
    values = template_values(config, AsteriskCredentials.generate(config), instance_dir="/i", module_dir="/m")
    for name, text in render_all(values).items():
        assert "{{" not in _directives(text), name
    assert "5060" in render_all(values)["pjsip.conf"]


@pytest.mark.parametrize(
    ("file", "pattern"),
    [
        ("pjsip.conf", r"^bind = 127\.0\.0\.1:15060$"),
        # RTP bound to Asterisk's own address: no per-call look-up of the host name and A.ROOT-SERVERS.NET.
        ("pjsip.conf", r"^media_address = 127\.0\.0\.1\nbind_rtp_to_media_address = yes$"),
        ("http.conf", r"^bindport = 18088$"),
        ("manager.conf", r"^port = 15038$"),
        ("rtp.conf", r"^rtpstart = 21000$"),
        ("rtp.conf", r"^rtpend = 21050$"),
        # max_calls 8: a pool of 28 ARI connections, and Asterisk's HTTP session limit above it.
        ("http.conf", r"^sessionlimit = 48$"),
        ("extensions.conf", r"^exten => 96120,1,Goto\(hotline-ari,s,1\)$"),
        ("extensions.conf", r"AGI\(agi://127\.0\.0\.1:14573/hotline\)"),
        ("extensions.conf", r"Stasis\(medhotline,hotline\)"),
    ],
)
def test_configured_values_land_in_the_right_file(rendered: dict[str, str], file: str, pattern: str) -> None:
    assert re.search(pattern, rendered[file], re.MULTILINE), rendered[file]


def test_generated_secrets_are_written_and_differ_per_generation(config: Config) -> None:
    first, second = AsteriskCredentials.generate(config), AsteriskCredentials.generate(config)
    assert first.ari_password != second.ari_password
    assert first.ami_secret != second.ami_secret
    values = template_values(config, first, instance_dir="/i", module_dir="/m")
    files = render_all(values)
    assert first.ami_secret in files["manager.conf"]
    assert first.ari_password in files["ari.conf"]


def test_unknown_placeholder_names_file_and_placeholder(tmp_path: Path) -> None:
    (tmp_path / "good.conf").write_text("port = {{ari_port}}\n", encoding="utf-8")
    (tmp_path / "typo.conf").write_text("port = {{ari_prot}}\nx = {{ zz_top }}\n", encoding="utf-8")
    with pytest.raises(TemplateError, match=r"asterisk-config/typo\.conf: unknown placeholder\(s\) ari_prot, zz_top"):
        render_all({"ari_port": "8088"}, tmp_path)


def test_render_text_leaves_asterisk_variables_alone() -> None:
    assert render_text("x.conf", "Set(A=${CALLERID(num)}) {{ n }}", {"n": "1"}) == "Set(A=${CALLERID(num)}) 1"
