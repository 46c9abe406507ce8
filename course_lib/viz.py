"""Plotting conventions of the course, in one place: heatmaps, masks and scaling plots.

Every function draws on an ``ax`` (a new figure when none is given) and returns the axes, so a
notebook can combine panels and a test can inspect what was drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from .checks import check_tensor
from .measure import format_bytes, loglog_slope

__all__ = ["STYLE", "new_axes", "plot_attention", "plot_mask", "plot_scaling", "format_bytes"]

# Load the active backend now, outside any rc_context: if the inline backend is first loaded
# inside one, leaving the context turns interactive mode off and later figures never show.
plt.switch_backend(plt.get_backend())

# One look for the whole course: readable sizes, no top/right spines, a colour-blind safe cycle.
STYLE = {
    "figure.figsize": (5.0, 4.0),
    "figure.dpi": 100,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": plt.cycler(
        color=["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
    ),
    "svg.hashsalt": "efficient-attention-course",
}
WEIGHTS_CMAP = "viridis"
MASK_CMAP = ListedColormap(["#f2f2f2", "#0072B2"])


def new_axes(ax: Axes | None = None, figsize: tuple[float, float] | None = None) -> Axes:
    """Return ``ax``, or the axes of a new figure drawn in the course style."""
    if ax is not None:
        return ax
    with plt.rc_context(STYLE):
        _, ax = plt.subplots(figsize=figsize or STYLE["figure.figsize"])
    return ax


def _as_matrix(x: torch.Tensor, name: str) -> torch.Tensor:
    check_tensor(x, name)
    x = x.detach().cpu()
    while x.dim() > 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be a (T, S) matrix (leading dims of size 1 allowed), got {tuple(x.shape)}"
        )
    return x


def plot_attention(
    weights: torch.Tensor,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    annotate: bool = False,
) -> Axes:
    """Heatmap of ``(T, S)`` attention weights: rows are queries, columns are keys."""
    weights = _as_matrix(weights, "weights").float()
    T, S = weights.shape
    for labels, n, name in ((query_labels, T, "query_labels"), (key_labels, S, "key_labels")):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name} must have {n} entries, got {len(labels)}")
    ax = new_axes(ax)
    with plt.rc_context(STYLE):
        image = ax.imshow(weights.numpy(), cmap=WEIGHTS_CMAP, vmin=0.0, vmax=max(float(weights.max()), 1e-12))
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        if key_labels is not None:
            ax.set_xticks(range(S), key_labels, rotation=60, ha="right")
        if query_labels is not None:
            ax.set_yticks(range(T), query_labels)
        if annotate:
            for i in range(T):
                for j in range(S):
                    value = float(weights[i, j])
                    ax.text(
                        j,
                        i,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if value < 0.5 * float(weights.max()) else "black",
                    )
        if title:
            ax.set_title(title)
    return ax


def plot_mask(
    mask: torch.Tensor,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
) -> Axes:
    """Draw a boolean ``(T, S)`` mask: filled cells may attend, grey cells may not."""
    mask = _as_matrix(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    ax = new_axes(ax)
    with plt.rc_context(STYLE):
        ax.imshow(mask.numpy().astype(float), cmap=MASK_CMAP, vmin=0, vmax=1)
        T, S = mask.shape
        if T <= 32 and S <= 32:
            # Grid lines between cells make small masks countable.
            ax.set_xticks([x - 0.5 for x in range(1, S)], minor=True)
            ax.set_yticks([y - 0.5 for y in range(1, T)], minor=True)
            ax.grid(which="minor", color="white", linewidth=0.8)
            ax.tick_params(which="minor", length=0)
        if key_labels is not None:
            ax.set_xticks(range(S), key_labels, rotation=60, ha="right")
        if query_labels is not None:
            ax.set_yticks(range(T), query_labels)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        density = mask.float().mean().item()
        ax.set_title(f"{title}  ({density:.0%} kept)" if title else f"{density:.0%} kept")
    return ax


def plot_scaling(
    lengths: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    ylabel: str,
    xlabel: str = "sequence length T",
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Log-log plot of each series against ``lengths``, with the fitted slope in the legend."""
    if not series:
        raise ValueError("series must hold at least one named series")
    ax = new_axes(ax)
    with plt.rc_context(STYLE):
        for name, values in series.items():
            if len(values) != len(lengths):
                raise ValueError(f"series[{name!r}] must have {len(lengths)} values, got {len(values)}")
            points = [(x, y) for x, y in zip(lengths, values) if y is not None and y > 0]
            label = name
            if len(points) >= 2:
                label += f" (slope {loglog_slope(*zip(*points)):.2f})"
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(frameon=False)
        ax.grid(True, which="major", alpha=0.3)
        if title:
            ax.set_title(title)
    return ax


# JupyterLab 4.6 with ipykernel 7 may run two widget callbacks at once (one in a kernel subshell):
# pyplot's figures are global, so one callback's plt.show() could show (or blank) the other's figure.
# A Figure made directly, outside pyplot, belongs to its caller only.
def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure in the course style that pyplot does not track (create its axes inside
    ``plt.rc_context(STYLE)`` too: fonts and colours are read when an artist is made)."""
    with plt.rc_context(STYLE):
        return Figure(figsize=figsize)


def show(figure: Figure) -> None:
    """Display ``figure`` (only it) in the current output, e.g. an explorer's Output widget."""
    from IPython.display import display

    display(figure)
