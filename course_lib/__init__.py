"""Efficient Attention, from Scratch: the tested library behind the course's notebooks.

One module per chapter; the public names of each are re-exported here. They load on first use
(``course_lib.attention`` imports :mod:`course_lib.standard`, and torch, the first time it is
read), so importing the package costs nothing and ``python -m course_lib.bench --help`` answers
at once; ``from course_lib import attention`` works as usual.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# module -> the public names re-exported from it, in the order of the chapters
_EXPORTS: dict[str, tuple[str, ...]] = {
    "standard": (
        "attention",
        "causal_mask",
        "padding_mask",
        "MultiHeadAttention",
        "sinusoidal_positions",
        "apply_rope",
        "alibi_bias",
    ),
    "tiling": ("online_softmax", "flash_attention", "flash_decoding", "io_cost", "quantized_attention"),
    "kv_cache": (
        "KVCache",
        "PagedKVCache",
        "gqa_attention",
        "MultiQueryAttention",
        "GroupedQueryAttention",
        "MultiHeadLatentAttention",
        "kv_cache_bytes",
        "MODEL_CONFIGS",
    ),
    "sparse": (
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
    ),
    "linear": (
        "elu_plus_one",
        "relu_map",
        "favor_plus",
        "linear_attention",
        "efficient_attention",
        "linformer_attention",
    ),
    "recurrent": (
        "retention",
        "gla",
        "ssd",
        "mlstm",
        "delta_rule",
        "gated_delta_rule",
        "ttt_linear",
        "rwkv6",
    ),
    "specialized": (
        "differential_attention",
        "DifferentialAttention",
        "SwitchHeadAttention",
        "ring_attention",
        "run_ring_attention",
        "HybridAttentionStack",
    ),
    "environment": ("pick_device", "choose_threads", "environment_report"),
}
# Chapter modules reachable as attributes, e.g. ``course_lib.models.TinyTransformer``.
_MODULES = (
    "decoding",
    "hardware",
    "kv_cache",
    "linear",
    "models",
    "recurrent",
    "sparse",
    "specialized",
    "tiling",
)
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names if name not in _MODULES] + list(_MODULES)


def __getattr__(name: str):
    """Import a chapter module, or the module that defines a re-exported name, on first use."""
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value  # later reads find it directly
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# One thread on small machines (environment.choose_threads): 100 training steps took 7 s, not 82 s.
from .environment import choose_threads as _choose_threads  # noqa: E402

_choose_threads()
