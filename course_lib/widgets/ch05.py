"""Chapter 05's explorers: the mask gallery, KV-cache eviction, and measured sparse kernels.

- (a) :func:`mask_explorer`: a pattern and its knobs -> the mask, its density, how many layers
  connect every pair, and the estimated cost of a kernel that skips the masked pairs at a chosen T.
- (b) :func:`eviction_explorer`: a policy and a budget -> the kept cache entries, the output
  error and the next-token loss, on the attention of chapter 05's trained model over held-out
  text (:func:`trained_decoding`), or on a synthetic stand-in with planted sinks and heavy hitters
  (:func:`synthetic_decoding_attention`).
- (c) :func:`sparse_timing`: a button that measures dense-masked attention, the banded kernel and
  SDPA with the mask as T grows (a small sweep through :mod:`course_lib.bench`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import cache, cached_property

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from ..bench import Measurement, format_bytes, format_table, sweep
from ..checks import check_bool, check_choice, check_float, check_int, check_tensor
from ..kv_cache import KVCache, repeat_kv
from ..models import (
    TinyTransformer,
    attention_inputs,
    corpus_split,
    forward_with_attention,
    load_eviction_model,
)
from ..sparse import (
    bigbird_layout,
    bigbird_mask,
    block_sparse_mask,
    dilated_mask,
    global_local_mask,
    h2o_keep,
    keep_mask,
    mask_stats,
    reachability,
    sliding_window_mask,
    streaming_keep,
    strided_mask,
)
from ..standard import attention
from ..viz import STYLE, plot_mask, plot_scaling
from ._display import new_figure, show, widen_labels

__all__ = [
    "PATTERNS",
    "COST_LENGTHS",
    "pattern_mask",
    "pattern_cost",
    "reach_curve",
    "mask_explorer_view",
    "mask_explorer",
    "DecodingAttention",
    "synthetic_decoding_attention",
    "TrainedDecoding",
    "trained_decoding",
    "POLICIES",
    "policy_keep",
    "eviction_curves",
    "evicted_loss",
    "EvictionStudy",
    "eviction_study",
    "trained_eviction_study",
    "EVICTION_BUDGETS",
    "SOURCES",
    "eviction_explorer_view",
    "eviction_explorer",
    "TIMING_LENGTHS",
    "sparse_timing_view",
    "sparse_timing",
]

# --- (a) mask explorer ----------------------------------------------------------------------

PATTERNS = ("window", "dilated", "strided", "fixed", "global+local", "bigbird", "block")
COST_LENGTHS = (256, 512, 1024, 2048, 4096)


def pattern_mask(
    pattern: str,
    T: int,
    *,
    window: int = 4,
    dilation: int = 2,
    stride: int = 8,
    num_globals: int = 1,
    random_blocks: int = 1,
    block_size: int = 8,
    causal: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """The ``(T, T)`` mask of one gallery pattern, built by the library's mask builders.

    ``window``: local and dilated windows and the local part of global+local. ``dilation``: the
    dilated pattern. ``stride``: strided and fixed (Sparse Transformers). ``num_globals``: global
    tokens of global+local (the first ones, like a CLS token) and global blocks of BigBird.
    ``random_blocks`` and ``block_size``: BigBird (window of 3 blocks) and "block", a
    block-diagonal layout plus ``random_blocks`` random blocks per row (both seeded by ``seed``).
    """
    check_choice(pattern, "pattern", PATTERNS)
    T = check_int(T, "T", min=1)
    window = check_int(window, "window", min=1)
    dilation = check_int(dilation, "dilation", min=1)
    stride = check_int(stride, "stride", min=1)
    num_globals = check_int(num_globals, "num_globals", min=0)
    random_blocks = check_int(random_blocks, "random_blocks", min=0)
    block_size = check_int(block_size, "block_size", min=1)
    check_bool(causal, "causal")
    if pattern == "window":
        return sliding_window_mask(T, window, causal=causal)
    if pattern == "dilated":
        return dilated_mask(T, window, dilation, causal=causal)
    if pattern in ("strided", "fixed"):
        return strided_mask(T, stride, pattern=pattern, causal=causal)
    if pattern == "global+local":
        return global_local_mask(T, window, list(range(min(num_globals, T))), causal=causal)
    if pattern == "bigbird":
        return bigbird_mask(
            T, block_size, global_blocks=num_globals, random_blocks=random_blocks, causal=causal, seed=seed
        )
    layout = bigbird_layout(
        -(-T // block_size),
        window_blocks=1,
        global_blocks=0,
        random_blocks=random_blocks,
        causal=causal,
        seed=seed,
    )
    mask = block_sparse_mask(layout, block_size, T, T)
    return mask & torch.ones(T, T, dtype=torch.bool).tril() if causal else mask


def pattern_cost(
    mask: torch.Tensor, *, heads: int = 8, head_dim: int = 64, bytes_per_score: int = 4
) -> dict[str, float | int]:
    """Estimated cost of one attention layer with ``mask``: dense vs a kernel that skips masked pairs.

    FLOPs are the two matmuls (``2 (D + D_v)`` per computed pair, as in :func:`mask_stats`) over all
    heads; score memory is the scores a kernel holds at once (dense: ``T x S`` per head; a
    skipping kernel: the allowed pairs only, its block padding ignored). A masked dense kernel
    costs exactly what dense costs, plus the mask itself (one byte per pair). The time ratio is
    the FLOP ratio: what an ideal skipping kernel would save, an upper bound on real savings.
    """
    heads = check_int(heads, "heads", min=1)
    head_dim = check_int(head_dim, "head_dim", min=1)
    bytes_per_score = check_int(bytes_per_score, "bytes_per_score", min=1)
    check_tensor(mask, "mask", ndim=2, dtype=torch.bool)
    # mask_stats would also count layers to connect, O(T^3 log T): too slow at T = 4096.
    T, S = mask.shape
    allowed = int(mask.sum())
    per_pair = 2 * (head_dim + head_dim)
    return {
        "T": T,
        "density": allowed / (T * S),
        "dense_flops": per_pair * T * S * heads,
        "sparse_flops": per_pair * allowed * heads,
        "time_ratio": allowed / (T * S),
        "dense_score_bytes": T * S * heads * bytes_per_score,
        "mask_bytes": T * S,
        "sparse_score_bytes": allowed * heads * bytes_per_score,
    }


def reach_curve(mask: torch.Tensor, max_layers: int = 16) -> list[float]:
    """Fraction of the reachable pairs covered after 1, 2, ... layers (stops once it reaches 1).

    The reachable pairs are all pairs for a mask that looks ahead and ``j <= i`` for a causal one,
    as in :func:`course_lib.sparse.layers_to_connect`.
    """
    max_layers = check_int(max_layers, "max_layers", min=1)
    target = torch.ones_like(mask) if bool(mask.triu(1).any()) else torch.ones_like(mask).tril()
    one_layer = reachability(mask, 1).float()
    reach = one_layer
    curve = [float(((reach > 0) & target).sum()) / float(target.sum())]
    while curve[-1] < 1.0 and len(curve) < max_layers:
        reach = ((reach @ one_layer) > 0).float()  # one more layer: reachability(mask, len(curve) + 1)
        curve.append(float(((reach > 0) & target).sum()) / float(target.sum()))
    return curve


def mask_explorer_view(
    pattern: str = "bigbird",
    window: int = 4,
    dilation: int = 2,
    stride: int = 8,
    num_globals: int = 1,
    random_blocks: int = 1,
    block_size: int = 8,
    causal: bool = False,
    T_view: int = 64,
    T_cost: int = 4096,
    *,
    draw: bool = True,
) -> dict:
    """One pattern drawn at ``T_view`` (mask, layers to connect, reach per layer), costed at ``T_cost``.

    Returns ``mask`` (the ``T_view`` mask), ``stats`` (:class:`~course_lib.sparse.MaskStats` at
    ``T_view``), ``reach`` (:func:`reach_curve`), ``cost`` (:func:`pattern_cost` at ``T_cost``,
    8 heads of 64 dims in float32) and ``html`` (the numbers as a table).
    """
    T_view = check_int(T_view, "T_view", min=2, max=256)
    T_cost = check_int(T_cost, "T_cost", min=2, max=8192)
    params = dict(
        window=window,
        dilation=dilation,
        stride=stride,
        num_globals=num_globals,
        random_blocks=random_blocks,
        block_size=block_size,
        causal=causal,
    )
    mask = pattern_mask(pattern, T_view, **params)
    stats = mask_stats(mask)
    reach = reach_curve(mask)
    cost = pattern_cost(pattern_mask(pattern, T_cost, **params))
    layers = "never" if stats.layers_to_connect is None else str(stats.layers_to_connect)
    html = (
        f"<b>{pattern}</b> at T={T_view}: {stats.density:.1%} of pairs kept, layers to connect all "
        f"pairs: {layers}.<br><b>Estimated cost of one layer at T={T_cost}</b> (8 heads, D=64, float32):"
        "<table><tr><th>kernel</th><th>GFLOP</th><th>score memory</th></tr>"
        f"<tr><td>dense</td><td>{cost['dense_flops'] / 1e9:.2f}</td>"
        f"<td>{format_bytes(cost['dense_score_bytes'])}</td></tr>"
        f"<tr><td>dense + mask</td><td>{cost['dense_flops'] / 1e9:.2f}</td>"
        f"<td>{format_bytes(cost['dense_score_bytes'])} + {format_bytes(cost['mask_bytes'])} mask</td></tr>"
        f"<tr><td>skipping kernel</td><td>{cost['sparse_flops'] / 1e9:.2f}</td>"
        f"<td>{format_bytes(cost['sparse_score_bytes'])}</td></tr></table>"
        f"Ideal time vs dense: {cost['time_ratio']:.1%} (density {cost['density']:.1%} at T={T_cost})."
    )
    view = {"mask": mask, "stats": stats, "reach": reach, "cost": cost, "html": html}
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((10, 4.2))
            left, right = figure.subplots(1, 2)
            plot_mask(mask, ax=left, title=f"{pattern}, T={T_view}")
            right.plot(range(1, len(reach) + 1), reach, marker="o")
            right.set_ylim(0, 1.05)
            right.set_xlabel("layers stacked")
            right.set_ylabel("fraction of pairs connected")
            right.set_title(f"layers to connect all pairs: {layers}")
            figure.tight_layout()
            show(figure)
        view["figure"] = figure
    return view


def mask_explorer() -> widgets.Widget:
    """Pattern and its knobs -> the mask, density, layers to connect, and cost vs dense at a chosen T."""
    out = widgets.HTML()

    def update(**controls) -> dict:
        view = mask_explorer_view(**controls)
        out.value = view["html"]
        return view

    controls = widgets.interactive(
        update,
        pattern=widgets.Dropdown(options=PATTERNS, value="bigbird", description="pattern"),
        window=widgets.IntSlider(value=4, min=1, max=32, description="window"),
        dilation=widgets.IntSlider(value=2, min=1, max=8, description="dilation"),
        stride=widgets.IntSlider(value=8, min=1, max=32, description="stride"),
        num_globals=widgets.IntSlider(value=1, min=0, max=8, description="globals"),
        random_blocks=widgets.IntSlider(value=1, min=0, max=4, description="random blocks"),
        block_size=widgets.IntSlider(value=8, min=1, max=32, description="block size"),
        causal=widgets.Checkbox(value=False, description="causal"),
        T_view=widgets.SelectionSlider(options=[16, 32, 64, 128], value=64, description="T shown"),
        T_cost=widgets.SelectionSlider(options=list(COST_LENGTHS), value=4096, description="T costed"),
        draw=widgets.fixed(True),
    )
    box = widgets.VBox([controls, out])
    box.interactive = controls  # for tests and for readers who want the result
    return widen_labels(box)


# --- (b) eviction explorer --------------------------------------------------------------------


def _masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA in float32 with a bool mask (True = may attend); every row here sees at least itself."""
    q, k, v = (x.float() for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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

    @cached_property
    def _decode_visible(self) -> torch.Tensor:
        """``(new_tokens, T)``: new token ``i`` sees positions up to ``cache_len + i``."""
        T = self.q.shape[2]
        return torch.arange(T)[None, :] <= self.cache_len + torch.arange(T - self.cache_len)[:, None]

    @cached_property
    def _full_output(self) -> torch.Tensor:
        return _masked_sdpa(*self.decode, self._decode_visible)

    def error(self, keep: torch.Tensor) -> float:
        """Relative error ``||o_kept - o_full|| / ||o_full||`` of the new tokens' attention outputs.

        The same number as :func:`course_lib.sparse.eviction_error` (the tests check it), through
        SDPA with a mask and with the full output computed once: the study calls this 48 times.
        """
        kept = keep_mask(self.decode_keep(keep), self.q.shape[2])  # (B, H, T)
        output = _masked_sdpa(*self.decode, self._decode_visible & kept[:, :, None, :])
        full = self._full_output
        return float(torch.linalg.vector_norm(output - full) / torch.linalg.vector_norm(full))

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
        group = q.shape[1] // k.shape[1]  # SDPA is ~5x faster here than the course's masked softmax
        return _masked_sdpa(q, repeat_kv(k, group), repeat_kv(v, group), masks[index])

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
SOURCES = ("trained, layer 0", "trained, layer 1", "synthetic")


@cache
def _trained() -> TrainedDecoding:
    """The explorer's held-out windows through the trained model, built once (never modified)."""
    return trained_decoding()


@cache
def _source(source: str) -> DecodingAttention:
    """The explorer's decoder for ``source``, built once (its tensors are never modified)."""
    if source == "synthetic":
        return synthetic_decoding_attention()
    return _trained().layers[int(source.rsplit(" ", 1)[1])]


@cache
def _default_curves(source: str, num_sinks: int) -> dict[str, tuple[float, ...]]:
    """The explorer's error curves (they depend only on the source and the sinks), computed once each."""
    curves = eviction_curves(_source(source), EVICTION_BUDGETS, num_sinks=num_sinks)
    return {policy: tuple(errors) for policy, errors in curves.items()}


def trained_eviction_study(num_sinks: int = 4) -> EvictionStudy:
    """:func:`eviction_study` at :data:`EVICTION_BUDGETS` on the default :func:`trained_decoding`.

    Computed once per process and ``num_sinks`` (the explorer and the notebook share it).
    """
    return _trained_study(check_int(num_sinks, "num_sinks", min=0))


@cache
def _trained_study(num_sinks: int) -> EvictionStudy:
    return eviction_study(_trained(), EVICTION_BUDGETS, num_sinks=num_sinks)


def eviction_explorer_view(
    policy: str = "streaming",
    budget: int = 32,
    num_sinks: int = 4,
    source: str = SOURCES[0],
    *,
    draw: bool = True,
) -> dict:
    """Kept cache entries, output error and (for the trained model) loss of ``policy`` at ``budget``.

    ``source``: a layer of the trained model on held-out text (:func:`trained_decoding`, cache of
    256, 64 new tokens, 16 windows) or the synthetic stand-in (:func:`synthetic_decoding_attention`).
    Returns ``keep`` (indices; per key/value head for H2O), ``kept`` (a ``(H_kv, cache_len)`` bool
    map, first window), ``error`` (relative error of the new tokens' outputs vs the full cache),
    ``curves`` (every policy at the budgets :data:`EVICTION_BUDGETS`), ``attention`` (the weight each
    cache entry receives from the new tokens, averaged) and, for the trained model, ``loss`` (next-
    token loss with every layer evicted by ``policy`` at ``budget``), ``full_loss`` and ``losses``
    (every policy at :data:`EVICTION_BUDGETS`); these three are None for the synthetic source.
    """
    check_choice(source, "source", SOURCES)
    data = _source(source)
    check_choice(policy, "policy", POLICIES)
    budget = check_int(budget, "budget", min=1, max=data.cache_len)
    num_sinks = check_int(num_sinks, "num_sinks", min=0)
    keep = policy_keep(policy, data, budget, num_sinks=num_sinks)
    H_kv = data.k.shape[1]
    kept = keep_mask(keep.expand(data.k.shape[0], H_kv, keep.shape[-1])[0], data.cache_len)
    error = data.error(keep)
    curves = {name: list(errors) for name, errors in _default_curves(source, num_sinks).items()}
    view = {"keep": keep, "kept": kept, "error": error, "curves": curves, "attention": data.received}
    view["loss"] = view["full_loss"] = view["losses"] = None
    if source != "synthetic":
        decoding = _trained()
        keeps = [policy_keep(policy, layer, budget, num_sinks=num_sinks) for layer in decoding.layers]
        study = trained_eviction_study(num_sinks)
        view.update(loss=evicted_loss(decoding, keeps), full_loss=study.full_loss, losses=study.losses)
    if draw:
        view["figure"] = _draw_eviction(view, policy, budget, source, data.cache_len)
    return view


def _draw_eviction(view: dict, policy: str, budget: int, source: str, cache_len: int):
    with plt.rc_context(STYLE):
        panels = 2 if view["loss"] is None else 3
        figure = new_figure((5.2 * panels, 4))
        axes = figure.subplots(1, panels)
        positions = torch.arange(cache_len)
        received, share = view["attention"], view["kept"].float().mean(0)
        axes[0].plot(positions, received, linewidth=1, color="grey", label="attention received")
        axes[0].scatter(positions[share > 0], received[share > 0], s=10, label="kept (any head)")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("cache position")
        axes[0].set_ylabel("mean weight from new tokens")
        axes[0].set_title(f"{source}: {policy}, budget {budget}")
        axes[0].legend(frameon=False)
        for name, errors in view["curves"].items():
            axes[1].plot(EVICTION_BUDGETS, errors, marker="o", label=name)
        axes[1].scatter([budget], [view["error"]], s=80, facecolors="none", edgecolors="black", zorder=3)
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("budget (cache entries kept)")
        axes[1].set_ylabel("relative output error")
        axes[1].set_title(f"error {view['error']:.3f} (cache of {cache_len})")
        axes[1].legend(frameon=False)
        if view["loss"] is not None:
            for name, losses in view["losses"].items():
                axes[2].plot(
                    EVICTION_BUDGETS, [x - view["full_loss"] for x in losses], marker="o", label=name
                )
            increase = view["loss"] - view["full_loss"]
            axes[2].scatter([budget], [increase], s=80, facecolors="none", edgecolors="black", zorder=3)
            axes[2].set_xscale("log", base=2)
            axes[2].set_xlabel("budget (every layer)")
            axes[2].set_ylabel("loss increase (nats per character)")
            axes[2].set_title(f"loss {view['loss']:.3f} vs {view['full_loss']:.3f} with the full cache")
            axes[2].legend(frameon=False)
        figure.tight_layout()
        show(figure)
    return figure


def eviction_explorer() -> widgets.Widget:
    """Source, policy, budget and sinks -> kept tokens, the output error and the loss vs the full cache."""
    return widgets.interactive(
        eviction_explorer_view,
        policy=widgets.Dropdown(options=POLICIES, value="streaming", description="policy"),
        budget=widgets.SelectionSlider(options=[4, 8, 16, 32, 64, 128, 256], value=32, description="budget"),
        num_sinks=widgets.IntSlider(value=4, min=0, max=8, description="sinks"),
        source=widgets.Dropdown(options=SOURCES, value=SOURCES[0], description="attention"),
        draw=widgets.fixed(True),
    )


# --- (c) measured time and memory ---------------------------------------------------------------

TIMING_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)


