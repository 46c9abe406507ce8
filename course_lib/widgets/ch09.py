"""Chapter 09's explorers: which tiles a Triton program owns, and how a paged kernel gathers its keys.

Neither needs Triton: they replay the kernels' index arithmetic (the grid, ``tl.program_id``, the
loop bounds, the masks, the block-table gather) in plain Python, so they run anywhere and the tests
can check them against the definitions. ``side_by_side`` shows a kernel next to the PyTorch loop
it mirrors.
"""

from __future__ import annotations

import html
import inspect
import math

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

from ..checks import check_bool, check_choice, check_int
from ..kv_cache import PagedKVCache
from ..viz import STYLE
from ._display import new_figure, show, widen_labels

__all__ = [
    "PROGRAM_KERNELS",
    "program_map",
    "program_map_view",
    "program_explorer",
    "paged_pool",
    "paged_gather_view",
    "paged_gather_explorer",
    "side_by_side",
]

PROGRAM_KERNELS = ("fa2 forward", "fa2 backward dQ", "fa2 backward dK dV")
_COLOURS = {"full": "#56B4E9", "masked": "#E69F00", "skipped": "#dddddd", "other": "#f7f7f7"}

# --- (a) programs and tiles ---------------------------------------------------------------------


def _tile_status(q0: int, q1: int, k0: int, k1: int, T: int, S: int, causal: bool, blocks: tuple) -> str:
    """How the kernel treats the tile of queries q0..q1-1 and keys k0..k1-1: 'skipped' (no pair is
    visible), 'masked' (the causal mask or the end of T or S cuts it: the masks do work) or 'full'."""
    offset = S - T
    if causal and k0 > q1 - 1 + offset:
        return "skipped"
    cut = (q1 - q0, k1 - k0) != blocks
    if cut or (causal and k1 - 1 > q0 + offset):
        return "masked"
    return "full"


