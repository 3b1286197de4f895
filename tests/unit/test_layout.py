"""The layout's rules that import-linter can't see: a function-level import must say why, and they stay few.

Layers are enforced by ``lint-imports``; an import inside a function slips past it (it is how cycles used to be
dodged), so each one left must carry a comment on its line or the line above saying why, and there must be
fewer than :data:`LIMIT` in all (issue 18). Tests are not walked: a test may import what it tests late.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 30
# Every folder with Python outside the tests; a new top-level package is walked without being listed.
SKIP = {"tests", ".venv", ".git", "build", "dist"}


@dataclass(frozen=True, slots=True)
class FunctionImport:
    path: Path
    line: int
    text: str
    has_why: bool


def function_imports(path: Path) -> list[FunctionImport]:
    """Each import statement nested in a function (or lambda) of ``path``, and whether a comment says why."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    found: list[FunctionImport] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import | ast.ImportFrom):
                own = lines[child.lineno - 1]
                above = lines[child.lineno - 2].strip() if child.lineno >= 2 else ""
                found.append(FunctionImport(path, child.lineno, own.strip(), "#" in own or above.startswith("#")))
            nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, in_function or nested)

    visit(ast.parse(source, filename=str(path)), False)
    return found


def source_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for top in sorted(root.iterdir()):
        if (
            top.is_dir()
            and top.name not in SKIP
            and not top.name.startswith(".")
            and not top.name.endswith(".egg-info")
        ):
            files.extend(p for p in sorted(top.rglob("*.py")) if "migrations/versions" not in p.as_posix())
    return files


def all_function_imports(root: Path) -> list[FunctionImport]:
    return [found for path in source_files(root) for found in function_imports(path)]


def test_the_walk_reaches_the_packages_and_the_benchmarks() -> None:
    walked = {p.relative_to(ROOT).parts[0] for p in source_files(ROOT)}
    assert {"ground", "compliance", "telephony", "ivr", "medhotline", "scheduler", "benchmarks"} <= walked
    assert "tests" not in walked


def test_every_function_level_import_says_why() -> None:
    silent = [f"{f.path.relative_to(ROOT)}:{f.line}: {f.text}" for f in all_function_imports(ROOT) if not f.has_why]
    assert not silent, "function-level imports without a comment saying why:\n" + "\n".join(silent)


def test_function_level_imports_stay_few() -> None:
    found = all_function_imports(ROOT)
    assert len(found) < LIMIT, f"{len(found)} function-level imports (limit {LIMIT - 1}): hoist them or fix the cycle"


# The checker itself must be able to fail: an uncommented one is found, a commented one is not, nesting counts.
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import os\n\ndef f():\n    import json\n", [(4, False)]),
        ("def f():\n    # a native library, loaded only when asked for\n    import json\n", [(3, True)]),
        ("def f():\n    import json  # slow to import\n", [(2, True)]),
        ("class C:\n    def m(self):\n        if True:\n            from a import b\n", [(4, False)]),
        ("def f():\n    def g():\n        import json\n", [(3, False)]),
        ("import json\nclass C:\n    import os\n", []),
    ],
)
def test_the_checker_finds_function_level_imports(
    tmp_path: Path, source: str, expected: list[tuple[int, bool]]
) -> None:
    path = tmp_path / "module.py"
    path.write_text(source, encoding="utf-8")
    assert [(f.line, f.has_why) for f in function_imports(path)] == expected


def test_the_limit_and_the_why_fail_on_a_tree_that_breaks_them(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    body = "".join(f"def f{i}():\n    # why {i}\n    import json\n" for i in range(LIMIT))
    (package / "many.py").write_text(body + "def g():\n    import os\n", encoding="utf-8")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("def t():\n    import os\n", encoding="utf-8")
    found = all_function_imports(tmp_path)
    assert len(found) == LIMIT + 1  # the tests folder is not walked
    assert [f.line for f in found if not f.has_why] == [3 * LIMIT + 2]
