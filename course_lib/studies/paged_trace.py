"""Chapter 04's paged KV cache replayed: a small serving trace run on a ``PagedKVCache``, and the
cache's physical blocks drawn (the paged-cache viewer and the chapter's figures)."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

from ..checks import check_int
from ..kv_cache import PagedKVCache
from ..viz import STYLE, new_figure

__all__ = ["PAGED_TRACE", "replay_paged_trace", "draw_paged_cache"]

# A small serving trace: (operation, sequence, argument). "add" starts a request with a prompt of
# n tokens, "grow" decodes n more tokens, "fork" starts a sequence sharing the parent's blocks
# (parallel sampling / beams), "free" ends a request.
PAGED_TRACE: tuple[tuple[str, str, object], ...] = (
    ("add", "A", 6),
    ("grow", "A", 3),
    ("fork", "A", "B"),
    ("grow", "B", 1),
    ("grow", "A", 2),
    ("add", "C", 10),
    ("free", "A", None),
    ("grow", "B", 4),
    ("grow", "C", 3),
    ("add", "D", 5),
    ("free", "B", None),
    ("grow", "D", 6),
    ("free", "C", None),
)
_COLOURS = {"A": "#0072B2", "B": "#D55E00", "C": "#009E73", "D": "#CC79A7"}


def replay_paged_trace(step: int, block_size: int = 4, num_blocks: int | None = None) -> PagedKVCache:
    """A ``PagedKVCache`` after the first ``step`` operations of :data:`PAGED_TRACE`.

    Every token's key and value hold its position, so copies are visible in the storage. The
    default pool holds 64 token slots.
    """
    step = check_int(step, "step", min=0, max=len(PAGED_TRACE))
    block_size = check_int(block_size, "block_size", min=1)
    num_blocks = (
        math.ceil(64 / block_size) if num_blocks is None else check_int(num_blocks, "num_blocks", min=1)
    )
    cache = PagedKVCache(num_blocks, block_size, 1, 1)
    for kind, seq, argument in PAGED_TRACE[:step]:
        if kind == "add":
            cache.add_sequence(seq)
        if kind in ("add", "grow"):
            start = cache.length(seq)
            tokens = torch.arange(start, start + argument, dtype=torch.float32).view(1, argument, 1)
            cache.append(seq, tokens, tokens)
        elif kind == "fork":
            cache.fork(seq, argument)
        elif kind == "free":
            cache.free(seq)
    return cache


def draw_paged_cache(cache: PagedKVCache, ax=None, title: str | None = None):
    """Physical blocks as rows of slots, coloured by owner; shared blocks hatched; free blocks empty."""
    owners: dict[int, list[str]] = {}
    for seq, table in cache.block_tables.items():
        for block in table:
            owners.setdefault(block, []).append(str(seq))
    with plt.rc_context(STYLE):
        if ax is None:
            ax = new_figure((9, 2.8)).add_subplot()
        per_row = 8
        for block in range(cache.num_blocks):
            row, column = divmod(block, per_row)
            x0, y0 = column * (cache.block_size + 1), -row * 1.6
            names = owners.get(block, [])
            colour = _COLOURS.get(names[0], "#999999") if names else "white"
            for slot in range(cache.block_size):
                filled = names and slot < cache.block_fill[block]
                ax.add_patch(
                    Rectangle(
                        (x0 + slot, y0),
                        1,
                        1,
                        facecolor=colour if filled else "white",
                        edgecolor="black",
                        linewidth=0.6,
                        hatch="///" if len(names) > 1 and filled else None,
                    )
                )
            label = f"{block}" + (f": {'+'.join(names)}" if names else " free")
            ax.text(x0, y0 + 1.15, label, fontsize=7)
        rows = math.ceil(cache.num_blocks / per_row)
        ax.set_xlim(-0.5, per_row * (cache.block_size + 1))
        ax.set_ylim(-(rows - 1) * 1.6 - 0.3, 1.7)
        ax.set_aspect("equal")
        ax.axis("off")
        if title:
            ax.set_title(title)
    return ax
