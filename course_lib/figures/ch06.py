"""Chapter 06's figure: the parallel, recurrent and chunkwise forms of causal linear attention."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from ..linear import linear_attention_matrix
from ..studies.linear_forms import draw_schedule, schedule_matrix
from ..viz import STYLE

__all__ = ["FIGURES", "three_forms"]


def three_forms() -> Figure:
    """Three panels on one 12-token causal sequence (elu+1 features, D = 4, chunks of 4).

    Parallel: the masked matrix phi(Q) phi(K)^T itself, O(T^2 D). Recurrent: every row reads the
    state S_t = S_{t-1} + phi(k_t) v_t^T, O(T D^2) and T sequential steps. Chunk: inside a chunk the
    masked matrix, across chunks the state, O(T C D + T D^2) in T / C steps.
    """
    T, chunk_size = 12, 4
    generator = torch.Generator().manual_seed(6)
    q, k = (torch.randn(1, 1, T, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    matrix = linear_attention_matrix(q, k, normalize=False)[0, 0]
    matrix = matrix.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("nan"))
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(1, 3, figsize=(15, 4.8))
        image = axes[0].imshow(matrix.numpy(), cmap="viridis")
        figure.colorbar(image, ax=axes[0], fraction=0.046, pad=0.04)
        axes[0].set_xlabel("key")
        axes[0].set_ylabel("query")
        axes[0].set_title("parallel: masked phi(Q) phi(K)^T, then times V\nO(T^2 D) work, (T, T) memory")
        draw_schedule(schedule_matrix("recurrent", T, chunk_size, T), ax=axes[1], legend=False)
        for t in (2, 7):
            axes[1].annotate(
                f"o_{t} = S_{t}^T phi(q_{t})",
                xy=(t / 2, t),
                xytext=(T - 5.5, t - 1.8),
                fontsize=8,
                arrowprops={"arrowstyle": "->", "linewidth": 0.8},
            )
        axes[1].set_title("recurrent: S_t = S_{t-1} + phi(k_t) v_t^T\nO(T D^2) work, T sequential steps")
        draw_schedule(schedule_matrix("chunk", T, chunk_size, T), ax=axes[2], chunk_size=chunk_size)
        axes[2].set_title(
            f"chunk (C = {chunk_size}): direct inside a chunk, state across\n"
            "O(T C D + T D^2) work, T / C sequential steps"
        )
        figure.tight_layout()
    return figure


FIGURES = {"06_three_forms": three_forms}
