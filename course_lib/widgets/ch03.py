"""Chapter 03's explorers: a tile walk through FlashAttention's schedule, HBM traffic vs blocks, score
modifications computed tile by tile; and the SageAttention2 comparison the notebook draws."""

from __future__ import annotations

from functools import lru_cache

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

from ..checks import check_bool, check_choice, check_int
from ..studies.score_mods import (
    MOD_HEADS,
    SAGE_VARIANTS,
    SCORE_MOD_KINDS,
    accumulation_errors,
    sage_comparison,
    score_mod_costs,
    score_mod_for,
    score_mod_inputs,
    score_mod_tiles,
)
from ..studies.tile_walk import WALK_HEAD_DIM, draw_schedule, tile_walk_inputs
from ..tiling import flash_attention, flash_attention_trace, io_cost
from ..viz import STYLE
from ._display import new_figure, show, widen_labels

__all__ = [
    "LOOP_ORDERS",
    "tile_walk_inputs",
    "tile_walk_view",
    "tile_walk",
    "draw_schedule",
    "tile_bytes",
    "io_explorer_view",
    "io_explorer",
    "SCORE_MOD_KINDS",
    "score_mod_for",
    "score_mod_inputs",
    "score_mod_view",
    "score_mod_explorer",
    "score_mod_costs",
    "SAGE_VARIANTS",
    "sage_comparison",
    "accumulation_errors",
    "draw_sage_comparison",
]

LOOP_ORDERS = ("fa2", "fa1")

# --- (a) tile walk --------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _walk(seq_len: int, block_q: int, block_k: int, loop_order: str, causal: bool):
    q, k, v = tile_walk_inputs(seq_len)
    steps = flash_attention_trace(
        q, k, v, causal=causal, block_q=block_q, block_k=block_k, loop_order=loop_order
    )
    final_out, final_lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    scores = (q @ k.transpose(-2, -1))[0, 0] * WALK_HEAD_DIM**-0.5
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    final_max = scores.amax(-1)
    return steps, final_out[0, 0], final_lse[0, 0], final_max


def tile_walk_view(
    step: int = 0,
    loop_order: str = "fa2",
    causal: bool = True,
    seq_len: int = 16,
    block_q: int = 4,
    block_k: int = 4,
    *,
    draw: bool = True,
) -> dict:
    """One step of FlashAttention's schedule on a small seeded example (one head, D = 8).

    Returns the :class:`TileStep` (which Q and K blocks are on chip, skipped or not), the running
    max ``m`` and sum ``l`` of the Q block's rows next to their final values, and how far the
    block's current output is from the final one. ``step`` past the end shows the last step.
    """
    check_choice(loop_order, "loop_order", LOOP_ORDERS)
    check_bool(causal, "causal")
    seq_len = check_int(seq_len, "seq_len", min=1)
    block_q = check_int(block_q, "block_q", min=1)
    block_k = check_int(block_k, "block_k", min=1)
    step = check_int(step, "step", min=0)
    steps, final_out, final_lse, final_max = _walk(seq_len, block_q, block_k, loop_order, causal)
    step = min(step, len(steps) - 1)
    current = steps[step]
    q0, q1 = current.q_rows
    row_max, row_sum = current.row_max[0, 0], current.row_sum[0, 0]
    final_sum = torch.exp(final_lse[q0:q1] - final_max[q0:q1])
    error = (current.output[0, 0] - final_out[q0:q1]).abs().max().item()
    done = steps[: step + 1]
    view = {
        "num_steps": len(steps),
        "step": current,
        "q_rows": current.q_rows,
        "k_rows": current.k_rows,
        "skipped": current.skipped,
        "row_max": row_max,
        "row_sum": row_sum,
        "final_max": final_max[q0:q1],
        "final_sum": final_sum,
        "output_error": error,
        "computed": sum(not s.skipped for s in done),
        "skipped_so_far": sum(s.skipped for s in done),
    }
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((13, 4.2))
            left, middle, right = figure.subplots(1, 3)
            draw_schedule(
                steps,
                seq_len,
                seq_len,
                current=step,
                ax=left,
                title=f"{loop_order}: step {step} of {len(steps) - 1}"
                + (" (skipped)" if current.skipped else ""),
            )
            rows = np.arange(q0, q1)
            finite = torch.isfinite(row_max)
            middle.bar(rows - 0.2, torch.where(finite, row_max, 0).numpy(), width=0.4, label="running m")
            middle.bar(rows + 0.2, final_max[q0:q1].numpy(), width=0.4, label="final m")
            middle.set_title(f"row max m, queries {q0}..{q1 - 1}")
            middle.set_xlabel("query")
            middle.legend(frameon=False)
            right.bar(rows - 0.2, row_sum.numpy(), width=0.4, label="running l")
            right.bar(rows + 0.2, final_sum.numpy(), width=0.4, label="final l")
            right.set_title(f"row sum l   |O - O_final| = {error:.2g}")
            right.set_xlabel("query")
            right.legend(frameon=False)
            # Fixed margins: tight_layout would cost most of the redraw time of every slider move.
            figure.subplots_adjust(left=0.05, right=0.98, bottom=0.13, top=0.9, wspace=0.3)
            show(figure)
        view["figure"] = figure
    return view


