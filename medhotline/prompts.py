"""``medhotline prompts build``: collect every prompt text of the flows and render what is missing."""

from __future__ import annotations

from pathlib import Path

from ground.config import Config
from ivr.flow_loader import load_flows
from ivr.prompts import BuildReport, PromptError, Voice, build
from medhotline.sandbox import Sandbox
from routing.announcements import announcement_texts


def sounds_dir(config: Config) -> Path:
    """Where prompts are rendered, for ``prompts build`` and for texts the service renders at call time alike:
    the sandbox's own sounds directory, or ``prompts.sounds_dir`` of an external Asterisk (the configuration
    refuses external mode without it, and sandbox mode with it)."""
    if config.asterisk.mode == "sandbox":
        return Sandbox(config).sounds_dir
    if config.prompts.sounds_dir is None:  # only a Config built around its validation gets here
        raise PromptError("asterisk.mode is external: set prompts.sounds_dir to that Asterisk's sounds directory")
    return config.prompts.sounds_dir


def build_prompts(config: Config) -> BuildReport:
    flows = load_flows(config.hotline.flows_dir)
    texts = [text for loaded in flows.values() for text in loaded.flow.prompt_texts()]
    texts += announcement_texts(config.routing.callback_key)
    if config.asterisk.mode == "sandbox":
        Sandbox(config).ensure_rootfs()
    return build(texts, Voice(config.prompts.voice, config.prompts.speed), sounds_dir(config))
