"""MoBA, mixture of block attention (Lu et al., 2025): each query routes itself to a few key blocks.

"MoBA: Mixture of Block Attention for Long-Context LLMs" applies the mixture-of-experts idea to
the keys: the keys are cut into blocks of ``block_size``, each block is represented by the mean
of its keys, and a query's gate score for a block is its dot product with that mean. The query
attends to its ``top_k`` best blocks, among which its own block is always counted (with the
causal mask inside it); blocks that start after the query are never chosen. There are no new
parameters: the router is the attention's own queries and keys. With ``top_k`` at least the
number of blocks, MoBA is ordinary causal attention.

:func:`moba_attention` gathers only the chosen blocks (per query and head) and counts them;
:func:`moba_reference` is dense attention with the equivalent explicit mask (:func:`moba_mask`).
Queries are aligned to the end of the keys (query ``t`` at position ``S - T + t``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import (
    check_attention_inputs,
    check_bool,
    check_divisible,
    check_int,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from ..kv_cache.gqa import repeat_kv
from ..recurrent.layers import ShortConvolution
from ..standard import attention
from .block_routing import BlockWork, attend_selected_blocks, block_means, select_blocks, selection_mask

__all__ = ["moba_selection", "moba_mask", "moba_attention", "moba_reference", "MixtureOfBlockAttention"]


def _check(q: object, k: object, v: object, block_size: object, top_k: object, scale: object) -> tuple:
    B, H, T, S, D, D_v = check_attention_inputs(q, k, v, same_heads=False)
    H_kv = k.shape[1]
    check_divisible(H, "num_heads", H_kv, "num_kv_heads")
    block_size = check_int(block_size, "block_size", min=1)
    top_k = check_int(top_k, "top_k", min=1)
    return B, H, H_kv, T, S, D, D_v, block_size, top_k, resolve_scale(scale, D)


def moba_selection(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, top_k: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA's routing: ``(indices, valid)`` of shape ``(B, H, T, min(top_k, N_blocks))``.

    q ``(B, H, T, D)``, k ``(B, H_kv, S, D)``. Gate score of block ``j`` for query ``t`` of head
    ``h``: ``q_t . mean(k of block j)`` with the keys of ``h``'s KV head. The query's own block is
    always chosen; blocks starting after the query are never chosen; ties go to the earlier block.
    """
    B, H, H_kv, T, S, D, _, block_size, top_k, _ = _check(q, k, k, block_size, top_k, None)
    dtype = compute_dtype(q)
    G = H // H_kv
    means = block_means(k.to(dtype), block_size)  # (B, H_kv, N_b, D)
    gate = q.to(dtype).view(B, H_kv, G, T, D) @ means.unsqueeze(2).transpose(-2, -1)  # (B, H_kv, G, T, N_b)
    query_positions = torch.arange(T, device=q.device).unsqueeze(1) + (S - T)
    blocks = torch.arange(means.shape[2], device=q.device).unsqueeze(0)
    eligible = blocks * block_size <= query_positions  # (T, N_b)
    own = (blocks == query_positions // block_size) & eligible
    indices, valid = select_blocks(gate.reshape(B, H, T, -1), top_k, eligible=eligible, forced=own)
    return indices, valid


def moba_mask(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, top_k: int = 3) -> torch.Tensor:
    """Bool ``(B, H, T, S)``: the keys each query attends to under MoBA (chosen blocks, causal)."""
    indices, valid = moba_selection(q, k, block_size=block_size, top_k=top_k)
    T, S = q.shape[2], k.shape[2]
    query_positions = torch.arange(T, device=q.device).unsqueeze(1) + (S - T)
    causal = torch.arange(S, device=q.device).unsqueeze(0) <= query_positions
    return selection_mask(indices, valid, block_size, S) & causal


def moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    top_k: int = 3,
    scale: float | None = None,
    return_work: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, BlockWork]:
    """MoBA attention over the chosen blocks only.

    Args:
        q: ``(B, H, T, D)``; k: ``(B, H_kv, S, D)``; v: ``(B, H_kv, S, D_v)``, ``H_kv`` divides H.
        block_size: keys per block (the paper's experiments: 512 with ``top_k=3``; Kimi's
            long-context models 4096 with ``top_k=12``).
        top_k: blocks per query and head, its own block included.
        scale: multiplies the scores; defaults to ``D ** -0.5``.
        return_work: also return a :class:`BlockWork` (blocks counted per query and head).

    Returns ``(B, H, T, D_v)`` in the dtype of ``q`` (and the work); a query before the first key
    (``T > S``) gets zeros.
    """
    check_bool(return_work, "return_work")
    B, H, H_kv, T, S, D, D_v, block_size, top_k, scale = _check(q, k, v, block_size, top_k, scale)
    G = H // H_kv
    if T == 0 or S == 0:
        out = q.new_zeros(B, H, T, D_v)
        return (out, BlockWork(0, 0, 0, 0)) if return_work else out
    dtype = compute_dtype(q)
    indices, valid = moba_selection(q, k, block_size=block_size, top_k=top_k)
    n = indices.shape[-1]
    out, scores_computed = attend_selected_blocks(
        q.to(dtype).view(B, H_kv, G, T, D),
        k.to(dtype),
        v.to(dtype),
        indices.view(B, H_kv, G, T, n),
        valid.view(B, H_kv, G, T, n),
        block_size,
        scale=scale,
    )
    out = out.reshape(B, H, T, D_v).to(q.dtype)
    if not return_work:
        return out
    query_positions = torch.arange(T) + (S - T)
    causal_blocks = int((query_positions // block_size + 1).clamp(min=0).sum()) * B * H
    work = BlockWork(int(valid.sum()), causal_blocks, scores_computed, B * H * T * S)
    return out, work


def moba_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    top_k: int = 3,
    scale: float | None = None,
) -> torch.Tensor:
    """MoBA computed densely: attention over all keys (K and V repeated per group) with :func:`moba_mask`."""
    B, H, H_kv, T, S, D, D_v, block_size, top_k, scale = _check(q, k, v, block_size, top_k, scale)
    if T == 0 or S == 0:
        return q.new_zeros(B, H, T, D_v)
    mask = moba_mask(q, k, block_size=block_size, top_k=top_k)
    G = H // H_kv
    return attention(q, repeat_kv(k, G), repeat_kv(v, G), mask, scale=scale)


class MixtureOfBlockAttention(nn.Module):
    """A causal MoBA self-attention layer: ``(B, T, d_model) -> (B, T, d_model)``.

    Projections of grouped-query attention (``num_kv_heads``, default ``num_heads``) around
    :func:`moba_attention`; the router adds no parameters.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        block_size: int = 64,
        top_k: int = 3,
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
        self.block_size = check_int(block_size, "block_size", min=1)
        self.top_k = check_int(top_k, "top_k", min=1)
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
        result = moba_attention(
            q, k, v, block_size=self.block_size, top_k=self.top_k,
            return_work=return_work,
        )  # fmt: skip
        out, work = result if return_work else (result, None)
        out = self.W_o(out.transpose(1, 2).reshape(B, T, self.num_heads * D))
        return (out, work) if return_work else out
