"""What ring and all-gather attention cost in communication and memory, before running them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...checks import check_int

__all__ = ["CommunicationCost", "communication_cost"]


@dataclass
class CommunicationCost:
    """Bytes per rank for ring vs all-gather attention over ``world_size`` ranks."""

    world_size: int
    block_bytes: int
    ring_bytes_sent: int
    all_gather_bytes_sent: int
    ring_kv_bytes_held: int
    all_gather_kv_bytes_held: int


def communication_cost(
    batch: int,
    heads: int,
    seq_len: int,
    head_dim: int,
    world_size: int,
    *,
    value_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> CommunicationCost:
    """Bytes each rank sends, and the most K/V bytes it holds, for the two methods.

    A block is ``ceil(seq_len / world_size)`` tokens of K and V (padded to the longest block, as
    the implementation sends it). Both methods send ``world_size - 1`` blocks per rank; the ring
    holds 2 blocks (the current one and the one arriving), the all-gather holds all of them.
    """
    batch, heads = check_int(batch, "batch", min=1), check_int(heads, "heads", min=1)
    seq_len, head_dim = check_int(seq_len, "seq_len", min=1), check_int(head_dim, "head_dim", min=1)
    world_size = check_int(world_size, "world_size", min=1, max=seq_len)
    value_dim = head_dim if value_dim is None else check_int(value_dim, "value_dim", min=1)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    element = torch.empty((), dtype=dtype).element_size()
    block = batch * heads * math.ceil(seq_len / world_size) * (head_dim + value_dim) * element
    sent = (world_size - 1) * block
    return CommunicationCost(world_size, block, sent, sent, block * min(2, world_size), block * world_size)
