"""The exercises as the notebooks hold them: statement, solution and checker cells, read from the JSON."""

import ast
import math
from pathlib import Path

import nbformat
import torch
import torch.nn.functional as F

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def exercise_cells() -> dict[str, dict[str, list]]:
    """exercise id -> {role: [cells]} over all notebooks: "statement", "solution" and "checker" for a build
    exercise, "statement", "prediction" and "reveal" for a predict one, "statement" and "answer" for an
    explain one."""
    found: dict[str, dict[str, list]] = {}
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            course = cell.get("metadata", {}).get("course")
            if course:
                roles = found.setdefault(course["exercise"], {"statement": [], "solution": [], "checker": []})
                roles.setdefault(course["role"], []).append(cell)
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
