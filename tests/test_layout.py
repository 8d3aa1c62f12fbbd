"""The package's shape: one installed import name, rooms that import only downwards, and no import cycles.

The import graph is read from the source with `ast` (every import statement, including those inside functions and
`if TYPE_CHECKING:` blocks, since a cycle hidden in a function is still a cycle in the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

CHECKOUT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"seqrank.serving": CHECKOUT / "serving", "seqrank.training": CHECKOUT / "training"}
GENERATED = CHECKOUT / "serving" / "generated"
# (importer prefix, forbidden import prefix, why)
FORBIDDEN = (
    ("seqrank.training", "seqrank.serving", "training is offline and never imports serving"),
    ("seqrank.serving", "seqrank.serving.cli", "library code never imports the CLI"),
    ("seqrank.serving.history", "seqrank.serving.client", "the stores are runtime code, the client is for callers"),
)
RUNTIME_EXEMPT = ("seqrank.serving.cli", "seqrank.serving.ops", "seqrank.serving.bench", "seqrank.serving.client")


def within(name: str, prefixes: str | tuple[str, ...]) -> bool:
    """Whether dotted `name` is one of `prefixes` or inside one (seqrank.serving.client is not in ...cli)."""
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def module_files(package_dirs: dict[str, Path] = PACKAGE_DIRS) -> dict[str, Path]:
    """Maps each module's dotted name to its file, for the package folders (generated code excluded)."""
    modules = {}
    for package, folder in package_dirs.items():
        for path in folder.rglob("*.py"):
            if GENERATED in path.parents or "__pycache__" in path.parts:
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name an import statement in `path` names: `import a.b` gives a.b, `from a import b, c` gives
    a.b and a.c (relative imports resolved against `module`)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports: each imported name's longest prefix that is a project module."""
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(path, module):
            parts = name.split(".")
            prefixes = (".".join(parts[:end]) for end in range(len(parts), 0, -1))
            target = next((prefix for prefix in prefixes if prefix in modules), None)
            if target is not None and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), each as one cycle
    path a -> b -> ... -> a, found with Tarjan's algorithm."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [cycle_path(graph, component) for component in components]


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle through the component's first module (breadth-first, shortest)."""
    start, members = component[0], set(component)
    previous = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph[node] & members):
            if target == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if target not in previous:
                previous[target] = node
                queue.append(target)
    return [start, start]


def test_no_import_cycles():
    cycles = find_cycles(import_graph(module_files()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_finder_names_a_planted_cycle(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from seqrank.x import b\n")
    (package / "b.py").write_text("def f():\n    from seqrank.x.sub import c\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("from seqrank.x.a import thing\nimport seqrank.x.d\n")
    (package / "d.py").write_text("import os\n")
    cycles = find_cycles(import_graph(module_files({"seqrank.x": package})))
    assert cycles == [["seqrank.x.a", "seqrank.x.b", "seqrank.x.sub.c", "seqrank.x.a"]]


@pytest.mark.parametrize("importer, forbidden, why", FORBIDDEN)
def test_rooms_import_only_what_their_audience_needs(importer, forbidden, why):
    graph = import_graph(module_files())
    offenders = sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                       if within(module, importer) and not within(module, forbidden) and within(target, forbidden))
    assert not offenders, f"{why}: {offenders}"


def test_the_runtime_never_imports_tooling():
    # What a Serve replica runs (the flat serving modules and the history stores) must not pull in the CLI,
    # operations tooling, benchmarks or the client library.
    graph = import_graph(module_files())
    offenders = sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                       if within(module, "seqrank.serving") and not within(module, RUNTIME_EXEMPT)
                       and within(target, RUNTIME_EXEMPT))
    assert not offenders, offenders


def test_no_module_uses_the_folder_names_as_import_names():
    # `serving` and `training` are folders; the installed names are seqrank.serving and seqrank.training.
    modules = {**module_files(), **{f"tests.{p.stem}": p for p in (CHECKOUT / "tests").rglob("*.py")},
               **{f"scripts.{p.stem}": p for p in (CHECKOUT / "scripts").rglob("*.py")}}
    offenders = sorted(f"{path.relative_to(CHECKOUT)}: {name}" for module, path in modules.items()
                       for name in imported_names(path, module) if name.split(".")[0] in {"serving", "training"})
    assert not offenders, offenders


def test_every_package_folder_is_installed_under_seqrank():
    config = tomllib.loads((CHECKOUT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {"seqrank.v1"} | {name for name, path in module_files().items() if path.name == "__init__.py"}
    assert listed == on_disk
    assert {name.split(".")[0] for name in listed} == {"seqrank"}
