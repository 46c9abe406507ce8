"""One paged KV cache for a whole model: the block pool a serving engine allocates from.

Chapter 04's :class:`~course_lib.kv_cache.PagedKVCache` models one layer. A model has many, and
they all grow in step: token ``t`` of a sequence writes one key and one value in every layer. So
an engine keeps **one** block manager (free list, block tables, reference counts) and one storage
tensor per layer, all indexed by the same block numbers:

- storage ``key_blocks (num_layers, num_blocks, block_size, H_kv, D)`` (and ``value_blocks``);
  token ``t`` of a sequence lives in slot ``t % block_size`` of physical block
  ``table[t // block_size]``; flattened, that is slot number ``block * block_size + offset``,
  the "slot mapping" a paged kernel writes through;
- :meth:`reserve` allocates the blocks a step's new tokens need and returns their slots (the
  model then writes every layer's keys and values there); :meth:`free` returns a finished
  request's blocks; :meth:`truncate` forgets the tail of a sequence (speculative decoding rolls
  rejected draft tokens back this way).

**Prefix caching** (``prefix_caching=True``, as in vLLM): a *full* block is named by a hash of its
tokens chained with the hash of the block before it, so equal names mean equal prefixes. When a
request arrives, the longest run of its prompt's full blocks already in the cache is shared
(reference counts go up) instead of being computed again. A block whose last user leaves keeps its
contents and its name on an eviction list; it is reused by a later hit, or handed out as a fresh
block when the free list is empty, least recently used first (and, among the blocks of one
request, the tail first, since the head is the part other requests are most likely to share).
Shared blocks are always full, so a sequence never writes into a block another one reads.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch

from ..checks import check_bool, check_hashable, check_int
from ..kv_cache import GroupedQueryAttention
from ..models import attention_layers

__all__ = ["PagedModelCache", "block_hash"]


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The name of a full block: SHA-256 of the previous block's name and this block's token ids.

    Chaining makes the name depend on the whole prefix, not only on the block's own tokens, so two
    requests share block ``i`` only if their first ``(i + 1) * block_size`` tokens are equal.
    """
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class PagedModelCache:
    """Keys and values of every layer in ``num_blocks`` blocks of ``block_size`` tokens.

    Sequences are named by any hashable ``seq_id``. For each live sequence the cache keeps its
    block table, the token ids whose keys and values are stored (``tokens(seq_id)``) and, with
    prefix caching, the names of its full blocks.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        prefix_caching: bool = False,
    ) -> None:
        self.num_layers = check_int(num_layers, "num_layers", min=1)
        self.num_kv_heads = check_int(num_kv_heads, "num_kv_heads", min=1)
        self.head_dim = check_int(head_dim, "head_dim", min=1)
        self.num_blocks = check_int(num_blocks, "num_blocks", min=1)
        self.block_size = check_int(block_size, "block_size", min=1)
        self.prefix_caching = check_bool(prefix_caching, "prefix_caching")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.key_blocks = torch.zeros(shape, dtype=dtype, device=device)
        self.value_blocks = torch.zeros(shape, dtype=dtype, device=device)
        # Pop from the end: block 0 is handed out first, which keeps block tables easy to read.
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused blocks, LRU first
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_names: list[bytes | None] = [None] * num_blocks  # set while a block is cached
        self.cached_blocks: dict[bytes, int] = {}  # name -> physical block
        self.block_tables: dict[Hashable, list[int]] = {}
        self._tokens: dict[Hashable, list[int]] = {}
        self._names: dict[Hashable, list[bytes]] = {}  # names of each sequence's committed full blocks
        self.stats = {"queried_tokens": 0, "hit_tokens": 0, "evictions": 0}

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        *,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype | None = None,
        prefix_caching: bool = False,
    ) -> PagedModelCache:
        """A cache shaped for ``model`` (a TinyTransformer with "mha", "gqa" or "mqa" attention).

        It holds the layers that own keys and values (``model.config.num_cache_layers``: fewer
        than the blocks with cross-layer KV sharing). ``dtype`` defaults to the model's parameter dtype.
        """
        layer = _attention_of(model, "model")
        if dtype is None:
            dtype = next(model.parameters()).dtype
        return cls(
            model.config.num_cache_layers,
            layer.num_kv_heads,
            layer.head_dim,
            num_blocks=num_blocks,
            block_size=block_size,
            dtype=dtype,
            device=next(model.parameters()).device,
            prefix_caching=prefix_caching,
        )

    # --- bookkeeping -----------------------------------------------------------------------------
    def _check_live(self, seq_id: Hashable, name: str = "seq_id") -> None:
        check_hashable(seq_id, name)
        if seq_id not in self.block_tables:
            raise ValueError(f"{name}={seq_id!r} is not a live sequence of this cache")

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take: the free list plus cached blocks nobody uses."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one live sequence."""
        return self.num_blocks - self.num_free_blocks

    def length(self, seq_id: Hashable) -> int:
        """Tokens of the sequence whose keys and values are stored."""
        self._check_live(seq_id)
        return len(self._tokens[seq_id])

    def tokens(self, seq_id: Hashable) -> list[int]:
        """A copy of the token ids whose keys and values the sequence stores, in order."""
        self._check_live(seq_id)
        return list(self._tokens[seq_id])

    def block_table(self, seq_id: Hashable) -> list[int]:
        """A copy of the sequence's block table (logical block i -> physical block)."""
        self._check_live(seq_id)
        return list(self.block_tables[seq_id])

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that ``num_tokens`` tokens occupy: ``ceil(num_tokens / block_size)``."""
        return math.ceil(check_int(num_tokens, "num_tokens", min=0) / self.block_size)

    def blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """New blocks that appending ``num_tokens`` tokens to the sequence takes from the pool."""
        self._check_live(seq_id)
        num_tokens = check_int(num_tokens, "num_tokens", min=0)
        return self.blocks_for(len(self._tokens[seq_id]) + num_tokens) - len(self.block_tables[seq_id])

    def _allocate(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.pop()
        else:  # reuse the least recently used cached block: its contents are forgotten
            block, _ = self.evictable.popitem(last=False)
            del self.cached_blocks[self.block_names[block]]
            self.block_names[block] = None
            self.stats["evictions"] += 1
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if self.block_names[block] is not None:
                self.evictable[block] = None  # newest at the end: evicted last
            else:
                self.free_blocks.append(block)

    # --- prefix caching --------------------------------------------------------------------------
    def _prefix_hits(self, tokens: Sequence[int]) -> list[int]:
        """Physical blocks holding the longest cached run of ``tokens``' full blocks.

        At most ``len(tokens) - 1`` tokens are matched: the last token must go through the model
        anyway, since its logits choose the next token.
        """
        if not self.prefix_caching:
            return []
        hits, name = [], b""
        for start in range(0, len(tokens) - 1 - self.block_size + 1, self.block_size):
            name = block_hash(name, tokens[start : start + self.block_size])
            block = self.cached_blocks.get(name)
            if block is None:
                break
            hits.append(block)
        return hits

    def cached_prefix_length(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of ``tokens`` :meth:`add_sequence` would take from the cache."""
        return len(self._prefix_hits(_token_list(tokens, "tokens"))) * self.block_size

    def blocks_to_add(self, tokens: Sequence[int], num_new_tokens: int) -> int:
        """Blocks of the pool that :meth:`add_sequence` with ``tokens`` and then reserving the next
        ``num_new_tokens`` tokens would take (unused cached hits leave the pool too)."""
        tokens = _token_list(tokens, "tokens")
        num_new_tokens = check_int(num_new_tokens, "num_new_tokens", min=0)
        hits = self._prefix_hits(tokens)
        idle_hits = sum(1 for block in hits if self.ref_counts[block] == 0)
        return idle_hits + self.blocks_for(len(hits) * self.block_size + num_new_tokens) - len(hits)

    def add_sequence(self, seq_id: Hashable, tokens: Sequence[int] = ()) -> int:
        """Start a sequence; with prefix caching, share the cached blocks of ``tokens``' prefix.

        ``tokens`` are the sequence's known tokens (its prompt). Returns how many of them are
        already stored (a multiple of ``block_size``, at most ``len(tokens) - 1``; 0 without
        prefix caching). The caller then feeds the model ``tokens[returned:]``.
        """
        check_hashable(seq_id, "seq_id")
        tokens = _token_list(tokens, "tokens")
        if seq_id in self.block_tables:
            raise ValueError(f"seq_id={seq_id!r} is already a live sequence")
        hits = self._prefix_hits(tokens)
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
        cached = len(hits) * self.block_size
        if self.prefix_caching:
            self.stats["queried_tokens"] += len(tokens)
            self.stats["hit_tokens"] += cached
        self.block_tables[seq_id] = hits
        self._tokens[seq_id] = tokens[:cached]
        self._names[seq_id] = [self.block_names[block] for block in hits]
        return cached

    def _commit(self, seq_id: Hashable) -> None:
        """Name the sequence's newly full blocks (their keys and values are now written)."""
        if not self.prefix_caching:
            return
        names, tokens, table = self._names[seq_id], self._tokens[seq_id], self.block_tables[seq_id]
        while (len(names) + 1) * self.block_size <= len(tokens):
            index = len(names)
            block_tokens = tokens[index * self.block_size : (index + 1) * self.block_size]
            name = block_hash(names[-1] if names else b"", block_tokens)
            names.append(name)
            block = table[index]
            # Another sequence may have computed the same block first: keep that one cached.
            if name not in self.cached_blocks and self.block_names[block] is None:
                self.cached_blocks[name] = block
                self.block_names[block] = name

    # --- writing ---------------------------------------------------------------------------------
    def reserve(self, seq_id: Hashable, tokens: Sequence[int]) -> torch.Tensor:
        """Make room for ``tokens`` after the sequence's stored ones; return their slots ``(n,)`` long.

        The caller writes every layer's keys and values at these slots (see :meth:`write`) and then
        calls :meth:`commit`. Raises ``RuntimeError`` (and changes nothing) when the pool is short.
        """
        self._check_live(seq_id)
        tokens = _token_list(tokens, "tokens")
        needed = self.blocks_needed(seq_id, len(tokens))
        if needed > self.num_free_blocks:
            raise RuntimeError(
                f"out of blocks: seq_id={seq_id!r} needs {needed}, {self.num_free_blocks} free"
            )
        table, stored = self.block_tables[seq_id], self._tokens[seq_id]
        for _ in range(needed):
            table.append(self._allocate())
        positions = torch.arange(len(stored), len(stored) + len(tokens))
        blocks = torch.tensor(table, dtype=torch.long)[positions // self.block_size]
        stored.extend(tokens)
        return (blocks * self.block_size + positions % self.block_size).to(self.key_blocks.device)

    def write(self, layer_index: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v (n, H_kv, D)`` of layer ``layer_index`` at ``slots (n,)`` (from :meth:`reserve`)."""
        flat_keys = self.key_blocks[layer_index].view(-1, self.num_kv_heads, self.head_dim)
        flat_values = self.value_blocks[layer_index].view(-1, self.num_kv_heads, self.head_dim)
        flat_keys[slots] = k.to(flat_keys.dtype)
        flat_values[slots] = v.to(flat_values.dtype)

    def commit(self, seq_id: Hashable) -> None:
        """Declare the reserved tokens written in every layer (with prefix caching, full blocks
        become shareable only now, so a block is never matched before its contents exist)."""
        self._check_live(seq_id)
        self._commit(seq_id)

    # --- ending and rolling back -----------------------------------------------------------------
    def free(self, seq_id: Hashable) -> None:
        """End a sequence. Its blocks go back to the pool, the tail first (cached ones stay named)."""
        self._check_live(seq_id)
        for block in reversed(self.block_tables.pop(seq_id)):
            self._release(block)
        del self._tokens[seq_id], self._names[seq_id]

    def truncate(self, seq_id: Hashable, length: int) -> None:
        """Keep only the first ``length`` stored tokens of the sequence (forget the rest).

        Blocks past the new end go back to the pool. If the new last block is only partly kept and
        another sequence shares it, the sequence first gets a private copy (copy-on-write), so the
        other one keeps its tokens; a cached block that is partly cut loses its name.
        """
        self._check_live(seq_id)
        stored = self._tokens[seq_id]
        length = check_int(length, "length", min=0, max=len(stored))
        table = self.block_tables[seq_id]
        keep = self.blocks_for(length)
        last = table[keep - 1] if keep else None
        partial = length % self.block_size != 0
        copy = partial and self.ref_counts[last] > 1
        released = sum(1 for block in table[keep:] if self.ref_counts[block] == 1)
        if copy and self.num_free_blocks + released == 0:
            raise RuntimeError(f"out of blocks: seq_id={seq_id!r} needs 1 to copy a shared block, 0 free")
        for block in reversed(table[keep:]):
            self._release(block)
        del table[keep:]
        if copy:
            private = self._allocate()
            self.key_blocks[:, private] = self.key_blocks[:, last]
            self.value_blocks[:, private] = self.value_blocks[:, last]
            self._release(last)
            table[-1] = private
        elif partial and self.block_names[last] is not None:
            del self.cached_blocks[self.block_names[last]]
            self.block_names[last] = None
        del stored[length:]
        del self._names[seq_id][length // self.block_size :]

    # --- reading ---------------------------------------------------------------------------------
    def block_table_tensor(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """Block tables of ``seq_ids`` as one ``(R, max_blocks)`` long tensor, padded with block 0."""
        tables = [self.block_table(seq_id) for seq_id in seq_ids]
        width = max((len(t) for t in tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.long, device=self.key_blocks.device).view(len(tables), width)

    def gather(self, seq_id: Hashable, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's keys and values of one layer, copied contiguously: ``(H_kv, L, D)`` each."""
        self._check_live(seq_id)
        layer_index = check_int(layer_index, "layer_index", min=0, max=self.num_layers - 1)
        table = torch.tensor(self.block_tables[seq_id], dtype=torch.long, device=self.key_blocks.device)
        length = len(self._tokens[seq_id])
        shape = (-1, self.num_kv_heads, self.head_dim)
        keys = self.key_blocks[layer_index, table].reshape(shape)[:length]
        values = self.value_blocks[layer_index, table].reshape(shape)[:length]
        return keys.transpose(0, 1), values.transpose(0, 1)

    # --- reporting -------------------------------------------------------------------------------
    def usage(self) -> dict:
        """Blocks in use, the slots they hold and how many of those hold a token.

        Keys: ``used_blocks``, ``cached_free_blocks`` (unused blocks kept for prefix hits),
        ``free_blocks``, ``stored_tokens`` (slots holding a token, shared ones counted once),
        ``utilisation`` (stored tokens / slots of used blocks; 1.0 when none is used).
        """
        used = [b for b in range(self.num_blocks) if self.ref_counts[b] > 0]
        fill: dict[int, int] = {}
        for seq_id, table in self.block_tables.items():
            length = len(self._tokens[seq_id])
            for logical, block in enumerate(table):
                fill[block] = max(
                    fill.get(block, 0), min(self.block_size, length - logical * self.block_size)
                )
        stored = sum(fill.values())
        return {
            "used_blocks": len(used),
            "cached_free_blocks": len(self.evictable),
            "free_blocks": len(self.free_blocks),
            "stored_tokens": stored,
            "utilisation": stored / (len(used) * self.block_size) if used else 1.0,
        }


def _token_list(tokens: object, name: str) -> list[int]:
    """Token ids as a list of Python ints (from a list, tuple or 1-D long tensor)."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1 or tokens.dtype != torch.long:
            raise ValueError(
                f"{name} must be a 1-D long tensor or a sequence of ints, got {tuple(tokens.shape)}"
            )
        return tokens.tolist()
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(tokens).__name__}")
    return [check_int(t, name, min=0) for t in tokens]


def _attention_of(model: object, name: str) -> GroupedQueryAttention:
    """The first block's attention of a TinyTransformer whose mixers are softmax attention layers."""
    return attention_layers(model, name)[0]
