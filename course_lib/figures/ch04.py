"""Chapter 04's figures: MHA, GQA, MQA and MLA side by side with their cache per token; paged block
tables; cross-layer KV sharing (CLA) and YOCO; and (chapter 04b) static vs continuous batching."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from ..kv_cache import MODEL_CONFIGS, kv_numbers_per_token
from ..measure import format_bytes
from ..studies.paged_trace import PAGED_TRACE, draw_paged_cache, replay_paged_trace
from ..studies.serving import compare_batching, draw_batching
from ..viz import STYLE

__all__ = [
    "FIGURES",
    "kv_compression",
    "paged_block_table",
    "cross_layer_kv",
    "serving_timeline",
    "LAYER_EXAMPLES",
]

# One layer of 32 query heads of 128 (Llama-2-7B's shape) under each scheme; MLA with DeepSeek-V2's
# latent sizes (d_c = 512, d_R = 64). Numbers cached per token and layer.
LAYER_EXAMPLES = {
    "MHA": dict(attention="mha", num_layers=1, num_kv_heads=32, head_dim=128),
    "GQA": dict(attention="gqa", num_layers=1, num_kv_heads=8, head_dim=128),
    "MQA": dict(attention="mqa", num_layers=1, num_kv_heads=1, head_dim=128),
    "MLA": dict(attention="mla", num_layers=1, kv_lora_rank=512, qk_rope_head_dim=64),
}


def _box(ax, x, y, w, h, colour, text=None, hatch=None):
    ax.add_patch(
        FancyBboxPatch(
            (x, y), w, h, boxstyle="round,pad=0.02", facecolor=colour, edgecolor="black", lw=0.6, hatch=hatch
        )
    )
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=7)


def _scheme(ax, name: str, kv_heads: int) -> None:
    """Eight query heads on top, their key/value heads (or MLA's latent) below, lines for who reads what."""
    query_heads = 8
    for i in range(query_heads):
        _box(ax, i, 2.4, 0.8, 0.5, "#56B4E9", "q")
    if name == "MLA":
        _box(ax, 0.5, 0.2, 5.0, 0.6, "#E69F00", "latent c (d_c)", hatch="//")
        _box(ax, 5.8, 0.2, 1.8, 0.6, "#F0E442", "k_rope (d_R)")
        for i in range(query_heads):
            ax.plot([i + 0.4, i + 0.4], [2.4, 0.8], color="grey", lw=0.6)
        ax.text(
            4,
            1.45,
            "K, V rebuilt by W_UK, W_UV\n(or absorbed into W_Q, W_O)",
            ha="center",
            fontsize=7,
            bbox=dict(facecolor="white", edgecolor="none", pad=1),
        )
    else:
        group = query_heads // kv_heads
        width = query_heads / kv_heads
        for j in range(kv_heads):
            x = j * width + (width - 0.8) / 2
            _box(ax, x, 0.55, 0.8, 0.45, "#D55E00", "k")
            _box(ax, x, 0.0, 0.8, 0.45, "#009E73", "v")
            for i in range(j * group, (j + 1) * group):
                ax.plot([i + 0.4, x + 0.4], [2.4, 1.0], color="grey", lw=0.6)
    ax.set_xlim(-0.3, 8.1)
    ax.set_ylim(-0.2, 3.1)
    ax.axis("off")


def kv_compression() -> Figure:
    """Top: who shares keys and values in MHA, GQA, MQA and MLA. Bottom: cache per token of real models."""
    with plt.rc_context(STYLE):
        figure = plt.figure(figsize=(13, 7))
        grid = figure.add_gridspec(2, 4, height_ratios=[1, 1.3])
        kv_heads = {"MHA": 8, "GQA": 2, "MQA": 1, "MLA": 0}
        for column, (name, config) in enumerate(LAYER_EXAMPLES.items()):
            ax = figure.add_subplot(grid[0, column])
            _scheme(ax, name, kv_heads[name])
            numbers = kv_numbers_per_token(config)
            subtitle = {
                "MHA": "2 x 32 heads x 128",
                "GQA": "2 x 8 kv heads x 128",
                "MQA": "2 x 1 kv head x 128",
                "MLA": "d_c + d_R = 512 + 64",
            }[name]
            ax.set_title(
                f"{name}: {subtitle}\n= {numbers:,} numbers = {format_bytes(2 * numbers)} per token\n"
                "and layer in fp16",
                fontsize=9,
            )
        ax = figure.add_subplot(grid[1, :])
        names = list(MODEL_CONFIGS)
        per_token = [2 * kv_numbers_per_token(MODEL_CONFIGS[n]) for n in names]
        colours = {"mha": "#0072B2", "gqa": "#D55E00", "mqa": "#009E73", "mla": "#E69F00"}
        kinds = [MODEL_CONFIGS[n]["attention"] for n in names]
        bars = ax.bar(names, [b / 1024 for b in per_token], color=[colours[k] for k in kinds])
        for bar, value, kind in zip(bars, per_token, kinds):
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                bar.get_height() * 1.05,
                f"{format_bytes(value)}\n{kind.upper()}",
                ha="center",
                fontsize=7,
            )
        ax.set_yscale("log")
        ax.set_ylabel("KV cache per token, all layers (KiB, fp16)")
        ax.set_ylim(5, 3000)
        ax.set_title("Published models: bytes each token adds to the cache")
        ax.tick_params(axis="x", labelsize=8)
        figure.tight_layout()
    return figure


