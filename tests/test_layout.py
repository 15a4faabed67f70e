"""The package layout's rules, read from the source with `ast` (nothing is imported):

- no import cycles among the modules of `engine`, `openai_compat` and `bench`, counting
  imports inside functions (a cycle that a lazy import hides still ties the modules together);
- `openai_compat` and `bench` use only `engine`'s public API (`engine/__init__.py`'s `__all__`),
  and `bench` only `openai_compat`'s;
- `engine` never imports `openai_compat` or `bench`;
- sizes: no module over 400 lines and no function over 60 lines, outside `engine/kernels/`;
- `docs/structures.md` (and README.md, docs/tools.md) name only paths that exist, and
  `docs/structures.md` names every module of the three packages.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "openai_compat", "bench")

# Imports of engine internals allowed anyway, as (importing module, imported module): none.
KNOWN_INTERNAL_IMPORTS: set[tuple[str, str]] = set()


@dataclass(frozen=True, slots=True)
class Import:
    importer: str  # the module holding the import statement
    target: str  # the module of ours that the statement loads (the most specific one)
    names: tuple[str, ...]  # `from target import names`; () for `import target`
    line: int

    def where(self) -> str:
        return f"{self.importer}:{self.line}"


def _module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _ours(name: str) -> str | None:
    """The longest prefix of the dotted `name` that is one of our modules."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in MODULES:
            return prefix
    return None


