"""One audit identity for the operator at the shell, whichever command group asks."""

from __future__ import annotations

import getpass

import pytest

from compliance.access_store import Actor
from ground.operator import operator_id
from medhotline.commands.keys import operator_id as key_operator_id


@pytest.mark.parametrize(("login", "expected"), [("ops.wang", "os:ops.wang"), ("bad name", "os:unknown")])
def test_every_command_group_names_the_operator_the_same(
    monkeypatch: pytest.MonkeyPatch, login: str, expected: str
) -> None:
    monkeypatch.setattr(getpass, "getuser", lambda: login)
    assert operator_id() == Actor.operator().id == key_operator_id(None) == expected


def test_a_missing_login_name_is_os_unknown_not_a_uid_or_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_login() -> str:
        raise OSError("no passwd entry")

    monkeypatch.setattr(getpass, "getuser", no_login)
    assert operator_id() == Actor.operator().id == key_operator_id(None) == "os:unknown"
