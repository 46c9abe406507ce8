"""Driving the model from outside: a decoding step for :mod:`course_lib.decoding`, and attention hooks.

:func:`step_function` turns the model into the ``step_fn(tokens) -> logits`` that greedy decoding,
sampling and beam search call, reusing a KV cache between calls. :func:`forward_with_attention`
runs the model with every layer's attention replaced by a function of ``(q, k, v)`` (e.g. one
that sees an evicted cache), and :func:`attention_inputs` captures what each layer's attention sees.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..checks import check_bool
from ..kv_cache import KVCache, gqa_attention
from ..mixers import AttentionMixer
from .transformer import TinyTransformer

__all__ = ["step_function", "forward_with_attention", "attention_inputs"]


def _select_rows(cache, rows: torch.Tensor) -> None:
    """Keep (and reorder) the batch rows ``rows`` of a chapter-04 cache, in place (for beam search)."""
    for name in ("keys", "values", "latent", "rope_keys"):
        if hasattr(cache, name):
            setattr(cache, name, getattr(cache, name).index_select(1, rows))
    cache.batch_size = len(rows)


def step_function(model: TinyTransformer, *, use_cache: bool = True, max_len: int | None = None):
    """A ``step_fn(tokens (N, L)) -> logits (N, V)`` for :mod:`course_lib.decoding`.

    Without the cache every call runs the whole sequence again (O(L) work per token, O(L^2) for
    a generation). With it, the first call prefills a cache and each later call feeds only the
    tokens it has not seen. Beam search reorders and duplicates rows between calls; each row's
    parent is found by matching its prefix with the previous call's rows, and the cache rows are
    gathered accordingly (a cache miss falls back to a fresh prefill).
    """
    if not isinstance(model, TinyTransformer):
        raise TypeError(f"model must be a TinyTransformer, got {type(model).__name__}")
    check_bool(use_cache, "use_cache")
    state: dict = {"cache": None, "tokens": None}

    @torch.no_grad()
    def step(tokens: torch.Tensor) -> torch.Tensor:
        if not use_cache:
            return model(tokens)[:, -1]
        previous, cache = state["tokens"], state["cache"]
        reuse = previous is not None and tokens.shape[1] > previous.shape[1]
        if reuse:
            # Parent of each row: the previous row that is a prefix of it.
            prefix = tokens[:, : previous.shape[1]]
            matches = (prefix[:, None, :] == previous[None, :, :]).all(-1)  # (N, N_prev)
            reuse = bool(matches.any(-1).all())
        if reuse:
            parents = matches.float().argmax(-1)
            if parents.shape[0] != previous.shape[0] or not torch.equal(
                parents, torch.arange(len(parents), device=parents.device)
            ):
                _select_rows(cache, parents)
            logits = model(tokens[:, previous.shape[1] :], cache=cache)[:, -1]
        else:
            cache = model.make_cache(tokens.shape[0], max_len)
            logits = model(tokens, cache=cache)[:, -1]
        state["cache"], state["tokens"] = cache, tokens
        return logits

    return step


# --- looking inside the attention -------------------------------------------------------------------


def attention_layers(model: object, name: str = "model") -> list[AttentionMixer]:
    """Every block's softmax attention layer (with a KV cache); a ValueError for other mixers."""
    if not isinstance(model, TinyTransformer):
        raise TypeError(f"{name} must be a TinyTransformer, got {type(model).__name__}")
    layers = [block.attention for block in model.blocks]
    if not all(isinstance(layer, AttentionMixer) and layer.core == "softmax" for layer in layers):
        raise ValueError(
            f"{name} must use softmax attention with a key/value cache ('attention', 'mqa' or 'gqa'), "
            f"got attention={model.config.attention!r}"
        )
    return layers


def forward_with_attention(
    model: TinyTransformer,
    tokens: torch.Tensor,
    attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    cache: KVCache | None = None,
) -> torch.Tensor:
    """Logits ``(B, T, vocab_size)`` of ``tokens (B, T)`` with every layer's attention done by ``attend``.

    ``attend(layer_index, q, k, v)`` gets the layer's ``q (B, H, T, D)`` and ``k, v (B, H_kv, S, D)``
    (after RoPE when ``positions="rope"``) and returns the per-head output ``(B, H, T, D)``, which
    goes through the layer's ``out_proj`` as usual. Without ``cache``, ``S = T``; with a
    :class:`~course_lib.kv_cache.KVCache` that already holds ``P`` tokens, ``tokens`` continue it
    and ``S = P + T`` (the cached entries first). With ``attend = lambda i, q, k, v:
    gqa_attention(q, k, v, causal=True)`` this is ``model(tokens, cache=cache)``; other choices
    change what the attention may see (e.g. an evicted KV cache). Only for "mha", "mqa" and "gqa".
    """
    layers = attention_layers(model)
    if not callable(attend):
        raise TypeError(f"attend must be callable, got {type(attend).__name__}")

    def checked(layer_index: int):
        def attend_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = attend(layer_index, q, k, v)
            if not isinstance(out, torch.Tensor) or out.shape != q.shape:
                raise ValueError(
                    f"attend must return a tensor shaped like q {tuple(q.shape)}, "
                    f"got {getattr(out, 'shape', type(out).__name__)}"
                )
            return out

        return attend_layer

    for index, layer in enumerate(layers):
        layer.attend = checked(index)
    try:
        return model(tokens, cache=cache)
    finally:
        for layer in layers:
            layer.attend = None


def attention_inputs(
    model: TinyTransformer, tokens: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each layer's attention inputs on ``tokens (B, T)``, exactly as the layer's attention sees them.

    Returns one ``(q, k, v)`` per layer: ``q (B, H, T, D)``, ``k, v (B, H_kv, T, D)`` (``H_kv = H``
    for "mha", 1 for "mqa"), keys and queries rotated by RoPE when ``positions="rope"``.
    ``gqa_attention(q, k, v, causal=True)`` followed by the layer's ``out_proj`` is the layer's
    output. Only for "mha", "mqa" and "gqa" models.
    """
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def attend(layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        captured.append((q, k, v))
        return gqa_attention(q, k, v, causal=True)

    forward_with_attention(model, tokens, attend)
    return captured
