"""Chapter 08's figures: the four classes of efficient attention, the taxonomy, the measured comparison."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from ..bench import Measurement, loglog_slope
from ..benchmarks.ch08 import PHASES, mechanism_of, phase_of
from ..viz import STYLE
from ..widgets.ch08 import RESULTS_DIR, load_results

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


_PHASE_TITLES = {
    "train": "train (forward + backward)",
    "prefill": "prefill (causal forward)",
    "decode": "decode (one step at context T)",
}


def phase_comparison(results: Sequence[Measurement]) -> Figure:
    """Measured time (top row) and peak memory (bottom row) vs T, one column per phase present,
    with each mechanism's fitted log-log slope of time in the legend."""
    phases = [p for p in PHASES if any(phase_of(r) == p for r in results)]
    if not phases:
        raise ValueError("results hold no measurement")
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(2, len(phases), figsize=(5 * len(phases), 7.5), squeeze=False)
        for column, phase in enumerate(phases):
            rows = [r for r in results if phase_of(r) == phase]
            top, bottom = axes[0, column], axes[1, column]
            for name in dict.fromkeys(mechanism_of(r) for r in rows):
                points = sorted((r.T, r.seconds, r.peak_bytes) for r in rows if mechanism_of(r) == name)
                Ts = [p[0] for p in points]
                slope = loglog_slope(Ts, [p[1] for p in points]) if len(points) > 1 else float("nan")
                top.plot(Ts, [p[1] * 1e3 for p in points], marker="o", label=f"{name} ({slope:.2f})")
                memory = [(p[0], p[2]) for p in points if p[2]]
                bottom.plot([t for t, _ in memory], [b / 2**20 for _, b in memory], marker="o", label=name)
            top.set_title(f"{_PHASE_TITLES[phase]}: time")
            bottom.set_title(f"{_PHASE_TITLES[phase]}: peak memory")
            top.legend(frameon=False, fontsize=9, title="log-log slope", title_fontsize=9)
            for ax, label in ((top, "time per call (ms)"), (bottom, "peak memory (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("sequence length / context T")
                ax.set_ylabel(label)
                ax.grid(True, alpha=0.3)
        figure.tight_layout()
    return figure


def complexity(path=None) -> Figure:
    """:func:`phase_comparison` of the stored ``results/all_small.json`` (or the file at ``path``)."""
    return phase_comparison(load_results(RESULTS_DIR / "all_small.json" if path is None else path))


FIGURES: dict[str, Callable[[], Figure]] = {
    "08_four_classes": four_classes,
    "08_taxonomy": taxonomy,
    "08_complexity": complexity,
}
