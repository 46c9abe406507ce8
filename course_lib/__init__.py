"""Efficient Attention, from Scratch: the tested library behind the course's notebooks.

One module per chapter; the public names of each are re-exported here.
"""

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

__version__ = "0.1.0"

__all__ = [
    "attention",
    "causal_mask",
    "padding_mask",
    "MultiHeadAttention",
    "sinusoidal_positions",
    "apply_rope",
    "alibi_bias",
    "pick_device",
    "environment_report",
]
