"""``[his]`` configuration: TLS settings must be complete, and a configured node builds its link from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ground.config import HisConfig
from his.link import his_client
from tests.unit.his.conftest import TlsFiles


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"tls": True}, "set ca_file"),
        ({"tls": True, "ca_file": "/ca.pem", "cert_file": "/c.pem"}, "set both"),
        ({"cert_file": "/c.pem", "key_file": "/k.pem"}, "needs TLS"),
        ({"backoff_initial": 10, "backoff_max": 1}, "backoff_initial"),
        ({"pdq_budget": 0}, "greater than 0"),
    ],
)
def test_incomplete_his_settings_are_refused(settings: dict[str, object], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        HisConfig.model_validate(settings)


def test_a_mutual_tls_client_is_built_from_the_configuration(tls_files: TlsFiles) -> None:
    his = HisConfig(tls=True, ca_file=tls_files.ca, cert_file=tls_files.client_cert, key_file=tls_files.client_key)
    client = his_client(his)
    assert not client.connected
    with pytest.raises(FileNotFoundError):
        his_client(HisConfig(tls=True, ca_file=Path("/nonexistent/ca.pem")))
