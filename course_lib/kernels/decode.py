"""One decode step over a paged KV cache, split over the keys: PagedAttention meets FlashDecoding.

``course_lib.kv_cache.PagedKVCache.attention`` walks a sequence's block table page by page with an
online softmax; ``course_lib.tiling.flash_decoding`` splits the keys into chunks attended to in
parallel and combines them exactly through their logsumexps. The kernel does both:

- :func:`paged_decode_kernel`: one program per (sequence, query head, split). It walks its split of
  the sequence's tokens ``BLOCK_N`` at a time; :func:`page_offsets` *gathers* each token's row
  through the block table (logical page ``j // page_size`` -> physical page, slot ``j % page_size``),
  so the pages may lie anywhere in the pool. It writes a normalised partial output and its logsumexp.
- :func:`combine_splits_kernel`: one program per (sequence, query head) merges the splits with the
  weights ``exp(lse_i - lse)``, exactly.

With one query there is nothing for ``tl.dot`` to multiply, so the scores are an elementwise
product and a sum over the head dim: decoding is bound by reading the cache, not by FLOPs.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import triton
import triton.language as tl

from ..checks import check_divisible, check_int, check_shape, check_tensor, resolve_scale
from ..kv_cache import PagedKVCache
from .common import check_block, check_head_dim, check_kernel_dtype, kernel_device, launch, padded_dim

__all__ = [
    "page_offsets",
    "paged_decode_kernel",
    "combine_splits_kernel",
    "paged_decode",
    "paged_tables",
    "default_num_splits",
]


@triton.jit
def page_offsets(TABLE, tokens, valid, page_size, page_stride, token_stride):
    """Where the K (or V) rows of ``tokens`` start in the pool: the gather through the block table.

    ``TABLE`` points at this sequence's row of the block table; ``tokens`` are logical positions
    (BLOCK_N,), ``valid`` masks those past the split. Returns element offsets (BLOCK_N,).
    """
    physical_page = tl.load(TABLE + tokens // page_size, mask=valid, other=0)
    return physical_page.to(tl.int64) * page_stride + (tokens % page_size) * token_stride


@triton.jit
def paged_decode_kernel(
    Q, K_POOL, V_POOL, TABLES, LENGTHS, PARTIAL_O, PARTIAL_LSE,
    num_heads, group, table_width, page_size, key_page_stride, value_page_stride, num_splits, D, DV, scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GATHER: tl.constexpr = page_offsets,  # passed in so that the notebook's exercise can plug in its own
):  # fmt: skip
    """One (sequence, query head, split): attention of the new token over its share of the cache.

    Q (B, H_q, D); pools (num_pages, H_kv, page_size, D or D_v); TABLES (B, table_width) int32;
    LENGTHS (B,); a page of the key pool spans ``key_page_stride = H_kv * page_size * D`` elements;
    PARTIAL_O (B, H_q, num_splits, D_v) and PARTIAL_LSE (B, H_q, num_splits) float32.
    """
    sequence_head = tl.program_id(0)
    split = tl.program_id(1)
    sequence = sequence_head // num_heads
    kv_head = (sequence_head % num_heads) // group  # grouped-query attention: heads share a K/V head

    length = tl.load(LENGTHS + sequence)
    split_size = tl.cdiv(length, num_splits)
    start, end = split * split_size, tl.minimum((split + 1) * split_size, length)

    dims = tl.arange(0, BLOCK_D)
    value_dims = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + sequence_head * D + dims, mask=dims < D, other=0.0).to(tl.float32)
    TABLE = TABLES + sequence * table_width
    K_HEAD = K_POOL + kv_head * page_size * D  # the pools' layout is (page, kv head, slot, dim)
    V_HEAD = V_POOL + kv_head * page_size * DV

    row_max = float("-inf")
    row_sum = 0.0
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        tokens = start_n + tl.arange(0, BLOCK_N)
        valid = tokens < end
        key_rows = GATHER(TABLE, tokens, valid, page_size, key_page_stride, D)
        value_rows = GATHER(TABLE, tokens, valid, page_size, value_page_stride, DV)
        k = tl.load(
            K_HEAD + key_rows[:, None] + dims[None, :], mask=valid[:, None] & (dims[None, :] < D), other=0.0
        )
        v = tl.load(
            V_HEAD + value_rows[:, None] + value_dims[None, :],
            mask=valid[:, None] & (value_dims[None, :] < DV),
            other=0.0,
        )
        scores = tl.sum(q[None, :] * k.to(tl.float32), axis=1) * scale
        scores = tl.where(valid, scores, float("-inf"))
        # The online softmax of chapter 03, for one row.
        new_max = tl.maximum(row_max, tl.max(scores, axis=0))
        probabilities = tl.exp(scores - new_max)
        correction = tl.exp(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(probabilities, axis=0)
        acc = acc * correction + tl.sum(probabilities[:, None] * v.to(tl.float32), axis=0)
        row_max = new_max

    # An empty split (more splits than tokens) writes zeros and lse = -inf: the combine ignores it.
    safe_sum = tl.where(row_sum > 0, row_sum, 1.0)
    out = acc / safe_sum
    lse = tl.where(row_sum > 0, row_max + tl.log(safe_sum), float("-inf"))
    slot = sequence_head * num_splits + split
    tl.store(PARTIAL_O + slot * DV + value_dims, out, mask=value_dims < DV)
    tl.store(PARTIAL_LSE + slot, lse)


@triton.jit
def combine_splits_kernel(
    PARTIAL_O, PARTIAL_LSE, O, LSE, num_splits, DV, BLOCK_SPLITS: tl.constexpr, BLOCK_DV: tl.constexpr
):
    """One (sequence, query head): merge the splits' partial outputs through their logsumexps."""
    sequence_head = tl.program_id(0)
    splits = tl.arange(0, BLOCK_SPLITS)
    value_dims = tl.arange(0, BLOCK_DV)
    lse = tl.load(
        PARTIAL_LSE + sequence_head * num_splits + splits, mask=splits < num_splits, other=float("-inf")
    )
    partial = tl.load(
        PARTIAL_O + (sequence_head * num_splits + splits[:, None]) * DV + value_dims[None, :],
        mask=(splits[:, None] < num_splits) & (value_dims[None, :] < DV),
        other=0.0,
    )
    top = tl.max(lse, axis=0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)  # every split empty: a sequence of length 0
    weights = tl.exp(lse - safe_top)  # exp(lse_i - max), 0 for empty splits
    total = tl.sum(weights, axis=0)
    safe_total = tl.where(total > 0, total, 1.0)
    out = tl.sum(weights[:, None] * partial, axis=0) / safe_total
    tl.store(O + sequence_head * DV + value_dims, out.to(O.dtype.element_ty), mask=value_dims < DV)
    tl.store(LSE + sequence_head, tl.where(total > 0, safe_top + tl.log(safe_total), float("-inf")))


