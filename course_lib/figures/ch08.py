"""Chapter 08's figures: the four classes of efficient attention, the taxonomy, the measured comparison."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from ..results import load_results
from ..studies.phases import phase_comparison
from ..viz import STYLE

__all__ = ["FIGURES", "CLASSES", "TAXONOMY", "four_classes", "taxonomy", "phase_comparison", "complexity"]

# class -> (what it changes, compute, extra memory, exact?, chapter)
CLASSES = {
    "hardware-efficient": (
        "same math, fewer HBM bytes (tiling, fusion)",
        "O(T^2 d)",
        "O(T)",
        "exact",
        "02-03",
    ),
    "compact": ("smaller KV cache (MQA, GQA, MLA, quantised)", "O(T^2 d)", "KV / g", "exact*", "04"),
    "sparse": ("fewer query-key pairs (window, blocks, top-k)", "O(T w d)", "O(T w)", "approx.", "05"),
    "linear": ("a fixed-size state (instead of a KV cache)", "O(T d^2)", "O(d^2)", "approx.", "06-07"),
}

TAXONOMY = {
    "hardware-efficient": ["FlashAttention 1/2", "Flash-decoding", "SageAttention (int8)"],
    "compact": ["MQA", "GQA", "MLA", "paged KV cache"],
    "sparse": ["sliding window", "dilated / strided", "BigBird", "top-k, LSH", "H2O, StreamingLLM"],
    "linear": [
        "linear attn., Performer",
        "RetNet, GLA",
        "Mamba-2 (SSD), mLSTM",
        "DeltaNet, Gated DeltaNet",
        "TTT",
    ],
    "specialised": ["differential attn.", "SwitchHead", "ring attention", "hybrid stacks"],
}
_COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00"]


def four_classes() -> Figure:
    """Four boxes: what each class changes, its compute, its extra memory, exactness, chapter."""
    with plt.rc_context(STYLE):
        figure, ax = plt.subplots(figsize=(10, 3.2))
        ax.set_axis_off()
        ax.set_xlim(0, 4)
        ax.set_ylim(0, 1)
        for i, (name, (what, compute, memory, exact, chapter)) in enumerate(CLASSES.items()):
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


def taxonomy() -> Figure:
    """The course's methods, grouped by class."""
    with plt.rc_context(STYLE):
        figure, ax = plt.subplots(figsize=(11, 3.6))
        ax.set_axis_off()
        n = len(TAXONOMY)
        ax.set_xlim(0, n)
        ax.set_ylim(0, 6.5)
        for i, (name, methods) in enumerate(TAXONOMY.items()):
            ax.text(i + 0.5, 6.0, name, ha="center", weight="bold", color=_COLORS[i])
            for j, method in enumerate(methods):
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
                ax.text(i + 0.5, 5.2 - j * 1.1, method, ha="center", va="center", fontsize=8.5)
        ax.set_title("Taxonomy of the mechanisms in this course")
    return figure


def complexity(path=None) -> Figure:
    """:func:`~course_lib.studies.phases.phase_comparison` of the stored ``results/all_small.json``
    (or the file at ``path``)."""
    return phase_comparison(load_results(path))


FIGURES: dict[str, Callable[[], Figure]] = {
    "08_four_classes": four_classes,
    "08_taxonomy": taxonomy,
    "08_complexity": complexity,
}
