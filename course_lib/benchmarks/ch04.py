"""Chapter 04's benchmarks.

``kv_cache``: one decode step (one new token against a cache holding T tokens) of MHA, GQA, MQA
and absorbed-MLA layers of equal width, and the peak memory of prefilling a T-token prompt in one
shot vs in chunks of 64. Reference: MHA's decode step.

``decode``: the tiny model of ``course_lib.models``: the time to produce one token after a context
of T tokens with the KV cache (one decode step) and without it (a full forward over T + 1 tokens).
Reference: without the cache. Tokens per second = 1 / time.
"""

from __future__ import annotations

import torch

from ..kv_cache import (
    GroupedQueryAttention,
    KVCache,
    LatentKVCache,
    MultiHeadLatentAttention,
    chunked_prefill,
)
from ..models import VOCAB, ModelConfig, TinyTransformer

__all__ = ["SUITES", "kv_cache_suite", "decode_suite", "LAYER_SHAPES", "rewind"]

# Equal width for every layer: d_model 512, 8 query heads of 64. GQA keeps 2 kv heads, MQA 1; MLA
# caches a latent of 64 plus a rope key of 16 (80 numbers vs MHA's 1024 per token and layer).
D_MODEL, HEADS, HEAD_DIM = 512, 8, 64
LAYER_SHAPES = {
    "mha": dict(num_kv_heads=8),
    "gqa": dict(num_kv_heads=2),
    "mqa": dict(num_kv_heads=1),
    "mla": dict(latent_dim=64, rope_dim=16),
}
CHUNK = 64
# The tiny model of the decode suite: d_model 96, 4 heads of 24, one layer.
DECODE_D_MODEL, DECODE_HEADS = 96, 4


class FoldedMLA(MultiHeadLatentAttention):
    """MLA whose absorbed matrices are folded once, as a deployment does (the library refolds per call)."""

    def fold(self) -> FoldedMLA:
        with torch.no_grad():
            self._folded = super().absorbed_weights()
        return self

    def absorbed_weights(self):
        return self._folded if hasattr(self, "_folded") else super().absorbed_weights()


def rewind(cache, length: int) -> None:
    """Forget everything a cache holds past ``length`` tokens (so a timed decode step can repeat)."""
    cache.truncate(length)


def _layer(name: str, device, dtype):
    with torch.random.fork_rng(devices=[]):  # seeded weights, global RNG untouched
        torch.manual_seed(0)
        if name == "mla":
            layer = FoldedMLA(D_MODEL, HEADS, head_dim=HEAD_DIM, **LAYER_SHAPES[name])
        else:
            layer = GroupedQueryAttention(D_MODEL, HEADS, LAYER_SHAPES[name]["num_kv_heads"])
    layer = layer.to(device=device, dtype=dtype).eval()
    return layer.fold() if isinstance(layer, FoldedMLA) else layer


def _cache(layer, max_len: int, device, dtype):
    if isinstance(layer, MultiHeadLatentAttention):
        return LatentKVCache(1, 1, max_len, layer.latent_dim, layer.rope_dim, dtype=dtype, device=device)
    return KVCache(1, 1, layer.num_kv_heads, max_len, layer.head_dim, dtype=dtype, device=device)


def _call(layer, x, cache):
    if isinstance(layer, MultiHeadLatentAttention):
        return layer(x, cache=cache, mode="absorbed")
    return layer(x, cache=cache)


def kv_cache_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """One decode step of an MHA/GQA/MQA/MLA (absorbed) layer at context T, and one-shot vs chunked prefill.

    One sequence, d_model 512, 8 query heads of 64; T = 256 .. 4096. Reference: MHA.
    """

    def decode_step(name: str):
        def build(T: int):
            generator = torch.Generator().manual_seed(T)
            layer = _layer(name, device, dtype)
            cache = _cache(layer, T + 1, device, dtype)
            # Fill the cache with T random tokens directly (a prefill would cost more than the step).
            if isinstance(cache, LatentKVCache):
                shapes = [(1, T, cache.latent_dim), (1, T, cache.rope_dim)]
            else:
                shapes = [(1, cache.num_kv_heads, T, cache.head_dim)] * 2
            cache.append(0, *(torch.randn(s, generator=generator).to(device, dtype) for s in shapes))
            token = torch.randn(1, 1, D_MODEL, generator=generator).to(device, dtype)

            @torch.no_grad()
            def step():
                rewind(cache, T)
                return _call(layer, token, cache)

            return step

        return build

    def prefill(chunk_size: int | None):
        def build(T: int):
            layer = _layer("mha", device, dtype)
            cache = _cache(layer, T, device, dtype)
            prompt = torch.randn(1, T, D_MODEL, generator=torch.Generator().manual_seed(T)).to(device, dtype)

            @torch.no_grad()
            def run():
                cache.reset()
                if chunk_size is None:
                    return layer(prompt, cache=cache)
                return chunked_prefill(layer, prompt, cache, chunk_size=chunk_size)

            return run

        return build

    methods = {name: decode_step(name) for name in LAYER_SHAPES}
    methods["prefill"] = prefill(None)
    methods["chunked"] = prefill(CHUNK)
    return methods, "mha", [256, 512, 1024, 2048, 4096]


def decode_suite(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """One generated token of the tiny model after T context tokens, with and without the KV cache.

    One sequence, one layer of d_model 96 (4 heads of 24); T = 128 .. 2048.
    """

    def model_for(T: int) -> TinyTransformer:
        config = ModelConfig(
            vocab_size=len(VOCAB),
            d_model=DECODE_D_MODEL,
            num_heads=DECODE_HEADS,
            num_layers=1,
            positions="rope",
            max_len=T + 1,
        )
        return TinyTransformer(config).to(device=device, dtype=dtype).eval()

    def tokens(T: int) -> torch.Tensor:
        return torch.randint(0, len(VOCAB), (1, T + 1), generator=torch.Generator().manual_seed(0)).to(device)

    def cached(T: int):
        model, sequence = model_for(T), tokens(T)
        cache = model.make_cache(1, T + 1, dtype=dtype)
        with torch.no_grad():
            model(sequence[:, :T], cache=cache)

        @torch.no_grad()
        def step():
            rewind(cache, T)
            return model(sequence[:, T:], cache=cache)[:, -1]

        return step

    def uncached(T: int):
        model, sequence = model_for(T), tokens(T)
        return torch.no_grad()(lambda: model(sequence)[:, -1])

    return {"with cache": cached, "without cache": uncached}, "without cache", [128, 256, 512, 1024, 2048]


kv_cache_suite.shape = {"B": 1, "H": HEADS, "D": HEAD_DIM, "d_model": D_MODEL}
decode_suite.shape = {
    "B": 1,
    "H": DECODE_HEADS,
    "D": DECODE_D_MODEL // DECODE_HEADS,
    "d_model": DECODE_D_MODEL,
}
SUITES = {"kv_cache": kv_cache_suite, "decode": decode_suite}
