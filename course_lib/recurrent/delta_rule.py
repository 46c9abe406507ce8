"""DeltaNet and Gated DeltaNet: the state is corrected towards each new value, not just added to.

In the (D_k, D_v) layout, with a write strength beta_t in [0, 1] and (for the gated rule) a log
decay g_t <= 0, decay first, then write the *error* of the decayed state:

    S'_t = exp(g_t) S_{t-1}
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T  =  (I - beta_t k_t k_t^T) S'_t + beta_t k_t v_t^T
    o_t  = S_t^T (scale * q_t).

With ``||k_t|| = 1`` and beta_t = 1 the old value stored under k_t is replaced by v_t: an overwrite,
where linear attention could only add. (Parallelizing Linear Transformers with the Delta Rule over
Sequence Length, Yang et al., 2024; Gated Delta Networks, Yang, Kautz and Hatamizadeh, 2025.)
These functions do not normalise k; the layer L2-normalises it so that the update is stable.

The chunk form (the WY / UT-transform representation): inside a chunk the corrections
``u_t = beta_t (v_t - S'_t^T k_t)`` depend on each other only through a unit lower-triangular
system, ``(I + A) U = diag(beta) (V - diag(exp(b)) K S_0)`` with
``A[t, s] = beta_t exp(b_t - b_s) (k_t . k_s)`` for s < t, solved once per chunk; then
``S_t = exp(b_t) S_0 + sum_{s <= t} exp(b_t - b_s) k_s u_s^T`` reads like gated linear attention.
"""

from __future__ import annotations

import torch

from ..checks import check_attention_inputs
from ._common import (
    causal_log_decay,
    check_log_gate,
    check_options,
    check_per_step,
    check_scale,
    check_state,
    compute_dtype,
    pad_time,
    scan_chunk_states,
)

__all__ = ["delta_rule", "gated_delta_rule"]


def _delta_rule_recurrent(q, k, v, beta, scale, state):
    """Naive reference for DeltaNet: q, k (B, H, T, D_k); v (B, H, T, D_v); beta (B, H, T)."""
    outputs = []
    for t in range(q.shape[2]):
        error = v[:, :, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, :, t])
        state = state + beta[:, :, t, None, None] * k[:, :, t, :, None] * error[:, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, state))
    return torch.stack(outputs, dim=2), state


def _gated_delta_rule_recurrent(q, k, v, g, beta, scale, state):
    """Naive reference for Gated DeltaNet: decay the state by exp(g_t), then the delta update."""
    outputs = []
    for t in range(q.shape[2]):
        state = g[:, :, t, None, None].exp() * state
        error = v[:, :, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, :, t])
        state = state + beta[:, :, t, None, None] * k[:, :, t, :, None] * error[:, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, state))
    return torch.stack(outputs, dim=2), state


