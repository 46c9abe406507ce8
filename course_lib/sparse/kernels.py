"""Attention that skips the work a mask removes, instead of computing a full T x S matrix.

Passing a sparse mask to dense attention saves nothing: every score is still computed and
stored, then thrown away. Each kernel here lays the computation out so that only the allowed
pairs (plus a little padding) are touched: a band of width ``window`` for local attention, the
active tiles of a block layout, the ``k`` best keys, or a ``k x k`` neighbourhood of pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import (
    check_attention_inputs,
    check_bool,
    check_int,
    check_like,
    check_mask,
    check_shape,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from ..standard import masked_softmax

__all__ = [
    "sliding_window_attention",
    "block_sparse_attention",
    "topk_attention",
    "neighborhood_attention_2d",
]


# --- sliding window: a band of width w, computed block by block --------------------------------


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Local attention in ``O(T * window)`` time and memory; equals dense attention with
    :func:`sliding_window_mask`.

    Queries are cut into blocks of ``block_size`` (default ``window``). One block of queries
    needs only the keys from ``window - 1`` before its first query to its last query (and
    ``window - 1`` after it with ``causal=False``), so it gathers that slice of keys and values
    and computes a ``block x (block + window - 1)`` score tile. No ``T x S`` tensor is built.

    Args:
        q: ``(B, H, T, D)``; k: ``(B, H, S, D)``; v: ``(B, H, S, D_v)``. Queries are aligned to
            the end of the keys (query ``i`` sits at position ``S - T + i``).
        window: keys per query, counting the query itself (mirrored with ``causal=False``).

    Returns ``(B, H, T, D_v)`` in the input dtype; a query with no key in reach gets zeros.
    """
    B, H, T, S, D, D_v = check_attention_inputs(q, k, v)
    window = check_int(window, "window", min=1)
    check_bool(causal, "causal")
    scale = resolve_scale(scale, D)
    block_size = window if block_size is None else check_int(block_size, "block_size", min=1)
    if T == 0 or S == 0:  # no query, or no key in reach of any query
        return q.new_zeros(B, H, T, D_v)

    window = min(window, max(T, S))  # keys farther away than the sequences are long do not exist
    block = min(block_size, T)
    num_blocks = -(-T // block)
    behind, ahead = window - 1, (0 if causal else window - 1)
    offset = S - T

    # Positions of the keys each query block needs; out-of-range ones are clamped, then masked.
    device = q.device
    block_starts = torch.arange(num_blocks, device=device) * block + offset
    key_positions = block_starts.unsqueeze(1) + torch.arange(-behind, block + ahead, device=device)
    gather_index = key_positions.clamp(0, S - 1)
    # The query-key distance inside a tile is the same for every block: a small (block, span) band.
    distance = (
        torch.arange(block, device=device).unsqueeze(1)
        + behind
        - torch.arange(key_positions.shape[1], device=device)
    )
    band = (distance < window) & ((distance >= 0) if causal else (distance > -window))
    allowed = ((key_positions >= 0) & (key_positions < S)).unsqueeze(1) & band  # (blocks, block, span)

    dtype = compute_dtype(q)
    key_blocks = k.to(dtype)[:, :, gather_index]  # (B, H, blocks, span, D)
    value_blocks = v.to(dtype)[:, :, gather_index]  # (B, H, blocks, span, D_v)
    query_blocks = F.pad(q.to(dtype), (0, 0, 0, num_blocks * block - T)).view(B, H, num_blocks, block, D)
    scores = (query_blocks @ key_blocks.transpose(-2, -1)) * scale  # (B, H, blocks, block, span)
    out = masked_softmax(scores, allowed) @ value_blocks
    return out.reshape(B, H, num_blocks * block, D_v)[:, :, :T].to(q.dtype)


# --- block-sparse: only the active tiles of a layout -----------------------------------------------


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over the active ``block_size x block_size`` tiles of a block layout only.

    ``layout`` is bool ``(T_blocks, S_blocks)``, broadcastable to ``(B, H, T_blocks, S_blocks)``
    with ``T_blocks = ceil(T / block_size)``; it equals dense attention with
    :func:`block_sparse_mask` ``(layout, block_size, T, S)``. Each query block gathers its active
    key blocks (padded to the busiest row's count) and computes only those tiles: the work is
    ``T_blocks * max_active * block_size^2`` instead of ``T * S``. ``causal`` applies the
    end-aligned causal mask inside the tiles and drops tiles wholly in the future.

    Returns ``(B, H, T, D_v)`` in the input dtype; a query with no active key gets zeros.
    """
    B, H, T, S, D, D_v = check_attention_inputs(q, k, v)
    block_size = check_int(block_size, "block_size", min=1)
    check_bool(causal, "causal")
    scale = resolve_scale(scale, D)
    check_tensor(layout, "layout", ndim=(2, 3, 4), dtype=torch.bool)
    check_like(layout, "layout", q, dtype=False)
    query_blocks, key_blocks = -(-T // block_size), -(-S // block_size)
    try:
        layout = layout.expand(B, H, query_blocks, key_blocks)
    except RuntimeError:
        raise ValueError(
            f"layout of shape {tuple(layout.shape)} must broadcast to (B, H, ceil(T / block_size), "
            f"ceil(S / block_size)) = {(B, H, query_blocks, key_blocks)}"
        ) from None
    if T == 0 or S == 0:  # no query, or no key: nothing to gather
        return q.new_zeros(B, H, T, D_v)

    device, offset = q.device, S - T
    query_positions = torch.arange(query_blocks * block_size, device=device).view(query_blocks, block_size)
    if causal:
        # A tile is needed only if its first key is not after the block's last query.
        last_query = query_positions[:, -1].clamp(max=T - 1) + offset
        first_key = torch.arange(key_blocks, device=device) * block_size
        layout = layout & (first_key.unsqueeze(0) <= last_query.unsqueeze(1))

    # Active key blocks first (a stable sort keeps their order), then keep the busiest row's count.
    active_count = max(int(layout.sum(-1).max()), 1)
    order = torch.argsort((~layout).to(torch.int8), dim=-1, stable=True)[..., :active_count]
    active = layout.gather(-1, order)  # (B, H, T_blocks, A): False marks padding slots

    dtype = compute_dtype(q)
    pad_keys = key_blocks * block_size - S
    keys = F.pad(k.to(dtype), (0, 0, 0, pad_keys)).view(B, H, key_blocks, block_size, D)
    values = F.pad(v.to(dtype), (0, 0, 0, pad_keys)).view(B, H, key_blocks, block_size, D_v)
    flat_order = order.reshape(B, H, query_blocks * active_count, 1, 1)
    keys = keys.gather(2, flat_order.expand(-1, -1, -1, block_size, D))
    values = values.gather(2, flat_order.expand(-1, -1, -1, block_size, D_v))
    keys = keys.view(B, H, query_blocks, active_count * block_size, D)
    values = values.view(B, H, query_blocks, active_count * block_size, D_v)
    queries = F.pad(q.to(dtype), (0, 0, 0, query_blocks * block_size - T)).view(
        B, H, query_blocks, block_size, D
    )

    key_positions = (order.unsqueeze(-1) * block_size + torch.arange(block_size, device=device)).flatten(-2)
    allowed = (active.repeat_interleave(block_size, dim=-1) & (key_positions < S)).unsqueeze(-2)
    if causal:
        allowed = allowed & (key_positions.unsqueeze(-2) <= query_positions.unsqueeze(-1) + offset)
    scores = (queries @ keys.transpose(-2, -1)) * scale  # (B, H, T_blocks, block, A * block)
    out = masked_softmax(scores, allowed) @ values
    return out.reshape(B, H, query_blocks * block_size, D_v)[:, :, :T].to(q.dtype)


# --- top-k: dynamic sparsity chosen from the scores themselves -------------------------------------


def topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    top_k: int,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Each query attends only to its ``top_k`` highest-scoring allowed keys.

    Honest cost: choosing the top ``k`` needs every score first, so this computes the full
    ``(B, H, T, S)`` score matrix (``O(T S)`` time and memory); only the softmax and the
    weighted sum of values shrink to ``k`` keys per query. Methods that avoid the full scores
    must guess the top keys another way (hashing as in Reformer, clustering, a cheap predictor).

    ``mask`` (bool, broadcastable to ``(B, H, T, S)``) and ``causal`` (end-aligned) restrict the
    candidates; ``top_k >= S`` gives ordinary attention. Ties at the cut-off are broken by
    :func:`torch.topk`. Returns ``(B, H, T, D_v)`` in the input dtype.
    """
    B, H, T, S, D, D_v = check_attention_inputs(q, k, v)
    top_k = check_int(top_k, "top_k", min=1)
    check_bool(causal, "causal")
    scale = resolve_scale(scale, D)
    dtype = compute_dtype(q)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~check_mask(mask, "mask", (B, H, T, S), device=q.device), float("-inf"))
    if causal:
        distance = torch.arange(T, device=q.device).unsqueeze(1) + (S - T) - torch.arange(S, device=q.device)
        scores = scores.masked_fill(distance < 0, float("-inf"))

    kept_scores, kept_index = scores.topk(min(top_k, S), dim=-1)  # (B, H, T, k)
    weights = masked_softmax(kept_scores, torch.isfinite(kept_scores))
    kept_values = v.to(dtype).unsqueeze(2).expand(B, H, T, S, D_v)
    kept_values = kept_values.gather(3, kept_index.unsqueeze(-1).expand(-1, -1, -1, -1, D_v))
    return (weights.unsqueeze(-2) @ kept_values).squeeze(-2).to(q.dtype)


# --- 2-D neighbourhoods for images ---------------------------------------------------------------


def neighborhood_attention_2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Neighbourhood attention (NAT): each pixel attends to a ``kernel_size x kernel_size`` square.

    Inputs are images of tokens: q and k ``(B, H, height, width, D)``, v ``(B, H, height, width,
    D_v)``. The square around pixel ``(r, c)`` starts at row ``clamp(r - kernel_size // 2, 0,
    height - kernel_size)`` (columns alike), so at a border it slides inwards rather than being cut:
    every pixel sees exactly ``kernel_size ** 2`` keys. Cost ``O(height * width * kernel_size^2)``.
    Equals dense attention over the flattened pixels with :func:`neighborhood_mask_2d`.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(x, name, ndim=5, floating=True)
    B, H, height, width, D = q.shape
    check_shape(k, "k", (B, H, height, width, D), names="B, H, height, width, D")
    check_shape(v, "v", (B, H, height, width, None), names="B, H, height, width, D_v")
    for name, x in (("k", k), ("v", v)):
        check_like(x, name, q)
    if height == 0 or width == 0:  # an empty image: no pixel to attend from
        check_int(kernel_size, "kernel_size", min=1)
        resolve_scale(scale, D)
        return q.new_zeros(B, H, height, width, v.shape[-1])
    kernel_size = check_int(kernel_size, "kernel_size", min=1, max=min(height, width))
    scale = resolve_scale(scale, D)

    def neighbour_index(length: int) -> torch.Tensor:
        starts = (torch.arange(length, device=q.device) - kernel_size // 2).clamp(0, length - kernel_size)
        return starts.unsqueeze(1) + torch.arange(kernel_size, device=q.device)  # (length, kernel)

    rows, cols = neighbour_index(height), neighbour_index(width)
    dtype = compute_dtype(q)

    def neighbourhoods(x: torch.Tensor) -> torch.Tensor:
        # (B, H, height, width, kernel, kernel, dim) -> (B, H, height, width, kernel^2, dim)
        gathered = x.to(dtype)[:, :, rows[:, None, :, None], cols[None, :, None, :]]
        return gathered.flatten(4, 5)

    scores = torch.einsum("bhxyd,bhxynd->bhxyn", q.to(dtype), neighbourhoods(k)) * scale
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhxyn,bhxynd->bhxyd", weights, neighbourhoods(v)).to(q.dtype)
