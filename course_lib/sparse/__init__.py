"""Chapter 05: sparse attention — which pairs to compute, and kernels that really skip the rest.

The subpackage follows the notebook:
- :mod:`.masks`: the gallery of patterns (sliding window, dilated, strided, global + local,
  BigBird, block-sparse, 2-D neighbourhoods) and what a mask costs and connects across layers.
- :mod:`.kernels`: attention that skips work — banded, block-sparse, top-k, neighbourhood 2-D.
- :mod:`.lsh`: Reformer's hashing attention.
- :mod:`.learned`: a learned key gate and an adaptive window, both trainable.
- :mod:`.eviction`: KV-cache eviction for long decoding (StreamingLLM sinks, H2O heavy hitters).
"""

from .eviction import eviction_error, h2o_keep, keep_mask, kept_attention, streaming_keep
from .kernels import (
    block_sparse_attention,
    neighborhood_attention_2d,
    sliding_window_attention,
    topk_attention,
)
from .learned import AdaptiveWindowAttention, LearnedSparseAttention
from .lsh import lsh_attention, lsh_buckets
from .masks import (
    MaskStats,
    bigbird_layout,
    bigbird_mask,
    block_sparse_mask,
    dilated_mask,
    global_local_mask,
    layers_to_connect,
    mask_stats,
    neighborhood_mask_2d,
    reachability,
    sliding_window_mask,
    strided_mask,
)

__all__ = [
    "sliding_window_mask",
    "dilated_mask",
    "strided_mask",
    "global_local_mask",
    "bigbird_layout",
    "bigbird_mask",
    "block_sparse_mask",
    "neighborhood_mask_2d",
    "reachability",
    "layers_to_connect",
    "MaskStats",
    "mask_stats",
    "sliding_window_attention",
    "block_sparse_attention",
    "topk_attention",
    "neighborhood_attention_2d",
    "lsh_buckets",
    "lsh_attention",
    "LearnedSparseAttention",
    "AdaptiveWindowAttention",
    "streaming_keep",
    "h2o_keep",
    "keep_mask",
    "kept_attention",
    "eviction_error",
]
