"""One model step for a batch of requests of different lengths, reading keys and values by block table.

A serving engine does not run "a batch of equal-length rows". Each step it gives every scheduled
request a few new tokens (one for a request that is decoding, a chunk of its prompt for one that
is prefilling), and the requests hold different numbers of cached tokens. :func:`paged_forward`
runs the tiny model of :mod:`course_lib.models` (its own layers and weights) on such a ragged
batch:

- the new tokens of all requests are **packed** into one ``(N, d_model)`` matrix: embeddings,
  projections, the MLP and the head are per-token work and do not care which request a token
  belongs to, so they run as one matrix multiply over all N tokens;
- positions are **per request** (token ``i`` of a request that already holds ``L`` tokens is at
  position ``L + i``), for the learned position embedding or RoPE;
- every layer writes its new keys and values into the paged cache through the slot mapping, and
  :func:`paged_attention` lets each request's queries read its own keys and values through its
  block table. Attention is the only place where requests must be kept apart.

With cross-layer KV sharing (``ModelConfig(kv_share=s)``) only the first layer of each group of
``s`` writes keys and values (cache layer ``i // s``); the others read that cache layer, so the
pool holds ``ceil(num_layers / s)`` layers and the same number of blocks serves ``s`` times the
tokens.

The naive reference beside :func:`paged_attention` is :func:`paged_attention_reference`: copy each
request's keys and values out contiguously and call chapter 04's ``gqa_attention``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from ..checks import check_tensor
from ..kv_cache import gqa_attention
from .paged_cache import PagedModelCache, _attention_of, _token_list

__all__ = ["paged_attention", "paged_attention_reference", "paged_forward"]


def paged_attention(
    q: torch.Tensor,
    key_blocks: torch.Tensor,
    value_blocks: torch.Tensor,
    block_tables: torch.Tensor,
    context_lengths: torch.Tensor,
    query_lengths: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of R requests' new queries over their own cached keys, read by block table.

    Args:
        q: ``(R, H, T, D)`` queries, padded: row ``r`` holds ``query_lengths[r]`` real queries
            (its newest tokens), the rest is padding.
        key_blocks, value_blocks: one layer's storage ``(num_blocks, block_size, H_kv, D)``.
        block_tables: ``(R, M)`` long, physical block of each request's logical block (padded with
            any valid block).
        context_lengths: ``(R,)`` tokens stored for each request, its new ones included.
        query_lengths: ``(R,)`` new tokens of each request (``<= T``).

    Returns ``(R, H, T, D)``: query ``i`` of request ``r`` (at position ``context - queries + i``)
    sees that request's keys at positions ``0 .. context - queries + i``; padding rows are zero.
    """
    check_tensor(q, "q", ndim=4, floating=True)
    check_tensor(key_blocks, "key_blocks", ndim=4, floating=True)
    R, _, T, _ = q.shape
    _, block_size, H_kv, D = key_blocks.shape
    M = block_tables.shape[1]
    # Each request's blocks in table order: (R, M, block_size, H_kv, D) -> (R, H_kv, M * block_size, D).
    keys = key_blocks[block_tables].reshape(R, M * block_size, H_kv, D).transpose(1, 2).to(q.dtype)
    values = value_blocks[block_tables].reshape(R, M * block_size, H_kv, -1).transpose(1, 2).to(q.dtype)
    key_positions = torch.arange(M * block_size, device=q.device)
    query_index = torch.arange(T, device=q.device)
    query_positions = (context_lengths - query_lengths)[:, None] + query_index  # (R, T)
    real = query_index[None, :] < query_lengths[:, None]
    # Causal within the request; slots past a query's position (stale data, padding blocks) are masked.
    allowed = (key_positions[None, None, :] <= query_positions[:, :, None]) & real[:, :, None]
    return gqa_attention(q, keys, values, allowed[:, None], scale=scale)