def sparse_timing_view(
    max_T: int = 2048,
    *,
    window: int = 256,
    min_run_time: float = 0.05,
    methods: tuple[str, ...] | None = None,
    draw: bool = True,
) -> dict:
    """Measure the ``sparse`` benchmark suite from 256 up to ``max_T`` and plot time and memory.

    Uses :func:`course_lib.benchmarks.ch05.sparse_suite` (one sequence, 8 heads, D=64, causal
    window ``window``) through :func:`course_lib.bench.sweep`. ``methods`` picks a subset of the
    suite (default: all). Returns ``results`` (measurements), ``lengths`` and ``table``.
    """
    from ..benchmarks.ch05 import sparse_suite

    max_T = check_int(max_T, "max_T", min=TIMING_LENGTHS[1], max=TIMING_LENGTHS[-1])
    min_run_time = check_float(min_run_time, "min_run_time", min=0.0, min_open=True)
    suite, reference, _ = sparse_suite("cpu", window=window)
    chosen = list(suite) if methods is None else [check_choice(m, "methods", suite) for m in methods]
    lengths = [T for T in TIMING_LENGTHS if T <= max_T]
    results: list[Measurement] = sweep(
        {m: suite[m] for m in chosen}, lengths, min_run_time=min_run_time, progress=False
    )
    table = format_table(results, reference=reference if reference in chosen else None)
    view = {"results": results, "lengths": lengths, "table": table}
    if draw:
        with plt.rc_context(STYLE):
            figure = new_figure((11, 4))
            axes = figure.subplots(1, 2)

            def series(field: str) -> dict[str, list]:
                return {m: [getattr(r, field) for r in results if r.method == m] for m in chosen}

            plot_scaling(lengths, series("seconds"), ylabel="seconds per call", ax=axes[0], title="time")
            plot_scaling(
                lengths,
                series("peak_bytes"),
                ylabel="peak bytes above baseline",
                ax=axes[1],
                title="peak memory",
            )
            figure.tight_layout()
            show(figure)
        view["figure"] = figure
    return view


def sparse_timing() -> widgets.Widget:
    """A max-T slider and a button: measure and plot dense-masked vs banded vs SDPA (seconds)."""
    max_T = widgets.SelectionSlider(options=list(TIMING_LENGTHS[1:]), value=1024, description="max T")
    button = widgets.Button(description="measure")
    out = widgets.Output()
    box = widgets.VBox([widgets.HBox([max_T, button]), out])
    box.result = None

    def run(_=None) -> None:
        out.clear_output()
        with out:
            view = sparse_timing_view(max_T.value)
            print(view["table"])
        box.result = view

    button.on_click(run)
    box.max_T, box.button = max_T, button  # for tests
    return box
