"""The exercises as the notebooks hold them: statement, solution and checker cells, read from the JSON."""

import ast
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


def solution_functions(exercise: str, cells=None):
    """The reader's function(s) of ``exercise``, defined from the notebook's solution cell, in the order the
    checker cell passes them."""
    from course_lib.recall import IGNORE

    cells = cells or exercise_cells()[exercise]
    namespace = {"torch": torch, "math": math, "F": F, "IGNORE": IGNORE}
    exec(compile(cells["solution"][0].source, f"<solution {exercise}>", "exec"), namespace)
    call = ast.parse(cells["checker"][0].source).body[-1].value
    return tuple(namespace[arg.id] for arg in call.args)
