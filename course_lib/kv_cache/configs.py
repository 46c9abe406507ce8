"""KV-cache sizes of published models.

Per token and layer a cache stores:
- MHA / GQA / MQA: ``2 * num_kv_heads * head_dim`` numbers (a key and a value per kv head);
- MLA: ``kv_lora_rank + qk_rope_head_dim`` numbers (the latent d_c and the shared rope key d_R).

Those shrink the cache *within* a layer. Cross-layer KV sharing (cross-layer attention, CLA;
Brandon et al., 2024) shrinks it *across* layers: groups of ``kv_share`` adjacent layers attend
over the keys and values of the group's first layer, so only ``ceil(num_layers / kv_share)``
layers are cached. It composes with any of the above (the CLA paper pairs it with MQA and GQA).
An optional config field ``kv_share`` (default 1) sets it.

``kv_cache_bytes`` multiplies by cached layers, tokens, batch and bytes per number. The configurations
below are copied from each model's published ``config.json`` on the Hugging Face hub (field names
there in brackets) and, where stated, the paper; the URL of each is in its comment.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..checks import check_bool, check_divisible, check_int

__all__ = [
    "MODEL_CONFIGS",
    "cached_layers",
    "kv_cache_bytes",
    "kv_numbers_per_token",
    "max_concurrent_requests",
]

# Fields: num_layers [num_hidden_layers], hidden_size, num_heads [num_attention_heads],
# num_kv_heads [num_key_value_heads], head_dim [head_dim or hidden_size / num_attention_heads];
# MLA adds kv_lora_rank (d_c), qk_rope_head_dim (d_R), q_lora_rank (d_c'), qk_nope_head_dim, v_head_dim.
MODEL_CONFIGS: dict[str, dict] = {
    # https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json ; Touvron et al. 2023, Table 1.
    "Llama-2-7B": dict(
        attention="mha", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, head_dim=128
    ),
    # https://huggingface.co/meta-llama/Llama-2-70b-hf/blob/main/config.json (GQA with 8 kv heads).
    "Llama-2-70B": dict(
        attention="gqa", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128
    ),
    # https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
    "Llama-3-8B": dict(
        attention="gqa", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128
    ),
    # https://huggingface.co/meta-llama/Meta-Llama-3-70B/blob/main/config.json
    "Llama-3-70B": dict(
        attention="gqa", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128
    ),
    # https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json ; Jiang et al. 2023 (sliding
    # window 4096 with a rolling-buffer cache, so the cache stops growing after 4096 tokens).
    "Mistral-7B": dict(
        attention="gqa",
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        sliding_window=4096,
    ),
    # https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json (k_proj 3584 -> 512 = 4 heads x 128).
    "Qwen2.5-7B": dict(
        attention="gqa", num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4, head_dim=128
    ),
    # https://huggingface.co/google/gemma-7b/blob/main/config.json (head_dim 256: 16 x 256 != 3072).
    "Gemma-7B": dict(
        attention="mha", num_layers=28, hidden_size=3072, num_heads=16, num_kv_heads=16, head_dim=256
    ),
    # https://huggingface.co/google/gemma-2b/blob/main/config.json (multi-query: one kv head).
    "Gemma-2B": dict(
        attention="mqa", num_layers=18, hidden_size=2048, num_heads=8, num_kv_heads=1, head_dim=256
    ),
    # https://huggingface.co/deepseek-ai/DeepSeek-V2/blob/main/config.json ; DeepSeek-AI 2024, "DeepSeek-V2",
    # section 2.1 (d_c = 512, d_h^R = 64, d_c' = 1536, 128 heads of 128).
    "DeepSeek-V2": dict(
        attention="mla",
        num_layers=60,
        hidden_size=5120,
        num_heads=128,
        head_dim=128,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        q_lora_rank=1536,
        qk_nope_head_dim=128,
        v_head_dim=128,
    ),
    # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json ; DeepSeek-AI 2024, "DeepSeek-V3
    # Technical Report" (61 layers, width 7168, same MLA sizes as V2).
    "DeepSeek-V3": dict(
        attention="mla",
        num_layers=61,
        hidden_size=7168,
        num_heads=128,
        head_dim=128,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        q_lora_rank=1536,
        qk_nope_head_dim=128,
        v_head_dim=128,
    ),
}

_REQUIRED = {
    "mha": ("num_layers", "num_kv_heads", "head_dim"),
    "gqa": ("num_layers", "num_kv_heads", "head_dim"),
    "mqa": ("num_layers", "num_kv_heads", "head_dim"),
    "mla": ("num_layers", "kv_lora_rank", "qk_rope_head_dim"),
}


def _resolve(config: Mapping | str) -> Mapping:
    if isinstance(config, str):
        if config not in MODEL_CONFIGS:
            raise ValueError(f"config={config!r} is not in MODEL_CONFIGS ({', '.join(MODEL_CONFIGS)})")
        return MODEL_CONFIGS[config]
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict or a MODEL_CONFIGS name, got {type(config).__name__}")
    attention = config.get("attention", "gqa")
    if attention not in _REQUIRED:
        raise ValueError(
            f"config field 'attention'={attention!r} must be one of {', '.join(map(repr, _REQUIRED))}"
        )
    for field in _REQUIRED[attention]:
        if field not in config:
            raise ValueError(f"config is missing field {field!r} (needed for attention={attention!r})")
        check_int(config[field], f"config[{field!r}]", min=1)
    # A model whose kv heads do not divide its heads, or contradict its attention kind, does not
    # exist: its cache size would be a number about nothing.
    if attention == "mqa" and config["num_kv_heads"] != 1:
        raise ValueError(f"config['num_kv_heads']={config['num_kv_heads']} must be 1 for attention='mqa'")
    if attention != "mla" and "num_heads" in config:
        heads = check_int(config["num_heads"], "config['num_heads']", min=1)
        kv_heads = config["num_kv_heads"]
        check_divisible(heads, "config['num_heads']", kv_heads, "config['num_kv_heads']")
        if attention == "mha" and kv_heads != heads:
            raise ValueError(
                f"config['num_kv_heads']={kv_heads} must equal config['num_heads']={heads} "
                "for attention='mha' (use 'gqa' for fewer kv heads)"
            )
    if "kv_share" in config:
        check_int(config["kv_share"], "config['kv_share']", min=1, max=config["num_layers"])
    return config


def cached_layers(config: Mapping | str) -> int:
    """Layers whose keys and values are cached: ``ceil(num_layers / kv_share)`` (``kv_share`` default 1)."""
    config = _resolve(config)
    return -(-config["num_layers"] // config.get("kv_share", 1))


def kv_numbers_per_token(config: Mapping | str) -> int:
    """Numbers cached per token across all layers (not bytes).

    Per cached layer: ``2 * num_kv_heads * head_dim`` (MHA, GQA, MQA) or ``kv_lora_rank +
    qk_rope_head_dim`` (MLA); times :func:`cached_layers` (fewer than the layers with ``kv_share``).
    """
    config = _resolve(config)
    if config.get("attention", "gqa") == "mla":
        per_layer = config["kv_lora_rank"] + config["qk_rope_head_dim"]
    else:
        per_layer = 2 * config["num_kv_heads"] * config["head_dim"]
    return per_layer * cached_layers(config)


def kv_cache_bytes(
    config: Mapping | str,
    seq_len: int,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float16,
    *,
    respect_sliding_window: bool = True,
) -> int:
    """Bytes of the KV cache of ``batch_size`` sequences of ``seq_len`` tokens.

    ``config`` is a dict with the fields of ``MODEL_CONFIGS`` (or one of its names), optionally
    with ``kv_share`` (cross-layer KV sharing: ``dict(MODEL_CONFIGS[name], kv_share=2)``). With
    ``respect_sliding_window`` a model with a ``sliding_window`` field caches at most that many
    tokens (Mistral's rolling buffer). Weights, activations and allocator overhead are not counted.
    """
    config = _resolve(config)
    seq_len = check_int(seq_len, "seq_len", min=0)
    batch_size = check_int(batch_size, "batch_size", min=1)
    check_bool(respect_sliding_window, "respect_sliding_window")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    tokens = seq_len
    if respect_sliding_window and config.get("sliding_window"):
        tokens = min(seq_len, check_int(config["sliding_window"], "config['sliding_window']", min=1))
    bytes_per_number = torch.empty((), dtype=dtype).element_size()
    return kv_numbers_per_token(config) * tokens * batch_size * bytes_per_number


def max_concurrent_requests(
    config: Mapping | str, seq_len: int, memory_bytes: int, dtype: torch.dtype = torch.float16
) -> int:
    """How many sequences of ``seq_len`` tokens fit ``memory_bytes`` of cache (ignoring the weights)."""
    memory_bytes = check_int(memory_bytes, "memory_bytes", min=0)
    seq_len = check_int(seq_len, "seq_len", min=1)
    return memory_bytes // kv_cache_bytes(config, seq_len, 1, dtype)