def paged_block_table() -> Figure:
    """The paged cache after a fork and a copy-on-write, and at the end of the trace."""
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(2, 1, figsize=(10, 4.4))
        for ax, step in zip(axes, (5, 9)):
            cache = replay_paged_trace(step, 4)
            tables = "; ".join(f"{s}: {t}" for s, t in cache.block_tables.items())
            operations = ", ".join(f"{k} {s}" for k, s, _ in PAGED_TRACE[:step])
            draw_paged_cache(cache, ax=ax, title=f"after: {operations}\nblock tables {tables}")
        figure.tight_layout()
    return figure


def _arrow(ax, start, end, colour="grey"):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", color=colour, lw=0.9))


def cross_layer_kv() -> Figure:
    """Four layers under three schemes: each its own K, V; CLA-2 pairs sharing; YOCO's one global cache."""
    layers = 4
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(1, 3, figsize=(12, 4.2))
        panels = (
            ("every layer its own K, V\n(MHA / GQA / MQA / MLA): 4 cached layers", "own"),
            ("cross-layer attention, kv_share = 2 (CLA-2)\n2 cached layers", "cla"),
            ("YOCO: one global K, V for the upper half\n1 cached layer + constant-size windows", "yoco"),
        )
        for ax, (title, scheme) in zip(axes, panels):
            for i in range(layers):
                y = 0.4 + i * 1.1
                upper = scheme == "yoco" and i >= layers // 2
                label = f"layer {i}" + (
                    "\ncross-decoder" if upper else "\nself-decoder" if scheme == "yoco" else ""
                )
                _box(ax, 0.2, y, 2.0, 0.7, "#56B4E9", label)
                owner = scheme == "own" or (scheme == "cla" and i % 2 == 0)
                if owner:
                    _box(ax, 3.0, y + 0.05, 1.3, 0.6, "#D55E00", "K, V\ncached")
                    _arrow(ax, (2.2, y + 0.35), (3.0, y + 0.35), "black")
                elif scheme == "cla":  # reads the pair's first layer's keys and values
                    _arrow(ax, (2.2, y + 0.35), (3.2, y - 0.45))
                    ax.text(2.45, y + 0.45, "q only", fontsize=6, color="grey")
                elif scheme == "yoco" and not upper:
                    _box(ax, 3.0, y + 0.15, 0.8, 0.4, "#F0E442", "window", hatch="//")
                    _arrow(ax, (2.2, y + 0.35), (3.0, y + 0.35), "black")
                else:  # YOCO's upper layers cross-attend to the global cache
                    _arrow(ax, (2.2, y + 0.35), (4.4, 3.0))
            if scheme == "yoco":
                _box(ax, 4.4, 2.75, 1.4, 0.7, "#D55E00", "global K, V\n(made once)")
                _arrow(ax, (1.2, 0.4 + 1.1 + 0.7), (4.6, 2.75), "black")
            ax.set_title(title, fontsize=9)
            ax.set_xlim(0, 6)
            ax.set_ylim(0, 0.4 + layers * 1.1 + 0.2)
            ax.axis("off")
        figure.suptitle(
            "Sharing keys and values across layers: the cache shrinks by layers, not by heads", fontsize=10
        )
        figure.tight_layout()
    return figure


def serving_timeline() -> Figure:
    """Static vs continuous batching on one trace: stored and reserved cache slots, requests in flight."""
    return draw_batching(compare_batching())


FIGURES: dict[str, Callable[[], Figure]] = {
    "04_kv_compression": kv_compression,
    "04_paged_block_table": paged_block_table,
    "04_cross_layer_kv": cross_layer_kv,
    "04b_serving_timeline": serving_timeline,
}