def program_map(kernel: str, T: int, S: int, block_m: int, block_n: int, causal: bool) -> list[dict]:
    """Every program of one launch, as the kernel's index arithmetic defines it.

    For the forward and dQ kernels program ``p`` (``tl.program_id(0)``) owns queries
    ``p*block_m ..`` and loops over K blocks up to ``min(S, start_m + block_m + S - T)``; for the dK/dV
    kernel program ``p`` owns keys ``p*block_n ..`` and loops over Q blocks from the first that can
    see them. Each program is a dict: ``owns`` (row or key range), ``steps`` (the loop's tiles in
    order, each ``{"q_rows", "k_rows", "status"}`` with status 'full' or 'masked') and ``skipped``
    (the tiles of its row/column the loop never loads).
    """
    check_choice(kernel, "kernel", PROGRAM_KERNELS)
    T, S = check_int(T, "T", min=1), check_int(S, "S", min=1)
    block_m, block_n = check_int(block_m, "block_m", min=1), check_int(block_n, "block_n", min=1)
    check_bool(causal, "causal")
    programs = []
    if kernel in ("fa2 forward", "fa2 backward dQ"):
        for start_m in range(0, T, block_m):
            q_rows = (start_m, min(start_m + block_m, T))
            key_end = min(S, start_m + block_m + S - T) if causal else S
            steps, skipped = [], []
            for start_n in range(0, S, block_n):
                k_rows = (start_n, min(start_n + block_n, S))
                status = _tile_status(*q_rows, *k_rows, T, S, causal, (block_m, block_n))
                tile = {"q_rows": q_rows, "k_rows": k_rows, "status": status}
                (steps if start_n < key_end else skipped).append(tile)
            programs.append({"owns": ("queries", q_rows), "steps": steps, "skipped": skipped})
    else:
        for start_n in range(0, S, block_n):
            k_rows = (start_n, min(start_n + block_n, S))
            query_start = (max(start_n - (S - T), 0) // block_m) * block_m if causal else 0
            steps, skipped = [], []
            for start_m in range(0, T, block_m):
                q_rows = (start_m, min(start_m + block_m, T))
                status = _tile_status(*q_rows, *k_rows, T, S, causal, (block_m, block_n))
                tile = {"q_rows": q_rows, "k_rows": k_rows, "status": status}
                (steps if start_m >= query_start else skipped).append(tile)
            programs.append({"owns": ("keys", k_rows), "steps": steps, "skipped": skipped})
    return programs


def _on_chip_bytes(kernel: str, block_m: int, block_n: int, head_dim: int) -> dict:
    """What one program keeps on chip (fp16 tiles, fp32 accumulators), in bytes."""
    if kernel == "fa2 forward":
        parts = {
            "q tile (fp16)": 2 * block_m * head_dim,
            "k, v tiles (fp16)": 2 * 2 * block_n * head_dim,
            "scores / P (fp32)": 4 * block_m * block_n,
            "accumulator (fp32)": 4 * block_m * head_dim,
            "row max and sum (fp32)": 4 * 2 * block_m,
        }
    elif kernel == "fa2 backward dQ":
        parts = {
            "q, dO tiles (fp16)": 2 * 2 * block_m * head_dim,
            "k, v tiles (fp16)": 2 * 2 * block_n * head_dim,
            "P, dP (fp32)": 4 * 2 * block_m * block_n,
            "dQ accumulator (fp32)": 4 * block_m * head_dim,
            "lse, D (fp32)": 4 * 2 * block_m,
        }
    else:
        parts = {
            "k, v tiles (fp16)": 2 * 2 * block_n * head_dim,
            "q, dO tiles (fp16)": 2 * 2 * block_m * head_dim,
            "P, dP (fp32)": 4 * 2 * block_m * block_n,
            "dK, dV accumulators (fp32)": 4 * 2 * block_n * head_dim,
        }
    return parts


def program_map_view(
    kernel: str = "fa2 forward",
    T: int = 40,
    S: int = 40,
    block_m: int = 16,
    block_n: int = 16,
    causal: bool = True,
    program: int = 0,
    head_dim: int = 64,
    *,
    draw: bool = True,
) -> dict:
    """One program of a launch: which tiles of the ``T x S`` scores it loads, masks or skips.

    Returns the grid size, the selected program (``program`` past the end shows the last), its
    steps and skipped tiles (see :func:`program_map`), the totals over all programs (tiles computed,
    skipped, and the share of the dense ``T x S`` work that is done), the bytes it holds on chip at
    ``head_dim``, and an HTML summary.
    """
    programs = program_map(kernel, T, S, block_m, block_n, causal)
    head_dim = check_int(head_dim, "head_dim", min=1)
    index = min(check_int(program, "program", min=0), len(programs) - 1)
    chosen = programs[index]
    computed = sum(len(p["steps"]) for p in programs)
    skipped = sum(len(p["skipped"]) for p in programs)
    pairs_done = sum(
        (t["q_rows"][1] - t["q_rows"][0]) * (t["k_rows"][1] - t["k_rows"][0])
        for p in programs
        for t in p["steps"]
    )
    on_chip = _on_chip_bytes(kernel, block_m, block_n, head_dim)
    kind, (start, end) = chosen["owns"]
    loop_over = "K/V blocks" if kernel != "fa2 backward dK dV" else "Q blocks"
    masked = sum(t["status"] == "masked" for t in chosen["steps"])
    view = {
        "grid": (len(programs),),
        "program": index,
        "owns": chosen["owns"],
        "steps": chosen["steps"],
        "skipped": chosen["skipped"],
        "tiles_computed": computed,
        "tiles_skipped": skipped,
        "work_fraction": pairs_done / (T * S),
        "on_chip_bytes": sum(on_chip.values()),
        "on_chip": on_chip,
    }
    view["html"] = (
        f"<b>{kernel}</b>: grid = ({len(programs)}, B&middot;H); "
        f"<code>tl.program_id(0) = {index}</code> owns "
        f"{kind} {start}..{end - 1}. Its loop visits {len(chosen['steps'])} {loop_over} "
        f"({masked} need a mask) and skips {len(chosen['skipped'])}. "
        f"All programs: {computed} tiles computed, {skipped} skipped; the loads cover "
        f"{100 * view['work_fraction']:.0f}% of the T&times;S scores. "
        f"On chip per program at head dim {head_dim}: {view['on_chip_bytes'] / 1024:.1f} KiB "
        f"(" + ", ".join(f"{name} {size / 1024:.1f}" for name, size in on_chip.items()) + " KiB)"
    )
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((5.2, 5.2 * min(1.6, max(0.4, T / S))))
            ax = figure.subplots()
            for p, item in enumerate(programs):
                for tile in item["steps"] + item["skipped"]:
                    (q0, q1), (k0, k1) = tile["q_rows"], tile["k_rows"]
                    mine = p == index
                    if tile in item["skipped"]:
                        colour = _COLOURS["skipped"]
                    else:
                        colour = _COLOURS[tile["status"]] if mine else _COLOURS["other"]
                    ax.add_patch(
                        Rectangle(
                            (k0, q0), k1 - k0, q1 - q0, facecolor=colour, edgecolor="black",
                            linewidth=1.6 if mine else 0.5, zorder=2 if mine else 1,
                        )
                    )  # fmt: skip
            for step, tile in enumerate(chosen["steps"]):
                (q0, q1), (k0, k1) = tile["q_rows"], tile["k_rows"]
                ax.text(
                    (k0 + k1) / 2, (q0 + q1) / 2, str(step), ha="center", va="center", fontsize=9, zorder=3
                )
            if causal:  # the diagonal, aligned to the end: key j is visible to query i when j <= i + S - T
                rows = np.array([0, T])
                ax.plot(rows + S - T + 0.5, rows, color="#D55E00", linewidth=1.2, zorder=4)
            ax.set_xlim(0, S)
            ax.set_ylim(T, 0)
            ax.set_xlabel("key position (BLOCK_N tiles)")
            ax.set_ylabel("query position (BLOCK_M tiles)")
            ax.set_title(
                f"{kernel}: program {index} of {len(programs)}  (blue: no mask, orange: masked)", fontsize=9
            )
            figure.subplots_adjust(left=0.14, right=0.97, bottom=0.1, top=0.92)
            show(figure)
        view["figure"] = figure
    return view


def program_explorer() -> widgets.Widget:
    """Pick a kernel, the lengths, the blocks and a program id: see the tiles that program touches."""
    out = widgets.HTML()
    program = widgets.IntSlider(value=0, min=0, max=2, description="program")
    T = widgets.IntSlider(value=40, min=1, max=96, description="T")
    S = widgets.IntSlider(value=40, min=1, max=96, description="S")
    block_m = widgets.SelectionSlider(options=[16, 32, 64], value=16, description="BLOCK_M")
    block_n = widgets.SelectionSlider(options=[16, 32, 64], value=16, description="BLOCK_N")
    kernel = widgets.ToggleButtons(options=PROGRAM_KERNELS, value="fa2 forward", description="kernel")

    def fit_program_slider(_change=None) -> None:
        # The grid depends on the kernel and the blocks: keep the slider to the programs that exist.
        rows = T.value if kernel.value != "fa2 backward dK dV" else S.value
        block = block_m.value if kernel.value != "fa2 backward dK dV" else block_n.value
        program.max = math.ceil(rows / block) - 1

    for control in (T, S, block_m, block_n, kernel):
        control.observe(fit_program_slider, names="value")
    fit_program_slider()

    def update(**controls) -> dict:
        view = program_map_view(**controls)
        out.value = view["html"]
        return view

    controls = widgets.interactive(
        update,
        kernel=kernel,
        T=T,
        S=S,
        block_m=block_m,
        block_n=block_n,
        causal=widgets.Checkbox(value=True, description="causal"),
        program=program,
        head_dim=widgets.SelectionSlider(options=[32, 64, 128], value=64, description="head dim"),
        draw=widgets.fixed(True),
    )
    box = widgets.VBox([controls, out])
    box.interactive = controls
    return widen_labels(box)


# --- (b) the paged gather -----------------------------------------------------------------------


def paged_pool(lengths: tuple[int, ...], page_size: int) -> PagedKVCache:
    """A one-head cache of width 1 whose sequences grew together, token ``t`` of sequence ``s``
    storing the number ``1000 s + t`` (so a gathered row says which token it is)."""
    page_size = check_int(page_size, "page_size", min=1)
    lengths = tuple(check_int(n, "lengths", min=0) for n in lengths)
    if not lengths:
        raise ValueError("lengths must name at least one sequence")
    pages = max(1, sum(math.ceil(n / page_size) for n in lengths))
    cache = PagedKVCache(pages, page_size, 1, 1)
    for seq in range(len(lengths)):
        cache.add_sequence(seq)
    for step in range(max(lengths)):
        for seq, n in enumerate(lengths):
            if step < n:
                token = float(1000 * seq + step)
                cache.append(seq, _scalar(token), _scalar(token))
    return cache


def _scalar(value: float) -> torch.Tensor:
    return torch.full((1, 1, 1), value)


def paged_gather_view(
    page_size: int = 4,
    lengths: tuple[int, ...] = (13, 6, 10),
    sequence: int = 0,
    num_splits: int = 2,
    split: int = 0,
    block_n: int = 4,
    *,
    draw: bool = True,
) -> dict:
    """What program ``(sequence, split)`` of ``paged_decode_kernel`` reads, token by token.

    As the kernel computes it: the split covers tokens ``split * ceil(L / num_splits)`` up to the
    next split or the length ``L``; each token ``j`` lives in logical page ``j // page_size``, which
    the block table maps to a physical page, at slot ``j % page_size``; its element offset in the pool
    is ``physical_page * page_size + slot`` (one head of width 1). Returns the table, the split's
    range, and per token its logical page, physical page, slot, offset and the value stored there.
    """
    cache = paged_pool(tuple(lengths), page_size)
    sequence = min(check_int(sequence, "sequence", min=0), len(lengths) - 1)
    num_splits = check_int(num_splits, "num_splits", min=1)
    split = min(check_int(split, "split", min=0), num_splits - 1)
    block_n = check_int(block_n, "block_n", min=1)
    length = cache.length(sequence)
    table = cache.block_table(sequence)
    split_size = math.ceil(length / num_splits) if length else 0
    start, end = split * split_size, min((split + 1) * split_size, length)
    tokens = list(range(start, end))
    logical = [j // page_size for j in tokens]
    physical = [table[page] for page in logical]
    slots = [j % page_size for j in tokens]
    offsets = [page * page_size + slot for page, slot in zip(physical, slots)]
    pool = cache.key_blocks.reshape(-1)
    view = {
        "table": table,
        "length": length,
        "split_range": (start, end),
        "steps": [tokens[i : i + block_n] for i in range(0, len(tokens), block_n)],
        "tokens": tokens,
        "logical_pages": logical,
        "physical_pages": physical,
        "slots": slots,
        "offsets": offsets,
        "values": [float(pool[o]) for o in offsets],
    }
    view["html"] = (
        f"sequence {sequence} (length {length}) has block table {table}; program "
        f"<code>(program_id(0), program_id(1)) = ({sequence}&middot;H + h, {split})</code> reads tokens "
        f"{start}..{end - 1 if end > start else '-'} in {len(view['steps'])} step(s) of BLOCK_N = {block_n}"
        + ("" if tokens else " (an empty split: it writes lse = -inf, and the combine ignores it)")
    )
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((9, 0.55 * cache.num_blocks + 1.2))
            ax = figure.subplots()
            owner = {}
            for seq in range(len(lengths)):
                for page in cache.block_table(seq):
                    owner[page] = seq
            palette = ["#56B4E9", "#009E73", "#CC79A7", "#F0E442", "#0072B2", "#D55E00"]
            read = {offset: i for i, offset in enumerate(offsets)}
            for page in range(cache.num_blocks):
                for slot in range(page_size):
                    offset = page * page_size + slot
                    used = page in owner and slot < cache.block_fill[page]
                    colour = palette[owner[page] % len(palette)] if used else "white"
                    ax.add_patch(
                        Rectangle(
                            (slot, page), 1, 1, facecolor=colour, edgecolor="black",
                            linewidth=2.2 if offset in read else 0.5, alpha=1.0 if offset in read else 0.45,
                        )
                    )  # fmt: skip
                    if used:
                        value = int(pool[offset])
                        label = f"s{value // 1000}:{value % 1000}"
                        ax.text(slot + 0.5, page + 0.5, label, ha="center", va="center", fontsize=7)
                ax.text(-0.3, page + 0.5, f"page {page}", ha="right", va="center", fontsize=8)
            ax.set_xlim(-1.6, page_size)
            ax.set_ylim(cache.num_blocks, 0)
            ax.set_axis_off()
            ax.set_title(
                f"the pool (rows: physical pages; s<seq>:<token>); bold: what split {split} of sequence "
                f"{sequence} reads",
                fontsize=9,
            )
            show(figure)
        view["figure"] = figure
    return view


def paged_gather_explorer() -> widgets.Widget:
    """Page size, a sequence and a split: see which physical slots that decode program gathers."""
    out = widgets.HTML()
    split = widgets.IntSlider(value=0, min=0, max=1, description="split")
    num_splits = widgets.IntSlider(value=2, min=1, max=6, description="num_splits")

    def fit_split_slider(_change=None) -> None:
        split.max = num_splits.value - 1

    num_splits.observe(fit_split_slider, names="value")

    def update(**controls) -> dict:
        view = paged_gather_view(**controls)
        out.value = view["html"]
        return view

    controls = widgets.interactive(
        update,
        page_size=widgets.IntSlider(value=4, min=1, max=8, description="page size"),
        lengths=widgets.fixed((13, 6, 10)),
        sequence=widgets.Dropdown(options=[0, 1, 2], value=0, description="sequence"),
        num_splits=num_splits,
        split=split,
        block_n=widgets.SelectionSlider(options=[1, 2, 4, 8], value=4, description="BLOCK_N"),
        draw=widgets.fixed(True),
    )
    box = widgets.VBox([controls, out])
    box.interactive = controls
    return widen_labels(box)


# --- (c) a kernel beside its PyTorch loop -------------------------------------------------------


def _source(obj: object) -> str:
    # A @triton.jit function keeps the Python function it wraps in ``.fn``.
    return inspect.getsource(getattr(obj, "fn", obj))


_PRE_STYLE = "font-size:11px; line-height:1.25; overflow-x:auto"


def side_by_side(left: object, right: object, titles: tuple[str, str] | None = None) -> widgets.HTML:
    """Two functions' source code in two columns (e.g. a PyTorch loop and the Triton kernel)."""
    names = titles or tuple(getattr(getattr(x, "fn", x), "__qualname__", str(x)) for x in (left, right))
    columns = "".join(
        f"<div style='flex:1; min-width:0'><b>{html.escape(name)}</b>"
        f"<pre style='{_PRE_STYLE}'>{html.escape(_source(obj))}</pre></div>"
        for name, obj in zip(names, (left, right))
    )
    return widgets.HTML(f"<div style='display:flex; gap:12px'>{columns}</div>")