def _imports(module: str) -> Iterator[Import]:
    """Every import statement of `module` that loads one of our modules, at any depth."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _ours(alias.name)
                if target is not None:
                    yield Import(module, target, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from ..x import y` inside package a.b -> a.x
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` loads the submodule; `from mod import name` the module
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            for target in submodules:
                yield Import(module, target, (target.rpartition(".")[2],), node.lineno)
            rest = tuple(a.name for a in node.names if f"{base}.{a.name}" not in MODULES)
            target = _ours(base)
            if rest and target is not None:
                yield Import(module, target, rest, node.lineno)


IMPORTS = [imp for module in MODULES for imp in _imports(module)]


def _public_api(package: str) -> set[str]:
    """The names in `package/__init__.py`'s `__all__`."""
    tree = ast.parse((ROOT / package / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    raise AssertionError(f"{package}/__init__.py declares no __all__")


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the graph's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_module_list_and_the_import_graph_are_read() -> None:
    # the rules below would pass vacuously on an empty or misread tree
    assert {"engine", "engine.engine_core", "openai_compat.server", "bench.serve"} <= MODULES.keys()
    assert Import("engine.models.quantize", "engine.layers.embedding", ("VocabParallelEmbedding",), 0) in {
        Import(i.importer, i.target, i.names, 0) for i in IMPORTS
    }


def test_tarjan_finds_a_cycle_and_its_members() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert sorted(_strongly_connected(graph)) == [["a", "b", "c"], ["d"]]


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for imp in IMPORTS:
        if imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    cycles = [component for component in _strongly_connected(graph) if len(component) > 1]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _outside_public_api(imports: list[Import], importers: str, package: str) -> list[str]:
    """The `imports` by modules under `importers` of `package` that go past its `__all__`."""
    public = _public_api(package)
    problems = []
    for imp in imports:
        if imp.importer.split(".")[0] != importers or not (imp.target + ".").startswith(package + "."):
            continue
        if (imp.importer, imp.target) in KNOWN_INTERNAL_IMPORTS:
            continue
        if imp.target != package:
            problems.append(f"{imp.where()} imports {imp.target}")
        elif not imp.names or not set(imp.names) <= public:
            problems.append(
                f"{imp.where()} imports {sorted(set(imp.names) - public) or package + ' as a module'}"
            )
    return problems


@pytest.mark.parametrize(
    "importers,package",
    [("openai_compat", "engine"), ("bench", "engine"), ("bench", "openai_compat")],
)
def test_only_the_public_api_is_imported(importers: str, package: str) -> None:
    problems = _outside_public_api(IMPORTS, importers, package)
    assert not problems, f"{importers} imports past {package}'s __all__: " + "; ".join(problems)


def test_the_public_api_check_catches_an_internal_import() -> None:
    imports = [
        Import("openai_compat.fake", "engine.worker.process", ("ProgressFn",), 1),
        Import("openai_compat.fake", "engine", ("EngineConfig", "EngineCore"), 2),
        Import("openai_compat.fake", "engine", ("SamplingParams",), 3),
    ]
    assert _outside_public_api(imports, "openai_compat", "engine") == [
        "openai_compat.fake:1 imports engine.worker.process",
        "openai_compat.fake:2 imports ['EngineCore']",
    ]


@pytest.mark.parametrize("outer", ["openai_compat", "bench"])
def test_the_engine_never_imports_the_layers_above_it(outer: str) -> None:
    problems = [
        f"{imp.where()} imports {imp.target}"
        for imp in IMPORTS
        if imp.importer.split(".")[0] == "engine" and imp.target.split(".")[0] == outer
    ]
    assert not problems, "; ".join(problems)


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # from the `def` line to the body's last line, docstring included


def _outside_kernels(path: Path) -> bool:
    return path.relative_to(ROOT).parts[:2] != ("engine", "kernels")


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _long_modules(paths: list[Path], limit: int) -> list[str]:
    sizes = {path: len(path.read_text().splitlines()) for path in paths}
    return [f"{_shown(path)}: {n} lines" for path, n in sizes.items() if n > limit]


def _long_functions(path: Path, limit: int) -> list[str]:
    """Every function and method of `path` (nested ones too) longer than `limit` lines."""
    problems = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                problems.append(f"{_shown(path)}:{node.lineno} {node.name}: {length} lines")
    return problems


def test_no_module_over_400_lines_outside_the_kernels() -> None:
    paths = [path for path in MODULES.values() if _outside_kernels(path)]
    problems = _long_modules(paths, MAX_MODULE_LINES)
    assert not problems, "; ".join(problems)


def test_no_function_over_60_lines_outside_the_kernels() -> None:
    paths = [path for path in MODULES.values() if _outside_kernels(path)]
    problems = [problem for path in paths for problem in _long_functions(path, MAX_FUNCTION_LINES)]
    assert not problems, "; ".join(problems)


def test_the_size_checks_catch_a_long_module_and_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    path = tmp_path / "probe.py"
    path.write_text(f"def short() -> None:\n    pass\n\n\nasync def long() -> None:\n{body}\n")
    assert _long_functions(path, 61) == []
    assert _long_functions(path, 60) == ["probe.py:5 long: 61 lines"]
    assert _long_modules([path], 65) == []
    assert _long_modules([path], 64) == ["probe.py: 65 lines"]


STRUCTURES = ROOT / "docs" / "structures.md"
# A path of ours in a document: a package, then folders and a module or a folder (trailing /).
_DOC_PATH = re.compile(r"(?<![\w/.])(?:engine|openai_compat|bench)(?:/[A-Za-z0-9_]+)*(?:\.py|/)")


def _doc_paths(text: str) -> set[str]:
    return set(_DOC_PATH.findall(text))


def _missing_paths(paths: set[str]) -> list[str]:
    return sorted(path for path in paths if not (ROOT / path).exists())


def _uncovered_modules(paths: set[str]) -> list[str]:
    """Our modules (and packages, as folders) the document does not name."""
    wanted = set()
    for path in MODULES.values():
        relative = path.relative_to(ROOT)
        wanted.add(f"{relative.parent}/" if relative.name == "__init__.py" else str(relative))
    return sorted(wanted - paths)


# The documents that describe the tree as it is (docs/benchmarks.md is a log: its runs name the
# paths of their day).
@pytest.mark.parametrize("document", ["docs/structures.md", "README.md", "docs/tools.md"])
def test_the_docs_name_only_paths_that_exist(document: str) -> None:
    paths = _doc_paths((ROOT / document).read_text())
    assert paths  # the pattern reads the document's paths
    assert not _missing_paths(paths), f"{document} names missing paths: {_missing_paths(paths)}"


def test_structures_covers_every_module() -> None:
    uncovered = _uncovered_modules(_doc_paths(STRUCTURES.read_text()))
    assert not uncovered, f"docs/structures.md does not name: {uncovered}"


def test_the_doc_checks_catch_a_stale_path_and_a_missing_module() -> None:
    text = "`engine/worker.py`, `engine/router/`, engine/router/seq.py; not engine.router.seq, tests/engine/x.py"
    paths = _doc_paths(text)
    assert paths == {"engine/worker.py", "engine/router/", "engine/router/seq.py"}
    assert _missing_paths(paths) == ["engine/worker.py"]
    uncovered = _uncovered_modules(paths)
    assert "engine/router/scheduler.py" in uncovered and "engine/router/seq.py" not in uncovered
    assert "engine/router/" not in uncovered and "engine/worker/" in uncovered
