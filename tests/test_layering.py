"""The import arrows of the house point one way (docs/ARCHITECTURE.md), and this test keeps them so.

Every `import` and `from ... import` of every module under `logitcache/` and `trainer/` is read
with `ast` (function-level imports included: a lazy import is still an arrow), resolved to the
project module it names, and checked against the rules below; a forbidden arrow fails with the
file, the line and the rule it breaks. The graph of project modules must have no cycle.
Benchmarks, the demo and the examples may use public names only: no `_private` name of
logitcache or trainer and no assignment into their modules (monkeypatching).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("logitcache", "trainer")

#: room -> the rooms it may import (besides itself). A room is a subpackage of logitcache
#: (`logitcache.read`), a top-level logitcache module (`logitcache.errors`) or `trainer`.
ALLOWED: dict[str, set[str]] = {
    "logitcache.errors": set(),
    "logitcache.version": set(),
    "logitcache.progress": set(),
    "logitcache.format": {"logitcache.errors", "logitcache.version"},
    "logitcache.storage": {"logitcache.errors", "logitcache.format"},
    "logitcache.read": {"logitcache.errors", "logitcache.format", "logitcache.storage"},
    # classifier examples and their views: read by the dump and replayed by the trainer
    "logitcache.examples": {"logitcache.errors", "logitcache.format"},
    "logitcache.write": {
        "logitcache.errors", "logitcache.format", "logitcache.storage", "logitcache.read",
        "logitcache.version",
    },
    "logitcache.dumping": {
        "logitcache.errors", "logitcache.format", "logitcache.storage", "logitcache.read",
        "logitcache.write", "logitcache.version", "logitcache.progress", "logitcache.runtime",
        "logitcache.examples",
    },
    "logitcache.runtime": {"logitcache.errors"},
    "logitcache.cli": {
        "logitcache", "logitcache.errors", "logitcache.format", "logitcache.storage",
        "logitcache.read", "logitcache.write", "logitcache.dumping", "logitcache.progress",
        "logitcache.version",
    },
    "logitcache.testing": set(),
    "logitcache.__main__": {"logitcache.cli"},
    # the public face re-exports; it may import any room but testing
    "logitcache": {
        "logitcache.errors", "logitcache.format", "logitcache.read", "logitcache.write",
        "logitcache.dumping", "logitcache.version", "logitcache.cli", "logitcache.storage.paths",
        "logitcache.examples",
    },
    # the trainer sees logitcache's public names only (the public modules below, no room whole)
    "trainer": {
        "logitcache", "logitcache.errors", "logitcache.progress", "logitcache.cli",
        "logitcache.runtime", "logitcache.storage.files", "logitcache.examples",
    },
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "trainer":
        return "trainer"
    if len(parts) == 1:
        return "logitcache"
    return ".".join(parts[:2])


def _project_files() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def _imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import in `path`."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base, [a.name for a in node.names]


def _targets(base: str, names: list[str], known: set[str]) -> list[str]:
    """The project modules an import names: `from pkg import mod` names `pkg.mod`."""
    if base.split(".")[0] not in PACKAGES:
        return []
    found = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
    return found or [base]


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    known = {_module_name(p) for p in _project_files()}
    graph: dict[str, set[str]] = {m: set() for m in known}
    problems = []
    for path in _project_files():
        me = _module_name(path)
        for line, base, names in _imports(path):
            for target in _targets(base, names, known):
                if target == me or target not in known:
                    continue
                graph[me].add(target)
                mine, theirs = _room(me), _room(target)
                allowed = ALLOWED.get(mine, set())
                if mine == theirs or theirs in allowed or target in allowed:
                    continue
                where = f"{path.relative_to(REPO)}:{line}"
                problems.append(f"{where}: {me} -> {target} ({mine} may not import {theirs})")
    return graph, problems


def test_every_import_follows_the_layering_rules() -> None:
    _, problems = _graph()
    assert not problems, "forbidden imports:\n" + "\n".join(problems)


def test_the_project_modules_import_each_other_without_a_cycle() -> None:
    graph, _ = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def _public_only_problems(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(), str(path))
    project_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    project_names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    yield f"{path.name}:{node.lineno}: imports private {node.module}.{alias.name}"
                project_names.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            if node.value.id in project_names and private:
                yield f"{path.name}:{node.lineno}: uses private {node.value.id}.{node.attr}"
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                value = target.value if isinstance(target, ast.Attribute) else None
                if isinstance(value, ast.Name) and value.id in project_names:
                    yield f"{path.name}:{node.lineno}: assigns into {value.id}.{target.attr}"


@pytest.mark.parametrize(
    "path",
    [
        *sorted((REPO / "benchmarks").glob("*.py")),
        REPO / "demo.py",
        REPO / "demo_classify.py",
        *sorted((REPO / "examples").glob("*.py")),
    ],
    ids=lambda p: p.name,
)
def test_benchmarks_the_demo_and_examples_use_public_names_only(path: Path) -> None:
    problems = list(_public_only_problems(path))
    assert not problems, "\n".join(problems)


def test_testing_helpers_are_imported_only_by_tests_benchmarks_and_the_demo() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{line}"
        for path in _project_files()
        if "testing" not in path.relative_to(REPO).parts
        for line, base, names in _imports(path)
        if base.startswith("logitcache.testing") or (base == "logitcache" and "testing" in names)
    ]
    assert not offenders, offenders
