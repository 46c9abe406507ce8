"""Grouped-query attention: many query heads share one key/value head.

Multi-head attention (MHA) gives every query head its own key and value head, so the KV cache
holds ``2 * H * D`` numbers per token and layer. Multi-query attention (MQA, Shazeer 2019) keeps a
single key/value head; grouped-query attention (GQA, Ainslie et al. 2023) keeps ``H_kv`` of them,
each shared by a group of ``H_q / H_kv`` query heads. MHA is GQA with ``H_kv = H_q``, MQA is GQA
with ``H_kv = 1``. The compute of attention is unchanged; only the cache (and the bytes read per
decoded token) shrinks by ``H_q / H_kv``.

Two ways to compute it:
- ``repeat_kv`` copies each key/value head ``group`` times and runs ordinary attention (simple,
  but materialises ``H_q`` heads of K and V: exactly the memory GQA was meant to save);
- ``gqa_attention`` folds the group into the query length instead: queries of one group are
  stacked to ``(B, H_kv, group * T, D)`` and attend to their shared key head directly, no copy.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import (
    check_attention_inputs,
    check_bool,
    check_divisible,
    check_int,
    check_mask,
    check_tensor,
    resolve_scale,
)
from ..standard import attention, causal_mask

__all__ = ["repeat_kv", "gqa_attention", "GroupedQueryAttention", "MultiQueryAttention"]


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """Repeat each key/value head ``group`` times: ``(B, H_kv, S, D)`` -> ``(B, H_kv * group, S, D)``.

    Head ``h`` of the result is key/value head ``h // group``, so query head ``h`` reads the kv
    head of its group. This is the naive form of GQA (it copies K and V).
    """
    check_tensor(x, "x", ndim=4, floating=True)
    group = check_int(group, "group", min=1)
    B, H_kv, S, D = x.shape
    return x.unsqueeze(2).expand(B, H_kv, group, S, D).reshape(B, H_kv * group, S, D)


def gqa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention where ``H_q`` query heads share ``H_kv`` key/value heads.

    Args:
        q: ``(B, H_q, T, D)`` queries.
        k: ``(B, H_kv, S, D)`` keys, ``H_kv`` divides ``H_q`` (1 for MQA, ``H_q`` for MHA).
        v: ``(B, H_kv, S, D_v)`` values.
        mask: bool, broadcastable to ``(B, H_q, T, S)``, True = may attend.
        causal: query ``i`` sees keys up to ``S - T + i`` (aligned to the end, as in decoding).
        scale: multiplies the scores; defaults to ``D ** -0.5``.

    Returns ``(B, H_q, T, D_v)`` in the dtype of ``q``; a row with nothing to attend to is zero.
    Query head ``h`` uses key/value head ``h // (H_q / H_kv)``, the convention of ``repeat_kv``
    and of ``scaled_dot_product_attention(..., enable_gqa=True)``.
    """
    B, H_q, T, S, D, D_v = check_attention_inputs(q, k, v, same_heads=False)
    H_kv = k.shape[1]
    check_divisible(H_q, "num_heads", H_kv, "num_kv_heads")
    check_bool(causal, "causal")
    scale = resolve_scale(scale, D)
    group = H_q // H_kv

    # Stack each group's queries along the length, (B, H_kv, group * T, D), so every key/value head
    # serves its whole group in one call and K and V are never repeated per query head.
    queries = q.reshape(B, H_kv, group * T, D)
    allowed = None
    if mask is not None:
        allowed = check_mask(mask, "mask", (B, H_q, T, S), device=q.device)
    if causal:
        causal_allowed = causal_mask(T, S, device=q.device)
        allowed = causal_allowed if allowed is None else allowed & causal_allowed
    if allowed is not None:
        allowed = allowed.expand(B, H_q, T, S).reshape(B, H_kv, group * T, S)
    out = attention(queries, k, v, allowed, scale=scale)  # (B, H_kv, group*T, D_v)
    return out.reshape(B, H_q, T, D_v)


class GroupedQueryAttention(nn.Module):
    """A causal self-attention layer with ``num_kv_heads`` key/value heads and an optional KV cache.

    ``x (B, T, d_model)`` -> ``(B, T, d_model)``. With ``cache`` (a ``KVCache``), the new keys and
    values are appended to layer ``layer_index`` of the cache and the queries attend to everything
    cached so far, so a prompt can be prefilled once and then decoded one token at a time.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        head_dim: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        d_model = check_int(d_model, "d_model", min=1)
        num_heads = check_int(num_heads, "num_heads", min=1)
        num_kv_heads = check_int(num_kv_heads, "num_kv_heads", min=1)
        check_divisible(num_heads, "num_heads", num_kv_heads, "num_kv_heads")
        if head_dim is None:
            check_divisible(d_model, "d_model", num_heads, "num_heads")
            head_dim = d_model // num_heads
        head_dim = check_int(head_dim, "head_dim", min=1)
        check_bool(bias, "bias")
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = (
            d_model,
            num_heads,
            num_kv_heads,
            head_dim,
        )
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, d_model, bias=bias)

    def kv_numbers_per_token(self) -> int:
        """Numbers this layer caches per token: ``2 * num_kv_heads * head_dim``."""
        return 2 * self.num_kv_heads * self.head_dim

    def forward(
        self, x: torch.Tensor, *, cache=None, layer_index: int = 0, causal: bool = True
    ) -> torch.Tensor:
        check_tensor(x, "x", ndim=3, floating=True)
        B, T, width = x.shape
        if width != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model}, got shape {tuple(x.shape)}")
        check_bool(causal, "causal")
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.append(layer_index, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = gqa_attention(q, k, v, causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MultiQueryAttention(GroupedQueryAttention):
    """Multi-query attention (Shazeer 2019): all query heads share a single key/value head."""

    def __init__(
        self, d_model: int, num_heads: int, *, head_dim: int | None = None, bias: bool = False
    ) -> None:
        super().__init__(d_model, num_heads, 1, head_dim=head_dim, bias=bias)
