"""Chapter 03: tiling and FlashAttention, from the online softmax to low-precision attention.

Read the modules in the notebook's order: ``online_softmax`` (streaming max and sum),
``flash`` (the plain FA1/FA2 loops and the backward pass, flash_attention, and the instrumented
schedule), ``io_cost`` (HBM traffic), ``decoding``
(FlashDecoding) and ``quantized`` (SageAttention, FlashAttention-3's rotation).
"""

from .decoding import flash_decoding
from .flash import (
    BLOCK_K,
    BLOCK_Q,
    FlashStats,
    ScoreMod,
    Tile,
    TileStep,
    alibi_score_mod,
    flash_attention,
    flash_attention_trace,
    flash_backward,
    flash_forward_fa1,
    flash_forward_fa2,
    soft_cap_score_mod,
    tile_gradients,
    tile_schedule,
)
from .io_cost import IOCost, io_cost
from .online_softmax import (
    combine_partials,
    finish_fold,
    fold_block,
    fold_block_,
    merge_softmax_stats,
    online_softmax,
    rescale_factor,
    start_fold,
)
from .quantized import quantize_blocks, quantized_attention, random_hadamard, random_orthogonal
from .sage2 import attention_error, outlier_qkv, sage2_attention, thread_groups

__all__ = [
    "online_softmax",
    "merge_softmax_stats",
    "rescale_factor",
    "start_fold",
    "fold_block",
    "fold_block_",
    "finish_fold",
    "combine_partials",
    "BLOCK_Q",
    "BLOCK_K",
    "flash_forward_fa2",
    "flash_forward_fa1",
    "flash_backward",
    "tile_gradients",
    "flash_attention",
    "ScoreMod",
    "alibi_score_mod",
    "soft_cap_score_mod",
    "Tile",
    "tile_schedule",
    "flash_attention_trace",
    "FlashStats",
    "TileStep",
    "io_cost",
    "IOCost",
    "flash_decoding",
    "quantize_blocks",
    "quantized_attention",
    "random_hadamard",
    "random_orthogonal",
    "sage2_attention",
    "thread_groups",
    "outlier_qkv",
    "attention_error",
]