def paged_tables(cache: PagedKVCache, seq_ids: Sequence[Hashable]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_tables (B, max_pages) int32, lengths (B,) int32)`` of ``seq_ids`` in ``cache``.

    Rows are padded with page 0 past a sequence's last page; the kernel never reads them.
    """
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    tables = [cache.block_table(seq_id) for seq_id in seq_ids]
    if not tables:
        raise ValueError("seq_ids must name at least one sequence")
    width = max(1, max(len(t) for t in tables))
    device = cache.key_blocks.device
    block_tables = torch.zeros(len(tables), width, dtype=torch.int32, device=device)
    for row, table in enumerate(tables):
        block_tables[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
    lengths = torch.tensor([cache.length(seq_id) for seq_id in seq_ids], dtype=torch.int32, device=device)
    return block_tables, lengths


def default_num_splits(batch_heads: int, max_length: int, block_n: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (two per SM), never more splits than key blocks; 2 on the CPU."""
    key_blocks = max(1, triton.cdiv(max_length, block_n))
    if device.type != "cuda":
        return min(2, key_blocks)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(key_blocks, triton.cdiv(2 * sm_count, batch_heads), 64))


def paged_decode(
    q: torch.Tensor,
    key_blocks: torch.Tensor,
    value_blocks: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    block_n: int = 32,
    return_lse: bool = False,
    gather=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one new token per sequence over a paged KV cache, split over the keys.

    Args:
        q: ``(B, H_q, 1, D)``: the newest token of each sequence (already appended to the cache).
        key_blocks, value_blocks: the pools, ``(num_pages, H_kv, page_size, D)`` and
            ``(num_pages, H_kv, page_size, D_v)``, as :class:`~course_lib.kv_cache.PagedKVCache`
            stores them; ``H_kv`` divides ``H_q`` (grouped-query attention).
        block_tables: ``(B, max_pages)`` integer page numbers (row b: sequence b's pages in order).
        lengths: ``(B,)`` tokens in each sequence's cache (0 gives zeros).
        scale: defaults to ``D ** -0.5``.
        num_splits: key splits per sequence (FlashDecoding); default: enough to fill the GPU.
        block_n: tokens loaded per step, one of 16, 32, 64, 128 (any ``page_size`` works: the gather
            is per token).
        return_lse: also return the float32 logsumexp ``(B, H_q, 1)``.
        gather: a ``@triton.jit`` function with the signature of :func:`page_offsets` to use
            instead of it (the notebook's exercise plugs in here).

    Returns:
        ``(B, H_q, 1, D_v)`` in the dtype of q; :func:`paged_tables` builds the table and lengths
        from a ``PagedKVCache``.
    """
    check_tensor(q, "q", ndim=4, floating=True)
    check_tensor(key_blocks, "key_blocks", ndim=4, floating=True)
    check_tensor(value_blocks, "value_blocks", ndim=4, floating=True)
    check_tensor(block_tables, "block_tables", ndim=2, dtype=(torch.int32, torch.int64))
    check_tensor(lengths, "lengths", ndim=1, dtype=(torch.int32, torch.int64))
    B, H, T, D = q.shape
    if T != 1:
        raise ValueError(
            f"q must hold one new token per sequence, shape (B, H_q, 1, D), got {tuple(q.shape)}"
        )
    num_pages, H_kv, page_size, _ = key_blocks.shape
    check_shape(key_blocks, "key_blocks", (None, None, None, D), names="num_pages, H_kv, page_size, D")
    check_shape(
        value_blocks,
        "value_blocks",
        (num_pages, H_kv, page_size, None),
        names="num_pages, H_kv, page_size, D_v",
    )
    DV = value_blocks.shape[3]
    check_divisible(H, "num_heads", H_kv, "num_kv_heads")
    check_shape(block_tables, "block_tables", (B, None), names="B, max_pages")
    check_shape(lengths, "lengths", (B,), names="B")
    for x, name in ((q, "q"), (key_blocks, "key_blocks"), (value_blocks, "value_blocks")):
        check_kernel_dtype(x, name)
    check_head_dim(D, "head dim D")
    check_head_dim(DV, "value head dim D_v")
    scale = resolve_scale(scale, D)
    block_n = check_block(block_n, "block_n")
    if num_splits is not None:
        num_splits = check_int(num_splits, "num_splits", min=1)
    device = kernel_device(
        (q, key_blocks, value_blocks, block_tables, lengths),
        ("q", "key_blocks", "value_blocks", "block_tables", "lengths"),
    )
    # A page number out of range would read outside the pool: check the pages in use, on the device,
    # with one synchronisation (a decode step is short, and every host round trip shows).
    capacity = block_tables.shape[1] * page_size
    pages_in_use = (
        torch.arange(block_tables.shape[1], device=device) < ((lengths + page_size - 1) // page_size)[:, None]
    )
    bad_page = ((block_tables < 0) | (block_tables >= num_pages)) & pages_in_use
    problems = torch.stack([(lengths < 0).any() | (lengths > capacity).any(), bad_page.any()]).tolist()
    if problems[0]:
        raise ValueError(
            f"lengths must lie in 0 .. {capacity} (max_pages x page_size), got {lengths.tolist()}"
        )
    if problems[1]:
        raise ValueError(f"block_tables must name pages 0 .. {num_pages - 1} for the tokens in use")
    if num_splits is None:
        max_length = int(lengths.max()) if B else 0
        num_splits = default_num_splits(B * H, max_length, block_n, device)

    out = q.new_empty(B, H, 1, DV)
    lse = torch.empty(B, H, 1, device=device, dtype=torch.float32)
    if B * H == 0:
        return (out, lse) if return_lse else out
    q, key_blocks, value_blocks = (x.contiguous() for x in (q, key_blocks, value_blocks))
    block_tables, lengths = block_tables.to(torch.int32).contiguous(), lengths.to(torch.int32).contiguous()
    partial_out = torch.empty(B, H, num_splits, DV, device=device, dtype=torch.float32)
    partial_lse = torch.empty(B, H, num_splits, device=device, dtype=torch.float32)
    launch(
        paged_decode_kernel,
        (B * H, num_splits),
        q, key_blocks, value_blocks, block_tables, lengths, partial_out, partial_lse,
        H, H // H_kv, block_tables.shape[1], page_size, H_kv * page_size * D, H_kv * page_size * DV,
        num_splits, D, DV, scale,
        BLOCK_N=block_n, BLOCK_D=padded_dim(D), BLOCK_DV=padded_dim(DV), GATHER=gather or page_offsets,
        num_warps=4,
        blocks=f"block_n={block_n} with head dims {D}/{DV}",
    )  # fmt: skip
    launch(
        combine_splits_kernel,
        (B * H,),
        partial_out, partial_lse, out, lse, num_splits, DV,
        BLOCK_SPLITS=triton.next_power_of_2(num_splits), BLOCK_DV=padded_dim(DV), num_warps=4,
        blocks=f"num_splits={num_splits}",
    )  # fmt: skip
    return (out, lse) if return_lse else out
