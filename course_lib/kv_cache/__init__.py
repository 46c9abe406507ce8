"""Chapter 04: the KV cache and every way to shrink or organise it.

Read in this order: ``cache`` (KVCache, chunked prefill), ``gqa`` (MHA -> GQA -> MQA), ``mla``
(latent attention and weight absorption), ``configs`` (cache sizes of real models, and cross-layer
KV sharing), ``paged`` (PagedAttention's block tables), ``quantize`` (KIVI-style 8/4-bit cache).
"""

from .cache import KVCache, chunked_prefill
from .configs import (
    MODEL_CONFIGS,
    cached_layers,
    kv_cache_bytes,
    kv_numbers_per_token,
    max_concurrent_requests,
)
from .gqa import GroupedQueryAttention, MultiQueryAttention, gqa_attention, repeat_kv
from .mla import LatentKVCache, MultiHeadLatentAttention
from .paged import PagedKVCache, simulate_fragmentation
from .quantize import QuantizedTensor, quantize, quantize_kv, quantized_attention_error

__all__ = [
    "KVCache",
    "chunked_prefill",
    "repeat_kv",
    "gqa_attention",
    "GroupedQueryAttention",
    "MultiQueryAttention",
    "LatentKVCache",
    "MultiHeadLatentAttention",
    "MODEL_CONFIGS",
    "cached_layers",
    "kv_cache_bytes",
    "kv_numbers_per_token",
    "max_concurrent_requests",
    "PagedKVCache",
    "simulate_fragmentation",
    "QuantizedTensor",
    "quantize",
    "quantize_kv",
    "quantized_attention_error",
]
