"""Figures for explorers that stay whole when widget callbacks run in threads.

JupyterLab 4.6 with ipykernel 7 runs a widget's callback in a kernel *subshell* (another thread)
once one is set up, and in the main thread before: two callbacks can run at the same time.
pyplot's figures are global, so ``plt.show()`` in one callback also shows the other's figure, and
two threads drawing one figure overwrite each other's pixels: chapter 04's paged-cache explorer
came back blank (an all-white image of the right size) after a control moved. A ``Figure`` made
directly, outside pyplot, belongs to one callback only, and ``show`` displays just that figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from ..viz import STYLE

__all__ = ["new_figure", "show"]


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure in the course style that pyplot does not track (create its axes inside
    ``plt.rc_context(STYLE)`` too: fonts and colours are read when an artist is made)."""
    with plt.rc_context(STYLE):
        return Figure(figsize=figsize)


def show(figure: Figure) -> None:
    """Display ``figure`` (only it) in the current output: the explorer's Output widget."""
    from IPython.display import display

    display(figure)
