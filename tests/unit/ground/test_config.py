"""load_config: defaults, and a clear message (where, dotted key, why) for every kind of bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from ground.config import Config, ConfigError, load_config

EXTERNAL = "[asterisk]\nmode = 'external'\nari_password = 'a'\nami_secret = 'b'\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "medhotline.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path | None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ or {})
    return str(info.value)


def test_defaults_load_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./medhotline.toml here
    config = load_config(None, {})
    assert config.asterisk.sip_port == 5060
    assert config.asterisk.mode == "sandbox"
    assert config.database_url.startswith("sqlite:///")
    assert config.service.log_file is None


def test_default_rtp_range_holds_the_default_capacity() -> None:
    """500 concurrent calls, each with a patient leg, an agent leg and a speech tap (RTP + RTCP each)."""
    ast = Config().asterisk
    assert ast.max_calls >= 500
    assert ast.rtp_end - ast.rtp_start + 1 >= 6 * ast.max_calls
    assert ast.http_session_limit > ast.ari_connections > ast.max_calls


def test_example_config_fits_its_capacity() -> None:
    example = Path(__file__).resolve().parents[3] / "medhotline.example.toml"
    ast = load_config(example, {}).asterisk
    assert ast.rtp_end - ast.rtp_start + 1 >= 6 * ast.max_calls >= 6 * 500


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""), {})
    assert config.hotline.number == "12320"


def test_file_values_are_used(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "[asterisk]\nsip_port = 5070\n[service]\nnode_name = 'n2'\n"), {})
    assert config.asterisk.sip_port == 5070
    assert config.service.node_name == "n2"


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        ("[asterisk]\nsip_port = 0\n", "asterisk.sip_port", "greater than or equal to 1"),
        ("[asterisk]\nsip_port = 70000\n", "asterisk.sip_port", "less than or equal to 65535"),
        ("[asterisk]\nari_port = 'abc'\n", "asterisk.ari_port", "valid integer"),
        (
            "[asterisk]\nrtp_start = 20000\nrtp_end = 10000\n",
            "asterisk",
            "rtp_start (20000) must be below rtp_end",
        ),
        (
            "[asterisk]\nrtp_start = 20000\nrtp_end = 20000\n",
            "asterisk",
            "rtp_start (20000) must be below rtp_end",
        ),
        (
            "[asterisk]\nrtp_start = 20000\nrtp_end = 20005\n",
            "asterisk",
            "RTP range 20000-20005 (6 ports) is too small for max_calls = 500",
        ),
        # The old example range (10000-10200) holds about 33 calls of three streams each.
        ("[asterisk]\nrtp_end = 10200\n", "asterisk", "at least 3000; widen the range or lower max_calls"),
        ("[asterisk]\nrtp_end = 10200\nmax_calls = 34\n", "asterisk", "too small for max_calls = 34"),
        ("[asterisk]\nmax_calls = 0\n", "asterisk.max_calls", "greater than or equal to 1"),
        ("[asterisk]\nari_timeout = 0\n", "asterisk.ari_timeout", "greater than 0"),
        ("[asterisk]\nsip_port = 10050\n", "asterisk", "sip_port 10050 lies inside the RTP range"),
        ("[asterisk]\nari_port = 5038\n", "asterisk", "ari_port and ami_port are both 5038"),
        ("[asterisk]\nsip_prot = 5070\n", "asterisk.sip_prot", "unknown key"),
        ("[asterisks]\nsip_port = 5070\n", "asterisks", "unknown key"),
        ("[asterisk]\nmode = 'cloud'\n", "asterisk.mode", "'sandbox' or 'external'"),
        ("[asterisk]\nmode = 'external'\n", "asterisk", "external mode needs ari_password and ami_secret"),
        ("[service]\nlog_level = 'loud'\n", "service.log_level", "'loud'"),
        ("[hotline]\nnumber = '12a'\n", "hotline.number", "pattern"),
        ("[speech]\nmax_streams = 0\n", "speech.max_streams", "whole number of concurrent recognitions from 1"),
        ("[speech]\nmax_streams = 2.5\n", "speech.max_streams", "whole number of concurrent recognitions"),
        ("[speech]\nmax_streams = true\n", "speech.max_streams", "whole number of concurrent recognitions"),
        ("[speech]\nmax_streams = 1001\n", "speech.max_streams", "from 1 to 1000"),
    ],
)
def test_bad_file_value_names_file_key_and_reason(tmp_path: Path, toml: str, key: str, reason: str) -> None:
    path = _write(tmp_path, toml)
    message = _error(path)
    assert f"{path}: {key}: " in message
    assert reason in message


def test_external_mode_with_secrets_is_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path, f"{EXTERNAL}[prompts]\nsounds_dir = '{tmp_path}'\n")
    config = load_config(path, {})
    assert config.asterisk.ari_password is not None
    assert config.asterisk.ari_password.get_secret_value() == "a"


def test_secret_values_are_not_echoed_in_errors(tmp_path: Path) -> None:
    path = _write(tmp_path, "[asterisk]\nari_password = 'hunter2-secret'\nari_port = 5038\n")
    assert "hunter2-secret" not in _error(path)


def test_bad_toml_syntax_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[asterisk\nsip_port = 5060\n")
    message = _error(path)
    assert f"{path}: not valid TOML" in message


def test_missing_explicit_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert f"{path}: configuration file does not exist" in _error(path)


def test_missing_file_named_by_environment(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert f"{path}: configuration file does not exist" in _error(None, {"MEDHOTLINE_CONFIG": str(path)})


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, "[asterisk]\nsip_port = 5070\n")
    assert load_config(None, {"MEDHOTLINE_CONFIG": str(path)}).asterisk.sip_port == 5070


def test_env_override_wins_over_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[asterisk]\nsip_port = 5070\nami_port = 5039\n")
    config = load_config(path, {"MEDHOTLINE__ASTERISK__SIP_PORT": "5080", "UNRELATED": "x"})
    assert config.asterisk.sip_port == 5080
    assert config.asterisk.ami_port == 5039


def test_env_override_of_nested_section(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""), {"MEDHOTLINE__ASTERISK__SANDBOX__INSTANCE": "node2"})
    assert config.asterisk.sandbox.instance == "node2"


def test_env_override_bad_value_names_the_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, "[asterisk]\nsip_port = 5070\n")
    message = _error(path, {"MEDHOTLINE__ASTERISK__SIP_PORT": "abc"})
    assert "environment MEDHOTLINE__ASTERISK__SIP_PORT: asterisk.sip_port: " in message
    assert "'abc'" in message
    assert str(path) not in message


def test_env_unknown_key_names_the_variable(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, ""), {"MEDHOTLINE__ASTERISK__SIP_PROT": "5070"})
    assert "environment MEDHOTLINE__ASTERISK__SIP_PROT: asterisk.sip_prot: unknown key" in message


def test_env_caused_cross_field_error_names_the_variable(tmp_path: Path) -> None:
    # The error is reported on the section, not the field: the variable that was set in it must be named.
    path = _write(tmp_path, "[asterisk]\nami_port = 5039\n")
    message = _error(path, {"MEDHOTLINE__ASTERISK__ARI_PORT": "5039"})
    assert "environment MEDHOTLINE__ASTERISK__ARI_PORT" in message
    assert "ari_port and ami_port are both 5039" in message


def test_empty_segment_in_env_variable(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, ""), {"MEDHOTLINE__ASTERISK____SIP_PORT": "1"})
    assert "environment MEDHOTLINE__ASTERISK____SIP_PORT: empty key segment" in message


def test_empty_log_file_means_unset(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "[service]\nlog_file = ''\n"), {"MEDHOTLINE__KEYSERVICE__SOCKET": ""})
    assert config.service.log_file is None
    assert config.keyservice_socket == config.service.state_dir / "keyservice.sock"


def test_several_errors_reported_at_once(tmp_path: Path) -> None:
    path = _write(tmp_path, "[asterisk]\nsip_port = 0\nsip_prot = 1\n[fastagi]\nport = 70000\n[nosuch]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"MEDHOTLINE__HOTLINE__ENTRY": "sip"})
    problems = info.value.problems
    assert len(problems) == 5
    message = str(info.value)
    for key in ("asterisk.sip_port", "asterisk.sip_prot", "fastagi.port", "nosuch", "hotline.entry"):
        assert f": {key}: " in message
    assert "environment MEDHOTLINE__HOTLINE__ENTRY: hotline.entry" in message


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost.gateway.invalid/send",
        "http://127.0.0.1.gateway.invalid/send",
        "http://localhost@gateway.invalid/send",
        "http://[::2]:8025/send",
        "http://gateway.invalid/send",
        "ftp://127.0.0.1/send",
        "https:///send",
    ],
)
def test_sms_gateway_plain_http_only_to_a_loopback_host(tmp_path: Path, url: str) -> None:
    path = _write(tmp_path, f"[outreach]\nsms_gateway_url = '{url}'\nsms_token_file = '{tmp_path / 't'}'\n")
    assert "sms_gateway_url must be https://" in _error(path)


@pytest.mark.parametrize(
    "url",
    [
        "https://gateway.invalid/send",
        "http://localhost:8025/send",
        "http://LOCALHOST/send",
        "http://127.0.0.1:8025/send",
        "http://127.1.2.3/send",
        "http://[::1]:8025/send",
    ],
)
def test_sms_gateway_accepts_https_and_loopback_http(tmp_path: Path, url: str) -> None:
    path = _write(tmp_path, f"[outreach]\nsms_gateway_url = '{url}'\nsms_token_file = '{tmp_path / 't'}'\n")
    assert load_config(path, {}).outreach.sms_gateway_url == url


def test_external_mode_needs_the_sounds_dir_of_that_asterisk(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, EXTERNAL))
    assert "prompts.sounds_dir" in message
    assert "external" in message


def test_sandbox_mode_refuses_a_sounds_dir_it_would_not_play(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, f"[prompts]\nsounds_dir = '{tmp_path / 'sounds'}'\n"))
    assert "prompts.sounds_dir" in message


def test_one_function_decides_where_prompts_go(tmp_path: Path) -> None:
    from medhotline.prompts import sounds_dir
    from medhotline.sandbox import Sandbox

    external = load_config(_write(tmp_path, EXTERNAL + f"[prompts]\nsounds_dir = '{tmp_path / 'sounds'}'\n"), {})
    assert sounds_dir(external) == tmp_path / "sounds"
    sandbox = load_config(_write(tmp_path, f"[asterisk.sandbox]\nroot = '{tmp_path / 'root'}'\n"), {})
    assert sounds_dir(sandbox) == Sandbox(sandbox).sounds_dir


def test_speech_max_streams_defaults_to_unset_and_takes_a_number_from_file_or_environment(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, ""), {}).speech.max_streams is None  # the service takes one per core
    assert load_config(_write(tmp_path, "[speech]\nmax_streams = 4\n"), {}).speech.max_streams == 4
    empty = _write(tmp_path, "")
    assert load_config(empty, {"MEDHOTLINE__SPEECH__MAX_STREAMS": "2"}).speech.max_streams == 2
    message = _error(empty, {"MEDHOTLINE__SPEECH__MAX_STREAMS": "none"})
    assert "environment MEDHOTLINE__SPEECH__MAX_STREAMS: speech.max_streams: must be a whole number" in message


def test_speech_servers_from_the_environment_are_a_json_list_and_a_bad_one_names_the_variable(tmp_path: Path) -> None:
    empty = _write(tmp_path, "")
    env = {
        "MEDHOTLINE__SPEECH__ENGINE": "servers",
        "MEDHOTLINE__SPEECH__SERVERS": '[{"url": "ws://127.0.0.1:2700", "capacity": 2}]',
    }
    speech = load_config(empty, env).speech
    assert [(s.url, s.capacity) for s in speech.servers] == [("ws://127.0.0.1:2700", 2)]
    message = _error(empty, {**env, "MEDHOTLINE__SPEECH__SERVERS": "ws://127.0.0.1:2700"})
    assert "environment MEDHOTLINE__SPEECH__SERVERS: speech.servers: is not a JSON list of servers" in message
    # The JSON is validated like the TOML: a wrong URL is named with its position.
    message = _error(empty, {**env, "MEDHOTLINE__SPEECH__SERVERS": '[{"url": "http://x", "capacity": 2}]'})
    assert "speech.servers.0.url" in message