def paged_attention_reference(
    cache: PagedModelCache, layer_index: int, seq_ids: Sequence[Hashable], queries: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The naive form: each request's keys copied out contiguously, then causal ``gqa_attention``.

    ``queries[r]`` is ``(H, T_r, D)`` for the newest ``T_r`` tokens of ``seq_ids[r]``; returns one
    ``(H, T_r, D)`` per request.
    """
    outputs = []
    for seq_id, q in zip(seq_ids, queries, strict=True):
        keys, values = cache.gather(seq_id, layer_index)
        outputs.append(
            gqa_attention(q[None], keys[None].to(q.dtype), values[None].to(q.dtype), causal=True)[0]
        )
    return outputs


@torch.no_grad()
def paged_forward(
    model: torch.nn.Module, cache: PagedModelCache, batch: Sequence[tuple[Hashable, Sequence[int]]]
) -> list[torch.Tensor]:
    """Feed each request of ``batch`` its new tokens; return each one's logits ``(n_r, vocab_size)``.

    ``batch`` is a sequence of ``(seq_id, new_tokens)`` pairs for distinct live sequences of
    ``cache``; ``new_tokens`` continue what the cache stores for that sequence. The new tokens'
    keys and values are written to the cache (every layer) and committed. Row ``i`` of a request's
    logits predicts the token after its ``i``-th new token, exactly as ``model(all_tokens)`` would.
    ``model`` is a :class:`~course_lib.models.TinyTransformer` with "mha", "gqa" or "mqa" attention.
    Everything is checked before the cache changes: a bad batch leaves it untouched.
    """
    attention = _attention_of(model, "model")
    config = model.config
    if not isinstance(cache, PagedModelCache):
        raise TypeError(f"cache must be a PagedModelCache, got {type(cache).__name__}")
    cache_shape = (cache.num_layers, cache.num_kv_heads, cache.head_dim)
    model_shape = (config.num_cache_layers, attention.num_kv_heads, attention.head_dim)
    if cache_shape != model_shape:
        raise ValueError(
            f"cache has (cached layers, kv heads, head dim) = {cache_shape}, the model {model_shape}"
        )
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence) or not batch:
        raise ValueError("batch must be a non-empty sequence of (seq_id, new_tokens) pairs")
    seq_ids, token_lists = [], []
    for item in batch:
        if not isinstance(item, tuple) or len(item) != 2:
            raise ValueError(f"batch must hold (seq_id, new_tokens) pairs, got {item!r}")
        seq_id, tokens = item
        cache.length(seq_id)  # raises for an unknown sequence
        tokens = _token_list(tokens, "new_tokens")
        if not tokens:
            raise ValueError(f"new_tokens of seq_id={seq_id!r} must hold at least one token")
        if max(tokens) >= config.vocab_size:
            raise ValueError(f"new_tokens must lie in 0 .. vocab_size-1 = {config.vocab_size - 1}")
        if config.positions == "learned" and cache.length(seq_id) + len(tokens) > config.max_len:
            raise ValueError(
                f"new_tokens of seq_id={seq_id!r} reach position {cache.length(seq_id) + len(tokens)}, "
                f"beyond max_len={config.max_len} (learned positions)"
            )
        seq_ids.append(seq_id)
        token_lists.append(tokens)
    if len(set(seq_ids)) != len(seq_ids):
        raise ValueError("batch must name each seq_id once")
    needed = sum(cache.blocks_needed(s, len(t)) for s, t in zip(seq_ids, token_lists))
    if needed > cache.num_free_blocks:
        raise RuntimeError(f"out of blocks: the batch needs {needed}, {cache.num_free_blocks} free")

    device = cache.key_blocks.device
    starts = torch.tensor([cache.length(s) for s in seq_ids], device=device)
    slots = torch.cat([cache.reserve(s, t) for s, t in zip(seq_ids, token_lists)])
    counts = torch.tensor([len(t) for t in token_lists], device=device)
    R, N, T = len(seq_ids), int(counts.sum()), int(counts.max())
    rows = torch.repeat_interleave(torch.arange(R, device=device), counts)  # request of each packed token
    cols = torch.arange(N, device=device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    positions = starts[rows] + cols
    tables = cache.block_table_tensor(seq_ids)
    context_lengths = starts + counts

    tokens = torch.tensor([t for ts in token_lists for t in ts], dtype=torch.long, device=device)
    x = model.token_embedding(tokens)  # (N, d_model): every token of every request, packed
    if model.position_embedding is not None:
        x = x + model.position_embedding(positions)
    for index, block in enumerate(model.blocks):
        layer = block.attention
        H, D = layer.num_heads, layer.head_dim
        cache_layer = config.cache_layer(index)  # == index without cross-layer sharing
        # The packed tokens as one row (1, N, d_model), each rotated at its own position under RoPE.
        q, k, v = layer.queries_keys_values(block.attention_norm(x)[None], positions=positions)
        if layer.owns_kv:  # a sharing layer reads what its group's first layer wrote
            cache.write(cache_layer, slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
        padded = q.new_zeros(R, T, H, D)
        padded[rows, cols] = q[0].transpose(0, 1)
        out = paged_attention(
            padded.transpose(1, 2),
            cache.key_blocks[cache_layer],
            cache.value_blocks[cache_layer],
            tables,
            context_lengths,
            counts,
        )
        x = x + layer.out_proj(out.transpose(1, 2)[rows, cols].reshape(N, H * D))
        x = x + block.mlp(block.mlp_norm(x))
    logits = model.head(model.norm(x))
    for seq_id in seq_ids:
        cache.commit(seq_id)
    return list(logits.split(counts.tolist()))
