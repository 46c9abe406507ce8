"""Chapter 04's attention layers as the tiny model uses them: with a cache factory and optional RoPE.

A mixer is an ``nn.Module`` with ``forward(x, *, cache=None, layer_index=0) -> (B, T, d_model)`` and
``make_cache(num_layers, batch_size, max_len, *, dtype, device)`` returning a cache object with
``length(layer_index)``, shared by all blocks (each uses its own ``layer_index``). Both layers
are built from a :class:`~course_lib.models.ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..checks import check_tensor
from ..kv_cache import GroupedQueryAttention, KVCache, MultiHeadLatentAttention, gqa_attention
from ..standard import apply_rope

if TYPE_CHECKING:  # only for the annotations: config.py imports this module
    from .config import ModelConfig

__all__ = ["CachedGQA", "CachedMLA"]


class CachedGQA(GroupedQueryAttention):
    """Chapter 04's grouped-query layer plus what the model needs: a cache factory and optional RoPE."""

    def __init__(self, config: ModelConfig, num_kv_heads: int) -> None:
        super().__init__(config.d_model, config.num_heads, num_kv_heads)
        self.rope = config.positions == "rope"

    def make_cache(self, num_layers, batch_size, max_len, *, dtype=torch.float32, device=None) -> KVCache:
        return KVCache(
            num_layers, batch_size, self.num_kv_heads, max_len, self.head_dim, dtype=dtype, device=device
        )

    def queries_keys_values(
        self, x: torch.Tensor, *, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project ``x (B, T, d_model)`` to what attention sees: ``q (B, H, T, D)``, ``k, v (B, H_kv, T, D)``.

        With RoPE, queries and keys are rotated at positions ``start .. start + T - 1``
        (``start`` is the number of tokens already cached).
        """
        check_tensor(x, "x", ndim=3, floating=True)
        B, T, width = x.shape
        if width != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model}, got shape {tuple(x.shape)}")
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            positions = torch.arange(start, start + T, device=x.device)
            q, k = apply_rope(q, positions), apply_rope(k, positions)
        return q, k, v

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head output ``(B, H, T, D)`` -> the layer output ``(B, T, d_model)``, through ``out_proj``."""
        B, H, T, D = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * D))

    # Set only inside forward_with_attention: replaces causal attention by attend(q, k, v).
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, *, cache=None, layer_index: int = 0) -> torch.Tensor:
        start = 0 if cache is None else cache.length(layer_index)
        q, k, v = self.queries_keys_values(x, start=start)
        if cache is not None:
            k, v = cache.append(layer_index, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if self.attend is not None:
            return self.merge_heads(self.attend(q, k, v))
        return self.merge_heads(gqa_attention(q, k, v, causal=True))


class CachedMLA(MultiHeadLatentAttention):
    """Chapter 04's latent attention with the inference path (``mla_mode``) fixed by the config."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(
            config.d_model,
            config.num_heads,
            head_dim=config.head_dim,
            latent_dim=config.latent_dim,
            rope_dim=config.rope_dim,
        )
        self.mode = config.mla_mode

    def forward(self, x: torch.Tensor, *, cache=None, layer_index: int = 0) -> torch.Tensor:
        return super().forward(x, cache=cache, layer_index=layer_index, mode=self.mode)
