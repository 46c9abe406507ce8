"""NSA, native sparse attention (Yuan et al., 2025): three branches, mixed by learned gates.

"Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention" gives each
query three cheap views of the past and lets the model learn how much to trust each:

- **compressed**: the keys cut into overlapping blocks of ``compress_block`` tokens every
  ``compress_stride`` tokens, each block squeezed into one key and one value (a mean here, a
  learned map in :class:`NativeSparseAttention`). A query attends to the compressed blocks that
  are wholly in its past: coarse, but it sees everything, at ``S / compress_stride`` keys.
- **selected**: the compressed attention weights also score the key blocks of ``block_size``
  tokens (a block's score is the weight of the compressed blocks overlapping it, summed over the
  query heads of a GQA group so the group loads the same blocks). The ``num_selected`` best
  blocks, always including the first ``num_initial_blocks`` and the last ``num_local_blocks``
  before the query, are attended at full resolution.
- **window**: the last ``window`` tokens, full resolution (:func:`sliding_window_attention`).

``o_t = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` with gates in ``[0, 1]`` computed from
the input. The selection is a hard choice, without gradient; the compressed branch, which made
it, is trained through its own output. :func:`nsa_attention` gathers only the selected blocks
(and counts them); :func:`nsa_reference` computes the same thing densely from explicit masks.
Attention is causal, queries aligned to the end of the keys (query ``t`` at ``S - T + t``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import (
    check_attention_inputs,
    check_bool,
    check_choice,
    check_divisible,
    check_int,
    check_like,
    check_shape,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from ..kv_cache.gqa import repeat_kv
from ..recurrent.layers import ShortConvolution
from ..standard import attention, masked_softmax
from .block_routing import BlockWork, attend_selected_blocks, select_blocks, selection_mask
from .kernels import sliding_window_attention
from .masks import sliding_window_mask

__all__ = [
    "overlapping_blocks",
    "compressed_block_count",
    "nsa_selection",
    "nsa_masks",
    "nsa_attention",
    "nsa_reference",
    "NativeSparseAttention",
]


def compressed_block_count(S: int, compress_block: int, compress_stride: int) -> int:
    """Number of complete compression blocks in ``S`` keys: ``floor((S - l) / d) + 1`` (0 if S < l)."""
    return 0 if S < compress_block else (S - compress_block) // compress_stride + 1


def overlapping_blocks(x: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """The complete blocks ``x[:, :, i*stride : i*stride + block_size]``: ``(B, H, N_c, block, D)``."""
    check_tensor(x, "x", ndim=4, floating=True)
    block_size = check_int(block_size, "block_size", min=1)
    stride = check_int(stride, "stride", min=1)
    if stride > block_size:
        raise ValueError(f"stride={stride} must be <= block_size={block_size}, or keys are skipped")
    B, H, S, D = x.shape
    if S < block_size:
        return x.new_zeros(B, H, 0, block_size, D)
    return x.unfold(2, block_size, stride).transpose(-2, -1)  # (B, H, N_c, D, l) -> (B, H, N_c, l, D)


def _check_options(
    T: int,
    S: int,
    block_size: object,
    num_selected: object,
    window: object,
    compress_block: object,
    compress_stride: object,
    num_initial_blocks: object,
    num_local_blocks: object,
) -> tuple[int, ...]:
    block_size = check_int(block_size, "block_size", min=1)
    num_selected = check_int(num_selected, "num_selected", min=1)
    window = check_int(window, "window", min=1)
    compress_block = check_int(compress_block, "compress_block", min=1)
    compress_stride = check_int(compress_stride, "compress_stride", min=1, max=compress_block)
    num_initial_blocks = check_int(num_initial_blocks, "num_initial_blocks", min=0)
    num_local_blocks = check_int(num_local_blocks, "num_local_blocks", min=0)
    if num_initial_blocks + num_local_blocks > num_selected:
        raise ValueError(
            f"num_selected={num_selected} must cover num_initial_blocks={num_initial_blocks} "
            f"+ num_local_blocks={num_local_blocks}"
        )
    return (
        block_size,
        num_selected,
        window,
        compress_block,
        compress_stride,
        num_initial_blocks,
        num_local_blocks,
    )


def _compressed_branch(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    S: int,
    compress_block: int,
    compress_stride: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of grouped queries ``(B, H_kv, G, T, D)`` to the compressed keys: (out, weights)."""
    T, N_c = q.shape[3], k_cmp.shape[2]
    query_positions = torch.arange(T, device=q.device).unsqueeze(1) + (S - T)
    block_ends = torch.arange(N_c, device=q.device) * compress_stride + compress_block - 1
    visible = block_ends.unsqueeze(0) <= query_positions  # (T, N_c): the block is wholly in the past
    scores = torch.einsum("bkgtd,bknd->bkgtn", q, k_cmp) * scale
    if N_c == 0:  # shorter than one compression block: nothing to attend to yet
        return q.new_zeros(*q.shape[:-1], v_cmp.shape[-1]), scores
    weights = masked_softmax(scores, visible)
    return torch.einsum("bkgtn,bknd->bkgtd", weights, v_cmp), weights


