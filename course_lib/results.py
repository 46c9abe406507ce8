"""Stored benchmark results: where they live and how to read them back.

``results/`` (beside ``course_lib/`` in the repository) holds the JSON files that
``python -m course_lib.bench SUITE --json ...`` wrote: the run's measurements, the environment
they came from and the suite's shape. Chapter 08's widgets, figures and notebook read them here.
"""

from __future__ import annotations

import json
from pathlib import Path

from .measure import Measurement

__all__ = ["RESULTS_DIR", "load_payload", "load_results"]

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
DEFAULT = "all_small.json"


def _path(path: str | Path | None) -> Path:
    if path is None:
        return RESULTS_DIR / DEFAULT
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    return Path(path)


def load_payload(path: str | Path | None = None) -> dict:
    """The whole JSON file (``suite``, ``environment``, ``shape`` when stored, ``results``)
    written by ``python -m course_lib.bench ... --json`` (default: ``results/all_small.json``)."""
    return json.loads(_path(path).read_text())


def load_results(path: str | Path | None = None) -> list[Measurement]:
    """The measurements of a JSON file written by ``python -m course_lib.bench ... --json``
    (default: ``results/all_small.json``)."""
    return [Measurement(**r) for r in load_payload(path)["results"]]
