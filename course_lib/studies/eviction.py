"""Chapter 05's KV-cache eviction study: which cached tokens can a decoder drop, and what it costs.

A prompt of ``cache_len`` tokens fills the KV cache; ``new_tokens`` decoding steps follow, each
attending to the cache entries a policy kept, the earlier new tokens and itself. Two sources of
attention: :func:`trained_decoding` runs held-out text through chapter 05's trained model
(:func:`course_lib.models.load_eviction_model`) and keeps every layer's real queries, keys and
values (:class:`TrainedDecoding`); :func:`synthetic_decoding_attention` builds one layer with the
structure eviction relies on (sinks, heavy hitters, a recency bias) from a documented random
process. For each, :class:`DecodingAttention` measures a policy's relative output error
(:func:`course_lib.sparse.eviction_error`); :func:`evicted_loss` runs the model with every layer
evicted and reports the next-token loss. :func:`eviction_study` does both for every policy of
:data:`POLICIES` at every budget. Chapter 05's eviction explorer and notebook draw these numbers.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import cache, cached_property

import torch
import torch.nn.functional as F

from ..checks import check_choice, check_float, check_int
from ..kv_cache import KVCache, gqa_attention
from ..models import (
    TinyTransformer,
    attention_inputs,
    corpus_split,
    forward_with_attention,
    load_eviction_model,
)
from ..sparse import eviction_error, h2o_keep, keep_mask, streaming_keep
from ..standard import attention

__all__ = [
    "DecodingAttention",
    "synthetic_decoding_attention",
    "TrainedDecoding",
    "trained_decoding",
    "default_trained_decoding",
    "POLICIES",
    "policy_keep",
    "eviction_curves",
    "evicted_loss",
    "EvictionStudy",
    "eviction_study",
    "EVICTION_BUDGETS",
    "trained_eviction_study",
]


@dataclass(frozen=True)
class DecodingAttention:
    """One layer's queries ``(B, H, T, D)`` and keys and values ``(B, H_kv, T, D)`` while decoding.

    ``T = cache_len + new_tokens``. The first ``cache_len`` positions are the prompt, whose keys
    and values form the KV cache to evict from; the last ``new_tokens`` positions are decoding
    steps. Each new token attends causally to the kept cache entries, the earlier new tokens and
    itself (new entries are appended to the cache and never evicted here), and the eviction error
    is measured on the new tokens' outputs. Query head ``h`` reads key/value head ``h // (H / H_kv)``
    (grouped-query attention), so an eviction choice is made per key/value head.
    ``sinks`` and ``heavy`` are the positions a synthetic process built as sinks and heavy hitters
    (empty for a trained model).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cache_len: int
    sinks: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    heavy: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.q.shape[1] // self.k.shape[1]

    def _per_query_head(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.group_size, dim=1)

    @property
    def prefill(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompt's queries, keys and values, keys and values repeated to the ``H`` query heads."""
        c = self.cache_len
        return (
            self.q[:, :, :c],
            self._per_query_head(self.k[:, :, :c]),
            self._per_query_head(self.v[:, :, :c]),
        )

    @cached_property
    def prefill_weights(self) -> torch.Tensor:
        """``(B, H, cache_len, cache_len)`` causal attention weights of the prompt (H2O's scores)."""
        return attention(*self.prefill, causal=True, return_weights=True)[1]

    @property
    def decode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The new tokens' queries ``(B, H, new_tokens, D)`` and all ``T`` keys and values, per query head.

        Use with ``causal=True`` (aligned to the end): new token ``i`` sees keys up to ``cache_len + i``.
        """
        c = self.cache_len
        return self.q[:, :, c:], self._per_query_head(self.k), self._per_query_head(self.v)

    def decode_keep(self, keep: torch.Tensor) -> torch.Tensor:
        """Kept cache indices ``(n,)`` or ``(B, H_kv, n)`` -> kept key indices ``(B, H, n + new_tokens)``.

        Adds the new tokens' own positions (never evicted) and repeats each key/value head's choice
        for the query heads that read it.
        """
        B, H, T, _ = self.q.shape
        keep = keep.expand(B, self.k.shape[1], keep.shape[-1])
        new = torch.arange(self.cache_len, T).expand(B, H, T - self.cache_len)
        return torch.cat((self._per_query_head(keep), new), dim=-1)

    def error(self, keep: torch.Tensor) -> float:
        """Relative error ``||o_kept - o_full|| / ||o_full||`` of the new tokens' attention outputs.

        :func:`course_lib.sparse.eviction_error` on the new tokens' queries, with the kept cache
        entries (:meth:`decode_keep`) and causal alignment to the end: new token ``i`` sees the
        kept entries and the new tokens up to itself.
        """
        return eviction_error(*self.decode, self.decode_keep(keep), causal=True)

    @cached_property
    def received(self) -> torch.Tensor:
        """``(cache_len,)`` mean weight each cache entry gets from the new tokens (over batch and heads)."""
        _, weights = attention(*self.decode, causal=True, return_weights=True)
        return weights[..., : self.cache_len].mean(dim=(0, 1, 2))


def synthetic_decoding_attention(
    cache_len: int = 512,
    new_tokens: int = 32,
    *,
    heads: int = 4,
    head_dim: int = 64,
    num_sinks: int = 4,
    num_heavy: int = 8,
    decay: float = 32.0,
    recency: float = 8.0,
    sink_strength: float = 5.0,
    heavy_strength: float = 4.0,
    seed: int = 0,
) -> DecodingAttention:
    """Attention with the structure eviction relies on, from a documented random process.

    Not a trained model (:func:`trained_decoding` is): a stand-in with the three features
    reported for large trained decoders, built in on purpose.
    Half of each head's dimensions carry position: random Fourier features with Cauchy frequencies
    (scale ``1 / decay``), so ``p_i . p_j`` approximates ``exp(-|i - j| / decay)``; queries carry
    them times ``recency``, which gives a **recency bias**. The other half is Gaussian content
    plus two directions every query leans on: the first ``num_sinks`` keys get ``sink_strength``
    along the first (**attention sinks**) and ``num_heavy`` random positions of the cache get
    ``heavy_strength`` along the second (**heavy hitters**). Values are Gaussian. Queries are
    multiplied by ``sqrt(head_dim)``, so the default scale ``D ** -0.5`` gives these logits.
    With random Gaussian q and k instead, every policy's error is above 1: there is nothing to keep.
    """
    cache_len = check_int(cache_len, "cache_len", min=2)
    new_tokens = check_int(new_tokens, "new_tokens", min=1)
    heads = check_int(heads, "heads", min=1)
    head_dim = check_int(head_dim, "head_dim", min=4)
    num_sinks = check_int(num_sinks, "num_sinks", min=0, max=cache_len - 1)
    num_heavy = check_int(num_heavy, "num_heavy", min=0, max=cache_len - num_sinks)
    decay = check_float(decay, "decay", min=0.0, min_open=True)
    generator = torch.Generator().manual_seed(check_int(seed, "seed", min=0))

    T = cache_len + new_tokens
    frequencies = head_dim // 4
    uniform = torch.rand(heads, frequencies, generator=generator, dtype=torch.float64)
    omega = torch.tan(math.pi * (uniform - 0.5)) / decay  # Cauchy: the Laplace kernel exp(-|x|/decay)
    angles = torch.arange(T, dtype=torch.float64)[None, :, None] * omega[:, None, :]
    position = (torch.cat([angles.cos(), angles.sin()], dim=-1) / math.sqrt(frequencies)).float()

    content_dim = head_dim - 2 * frequencies
    key_content = torch.randn(heads, T, content_dim, generator=generator) / content_dim**0.25
    query_content = torch.randn(heads, T, content_dim, generator=generator) / content_dim**0.25
    heavy = (torch.randperm(cache_len - num_sinks, generator=generator)[:num_heavy] + num_sinks).sort().values
    key_content[:, :num_sinks, 0] += sink_strength
    key_content[:, heavy, 1] += heavy_strength
    query_content[:, :, :2] += 1.0

    q = torch.cat([recency * position, query_content], dim=-1)[None] * head_dim**0.5
    k = torch.cat([position, key_content], dim=-1)[None]
    v = torch.randn(1, heads, T, head_dim, generator=generator)
    return DecodingAttention(q, k, v, cache_len, torch.arange(num_sinks), heavy)


@dataclass(frozen=True)
class TrainedDecoding:
    """Held-out text run through chapter 05's trained model, seen as a prompt plus decoding steps.

    ``tokens (B, cache_len + new_tokens + 1)``: each row is a window of held-out text; the first
    ``cache_len`` tokens are the prompt (the cache), the next ``new_tokens`` are fed one by one
    (teacher forcing) and each predicts the token after it. ``layers`` holds each layer's
    :class:`DecodingAttention`, from the real queries, keys and values of the full forward pass.
    """

    model: TinyTransformer
    tokens: torch.Tensor
    cache_len: int
    layers: tuple[DecodingAttention, ...]

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @cached_property
    def prompt_cache(self) -> KVCache:
        """The KV cache after the prompt (full attention), computed once; copy it before appending."""
        cache = self.model.make_cache(self.tokens.shape[0], max_len=self.inputs.shape[1])
        with torch.no_grad():
            self.model(self.inputs[:, : self.cache_len], cache=cache)
        return cache


@torch.no_grad()
def trained_decoding(
    cache_len: int = 256,
    new_tokens: int = 64,
    *,
    batch_size: int = 16,
    seed: int = 0,
    model: TinyTransformer | None = None,
) -> TrainedDecoding:
    """Queries, keys and values of a trained model on ``batch_size`` seeded windows of held-out text.

    ``model`` defaults to :func:`course_lib.models.load_eviction_model` (trained on the first 90%
    of the corpus; the windows come from the last 10%). Keys and values keep their ``H_kv`` heads.
    """
    model = load_eviction_model() if model is None else model
    if not isinstance(model, TinyTransformer):
        raise TypeError(f"model must be a TinyTransformer, got {type(model).__name__}")
    cache_len = check_int(cache_len, "cache_len", min=1)
    new_tokens = check_int(new_tokens, "new_tokens", min=1)
    batch_size = check_int(batch_size, "batch_size", min=1)
    _, held_out = corpus_split()
    length = cache_len + new_tokens + 1
    if length > len(held_out):
        raise ValueError(
            f"cache_len + new_tokens = {length - 1} must be below the held-out text's {len(held_out)}"
        )
    generator = torch.Generator().manual_seed(check_int(seed, "seed", min=0))
    starts = torch.randint(0, len(held_out) - length + 1, (batch_size,), generator=generator)
    tokens = held_out[starts[:, None] + torch.arange(length)]
    layers = attention_inputs(model, tokens[:, :-1])
    return TrainedDecoding(
        model, tokens, cache_len, tuple(DecodingAttention(q, k, v, cache_len) for q, k, v in layers)
    )


POLICIES = ("streaming", "h2o", "recent", "random")


def policy_keep(
    policy: str, data: DecodingAttention, budget: int, *, num_sinks: int = 4, seed: int = 0
) -> torch.Tensor:
    """Indices of the cache entries ``policy`` keeps within ``budget`` (at most ``cache_len``).

    ``streaming``: StreamingLLM, ``num_sinks`` first tokens plus the most recent ones.
    ``h2o``: heavy hitters by the attention the prompt's queries gave each key, plus the recent
    half of the budget; one choice per key/value head (its query heads' attention summed), shape
    ``(B, H_kv, n)``. ``recent``: the newest ``budget`` tokens only (no sinks).
    ``random``: a seeded uniform choice, the baseline that ignores structure. The others are ``(n,)``.
    """
    check_choice(policy, "policy", POLICIES)
    budget = check_int(budget, "budget", min=1)
    S = data.cache_len
    if policy == "streaming":
        return streaming_keep(S, budget, num_sinks=min(num_sinks, budget))
    if policy == "recent":
        return streaming_keep(S, budget, num_sinks=0)
    if policy == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(S, generator=generator)[: min(budget, S)].sort().values
    B, H_kv = data.k.shape[:2]
    # A key/value head's score sums the weights from every query of every query head that reads it.
    grouped = data.prefill_weights.reshape(B, H_kv, data.group_size * S, S)
    return h2o_keep(grouped, budget)


def eviction_curves(
    data: DecodingAttention, budgets: list[int], *, num_sinks: int = 4
) -> dict[str, list[float]]:
    """Relative output error of every policy at every budget on the decoding queries of ``data``."""
    return {
        policy: [data.error(policy_keep(policy, data, b, num_sinks=num_sinks)) for b in budgets]
        for policy in POLICIES
    }


@torch.no_grad()
def evicted_loss(decoding: TrainedDecoding, keeps: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> float:
    """Next-token loss (nats) on the new tokens when layer ``i`` keeps only ``keeps[i]`` of its cache.

    The prompt is processed with its full attention (the cache is evicted after the prefill);
    each new token then attends to the kept cache entries of every layer, the earlier new tokens
    and itself, with the positions it had in the full sequence. ``keeps[i]`` is ``(n,)`` or
    ``(B, H_kv, n)`` cache indices, as from :func:`policy_keep`.
    """
    if len(keeps) != len(decoding.layers):
        raise ValueError(
            f"keeps must hold one index set per layer ({len(decoding.layers)}), got {len(keeps)}"
        )
    c = decoding.cache_len
    new_inputs = decoding.inputs[:, c:]
    B, N = new_inputs.shape
    masks = []
    for layer, keep in zip(decoding.layers, keeps):
        H_kv = layer.k.shape[1]
        kept = keep_mask(keep.expand(B, H_kv, keep.shape[-1]), c)  # (B, H_kv, c)
        among_new = torch.ones(N, N, dtype=torch.bool).tril().expand(B, H_kv, N, N)
        visible = torch.cat([kept[:, :, None, :].expand(B, H_kv, N, c), among_new], dim=-1)
        masks.append(visible.repeat_interleave(layer.group_size, dim=1))

    def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return gqa_attention(q, k, v, masks[index])  # the layer's own attention, with the eviction mask

    # The prompt's cache is the same for every policy: only the new tokens run, on a copy of it.
    cache = copy.deepcopy(decoding.prompt_cache)
    logits = forward_with_attention(decoding.model, new_inputs, attend, cache=cache)
    return float(F.cross_entropy(logits.flatten(0, 1), decoding.tokens[:, c + 1 :].flatten()))


@dataclass(frozen=True)
class EvictionStudy:
    """Every policy at every budget: per-layer output error and end-to-end loss on the new tokens.

    ``errors[policy][layer][i]`` is the relative error at ``budgets[i]``; ``losses[policy][i]`` the
    loss with every layer evicted at that budget; ``full_loss`` the loss with the whole cache.
    """

    budgets: tuple[int, ...]
    errors: dict[str, list[list[float]]]
    losses: dict[str, list[float]]
    full_loss: float

    def table(self) -> str:
        """Rows ``policy``, columns budgets: ``error of layer 0 / layer 1 ... | loss increase``."""
        lines = [f"loss with the full cache: {self.full_loss:.3f} nats per character"]
        lines.append(f"{'budget':<10}" + "".join(f"{b:>20}" for b in self.budgets))
        for policy in self.errors:
            cells = []
            for i in range(len(self.budgets)):
                errors = "/".join(f"{layer[i]:.2f}" for layer in self.errors[policy])
                cells.append(f"{errors} {self.losses[policy][i] - self.full_loss:+.3f}")
            lines.append(f"{policy:<10}" + "".join(f"{cell:>20}" for cell in cells))
        return "\n".join(lines)


def eviction_study(decoding: TrainedDecoding, budgets: list[int], *, num_sinks: int = 4) -> EvictionStudy:
    """Every policy of :data:`POLICIES` at every budget on ``decoding`` (see :class:`EvictionStudy`)."""
    if not isinstance(decoding, TrainedDecoding):
        raise TypeError(f"decoding must be a TrainedDecoding, got {type(decoding).__name__}")
    budgets = [check_int(b, "budgets", min=1) for b in budgets]
    errors: dict[str, list[list[float]]] = {}
    losses: dict[str, list[float]] = {}
    for policy in POLICIES:
        keeps = [
            [policy_keep(policy, layer, b, num_sinks=num_sinks) for b in budgets] for layer in decoding.layers
        ]
        errors[policy] = [
            [layer.error(keep) for keep in per_budget] for layer, per_budget in zip(decoding.layers, keeps)
        ]
        losses[policy] = [
            evicted_loss(decoding, [per_budget[i] for per_budget in keeps]) for i in range(len(budgets))
        ]
    full = [torch.arange(decoding.cache_len)] * len(decoding.layers)
    return EvictionStudy(tuple(budgets), errors, losses, evicted_loss(decoding, full))


EVICTION_BUDGETS = [8, 16, 32, 64, 128, 256]


@cache
def default_trained_decoding() -> TrainedDecoding:
    """:func:`trained_decoding` with its defaults, built once per process and shared: do not modify it."""
    return trained_decoding()


def trained_eviction_study(num_sinks: int = 4) -> EvictionStudy:
    """:func:`eviction_study` at :data:`EVICTION_BUDGETS` on the default :func:`trained_decoding`.

    Computed once per process and ``num_sinks`` (the explorer and the notebook share it).
    """
    return _trained_study(check_int(num_sinks, "num_sinks", min=0))


@cache
def _trained_study(num_sinks: int) -> EvictionStudy:
    return eviction_study(default_trained_decoding(), EVICTION_BUDGETS, num_sinks=num_sinks)