def delta_chunk_scan(q, k, v, beta, g, chunk_size, state, block_size=1):
    """Chunkwise (WY / UT-transform) form of the (gated) delta rule; q already scaled.

    g may be None (no decay). ``block_size`` > 1 gives the mini-batch delta rule of TTT: a token's
    correction sees the state as of the start of its block, so ``A[t, s]`` is kept only for s in an
    earlier block (it must divide ``chunk_size`` for blocks to line up with chunks).
    Returns (o, final state).
    """
    B, H, T, D_k = q.shape
    D_v = v.shape[-1]
    size = min(chunk_size, T)
    g = q.new_zeros(B, H, T) if g is None else g
    q, k, v, beta, g = (pad_time(x, size) for x in (q, k, v, beta[..., None], g[..., None]))
    N = q.shape[2] // size
    q, k, v = (x.reshape(B, H, N, size, x.shape[-1]) for x in (q, k, v))
    beta, b = beta.reshape(B, H, N, size, 1), g.reshape(B, H, N, size).cumsum(dim=-1)

    relative_decay = causal_log_decay(b).exp()  # (B, H, N, size, size): exp(b_t - b_s), s <= t
    position = torch.arange(size, device=q.device) // block_size
    earlier_block = position[:, None] > position[None, :]
    A = (beta * (k @ k.transpose(-1, -2)) * relative_decay).masked_fill(~earlier_block, 0.0)
    identity = torch.eye(size, dtype=q.dtype, device=q.device)
    # U = (I + A)^{-1} diag(beta) (V - diag(exp(b)) K S_0) = U_values - W S_0: one solve, both parts.
    solved = torch.linalg.solve_triangular(
        identity + A, beta * torch.cat([v, b.exp()[..., None] * k], dim=-1), upper=False, unitriangular=True
    )
    U_values, W = solved[..., :D_v], solved[..., D_v:]

    # With U = U_values - W S_n, a chunk's output and next state are linear in its start state S_n:
    #   o = (q exp(b) - scores W) S_n + scores U_values
    #   S_{n+1} = (exp(b_C) I - K_end^T W) S_n + K_end^T U_values
    # so every product except the chunk-to-chunk recurrence is done for all chunks at once.
    scores = (q @ k.transpose(-1, -2)) * relative_decay
    k_to_end_t = (k * (b[..., -1:] - b).exp()[..., None]).transpose(-1, -2)
    key_identity = torch.eye(D_k, dtype=q.dtype, device=q.device)
    transition = b[..., -1, None, None].exp() * key_identity - k_to_end_t @ W
    states, state = scan_chunk_states(transition, k_to_end_t @ U_values, state)
    o = (q * b.exp()[..., None] - scores @ W) @ states + scores @ U_values
    return o.reshape(B, H, N * size, D_v)[:, :, :T], state


def _check_beta(beta: object, q: torch.Tensor) -> torch.Tensor:
    check_per_step(beta, "beta", q)
    assert isinstance(beta, torch.Tensor)
    if not bool(((beta >= 0) & (beta <= 1)).all()):
        raise ValueError("beta must lie in [0, 1] (a write strength)")
    return beta


def _run(q, k, v, beta, g, form, chunk_size, scale, initial_state, output_final_state):
    """Checks shared by both rules, then dispatch to the recurrent or chunk form."""
    B, H, T, S, D_k, D_v = check_attention_inputs(q, k, v)
    if S != T:
        raise ValueError(f"k must have the same length T={T} as q, got k {tuple(k.shape)}")
    check_options(form, chunk_size, output_final_state, ("recurrent", "chunk"))
    _check_beta(beta, q)
    if g is not None:
        check_per_step(g, "g", q)
        check_log_gate(g, "g")
    scale = check_scale(scale, D_k)
    check_state(initial_state, (B, H, D_k, D_v), q.device)

    input_dtype, dtype = q.dtype, compute_dtype(q)
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    g = None if g is None else g.to(dtype)
    state = q.new_zeros(B, H, D_k, D_v) if initial_state is None else initial_state.to(dtype)
    if form == "recurrent" and g is None:
        o, state = _delta_rule_recurrent(q, k, v, beta, scale, state)
    elif form == "recurrent":
        o, state = _gated_delta_rule_recurrent(q, k, v, g, beta, scale, state)
    else:
        o, state = delta_chunk_scan(q * scale, k, v, beta, g, chunk_size, state)
    o = o.to(input_dtype)
    return (o, state) if output_final_state else o


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    form: str = "chunk",
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """DeltaNet: ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = S_t^T (scale q_t)``.

    q, k: (B, H, T, D_k); v: (B, H, T, D_v); beta: (B, H, T) in [0, 1]. k is used as given.
    initial_state (B, H, D_k, D_v) or None. Returns o (B, H, T, D_v) in q's dtype, plus the final
    state (float32, or float64 for float64 inputs) when ``output_final_state``.
    """
    return _run(q, k, v, beta, None, form, chunk_size, scale, initial_state, output_final_state)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    form: str = "chunk",
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet: ``S_t = (I - beta_t k_t k_t^T) exp(g_t) S_{t-1} + beta_t k_t v_t^T``.

    As :func:`delta_rule`, with g: (B, H, T) log decays <= 0. g = 0 gives the delta rule.
    """
    if g is None:
        raise TypeError("g must be a torch.Tensor of log decays, got NoneType")
    return _run(q, k, v, beta, g, form, chunk_size, scale, initial_state, output_final_state)
