"""Typed model of an IVR flow, validated from YAML by pydantic.

This is the first slice of the flow language (``play`` and ``hangup``); the flow-engine issue adds the
waiting nodes (menu, collect, listen …) on the same model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NodeId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    say: str | None = Field(default=None, min_length=1, max_length=2000)
    # A pre-recorded sound instead of rendered text, as Asterisk names it (e.g. ``custom/welcome``).
    file: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_/-]+$")

    @model_validator(mode="after")
    def _one_prompt_source(self) -> _Node:
        if self.say is not None and self.file is not None:
            raise ValueError("give either `say` or `file`, not both")
        return self


class PlayNode(_Node):
    type: Literal["play"]
    next: NodeId

    @model_validator(mode="after")
    def _has_prompt(self) -> PlayNode:
        if self.say is None and self.file is None:
            raise ValueError("a play node needs `say` (text) or `file` (sound)")
        return self


class HangupNode(_Node):
    type: Literal["hangup"]


Node = Annotated[PlayNode | HangupNode, Field(discriminator="type")]


class Flow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    flow: str = Field(pattern=r"^[a-z0-9_-]{1,64}$")
    description: str = ""
    start: NodeId
    nodes: dict[NodeId, Node] = Field(min_length=1)

    @model_validator(mode="after")
    def _targets_exist(self) -> Flow:
        if self.start not in self.nodes:
            raise ValueError(f"start node {self.start!r} is not defined under nodes")
        for name, node in self.nodes.items():
            if isinstance(node, PlayNode) and node.next not in self.nodes:
                raise ValueError(f"node {name!r}: next {node.next!r} is not defined under nodes")
        return self

    def prompt_texts(self) -> list[str]:
        return [node.say for node in self.nodes.values() if node.say]