def _block_scores(
    weights: torch.Tensor, S: int, block_size: int, compress_block: int, compress_stride: int
) -> torch.Tensor:
    """Selection-block scores ``(B, H_kv, T, N_s)`` from compressed weights ``(B, H_kv, G, T, N_c)``:
    the weight of every compressed block overlapping the selection block, summed over the group."""
    N_c, N_s = weights.shape[-1], -(-S // block_size)
    starts = torch.arange(N_c, device=weights.device) * compress_stride
    block_starts = torch.arange(N_s, device=weights.device) * block_size
    overlap = (starts.unsqueeze(1) < block_starts + block_size) & (
        starts.unsqueeze(1) + compress_block > block_starts
    )
    return (
        (weights.sum(dim=2) @ overlap.to(weights.dtype))
        if N_c
        else weights.new_zeros(*weights.shape[:2], weights.shape[3], N_s)
    )


def _eligible_and_forced(
    T: int, S: int, block_size: int, num_initial_blocks: int, num_local_blocks: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, N_s)`` blocks that start at or before the query, and those always selected."""
    N_s = -(-S // block_size)
    query_positions = torch.arange(T, device=device).unsqueeze(1) + (S - T)
    blocks = torch.arange(N_s, device=device).unsqueeze(0)
    eligible = blocks * block_size <= query_positions
    own = query_positions // block_size
    forced = (blocks < num_initial_blocks) | ((blocks <= own) & (blocks > own - num_local_blocks))
    return eligible, forced & eligible


def nsa_selection(
    block_scores: torch.Tensor,
    S: int,
    *,
    block_size: int,
    num_selected: int,
    num_initial_blocks: int = 1,
    num_local_blocks: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA's choice of blocks from their scores ``(B, H_kv, T, N_s)``: ``(indices, valid)``,
    both ``(B, H_kv, T, min(num_selected, N_s))`` (see :func:`select_blocks`)."""
    check_tensor(block_scores, "block_scores", ndim=4, floating=True)
    T = block_scores.shape[2]
    eligible, forced = _eligible_and_forced(
        T, S, block_size, num_initial_blocks, num_local_blocks, block_scores.device
    )
    return select_blocks(block_scores, num_selected, eligible=eligible, forced=forced)


def _prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    compressed: tuple[torch.Tensor, torch.Tensor] | None,
    options: tuple,
    scale: float | None,
) -> tuple:
    """Checks shared by the kernel and the reference; the compressed keys and values, cast."""
    B, H, T, S, D, D_v = check_attention_inputs(q, k, v, same_heads=False)
    H_kv = k.shape[1]
    check_divisible(H, "num_heads", H_kv, "num_kv_heads")
    check_tensor(gates, "gates", ndim=4, floating=True)
    check_like(gates, "gates", q, dtype=False)
    check_shape(gates, "gates", (B, H, T, 3), names="B, H, T, 3 branches")
    options = _check_options(T, S, *options)
    compress_block, compress_stride = options[3], options[4]
    scale = resolve_scale(scale, D)
    dtype = compute_dtype(q)
    N_c = compressed_block_count(S, compress_block, compress_stride)
    if compressed is None:
        k_cmp = overlapping_blocks(k.to(dtype), compress_block, compress_stride).mean(dim=3)
        v_cmp = overlapping_blocks(v.to(dtype), compress_block, compress_stride).mean(dim=3)
    else:
        if not isinstance(compressed, (tuple, list)) or len(compressed) != 2:
            raise TypeError("compressed must be a pair (k_cmp, v_cmp) of tensors or None")
        k_cmp, v_cmp = compressed
        check_tensor(k_cmp, "compressed[0]", ndim=4, floating=True)
        check_tensor(v_cmp, "compressed[1]", ndim=4, floating=True)
        # The compressed keys and values are keys and values: they share q's dtype and device.
        check_like(k_cmp, "compressed[0]", q)
        check_like(v_cmp, "compressed[1]", q)
        check_shape(k_cmp, "compressed[0]", (B, H_kv, N_c, D), names="B, H_kv, N_c, D")
        check_shape(v_cmp, "compressed[1]", (B, H_kv, N_c, D_v), names="B, H_kv, N_c, D_v")
        k_cmp, v_cmp = k_cmp.to(dtype), v_cmp.to(dtype)
    return B, H, H_kv, T, S, D, D_v, options, scale, dtype, k_cmp, v_cmp


def nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    *,
    block_size: int = 64,
    num_selected: int = 16,
    window: int = 512,
    compress_block: int = 32,
    compress_stride: int = 16,
    num_initial_blocks: int = 1,
    num_local_blocks: int = 2,
    compressed: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    return_work: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, BlockWork]:
    """NSA, computing only what each branch needs (defaults: the paper's settings).

    Args:
        q: ``(B, H, T, D)``; k: ``(B, H_kv, S, D)``; v: ``(B, H_kv, S, D_v)``, ``H_kv`` divides H.
        gates: ``(B, H, T, 3)``, the weights of the compressed, selected and window branches.
        block_size: keys per selection block (``l'``).
        num_selected: blocks attended per query and KV head (``n``), forced ones included.
        window: keys of the sliding window, the query included (``w``).
        compress_block, compress_stride: length ``l`` and stride ``d`` of the compression blocks.
        num_initial_blocks, num_local_blocks: blocks always selected at the start and up to the
            query's own block.
        compressed: ``(k_cmp, v_cmp)`` of shapes ``(B, H_kv, N_c, D)`` and ``(B, H_kv, N_c, D_v)``
            from a learned compression, ``N_c = compressed_block_count(S, l, d)``; None: block means.
        scale: multiplies the scores; defaults to ``D ** -0.5``.
        return_work: also return a :class:`BlockWork` (blocks per query and KV head).

    Returns ``(B, H, T, D_v)`` in the dtype of ``q`` (and the work). The compressed and selected
    branches of a query that has nothing there yet are zero, never NaN.
    """
    check_bool(return_work, "return_work")
    options = (
        block_size,
        num_selected,
        window,
        compress_block,
        compress_stride,
        num_initial_blocks,
        num_local_blocks,
    )
    B, H, H_kv, T, S, D, D_v, options, scale, dtype, k_cmp, v_cmp = _prepare(
        q, k, v, gates, compressed, options, scale
    )
    block_size, num_selected, window, compress_block, compress_stride, initial, local = options
    G = H // H_kv
    if T == 0 or S == 0:
        out = q.new_zeros(B, H, T, D_v)
        return (out, BlockWork(0, 0, 0, 0)) if return_work else out

    grouped = q.to(dtype).view(B, H_kv, G, T, D)
    keys, values = k.to(dtype), v.to(dtype)
    # 1. Compressed branch; its weights score the selection blocks.
    o_cmp, cmp_weights = _compressed_branch(grouped, k_cmp, v_cmp, S, compress_block, compress_stride, scale)
    block_scores = _block_scores(cmp_weights, S, block_size, compress_block, compress_stride)
    indices, valid = nsa_selection(
        block_scores, S, block_size=block_size, num_selected=num_selected,
        num_initial_blocks=initial, num_local_blocks=local,
    )  # fmt: skip
    # 2. Selected branch: gather the chosen blocks only, shared by the group's query heads.
    o_slc, selected_scores = attend_selected_blocks(
        grouped, keys, values, indices.unsqueeze(2), valid.unsqueeze(2), block_size, scale=scale
    )
    # 3. Window branch: a band of the last `window` keys.
    o_win = sliding_window_attention(
        q.to(dtype), repeat_kv(keys, G), repeat_kv(values, G), window, scale=scale
    )

    g = gates.to(dtype)
    out = (
        g[..., 0:1] * o_cmp.reshape(B, H, T, D_v)
        + g[..., 1:2] * o_slc.reshape(B, H, T, D_v)
        + g[..., 2:3] * o_win
    ).to(q.dtype)
    if not return_work:
        return out
    query_positions = torch.arange(T) + (S - T)
    causal_blocks = int((query_positions // block_size + 1).clamp(min=0).sum()) * B * H_kv
    window_block = min(window, max(T, S), T)
    window_scores = (
        B * H * (-(-T // window_block) * window_block) * (window_block + min(window, max(T, S)) - 1)
    )
    work = BlockWork(
        blocks_computed=int(valid.sum()),
        blocks_causal=causal_blocks,
        scores_computed=B * H * T * k_cmp.shape[2] + selected_scores + window_scores,
        scores_dense=B * H * T * S,
    )
    return out, work


# --- the dense reference: the same three branches from explicit masks --------------------------------


def nsa_masks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    num_selected: int = 16,
    window: int = 512,
    compress_block: int = 32,
    compress_stride: int = 16,
    num_initial_blocks: int = 1,
    num_local_blocks: int = 2,
    compressed_keys: torch.Tensor | None = None,
    scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """The three explicit masks of NSA for these queries and keys, True = attended.

    ``"compressed"`` ``(T, N_c)``: compressed blocks wholly in the query's past; ``"selected"``
    ``(B, H, T, S)``: keys of the selected blocks, causal; ``"window"`` ``(T, S)``. (For the mask
    gallery and for :func:`nsa_reference`; the scores come from dense compressed attention.)
    """
    B, H, T, D = q.shape
    v = k[..., :1]  # values do not matter for the masks
    compressed = None if compressed_keys is None else (compressed_keys, compressed_keys[..., :1])
    options = (
        block_size,
        num_selected,
        window,
        compress_block,
        compress_stride,
        num_initial_blocks,
        num_local_blocks,
    )
    gates = q.new_zeros(B, H, T, 3)
    _, _, H_kv, T, S, _, _, options, scale, dtype, k_cmp, _ = _prepare(
        q, k, v, gates, compressed, options, scale
    )
    block_size, num_selected, window, compress_block, compress_stride, initial, local = options
    G = H // H_kv
    query_positions = torch.arange(T, device=q.device).unsqueeze(1) + (S - T)
    key_positions = torch.arange(S, device=q.device).unsqueeze(0)
    block_ends = torch.arange(k_cmp.shape[2], device=q.device) * compress_stride + compress_block - 1
    compressed_mask = block_ends.unsqueeze(0) <= query_positions
    # Dense compressed weights, (B, H, T, N_c), grouped back to (B, H_kv, G, T, N_c).
    scores = (q.to(dtype) @ repeat_kv(k_cmp, G).transpose(-2, -1)) * scale
    weights = masked_softmax(scores, compressed_mask) if k_cmp.shape[2] else scores
    weights = weights.view(B, H_kv, G, T, k_cmp.shape[2])
    block_scores = _block_scores(weights, S, block_size, compress_block, compress_stride)
    indices, valid = nsa_selection(
        block_scores, S, block_size=block_size, num_selected=num_selected,
        num_initial_blocks=initial, num_local_blocks=local,
    )  # fmt: skip
    selected = selection_mask(indices, valid, block_size, S) & (key_positions <= query_positions)
    return {
        "compressed": compressed_mask,
        "selected": selected.repeat_interleave(G, dim=1),  # each query head sees its group's blocks
        "window": sliding_window_mask(T, window, S) if T and S else torch.zeros(T, S, dtype=torch.bool),
    }


def nsa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    *,
    block_size: int = 64,
    num_selected: int = 16,
    window: int = 512,
    compress_block: int = 32,
    compress_stride: int = 16,
    num_initial_blocks: int = 1,
    num_local_blocks: int = 2,
    compressed: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """NSA computed densely: three ordinary attentions over all keys with :func:`nsa_masks`.

    ``O(T * S)`` time and memory, like dense attention: the masks remove work from the result,
    not from the computation. Same arguments and result as :func:`nsa_attention`.
    """
    options = (
        block_size,
        num_selected,
        window,
        compress_block,
        compress_stride,
        num_initial_blocks,
        num_local_blocks,
    )
    B, H, H_kv, T, S, D, D_v, options, scale, dtype, k_cmp, v_cmp = _prepare(
        q, k, v, gates, compressed, options, scale
    )
    if T == 0 or S == 0:
        return q.new_zeros(B, H, T, D_v)
    G = H // H_kv
    masks = nsa_masks(
        q, k, block_size=options[0], num_selected=options[1], window=options[2], compress_block=options[3],
        compress_stride=options[4], num_initial_blocks=options[5], num_local_blocks=options[6],
        compressed_keys=None if compressed is None else k_cmp, scale=scale,
    )  # fmt: skip
    queries, keys, values = q.to(dtype), repeat_kv(k.to(dtype), G), repeat_kv(v.to(dtype), G)
    if k_cmp.shape[2]:
        o_cmp = attention(queries, repeat_kv(k_cmp, G), repeat_kv(v_cmp, G), masks["compressed"], scale=scale)
    else:
        o_cmp = queries.new_zeros(B, H, T, D_v)
    o_slc = attention(queries, keys, values, masks["selected"], scale=scale)
    o_win = attention(queries, keys, values, masks["window"], scale=scale)
    g = gates.to(dtype)
    return (g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win).to(q.dtype)


# --- a layer for the tiny model ---------------------------------------------------------------------


class NativeSparseAttention(nn.Module):
    """A causal NSA self-attention layer: ``(B, T, d_model) -> (B, T, d_model)``.

    Query heads ``num_heads``, key/value heads ``num_kv_heads`` (GQA; default ``num_heads``).
    ``compression="linear"`` learns the compression: each block of ``compress_block`` keys (and
    values), plus a learned position-in-block vector, is mapped to one key by a linear layer over
    the whole block (initialised to the block mean); ``"mean"`` uses the block mean. The gates are
    ``sigmoid`` of a linear map of the input, one per head and branch. Other options go to
    :func:`nsa_attention`. (The paper gives each branch its own keys and values; this layer
    shares one set, so its KV cache is that of GQA plus the compressed keys.)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        block_size: int = 64,
        num_selected: int = 16,
        window: int = 512,
        compress_block: int = 32,
        compress_stride: int = 16,
        num_initial_blocks: int = 1,
        num_local_blocks: int = 2,
        compression: str = "linear",
        conv_size: int = 0,
    ) -> None:
        super().__init__()
        self.d_model = check_int(d_model, "d_model", min=1)
        self.num_heads = check_int(num_heads, "num_heads", min=1)
        check_divisible(d_model, "d_model", num_heads, "num_heads")
        self.num_kv_heads = (
            num_heads if num_kv_heads is None else check_int(num_kv_heads, "num_kv_heads", min=1)
        )
        check_divisible(num_heads, "num_heads", self.num_kv_heads, "num_kv_heads")
        self.compression = check_choice(compression, "compression", ("linear", "mean"))
        self.options = dict(
            block_size=block_size, num_selected=num_selected, window=window, compress_block=compress_block,
            compress_stride=compress_stride, num_initial_blocks=num_initial_blocks,
            num_local_blocks=num_local_blocks,
        )  # fmt: skip
        _check_options(0, 0, *self.options.values())
        D = self.head_dim = d_model // num_heads
        self.W_q = nn.Linear(d_model, num_heads * D, bias=False)
        self.W_k = nn.Linear(d_model, self.num_kv_heads * D, bias=False)
        self.W_v = nn.Linear(d_model, self.num_kv_heads * D, bias=False)
        self.W_o = nn.Linear(num_heads * D, d_model, bias=False)
        # An optional short causal convolution over q, k and v, as the recall study gives every mixer.
        self.conv_size = check_int(conv_size, "conv_size", min=0)
        widths = [num_heads * D, self.num_kv_heads * D, self.num_kv_heads * D]
        self.conv = ShortConvolution(sum(widths), conv_size) if conv_size > 0 else None
        self._widths = widths
        self.gate = nn.Linear(d_model, 3 * num_heads)
        if compression == "linear":
            l = compress_block  # noqa: E741 - the paper's name for the block length
            self.block_position = nn.Parameter(torch.zeros(l, D))
            self.compress_k = nn.Linear(l * D, D)
            self.compress_v = nn.Linear(l * D, D)
            with torch.no_grad():  # start as the block mean
                for layer in (self.compress_k, self.compress_v):
                    layer.weight.copy_(torch.eye(D).repeat(1, l) / l)
                    layer.bias.zero_()

    def forward(
        self, x: torch.Tensor, *, return_work: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, BlockWork]:
        check_tensor(x, "x", ndim=3, floating=True)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model}, got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        D = self.head_dim
        q, k, v = self.W_q(x), self.W_k(x), self.W_v(x)
        if self.conv is not None:
            q, k, v = self.conv(torch.cat([q, k, v], dim=-1)).split(self._widths, dim=-1)
        q = q.view(B, T, self.num_heads, D).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, D).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, D).transpose(1, 2)
        gates = torch.sigmoid(self.gate(x)).view(B, T, self.num_heads, 3).transpose(1, 2)
        compressed = None
        if self.compression == "linear":
            l, d = self.options["compress_block"], self.options["compress_stride"]
            key_blocks = overlapping_blocks(k, l, d) + self.block_position
            value_blocks = overlapping_blocks(v, l, d)
            compressed = (self.compress_k(key_blocks.flatten(-2)), self.compress_v(value_blocks.flatten(-2)))
        result = nsa_attention(q, k, v, gates, compressed=compressed, return_work=return_work, **self.options)
        out, work = result if return_work else (result, None)
        out = self.W_o(out.transpose(1, 2).reshape(B, T, self.num_heads * D))
        return (out, work) if return_work else out
