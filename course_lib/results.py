"""Stored benchmark results: where they live and how to read them back.

``results/`` (beside ``course_lib/`` in the repository) holds the JSON files that
``python -m course_lib.bench SUITE --json ...`` wrote: the run's measurements, the environment
they came from and the suite's shape. Chapter 08's widgets, figures and notebook read them here.

Mechanisms are named as in the catalogue (:mod:`course_lib.catalogue`). Files written before it
used other names in chapter 08's ``"phase:mechanism"`` methods ("naive", "flash", "window",
"linear", "delta_rule", "ssd"); :func:`load_payload` renames them (:data:`RENAMED`), values untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

from .measure import Measurement

__all__ = ["RESULTS_DIR", "RENAMED", "catalogue_names", "load_payload", "load_results"]

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
DEFAULT = "all_small.json"


def _path(path: str | Path | None) -> Path:
    if path is None:
        return RESULTS_DIR / DEFAULT
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    return Path(path)


# The names of chapter 08's first comparison, before the catalogue, and the catalogue's names.
RENAMED = {
    "naive": "attention",
    "flash": "flash_attention",
    "window": "sliding_window",
    "linear": "linear_attention",
    "delta_rule": "deltanet",
    "ssd": "mamba2",
}


def _renamed(method: str) -> str:
    phase, colon, mechanism = method.rpartition(":")
    return f"{phase}{colon}{RENAMED.get(mechanism, mechanism)}"


def catalogue_names(payload: dict) -> dict:
    """A copy of ``payload`` with the old mechanism names of :data:`RENAMED` replaced by the
    catalogue's, in each result's ``method`` (``"phase:mechanism"`` or a bare mechanism) and its
    ``extra["mechanism"]``. Every other key and every value are kept as they are; a payload of
    another study (without ``results``) is returned as it is."""
    if "results" not in payload:
        return payload
    results = []
    for r in payload["results"]:
        r = {**r, "method": _renamed(r["method"])}
        if "mechanism" in r.get("extra", {}):
            r["extra"] = {
                **r["extra"],
                "mechanism": RENAMED.get(r["extra"]["mechanism"], r["extra"]["mechanism"]),
            }
        results.append(r)
    return {**payload, "results": results}


def load_payload(path: str | Path | None = None) -> dict:
    """The whole JSON file (``suite``, ``environment``, ``shape`` when stored, ``results``)
    written by ``python -m course_lib.bench ... --json`` (default: ``results/all_small.json``), with
    the mechanisms under their catalogue names (:func:`catalogue_names`)."""
    return catalogue_names(json.loads(_path(path).read_text()))


def load_results(path: str | Path | None = None) -> list[Measurement]:
    """The measurements of a JSON file written by ``python -m course_lib.bench ... --json``
    (default: ``results/all_small.json``)."""
    return [Measurement(**r) for r in load_payload(path)["results"]]
