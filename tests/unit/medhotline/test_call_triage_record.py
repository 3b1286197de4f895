"""The call record keeps the triage (level, confidence, discriminator, the confirmation) and an agent's upgrade."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, update
from sqlalchemy.exc import IntegrityError

from ground import db
from ground.models import Base, Call
from medhotline.cli import main

T0 = datetime(2027, 3, 3, 2, 0, tzinfo=UTC)
TRIAGE_COLUMNS = {
    "triage_level",
    "triage_confidence",
    "triage_discriminator",
    "triage_confirm_asked",
    "triage_confirm_answer",
    "upgraded_at",
    "upgraded_by",
}


def _start(repo: db.CallRepository) -> str:
    call_id = str(uuid.uuid4())
    repo.start(
        call_id=call_id,
        node="n1",
        transport="ari",
        channel_id="c-1",
        channel_name="PJSIP/caller-1",
        flow="hotline",
        flow_version="v1",
        started_at=T0,
    )
    return call_id


@pytest.fixture
def repo(engine: Engine) -> db.CallRepository:
    return db.CallRepository.for_engine(engine)  # the engine fixture disposes of its connections


def test_migration_matches_the_model_and_downgrades(database_url: str, engine: Engine) -> None:
    def calls_only(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
        table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", None)
        return table == "calls"

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "include_object": calls_only})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()
    config = db._alembic_config()
    downgrade_engine = db.make_engine(database_url)
    try:
        with downgrade_engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0010_vaccination")
        columns = {c["name"] for c in inspect(downgrade_engine).get_columns("calls")}
        assert not TRIAGE_COLUMNS & columns
        assert "route_priority" in columns
    finally:
        downgrade_engine.dispose()
    db.upgrade(database_url)
    assert db.current_revision(database_url) == db.head_revision()


def test_triage_and_the_confirmation_are_kept(repo: db.CallRepository) -> None:
    call_id = _start(repo)
    repo.record_triage(
        call_id, level="urgent", confidence=0.55, discriminator="cardiac_chest_pain", confirm_answer="no_input"
    )
    record = repo.get(call_id)
    assert record is not None
    assert (record.triage_level, record.triage_discriminator) == ("urgent", "cardiac_chest_pain")
    assert record.triage_confidence == pytest.approx(0.55)
    assert record.triage_confirm_asked
    assert record.triage_confirm_answer == "no_input"
    # A routine call: nothing asked, no discriminator.
    other = _start(repo)
    repo.record_triage(other, level="routine", confidence=1.0, discriminator="")
    routine = repo.get(other)
    assert routine is not None
    assert routine.triage_level == "routine"
    assert routine.triage_discriminator is None
    assert not routine.triage_confirm_asked


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"level": "critical"}, "triage level 'critical'"),
        ({"confidence": 1.5}, "outside 0..1"),
        ({"confirm_answer": "maybe"}, "confirmation answer 'maybe'"),
    ],
)
def test_bad_triage_values_are_refused_and_nothing_is_written(
    repo: db.CallRepository, fields: dict[str, object], message: str
) -> None:
    call_id = _start(repo)
    values: dict[str, object] = {"level": "urgent", "confidence": 0.5, "discriminator": "x", **fields}
    with pytest.raises(ValueError, match=message):
        repo.record_triage(call_id, **values)  # type: ignore[arg-type]
    record = repo.get(call_id)
    assert record is not None
    assert record.triage_level is None


def test_an_upgrade_marks_the_call_emergency_with_who_and_when_and_survives_the_end(repo: db.CallRepository) -> None:
    call_id = _start(repo)
    repo.record_triage(call_id, level="urgent", confidence=0.8, discriminator="fever")
    assert repo.upgrade_to_emergency(call_id, by="nurse1", at=T0 + timedelta(minutes=2))
    assert not repo.upgrade_to_emergency(call_id, by="nurse2", at=T0 + timedelta(minutes=3))  # the first stands
    assert repo.call_priority(call_id) == "emergency"
    # The IVR routed it to triage as a normal call; its end does not undo the upgrade.
    repo.finish(
        call_id,
        outcome="routed",
        ended_at=T0 + timedelta(minutes=5),
        route_category="triage",
        route_priority="normal",
    )
    record = repo.get(call_id)
    assert record is not None
    assert (record.route_category, record.route_priority) == ("triage", "emergency")
    assert (record.upgraded_by, record.upgraded_at) == ("nurse1", T0 + timedelta(minutes=2))
    assert record.triage_level == "urgent"  # what the classifier said stays beside the upgrade


def test_an_upgrade_names_an_account(repo: db.CallRepository) -> None:
    call_id = _start(repo)
    with pytest.raises(ValueError, match="account id"):
        repo.upgrade_to_emergency(call_id, by="nurse 1; drop", at=T0)
    with pytest.raises(db.CallNotFound):
        repo.upgrade_to_emergency(str(uuid.uuid4()), by="nurse1", at=T0)


@pytest.mark.parametrize(
    "values",
    [
        {"triage_level": "critical"},
        {"triage_confidence": -0.1},
        {"triage_confirm_answer": "key"},  # an answer without the question
        {"upgraded_at": T0},  # half an upgrade
        {"upgraded_by": "nurse1"},
        {"speech_admission": "queued"},  # never a wait: admitted or refused, nothing else
    ],
)
def test_the_schema_refuses_what_the_code_would_not_write(
    repo: db.CallRepository, engine: Engine, values: dict[str, object]
) -> None:
    call_id = _start(repo)
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(update(Call).where(Call.id == call_id).values(**values))


def test_calls_show_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "medhotline.toml"
    config.write_text(f'[service]\nstate_dir = "{tmp_path / "state"}"\n', encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        repo = db.CallRepository.for_engine(engine)
        asked = _start(repo)
        repo.record_triage(
            asked, level="urgent", confidence=0.55, discriminator="cardiac_chest_pain", confirm_answer="key"
        )
        repo.upgrade_to_emergency(asked, by="nurse1", at=T0 + timedelta(minutes=1))
        repo.record_speech_admission(asked, "refused")
        plain = _start(repo)
    finally:
        engine.dispose()

    assert main(["--config", str(config), "calls", "show", asked]) == 0
    out = capsys.readouterr().out
    assert "triage:       urgent confidence=0.55 discriminator=cardiac_chest_pain" in out
    assert "confirmation: asked, answer=key" in out
    assert "upgraded:     to emergency by nurse1 at 2027-03-03T02:01:00+00:00" in out
    assert "route:        - priority=emergency" in out
    assert "speech:       refused (no recognizer free: key menu)" in out

    assert main(["--config", str(config), "calls", "show", plain]) == 0
    out = capsys.readouterr().out
    assert "triage" not in out
    assert "upgraded" not in out
    assert "speech" not in out

    assert main(["--config", str(config), "calls", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(asked) and " urgent?! " in line for line in lines)
    assert any(line.startswith(plain) and " - " in line for line in lines)

    assert main(["--config", str(config), "calls", "show", "nope"]) == 1
    assert "no call 'nope' recorded" in capsys.readouterr().err
    assert main(["--config", str(config), "calls", "show"]) == 1
    assert "needs a CALL_ID" in capsys.readouterr().err
