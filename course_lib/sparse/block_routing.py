"""Routing queries to key blocks, shared by NSA and MoBA: score blocks, keep the best, attend to them.

Both trainable sparse attentions of 2025 cut the keys into blocks, give every block a cheap
score per query (NSA: the attention to compressed blocks; MoBA: the dot product with the
block's mean key), keep the ``n`` best blocks (some always kept), and attend to those blocks
only. This module holds the three steps they share:

- :func:`block_means`: the mean of each block of rows (MoBA's gate keys, NSA's simplest
  compression).
- :func:`select_blocks`: the ``n`` best eligible blocks per query, forced blocks first, ties to
  the earlier block, so that a kernel and a reference choose identically.
- :func:`attend_selected_blocks`: attention over the keys of the chosen blocks only, one key
  block at a time with the queries that chose it, so no ``T x S`` tensor is ever built; it also
  counts the scores it computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_broadcast, check_int, check_like, check_shape, check_tensor

__all__ = ["block_means", "select_blocks", "selection_mask", "attend_selected_blocks", "BlockWork"]


@dataclass(frozen=True)
class BlockWork:
    """What a block-sparse kernel computed, against a dense causal kernel with the same blocks.

    ``blocks_computed``: (query, key block) pairs attended, counted per query row and per head
    that chooses its own blocks (per KV head for NSA, whose group shares a choice).
    ``blocks_causal``: the pairs a causal kernel at the same block size would compute.
    ``scores_computed``: query-key dot products evaluated (padding inside blocks included);
    ``scores_dense``: those of the dense masked reference, ``B * H * T * S``.
    """

    blocks_computed: int
    blocks_causal: int
    scores_computed: int
    scores_dense: int

    @property
    def block_fraction(self) -> float:
        return self.blocks_computed / max(self.blocks_causal, 1)

    @property
    def score_fraction(self) -> float:
        return self.scores_computed / max(self.scores_dense, 1)


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each block of ``block_size`` rows: ``(B, H, N, D) -> (B, H, ceil(N / block_size), D)``.

    The last block may be shorter; it is averaged over the rows it has.
    """
    check_tensor(x, "x", ndim=4, floating=True)
    block_size = check_int(block_size, "block_size", min=1)
    B, H, N, D = x.shape
    blocks = -(-N // block_size)
    padded = F.pad(x, (0, 0, 0, blocks * block_size - N)).view(B, H, blocks, block_size, D)
    counts = (N - torch.arange(blocks, device=x.device) * block_size).clamp(max=block_size)
    return padded.sum(dim=3) / counts.to(x.dtype).view(1, 1, blocks, 1)


def select_blocks(
    scores: torch.Tensor,
    num_selected: int,
    *,
    eligible: torch.Tensor | None = None,
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``num_selected`` best blocks per row of ``scores`` ``(..., N_blocks)``.

    ``eligible`` (bool, broadcastable): blocks that may be chosen at all (causal: not wholly in
    the future). ``forced`` (bool, broadcastable): eligible blocks always chosen, before any
    scored one. Among equal scores the earlier block wins. Returns ``(indices, valid)``, both
    ``(..., min(num_selected, N_blocks))``: block indices (best first) and whether each slot
    holds a real, eligible block (False pads rows with fewer eligible blocks than slots).
    """
    check_tensor(scores, "scores", floating=True)
    if scores.dim() == 0:
        raise ValueError("scores must have at least 1 dim (..., N_blocks), got a scalar")
    num_selected = check_int(num_selected, "num_selected", min=1)
    ranking = scores.detach().clone()
    for name, flags in (("forced", forced), ("eligible", eligible)):
        if flags is not None:
            check_tensor(flags, name, dtype=torch.bool)
            check_like(flags, name, scores, "scores", dtype=False)
            # Extra dims would broadcast the ranking, and the choice, to a new shape: refuse them.
            check_broadcast(flags, name, scores.shape, names="..., N_blocks")
    if forced is not None:
        ranking = ranking.masked_fill(forced, float("inf"))
    allowed = torch.ones_like(ranking, dtype=torch.bool) if eligible is None else eligible.expand_as(ranking)
    ranking = ranking.masked_fill(~allowed, float("-inf"))
    count = min(num_selected, scores.shape[-1])
    # A stable descending sort keeps the earlier block first among ties: a definite choice.
    indices = torch.sort(ranking, dim=-1, descending=True, stable=True).indices[..., :count]
    return indices, allowed.gather(-1, indices)


def selection_mask(indices: torch.Tensor, valid: torch.Tensor, block_size: int, S: int) -> torch.Tensor:
    """Bool ``(..., S)``: True for the keys of the valid selected blocks (the dense references' mask)."""
    check_tensor(indices, "indices")
    check_tensor(valid, "valid", dtype=torch.bool)
    block_size = check_int(block_size, "block_size", min=1)
    S = check_int(S, "S", min=0)
    blocks = -(-S // block_size)
    chosen = torch.zeros(*indices.shape[:-1], max(blocks, 1), dtype=torch.bool, device=indices.device)
    chosen = chosen.scatter(-1, indices.clamp(max=max(blocks, 1) - 1), valid)  # padding writes False
    return chosen.repeat_interleave(block_size, dim=-1)[..., :S]


def attend_selected_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor,
    block_size: int,
    *,
    scale: float,
) -> tuple[torch.Tensor, int]:
    """Causal attention of each query over the keys of its selected blocks only.

    Block by block, as MoBA's kernel does: for key block ``j``, gather the queries that chose
    it (a ragged batch, padded to the busiest head), compute their scores against that block
    alone, and keep each (query, block) pair's normalised partial output and logsumexp. Then
    merge each query's partials exactly, as FlashDecoding merges its splits (chapter 03):
    ``o = sum_s exp(lse_s - lse) o_s``. Every score computed belongs to a selected block.

    Args:
        q: ``(B, H_kv, G, T, D)``: the ``G`` query heads of each key/value head.
        k: ``(B, H_kv, S, D)``; v: ``(B, H_kv, S, D_v)``. Query ``t`` sits at position
            ``S - T + t`` and sees keys up to it.
        indices, valid: ``(B, H_kv, G', T, n)`` from :func:`select_blocks`, ``G'`` either 1 (the
            group shares its blocks, NSA) or ``G`` (each head chooses, MoBA).
        block_size: keys per block.
        scale: multiplies the scores.

    Returns ``(out, scores_computed)``: ``(B, H_kv, G, T, D_v)`` in the dtype of q, zeros for a
    query with nothing selected; and the number of dot products evaluated (padding included).
    """
    check_tensor(q, "q", ndim=5, floating=True)
    for name, x in (("k", k), ("v", v)):
        check_tensor(x, name, ndim=4, floating=True)
        check_like(x, name, q)
    check_tensor(indices, "indices", ndim=5, dtype=torch.long)
    check_tensor(valid, "valid", ndim=5, dtype=torch.bool)
    check_like(indices, "indices", q, dtype=False)
    check_like(valid, "valid", q, dtype=False)
    B, H_kv, G, T, D = q.shape
    S, D_v = k.shape[2], v.shape[-1]
    check_shape(k, "k", (B, H_kv, S, D), names="B, H_kv, S, D")
    check_shape(v, "v", (B, H_kv, S, None), names="B, H_kv, S, D_v")
    G_sel, n = indices.shape[2], indices.shape[-1]
    check_shape(indices, "indices", (B, H_kv, G_sel, T, n), names="B, H_kv, G', T, n")
    check_shape(valid, "valid", tuple(indices.shape), names="B, H_kv, G', T, n")
    if G_sel not in (1, G):
        raise ValueError(f"indices must choose per group (G'=1) or per head (G'={G}), got G'={G_sel}")
    block_size = check_int(block_size, "block_size", min=1)
    if T == 0 or S == 0 or n == 0:
        return q.new_zeros(B, H_kv, G, T, D_v), 0
    heads, rows, shared = B * H_kv, G_sel * T, G // G_sel  # rows choose blocks; `shared` queries each
    num_blocks = -(-S // block_size)
    queries = q.reshape(heads, G_sel, shared, T, D).transpose(2, 3).reshape(heads, rows, shared, D)
    keys, values = k.reshape(heads, S, D), v.reshape(heads, S, D_v)
    row_positions = (torch.arange(rows, device=q.device) % T) + (S - T)

    # Sort every (row, slot) pair of a head by the block it reads; invalid pairs go last.
    block_of_pair = torch.where(valid, indices, num_blocks).reshape(heads, rows * n)
    order = torch.sort(block_of_pair, dim=-1, stable=True).indices
    counts = torch.zeros(heads, num_blocks + 1, dtype=torch.long, device=q.device)
    counts = counts.scatter_add(-1, block_of_pair, torch.ones_like(block_of_pair))[:, :num_blocks]
    starts = counts.cumsum(-1) - counts

    pieces_out, pieces_lse, pieces_at, computed = [], [], [], 0
    for block in range(num_blocks):
        busiest = int(counts[:, block].max())
        if busiest == 0:
            continue
        slot = torch.arange(busiest, device=q.device)
        used = slot < counts[:, block : block + 1]  # (heads, busiest): real pairs, not padding
        pairs = order.gather(-1, (starts[:, block : block + 1] + slot).clamp(max=rows * n - 1))
        row = pairs // n
        first, last = block * block_size, min((block + 1) * block_size, S)
        key_positions = torch.arange(first, last, device=q.device)
        block_queries = queries.gather(1, row.view(heads, busiest, 1, 1).expand(-1, -1, shared, D))
        scores = torch.einsum("hmrd,hkd->hmrk", block_queries, keys[:, first:last]) * scale
        allowed = used.unsqueeze(-1) & (key_positions <= row_positions[row].unsqueeze(-1))
        scores = scores.masked_fill(~allowed.unsqueeze(2), float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        weights = torch.exp(scores - row_max)
        total = weights.sum(dim=-1, keepdim=True)
        seen = total > 0
        safe_total = torch.where(seen, total, torch.ones_like(total))
        pieces_out.append((weights / safe_total) @ values[:, first:last].unsqueeze(1))
        # log(total) only where something was seen, so no -inf (and no NaN gradient) is created.
        pieces_lse.append(torch.where(seen, row_max + torch.log(safe_total), float("-inf")).squeeze(-1))
        flat_head = torch.arange(heads, device=q.device).unsqueeze(1) * (rows * n)
        pieces_at.append(torch.where(used, flat_head + pairs, -1))
        computed += heads * busiest * shared * (last - first)
    if not pieces_at:  # no query chose any block
        return q.new_zeros(B, H_kv, G, T, D_v), 0

    # Scatter the partials to their (head, row, slot) and merge the slots of each row.
    at = torch.cat([p.flatten() for p in pieces_at])
    keep = at >= 0
    partial = q.new_zeros(heads * rows * n, shared, D_v).index_put(
        (at[keep],), torch.cat([p.flatten(0, 1) for p in pieces_out])[keep]
    )
    lse = torch.full((heads * rows * n, shared), float("-inf"), dtype=q.dtype, device=q.device).index_put(
        (at[keep],), torch.cat([p.flatten(0, 1) for p in pieces_lse])[keep]
    )
    partial, lse = partial.view(heads, rows, n, shared, D_v), lse.view(heads, rows, n, shared)
    best = lse.amax(dim=2, keepdim=True)
    best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
    share = torch.exp(lse - best)  # each slot's softmax mass, relative to the largest
    mass = share.sum(dim=2, keepdim=True)
    mass = torch.where(mass > 0, mass, torch.ones_like(mass)).squeeze(2).unsqueeze(-1)
    out = (share.unsqueeze(-1) * partial).sum(dim=2) / mass
    out = out.view(heads, G_sel, T, shared, D_v).transpose(2, 3).reshape(B, H_kv, G, T, D_v)
    return out, computed
