"""Chapter 03: tiling and FlashAttention, from the online softmax to low-precision attention.

Read the modules in the notebook's order: ``online_softmax`` (streaming max and sum),
``flash`` (the FA1/FA2 loops and the backward pass), ``io_cost`` (HBM traffic), ``decoding``
(FlashDecoding) and ``quantized`` (SageAttention, FlashAttention-3's rotation).
"""

from .decoding import flash_decoding
from .flash import FlashStats, TileStep, flash_attention, flash_attention_trace, tile_gradients
from .io_cost import IOCost, io_cost
from .online_softmax import combine_partials, merge_softmax_stats, online_softmax
from .quantized import quantize_blocks, quantized_attention, random_hadamard, random_orthogonal
from .sage2 import attention_error, outlier_qkv, sage2_attention, thread_groups

__all__ = [
    "online_softmax",
    "merge_softmax_stats",
    "combine_partials",
    "flash_attention",
    "flash_attention_trace",
    "tile_gradients",
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
