"""House rules that hold for the whole code base, checked from the source text.

* no import cycle between prunetune's modules (every import counts: top level, inside
  functions, under ``TYPE_CHECKING``);
* imports of prunetune's own modules at the top of the file, except the listed few that would load a
  heavy library (peft, the Trainer) for callers that do not need it;
* no module over 400 lines;
* user-facing text (README, docs, shipped configs) names no absolute path of the machine it
  was written on, no session and no issue number.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = SRC / "prunetune"
MAX_LINES = 400


# --------------------------------------------------------------------------- import graph


def _module_name(file: Path) -> str:
    parts = list(file.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(file): file for file in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _base(name: str, module: str, level: int, modules: dict[str, Path]) -> str:
    """The absolute module a ``from ... import`` names (relative imports at any level)."""
    if not level:
        return module
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def _reexports(modules: dict[str, Path]) -> dict[str, dict[str, tuple[str, str]]]:
    """For each package ``__init__``: the names it imports from prunetune, as (module, name)."""
    found = {}
    for name, file in modules.items():
        if _is_package(name, modules):
            found[name] = {alias.asname or alias.name: (_base(name, node.module or "", node.level, modules), alias.name)
                           for node in ast.walk(ast.parse(file.read_text(encoding="utf-8")))
                           if isinstance(node, ast.ImportFrom) for alias in node.names}
    return found


def _resolve(target: str, name: str | None, modules, reexports, seen: frozenset = frozenset()) -> str:
    """The module that ``from target import name`` (``import target`` when ``name`` is None) depends on.

    A submodule is imported as itself; a name a package ``__init__`` only re-exports is an edge
    to the module that defines it (an ``__init__`` importing its own submodules is the normal
    shape of a package, not a cycle); anything else is an edge to ``target`` itself.
    """
    if name is not None and f"{target}.{name}" in modules:
        return f"{target}.{name}"
    source = reexports.get(target, {}).get(name) if name is not None else None
    if source is not None and source[0] in modules and (target, name) not in seen:
        return _resolve(*source, modules, reexports, seen | {(target, name)})
    return target


def import_graph() -> dict[str, set[str]]:
    """prunetune module -> the prunetune modules it imports (anywhere in the file)."""
    modules = _modules()
    reexports = _reexports(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, file in modules.items():
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
            if isinstance(node, ast.Import):
                targets = [_resolve(alias.name, None, modules, reexports) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _base(name, node.module or "", node.level, modules)
                targets = [_resolve(base, alias.name, modules, reexports) for alias in node.names]
            else:
                continue
            graph[name].update(target for target in targets if target in modules and target != name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) for each strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to start
        node = frontier.pop(0)
        for nxt in sorted(graph[node] & group):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                frontier.append(nxt)
    raise AssertionError(f"no cycle through {start}")


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "prunetune.errors" in graph["prunetune.outputs"]  # top level, absolute
    assert "prunetune.calibrate.types" in graph["prunetune.calibrate.driver"]
    assert "prunetune.calibrate.driver" in graph["prunetune.calibrate"]  # a package's __init__ and its submodules
    # `from prunetune.calibrate import CalibrationOptions` depends on the module defining it, not the __init__
    assert "prunetune.calibrate.types" in graph["prunetune.pruning.api"]
    assert "prunetune.calibrate" not in graph["prunetune.pruning.api"]


def test_find_cycles_reports_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles between prunetune modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


# --------------------------------------------------------------------------- imports at the top


# Function-level imports of prunetune's own modules that stay in their function, each with its reason: the
# module imported loads a heavy library at import time that the importing module's other users do not need.
# Anything else goes at the top of its file, so the dependency graph shows in the imports.
FUNCTION_LEVEL_IMPORTS = {
    ("prunetune.commands.eval", "prunetune.recover.adapter"): "peft, only with --lora_weights",
    **{("prunetune.commands.merge", module): "peft, after the checks (--help and refused inputs answer at once)"
       for module in ("prunetune.export", "prunetune.recover.adapter", "prunetune.recover.masked_lora")},
    ("prunetune.pipeline.checks", "prunetune.recover.distill"): "the Trainer and peft, only for a config that recovers",
    ("prunetune.pipeline.layer_error", "prunetune.export"): "peft, only for a recovered adapter's stage",
    ("prunetune.pipeline.layer_error", "prunetune.recover.adapter"): "peft, only for a recovered adapter's stage",
    **{("prunetune.pipeline.recovery", module): "the recipe (Trainer, datasets, peft), only when a recover stage runs"
       for module in ("prunetune.recipe", "prunetune.recipe.args", "prunetune.export", "prunetune.recover.adapter",
                      "prunetune.pipeline.held_out")},
}


def function_level_imports() -> dict[tuple[str, str], list[int]]:
    """(importing module, imported prunetune module) -> the lines of the imports inside functions.

    A package ``__init__``'s module-level ``__getattr__`` (lazy re-exports) is not counted.
    """
    modules = _modules()
    found: dict[tuple[str, str], list[int]] = {}

    def visit(node: ast.AST, name: str, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.ImportFrom):
                base = _base(name, child.module or "", child.level, modules)
                if base.split(".")[0] == "prunetune":
                    found.setdefault((name, base), []).append(child.lineno)
            elif in_function and isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "prunetune":
                        found.setdefault((name, alias.name), []).append(child.lineno)
            lazy_exports = isinstance(child, ast.FunctionDef) and child.name == "__getattr__" and node is tree
            function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not lazy_exports
            visit(child, name, in_function or function)

    for name, file in modules.items():
        tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
        visit(tree, name, False)
    return found


def test_imports_of_prunetune_modules_are_at_the_top():
    found = function_level_imports()
    assert ("prunetune.pipeline.recovery", "prunetune.recipe") in found  # the walk sees nested and relative imports
    stray = [f"{name} (line {', '.join(map(str, lines))}) imports {module}"
             for (name, module), lines in sorted(found.items()) if (name, module) not in FUNCTION_LEVEL_IMPORTS]
    assert not stray, ("imports of prunetune modules inside functions (move them to the top of the file, or add them "
                       "with their reason to FUNCTION_LEVEL_IMPORTS):\n" + "\n".join(stray))
    stale = sorted(set(FUNCTION_LEVEL_IMPORTS) - set(found))
    assert not stale, f"FUNCTION_LEVEL_IMPORTS lists imports that are no longer in a function: {stale}"


# --------------------------------------------------------------------------- size


def test_no_module_over_400_lines():
    long = {str(file.relative_to(ROOT)): n for file in sorted(PACKAGE.rglob("*.py"))
            if (n := len(file.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


# --------------------------------------------------------------------------- user-facing text


def _user_facing_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted((PACKAGE / "configs").glob("*.yaml")), PACKAGE / "tiny" / "MODEL_CARD.md"]
    return [file for file in files if file.is_file()]


def _machine_paths() -> list[str]:
    """Absolute paths that exist only on this machine: the checkout, the folder above it, the home folder."""
    candidates = {ROOT, ROOT.parent, Path.home()}
    return sorted({str(path) for path in candidates if len(path.parts) > 1}, key=len, reverse=True)


def _path_pattern(paths: list[str]) -> re.Pattern:
    # the path itself or below it, not a longer name that starts the same (/work vs /workspace)
    return re.compile("|".join(rf"(?<![\w.~-]){re.escape(path)}(?![\w.-])" for path in paths))


WORDING = re.compile(r"\bsessions?\b|\bissues?\s*#?\s*\d+|(?<![\w&/])#\d{1,4}\b", re.IGNORECASE)


def test_path_pattern_matches_the_path_and_below_only():
    pattern = _path_pattern(["/work/main", "/work"])
    assert pattern.search("see /work/main/README.md")
    assert pattern.search("cd /work")
    assert not pattern.search("cd /workspace/x")
    assert not pattern.search("a ~/work folder")
    assert WORDING.search("as in issue 12") and WORDING.search("this session's run") and WORDING.search("(#7)")
    assert not WORDING.search("color #ff0000 and 3 issues found")


@pytest.mark.parametrize("file", _user_facing_files(), ids=lambda file: str(file.relative_to(ROOT)))
def test_user_facing_text_names_no_machine_path_or_session(file):
    paths = _path_pattern(_machine_paths())
    bad = [f"{file.relative_to(ROOT)}:{number}: {line.strip()[:160]}"
           for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1)
           if paths.search(line) or WORDING.search(line)]
    assert not bad, "user-facing text names a path of this machine, a session or an issue number:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- dependencies


# import name -> distribution name, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "lm_eval": "lm-eval", "huggingface_hub": "huggingface-hub"}


def _declared() -> set[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_third_party_import_is_declared():
    import sys

    imported = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
            for top in {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - {"prunetune"}:
                imported.setdefault(DISTRIBUTIONS.get(top, top).replace("_", "-"), str(file.relative_to(ROOT)))
    missing = {dist: where for dist, where in imported.items() if dist not in _declared()}
    assert not missing, f"imported but not declared in pyproject.toml (dependencies or an extra): {missing}"
