"""The tiny decoder-only transformer: pre-norm blocks around a pluggable attention.

Token embedding (+ learned positions, or RoPE inside attention), ``num_layers`` pre-norm blocks
``x + attention(norm(x))`` then ``x + mlp(norm(x))``, a final norm and a head tied to the
embedding. ``forward(tokens)`` is the full causal pass; ``forward(new_tokens, cache=cache)``
continues from what the cache holds, so generation prefills once and then feeds one token per step.

With cross-layer KV sharing (``ModelConfig(kv_share=s)``), the first block of each group of ``s``
hands the keys and values it attended over (the cache's, when decoding) to the next ``s - 1``
blocks, which attend over them with their own queries; only the first writes to the cache.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_int, check_tensor
from .config import ModelConfig, build_mixer

__all__ = ["Block", "TinyTransformer"]


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model)
        self.attention = build_mixer(config, layer_index=layer_index)
        self.mlp_norm = nn.LayerNorm(config.d_model)
        hidden = config.mlp_ratio * config.d_model
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, hidden), nn.GELU(), nn.Linear(hidden, config.d_model)
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        cache=None,
        layer_index: int = 0,
        shared_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_kv: bool = False,
    ):
        """``x (B, T, d_model)`` -> the block's output; with ``return_kv`` also the ``(k, v)`` attended to.

        ``layer_index`` is the cache layer this block writes; ``shared_kv`` and ``return_kv`` are for
        cross-layer KV sharing (see :class:`~course_lib.mixers.AttentionMixer`).
        """
        h = self.attention_norm(x)
        kv = None
        if return_kv or shared_kv is not None:
            mixed, kv = self.attention(
                h, cache=cache, layer_index=layer_index, shared_kv=shared_kv, return_kv=True
            )
        elif cache is None:  # only the attention layers keep a cache; recurrent mixers map whole sequences
            mixed = self.attention(h)
        else:
            mixed = self.attention(h, cache=cache, layer_index=layer_index)
        x = x + mixed
        x = x + self.mlp(self.mlp_norm(x))
        return (x, kv) if return_kv else x


class TinyTransformer(nn.Module):
    """A decoder-only language model: ``tokens (B, T) long -> logits (B, T, vocab_size)``."""

    def __init__(self, config: ModelConfig, *, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        with torch.random.fork_rng(devices=[]):  # seeded init without touching global RNG state
            torch.manual_seed(check_int(seed, "seed"))
            self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
            self.position_embedding = (
                nn.Embedding(config.max_len, config.d_model) if config.positions == "learned" else None
            )
            self.blocks = nn.ModuleList(Block(config, index) for index in range(config.num_layers))
            self.norm = nn.LayerNorm(config.d_model)
            self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            self.head.weight = self.token_embedding.weight  # tied, as in GPT-2
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def make_cache(self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None):
        """One cache for all layers, of the kind the attention needs (KVCache or LatentKVCache).

        It holds ``config.num_cache_layers`` layers (fewer than the blocks with cross-layer KV
        sharing). ``dtype`` defaults to the model's parameter dtype.
        """
        max_len = self.config.max_len if max_len is None else check_int(max_len, "max_len", min=1)
        device = self.token_embedding.weight.device
        dtype = self.token_embedding.weight.dtype if dtype is None else dtype
        layer = self.blocks[0].attention
        if not hasattr(layer, "make_cache"):
            raise ValueError(
                f"attention={self.config.attention!r} keeps no KV cache (its layer maps whole "
                "sequences); decode step by step with attention, mqa, gqa, mla or sliding_window"
            )
        return layer.make_cache(self.config.num_cache_layers, batch_size, max_len, dtype=dtype, device=device)

    def forward(self, tokens: torch.Tensor, *, cache=None) -> torch.Tensor:
        """Logits for every position of ``tokens (B, T)``; with ``cache``, ``tokens`` continue it."""
        check_tensor(tokens, "tokens", ndim=2, dtype=torch.long)
        B, T = tokens.shape
        if T < 1:
            raise ValueError("tokens must hold at least one token per row")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size:
            raise ValueError(f"tokens must lie in 0 .. vocab_size-1 = {self.config.vocab_size - 1}")
        start = 0 if cache is None else cache.length(0)
        x = self.token_embedding(tokens)
        if self.position_embedding is not None:
            if start + T > self.config.max_len:
                raise ValueError(
                    f"tokens reach position {start + T}, beyond max_len={self.config.max_len} "
                    "(learned positions)"
                )
            x = x + self.position_embedding(torch.arange(start, start + T, device=tokens.device))
        if self.config.kv_share == 1:
            for index, block in enumerate(self.blocks):
                x = block(x, cache=cache, layer_index=index)
        else:  # each group's first block computes (and caches) keys and values, the others reuse them
            shared = None
            for index, block in enumerate(self.blocks):
                owner = self.config.kv_source(index) == index
                x, shared = block(
                    x,
                    cache=cache,
                    layer_index=self.config.cache_layer(index),
                    shared_kv=None if owner else shared,
                    return_kv=True,
                )
        return self.head(self.norm(x))
