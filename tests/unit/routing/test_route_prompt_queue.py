"""The queue plays the route prompt the IVR left to it (over a fake ARI): in the holding bridge before the music,
stopped when an agent answers, every outcome a step of the call's path."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from routing import ari_queue
from routing.ari_queue import CallerQueue, QueueSettings, _RoutePrompt
from routing.engine import RoutingEngine
from telephony.ari_channel import AriCallChannel, AriDispatcher
from telephony.ari_client import AriClient, AriError, AriNotFound
from telephony.channel import CallInfo

SOUND = "medhotline/emergency"
Steps = list[tuple[str, str | None, str | None]]


class FakeAri:
    """Answers every request; a playback exists for ``playing`` GETs, then is gone (it ended)."""

    app = "medhotline"

    def __init__(self, playing: int = 1_000_000, fail_play: bool = False) -> None:
        self.requests: list[tuple[str, str]] = []
        self.playing = playing
        self.fail_play = fail_play

    async def request(
        self, method: str, path: str, params: dict[str, str] | None = None, *, retry: bool | None = None
    ) -> Any:
        self.requests.append((method, path))
        if method == "POST" and "/play/" in path and self.fail_play:
            raise AriError(method, path, 500, "no such sound")
        if method == "GET" and path.startswith("/playbacks/"):
            if self.playing <= 0:
                raise AriNotFound(method, path, 404, "Playback not found")
            self.playing -= 1
        return {}

    def paths(self, method: str) -> list[str]:
        return [path for m, path in self.requests if m == method]


@pytest.fixture(autouse=True)
def _fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ari_queue, "ROUTE_PROMPT_POLL", 0.01)


def _setup(ari: FakeAri) -> tuple[CallerQueue, AriCallChannel, _RoutePrompt, Steps]:
    queue = CallerQueue(
        cast(AriClient, ari),
        AriDispatcher(),
        cast(RoutingEngine, None),  # not used by the caller's side
        settings=QueueSettings(),
        sound=str,
        escalation_groups={},
    )
    caller = AriCallChannel(cast(AriClient, ari), CallInfo("caller-1", "PJSIP/x", "ari", "", ""))
    steps: Steps = []

    async def step(node: str, edge: str | None, value: str | None) -> None:
        steps.append((node, edge, value))

    return queue, caller, _RoutePrompt(SOUND, step), steps


async def test_the_prompt_plays_in_the_holding_bridge_and_the_music_starts_after_it() -> None:
    ari = FakeAri(playing=3)
    queue, caller, prompt, steps = _setup(ari)
    await queue._hold(caller, "hold-1", answer=True, prompt=prompt)
    await asyncio.sleep(0)  # the prompt's own task starts it
    posts = ari.paths("POST")
    # Answered, in the bridge, the prompt started: and no music under it.
    assert posts[:3] == ["/channels/caller-1/answer", "/bridges", "/bridges/hold-1/addChannel"]
    assert posts[3] == f"/channels/caller-1/play/{prompt.playback_id}"
    assert "/bridges/hold-1/moh" not in posts
    assert prompt.task is not None
    await asyncio.wait_for(prompt.task, timeout=5)
    assert ari.paths("POST")[-1] == "/bridges/hold-1/moh"  # music once the prompt has ended
    assert steps == [("route_prompt", "playing", SOUND), ("route_prompt", "played", SOUND)]


async def test_an_agent_answering_stops_the_prompt_before_the_answer_is_recorded() -> None:
    ari = FakeAri()  # a prompt that would play for ever
    queue, caller, prompt, steps = _setup(ari)
    await queue._hold(caller, "hold-1", answer=False, prompt=prompt)
    await asyncio.sleep(0.05)
    step = queue._hushing_step(prompt.step, prompt)
    await asyncio.wait_for(step("answered", "nurse", None), timeout=5)
    assert ari.paths("DELETE") == [f"/playbacks/{prompt.playback_id}"]
    assert steps == [
        ("route_prompt", "playing", SOUND),
        ("route_prompt", "stopped", "agent answered"),
        ("answered", "nurse", None),
    ]
    assert "/bridges/hold-1/moh" not in ari.paths("POST")  # the conversation follows, not music
    step_again = queue._hushing_step(prompt.step, prompt)
    await step_again("answered", "nurse", None)  # a second answer (next agent) stops nothing again
    assert len(ari.paths("DELETE")) == 1


async def test_an_agent_quicker_than_the_callers_side_means_the_prompt_is_skipped() -> None:
    ari = FakeAri()
    queue, caller, prompt, steps = _setup(ari)
    await queue._hushing_step(prompt.step, prompt)("answered", "nurse", None)  # before the hold's setup
    await queue._hold(caller, "hold-1", answer=False, prompt=prompt)
    assert prompt.task is not None
    await asyncio.wait_for(prompt.task, timeout=5)
    assert not [path for path in ari.paths("POST") if "/play/" in path]
    assert steps == [("answered", "nurse", None), ("route_prompt", "skipped", SOUND)]


async def test_a_prompt_that_cannot_be_played_leaves_the_caller_with_music_and_the_path_says_so() -> None:
    ari = FakeAri(fail_play=True)
    queue, caller, prompt, steps = _setup(ari)
    with capture_logs() as logs:
        await queue._hold(caller, "hold-1", answer=False, prompt=prompt)
        assert prompt.task is not None
        await asyncio.wait_for(prompt.task, timeout=5)
    assert ari.paths("POST")[-1] == "/bridges/hold-1/moh"
    assert steps == [("route_prompt", "not_played", SOUND)]
    assert any(entry["event"] == "queue.route_prompt_failed" for entry in logs)


async def test_without_a_prompt_the_music_starts_at_once_and_answered_passes_straight_through() -> None:
    ari = FakeAri()
    queue, caller, prompt, steps = _setup(ari)
    await queue._hold(caller, "hold-1", answer=False)
    assert ari.paths("POST")[-1] == "/bridges/hold-1/moh"
    assert queue._hushing_step(prompt.step, None) is prompt.step  # nothing to stop: the recorder itself
    await queue._hushing_step(prompt.step, None)("answered", "nurse", None)
    assert steps == [("answered", "nurse", None)]
    assert not ari.paths("DELETE")


async def test_whoever_needs_the_bridge_waits_for_the_prompt_to_end() -> None:
    ari = FakeAri(playing=5)
    queue, caller, prompt, steps = _setup(ari)
    hold = ari_queue._Hold("hold-1", lambda: queue._hold(caller, "hold-1", answer=False, prompt=prompt), None, prompt)
    assert await asyncio.wait_for(hold.ready(), timeout=5) == "hold-1"
    # An announcement or an escalation starts only now: after the prompt, with the music on.
    assert steps == [("route_prompt", "playing", SOUND), ("route_prompt", "played", SOUND)]
    assert ari.paths("POST")[-1] == "/bridges/hold-1/moh"


async def test_a_call_leaving_the_queue_ends_the_prompt_without_music_after_it() -> None:
    ari = FakeAri()
    queue, caller, prompt, steps = _setup(ari)
    hold = ari_queue._Hold("hold-1", lambda: queue._hold(caller, "hold-1", answer=False, prompt=prompt), None, prompt)
    hold.start()
    await asyncio.sleep(0.05)
    prompt.leave()
    await asyncio.wait_for(hold.ready(), timeout=5)
    assert prompt.task is not None
    assert prompt.task.cancelled()
    assert steps == [("route_prompt", "playing", SOUND)]
    assert "/bridges/hold-1/moh" not in ari.paths("POST")


async def test_a_prompt_whose_end_asterisk_cannot_tell_gives_way_to_the_music_after_a_few_tries() -> None:
    ari = FakeAri()

    async def failing(
        method: str, path: str, params: dict[str, str] | None = None, *, retry: bool | None = None
    ) -> Any:
        ari.requests.append((method, path))
        if method == "GET":
            raise AriError(method, path, 500, "internal")
        return {}

    ari.request = failing  # type: ignore[method-assign]
    queue, caller, prompt, steps = _setup(ari)
    with capture_logs() as logs:
        await queue._hold(caller, "hold-1", answer=False, prompt=prompt)
        assert prompt.task is not None
        await asyncio.wait_for(prompt.task, timeout=5)
    assert steps == [("route_prompt", "playing", SOUND), ("route_prompt", "end_unknown", SOUND)]
    assert len(ari.paths("GET")) == ari_queue.ROUTE_PROMPT_TRIES
    assert ari.paths("POST")[-1] == "/bridges/hold-1/moh"
    assert any(entry["event"] == "queue.route_prompt_end_unknown" for entry in logs)
