"""The floors of course_lib point down, and no module imports itself back through others.

Read from the source with ``ast`` (nothing is imported), including imports inside functions, so
a lazy import counts as much as one at the top. Each module belongs to a floor:

    ground      checks, environment, measure, viz
    algorithms  standard, hardware, tiling/, kv_cache/, sparse/, linear, recurrent/, specialized/, decoding,
                mixers, relative_positions
    catalogue   catalogue/
    studies     models/, recall, results, studies/, serving/
    leaves      widgets/, figures/, exercises/, benchmarks/, bench, student, grade, kernels/

and may import only from its own floor or below. The entry points among the leaves (widgets,
figures, benchmarks and the bench command) are imported by no module outside their own package
(the bench command finds the benchmark suites). The package root ``course_lib/__init__.py`` only
re-exports: it is exempt, and no module may import it. Imports under ``if TYPE_CHECKING:`` never
run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "course_lib"
ROOT = "course_lib"

FLOORS = {
    "ground": ("checks", "environment", "measure", "viz"),
    "algorithms": (
        "standard",
        "hardware",
        "tiling",
        "kv_cache",
        "sparse",
        "linear",
        "recurrent",
        "specialized",
        "decoding",
        "mixers",
        "relative_positions",
    ),
    "catalogue": ("catalogue",),
    "studies": ("models", "recall", "results", "studies", "serving"),
    "leaves": (
        "widgets",
        "figures",
        "exercises",
        "benchmarks",
        "bench",
        "student",
        "grade",
        "kernels",
        "notebooks",
    ),
}
LEVEL = {name: level for level, names in enumerate(FLOORS.values()) for name in names}
FLOOR_NAMES = list(FLOORS)

# Entry points: imported by nothing outside their own package, except these (importer, imported) pairs.
ENTRY_POINTS = ("widgets", "figures", "benchmarks", "bench")
ALLOWED_ENTRY_IMPORTS = {
    ("bench", "benchmarks"),  # the command line finds and runs the suites
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    return skipped


def imports_of(name: str) -> set[str]:
    """The course_lib modules ``name`` imports (a ``from X import y`` counts X.y when it is a module)."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    skipped = _type_checking_only(tree)
    package = name if is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == ROOT}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(
                    parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else [])
                )
            else:
                base = node.module or ""
            if base.split(".")[0] != ROOT:
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    for target in found:
        assert target in MODULES, f"{name} imports {target}, which is not a module of course_lib"
    return found - {name}


GRAPH = {name: imports_of(name) for name in MODULES if name != ROOT}


def top(name: str) -> str:
    return name.split(".")[1] if name != ROOT else ROOT


def floor_of(name: str) -> int:
    if name == ROOT:
        return len(FLOORS)  # above every floor: importing the root pulls in everything
    assert top(name) in LEVEL, f"{name} belongs to no floor: add it to FLOORS in {__file__}"
    return LEVEL[top(name)]


def test_every_module_has_a_floor():
    for name in GRAPH:
        floor_of(name)


def test_imports_point_down():
    upward = [
        f"{name} ({FLOOR_NAMES[floor_of(name)]}) imports {target} "
        f"({'the package root' if target == ROOT else FLOOR_NAMES[floor_of(target)]})"
        for name, targets in GRAPH.items()
        for target in sorted(targets)
        if floor_of(target) > floor_of(name)
    ]
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_entry_points_are_imported_by_no_other_module():
    wrong = []
    for name, targets in GRAPH.items():
        for target in sorted(targets):
            if top(target) not in ENTRY_POINTS or top(target) == top(name):
                continue
            if (top(name), top(target)) in ALLOWED_ENTRY_IMPORTS:
                continue
            wrong.append(f"{name} imports {target}")
    assert not wrong, "widgets, figures, benchmarks and bench are imported by nothing else:\n" + "\n".join(
        wrong
    )


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
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
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "modules that import each other (directly or through others):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


def test_the_reader_sees_lazy_and_relative_imports():
    # The checks above are only as good as this reader: a function-level relative import, an
    # absolute one and `from . import module` must all be found.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert "course_lib.viz" in GRAPH["course_lib.figures"]
    assert "course_lib.checks" in GRAPH["course_lib.standard"]


@pytest.mark.parametrize("name", ["course_lib.models", "course_lib.specialized.ring"])
def test_split_modules_stay_below_600_lines(name):
    # models and ring were split by job; each piece stays short enough to read in one sitting.
    folder = MODULES[name].parent
    assert MODULES[name].name == "__init__.py", f"{name} is a package of modules, one per job"
    for path in folder.glob("*.py"):
        assert len(path.read_text().splitlines()) < 600, f"{path} has grown past 600 lines"
