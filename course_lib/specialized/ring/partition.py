"""Which positions each rank holds, and which block pairs it computes.

``"contiguous"`` cuts the sequence into ``world_size`` consecutive blocks. With causal attention
that makes the work lopsided: rank 0 computes one block pair, rank ``W - 1`` computes ``W``, and
everyone waits for the last. The **zig-zag** layout cuts the sequence into ``2W`` chunks and
gives rank ``r`` chunks ``r`` and ``2W - 1 - r`` — one early, one late — so every rank gets the
same amount of unmasked work (:func:`ring_work`). Positions, not block order, decide the mask,
so the same ring loop serves both layouts: shard with :func:`shard_sequence`, put back together
with :func:`unshard_sequence`.
"""

from __future__ import annotations

import torch

from ...checks import check_bool, check_choice, check_int, check_tensor

__all__ = ["LAYOUTS", "shard_positions", "shard_sequence", "unshard_sequence", "ring_work"]

LAYOUTS = ("contiguous", "zigzag")


# --- sharding: which positions each rank holds -------------------------------------------------


def shard_positions(seq_len: int, world_size: int, rank: int, *, layout: str = "contiguous") -> torch.Tensor:
    """Global positions held by ``rank`` (a sorted ``LongTensor``).

    ``"contiguous"``: the sequence cut into ``world_size`` consecutive blocks (sizes differ by at
    most one). ``"zigzag"``: cut into ``2 * world_size`` chunks; rank ``r`` holds chunks ``r`` and
    ``2 * world_size - 1 - r``.
    """
    seq_len = check_int(seq_len, "seq_len", min=1)
    world_size = check_int(world_size, "world_size", min=1)
    rank = check_int(rank, "rank", min=0, max=world_size - 1)
    check_choice(layout, "layout", LAYOUTS)
    return torch.cat(_shard_chunks(seq_len, world_size, rank, layout))


def _shard_chunks(seq_len: int, world_size: int, rank: int, layout: str) -> list[torch.Tensor]:
    """The chunks of positions ``rank`` holds: one block, or the zig-zag's early and late chunk."""
    positions = torch.arange(seq_len)
    if layout == "contiguous":
        return [positions.tensor_split(world_size)[rank]]
    chunks = positions.tensor_split(2 * world_size)
    return [chunks[rank], chunks[2 * world_size - 1 - rank]]


def shard_sequence(
    x: torch.Tensor, world_size: int, *, layout: str = "contiguous", dim: int = 2
) -> list[torch.Tensor]:
    """Split ``x`` along ``dim`` (the sequence dim of ``(B, H, T, D)``) into one shard per rank."""
    check_tensor(x, "x")
    world_size = check_int(world_size, "world_size", min=1)
    dim = check_int(dim, "dim", min=-x.dim(), max=x.dim() - 1)
    length = check_int(x.shape[dim], "x.shape[dim]", min=1)
    return [
        x.index_select(dim, shard_positions(length, world_size, rank, layout=layout).to(x.device))
        for rank in range(world_size)
    ]


def unshard_sequence(shards: list[torch.Tensor], *, layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: put the per-rank shards back in sequence order."""
    if isinstance(shards, torch.Tensor) or not isinstance(shards, (list, tuple)) or len(shards) == 0:
        raise TypeError("shards must be a non-empty list of tensors")
    for index, shard in enumerate(shards):
        check_tensor(shard, f"shards[{index}]")
    world_size = len(shards)
    dim = check_int(dim, "dim", min=-shards[0].dim(), max=shards[0].dim() - 1)
    length = sum(shard.shape[dim] for shard in shards)
    order = torch.cat([shard_positions(length, world_size, r, layout=layout) for r in range(world_size)])
    for rank, shard in enumerate(shards):
        expected = len(shard_positions(length, world_size, rank, layout=layout))
        if shard.shape[dim] != expected:
            raise ValueError(
                f"shards[{rank}] must hold {expected} positions for layout={layout!r}, got {shard.shape[dim]}"
            )
    return torch.cat(list(shards), dim=dim).index_select(dim, torch.argsort(order).to(shards[0].device))


def _pieces(chunks: list[torch.Tensor]) -> list[tuple[int, int, int, int]]:
    """Non-empty chunks as ``(local start, local stop, first position, last position)``."""
    pieces, start = [], 0
    for chunk in chunks:
        if len(chunk):
            pieces.append((start, start + len(chunk), int(chunk[0]), int(chunk[-1])))
        start += len(chunk)
    return pieces


def _rank_pieces(causal, length, world_size, rank, local_length, layout):
    """A rank's pieces: the layout's chunks when positions matter (causal), else one piece."""
    if causal:
        return _pieces(_shard_chunks(length, world_size, rank, layout))
    return _pieces([torch.arange(local_length)])


def _pair_plan(q_pieces, k_pieces, causal: bool):
    """The (query piece, key piece) pairs a rank computes; causal skips pairs entirely in the future."""
    return [
        (q_piece, k_piece)
        for q_piece in q_pieces
        for k_piece in k_pieces
        # Skip when every key of the piece comes after every query: nothing to see.
        if not (causal and k_piece[2] > q_piece[3])
    ]


def ring_work(seq_len: int, world_size: int, *, causal: bool = True, layout: str = "contiguous") -> list[int]:
    """Score entries (query x key pairs) each rank computes in :func:`ring_attention` (self-attention).

    Skipped pairs of runs are not counted; a diagonal pair counts in full (it is computed, then
    masked). The maximum over ranks sets the wall time, since every step waits for the slowest.
    """
    check_bool(causal, "causal")
    check_int(world_size, "world_size", min=1, max=check_int(seq_len, "seq_len", min=1))
    check_choice(layout, "layout", LAYOUTS)
    work = []
    for rank in range(world_size):
        q_length = len(shard_positions(seq_len, world_size, rank, layout=layout))
        q_pieces = _rank_pieces(causal, seq_len, world_size, rank, q_length, layout)
        total = 0
        for source in range(world_size):
            k_length = len(shard_positions(seq_len, world_size, source, layout=layout))
            k_pieces = _rank_pieces(causal, seq_len, world_size, source, k_length, layout)
            for q_piece, k_piece in _pair_plan(q_pieces, k_pieces, causal):
                total += (q_piece[1] - q_piece[0]) * (k_piece[1] - k_piece[0])
        work.append(total)
    return work
