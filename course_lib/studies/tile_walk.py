"""Chapter 03's tile walk: seeded inputs of FlashAttention's schedule, and the schedule drawn as a
grid of (Q block, K block) tiles (the tile-walk explorer and the chapter's figures)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

from ..tiling import TileStep
from ..viz import STYLE, new_figure

__all__ = ["WALK_HEAD_DIM", "tile_walk_inputs", "draw_schedule"]

WALK_HEAD_DIM = 8


def tile_walk_inputs(seq_len: int, head_dim: int = WALK_HEAD_DIM) -> tuple[torch.Tensor, ...]:
    """Seeded ``(1, 1, seq_len, head_dim)`` q, k, v in float64 for the walk (scores spread out)."""
    generator = torch.Generator().manual_seed(3)
    return tuple(
        2 * torch.randn(1, 1, seq_len, head_dim, generator=generator, dtype=torch.float64) for _ in range(3)
    )


def draw_schedule(
    steps: list[TileStep], T: int, S: int, *, current: int | None = None, ax=None, title: str | None = None
):
    """Draw the (Q block, K block) grid over the ``T x S`` scores: each tile numbered with its step,
    skipped tiles grey, tiles already visited blue, the ``current`` one orange."""
    if ax is None:
        with plt.rc_context(STYLE):
            ax = new_figure((4.5, 4.5)).add_subplot()
    with plt.rc_context(STYLE):
        for step in steps:
            (q0, q1), (k0, k1) = step.q_rows, step.k_rows
            if step.skipped:
                colour = "#dddddd"
            elif current is not None and step.step == current:
                colour = "#E69F00"
            elif current is None or step.step < current:
                colour = "#56B4E9"
            else:
                colour = "white"
            here = current is not None and step.step == current
            ax.add_patch(
                Rectangle(
                    (k0, q0),
                    k1 - k0,
                    q1 - q0,
                    facecolor=colour,
                    edgecolor="#D55E00" if here else "black",
                    linewidth=2.5 if here else 0.8,
                    zorder=3 if here else 1,
                )
            )
            label = "skip" if step.skipped else str(step.step)
            size = max(6, min(10, 48 // max(1, len(steps) ** 0.5)))
            ax.text((k0 + k1) / 2, (q0 + q1) / 2, label, ha="center", va="center", fontsize=size)
        ax.set_xlim(0, S)
        ax.set_ylim(T, 0)
        ax.set_aspect("equal")
        ax.set_xlabel("key position (K/V blocks)")
        ax.set_ylabel("query position (Q blocks)")
        if title:
            ax.set_title(title)
    return ax
