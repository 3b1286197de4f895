"""YAML that administrators edit, loaded strictly and with places: shared by the flow and lexicon loaders.

Only ``true``/``false`` are booleans (``yes``/``no``/``on``/``off`` stay text), ``010`` and ``12:30`` stay text,
duplicate keys are problems, and every key's line and column is remembered so a problem reads
``file:line:column: dotted.path: message``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PathKey = tuple[str, ...]


@dataclass(frozen=True, order=True)
class SourceProblem:
    """One thing wrong with a file, e.g. ``dialplans/hotline.yaml:12:5: nodes.menu.choices.1: ...``.

    ``line`` and ``column`` count from 1; 0 means the place is unknown (an unreadable file, say). ``where``
    is the dotted path of the offending key, empty for the file as a whole.
    """

    path: Path
    line: int
    column: int
    where: str
    message: str

    def __str__(self) -> str:
        place = f"{self.path}:{self.line}:{self.column}" if self.line else str(self.path)
        return f"{place}: {self.where}: {self.message}" if self.where else f"{place}: {self.message}"


def dotted(path: Iterable[object]) -> str:
    return ".".join(str(part) for part in path)


@dataclass(frozen=True)
class SourceMap:
    """Positions (1-based line, column) of every mapping key and sequence item of a YAML document.

    Keys are paths of strings: ``("nodes", "menu", "choices", "1")``; list indexes are written as digits.
    """

    path: Path
    positions: dict[PathKey, tuple[int, int]] = field(default_factory=dict)

    def position(self, path: Iterable[object]) -> tuple[int, int]:
        """The place of ``path``, or of its nearest ancestor that exists in the file (a missing key)."""
        key = tuple(str(part) for part in path)
        while key:
            if key in self.positions:
                return self.positions[key]
            key = key[:-1]
        return self.positions.get((), (1, 1))

    def problem(self, path: Iterable[object], message: str) -> SourceProblem:
        parts = tuple(str(part) for part in path)
        line, column = self.position(parts)
        return SourceProblem(self.path, line, column, dotted(parts), message)


# -- YAML with places -----------------------------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"


class StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-style scalars: ``true``/``false`` booleans only, no octal or base-60 numbers.

    ``010`` and ``12:30`` stay text instead of becoming 8 and 750.
    """


StrictYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


StrictYamlLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
StrictYamlLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+|0o[0-7]+)$"), list("-+0123456789")
)
StrictYamlLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)


def _construct_int(loader: StrictYamlLoader, node: yaml.ScalarNode) -> int:
    return int(str(loader.construct_scalar(node)), 0)


StrictYamlLoader.add_constructor(_INT_TAG, _construct_int)


def _mark(mark: yaml.Mark | None) -> tuple[int, int]:
    return (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)


class _Builder:
    """Turns a composed YAML node tree into plain data, recording positions and duplicate keys."""

    def __init__(self, loader: StrictYamlLoader, source: SourceMap) -> None:
        self.loader = loader
        self.source = source
        self.problems: list[SourceProblem] = []
        self._active: set[int] = set()

    def build(self, node: yaml.Node, path: PathKey) -> Any:
        if id(node) in self._active:  # an alias that contains itself
            line, column = _mark(node.start_mark)
            self.problems.append(SourceProblem(self.source.path, line, column, dotted(path), "recursive alias"))
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                items = []
                for index, item in enumerate(node.value):
                    self.source.positions[(*path, str(index))] = _mark(item.start_mark)
                    items.append(self.build(item, (*path, str(index))))
                return items
            return self.loader.construct_object(node, deep=True)
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: PathKey) -> dict[Any, Any]:
        self.loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = self.loader.construct_object(key_node, deep=True)
            line, column = _mark(key_node.start_mark)
            try:
                hash(key)
            except TypeError:
                self.problems.append(
                    SourceProblem(self.source.path, line, column, dotted(path), "a key must be plain text")
                )
                continue
            if key in first_line:
                self.problems.append(
                    SourceProblem(
                        self.source.path,
                        line,
                        column,
                        dotted((*path, key)),
                        f"duplicate key {key!r} (first on line {first_line[key]}, again on line {line})",
                    )
                )
                continue
            first_line[key] = line
            self.source.positions[(*path, str(key))] = (line, column)
            result[key] = self.build(value_node, (*path, str(key)))
        return result


def parse_yaml(text: str, path: Path) -> tuple[Any, SourceMap, list[SourceProblem]]:
    """YAML text → (plain data, positions, duplicate-key problems); a syntax error is one problem, data None."""
    source = SourceMap(path)
    loader = StrictYamlLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, source, []
        source.positions[()] = _mark(root.start_mark)
        builder = _Builder(loader, source)
        data = builder.build(root, ())
    except yaml.MarkedYAMLError as exc:
        line, column = _mark(exc.problem_mark)
        return None, source, [SourceProblem(path, line, column, "", f"not valid YAML: {exc.problem or exc}")]
    except yaml.YAMLError as exc:
        return None, source, [SourceProblem(path, 0, 0, "", f"not valid YAML: {exc}")]
    else:
        return data, source, builder.problems
    finally:
        loader.dispose()
