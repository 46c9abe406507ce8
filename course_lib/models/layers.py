"""Deprecated for one release: chapter 04's layers as the tiny model built them before the catalogue.

The model now builds its mixers from :mod:`course_lib.catalogue` (see :func:`build_mixer`): "attention",
"mqa" and "gqa" are :class:`course_lib.mixers.AttentionMixer` (chapter 04's grouped-query layer
with RoPE and a cache factory), "mla" is :class:`course_lib.kv_cache.MultiHeadLatentAttention`.
``CachedGQA(config, num_kv_heads)`` and ``CachedMLA(config)`` still build those layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..kv_cache import MultiHeadLatentAttention
from ..mixers import AttentionMixer

if TYPE_CHECKING:  # only for the annotations: config.py does not import this module
    from .config import ModelConfig

__all__ = ["CachedGQA", "CachedMLA"]


def CachedGQA(config: ModelConfig, num_kv_heads: int) -> AttentionMixer:  # noqa: N802 (a former class)
    """The softmax attention layer of the model with ``num_kv_heads`` key/value heads."""
    return AttentionMixer(config.d_model, config.num_heads, num_kv_heads=num_kv_heads, rope=config.rope)


def CachedMLA(config: ModelConfig) -> MultiHeadLatentAttention:  # noqa: N802 (a former class)
    """The latent attention layer of the model, with the config's inference path."""
    return MultiHeadLatentAttention(
        config.d_model,
        config.num_heads,
        head_dim=config.head_dim,
        latent_dim=config.latent_dim,
        rope_dim=config.rope_dim,
        mode=config.mla_mode,
    )
