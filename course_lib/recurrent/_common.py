"""Machinery shared by the recurrent methods: the envelope and the chunkwise gated scan.

The envelope is what every method's public function does around its forms, written once: check
the inputs (:func:`check_recurrent_inputs`), start from zeros when no state is given
(:func:`zero_state`), cast to the compute dtype, run the chosen form, cast back, and answer
``T = 0`` without running any form (:func:`run_form`).

Every method of chapter 07 is one recurrence over a matrix state ``S`` of shape
``(B, H, D_k, D_v)``: decay first, then write, then read,

    S_t = decay_t * S_{t-1} + write_t,        o_t = S_t^T (scale * q_t).

When the write is a plain outer product ``k_t v_t^T`` and the decay is diagonal (a scalar per
head, or one number per key dimension), the chunkwise form below computes the same outputs
with matrix products: inside a chunk like masked attention, across chunks through the state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..checks import (
    check_attention_inputs,
    check_bool,
    check_choice,
    check_int,
    check_shape,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from .runner import State


def check_form_options(
    form: object, forms: tuple[str, ...], chunk_size: object, output_final_state: object
) -> None:
    """The keyword options every recurrent method shares: ``form``, ``chunk_size``, ``output_final_state``."""
    check_choice(form, "form", forms)
    check_int(chunk_size, "chunk_size", min=1)
    check_bool(output_final_state, "output_final_state")


def check_sequence_inputs(q: object, k: object, v: object, query_name: str = "q") -> tuple[int, ...]:
    """q, k ``(B, H, T, D_k)`` and v ``(B, H, T, D_v)``, one length T; returns ``(B, H, T, D_k, D_v)``."""
    B, H, T, S, D_k, D_v = check_attention_inputs(q, k, v)
    if S != T:
        raise ValueError(f"k must have the same length T={T} as {query_name}, got k {tuple(k.shape)}")
    return B, H, T, D_k, D_v


def check_recurrent_inputs(
    q: object,
    k: object,
    v: object,
    *,
    form: object,
    forms: tuple[str, ...],
    chunk_size: object,
    scale: object,
    initial_state: object,
    output_final_state: object,
    query_name: str = "q",
) -> tuple[int, int, int, int, int, float]:
    """The checks every recurrent method shares; returns ``(B, H, T, D_k, D_v, scale)``.

    q, k: (B, H, T, D_k); v: (B, H, T, D_v); ``initial_state`` None or (B, H, D_k, D_v) (a method
    with a tuple state passes None here and checks its own); the scale follows the course's one
    rule (:func:`course_lib.checks.resolve_scale`).
    """
    B, H, T, D_k, D_v = check_sequence_inputs(q, k, v, query_name)
    check_form_options(form, forms, chunk_size, output_final_state)
    check_state(initial_state, (B, H, D_k, D_v), q.device)
    return B, H, T, D_k, D_v, resolve_scale(scale, D_k)


def run_form(
    forms: Mapping[str, Callable[..., tuple[torch.Tensor, State]]],
    form: str,
    tensors: Sequence[torch.Tensor],
    state: State,
    *,
    value_dim: int,
    output_final_state: bool,
) -> torch.Tensor | tuple[torch.Tensor, State]:
    """The envelope every recurrent method shares: cast in, run the chosen form, cast back.

    ``tensors`` (queries first) and ``state`` are cast to the compute dtype (float32 for half
    inputs, float64 kept); ``forms[form](*tensors, state)`` returns ``(o, final_state)``. For
    T = 0 no form runs: the output is ``(B, H, 0, value_dim)`` and the final state is ``state``.
    Returns ``o`` in the queries' dtype, and the final state (compute dtype) when asked.
    """
    input_dtype, dtype = tensors[0].dtype, compute_dtype(tensors[0])
    tensors = [x.to(dtype) for x in tensors]
    state = tuple(s.to(dtype) for s in state) if isinstance(state, tuple) else state.to(dtype)
    B, H, T = tensors[0].shape[:3]
    if T == 0:
        o = tensors[0].new_zeros(B, H, 0, value_dim)
    else:
        o, state = forms[form](*tensors, state)
    o = o.to(input_dtype)
    return (o, state) if output_final_state else o


def zero_state(
    q: torch.Tensor, key_dim: int, value_dim: int, initial_state: torch.Tensor | None
) -> torch.Tensor:
    """``initial_state`` as given, or zeros of shape (B, H, D_k, D_v) on q's device."""
    if initial_state is not None:
        return initial_state
    return torch.zeros(*q.shape[:2], key_dim, value_dim, device=q.device, dtype=compute_dtype(q))


