"""Chapter 01's figures: the four steps of attention, the memory explosion, the masks of each task,
and what the relative position schemes add to the scores."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from ..measure import format_bytes
from ..relative_positions import t5_buckets, untrained_position_fraction
from ..standard import alibi_slopes, attention, causal_mask
from ..studies.score_memory import ACCELERATOR_MEMORY_GIB, score_memory
from ..viz import STYLE, new_axes, plot_mask

__all__ = ["FIGURES", "attention_steps", "memory_explosion", "task_masks", "relative_positions"]


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


def relative_positions(train_length: int = 64) -> Figure:
    """What each relative scheme adds at each distance, and what a longer input meets untrained.

    Left: ALiBi's fixed bias for 8 heads. Middle: T5's bucket for each distance (32 buckets,
    ``max_distance`` 128, causal and bidirectional) and Shaw's clipped row (``k`` = 16). Right: the
    share of causal (query, key) pairs at a longer length whose position parameter was never used
    in training at ``train_length``: T5's far buckets stay untrained unless training reaches
    ``max_distance`` (:func:`course_lib.relative_positions.untrained_position_fraction`).
    """
    distances = torch.arange(0, 513)
    with plt.rc_context(STYLE):
        figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
        for head, slope in enumerate(alibi_slopes(8).tolist()):
            left.plot(distances[:65], -slope * distances[:65], label=f"head {head}, slope {slope:.3g}")
        left.set_xlabel("distance i - j")
        left.set_ylabel("bias added to the score")
        left.set_title("ALiBi: fixed linear penalties, one slope per head")
        left.legend(frameon=False, fontsize=7)
        middle.plot(distances, t5_buckets(-distances, bidirectional=False), label="T5 causal: 32 buckets")
        middle.plot(
            distances, t5_buckets(-distances, bidirectional=True), label="T5 bidirectional: 16 per side"
        )
        middle.plot(distances, distances.clamp(max=16), label="Shaw: clip(i - j, 16)")
        middle.axvline(128, color="grey", linestyle=":", linewidth=1)
        middle.text(132, 2, "max_distance 128", color="grey", fontsize=8)
        middle.set_xscale("symlog", linthresh=16)
        middle.set_xlim(0, 512)
        middle.set_xlabel("distance i - j (symlog)")
        middle.set_ylabel("learned parameter used (bucket or row)")
        middle.set_title("T5: exact near, log-spaced far; Shaw: clipped")
        middle.legend(frameon=False, fontsize=8)
        lengths = [train_length * 2**p for p in range(0, 5)]
        for (scheme, max_distance, label), marker in zip(
            (
                ("learned absolute", 0, "learned absolute"),
                ("t5", 128, "T5, max_distance 128"),
                ("t5", 32, "T5, max_distance 32"),
                ("shaw", 16, "Shaw, k = 16"),
            ),
            "osD^",
        ):
            fractions = [
                untrained_position_fraction(scheme, train_length, L, max_distance=max_distance or 128)
                for L in lengths
            ]
            right.plot(lengths, fractions, marker=marker, label=label)
        right.set_xscale("log", base=2)
        right.set_ylim(-0.02, 1)
        right.set_xlabel("evaluation length")
        right.set_ylabel("share of causal pairs")
        right.set_title(f"pairs whose parameter was never trained\n(trained at T = {train_length})")
        right.legend(frameon=False, fontsize=8)
        figure.tight_layout()
    return figure


FIGURES: dict[str, Callable[[], Figure]] = {
    "01_attention_steps": attention_steps,
    "01_memory_explosion": memory_explosion,
    "01_task_masks": task_masks,
    "01_relative_positions": relative_positions,
}
