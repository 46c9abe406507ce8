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

from ._common import (
    causal_log_decay,
    check_log_gate,
    check_per_step,
    check_recurrent_inputs,
    pad_time,
    run_form,
    scan_chunk_states,
    zero_state,
)
from .runner import read_state, run_recurrence

__all__ = ["delta_rule", "gated_delta_rule"]


def _delta_rule_recurrent(q, k, v, g, beta, scale, state):
    """Naive reference: decay by exp(g_t) (no decay when g is None), then write the error
    ``beta_t k_t (v_t - S^T k_t)^T`` of the decayed state, then read. q, k (B, H, T, D_k)."""

    def write(t, S):
        error = v[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, :, t])
        return beta[:, :, t, None, None] * k[:, :, t, :, None] * error[:, :, None, :]

    return run_recurrence(
        q.shape[2],
        state,
        decay=None if g is None else lambda t, S: g[:, :, t, None, None].exp() * S,
        write=write,
        read=lambda t, S: read_state(q[:, :, t] * scale, S),
    )


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
    """Checks shared by both rules, then the envelope around the recurrent or chunk form."""
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
    _check_beta(beta, q)
    if g is not None:
        check_per_step(g, "g", q)
        check_log_gate(g, "g")
    if g is None:  # DeltaNet: no decay
        tensors = (q, k, v, beta)
        forms = {
            "recurrent": lambda q, k, v, beta, S: _delta_rule_recurrent(q, k, v, None, beta, scale, S),
            "chunk": lambda q, k, v, beta, S: delta_chunk_scan(q * scale, k, v, beta, None, chunk_size, S),
        }
    else:
        tensors = (q, k, v, beta, g)
        forms = {
            "recurrent": lambda q, k, v, beta, g, S: _delta_rule_recurrent(q, k, v, g, beta, scale, S),
            "chunk": lambda q, k, v, beta, g, S: delta_chunk_scan(q * scale, k, v, beta, g, chunk_size, S),
        }
    state = zero_state(q, D_k, D_v, initial_state)
    return run_form(forms, form, tensors, state, value_dim=D_v, output_final_state=output_final_state)


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
