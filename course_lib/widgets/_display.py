"""What every explorer shares on screen: figures that stay whole, labels that are not cut.

``new_figure`` and ``show`` live in :mod:`course_lib.viz` (the studies draw with them too).

JupyterLab 4.6 with ipykernel 7 runs a widget's callback in a kernel *subshell* (another thread)
once one is set up, and in the main thread before: two callbacks can run at the same time.
pyplot's figures are global, so ``plt.show()`` in one callback also shows the other's figure, and
two threads drawing one figure overwrite each other's pixels: chapter 04's paged-cache explorer
came back blank (an all-white image of the right size) after a control moved. A ``Figure`` made
directly, outside pyplot, belongs to one callback only, and ``show`` displays just that figure.
"""

from __future__ import annotations

import textwrap

import ipywidgets as widgets
from ipywidgets.widgets.widget_description import DescriptionWidget

from ..viz import new_figure, show  # drawn on figures pyplot does not track (see viz)

__all__ = ["new_figure", "show", "LABEL_WIDTH", "widen_labels", "TEXT_WIDTH", "wrap_line"]


# ipywidgets gives every description 80 px and cuts longer ones with an ellipsis ("temperat…").
LABEL_WIDTH = "110px"


def widen_labels(widget: widgets.Widget, width: str = LABEL_WIDTH) -> widgets.Widget:
    """Give the description of every control inside ``widget`` ``width`` (the same for all, so the
    controls stay aligned) and return ``widget``. Checkboxes keep theirs: their label sits beside
    the box and is never cut."""
    stack = [widget]
    while stack:
        item = stack.pop()
        stack.extend(getattr(item, "children", ()))
        style = getattr(item, "style", None)
        if (
            isinstance(item, DescriptionWidget)
            and not isinstance(item, widgets.Checkbox)
            and hasattr(style, "description_width")
        ):
            style.description_width = width
    return widget


# Printed lines longer than the output area wrap in the browser at any character, in the middle of
# a number; the explorers break their lines at spaces themselves.
TEXT_WIDTH = 88


def wrap_line(line: str, width: int = TEXT_WIDTH) -> str:
    """``line`` broken at spaces into lines of at most ``width`` characters (when no single word
    is longer), continuation lines indented two spaces past the first."""
    indent = " " * (len(line) - len(line.lstrip()) + 2)
    return textwrap.fill(
        line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )
