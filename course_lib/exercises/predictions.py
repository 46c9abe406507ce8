"""*Predict* exercises: the learner writes a number or a choice down before the next cell reveals it.

The first answer counts. :func:`predict` records it (in memory and in a small JSON file beside the
notebook, so a restarted kernel still knows it) and says so; a later, different answer is recorded as a
change, shown to the learner at the reveal and kept for the grader. :func:`reveal` compares the first
answer with the measured or computed value and says how close it was and why::

    slope = None   # your prediction: the log-log slope of naive attention's memory in T
    predict("1.5", slope)
    ...            # the next cell measures it
    reveal("1.5", measured_slope, tolerance=0.25, why="the score matrix is T x T")

Predict exercises carry no points by default (feedback only); TEACHING.md says how to grade them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import GRADE_LOG_ENV

__all__ = ["predict", "reveal", "Prediction", "PREDICTIONS", "PREDICTIONS_FILE"]

PREDICTIONS_FILE = ".course_predictions.json"


@dataclass
class Prediction:
    exercise: str
    first: object
    first_time: float
    changes: list = field(default_factory=list)  # later, different answers: (time, value)
    revealed: bool = False


PREDICTIONS: dict[str, Prediction] = {}


def _path() -> Path:
    return Path(os.environ.get("COURSE_LIB_PREDICTIONS", PREDICTIONS_FILE))


def _load() -> None:
    path = _path()
    if PREDICTIONS or not path.exists():
        return
    try:
        for key, value in json.loads(path.read_text(encoding="utf-8")).items():
            PREDICTIONS[key] = Prediction(**value)
    except (OSError, ValueError, TypeError):  # a damaged file only loses earlier predictions
        pass


def _save() -> None:
    try:
        _path().write_text(
            json.dumps({k: asdict(v) for k, v in PREDICTIONS.items()}, indent=1), encoding="utf-8"
        )
    except (OSError, TypeError):  # read-only folder, or an answer JSON cannot hold: memory still has it
        pass


def _log(event: str, prediction: Prediction, value: object, **extra) -> None:
    log = os.environ.get(GRADE_LOG_ENV)
    if log:
        record = {
            "exercise": prediction.exercise,
            "kind": "predict",
            "event": event,
            "value": value,
            "first": prediction.first,
            "changes": len(prediction.changes),
            **extra,
        }
        with open(log, "a", encoding="utf-8") as file:
            file.write(json.dumps(record, default=repr) + "\n")


def predict(exercise: str, value: object) -> None:
    """Record ``value`` as the prediction for ``exercise`` (the first one counts)."""
    _load()
    if value is None:
        print(
            f"Exercise {exercise}: write your prediction in the variable above (it is still None), then run "
            "this cell again."
        )
        return
    existing = PREDICTIONS.get(exercise)
    if existing is None:
        PREDICTIONS[exercise] = Prediction(exercise, value, time.time())
        print(
            f"Exercise {exercise}: prediction {value!r} recorded. Run the next cell to see how close it is."
        )
        _log("predicted", PREDICTIONS[exercise], value)
    elif value != existing.first and (not existing.changes or existing.changes[-1][1] != value):
        existing.changes.append((time.time(), value))
        note = " after the reveal" if existing.revealed else ""
        print(
            f"Exercise {exercise}: your first prediction was {existing.first!r}; the change to {value!r}"
            f"{note} is recorded too, and the first one still counts.",
            file=sys.stderr,
        )
        _log("changed", existing, value, after_reveal=existing.revealed)
    else:
        print(f"Exercise {exercise}: prediction {existing.first!r} already recorded.")
    _save()


def reveal(
    exercise: str, actual: object, *, tolerance: float | None = None, relative: bool = False, why: str = ""
) -> bool | None:
    """Compare the first prediction of ``exercise`` with ``actual``; say how close and why. Returns whether
    it was within ``tolerance`` (equal, for a choice), or None when nothing was predicted."""
    _load()
    prediction = PREDICTIONS.get(exercise)
    explanation = f" {why}" if why else ""
    if prediction is None:
        print(
            f"Exercise {exercise}: the answer is {actual!r}.{explanation} (No prediction was recorded first.)"
        )
        return None
    first = prediction.first
    if isinstance(actual, (int, float)) and isinstance(first, (int, float)) and not isinstance(first, bool):
        difference = float(first) - float(actual)
        scale = abs(float(actual)) if relative and actual else 1.0
        good = tolerance is None or abs(difference) / scale <= tolerance
        how = f"off by {difference:+.3g}" + (f" ({difference / float(actual):+.0%})" if actual else "")
        if math.isclose(float(first), float(actual), rel_tol=1e-9, abs_tol=1e-12):
            how = "exactly right"
    else:
        good = first == actual
        how = "right" if good else "not it"
    changed = f" (you changed it {len(prediction.changes)} time(s) afterwards)" if prediction.changes else ""
    verdict = "✔" if good else "✘"
    print(
        f"{verdict} Exercise {exercise}: you predicted {first!r}{changed}; the answer is {actual!r}: {how}."
        f"{explanation}"
    )
    prediction.revealed = True
    _log("revealed", prediction, actual, within_tolerance=good)
    _save()
    return good
