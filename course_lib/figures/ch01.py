"""Chapter 01's figures: the four steps of attention, the memory explosion, the masks of each task."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from ..measure import format_bytes
from ..standard import attention, causal_mask
from ..studies.score_memory import ACCELERATOR_MEMORY_GIB, score_memory
from ..viz import STYLE, new_axes, plot_mask

__all__ = ["FIGURES", "attention_steps", "memory_explosion", "task_masks"]


def attention_steps() -> Figure:
    """The four steps of standard attention on a tiny example, each panel titled with its shape."""
    generator = torch.Generator().manual_seed(0)
    T, D = 6, 4
    x = torch.randn(T, 8, generator=generator)
    w_q, w_k, w_v = (torch.randn(8, D, generator=generator) for _ in range(3))
    q, k, v = x @ w_q, x @ w_k, x @ w_v
    scores = q @ k.T * D**-0.5
    output, weights = attention(q[None, None], k[None, None], v[None, None], return_weights=True)
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(1, 4, figsize=(14, 3.6))
        panels = [
            (torch.cat([q, k, v], dim=1), "1. project: Q | K | V\n(T, D) each, T=6, D=4"),
            (scores, "2. scores Q K^T / sqrt(D)\n(T, S)"),
            (weights[0, 0], "3. softmax over keys\n(T, S), rows sum to 1"),
            (output[0, 0], "4. weighted sum P V\n(T, D_v)"),
        ]
        for ax, (matrix, title) in zip(axes, panels):
            image = ax.imshow(matrix.numpy(), cmap="viridis" if "softmax" in title else "coolwarm")
            figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks(range(T))
        figure.tight_layout()
    return figure


def memory_explosion() -> Figure:
    """Bytes of the T x T score matrices in fp16 from 1K to 1M tokens, against accelerator memory."""
    lengths = [2**p for p in range(10, 21)]
    per_head = [score_memory(T, 1, 1, 1, "float16")["one_matrix"] for T in lengths]
    per_layer = [score_memory(T, 32, 1, 1, "float16")["one_layer"] for T in lengths]
    ax = new_axes(figsize=(6.5, 4.2))
    with plt.rc_context(STYLE):
        ax.plot(lengths, per_head, marker="o", label="one head (T x T, fp16)")
        ax.plot(lengths, per_layer, marker="o", label="one layer, 32 heads")
        for name in ("RTX-4090 (24 GB)", "H100-SXM (80 GB)"):
            ax.axhline(ACCELERATOR_MEMORY_GIB[name] * 2**30, linestyle="--", color="grey", linewidth=1)
            ax.text(lengths[0], ACCELERATOR_MEMORY_GIB[name] * 2**30 * 1.15, name, fontsize=8, color="grey")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_locator(LogLocator(base=1024))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: format_bytes(y)))
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("bytes")
        ax.set_title("The quadratic wall: score-matrix memory")
        ax.legend(frameon=False, loc="lower right")
    return ax.figure


def task_masks() -> Figure:
    """The masks of four uses of attention: encoder, causal training, prefill and one decode step."""
    T = 8
    masks = [
        (torch.ones(T, T, dtype=torch.bool), "encoder (bidirectional)"),
        (causal_mask(T), "causal training"),
        (causal_mask(5), "prefill of a 5-token prompt"),
        (causal_mask(1, 6), "decode: 1 query, 6 cached keys"),
    ]
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(1, 4, figsize=(14, 3.6))
        for ax, (mask, title) in zip(axes, masks):
            plot_mask(mask, ax=ax, title=title)
        figure.tight_layout()
    return figure


FIGURES: dict[str, Callable[[], Figure]] = {
    "01_attention_steps": attention_steps,
    "01_memory_explosion": memory_explosion,
    "01_task_masks": task_masks,
}
