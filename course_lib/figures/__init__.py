"""Regenerate the course's static figures in ``figures/`` from the library's own computations.

    python -m course_lib.figures                 # all figures into figures/
    python -m course_lib.figures --out /tmp/f --only 01_task_masks

Each chapter has a module here (``ch01.py``, ...) with a ``FIGURES`` dict: a name and a function that
draws the figure and returns it. Files are SVG with a fixed hash salt and no date, so a regeneration
changes a file only when the figure changes.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from ..viz import STYLE

__all__ = ["FIGURES", "regenerate", "main"]


def _collect_figures() -> dict[str, Callable[[], Figure]]:
    """Merge the ``FIGURES`` of every chapter module in this package, in chapter order."""
    figures: dict[str, Callable[[], Figure]] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name.startswith("ch"):
            module = importlib.import_module(f"{__name__}.{module_info.name}")
            figures.update(module.FIGURES)
    return figures


FIGURES = _collect_figures()


def regenerate(out: str | Path = "figures", only: Sequence[str] | None = None) -> list[Path]:
    """Draw the figures (all, or those named in ``only``) and write them as SVG into ``out``."""
    names = list(FIGURES) if only is None else list(only)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"only names unknown figures {unknown}; known: {', '.join(FIGURES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        figure = FIGURES[name]()
        path = out / f"{name}.svg"
        with plt.rc_context(STYLE):
            figure.savefig(path, bbox_inches="tight", metadata={"Date": None})
        plt.close(figure)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.figures", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="figures")
    parser.add_argument("--only", nargs="+", help="names of figures to draw (default: all)")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")  # figures are files; never open a window
    written = regenerate(args.out, args.only)
    print(f"wrote {len(written)} figures to {args.out}/")
    return written
