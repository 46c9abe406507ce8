"""KV-cache eviction for long decoding: keep a fixed budget of keys, drop the rest.

Sparsity over the *cache*: when the cache would outgrow memory, choose which cached tokens to
keep. StreamingLLM keeps the first few tokens ("attention sinks", which soak up attention
whatever they contain) plus a recent window; H2O keeps the "heavy hitters" that have received
the most attention so far plus a recent window. Each policy returns the sorted indices of the
kept keys; :func:`kept_attention` attends over only those, and :func:`eviction_error` measures
how far that output moves from attention over the full cache.
"""

from __future__ import annotations

import torch

from ..checks import (
    check_attention_inputs,
    check_bool,
    check_int,
    check_like,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from ..standard import attention

__all__ = ["streaming_keep", "h2o_keep", "keep_mask", "kept_attention", "eviction_error"]


def streaming_keep(
    seq_len: int, budget: int, *, num_sinks: int = 4, device: torch.device | str | None = None
) -> torch.Tensor:
    """StreamingLLM (Xiao et al., 2023): the first ``num_sinks`` tokens plus the most recent ones.

    Returns the sorted ``(min(budget, seq_len),)`` indices of the kept keys of a cache of
    ``seq_len`` tokens; the sinks are always kept, so ``num_sinks <= budget`` is required.
    """
    seq_len = check_int(seq_len, "seq_len", min=0)
    budget = check_int(budget, "budget", min=1)
    num_sinks = check_int(num_sinks, "num_sinks", min=0, max=budget)
    if budget >= seq_len:
        return torch.arange(seq_len, device=device)
    sinks = torch.arange(num_sinks, device=device)
    recent = torch.arange(seq_len - (budget - num_sinks), seq_len, device=device)
    return torch.cat((sinks, recent))


def h2o_keep(attention_weights: torch.Tensor, budget: int, *, recent: int | None = None) -> torch.Tensor:
    """H2O (Zhang et al., 2023): the ``recent`` newest keys plus the heaviest hitters among the rest.

    ``attention_weights`` is ``(..., T, S)`` (e.g. ``(B, H, T, S)`` from a prefill); a key's
    score is the attention it received, summed over the ``T`` queries. ``recent`` defaults to
    half the budget, as in the paper. This is the one-shot form (scores from all queries at once);
    H2O's decoder applies it greedily, one eviction per generated token.

    Returns sorted indices ``(..., min(budget, S))``, one set per batch element and head.
    """
    check_tensor(attention_weights, "attention_weights", floating=True)
    if attention_weights.dim() < 2:
        raise ValueError(
            f"attention_weights must have shape (..., T, S), got {tuple(attention_weights.shape)}"
        )
    budget = check_int(budget, "budget", min=1)
    recent = budget // 2 if recent is None else check_int(recent, "recent", min=0, max=budget)
    S = attention_weights.shape[-1]
    batch_shape = attention_weights.shape[:-2]
    if budget >= S:
        return torch.arange(S, device=attention_weights.device).expand(*batch_shape, S)
    accumulated = attention_weights.to(compute_dtype(attention_weights)).sum(-2)
    older = accumulated[..., : S - recent]
    heavy = older.topk(budget - recent, dim=-1).indices
    newest = torch.arange(S - recent, S, device=attention_weights.device).expand(*batch_shape, recent)
    return torch.cat((heavy, newest), dim=-1).sort(dim=-1).values


def _check_keep(keep: object, S: int) -> torch.Tensor:
    check_tensor(keep, "keep", ndim=(1, 2, 3), dtype=(torch.int64, torch.int32))
    assert isinstance(keep, torch.Tensor)
    if keep.numel() and (keep.min() < 0 or keep.max() >= S):
        raise ValueError(f"keep must hold key indices in [0, S={S}), got range [{keep.min()}, {keep.max()}]")
    return keep.long()


def keep_mask(keep: torch.Tensor, S: int) -> torch.Tensor:
    """Turn kept indices ``(..., n)`` into a bool mask ``(..., S)``, True for kept keys."""
    S = check_int(S, "S", min=0)
    keep = _check_keep(keep, S)
    mask = torch.zeros(*keep.shape[:-1], S, dtype=torch.bool, device=keep.device)
    return mask.scatter_(-1, keep, True)


def kept_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over the kept keys only: gather them out of the cache, then attend.

    ``keep`` holds key indices, ``(n,)`` for all heads or ``(B, H, n)`` (or ``(H, n)``) per head,
    as returned by :func:`streaming_keep` and :func:`h2o_keep`. With ``causal`` a query at
    position ``S - T + i`` ignores kept keys after it. Returns ``(B, H, T, D_v)``.
    """
    B, H, T, S, D, D_v = check_attention_inputs(q, k, v)
    check_bool(causal, "causal")
    scale = resolve_scale(scale, D)
    keep = _check_keep(keep, S)
    check_like(keep, "keep", q, dtype=False)
    try:
        keep = keep.expand(B, H, keep.shape[-1])
    except RuntimeError:
        raise ValueError(
            f"keep of shape {tuple(keep.shape)} must broadcast to (B, H, n) with B={B}, H={H}"
        ) from None
    kept_keys = k.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, D))
    kept_values = v.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, D_v))
    mask = None
    if causal:
        query_positions = torch.arange(T, device=q.device) + (S - T)
        mask = keep.unsqueeze(-2) <= query_positions.view(1, 1, T, 1)
    return attention(q, kept_keys, kept_values, mask, scale=scale)


def eviction_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> float:
    """Relative error ``||o_kept - o_full|| / ||o_full||`` of :func:`kept_attention` vs full attention."""
    kept = kept_attention(q, k, v, keep, causal=causal, scale=scale)
    full = attention(q, k, v, causal=causal, scale=scale)
    dtype = compute_dtype(q)
    difference = torch.linalg.vector_norm((kept - full).to(dtype))
    return float(difference / torch.linalg.vector_norm(full.to(dtype)).clamp_min(torch.finfo(dtype).tiny))
