"""Exercises of the course: checkers that cannot be fooled, predictions, and the list of every exercise.

Each chapter has a module ``chNN`` of checkers. A checker runs the reader's function on fresh random
cases (seeded; the seed is printed when a case fails, to replay it), with the course's own
implementations and PyTorch's whole-task shortcuts out of reach (:mod:`.guard`). It prints one line
when everything passes and explains a failure from the actual difference; "not implemented yet" is a
single line, and nothing stops Run All. :func:`use_mine_or_library` lets later cells use the reader's
function once it passes and the library's until then. :mod:`.predictions` holds the *predict* exercises'
helpers (the first answer counts). :func:`iter_exercises` lists every exercise (id, kind, points).
"""

from .common import (
    EXERCISES,
    RESULTS,
    Case,
    Draw,
    Exercise,
    ExerciseFailed,
    Mismatch,
    Outcome,
    checker,
    compare,
    compare_exact,
    compare_number,
    declare,
    use_mine_or_library,
)
from .guard import Refused, Rules
from .predictions import predict, reveal


def iter_exercises():
    """Every exercise of the course, chapter by chapter (imports every chapter's checkers on first use)."""
    from .catalog import iter_exercises as every_exercise

    return every_exercise()


__all__ = [
    "EXERCISES",
    "RESULTS",
    "Case",
    "Draw",
    "Exercise",
    "ExerciseFailed",
    "Mismatch",
    "Outcome",
    "Refused",
    "Rules",
    "checker",
    "compare",
    "compare_exact",
    "compare_number",
    "declare",
    "iter_exercises",
    "predict",
    "reveal",
    "use_mine_or_library",
]
