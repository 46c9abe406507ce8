"""Chapter 08's figures: the four classes of efficient attention, the taxonomy, the measured comparison,
the recall study.

The recall figures draw the stored summary of :mod:`course_lib.studies.recall_study` (or the summary
passed in); they are not in :data:`FIGURES`, whose files are committed, because that summary grows
while the study runs. Each raises ValueError when the summary holds nothing for it to draw."""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch, Patch

from .. import catalogue
from ..results import load_results
from ..studies import recall_study
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
    "recall_sweep_figure",
    "recall_final_figure",
    "recall_distance_figure",
    "recall_state_figure",
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


# --- the recall study ------------------------------------------------------------------------------

_STOP_COLORS = {"converged": "#009E73", "plateau": "#E69F00", "cap": "#D55E00"}


def _mixer_styles(mixers) -> dict[str, dict]:
    """One style per mixer, the same in every recall figure: ten colours, then dashed."""
    colours = plt.get_cmap("tab10").colors
    return {
        m: {"color": colours[i % 10], "linestyle": ("-", "--", ":")[i // 10 % 3], "marker": "o"}
        for i, m in enumerate(mixers)
    }


def _summary(summary: dict | None) -> dict:
    return recall_study.load_summary() if summary is None else summary


def recall_sweep_figure(summary: dict | None = None) -> Figure:
    """The learning-rate sweep at T = 64: per mixer, the best accuracy (a bar coloured by how the run
    stopped) with its learning rate and steps, and every learning rate tried (dots)."""
    rows = recall_study.sweep_best(_summary(summary))
    if not rows:
        raise ValueError("summary holds no learning-rate sweep")
    with plt.rc_context(STYLE):
        figure, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.8))
        y = list(range(len(rows)))[::-1]
        for row, at in zip(rows, y):
            ax.barh(at, row["accuracy"], color=_STOP_COLORS[row["stop"]], alpha=0.8, height=0.7)
            ax.scatter(list(row["tried"].values()), [at] * len(row["tried"]), color="black", s=8, zorder=3)
            ax.text(1.02, at, f"lr {row['lr']:g}, {row['steps']} steps", va="center", fontsize=9)
        handles = [Patch(color=colour, alpha=0.8, label=stop) for stop, colour in _STOP_COLORS.items()]
        handles.append(Line2D([], [], color="black", marker="o", markersize=3, linestyle="", label="each lr"))
        ax.axvline(recall_study.TARGET, color="grey", linestyle=":", linewidth=1)
        ax.set_yticks(y, [r["mixer"] for r in rows])
        ax.set_xlim(0, 1.32)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_xlabel("MQAR answer accuracy at T = 64 (4 pairs), best learning rate", labelpad=2)
        ax.set_title("learning-rate sweep: the best run per mixer and how it stopped")
        ax.legend(
            handles=handles, frameon=False, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4
        )
        figure.tight_layout()
    return figure