def check_per_step(x: object, name: str, like: torch.Tensor) -> torch.Tensor:
    """Check a per-token tensor of shape ``(B, H, T)`` (gates, beta, dt, learning rates)."""
    check_tensor(x, name, ndim=3, floating=True)
    assert isinstance(x, torch.Tensor)
    check_shape(x, name, like.shape[:3], names="B, H, T")
    return x


def check_log_gate(g: torch.Tensor, name: str) -> None:
    """Log-space forget gates must be finite and <= 0 (a decay in (0, 1])."""
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{name} must be finite (a log decay); got inf or NaN")
    if bool((g > 0).any()):
        raise ValueError(f"{name} must be <= 0 (log of a decay in (0, 1]); got max {g.max().item():.3g}")


def check_state(initial_state: object, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """``initial_state`` is None or a float tensor of shape ``(B, H, D_k, D_v)``."""
    if initial_state is None:
        return None
    check_tensor(initial_state, "initial_state", ndim=4, floating=True)
    assert isinstance(initial_state, torch.Tensor)
    check_shape(initial_state, "initial_state", shape, names="B, H, D_k, D_v")
    if initial_state.device != device:
        raise ValueError(f"initial_state must be on {device} like q, got {initial_state.device}")
    return initial_state


def pad_time(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 2 (time) up to a multiple; zero keys, values and log gates change nothing."""
    extra = (-x.shape[2]) % multiple
    if extra == 0:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, extra))


def causal_log_decay(b: torch.Tensor) -> torch.Tensor:
    """``(..., C)`` cumulative log decays -> ``(..., C, C)`` with ``b_t - b_s`` for s <= t, -inf above.

    The difference is at most 0 on and below the diagonal, so its exponential never overflows.
    """
    C = b.shape[-1]
    below = torch.ones(C, C, dtype=torch.bool, device=b.device).tril()
    return (b[..., :, None] - b[..., None, :]).masked_fill(~below, float("-inf"))


def _intra_scores_vector(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor, sub_size: int) -> torch.Tensor:
    """``A[t, s] = sum_d q_td k_sd exp(b_td - b_sd)`` for s <= t inside a chunk, with per-dim gates.

    ``exp(b_t)`` and ``exp(-b_s)`` must never be formed apart (the second overflows once the chunk
    has forgotten enough), so the chunk is cut into sub-blocks of ``sub_size`` steps. A diagonal
    block is computed in log space with a ``(c, c, D_k)`` tensor. A block (j, i) below the diagonal
    factorises through the end ``e_i`` of key block i and the end ``r_j`` of the block before j:
    ``exp(b_t - r_j) * exp(r_j - e_i) * exp(e_i - b_s)``, three factors that are each <= 1.
    """
    C, D_k = q.shape[-2], q.shape[-1]
    extra = (-C) % sub_size
    if extra:  # pad with zero queries/keys; repeating the last b keeps every exponent <= 0
        q, k = (torch.nn.functional.pad(x, (0, 0, 0, extra)) for x in (q, k))
        b = torch.cat([b, b[..., -1:, :].expand(*b.shape[:-2], extra, D_k)], dim=-2)
    size = C + extra
    M = size // sub_size
    q_blocks, k_blocks, b_blocks = (x.reshape(*x.shape[:-2], M, sub_size, D_k) for x in (q, k, b))

    # Diagonal blocks in log space, (..., M, c, c, D_k); entries above the diagonal are clamped
    # to exp(0) before the exponential (no overflow) and removed by the mask afterwards.
    relative = (b_blocks[..., :, None, :] - b_blocks[..., None, :, :]).clamp(max=0.0).exp()
    diagonal = torch.einsum("...tk,...sk,...tsk->...ts", q_blocks, k_blocks, relative)
    diagonal = diagonal * torch.ones(sub_size, sub_size, dtype=q.dtype, device=q.device).tril()
    on_diagonal = torch.eye(M, dtype=q.dtype, device=q.device)[:, None, :, None]
    scores = diagonal[..., :, :, None, :] * on_diagonal  # (..., M, c, M, c)
    if M > 1:
        block_end = b_blocks[..., -1, :]  # (..., M, D_k): e_i
        before_block = torch.cat([torch.zeros_like(block_end[..., :1, :]), block_end[..., :-1, :]], dim=-2)
        q_scaled = q_blocks * (b_blocks - before_block[..., None, :]).exp()
        k_scaled = k_blocks * (block_end[..., None, :] - b_blocks).exp()
        earlier = torch.ones(M, M, dtype=q.dtype, device=q.device).tril(-1)  # key block i < query block j
        between = (before_block[..., :, None, :] - block_end[..., None, :, :]).clamp(max=0.0).exp()
        between = between * earlier[..., None]  # (..., M_j, M_i, D_k)
        off = (q_scaled[..., :, None, :, :] * between[..., :, :, None, :]) @ k_scaled[
            ..., None, :, :, :
        ].transpose(-1, -2)  # (..., M_j, M_i, c, c)
        scores = scores + off.transpose(-2, -3)
    return scores.reshape(*q.shape[:-2], size, size)[..., :C, :C]


def scan_chunk_states(
    transition: torch.Tensor, write: torch.Tensor, initial_state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The only sequential step of a chunk form: ``S_{n+1} = transition_n S_n + write_n``.

    transition: (B, H, N, D_k) for a diagonal decay, or (B, H, N, D_k, D_k) for a full matrix
    (the delta rule); write: (B, H, N, D_k, D_v). Returns ``(states, final)``: the state each
    chunk starts from, (B, H, N, D_k, D_v), and the state after the last chunk. Every other
    product of a chunk form is computed for all chunks at once, outside this short loop.
    """
    B, H, N, D_k, D_v = write.shape
    state = write.new_zeros(B, H, D_k, D_v) if initial_state is None else initial_state
    diagonal = transition.dim() == 4
    states = []
    for n in range(N):
        states.append(state)
        if diagonal:
            state = torch.addcmul(write[:, :, n], transition[:, :, n, :, None], state)
        else:
            state = torch.baddbmm(
                write[:, :, n].reshape(B * H, D_k, D_v),
                transition[:, :, n].reshape(B * H, D_k, D_k),
                state.reshape(B * H, D_k, D_v),
            ).view(B, H, D_k, D_v)
    return torch.stack(states, dim=2), state


def chunk_gated_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None,
    sub_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise form of ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``.

    q, k: (B, H, T, D_k), already scaled; v: (B, H, T, D_v); g: (B, H, T, D_k) log gates per key
    dimension, or (B, H, T, 1) for one scalar gate per head and step. All in the compute dtype.
    Returns ``(o, S_T)``. Inside a chunk the output is masked attention with relative decays
    ``exp(b_t - b_s)`` (``b`` the within-chunk cumulative log gate); across chunks the state is
    carried: read with ``q_t exp(b_t)``, written with ``k_s exp(b_C - b_s)``, decayed by ``exp(b_C)``.
    Every exponent is <= 0, so nothing overflows however strong the forgetting.
    """
    B, H, T, D_k = q.shape
    D_v = v.shape[-1]
    C = min(chunk_size, T)
    q, k, v, g = (pad_time(x, C) for x in (q, k, v, g))
    N = q.shape[2] // C
    q, k, v, g = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v, g))
    b = g.cumsum(dim=-2)  # within-chunk cumulative log decay, <= 0 and decreasing

    # Everything that does not depend on the carried state, for all chunks in one go.
    if g.shape[-1] == 1:  # scalar gate: the relative decay is one (C, C) matrix per chunk
        scores = (q @ k.transpose(-1, -2)) * causal_log_decay(b[..., 0]).exp()
        inside = scores @ v
    else:  # chunk by chunk: the (C, C, D_k)-sized temporaries of one chunk fit in cache, all do not
        sub_size = min(sub_size, C)
        inside = torch.stack(
            [
                _intra_scores_vector(q[:, :, n], k[:, :, n], b[:, :, n], sub_size) @ v[:, :, n]
                for n in range(N)
            ],
            dim=2,
        )
    k_to_end = k * (b[..., -1:, :] - b).exp()
    chunk_decay = b[..., -1, :].exp().expand(B, H, N, D_k)
    states, state = scan_chunk_states(chunk_decay, k_to_end.transpose(-1, -2) @ v, initial_state)
    o = torch.baddbmm(
        inside.reshape(-1, C, D_v), (q * b.exp()).reshape(-1, C, D_k), states.reshape(-1, D_k, D_v)
    )
    return o.reshape(B, H, N * C, D_v)[:, :, :T], state
