"""Chapter 02's figures: the GPU memory hierarchy, and the roofline with prefill and decode."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Polygon

from ..hardware import ACCELERATORS, decode_intensity, prefill_intensity
from ..measure import format_bytes
from ..studies.roofline import plot_roofline
from ..viz import STYLE

__all__ = ["FIGURES", "memory_hierarchy", "roofline_figure", "SRAM_BANDWIDTH_A100", "CPU_DRAM"]

# The FlashAttention paper (Dao et al., 2022, Figure 1 left) gives the A100's on-chip SRAM about
# 19 TB/s of bandwidth in all, and host (CPU DRAM) memory 12.8 GB/s as seen from the GPU, for
# "> 1 TB". The other numbers of the figure come from course_lib.hardware.ACCELERATORS.
SRAM_BANDWIDTH_A100 = 19e12
CPU_DRAM = {"bandwidth": 12.8e9, "label": "> 1 TB"}


def memory_hierarchy() -> Figure:
    """A pyramid of an A100's memories: SRAM (fast, tiny), HBM (the GPU's memory), CPU DRAM."""
    a100 = ACCELERATORS["A100-80GB-SXM"]
    levels = [
        (
            "on-chip SRAM",
            f"{format_bytes(a100.sram_bytes)} in all\n"
            f"({a100.sram_per_sm_bytes // 1024} KiB x {a100.sm_count} SMs)",
            f"~{SRAM_BANDWIDTH_A100 / 1e12:.0f} TB/s",
            "#009E73",
        ),
        (
            f"HBM ({a100.memory_kind})",
            f"{a100.memory_bytes / 1e9:.0f} GB",
            f"{a100.memory_bandwidth / 1e12:.2f} TB/s",
            "#0072B2",
        ),
        ("CPU DRAM", CPU_DRAM["label"], f"{CPU_DRAM['bandwidth'] / 1e9:.1f} GB/s", "#999999"),
    ]
    with plt.rc_context(STYLE):
        figure, ax = plt.subplots(figsize=(8, 4.2))
        height = 1.0
        for row, (name, size, bandwidth, colour) in enumerate(levels):
            top, bottom = 3 - row, 2 - row
            # Widths grow downwards: slow memories are big.
            half_top, half_bottom = 0.35 + 0.9 * row / 3 + 0.05, 0.35 + 0.9 * (row + 1) / 3 + 0.05
            if row == 0:
                half_top = 0.12
            ax.add_patch(
                Polygon(
                    [(-half_bottom, bottom), (half_bottom, bottom), (half_top, top), (-half_top, top)],
                    closed=True,
                    facecolor=colour,
                    alpha=0.85,
                    edgecolor="white",
                )
            )
            ax.text(
                0,
                bottom + height * 0.3,
                name,
                ha="center",
                va="center",
                color="white",
                fontsize=9 if row == 0 else 10,
                fontweight="bold",
            )
            ax.text(1.45, bottom + 0.5, f"{bandwidth}", ha="left", va="center", fontsize=10)
            ax.text(-1.45, bottom + 0.5, size, ha="right", va="center", fontsize=9)
        ax.text(1.45, 3.25, "bandwidth", ha="left", fontsize=10, fontweight="bold")
        ax.text(-1.45, 3.25, "size", ha="right", fontsize=10, fontweight="bold")
        ax.annotate("", xy=(2.7, 2.9), xytext=(2.7, 0.1), arrowprops={"arrowstyle": "->", "color": "grey"})
        ax.text(2.8, 1.5, "faster,\nsmaller", fontsize=9, color="grey", va="center")
        ax.set_xlim(-2.6, 3.4)
        ax.set_ylim(-0.1, 3.5)
        ax.axis("off")
        ax.set_title(
            f"Memory hierarchy of an {a100.name}: SRAM is "
            f"~{SRAM_BANDWIDTH_A100 / a100.memory_bandwidth:.0f}x "
            f"faster than HBM and ~{a100.memory_bytes / a100.sram_bytes:,.0f}x smaller"
        )
    return figure


def roofline_figure() -> Figure:
    """Rooflines of the table's accelerators (bf16), with attention prefill and decode on the H100's."""
    devices = {"H100-SXM": ACCELERATORS["H100-SXM"]}
    devices.update({name: device for name, device in ACCELERATORS.items() if name != "H100-SXM"})
    D = 128
    points = [
        ("decode, MHA (any length)", decode_intensity(4096, D, num_heads=32)),
        ("decode, GQA 32q/4kv", decode_intensity(4096, D, num_heads=32, num_kv_heads=4)),
        ("prefill T=512", prefill_intensity(512, D)),
        ("prefill T=4096", prefill_intensity(4096, D)),
    ]
    with plt.rc_context(STYLE):
        figure, ax = plt.subplots(figsize=(8, 5))
        plot_roofline(
            devices,
            points,
            ax=ax,
            title="The roofline: decode sits on the memory slope, long prefill under the compute roof\n"
            "(points on the H100-SXM roofline, causal attention, D = 128)",
        )
        ridge = ACCELERATORS["H100-SXM"].ridge_point
        ax.axvline(ridge, color="grey", linestyle=":", linewidth=1)
        ax.text(ridge * 1.08, 2e12, f"H100 ridge\n{ridge:.0f} FLOP/byte", fontsize=8, color="grey")
    return figure


FIGURES: dict[str, Callable[[], Figure]] = {
    "02_memory_hierarchy": memory_hierarchy,
    "02_roofline": roofline_figure,
}
