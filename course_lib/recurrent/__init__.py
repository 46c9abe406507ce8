"""Chapter 07: gated linear recurrences, one file per method.

Every method is ``S_t = decay_t * S_{t-1} + write_t``, ``o_t = S_t^T (scale * q_t)`` with a state
of shape (B, H, D_k, D_v), a naive recurrent reference and a chunkwise form that agree.
``layers`` wraps each core in a token mixer (projections, gates, short convolution, output norm).
"""

from .delta_rule import delta_rule, gated_delta_rule
from .gla import gla
from .layers import (
    MIXERS,
    DeltaNetMixer,
    GatedDeltaNetMixer,
    GLAMixer,
    Mamba2Mixer,
    MLSTMMixer,
    RetNetMixer,
    RWKV6Mixer,
    TTTLinearMixer,
)
from .mlstm import mlstm
from .retention import retention, retention_decay_matrix, retnet_gammas
from .rwkv import rwkv6
from .ssd import segsum, ssd
from .ttt import ttt_linear, ttt_mlp

# isort: split
# Issue 15: Mamba-1's selective scan, HGRN / HGRN-2, RWKV-7.
from .hgrn import HGRN2Mixer, HGRNMixer, hgrn, hgrn2, hgrn_forget_gate, hgrn_lower_bounds
from .mamba1 import Mamba1Mixer, selective_scan
from .rwkv7 import RWKV7Mixer, rwkv7, rwkv7_delta_rule_inputs
from .scan import associative_scan, chunked_scan

__all__ = [
    "retnet_gammas",
    "retention_decay_matrix",
    "retention",
    "gla",
    "segsum",
    "ssd",
    "mlstm",
    "delta_rule",
    "gated_delta_rule",
    "ttt_linear",
    "ttt_mlp",
    "rwkv6",
    "MIXERS",
    "RetNetMixer",
    "GLAMixer",
    "Mamba2Mixer",
    "MLSTMMixer",
    "DeltaNetMixer",
    "GatedDeltaNetMixer",
    "TTTLinearMixer",
    "RWKV6Mixer",
    "associative_scan",
    "chunked_scan",
    "selective_scan",
    "Mamba1Mixer",
    "hgrn",
    "hgrn2",
    "hgrn_forget_gate",
    "hgrn_lower_bounds",
    "HGRNMixer",
    "HGRN2Mixer",
    "rwkv7",
    "rwkv7_delta_rule_inputs",
    "RWKV7Mixer",
]
