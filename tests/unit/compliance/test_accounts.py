"""AccountStore on SQLite and PostgreSQL: one account per person, valid roles and departments, freezing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
from sqlalchemy import Engine

from compliance.accounts import ROLES, AccountError, AccountStore, check_separation
from ground import db

T0: Final = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    db.upgrade(url)
    engine = db.make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> AccountStore:
    accounts = AccountStore.for_engine(engine)
    accounts.add("dr.li", "Li Na", ["physician", "supervisor"], T0, ["cardiology", "emergency"])
    return accounts


def test_add_get_list_round_trip(store: AccountStore) -> None:
    record = store.get("dr.li")
    assert record.display_name == "Li Na"
    assert record.roles == frozenset({"physician", "supervisor"})
    assert record.departments == frozenset({"cardiology", "emergency"})
    assert (record.frozen, record.frozen_at, record.frozen_reason, record.session_epoch) == (False, None, None, 0)
    store.add("ag.wang", "  Wang Lei ", ["agent"], T0)
    assert store.get("ag.wang").display_name == "Wang Lei"
    assert [r.id for r in store.list()] == ["ag.wang", "dr.li"]
    assert store.find("nobody.here") is None


def test_a_duplicate_id_is_refused_and_the_first_account_kept(store: AccountStore) -> None:
    with pytest.raises(AccountError, match=re.escape("account dr.li already exists")):
        store.add("dr.li", "Someone Else", ["agent"], T0)
    assert store.get("dr.li").display_name == "Li Na"
    assert store.get("dr.li").roles == frozenset({"physician", "supervisor"})


@pytest.mark.parametrize(
    ("account_id", "why"),
    [
        ("x", "use 2-64 of a-z 0-9 _ . - starting with a letter"),
        ("Zhang", "use 2-64 of a-z 0-9 _ . - starting with a letter"),
        ("1abc", "use 2-64 of a-z 0-9 _ . - starting with a letter"),
        ("li na", "use 2-64 of a-z 0-9 _ . - starting with a letter"),
        ("a" * 65, "use 2-64 of a-z 0-9 _ . - starting with a letter"),
        ("emp1234567", "seven or more digits in a row"),
        ("d.138-1234-5678", "seven or more digits in a row"),
    ],
)
def test_a_bad_account_id_is_refused_saying_why(store: AccountStore, account_id: str, why: str) -> None:
    with pytest.raises(AccountError, match=re.escape(why)) as caught:
        store.add(account_id, "Some One", ["agent"], T0)
    assert repr(account_id) in str(caught.value)
    assert store.find(account_id) is None


@pytest.mark.parametrize(
    ("roles", "departments", "name", "why"),
    [
        (["wizard"], [], "Some One", f"unknown role(s) wizard; roles are {', '.join(ROLES)}"),
        ([], [], "Some One", "an account needs at least one role"),
        (["admin", "physician"], [], "Some One", "role admin cannot be combined with physician"),
        (["auditor", "nurse"], [], "Some One", "role auditor cannot be combined with nurse"),
        (["nurse"], ["Cardiology"], "Some One", "department name(s) 'Cardiology'"),
        (["nurse"], ["ward-1234567"], "Some One", "department name(s) 'ward-1234567'"),
        (["nurse"], [], "   ", "display name must be 1-128 characters"),
        (["nurse"], [], "x" * 129, "display name must be 1-128 characters"),
    ],
)
def test_bad_roles_departments_or_names_are_refused(
    store: AccountStore, roles: list[str], departments: list[str], name: str, why: str
) -> None:
    with pytest.raises(AccountError, match=re.escape(why)):
        store.add("nurse.new", name, roles, T0, departments)
    assert store.find("nurse.new") is None


def test_role_and_department_changes_validate_and_keep_the_old_value_on_error(store: AccountStore) -> None:
    with pytest.raises(AccountError, match="unknown role"):
        store.set_roles("dr.li", ["physician", "surgeon"], T0)
    with pytest.raises(AccountError, match="role admin cannot be combined"):
        store.set_roles("dr.li", ["admin", "physician"], T0)
    with pytest.raises(AccountError, match="department name"):
        store.set_departments("dr.li", ["Oncology"], T0)
    assert store.get("dr.li").roles == frozenset({"physician", "supervisor"})
    assert store.get("dr.li").departments == frozenset({"cardiology", "emergency"})
    assert store.set_roles("dr.li", ["physician"], T0 + timedelta(1)).roles == frozenset({"physician"})
    assert store.set_departments("dr.li", [], T0 + timedelta(1)).departments == frozenset()
    with pytest.raises(AccountError, match=re.escape("no account 'dr.nobody'")):
        store.set_roles("dr.nobody", ["nurse"], T0)


def test_freeze_bumps_the_epoch_every_time_and_unfreeze_keeps_it(store: AccountStore) -> None:
    with pytest.raises(AccountError, match=re.escape("freezing account dr.li needs a reason")):
        store.freeze("dr.li", "  ", T0)
    assert not store.get("dr.li").frozen
    frozen = store.freeze("dr.li", "left the hospital", T0)
    assert (frozen.frozen, frozen.frozen_at, frozen.frozen_reason, frozen.session_epoch) == (
        True, T0, "left the hospital", 1,
    )  # fmt: skip
    assert store.freeze("dr.li", "left the hospital, again", T0).session_epoch == 2
    thawed = store.unfreeze("dr.li", T0 + timedelta(1))
    assert (thawed.frozen, thawed.frozen_reason, thawed.session_epoch) == (False, None, 2)
    with pytest.raises(AccountError, match=re.escape("no account 'dr.nobody'")):
        store.freeze("dr.nobody", "left", T0)


def test_separation_of_duties_accepts_lone_admin_and_auditor() -> None:
    assert check_separation(["admin"]) == frozenset({"admin"})
    assert check_separation(["auditor"]) == frozenset({"auditor"})
    assert check_separation(["agent", "nurse", "supervisor"]) == frozenset({"agent", "nurse", "supervisor"})
    with pytest.raises(AccountError, match="role admin cannot be combined with auditor"):
        check_separation(["admin", "auditor"])
