"""Chapter 08's figures: the four classes of efficient attention, the taxonomy, the measured comparison."""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from .. import catalogue
from ..results import load_results
from ..studies.phases import decode_tradeoff, phase_comparison
from ..viz import STYLE

__all__ = [
    "FIGURES",
    "CLASSES",
    "TAXONOMY",
    "four_classes",
    "taxonomy",
    "phase_comparison",
    "complexity",
    "decode_tradeoff_figure",
]

# The four classes of efficient attention are the catalogue's families between the exact baseline
# and the specialised variants. What each changes, its compute, its extra memory and whether it is
# exact are the chapter's summary of the family; the chapters come from the catalogue's entries.
_CLASS_SUMMARY = {
    "hardware-efficient": ("same math, fewer HBM bytes (tiling, fusion)", "O(T^2 d)", "O(T)", "exact"),
    "compact": ("smaller KV cache (shared KV heads, a latent)", "O(T^2 d)", "KV / g", "exact*"),
    "sparse": ("fewer query-key pairs (window, blocks, top-k)", "O(T w d)", "O(T w)", "approx."),
    "linear": ("a fixed-size state (instead of a KV cache)", "O(T d^2)", "O(d^2)", "approx."),
}


def _chapters(family: str) -> str:
    chapters = sorted({m.chapter for m in catalogue.mechanisms(family=family)})
    first, last = f"{chapters[0]:02d}", f"{chapters[-1]:02d}"
    return first if first == last else f"{first}-{last}"


def _classes() -> dict[str, tuple[str, str, str, str, str]]:
    """class -> (what it changes, compute, extra memory, exact?, chapters), in the catalogue's order."""
    return {
        family: (*_CLASS_SUMMARY[family], _chapters(family))
        for family in catalogue.FAMILIES
        if family in _CLASS_SUMMARY
    }


def _taxonomy() -> dict[str, list[str]]:
    """family -> the titles of its mechanisms, for every family but the exact baseline."""
    return {
        family: [m.title for m in catalogue.mechanisms(family=family)]
        for family in catalogue.FAMILIES
        if family != "exact"
    }


# class -> (what it changes, compute, extra memory, exact?, chapters)
CLASSES = _classes()
# family -> titles of the catalogue's mechanisms
TAXONOMY = _taxonomy()
_COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00"]


def four_classes() -> Figure:
    """Four boxes: what each class changes, its compute, its extra memory, exactness, chapter."""
    with plt.rc_context(STYLE):
        figure, ax = plt.subplots(figsize=(10, 3.2))
        ax.set_axis_off()
        ax.set_xlim(0, 4)
        ax.set_ylim(0, 1)
        for i, (name, (what, compute, memory, exact, chapter)) in enumerate(_classes().items()):
            ax.add_patch(
                FancyBboxPatch(
                    (i + 0.05, 0.05), 0.9, 0.9, boxstyle="round,pad=0.02", facecolor=_COLORS[i], alpha=0.15
                )
            )
            ax.text(i + 0.5, 0.85, name, ha="center", fontsize=11, weight="bold", color=_COLORS[i])
            ax.text(i + 0.5, 0.62, what.replace(" (", "\n("), ha="center", va="center", fontsize=8.5)
            ax.text(
                i + 0.5,
                0.36,
                f"compute {compute}\nextra memory {memory}",
                ha="center",
                va="center",
                fontsize=9,
            )
            ax.text(i + 0.5, 0.14, f"{exact} · chapter {chapter}", ha="center", fontsize=9)
        ax.set_title(
            "The four classes of efficient attention (* MQA/GQA change the model, then attend exactly)"
        )
    return figure


def _boxes(titles: list[str], most: int = 5) -> list[str]:
    """The titles in at most ``most`` boxes, consecutive ones sharing a box, each box's text wrapped."""
    count = min(len(titles), most)
    sizes = [len(titles) // count + (k < len(titles) % count) for k in range(count)]
    starts = [sum(sizes[:k]) for k in range(count)]
    return [
        textwrap.fill(", ".join(titles[start : start + size]), width=24, break_on_hyphens=False)
        for start, size in zip(starts, sizes)
    ]


def taxonomy() -> Figure:
    """The course's mechanisms (the catalogue's titles), grouped by class."""
    classes = _taxonomy()
    with plt.rc_context(STYLE):
        figure, ax = plt.subplots(figsize=(11, 4.4))
        ax.set_axis_off()
        n = len(classes)
        ax.set_xlim(0, n)
        ax.set_ylim(0, 6.5)
        for i, (name, methods) in enumerate(classes.items()):
            ax.text(i + 0.5, 6.0, name, ha="center", weight="bold", color=_COLORS[i])
            for j, text in enumerate(_boxes(methods)):
                ax.add_patch(
                    FancyBboxPatch(
                        (i + 0.08, 4.8 - j * 1.1),
                        0.84,
                        0.8,
                        boxstyle="round,pad=0.02",
                        facecolor=_COLORS[i],
                        alpha=0.15,
                    )
                )
                lines = text.count("\n") + 1
                size = 8.5 if lines == 1 else 7.5 if lines == 2 else 6.5  # a long box in smaller type
                ax.text(i + 0.5, 5.2 - j * 1.1, text, ha="center", va="center", fontsize=size)
        ax.set_title("Taxonomy of the mechanisms in this course")
    return figure


def complexity(path=None) -> Figure:
    """:func:`~course_lib.studies.phases.phase_comparison` of the stored ``results/all_small.json``
    (or the file at ``path``)."""
    return phase_comparison(load_results(path))


def decode_tradeoff_figure(path=None) -> Figure:
    """:func:`~course_lib.studies.phases.decode_tradeoff` of the stored ``results/all_small.json``
    (or the file at ``path``): state kept against the time of one decoding step, at the longest context."""
    return decode_tradeoff(load_results(path))


FIGURES: dict[str, Callable[[], Figure]] = {
    "08_four_classes": four_classes,
    "08_taxonomy": taxonomy,
    "08_complexity": complexity,
    "08_decode_tradeoff": decode_tradeoff_figure,
}
