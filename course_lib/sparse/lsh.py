"""Reformer's LSH attention: hash similar vectors into one bucket, attend within buckets only.

Queries and keys share one projection (``qk``), so a query lands in the same bucket as the keys
it is most similar to. Hashing is a random rotation followed by an argmax over ``[x R, -x R]``
(angular LSH). Sorting by bucket puts each bucket's members side by side; the sorted sequence is
cut into chunks and each chunk attends to itself and the chunk before it, which bounds the work
at ``O(T * chunk_size)`` however unevenly the buckets fill. Several hash rounds lower the chance
that two similar vectors are always split; their outputs are combined with weights proportional
to each round's softmax normaliser (a logsumexp weighting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import (
    check_bool,
    check_generator,
    check_int,
    check_like,
    check_shape,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from ..standard import masked_softmax

__all__ = ["lsh_buckets", "lsh_attention"]


def lsh_buckets(
    qk: torch.Tensor,
    num_buckets: int,
    *,
    num_hashes: int = 1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Angular LSH bucket ids ``(B, H, num_hashes, T)`` of the vectors ``qk`` ``(B, H, T, D)``.

    Each round draws a Gaussian ``(D, num_buckets / 2)`` rotation (shared by batch and heads)
    and takes ``argmax([x R, -x R])``; ``num_buckets`` must be even, or 1 (everything in bucket 0).
    The rotations come only from ``generator`` or ``seed`` (default seed 0).
    """
    check_tensor(qk, "qk", ndim=4, floating=True)
    num_buckets = check_int(num_buckets, "num_buckets", min=1)
    if num_buckets > 1 and num_buckets % 2:
        raise ValueError(f"num_buckets={num_buckets} must be 1 or even (argmax over [xR, -xR])")
    num_hashes = check_int(num_hashes, "num_hashes", min=1)
    generator = check_generator(generator, seed)
    B, H, T, D = qk.shape
    if num_buckets == 1:
        return torch.zeros(B, H, num_hashes, T, dtype=torch.long, device=qk.device)
    # Drawn on the generator's device (the CPU unless a CUDA generator is passed), then moved to qk's.
    rotations = torch.randn(
        num_hashes, D, num_buckets // 2, generator=generator, dtype=torch.float64, device=generator.device
    )
    dtype = compute_dtype(qk)
    projected = torch.einsum("bhtd,rdn->bhrtn", qk.to(dtype), rotations.to(qk.device, dtype))
    return torch.cat((projected, -projected), dim=-1).argmax(dim=-1)


