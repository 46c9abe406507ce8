"""PagedAttention's cache (Kwon et al., 2023, vLLM): the KV cache managed like virtual memory.

A server does not know in advance how long each request will grow. Reserving ``max_len`` slots
per request (contiguous preallocation) wastes everything a request does not use, and that
waste limits how many requests can run at once. The paged cache instead:
- splits storage into fixed-size physical blocks of ``block_size`` tokens and keeps a free list;
- gives each sequence a block table (logical block i -> physical block), growing one block at a
  time, so at most ``block_size - 1`` slots per sequence are wasted;
- lets sequences share blocks (a common prompt, beams, parallel samples): ``fork`` copies only
  the block table and increments reference counts; the first write into a shared block copies
  it (copy-on-write); a block returns to the free list when its count reaches zero.

Attention reads the cache block by block through the table with an online softmax, as a paged
kernel does, and equals attention over the same keys stored contiguously. One layer is modelled;
a real engine keeps one such pool per layer, all indexed by the same block tables.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from ..checks import (
    check_bool,
    check_divisible,
    check_hashable,
    check_int,
    check_shape,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from ..tiling.online_softmax import finish_fold, fold_block, start_fold

__all__ = ["PagedKVCache", "simulate_fragmentation"]


class PagedKVCache:
    """A pool of ``num_blocks`` blocks of ``block_size`` tokens, shared by many sequences.

    Storage: ``key_blocks (num_blocks, H_kv, block_size, D)`` and
    ``value_blocks (num_blocks, H_kv, block_size, D_v)``.
    Sequences are named by any hashable ``seq_id``; per sequence ``k`` is ``(H_kv, T, D)``.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        value_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_blocks = check_int(num_blocks, "num_blocks", min=1)
        self.block_size = check_int(block_size, "block_size", min=1)
        self.num_kv_heads = check_int(num_kv_heads, "num_kv_heads", min=1)
        self.head_dim = check_int(head_dim, "head_dim", min=1)
        self.value_dim = self.head_dim if value_dim is None else check_int(value_dim, "value_dim", min=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.key_blocks = torch.zeros(
            num_blocks, num_kv_heads, block_size, self.head_dim, dtype=dtype, device=device
        )
        self.value_blocks = torch.zeros(
            num_blocks, num_kv_heads, block_size, self.value_dim, dtype=dtype, device=device
        )
        # Pop from the end: block 0 is handed out first, which makes block tables easy to read.
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_fill: list[int] = [0] * num_blocks  # filled slots of each physical block
        self.block_tables: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}

    # --- bookkeeping -------------------------------------------------------------------------
    def _check_live(self, seq_id: Hashable, name: str = "seq_id") -> None:
        check_hashable(seq_id, name)
        if seq_id not in self.block_tables:
            raise ValueError(f"{name}={seq_id!r} is not a live sequence of this cache")

    def _allocate_block(self) -> int:
        block = self.free_blocks.pop()
        self.ref_counts[block] = 1
        self.block_fill[block] = 0
        return block

    def _release_block(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.block_fill[block] = 0
            self.free_blocks.append(block)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def add_sequence(self, seq_id: Hashable) -> None:
        """Start an empty sequence (no block is allocated until its first token)."""
        check_hashable(seq_id, "seq_id")
        if seq_id in self.block_tables:
            raise ValueError(f"seq_id={seq_id!r} is already a live sequence")
        self.block_tables[seq_id] = []
        self.lengths[seq_id] = 0

    def length(self, seq_id: Hashable) -> int:
        self._check_live(seq_id)
        return self.lengths[seq_id]

    def block_table(self, seq_id: Hashable) -> list[int]:
        """A copy of the sequence's block table (logical block i -> physical block)."""
        self._check_live(seq_id)
        return list(self.block_tables[seq_id])

    # --- writing -----------------------------------------------------------------------------
    def _blocks_needed(self, seq_id: Hashable, T: int) -> int:
        table, length = self.block_tables[seq_id], self.lengths[seq_id]
        used_in_last = length % self.block_size
        needed = math.ceil(
            max(T - (self.block_size - used_in_last if used_in_last else 0), 0) / self.block_size
        )
        if used_in_last and T > 0 and self.ref_counts[table[-1]] > 1:
            needed += 1  # the shared, partly filled last block must be copied before writing
        return needed

    def append(self, seq_id: Hashable, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k (H_kv, T, D)`` and ``v (H_kv, T, D_v)`` to a sequence, across block boundaries.

        Raises ``RuntimeError`` (and changes nothing) when the free list cannot hold the tokens.
        """
        self._check_live(seq_id)
        check_tensor(k, "k", ndim=3, floating=True)
        check_tensor(v, "v", ndim=3, floating=True)
        check_shape(k, "k", (self.num_kv_heads, None, self.head_dim), names="H_kv, T, D")
        T = k.shape[1]
        check_shape(v, "v", (self.num_kv_heads, T, self.value_dim), names="H_kv, T, D_v")
        needed = self._blocks_needed(seq_id, T)
        if needed > len(self.free_blocks):
            raise RuntimeError(
                f"out of blocks: seq_id={seq_id!r} needs {needed}, {len(self.free_blocks)} free"
            )
        table = self.block_tables[seq_id]
        written = 0
        while written < T:
            length = self.lengths[seq_id]
            offset = length % self.block_size
            if offset == 0:
                table.append(self._allocate_block())
            elif self.ref_counts[table[-1]] > 1:
                # Copy-on-write: this sequence gets a private copy of the shared block.
                shared, private = table[-1], self._allocate_block()
                self.key_blocks[private] = self.key_blocks[shared]
                self.value_blocks[private] = self.value_blocks[shared]
                self.block_fill[private] = self.block_fill[shared]
                self._release_block(shared)
                table[-1] = private
            block = table[-1]
            count = min(self.block_size - offset, T - written)
            self.key_blocks[block, :, offset : offset + count] = k[:, written : written + count]
            self.value_blocks[block, :, offset : offset + count] = v[:, written : written + count]
            self.block_fill[block] = max(self.block_fill[block], offset + count)
            self.lengths[seq_id] = length + count
            written += count

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Start ``child_id`` as a copy of ``parent_id`` sharing all its blocks (no data is copied)."""
        self._check_live(parent_id, "parent_id")
        check_hashable(child_id, "child_id")
        if child_id in self.block_tables:
            raise ValueError(f"child_id={child_id!r} is already a live sequence")
        table = list(self.block_tables[parent_id])
        for block in table:
            self.ref_counts[block] += 1
        self.block_tables[child_id] = table
        self.lengths[child_id] = self.lengths[parent_id]

    def free(self, seq_id: Hashable) -> None:
        """End a sequence; blocks no other sequence references return to the free list."""
        self._check_live(seq_id)
        for block in self.block_tables.pop(seq_id):
            self._release_block(block)
        del self.lengths[seq_id]

    # --- reading -----------------------------------------------------------------------------
    def gather(self, seq_id: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's keys ``(H_kv, L, D)`` and values ``(H_kv, L, D_v)`` copied contiguously."""
        self._check_live(seq_id)
        table = torch.tensor(self.block_tables[seq_id], dtype=torch.long, device=self.key_blocks.device)
        length = self.lengths[seq_id]
        keys = self.key_blocks[table].transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_dim)
        values = self.value_blocks[table].transpose(0, 1).reshape(self.num_kv_heads, -1, self.value_dim)
        return keys[:, :length], values[:, :length]

    def attention(
        self, seq_id: Hashable, q: torch.Tensor, *, causal: bool = True, scale: float | None = None
    ) -> torch.Tensor:
        """Attention of ``q (H_q, T, D)`` over the sequence's cache, read block by block.

        The T queries are the sequence's last T tokens (already appended); with ``causal`` query i
        sees keys up to ``L - T + i``. ``H_q`` may be a multiple of ``H_kv`` (grouped queries).
        Returns ``(H_q, T, D_v)`` in the dtype of ``q``; an online softmax carries the running max
        and sum from block to block, so no ``(T, L)`` score matrix is formed.
        """
        self._check_live(seq_id)
        check_tensor(q, "q", ndim=3, floating=True)
        check_shape(q, "q", (None, None, self.head_dim), names="H_q, T, D")
        if q.device != self.key_blocks.device:
            raise ValueError(
                f"q must be on the device of the cache ({self.key_blocks.device}), got {q.device}"
            )
        H_q, T, D = q.shape
        check_divisible(H_q, "num_heads", self.num_kv_heads, "num_kv_heads")
        check_bool(causal, "causal")
        scale = resolve_scale(scale, D)
        length = self.lengths[seq_id]
        if causal and T > length:
            raise ValueError(f"q has T={T} queries but seq_id={seq_id!r} holds only {length} tokens")
        H_kv, group = self.num_kv_heads, H_q // self.num_kv_heads
        dtype = compute_dtype(q)
        queries = q.to(dtype).reshape(H_kv, group * T, D)
        query_positions = (length - T + torch.arange(T, device=q.device)).repeat(group)  # (group*T,)
        row_max, row_sum, accumulator = start_fold(
            (H_kv, group * T), self.value_dim, dtype=dtype, device=q.device
        )
        for logical, physical in enumerate(self.block_tables[seq_id]):
            start = logical * self.block_size
            count = min(self.block_size, length - start)
            keys = self.key_blocks[physical, :, :count].to(dtype)
            values = self.value_blocks[physical, :, :count].to(dtype)
            scores = (queries @ keys.transpose(-2, -1)) * scale  # (H_kv, group*T, count)
            if causal:
                key_positions = start + torch.arange(count, device=q.device)
                scores = scores.masked_fill(key_positions > query_positions[:, None], -math.inf)
            row_max, row_sum, accumulator = fold_block(row_max, row_sum, accumulator, scores, values)
        out, _ = finish_fold(row_max, row_sum, accumulator)
        return out.reshape(H_q, T, self.value_dim).to(q.dtype)

    # --- reporting ---------------------------------------------------------------------------
    def fragmentation_report(self) -> dict:
        """Slots allocated vs used, counting each physical block once (shared blocks are not double counted).

        Keys: ``allocated_blocks``, ``allocated_slots``, ``used_slots``, ``wasted_slots``,
        ``utilisation`` (used / allocated, 1.0 when nothing is allocated), ``shared_blocks``
        (blocks referenced by more than one sequence), ``logical_tokens`` (sum of sequence lengths,
        which exceeds ``used_slots`` when prefixes are shared).
        """
        live = [b for b in range(self.num_blocks) if self.ref_counts[b] > 0]
        allocated = len(live) * self.block_size
        used = sum(self.block_fill[b] for b in live)
        return {
            "allocated_blocks": len(live),
            "allocated_slots": allocated,
            "used_slots": used,
            "wasted_slots": allocated - used,
            "utilisation": used / allocated if allocated else 1.0,
            "shared_blocks": sum(1 for b in live if self.ref_counts[b] > 1),
            "logical_tokens": sum(self.lengths.values()),
        }


def simulate_fragmentation(
    lengths: Sequence[int] | None = None,
    *,
    num_requests: int = 32,
    max_len: int = 512,
    block_size: int = 16,
    seed: int = 0,
) -> dict:
    """Memory of one static batch of requests of varied lengths: a paged cache vs max-length preallocation.

    ``lengths`` are the final lengths of the requests of one batch, all live together; by default
    ``num_requests`` lengths are drawn uniformly from ``1 .. max_len`` with a ``torch.Generator``
    seeded by ``seed``. All requests start at step 0 and grow one token per step (none leaves
    early, none joins later: a static batch, not a serving trace; :mod:`course_lib.serving`
    schedules real arrivals with continuous batching). Each token goes through a real
    ``PagedKVCache`` (one head of width 1, so it is cheap). Returns the lengths and, for both
    schemes, allocated slots, used slots and the wasted fraction at the end, when every request has
    reached its length; contiguous preallocation reserves ``max_len`` slots per request.
    """
    max_len = check_int(max_len, "max_len", min=1)
    block_size = check_int(block_size, "block_size", min=1)
    if lengths is None:
        num_requests = check_int(num_requests, "num_requests", min=1)
        generator = torch.Generator().manual_seed(check_int(seed, "seed"))
        lengths = torch.randint(1, max_len + 1, (num_requests,), generator=generator).tolist()
    else:
        lengths = [check_int(n, "lengths", min=1, max=max_len) for n in lengths]
        if not lengths:
            raise ValueError("lengths must name at least one request")
    cache = PagedKVCache(sum(math.ceil(n / block_size) for n in lengths), block_size, 1, 1)
    token = torch.zeros(1, 1, 1)
    longest = max(lengths)
    for request in range(len(lengths)):
        cache.add_sequence(request)
    for step in range(longest):  # a static batch: every request starts at step 0 and grows one token a step
        for request, n in enumerate(lengths):
            if step < n:
                cache.append(request, token, token)
    report = cache.fragmentation_report()
    used = sum(lengths)
    contiguous = len(lengths) * max_len
    return {
        "lengths": list(lengths),
        "block_size": block_size,
        "max_len": max_len,
        "used_slots": used,
        "paged_allocated_slots": report["allocated_slots"],
        "paged_waste_fraction": 1 - used / report["allocated_slots"],
        "contiguous_allocated_slots": contiguous,
        "contiguous_waste_fraction": 1 - used / contiguous,
    }
