"""Efficient Attention, from Scratch: the tested library behind the course's notebooks.

One module per chapter; the public names of each are re-exported here.
"""

from . import decoding, hardware, kv_cache, linear, models, recurrent, sparse, specialized, tiling
from .environment import choose_threads, environment_report, pick_device
from .kv_cache import (
    MODEL_CONFIGS,
    GroupedQueryAttention,
    KVCache,
    MultiHeadLatentAttention,
    MultiQueryAttention,
    PagedKVCache,
    gqa_attention,
    kv_cache_bytes,
)
from .linear import (
    efficient_attention,
    elu_plus_one,
    favor_plus,
    linear_attention,
    linformer_attention,
    relu_map,
)
from .recurrent import delta_rule, gated_delta_rule, gla, mlstm, retention, rwkv6, ssd, ttt_linear
from .sparse import (
    bigbird_mask,
    block_sparse_attention,
    block_sparse_mask,
    dilated_mask,
    global_local_mask,
    h2o_keep,
    lsh_attention,
    neighborhood_attention_2d,
    sliding_window_attention,
    sliding_window_mask,
    streaming_keep,
    strided_mask,
    topk_attention,
)
from .specialized import (
    DifferentialAttention,
    HybridAttentionStack,
    SwitchHeadAttention,
    differential_attention,
    ring_attention,
    run_ring_attention,
)
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
    "KVCache",
    "PagedKVCache",
    "gqa_attention",
    "MultiQueryAttention",
    "GroupedQueryAttention",
    "MultiHeadLatentAttention",
    "kv_cache_bytes",
    "MODEL_CONFIGS",
    "sliding_window_mask",
    "dilated_mask",
    "strided_mask",
    "global_local_mask",
    "bigbird_mask",
    "block_sparse_mask",
    "sliding_window_attention",
    "block_sparse_attention",
    "topk_attention",
    "lsh_attention",
    "neighborhood_attention_2d",
    "h2o_keep",
    "streaming_keep",
    "elu_plus_one",
    "relu_map",
    "favor_plus",
    "linear_attention",
    "efficient_attention",
    "linformer_attention",
    "retention",
    "gla",
    "ssd",
    "mlstm",
    "delta_rule",
    "gated_delta_rule",
    "ttt_linear",
    "rwkv6",
    "differential_attention",
    "DifferentialAttention",
    "SwitchHeadAttention",
    "ring_attention",
    "run_ring_attention",
    "HybridAttentionStack",
    "decoding",
    "hardware",
    "kv_cache",
    "linear",
    "models",
    "recurrent",
    "sparse",
    "specialized",
    "tiling",
    "pick_device",
    "choose_threads",
    "environment_report",
]

# One thread on small machines (see environment.choose_threads): 100 training steps 7 s, not 82 s.
choose_threads()
