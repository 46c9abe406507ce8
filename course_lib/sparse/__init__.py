"""Chapter 05: sparse attention — which pairs to compute, and kernels that really skip the rest.

The subpackage follows the notebook:
- :mod:`.masks`: the gallery of patterns (sliding window, dilated, strided, global + local,
  BigBird, block-sparse, 2-D neighbourhoods) and what a mask costs and connects across layers.
- :mod:`.kernels`: attention that skips work — banded, block-sparse, top-k, neighbourhood 2-D.
- :mod:`.lsh`: Reformer's hashing attention.
- :mod:`.learned`: a learned key gate and an adaptive window, both trainable.
- :mod:`.eviction`: KV-cache eviction for long decoding (StreamingLLM sinks, H2O heavy hitters).
- :mod:`.block_routing`, :mod:`.nsa`, :mod:`.moba`: trainable sparse attention that routes each
  query to a few key blocks (NSA's three gated branches, MoBA's top-k blocks).
- :mod:`.vision`: spatial-reduction (PVT, Segformer) and divided space-time (TimeSformer) attention.
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

# isort: split
# The trainable sparse attentions of 2025 and attention for images and video.
from .block_routing import BlockWork, attend_selected_blocks, block_means, select_blocks, selection_mask
from .moba import MixtureOfBlockAttention, moba_attention, moba_mask, moba_reference, moba_selection
from .nsa import NativeSparseAttention, nsa_attention, nsa_masks, nsa_reference
from .vision import (
    DividedSpaceTimeAttention,
    SpatialReductionAttention,
    space_attention,
    spatial_reduction,
    spatial_reduction_attention,
    time_attention,
    vision_attention_cost,
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
    "BlockWork",
    "block_means",
    "select_blocks",
    "selection_mask",
    "attend_selected_blocks",
    "nsa_attention",
    "nsa_reference",
    "nsa_masks",
    "NativeSparseAttention",
    "moba_selection",
    "moba_mask",
    "moba_attention",
    "moba_reference",
    "MixtureOfBlockAttention",
    "spatial_reduction",
    "spatial_reduction_attention",
    "SpatialReductionAttention",
    "time_attention",
    "space_attention",
    "DividedSpaceTimeAttention",
    "vision_attention_cost",
]
