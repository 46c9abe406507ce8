"""Checkers for the notebooks' exercises, one module per chapter.

A checker runs the reader's function on several cases against the library (or an independent
formula), prints one line when everything matches, and raises :class:`ExerciseFailed` saying
which case differed and how, so a failing exercise stops the notebook where it went wrong.
"""

from .common import ExerciseFailed, compare, run_cases

__all__ = ["ExerciseFailed", "compare", "run_cases"]
