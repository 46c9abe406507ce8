"""Chapter 02's roofline, drawn: attainable FLOP/s against arithmetic intensity for a set of
accelerators, with labelled operations (the roofline explorer and the chapter's figures)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ..checks import check_choice
from ..hardware import Accelerator, roofline
from ..viz import STYLE, new_axes

__all__ = ["DTYPES", "plot_roofline"]

DTYPES = {"bfloat16": 2, "float32": 4}


def _peak(device: Accelerator, dtype: str) -> float:
    return device.peak_flops_16bit if DTYPES[dtype] == 2 else device.peak_flops_fp32


def plot_roofline(
    devices: Mapping[str, Accelerator],
    points: Sequence[tuple[str, float]] = (),
    *,
    dtype: str = "bfloat16",
    ax=None,
    title: str | None = None,
    x_range: tuple[float, float] = (0.1, 1e4),
):
    """Log-log rooflines of ``devices`` (FLOP/s against FLOPs per byte) with labelled points.

    Each point ``(label, intensity)`` is drawn on the first device's roofline.
    """
    check_choice(dtype, "dtype", DTYPES)
    if not devices:
        raise ValueError("devices must name at least one accelerator")
    ax = new_axes(ax, figsize=(7, 4.5))
    x = np.logspace(np.log10(x_range[0]), np.log10(x_range[1]), 200)
    with plt.rc_context(STYLE):
        for name, device in devices.items():
            peak = _peak(device, dtype)
            (line,) = ax.plot(x, roofline(x, peak, device.memory_bandwidth), label=name)
            ridge = peak / device.memory_bandwidth
            ax.plot([ridge], [peak], marker="|", markersize=10, color=line.get_color())
        first = next(iter(devices.values()))
        for index, (label, intensity) in enumerate(points):
            y = roofline(intensity, _peak(first, dtype), first.memory_bandwidth)
            ax.plot([intensity], [y], marker="o", color="black", markersize=5)
            ax.annotate(
                label,
                (intensity, y),
                textcoords="offset points",
                xytext=(4, -12 - 9 * (index % 2)),
                fontsize=8,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOPs per byte of HBM traffic)")
        ax.set_ylabel(f"attainable FLOP/s ({dtype})")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(frameon=False, loc="lower right")
        if title:
            ax.set_title(title)
    return ax
