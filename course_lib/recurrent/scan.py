"""The parallel scan of a diagonal linear recurrence: ``h_t = exp(g_t) * h_{t-1} + x_t``.

Mamba-1's selective scan and HGRN are this recurrence, element by element. Written as pairs
``(g_t, x_t)`` (a log decay and an input), one step is the map ``h -> exp(g) h + x``, and two
steps compose into one step of the same kind:

    (g_1, x_1) then (g_2, x_2)  =  (g_1 + g_2, exp(g_2) x_1 + x_2).

That combine is associative, so all prefixes ``h_1 .. h_T`` can be computed in O(log T) rounds
instead of T sequential steps (a *parallel prefix scan*). The combine keeps the decays in log
space and only ever exponentiates ``g_2 <= 0``: every factor lies in [0, 1], nothing grows, and a
cumulative log decay of -800 (past float64's range) is harmless. The tempting shortcut
``h_t = P_t * cumsum(x_s / P_s)`` with ``P_t = exp(g_1 + ... + g_t)`` divides by ``P_s``, which
overflows to inf as soon as the sequence has forgotten more than about e^88 (float32) or e^709
(float64).
"""

from __future__ import annotations

import torch

__all__ = ["associative_scan", "chunked_scan"]


def _combine(earlier: tuple[torch.Tensor, torch.Tensor], later: tuple[torch.Tensor, torch.Tensor]):
    """``(g_1, x_1)`` followed by ``(g_2, x_2)`` as one step: ``(g_1 + g_2, exp(g_2) x_1 + x_2)``."""
    (g_1, x_1), (g_2, x_2) = earlier, later
    return g_1 + g_2, torch.exp(g_2) * x_1 + x_2


def _scan(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive prefixes of the pairs along dim -2, by recursive pairing (2 log2 T rounds, O(T) work).

    1. Combine neighbours (0, 1), (2, 3), ...: a sequence of half the length.
    2. Scan it: its prefixes are the prefixes of the full sequence at the odd positions 1, 3, 5, ...
    3. The prefix at an even position 2i is the prefix at 2i - 1 combined with element 2i.
    (The up-sweep / down-sweep of Blelloch's work-efficient scan, written as a recursion.)
    """
    T = g.shape[-2]
    if T <= 1:
        return g, x
    if T % 2:  # pad with the identity step (g = 0, x = 0), which changes no prefix
        g, x = (torch.nn.functional.pad(t, (0, 0, 0, 1)) for t in (g, x))
    g_even, g_odd, x_even, x_odd = g[..., 0::2, :], g[..., 1::2, :], x[..., 0::2, :], x[..., 1::2, :]
    G_odd, H_odd = _scan(*_combine((g_even, x_even), (g_odd, x_odd)))
    G_rest, H_rest = _combine(
        (G_odd[..., :-1, :], H_odd[..., :-1, :]), (g_even[..., 1:, :], x_even[..., 1:, :])
    )
    G_even = torch.cat([g_even[..., :1, :], G_rest], dim=-2)
    H_even = torch.cat([x_even[..., :1, :], H_rest], dim=-2)
    # Interleave even and odd positions back into time order, then drop the padding step.
    G = torch.stack([G_even, G_odd], dim=-2).flatten(-3, -2)[..., :T, :]
    H = torch.stack([H_even, H_odd], dim=-2).flatten(-3, -2)[..., :T, :]
    return G, H


def associative_scan(
    g: torch.Tensor, x: torch.Tensor, initial: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All states of ``h_t = exp(g_t) * h_{t-1} + x_t`` at once, along dim -2 (time).

    g: log decays (..., T, N), each <= 0; x: inputs, same shape; initial: ``h_0`` (..., N) or None
    (zeros). Returns ``(G, h)``: ``G_t = g_1 + ... + g_t`` (the log decay from the start to t,
    which the chunked scans use to carry a state into a chunk) and ``h`` (..., T, N).
    Depth 2 log2 T, about 2T combines; float64 stays float64.
    """
    if initial is not None:  # the first step also decays the initial state: fold it into x_1
        first = torch.exp(g[..., :1, :]) * initial[..., None, :] + x[..., :1, :]
        x = torch.cat([first, x[..., 1:, :]], dim=-2)
    return _scan(g, x)


def chunked_scan(
    g: torch.Tensor, x: torch.Tensor, chunk_size: int, initial: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same states chunk by chunk: a parallel scan inside each chunk, the state carried across.

    g, x: (..., T, N); initial: (..., N) or None. Returns ``(h, h_T)`` with h (..., T, N). This is
    the loop of a fused scan kernel: ``chunk_size = 1`` is the sequential recurrence, a chunk as
    long as the sequence is :func:`associative_scan`.
    """
    if initial is None:
        initial = x.new_zeros(*x.shape[:-2], x.shape[-1])
    states = [x[..., :0, :]]  # an empty sequence gives no states and keeps the initial one
    for start in range(0, x.shape[-2], chunk_size):
        _, h = associative_scan(
            g[..., start : start + chunk_size, :], x[..., start : start + chunk_size, :], initial
        )
        states.append(h)
        initial = h[..., -1, :]
    return torch.cat(states, dim=-2), initial