def tile_walk() -> widgets.Widget:
    """A step slider through the (Q block, K block) schedule, for both loop orders, causal or not."""
    block_options = [1, 2, 3, 4, 8]
    step = widgets.IntSlider(value=0, min=0, max=15, description="step")
    loop_order = widgets.ToggleButtons(options=LOOP_ORDERS, value="fa2", description="loop order")
    causal = widgets.Checkbox(value=True, description="causal")
    seq_len = widgets.IntSlider(value=16, min=4, max=24, description="T = S")
    block_q = widgets.SelectionSlider(options=block_options, value=4, description="block_q")
    block_k = widgets.SelectionSlider(options=block_options, value=4, description="block_k")

    def fit_step_slider(_change=None) -> None:
        # The number of steps depends on the blocks: keep the slider's range to the schedule.
        count = -(-seq_len.value // block_q.value) * -(-seq_len.value // block_k.value)
        step.max = count - 1

    for control in (seq_len, block_q, block_k):
        control.observe(fit_step_slider, names="value")
    fit_step_slider()
    explorer = widgets.interactive(
        tile_walk_view,
        step=step,
        loop_order=loop_order,
        causal=causal,
        seq_len=seq_len,
        block_q=block_q,
        block_k=block_k,
        draw=widgets.fixed(True),
    )
    return widen_labels(explorer)


# --- (b) HBM traffic vs block size ------------------------------------------------------------


def tile_bytes(block_q: int, block_k: int, d: int, bytes_per_element: float = 2) -> float:
    """On-chip bytes of one FA1/FA2 step: Q_i and O_i (``block_q x d``), K_j and V_j
    (``block_k x d``), the score tile (``block_q x block_k``) and m, l (``block_q`` each)."""
    return (2 * block_q * d + 2 * block_k * d + block_q * block_k + 2 * block_q) * bytes_per_element


def io_explorer_view(
    N: int = 8192,
    d: int = 64,
    sram_kib: int = 64,
    block_q: int = 0,
    block_k: int = 0,
    loop_order: str = "fa1",
    bytes_per_element: int = 2,
    *,
    draw: bool = True,
) -> dict:
    """HBM bytes of standard vs tiled attention (one head) from :func:`course_lib.tiling.io_cost`.

    ``block_q = 0`` or ``block_k = 0`` means the FlashAttention paper's choice for ``sram_kib``
    KiB of SRAM (``block_k = ceil(M / 4d)``, ``block_q = min(block_k, d)``). Also reports the
    on-chip bytes the chosen tiles need, and draws the traffic against the SRAM size.
    """
    sram_kib = check_int(sram_kib, "sram_kib", min=1)
    block_q = check_int(block_q, "block_q", min=0)
    block_k = check_int(block_k, "block_k", min=0)
    sram = sram_kib * 1024
    cost = io_cost(
        N,
        d,
        block_q=block_q or None,
        block_k=block_k or None,
        sram_bytes=sram,
        bytes_per_element=bytes_per_element,
        loop_order=loop_order,
    )
    needed = tile_bytes(cost.block_q, cost.block_k, d, bytes_per_element)
    view = {
        "cost": cost,
        "standard_bytes": cost.standard_bytes,
        "tiled_bytes": cost.tiled_bytes,
        "ratio": cost.ratio,
        "block_q": cost.block_q,
        "block_k": cost.block_k,
        "tile_bytes": needed,
        "fits": needed <= sram,
    }
    view["html"] = (
        f"N={N}, d={d}, {loop_order}, blocks {cost.block_q} x {cost.block_k}: standard "
        f"<b>{cost.standard_bytes / 1e6:.1f} MB</b>, tiled <b>{cost.tiled_bytes / 1e6:.1f} MB</b> "
        f"({cost.ratio:.2f}x less); one step needs {needed / 1024:.1f} KiB on chip of {sram_kib} KiB"
        + ("" if view["fits"] else " — <b>does not fit</b>")
    )
    if draw:
        sizes = [2**p for p in range(3, 10)]
        with plt.rc_context(STYLE):
            figure = new_figure((7, 4))
            ax = figure.subplots()
            for order in ("fa1", "fa2"):
                traffic = [
                    io_cost(
                        N, d, sram_bytes=s * 1024, bytes_per_element=bytes_per_element, loop_order=order
                    ).tiled_bytes
                    for s in sizes
                ]
                ax.plot(sizes, traffic, marker="o", label=f"tiled {order}, paper's blocks")
            ax.axhline(cost.standard_bytes, color="black", linestyle="--", label="standard attention")
            ax.plot(
                [sram_kib],
                [cost.tiled_bytes],
                marker="*",
                markersize=14,
                color="#D55E00",
                linestyle="none",
                label=f"this setting ({cost.block_q} x {cost.block_k})",
            )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("SRAM per SM (KiB)")
            ax.set_ylabel("HBM bytes, one head")
            ax.set_title(f"HBM traffic, N = {N}, d = {d}")
            ax.legend(frameon=False)
            show(figure)
        view["figure"] = figure
    return view


_BLOCK_OPTIONS = [("auto", 0)] + [(str(size), size) for size in (16, 32, 64, 128, 256)]


def io_explorer() -> widgets.Widget:
    """N, d, SRAM size, block sizes and loop order -> HBM bytes of standard vs tiled attention."""
    out = widgets.HTML()

    def update(**controls) -> dict:
        view = io_explorer_view(**controls)
        out.value = view["html"]
        return view

    controls = widgets.interactive(
        update,
        N=widgets.SelectionSlider(options=[2**p for p in range(8, 18)], value=8192, description="N"),
        d=widgets.SelectionSlider(options=[32, 64, 128, 256], value=64, description="d"),
        sram_kib=widgets.SelectionSlider(
            options=[2**p for p in range(3, 10)], value=64, description="SRAM KiB"
        ),
        # "auto" (0) is the paper's choice for the SRAM size; the readout says so, not "0".
        block_q=widgets.SelectionSlider(options=_BLOCK_OPTIONS, index=0, description="block_q"),
        block_k=widgets.SelectionSlider(options=_BLOCK_OPTIONS, index=0, description="block_k"),
        loop_order=widgets.ToggleButtons(options=LOOP_ORDERS, value="fa1", description="loop order"),
        bytes_per_element=widgets.Dropdown(
            options=[("fp16/bf16", 2), ("fp32", 4)], value=2, description="dtype"
        ),
        draw=widgets.fixed(True),
    )
    box = widgets.VBox([controls, out])
    box.interactive = controls
    return widen_labels(box)


# --- (c) score modifications inside the tiles -------------------------------------------------------


def score_mod_view(
    kind: str = "ALiBi",
    head: int = 0,
    seq_len: int = 16,
    block: int = 4,
    causal: bool = True,
    tile: int = 0,
    *,
    draw: bool = True,
) -> dict:
    """:func:`course_lib.studies.score_mods.score_mod_tiles`, drawn: the change assembled tile by
    tile with the current tile outlined, and the change against the distance ``j - i`` (against the
    raw score for a modification that depends on the score)."""
    view = score_mod_tiles(kind, head, seq_len, block, causal, tile)
    T, change, raw_scores, positions_only = (
        seq_len,
        view["change"],
        view["raw_scores"],
        view["positions_only"],
    )
    current, distance = view["tile"], view["tile_distance"]
    (q0, q1), (k0, k1) = current.q_rows, current.k_rows
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((11, 4.4))
            left, right = figure.subplots(1, 2)
            image = left.imshow(change.numpy(), cmap="viridis")
            figure.colorbar(image, ax=left, fraction=0.046)
            for edge in range(0, T + 1, block):
                left.axhline(edge - 0.5, color="white", linewidth=0.6)
                left.axvline(edge - 0.5, color="white", linewidth=0.6)
            left.add_patch(
                Rectangle(
                    (k0 - 0.5, q0 - 0.5), k1 - k0, q1 - q0, fill=False, edgecolor="#D55E00", linewidth=2.5
                )
            )
            skipped = " (skipped: above the diagonal)" if current.visibility == "none" else ""
            left.set_title(f"{kind}, head {head}, modified - raw score\ntile {view['tile_index']}{skipped}")
            left.set_xlabel("key j")
            left.set_ylabel("query i")
            # A bias of (i, j) against the distance; a function of the score against the score.
            visible = ~torch.isnan(change)
            if positions_only:
                x_all = (torch.arange(T).view(1, -1) - torch.arange(T).view(-1, 1))[visible]
                x_tile, x_label = distance, "distance j - i"
                verdict = "a function of (i, j): computed from the indices"
            else:
                x_all, x_tile, x_label = raw_scores[visible], view["tile_scores"], "raw score s"
                verdict = "a function of the score: computed elementwise"
            right.scatter(x_all.numpy(), change[visible].numpy(), s=8, color="#999999", label="all tiles")
            here = ~torch.isnan(view["tile_change"])
            right.scatter(
                x_tile[here].numpy(),
                view["tile_change"][here].numpy(),
                s=22,
                color="#D55E00",
                label="this tile",
            )
            right.set_xlabel(x_label)
            right.set_ylabel("modified - raw score")
            right.set_title(f"{verdict}\n|flash - dense| = {view['output_error']:.1e}")
            right.legend(frameon=False, fontsize=8)
            figure.subplots_adjust(left=0.06, right=0.98, bottom=0.13, top=0.86, wspace=0.3)
            show(figure)
        view["figure"] = figure
    return view


def score_mod_explorer() -> widgets.Widget:
    """Kind of modification, head, T, block size, causal and tile -> the modification, tile by tile."""
    tile = widgets.IntSlider(value=0, min=0, max=15, description="tile")
    seq_len = widgets.IntSlider(value=16, min=4, max=32, description="T = S")
    block = widgets.SelectionSlider(options=[2, 4, 8], value=4, description="block")

    def fit_tile_slider(_change=None) -> None:
        blocks = -(-seq_len.value // block.value)  # ceil(T / block)
        tile.max = blocks * blocks - 1

    for control in (seq_len, block):
        control.observe(fit_tile_slider, names="value")
    fit_tile_slider()
    return widgets.interactive(
        score_mod_view,
        kind=widgets.ToggleButtons(options=SCORE_MOD_KINDS, value="ALiBi", description="mod"),
        head=widgets.IntSlider(value=0, min=0, max=MOD_HEADS - 1, description="head"),
        seq_len=seq_len,
        block=block,
        causal=widgets.Checkbox(value=True, description="causal"),
        tile=tile,
        draw=widgets.fixed(True),
    )


# --- (d) SageAttention2 against FlashAttention and SageAttention -----------------------------------


def draw_sage_comparison(errors: dict, ax=None):
    """Horizontal bars of the relative L1 error (%) of each variant of :func:`sage_comparison`."""
    with plt.rc_context(STYLE):
        if ax is None:
            figure = new_figure((8, 3.8))
            ax = figure.subplots()
        names = list(errors)
        values = [100 * errors[name].relative_l1 for name in names]
        colours = ["#D55E00" if "SageAttention2" in name else "#0072B2" if "Sage" in name else "#999999"
                   for name in names]  # fmt: skip
        ax.barh(names, values, color=colours)
        ax.invert_yaxis()
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("relative L1 error of the output (%)")
        ax.set_title("Outlier channels in Q and K: what each step of SageAttention2 buys")
    return ax
