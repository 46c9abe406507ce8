"""Chapter 08: specialised variants — differential attention, SwitchHead, ring attention, hybrids.

Read the modules in the notebook's order:
- :mod:`.differential`: the difference of two softmax maps that cancels attention noise.
- :mod:`.switchhead`: mixture-of-experts value and output projections, few attention matrices.
- :mod:`.ring`: exact attention across processes with ``torch.distributed`` (ring and all-gather,
  contiguous and zig-zag sharding), and a launcher for CPU processes.
- :mod:`.hybrid`: stacks that mix sliding-window or linear layers with a few full layers.
"""

from .differential import DifferentialAttention, differential_attention, differential_lambda_init
from .hybrid import MIXERS, HybridAttentionStack, HybridLayer, LayerCost, hybrid_pattern, mixer_cost
from .ring import (
    CommunicationCost,
    RingStats,
    all_gather_attention,
    communication_cost,
    ring_attention,
    ring_work,
    run_distributed,
    run_ring_attention,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)
from .switchhead import SwitchHeadAttention, SwitchHeadStats, expert_projection, route_top_k

__all__ = [
    "differential_lambda_init",
    "differential_attention",
    "DifferentialAttention",
    "route_top_k",
    "expert_projection",
    "SwitchHeadStats",
    "SwitchHeadAttention",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
    "ring_attention",
    "all_gather_attention",
    "RingStats",
    "CommunicationCost",
    "communication_cost",
    "ring_work",
    "run_distributed",
    "run_ring_attention",
    "MIXERS",
    "hybrid_pattern",
    "LayerCost",
    "mixer_cost",
    "HybridLayer",
    "HybridAttentionStack",
]
