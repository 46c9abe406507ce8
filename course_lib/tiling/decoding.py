"""FlashDecoding: split the keys, attend to each split in parallel, combine with the logsumexp.

At decode time there is one query per sequence (T = 1): FlashAttention's parallelism over
Q blocks has nothing to split, and with batch 1 most of the GPU would sit idle. Splitting the
KV cache into chunks gives one independent job per chunk; each returns a normalised partial
output and its logsumexp, and one small reduction combines them exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_attention_inputs, check_bool, check_int, compute_dtype, resolve_scale
from .online_softmax import _combine, finish_fold, fold_block, start_fold

__all__ = ["flash_decoding"]


def flash_decoding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_splits: int,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention with the keys split into ``num_splits`` chunks, combined exactly.

    Args:
        q: ``(B, H, T, D)`` queries (``T = 1`` when decoding, but any ``T`` works).
        k: ``(B, H, S, D)`` keys, e.g. the KV cache.
        v: ``(B, H, S, D_v)`` values.
        num_splits: number of chunks of ``ceil(S / num_splits)`` keys; more splits than keys
            leaves some chunks empty, which the combination ignores.
        causal: query ``i`` sees keys ``0 .. S - T + i`` (aligned to the end).
        scale: multiplies the scores; defaults to ``D ** -0.5``.
        return_lse: also return the ``(B, H, T)`` logsumexp.

    Returns:
        ``(B, H, T, D_v)`` in the input dtype (and the logsumexp); zeros for a query with no key.
    """
    B, H, T, S, D, Dv = check_attention_inputs(q, k, v)
    num_splits = check_int(num_splits, "num_splits", min=1)
    check_bool(causal, "causal")
    check_bool(return_lse, "return_lse")
    scale = resolve_scale(scale, D)
    dtype = compute_dtype(q)

    # Pad the keys to num_splits equal chunks; padded positions are masked out.
    chunk = -(-S // num_splits)
    padding = chunk * num_splits - S
    keys = F.pad(k.to(dtype), (0, 0, 0, padding)).view(B, H, num_splits, chunk, D)
    values = F.pad(v.to(dtype), (0, 0, 0, padding)).view(B, H, num_splits, chunk, Dv)
    key_index = torch.arange(chunk * num_splits, device=q.device)
    allowed = (key_index < S).expand(T, -1)
    if causal:
        query_index = torch.arange(T, device=q.device).unsqueeze(1)
        allowed = allowed & (key_index <= query_index + (S - T))
    allowed = allowed.view(T, num_splits, chunk).transpose(0, 1)  # (splits, T, chunk)

    # Each split (all at once, on dim 2): the online-softmax fold of its one block of keys, kept
    # as a normalised partial output with its logsumexp.
    scores = torch.einsum("bhtd,bhncd->bhntc", q.to(dtype), keys) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    state = start_fold((B, H, num_splits, T), Dv, dtype=dtype, device=q.device)
    partial_out, partial_lse = finish_fold(*fold_block(*state, scores, values))

    # The reduction: weights exp(lse_i - lse) rescale every split to the common denominator.
    out, lse = _combine(partial_out, partial_lse, dim=2)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
