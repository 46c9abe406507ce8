"""The one recurrence of chapter 07, as a readable reference: decay, then write, then read.

Every method of :mod:`course_lib.recurrent` keeps a state ``S`` (for one head a ``D_k x D_v``
matrix) and does three things per token::

    S_t = decay_t(S_{t-1})          forget part of what is stored
    S_t = S_t + write_t(S_t)        store something about the token (may look at the state)
    o_t = read_t(S_t)               answer the query, usually S_t^T (scale * q_t)

The methods differ only in those three functions. :func:`run_recurrence` is that loop, once; the
``form="recurrent"`` of every method, and chapter 07's gate explorer, call it with their own
functions. It is the naive reference that the chunk forms are tested against, so it is written
for reading, not speed: one Python step per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..checks import check_bool, check_int

__all__ = ["State", "run_recurrence", "read_state"]

State = torch.Tensor | tuple[torch.Tensor, ...]


def _add(state: State, update: State) -> State:
    if isinstance(state, tuple):
        return tuple(s + u for s, u in zip(state, update, strict=True))
    return state + update


def run_recurrence(
    steps: int,
    state: State,
    *,
    write: Callable[[int, State], State],
    read: Callable[[int, State], torch.Tensor],
    decay: Callable[[int, State], State] | None = None,
    read_first: bool = False,
) -> tuple[torch.Tensor, State]:
    """Run ``steps`` tokens of ``S_t = decay(t, S_{t-1}) + write(t, .)``, reading after each step.

    Args:
        steps: number of tokens T, at least 1 (the methods answer T = 0 before calling it).
        state: the state before the first token, e.g. ``(B, H, D_k, D_v)``; a tuple of tensors
            for methods with several state pieces (each piece is decayed and written together).
        decay: ``decay(t, S) -> G_t * S``; None for no forgetting.
        write: ``write(t, S) -> the term added to S``; it sees the decayed state (the delta rule
            writes the error of what the state already returns for ``k_t``).
        read: ``read(t, S) -> o_t`` of shape ``(B, H, D_v)``.
        read_first: read the state *before* decaying and writing (RWKV reads ``S_{t-1}``).

    Returns:
        ``(o, S_T)`` with ``o`` of shape ``(B, H, T, D_v)`` (the reads stacked on dim 2).
    """
    steps = check_int(steps, "steps", min=1)
    check_bool(read_first, "read_first")
    outputs = []
    for t in range(steps):
        if read_first:
            outputs.append(read(t, state))
        if decay is not None:
            state = decay(t, state)
        state = _add(state, write(t, state))
        if not read_first:
            outputs.append(read(t, state))
    return torch.stack(outputs, dim=2), state


def read_state(query: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The usual read ``S^T q`` for every batch element and head: q (B, H, D_k), S (B, H, D_k, D_v)."""
    return torch.einsum("bhk,bhkv->bhv", query, state)
