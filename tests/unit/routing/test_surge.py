"""Surge mode: the profile, its entry flow validated like any flow, overflow agents, capacity, and the CLI."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from compliance.audit import SqlAuditStore
from ground import db
from ivr.flow_registry import FlowRegistry
from medhotline.cli import main
from routing.callback_store import ModeStore
from routing.model import Agent, CallRequest, Credential
from routing.router import Dispatcher, eligible
from routing.rules import DEFAULT_RULES
from routing.surge import (
    SURGE_FLOW,
    SurgeError,
    entry_flow_yaml,
    over_capacity,
    parse_profile,
)

DIALPLANS = Path(__file__).resolve().parents[3] / "dialplans"
T0 = datetime(2027, 3, 1, 9, 0, tzinfo=UTC)
PROFILE = (DIALPLANS / "surge_profiles" / "respiratory.yaml").read_text(encoding="utf-8")


def cred(kind: str) -> Credential:
    return Credential(kind, "N1", T0 - timedelta(days=365), T0 + timedelta(days=365), T0 - timedelta(days=1))


VOLUNTEER = Agent("vol1", "vol1", credentials=(cred("surge_volunteer"),))
NURSE = Agent("nurse1", "nurse1", credentials=(cred("nurse_license"),))


def call(category: str, priority: str = "normal", minutes: float = 0) -> CallRequest:
    return CallRequest(f"c-{category}-{minutes}", category, priority, T0 + timedelta(minutes=minutes))  # type: ignore[arg-type]


# --- profile ----------------------------------------------------------------------------------------------------


def test_the_shipped_profile_parses() -> None:
    profile = parse_profile(PROFILE, "respiratory.yaml")
    assert profile.volunteer_categories == ["general"]
    assert profile.capacity["general"] == 30


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("volunteer_categories: [general, diagnosis]", "never take diagnosis"),
        ("volunteer_categories: [emergency]", "never take emergency"),
        ("capacity: {emergency: 5}", "emergencies are never turned away"),
        ("symptoms: {category: general}", "must reach a clinician"),
        ("overflow: ignore", "overflow"),
        ("colour: red", "colour"),
    ],
)
def test_a_bad_profile_is_refused_naming_the_field(change: str, message: str) -> None:
    with pytest.raises(SurgeError, match=message) as error:
        parse_profile(f"name: t\nbulletin: 公告。\n{change}\n", "bad.yaml")
    assert "bad.yaml" in str(error.value)


def test_the_entry_flow_is_validated_by_the_flow_registry_with_the_faq_flow() -> None:
    registry = FlowRegistry(DIALPLANS)
    registry.refresh()
    profile = parse_profile(PROFILE)
    assert registry.set_overlay({SURGE_FLOW: entry_flow_yaml(profile)}) == []
    entry = registry.current[SURGE_FLOW].flow
    bulletin = entry.nodes[entry.start]
    assert bulletin.say is not None
    assert bulletin.say.startswith(profile.bulletin)
    assert "有症状请按1，了解信息请按2" in bulletin.say
    # A file edit reloads the files and keeps the surge flow.
    registry._seen = None
    registry.refresh()
    assert SURGE_FLOW in registry.current
    assert registry.set_overlay({}) == []
    assert SURGE_FLOW not in registry.current


def test_an_entry_flow_naming_a_missing_faq_flow_is_refused_and_nothing_changes() -> None:
    registry = FlowRegistry(DIALPLANS)
    registry.refresh()
    before = dict(registry.current)
    profile = parse_profile(PROFILE.replace("faq_flow: surge_faq", "faq_flow: no_such_flow"))
    problems = registry.set_overlay({SURGE_FLOW: entry_flow_yaml(profile)})
    assert any("no_such_flow" in str(p) for p in problems)
    assert dict(registry.current) == before


# --- overflow agents and capacity -------------------------------------------------------------------------------


@pytest.mark.parametrize("category", ["diagnosis", "medication", "adverse_reaction", "emergency", "vaccination"])
def test_volunteers_never_take_clinical_calls_even_in_surge_mode(category: str) -> None:
    surge = frozenset({"general"})
    assert not eligible(VOLUNTEER, call(category), DEFAULT_RULES, T0, surge)


def test_volunteers_take_general_calls_only_in_surge_mode() -> None:
    assert not eligible(VOLUNTEER, call("general"), DEFAULT_RULES, T0)
    assert not eligible(VOLUNTEER, call("appointment"), DEFAULT_RULES, T0, frozenset({"general"}))
    assert eligible(VOLUNTEER, call("general"), DEFAULT_RULES, T0, frozenset({"general"}))


def test_in_surge_mode_a_volunteer_goes_first_for_information_and_a_nurse_takes_symptoms() -> None:
    d = Dispatcher(DEFAULT_RULES)
    d.volunteers = frozenset({"general"})
    # The nurse has been idle longer: without the preference she would get the information call.
    d.add_agent(NURSE, T0, "available")
    d.add_agent(VOLUNTEER, T0 + timedelta(seconds=1), "available")
    d.enqueue(call("general"))
    d.enqueue(CallRequest("symptoms", "emergency", "normal", T0 + timedelta(seconds=5)))
    first = d.next_assignment(T0 + timedelta(seconds=10))
    second = d.next_assignment(T0 + timedelta(seconds=10))
    assert first is not None
    assert second is not None
    assert {(first.call.call_id, first.agent_id), (second.call.call_id, second.agent_id)} == {
        ("c-general-0", "vol1"),
        ("symptoms", "nurse1"),
    }


def test_capacity_turns_away_normal_calls_but_never_an_emergency() -> None:
    profile = parse_profile("name: t\nbulletin: 公告。\ncapacity: {general: 2}\n")
    assert not over_capacity(profile, call("general"), {"general": 1})
    assert over_capacity(profile, call("general"), {"general": 2})
    assert not over_capacity(profile, call("emergency", "emergency"), {"emergency": 500})
    assert not over_capacity(profile, call("general", "emergency"), {"general": 500})
    assert not over_capacity(profile, call("medication"), {"medication": 500}), "no limit set for medication"
    assert not over_capacity(None, call("general"), {"general": 500}), "no limits outside surge mode"


# --- the CLI ----------------------------------------------------------------------------------------------------


class Cli:
    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.config = tmp_path / "medhotline.toml"
        self.config.write_text(
            f'[service]\nstate_dir = "{tmp_path / "state"}"\n[keyservice]\ndirectory = "{tmp_path / "keys"}"\n'
            f'[hotline]\nflows_dir = "{DIALPLANS}"\n',
            encoding="utf-8",
        )
        self.url = f"sqlite:///{tmp_path / 'state' / 'medhotline.db'}"

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = main(["--config", str(self.config), *argv])
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    runner = Cli(tmp_path, capsys)
    assert runner("db", "upgrade")[0] == 0
    return runner


def audit_actions(url: str) -> list[tuple[str, str, str, str]]:
    engine = db.make_engine(url)
    try:
        return [(e.action, e.actor, e.reason, e.details) for e in SqlAuditStore(engine).entries()]
    finally:
        engine.dispose()


def test_surge_on_status_off_audited_and_restored_exactly(cli: Cli) -> None:
    code, out, err = cli("surge", "status")
    assert code == 0, err
    assert out.startswith("normal")
    code, out, err = cli("surge", "on", "--profile", "respiratory", "--reason", "呼吸道疫情应急", "--as", "ops.wang")
    assert code == 0, err
    assert "surge mode ON" in out
    code, out, _ = cli("surge", "status")
    assert "surge, profile respiratory" in out
    assert "ops.wang" in out
    code, _, err = cli("surge", "on", "--profile", "respiratory", "--reason", "again")
    assert code == 1
    assert "already on" in err
    code, out, err = cli("surge", "off", "--reason", "疫情缓解", "--as", "ops.li")
    assert code == 0, err
    modes = ModeStore.for_engine(db.make_engine(cli.url)).history()
    assert [m.mode for m in modes] == ["surge", "normal"]
    assert modes[0].profile_text == PROFILE
    assert modes[1].configuration() == ("normal", None, None, None)
    actions = audit_actions(cli.url)
    assert [(a, who, why) for a, who, why, _ in actions] == [
        ("surge_on", "ops.wang", "呼吸道疫情应急"),
        ("surge_off", "ops.li", "疫情缓解"),
    ]


def test_a_bad_profile_switches_nothing_and_audits_nothing(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbulletin: 公告。\nvolunteer_categories: [medication]\n", encoding="utf-8")
    code, _, err = cli("surge", "on", "--profile", str(bad), "--reason", "drill")
    assert code == 1
    assert "bad.yaml" in err
    assert "never take medication" in err
    code, _, err = cli("surge", "on", "--profile", "no-such-profile", "--reason", "drill")
    assert code == 1
    assert "cannot read" in err
    # A reason the audit log would refuse (a phone-like number) stops the switch before anything is stored.
    code, _, err = cli("surge", "on", "--profile", "respiratory", "--reason", "caller 13800138000 said so")
    assert code == 1
    assert "audit" in err
    assert ModeStore.for_engine(db.make_engine(cli.url)).history() == []
    assert audit_actions(cli.url) == []


def test_surge_check_and_off_when_not_on(cli: Cli) -> None:
    code, out, err = cli("surge", "check", "--profile", "respiratory")
    assert code == 0, err
    assert "volunteers take general" in out
    code, _, err = cli("surge", "off", "--reason", "nothing to do")
    assert code == 1
    assert "not on" in err


async def test_a_node_follows_the_mode_in_the_database_and_restores_the_hotline(tmp_path: Path) -> None:
    from medhotline.surge import SurgeState

    url = f"sqlite:///{tmp_path / 'm.db'}"
    db.upgrade(url)
    modes = ModeStore.for_engine(db.make_engine(url))
    flows = FlowRegistry(DIALPLANS)
    flows.refresh()
    spoken: list[str] = []

    async def speak(text: str) -> str:
        spoken.append(text)
        return "sound"

    state = SurgeState(modes, flows, None, "hotline", speak)
    await state.poll()
    assert state.entry_flow("hotline") == "hotline"
    before = dict(flows.current)
    profile = parse_profile(PROFILE)
    modes.surge_on(
        profile_name=profile.name, profile_text=PROFILE, entry_flow=entry_flow_yaml(profile), actor="ops",
        reason="drill", at=T0,
    )  # fmt: skip
    await state.poll()
    assert state.entry_flow("hotline") == SURGE_FLOW
    assert state.entry_flow("medication") == "medication", "outbound flows are not replaced"
    assert any(profile.bulletin in text for text in spoken), "the bulletin is rendered before callers need it"
    modes.surge_off(actor="ops", reason="drill over", at=T0)
    await state.poll()
    assert state.entry_flow("hotline") == "hotline"
    assert state.profile is None
    assert dict(flows.current) == before


def test_a_full_queue_offers_a_callback_only_when_the_profile_says_so_and_callbacks_are_on() -> None:
    from routing.surge import OVERFLOW_GOODBYE, overflow_texts, parse_profile

    callback = parse_profile("name: p\nbulletin: 公告。\noverflow: callback\n")
    hangup = parse_profile("name: p\nbulletin: 公告。\noverflow: hangup\n")
    message, offer = overflow_texts(callback, "1")
    assert message == callback.overflow_message
    assert "请按1" in offer
    assert overflow_texts(callback, "") == [callback.overflow_message, OVERFLOW_GOODBYE]
    assert overflow_texts(hangup, "1") == [hangup.overflow_message, OVERFLOW_GOODBYE]
