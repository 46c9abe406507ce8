"""Chapter 03's figures: FlashAttention's tiling and loop schedules, HBM traffic vs block size, and
what a score modification costs inside the tiles."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from ..hardware import ACCELERATORS
from ..studies.score_mods import score_mod_costs, score_mod_tiles
from ..studies.tile_walk import draw_schedule, tile_walk_inputs
from ..tiling import flash_attention_trace, io_cost
from ..viz import STYLE

__all__ = ["FIGURES", "tiling", "io_vs_block_size", "score_mods"]


def _box(ax, x, y, w, h, text, colour):
    ax.add_patch(
        FancyBboxPatch(
            (x, y), w, h, boxstyle="round,pad=0.02", facecolor=colour, edgecolor="black", linewidth=0.8
        )
    )
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8)


def tiling() -> Figure:
    """The FA2 and FA1 schedules on a causal 8 x 8 grid of tiles, and what one step keeps in SRAM."""
    T, block = 24, 4
    q, k, v = tile_walk_inputs(T)
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.25]})
        for ax, order, text in (
            (axes[0], "fa2", "FA2: outer loop over Q blocks (rows)"),
            (axes[1], "fa1", "FA1: outer loop over K/V blocks (columns)"),
        ):
            steps = flash_attention_trace(
                q, k, v, causal=True, block_q=block, block_k=block, loop_order=order
            )
            skipped = sum(s.skipped for s in steps)
            draw_schedule(
                steps, T, T, ax=ax, title=f"{text}\ncausal: {skipped} of {len(steps)} tiles skipped"
            )
        ax = axes[2]
        ax.set_xlim(0, 10)
        ax.set_ylim(-1, 10)
        ax.axis("off")
        ax.set_title("one FA2 step: (Q block i, K/V block j)")
        ax.add_patch(
            FancyBboxPatch(
                (0.2, 6.0), 9.6, 3.3, boxstyle="round,pad=0.05", facecolor="#e8f5ee", edgecolor="#009E73"
            )
        )
        ax.text(0.4, 9.0, "SRAM (on chip, one thread block)", fontsize=9, color="#009E73", fontweight="bold")
        _box(ax, 0.5, 7.2, 1.8, 1.2, "Q_i\nB_r x d", "#cfe3f3")
        _box(ax, 2.6, 7.2, 1.8, 1.2, "K_j, V_j\nB_c x d", "#fbe3cf")
        _box(ax, 4.7, 7.2, 2.3, 1.2, "S = Q_i K_j^T\nP = exp(S - m)\nB_r x B_c", "#f3f3f3")
        _box(ax, 7.3, 7.2, 2.3, 1.2, "m_i, l_i (B_r)\nacc O_i (B_r x d)", "#e6d5ee")
        ax.text(
            0.2,
            -0.6,
            "m_new = max(m, rowmax S);  l = e^(m - m_new) l + rowsum P\n"
            "acc = e^(m - m_new) acc + P V_j   (divide by l once, at the end)",
            fontsize=8,
        )
        ax.add_patch(
            FancyBboxPatch(
                (0.2, 0.4), 9.6, 2.4, boxstyle="round,pad=0.05", facecolor="#e6eef7", edgecolor="#0072B2"
            )
        )
        ax.text(0.4, 2.6, "HBM (off chip)", fontsize=9, color="#0072B2", fontweight="bold")
        _box(ax, 0.5, 0.8, 2.0, 1.2, "Q (N x d)", "#cfe3f3")
        _box(ax, 2.8, 0.8, 2.0, 1.2, "K, V (N x d)", "#fbe3cf")
        _box(ax, 5.1, 0.8, 2.0, 1.2, "O (N x d)", "#e6d5ee")
        _box(ax, 7.4, 0.8, 2.2, 1.2, "logsumexp (N)\nfor backward", "#e6d5ee")
        arrow = {"arrowstyle": "->", "color": "black"}
        ax.annotate("", xy=(1.4, 7.1), xytext=(1.4, 2.1), arrowprops=arrow)
        ax.text(1.5, 4.6, "read once", fontsize=7)
        ax.annotate("", xy=(3.5, 7.1), xytext=(3.7, 2.1), arrowprops=arrow)
        ax.text(3.7, 4.6, "read once per Q block", fontsize=7)
        ax.annotate("", xy=(6.3, 2.1), xytext=(8.4, 7.1), arrowprops=arrow)
        ax.text(7.5, 4.6, "write once", fontsize=7)
        figure.tight_layout()
    return figure


def io_vs_block_size() -> Figure:
    """HBM bytes of one head (N = 8192, d = 64, fp16) against SRAM size: standard, FA1 and FA2 tiled."""
    N, d = 8192, 64
    sizes = [2**p for p in range(3, 11)]
    with plt.rc_context(STYLE):
        figure, ax = plt.subplots(figsize=(7.5, 4.6))
        standard = io_cost(N, d, sram_bytes=1024).standard_bytes
        ax.axhline(
            standard, color="black", linestyle="--", label="standard attention (writes and reads N x N)"
        )
        for order in ("fa1", "fa2"):
            traffic = [io_cost(N, d, sram_bytes=s * 1024, loop_order=order).tiled_bytes for s in sizes]
            ax.plot(sizes, traffic, marker="o", label=f"tiled, {order} loop order, the paper's blocks")
        for name, side in (("A100-80GB-SXM", "right"), ("H100-SXM", "left")):
            kib = ACCELERATORS[name].sram_per_sm_bytes // 1024
            ax.axvline(kib, color="grey", linestyle=":", linewidth=1)
            shift = 0.96 if side == "right" else 1.04
            ax.text(kib * shift, standard * 2.2, f"{name}\n{kib} KiB/SM", fontsize=7, color="grey", ha=side)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("SRAM per SM (KiB); blocks B_c = ceil(M / 4d), B_r = min(B_c, d)")
        ax.set_ylabel("HBM bytes read + written (one head)")
        ax.set_title(f"IO vs block size: N = {N}, d = {d}, fp16 (Theorem 2: tiling wins when M >> d^2)")
        ax.legend(frameon=False, fontsize=8, loc="lower left")
    return figure


def score_mods() -> Figure:
    """Three score modifications computed tile by tile (ALiBi, T5 buckets, a soft cap), and the extra
    HBM traffic of each way of adding positions to the scores at T = S = 4096 (one head, d = 64)."""
    T, block, N, d = 24, 4, 4096, 64
    with plt.rc_context(STYLE):
        figure = plt.figure(figsize=(16, 4.4))
        # The fourth column is a spacer that leaves room for the bar chart's labels.
        grid = figure.add_gridspec(1, 5, width_ratios=[1, 1, 1, 0.55, 1.6], wspace=0.3)
        for column, (kind, head, causal) in enumerate(
            (("ALiBi", 1, True), ("T5 buckets", 3, False), ("soft cap", 0, True))
        ):
            ax = figure.add_subplot(grid[0, column])
            view = score_mod_tiles(kind, head, T, block, causal)
            ax.imshow(view["change"].numpy(), cmap="viridis")
            for edge in range(0, T + 1, block):
                ax.axhline(edge - 0.5, color="white", linewidth=0.5)
                ax.axvline(edge - 0.5, color="white", linewidth=0.5)
            what = "a function of (i, j)" if view["positions_only"] else "a function of the score"
            ax.set_title(f"{kind}: modified - raw\n{what}", fontsize=10)
            ax.set_xlabel("key j")
            if column == 0:
                ax.set_ylabel("query i (tiles of 4 x 4)")
        ax = figure.add_subplot(grid[0, 4])
        costs = score_mod_costs(N, head_dim=d)
        names = [row["name"] for row in costs]
        moved = [max(row["extra_elements"], 0.5) for row in costs]  # 0 drawn as a stub on the log axis
        colours = ["#009E73" if row["score_mod"] else "#D55E00" for row in costs]
        ax.barh(names, moved, color=colours)
        ax.axvline(4 * N * d, color="black", linestyle="--", linewidth=1)
        ax.text(4 * N * d * 0.85, -0.6, "Q, K, V, O\nthemselves", fontsize=8, va="top", ha="right")
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("extra elements moved to / from HBM, forward, one head")
        ax.set_title(f"T = S = {N}: green fits in the tile,\nred forces extra work", fontsize=10)
    return figure


FIGURES: dict[str, Callable[[], Figure]] = {
    "03_tiling": tiling,
    "03_io_vs_block_size": io_vs_block_size,
    "03_score_mods": score_mods,
}
