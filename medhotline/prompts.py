"""``medhotline prompts build``: collect every prompt text of the flows and render what is missing."""

from __future__ import annotations

from ground.config import Config
from ivr.flow_loader import load_flows
from ivr.prompts import BuildReport, PromptError, Voice, build
from medhotline.sandbox import Sandbox
from routing.announcements import announcement_texts


def build_prompts(config: Config) -> BuildReport:
    flows = load_flows(config.hotline.flows_dir)
    texts = [text for loaded in flows.values() for text in loaded.flow.prompt_texts()]
    texts += announcement_texts()
    if config.asterisk.mode == "sandbox":
        sandbox = Sandbox(config)
        sandbox.ensure_rootfs()
        sounds_dir = sandbox.sounds_dir
    elif config.prompts.sounds_dir is not None:
        sounds_dir = config.prompts.sounds_dir
    else:
        raise PromptError("asterisk.mode is external: set prompts.sounds_dir to that Asterisk's sounds directory")
    return build(texts, Voice(config.prompts.voice, config.prompts.speed), sounds_dir)