def lsh_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    *,
    num_buckets: int,
    chunk_size: int,
    num_hashes: int = 1,
    causal: bool = False,
    scale: float | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Reformer (Kitaev et al., 2020) self-attention with shared queries and keys.

    Args:
        qk: ``(B, H, T, D)`` shared query/key vectors. Keys are ``qk`` normalised to unit length,
            queries are ``qk`` as given, scores are ``scale * q . k`` (``scale`` default ``D**-0.5``).
        v: ``(B, H, T, D_v)``.
        num_buckets, num_hashes, generator, seed: see :func:`lsh_buckets` (same seed, same buckets).
        chunk_size: length of the chunks of the bucket-sorted sequence; a query sees keys of its
            own bucket in its own chunk and the previous one.
        causal: also forbid keys after the query (by original position).

    A query never attends to itself unless it has no other key (Reformer's rule: with shared
    QK a vector's dot product with itself would dominate). With one bucket and
    ``chunk_size >= T`` this is dense attention over all other tokens. Returns ``(B, H, T, D_v)``.
    """
    check_tensor(qk, "qk", ndim=4, floating=True)
    check_tensor(v, "v", ndim=4, floating=True)
    check_like(v, "v", qk, "qk")
    B, H, T, D = qk.shape
    check_shape(v, "v", (B, H, T, None), names="B, H, T, D_v")
    D_v = v.shape[-1]
    chunk_size = check_int(chunk_size, "chunk_size", min=1)
    check_bool(causal, "causal")
    scale = resolve_scale(scale, D)
    buckets = lsh_buckets(qk, num_buckets, num_hashes=num_hashes, generator=generator, seed=seed)
    if T == 0:  # an empty sequence: nothing to hash into chunks
        return qk.new_zeros(B, H, 0, D_v)
    R, device, dtype = num_hashes, qk.device, compute_dtype(qk)

    # Sort each round by (bucket, position); `order[..., s]` is the position sitting in slot s.
    positions = torch.arange(T, device=device)
    order = torch.argsort(buckets * T + positions, dim=-1)  # (B, H, R, T)
    chunk = min(chunk_size, T)
    num_chunks = -(-T // chunk)
    padded = num_chunks * chunk
    slot_valid = F.pad(torch.ones(B, H, R, T, dtype=torch.bool, device=device), (0, padded - T))
    order_padded = F.pad(order, (0, padded - T))  # padding slots point at position 0, then masked

    def sort_rows(x: torch.Tensor) -> torch.Tensor:
        # (B, H, T, dim) -> (B, H, R, chunks, chunk, dim) in sorted order
        index = order_padded.unsqueeze(-1).expand(-1, -1, -1, -1, x.shape[-1])
        return x.unsqueeze(2).expand(-1, -1, R, -1, -1).gather(3, index).view(B, H, R, num_chunks, chunk, -1)

    def with_previous(x: torch.Tensor) -> torch.Tensor:
        # Chunk c sees chunk c-1 then itself; chunk 0's "previous" is a copy marked invalid below.
        return torch.cat((x.roll(1, dims=3), x), dim=4)

    queries = sort_rows(qk.to(dtype))
    keys = with_previous(sort_rows(F.normalize(qk.to(dtype), dim=-1)))
    values = with_previous(sort_rows(v.to(dtype)))
    query_position = order_padded.view(B, H, R, num_chunks, chunk)
    query_bucket = buckets.gather(-1, order).view(B, H, R, -1)
    query_bucket = F.pad(query_bucket, (0, padded - T), value=-1).view(B, H, R, num_chunks, chunk)
    key_position = with_previous(query_position.unsqueeze(-1)).squeeze(-1)
    key_bucket = with_previous(query_bucket.unsqueeze(-1)).squeeze(-1)
    key_valid = with_previous(slot_valid.view(B, H, R, num_chunks, chunk, 1)).squeeze(-1)
    key_valid[:, :, :, 0, :chunk] = False  # the first chunk has no previous chunk

    allowed = key_valid.unsqueeze(-2) & (query_bucket.unsqueeze(-1) == key_bucket.unsqueeze(-2))
    if causal:
        allowed &= key_position.unsqueeze(-2) <= query_position.unsqueeze(-1)
    is_self = key_position.unsqueeze(-2) == query_position.unsqueeze(-1)
    others = allowed & ~is_self
    allowed = torch.where(others.any(dim=-1, keepdim=True), others, allowed & is_self)

    scores = (queries @ keys.transpose(-2, -1)) * scale  # (B, H, R, chunks, chunk, 2 * chunk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    log_normaliser = torch.logsumexp(scores, dim=-1)  # finite: every query may at least see itself
    out_sorted = masked_softmax(scores, allowed) @ values

    # Undo the sort, then weight the rounds by exp(lse_r) / sum_r exp(lse_r).
    out_sorted = out_sorted.view(B, H, R, padded, D_v)[:, :, :, :T]
    log_normaliser = log_normaliser.view(B, H, R, padded)[:, :, :, :T]
    out = torch.empty_like(out_sorted).scatter_(
        3, order.unsqueeze(-1).expand(-1, -1, -1, -1, D_v), out_sorted
    )
    lse = torch.empty_like(log_normaliser).scatter_(3, order, log_normaliser)
    round_weights = torch.softmax(lse, dim=2).unsqueeze(-1)
    return (round_weights * out).sum(dim=2).to(qk.dtype)
