"""One audit identity for the operator at the shell, whichever command group asks."""

from __future__ import annotations

import getpass

import pytest

from compliance.access_store import Actor
from ground.errors import CommandError
from ground.operator import actor_id, operator_id


@pytest.mark.parametrize(("login", "expected"), [("ops.wang", "os:ops.wang"), ("bad name", "os:unknown")])
def test_every_command_group_names_the_operator_the_same(
    monkeypatch: pytest.MonkeyPatch, login: str, expected: str
) -> None:
    monkeypatch.setattr(getpass, "getuser", lambda: login)
    assert operator_id() == Actor.operator().id == actor_id(None) == expected


def test_a_missing_login_name_is_os_unknown_not_a_uid_or_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_login() -> str:
        raise OSError("no passwd entry")

    monkeypatch.setattr(getpass, "getuser", no_login)
    assert operator_id() == Actor.operator().id == actor_id(None) == "os:unknown"


@pytest.mark.parametrize("given", ["", "bad name", "ops.wang\n"])
def test_a_given_actor_that_is_no_account_id_is_refused_naming_the_option(given: str) -> None:
    with pytest.raises(CommandError, match="--by must be an account id"):
        actor_id(given, "--by")


def test_a_given_actor_is_the_actor() -> None:
    assert actor_id("ops.wang") == "ops.wang"
