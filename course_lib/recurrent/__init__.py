"""Chapter 07: gated linear recurrences, one file per method.

Every method is ``S_t = decay_t * S_{t-1} + write_t``, ``o_t = S_t^T (scale * q_t)`` with a state
of shape (B, H, D_k, D_v), a naive recurrent reference and a chunkwise form that agree. Every
naive reference runs through the one loop :func:`run_recurrence` (``runner``); the chunk forms of
the diagonally gated methods share :func:`chunk_gated_scan`.
``layers`` wraps each core in a token mixer (projections, gates, short convolution, output norm).
"""

from ._common import chunk_gated_scan
from .delta_rule import delta_rule, gated_delta_rule
from .gla import gla
from .layers import (
    MIXERS,
    DeltaNetMixer,
    GatedDeltaNetMixer,
    GLAMixer,
    Mamba2Mixer,
    MLSTMMixer,
    QKVMixer,
    RetNetMixer,
    RWKV6Mixer,
    TTTLinearMixer,
)
from .mlstm import mlstm
from .retention import retention, retention_decay_matrix, retnet_gammas
from .runner import read_state, run_recurrence
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
    "run_recurrence",
    "read_state",
    "chunk_gated_scan",
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
    "QKVMixer",
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
