"""Routing queries to key blocks, shared by NSA and MoBA: score blocks, keep the best, attend to them.

Both trainable sparse attentions of 2025 cut the keys into blocks, give every block a cheap
score per query (NSA: the attention to compressed blocks; MoBA: the dot product with the
block's mean key), keep the ``n`` best blocks (some always kept), and attend to those blocks
only. This module holds the three steps they share:

- :func:`block_means`: the mean of each block of rows (MoBA's gate keys, NSA's simplest
  compression).
- :func:`select_blocks`: the ``n`` best eligible blocks per query, forced blocks first, ties to
  the earlier block, so that a kernel and a reference choose identically.
- :func:`attend_selected_blocks`: attention over the keys of the chosen blocks only, a chunk of
  queries at a time, so no ``T x S`` tensor is ever built; it also counts the scores it computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_int, check_tensor
from ..standard import masked_softmax

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
    query_chunk: int = 64,
) -> tuple[torch.Tensor, int]:
    """Causal attention of each query over the keys of its selected blocks only.

    Args:
        q: ``(B, H_kv, G, T, D)``: the ``G`` query heads of each key/value head.
        k: ``(B, H_kv, S, D)``; v: ``(B, H_kv, S, D_v)``. Query ``t`` sits at position
            ``S - T + t`` and sees keys up to it.
        indices, valid: ``(B, H_kv, G', T, n)`` from :func:`select_blocks`, ``G'`` either 1 (the
            group shares its blocks, NSA) or ``G`` (each head chooses, MoBA).
        block_size: keys per block.
        scale: multiplies the scores.
        query_chunk: queries handled at once; the gathered keys take
            ``query_chunk * n * block_size * D`` numbers per head, whatever ``T`` and ``S`` are.

    Returns ``(out, scores_computed)``: ``(B, H_kv, G, T, D_v)`` in the compute dtype of the
    inputs, zeros for a query with nothing selected; and the number of dot products evaluated.
    """
    B, H_kv, G, T, D = q.shape
    S, D_v = k.shape[2], v.shape[-1]
    n = indices.shape[-1]
    if T == 0 or S == 0 or n == 0:
        return q.new_zeros(B, H_kv, G, T, D_v), 0
    offsets = torch.arange(block_size, device=q.device)
    computed, pieces = 0, []
    for start in range(0, T, query_chunk):
        stop = min(start + query_chunk, T)
        chunk_indices, chunk_valid = indices[:, :, :, start:stop], valid[:, :, :, start:stop]
        positions = (chunk_indices.unsqueeze(-1) * block_size + offsets).flatten(-2)  # (B, H_kv, G', C, n*bs)
        query_positions = torch.arange(start, stop, device=q.device).view(-1, 1) + (S - T)
        allowed = (
            chunk_valid.repeat_interleave(block_size, dim=-1)
            & (positions < S)
            & (positions <= query_positions)
        )
        gather_at = positions.clamp(max=S - 1)
        G_sel, C, width = gather_at.shape[2], stop - start, gather_at.shape[-1]
        flat = gather_at.reshape(B, H_kv, G_sel * C * width, 1)
        keys = k.gather(2, flat.expand(-1, -1, -1, D)).view(B, H_kv, G_sel, C, width, D)
        values = v.gather(2, flat.expand(-1, -1, -1, D_v)).view(B, H_kv, G_sel, C, width, D_v)
        scores = torch.einsum("bkgcd,bkgcwd->bkgcw", q[:, :, :, start:stop], keys) * scale
        weights = masked_softmax(scores, allowed)
        pieces.append(torch.einsum("bkgcw,bkgcwd->bkgcd", weights, values))
        computed += B * H_kv * G * C * width
    return torch.cat(pieces, dim=3), computed
