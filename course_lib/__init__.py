"""Efficient Attention, from Scratch: the tested library behind the course's notebooks.

One module per chapter; the public names of each are re-exported here.
"""

from . import hardware, tiling
from .environment import environment_report, pick_device
from .standard import (
    MultiHeadAttention,
    alibi_bias,
    apply_rope,
    attention,
    causal_mask,
    padding_mask,
    sinusoidal_positions,
)
from .tiling import flash_attention, flash_decoding, io_cost, online_softmax, quantized_attention

__version__ = "0.1.0"

__all__ = [
    "attention",
    "causal_mask",
    "padding_mask",
    "MultiHeadAttention",
    "sinusoidal_positions",
    "apply_rope",
    "alibi_bias",
    "online_softmax",
    "flash_attention",
    "flash_decoding",
    "io_cost",
    "quantized_attention",
    "hardware",
    "tiling",
    "pick_device",
    "environment_report",
]
