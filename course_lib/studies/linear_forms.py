"""Chapter 06's three forms of causal linear attention as a schedule: which entries of the implied
matrix each form reads through the state and which it computes directly, and that schedule
drawn (the three-forms stepper and the chapter's figure)."""

from __future__ import annotations

import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ..checks import check_choice, check_int

__all__ = ["STEP_FORMS", "SCHEDULE_LABELS", "SCHEDULE_CMAP", "schedule_matrix", "draw_schedule"]

STEP_FORMS = ("recurrent", "chunk")
# Categories of the schedule matrix, in the order of their integer codes.
SCHEDULE_LABELS = ("masked (future key)", "not computed yet", "read through the state", "computed directly")
SCHEDULE_CMAP = ListedColormap(["#ffffff", "#e6e6e6", "#56B4E9", "#E69F00"])


def schedule_matrix(form: str, T: int, chunk_size: int, tokens_done: int) -> torch.Tensor:
    """Integer ``(T, T)`` codes saying how each entry of the causal implied matrix is used.

    0: masked (key after query); 1: row not computed yet; 2: key read through the state; 3: key
    used directly (a query-key product). ``"parallel"``: every visible entry is direct.
    ``"recurrent"``: every visible entry of a finished row is in the state (row ``t`` reads
    ``S_t``, which already holds key ``t``). ``"chunk"``: keys in the query's own chunk are
    direct, earlier chunks come through the state; rows are finished a chunk at a time.
    """
    check_choice(form, "form", ("parallel", *STEP_FORMS))
    T = check_int(T, "T", min=1)
    chunk_size = check_int(chunk_size, "chunk_size", min=1)
    tokens_done = check_int(tokens_done, "tokens_done", min=0, max=T)
    query, key = torch.arange(T)[:, None], torch.arange(T)[None, :]
    codes = torch.ones(T, T, dtype=torch.long)
    done = (query < tokens_done).expand(T, T)
    if form == "parallel":
        codes[done] = 3
    elif form == "recurrent":
        codes[done] = 2
    else:
        same_chunk = (query // chunk_size) == (key // chunk_size)
        codes[done & same_chunk] = 3
        codes[done & ~same_chunk] = 2
    codes[(key > query).expand(T, T)] = 0
    return codes


def draw_schedule(codes: torch.Tensor, *, ax, chunk_size: int | None = None, legend: bool = True):
    """Draw a :func:`schedule_matrix` with a legend; chunk boundaries as lines when ``chunk_size``."""
    T = codes.shape[0]
    ax.imshow(codes.numpy(), cmap=SCHEDULE_CMAP, vmin=-0.5, vmax=3.5)
    ax.set_xticks([x - 0.5 for x in range(1, T)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, T)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    if chunk_size is not None:
        for boundary in range(chunk_size, T, chunk_size):
            ax.axhline(boundary - 0.5, color="black", linewidth=0.8)
            ax.axvline(boundary - 0.5, color="black", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if legend:
        handles = [
            Patch(facecolor=SCHEDULE_CMAP(i), edgecolor="grey", label=label)
            for i, label in enumerate(SCHEDULE_LABELS)
        ]
        ax.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.14),
            ncol=2,
            fontsize=9,
            frameon=False,
        )
    return ax
