"""The exercises as the notebooks hold them: statement, solution and checker cells, read from the JSON."""

import ast
import linecache
import math
from pathlib import Path

import nbformat
import torch
import torch.nn.functional as F

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


ROLES = {
    "build": ("statement", "solution", "checker"),
    "predict": ("statement", "prediction", "reveal"),
    "explain": ("statement", "answer"),
}


def exercise_cells() -> dict[str, dict[str, list]]:
    """exercise id -> {role: [cells]} over all notebooks (04b_serving too), with every role of :data:`ROLES`
    present (build: statement, solution, checker; predict: statement, prediction, reveal; explain: statement,
    answer). Every cell also appears under "notebook" as its file name."""
    found: dict[str, dict[str, list]] = {}
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]*_*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            course = cell.get("metadata", {}).get("course")
            if course:
                roles = found.setdefault(course["exercise"], {r: [] for rs in ROLES.values() for r in rs})
                roles.setdefault(course["role"], []).append(cell)
                roles.setdefault("notebook", []).append(path.name)
    return found


def cell_namespace(exercise: str) -> dict:
    """What a notebook's earlier cells give an exercise's cells: torch, math, F, IGNORE, and for chapter 09
    Triton (imported after course_lib.kernels, which switches its interpreter on without a GPU)."""
    from course_lib.recall import IGNORE

    namespace = {"torch": torch, "math": math, "F": F, "IGNORE": IGNORE}
    if exercise.startswith("9."):
        # ruff: noqa: I001 - course_lib.kernels first: it switches the interpreter on before Triton loads
        import course_lib.kernels as kernels

        import triton
        import triton.language as tl

        namespace.update(kernels=kernels, triton=triton, tl=tl)
    return namespace


def run_cell(source: str, namespace: dict, name: str) -> None:
    """Execute a cell's source under a file name whose lines ``inspect.getsource`` finds (as IPython does),
    which ``@triton.jit`` needs."""
    filename = f"<cell {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), namespace)


def solution_functions(exercise: str, cells=None):
    """The reader's function(s) of ``exercise``, defined from the notebook's solution cell, in the order the
    checker cell passes them."""
    cells = cells or exercise_cells()[exercise]
    namespace = cell_namespace(exercise)
    run_cell(cells["solution"][0].source, namespace, f"solution {exercise}")
    call = ast.parse(cells["checker"][0].source).body[-1].value
    return tuple(namespace[arg.id] for arg in call.args)
