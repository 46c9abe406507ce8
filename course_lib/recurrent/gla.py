"""Gated Linear Attention (GLA): a data-dependent decay for every key dimension.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,        o_t = S_t^T (scale * q_t),

with ``g_t`` of shape (D_k,) computed from the input (in the GLA layer, a low-rank projection
through ``logsigmoid``). Each row of the state forgets at its own rate. (Gated Linear Attention
Transformers with Hardware-Efficient Training, Yang, Wang, Shen, Panda and Kim, 2024.)

The chunk form never exponentiates a positive number: see ``_common.chunk_gated_scan``.
"""

from __future__ import annotations

import torch

from ..checks import check_attention_inputs, check_shape, check_tensor
from ._common import check_log_gate, check_options, check_scale, check_state, chunk_gated_scan, compute_dtype

__all__ = ["gla"]


def _gla_recurrent(q, k, v, g, scale, initial_state):
    """Naive reference: q, k, g (B, H, T, D_k); v (B, H, T, D_v). Returns (o, final state)."""
    B, H, T, D_k = q.shape
    state = q.new_zeros(B, H, D_k, v.shape[-1]) if initial_state is None else initial_state
    outputs = []
    for t in range(T):
        state = g[:, :, t, :, None].exp() * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, state))
    return torch.stack(outputs, dim=2), state


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
    B, H, T, S, D_k, D_v = check_attention_inputs(q, k, v)
    if S != T:
        raise ValueError(f"k must have the same length T={T} as q, got k {tuple(k.shape)}")
    check_options(form, chunk_size, output_final_state, ("recurrent", "chunk"))
    check_tensor(g, "g", ndim=4, floating=True)
    check_shape(g, "g", (B, H, T, D_k), names="B, H, T, D_k")
    check_log_gate(g, "g")
    scale = check_scale(scale, D_k)
    check_state(initial_state, (B, H, D_k, D_v), q.device)

    input_dtype, dtype = q.dtype, compute_dtype(q)
    q, k, v, g = (x.to(dtype) for x in (q, k, v, g))
    state = None if initial_state is None else initial_state.to(dtype)
    if form == "recurrent":
        o, state = _gla_recurrent(q, k, v, g, scale, state)
    else:
        o, state = chunk_gated_scan(q * scale, k, v, g, chunk_size, state)
    o = o.to(input_dtype)
    return (o, state) if output_final_state else o
