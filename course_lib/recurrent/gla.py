"""Gated Linear Attention (GLA): a data-dependent decay for every key dimension.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,        o_t = S_t^T (scale * q_t),

with ``g_t`` of shape (D_k,) computed from the input (in the GLA layer, a low-rank projection
through ``logsigmoid``). Each row of the state forgets at its own rate. (Gated Linear Attention
Transformers with Hardware-Efficient Training, Yang, Wang, Shen, Panda and Kim, 2024.)

The chunk form never exponentiates a positive number: see ``_common.chunk_gated_scan``.
"""

from __future__ import annotations

import torch

from ..checks import check_shape, check_tensor
from ._common import check_log_gate, check_recurrent_inputs, chunk_gated_scan, run_form, zero_state
from .runner import read_state, run_recurrence

__all__ = ["gla"]


def _gla_recurrent(q, k, v, g, scale, state):
    """Naive reference: decay every row of S by its own gate, write k v^T, read S^T (scale q)."""
    return run_recurrence(
        q.shape[2],
        state,
        decay=lambda t, S: g[:, :, t, :, None].exp() * S,
        write=lambda t, S: k[:, :, t, :, None] * v[:, :, t, None, :],
        read=lambda t, S: read_state(q[:, :, t] * scale, S),
    )


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    form: str = "chunk",
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention with log gates ``g`` (B, H, T, D_k), all <= 0.

    q, k: (B, H, T, D_k); v: (B, H, T, D_v); form "recurrent" or "chunk";
    initial_state (B, H, D_k, D_v) or None. Returns o (B, H, T, D_v) in q's dtype, plus the final
    state (float32, or float64 for float64 inputs) when ``output_final_state``.
    With ``g = 0`` this is unnormalised causal linear attention.
    """
    B, H, T, D_k, D_v, scale = check_recurrent_inputs(
        q,
        k,
        v,
        form=form,
        forms=("recurrent", "chunk"),
        chunk_size=chunk_size,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )
    check_tensor(g, "g", ndim=4, floating=True)
    check_shape(g, "g", (B, H, T, D_k), names="B, H, T, D_k")
    check_log_gate(g, "g")
    forms = {
        "recurrent": lambda q, k, v, g, S: _gla_recurrent(q, k, v, g, scale, S),
        "chunk": lambda q, k, v, g, S: chunk_gated_scan(q * scale, k, v, g, chunk_size, S),
    }
    state = zero_state(q, D_k, D_v, initial_state)
    return run_form(forms, form, (q, k, v, g), state, value_dim=D_v, output_final_state=output_final_state)
