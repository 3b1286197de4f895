"""Load flow files: safe YAML → typed model, with errors that name the file and the node path."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from ivr.flow_model import Flow
from medhotline.errors import MedhotlineError


class FlowError(MedhotlineError):
    """A flow file is unusable; the message lists every problem with its place."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: invalid flow:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class LoadedFlow:
    flow: Flow
    path: Path
    # Content hash: the call record stores it so a call can be tied to the exact flow text it ran.
    version: str


def load_flow(path: Path) -> LoadedFlow:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FlowError(path, [f"cannot be read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise FlowError(path, ["not UTF-8 text"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise FlowError(path, [f"{where}not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    try:
        flow = Flow.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        ]
        raise FlowError(path, problems) from None
    return LoadedFlow(flow=flow, path=path, version=hashlib.sha256(raw).hexdigest()[:16])


def load_flows(directory: Path) -> dict[str, LoadedFlow]:
    """Every ``*.yaml`` flow in a directory, by flow name; the first bad file raises FlowError."""
    flows: dict[str, LoadedFlow] = {}
    for path in sorted(directory.glob("*.yaml")):
        loaded = load_flow(path)
        if loaded.flow.flow in flows:
            raise FlowError(path, [f"flow name {loaded.flow.flow!r} is also used by {flows[loaded.flow.flow].path}"])
        flows[loaded.flow.flow] = loaded
    return flows