def recall_final_figure(summary: dict | None = None) -> Figure:
    """The final runs: accuracy against T per mixer (mean over seeds, bars from min to max), and
    accuracy against the decoding state at the longest length."""
    summary = _summary(summary)
    rows = recall_study.final_rows(summary)
    if not rows:
        raise ValueError("summary holds no final run")
    styles = _mixer_styles(recall_study.RECALL_MIXERS)
    lengths = sorted({T for r in rows for T in r["accuracy"]})
    with plt.rc_context(STYLE):
        figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
        for row in rows:
            style = styles.get(row["mixer"], {"marker": "o"})
            Ts = [T for T in lengths if T in row["accuracy"]]
            cells = [row["accuracy"][T] for T in Ts]
            mean = [c["mean"] for c in cells]
            spread = [[c["mean"] - c["min"] for c in cells], [c["max"] - c["mean"] for c in cells]]
            left.errorbar(Ts, mean, yerr=spread, capsize=3, label=row["mixer"], markersize=4, **style)
            last = row["accuracy"][Ts[-1]]
            right.scatter(last["state_bytes"], last["mean"], color=style.get("color"), s=30)
            right.annotate(
                row["mixer"],
                (last["state_bytes"], last["mean"]),
                fontsize=9,
                xytext=(4, 2),
                textcoords="offset points",
            )
        left.set_xscale("log", base=2)
        left.set_xticks(lengths, [str(T) for T in lengths])
        left.set_xlabel("sequence length T (num_pairs = T/16)")
        left.set_ylabel("MQAR answer accuracy")
        left.set_ylim(-0.02, 1.05)
        left.set_title("final runs: mean over seeds, bars min to max")
        left.legend(frameon=False, fontsize=9, loc="center left", bbox_to_anchor=(1.0, 0.5))
        right.set_xscale("log", base=2)
        right.set_ylim(-0.02, 1.05)
        right.set_xlabel(f"decoding state / KV cache per sequence at T = {lengths[-1]} (bytes)")
        right.set_ylabel("MQAR answer accuracy")
        right.set_title(f"recall vs state at T = {lengths[-1]}")
        figure.tight_layout()
    return figure


def recall_distance_figure(summary: dict | None = None) -> Figure:
    """Accuracy by key-query distance of the final runs, one panel per length (mean over seeds)."""
    found = recall_study.distance_rows(_summary(summary))
    if not found:
        raise ValueError("summary holds no accuracy by distance")
    styles = _mixer_styles(recall_study.RECALL_MIXERS)
    lengths = sorted({T for per_T in found.values() for T in per_T})
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths) + 2, 3.8), squeeze=False)
        for ax, T in zip(axes[0], lengths):
            for mixer, per_T in found.items():
                points = [(low, a) for low, _, a in per_T.get(T, []) if a is not None]
                if points:
                    ax.plot(*zip(*points), label=mixer, markersize=3, **styles.get(mixer, {"marker": "o"}))
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.05)
            ax.set_xlabel("key-query distance (bin start, tokens)")
            ax.set_title(f"T = {T} ({T // 16} pairs)")
        axes[0, 0].set_ylabel("answer accuracy")
        axes[0, -1].legend(frameon=False, fontsize=9, loc="center left", bbox_to_anchor=(1.0, 0.5))
        figure.tight_layout()
    return figure


def recall_state_figure(summary: dict | None = None) -> Figure:
    """The state sweep: accuracy against decoding-state bytes, one line per mixer (widths as points)."""
    rows = recall_study.state_rows(_summary(summary))
    if not rows:
        raise ValueError("summary holds no state sweep")
    styles = _mixer_styles(recall_study.RECALL_MIXERS)
    with plt.rc_context(STYLE):
        figure, ax = plt.subplots(figsize=(7, 4))
        for mixer in dict.fromkeys(r["mixer"] for r in rows):
            mine = [r for r in rows if r["mixer"] == mixer]
            ax.plot(
                [r["state_bytes"] for r in mine],
                [r["accuracy"] for r in mine],
                label=mixer,
                **styles.get(mixer, {"marker": "o"}),
            )
            for r in mine:
                ax.annotate(
                    f"d={r['d_model']}",
                    (r["state_bytes"], r["accuracy"]),
                    fontsize=9,
                    xytext=(3, -10),
                    textcoords="offset points",
                )
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel("decoding state per sequence (bytes)")
        ax.set_ylabel("MQAR answer accuracy")
        ax.set_title(f"state sweep at T = {rows[0]['T']}: recall tracks state bytes?")
        ax.legend(frameon=False, fontsize=9)
        figure.tight_layout()
    return figure


FIGURES: dict[str, Callable[[], Figure]] = {
    "08_four_classes": four_classes,
    "08_taxonomy": taxonomy,
    "08_complexity": complexity,
    "08_decode_tradeoff": decode_tradeoff_figure,
}
