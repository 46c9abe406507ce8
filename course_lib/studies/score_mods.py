"""Chapter 03's score modifications computed tile by tile, what each way of adding positions costs a
tiled kernel, and the SageAttention2 comparison: what the chapter's explorer, its figure and its
notebook all show, computed here, drawn by the leaves above."""

from __future__ import annotations

import torch

from ..checks import check_bool, check_choice, check_int
from ..relative_positions import t5_score_mod
from ..standard import attention
from ..tiling import (
    ScoreMod,
    alibi_score_mod,
    attention_error,
    flash_attention,
    outlier_qkv,
    quantized_attention,
    sage2_attention,
    soft_cap_score_mod,
    tile_schedule,
)

__all__ = [
    "SCORE_MOD_KINDS",
    "MOD_HEADS",
    "MOD_HEAD_DIM",
    "SOFT_CAP",
    "T5_BUCKETS",
    "T5_MAX_DISTANCE",
    "t5_example_table",
    "score_mod_for",
    "score_mod_inputs",
    "score_mod_tiles",
    "score_mod_costs",
    "SAGE_VARIANTS",
    "sage_comparison",
    "accumulation_errors",
]

# --- score modifications, tile by tile ---------------------------------------------------------------

SCORE_MOD_KINDS = ("ALiBi", "T5 buckets", "soft cap")
MOD_HEADS = 4
MOD_HEAD_DIM = 8
SOFT_CAP = 3.0
T5_BUCKETS, T5_MAX_DISTANCE = 16, 32


def t5_example_table(num_heads: int = MOD_HEADS) -> torch.Tensor:
    """A T5 table shaped like a trained one: each head's bias falls with the bucket (far keys count
    less), steeper for later heads, plus a little seeded noise. ``(T5_BUCKETS, num_heads)``."""
    generator = torch.Generator().manual_seed(5)
    buckets = torch.arange(T5_BUCKETS, dtype=torch.float64) % (T5_BUCKETS // 2)
    slope = 0.25 * torch.arange(1, num_heads + 1, dtype=torch.float64)
    noise = 0.1 * torch.randn(T5_BUCKETS, num_heads, generator=generator, dtype=torch.float64)
    return -torch.log1p(buckets).unsqueeze(1) * slope + noise


def score_mod_for(kind: str, T: int, S: int | None = None, *, causal: bool = True) -> ScoreMod:
    """The example score modification ``kind`` of :data:`SCORE_MOD_KINDS` for T queries and S keys.

    ALiBi with :data:`MOD_HEADS` heads, T5's buckets (causal buckets when ``causal``, else
    bidirectional) with :func:`t5_example_table`, or a soft cap of :data:`SOFT_CAP`; queries are
    aligned to the end of the keys.
    """
    check_choice(kind, "kind", SCORE_MOD_KINDS)
    T = check_int(T, "T", min=1)
    S = T if S is None else check_int(S, "S", min=1)
    if kind == "ALiBi":
        return alibi_score_mod(MOD_HEADS, offset=S - T)
    if kind == "T5 buckets":
        return t5_score_mod(
            t5_example_table(), bidirectional=not causal, max_distance=T5_MAX_DISTANCE, offset=S - T
        )
    return soft_cap_score_mod(SOFT_CAP)


def score_mod_inputs(seq_len: int) -> tuple[torch.Tensor, ...]:
    """Seeded ``(1, MOD_HEADS, seq_len, MOD_HEAD_DIM)`` q, k, v in float64 (scores spread out)."""
    generator = torch.Generator().manual_seed(4)
    shape = (1, MOD_HEADS, seq_len, MOD_HEAD_DIM)
    return tuple(2 * torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))


def score_mod_tiles(
    kind: str = "ALiBi",
    head: int = 0,
    seq_len: int = 16,
    block: int = 4,
    causal: bool = True,
    tile: int = 0,
) -> dict:
    """What a score modification adds, computed one tile at a time as the kernel does.

    Walks the FA2 schedule of ``seq_len`` queries and keys in ``block x block`` tiles, calls the
    modification on each tile's scores with that tile's indices, and assembles ``change =
    modified - raw`` for ``head`` (for display only: the kernel never holds it whole). Returns the
    ``(T, T)`` change (NaN where causal masks), the current ``tile``'s change against the distance
    ``j - i``, whether the change is a function of the positions alone (the same for other scores:
    true for ALiBi and T5, false for the soft cap), and how far ``flash_attention`` with the mod
    is from dense attention with the same modification applied to the whole matrix.
    """
    check_choice(kind, "kind", SCORE_MOD_KINDS)
    head = check_int(head, "head", min=0, max=MOD_HEADS - 1)
    T = check_int(seq_len, "seq_len", min=1)
    block = check_int(block, "block", min=1)
    check_bool(causal, "causal")
    tile = check_int(tile, "tile", min=0)
    q, k, v = score_mod_inputs(T)
    mod = score_mod_for(kind, T, causal=causal)
    scale = MOD_HEAD_DIM**-0.5
    schedule = tile_schedule(T, T, block_q=block, block_k=block, causal=causal)
    batch, heads = torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(MOD_HEADS).view(1, -1, 1, 1)
    other = torch.randn(1, MOD_HEADS, T, T, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    change = torch.full((T, T), float("nan"), dtype=torch.float64)
    raw_scores = torch.full((T, T), float("nan"), dtype=torch.float64)
    positions_only = True
    for step in schedule:
        if step.visibility == "none":
            continue
        rows, cols = slice(*step.q_rows), slice(*step.k_rows)
        query = torch.arange(*step.q_rows).view(1, 1, -1, 1)
        key = torch.arange(*step.k_rows).view(1, 1, 1, -1)
        raw = (q[:, :, rows] @ k[:, :, cols].transpose(-2, -1)) * scale
        added = mod(raw, batch, heads, query, key) - raw
        # The same positions with other scores: a bias of (i, j) adds the same amount.
        added_other = mod(other[:, :, rows, cols], batch, heads, query, key) - other[:, :, rows, cols]
        positions_only = positions_only and torch.allclose(added, added_other)
        change[rows, cols] = added[0, head]
        raw_scores[rows, cols] = raw[0, head]
    if causal:
        above = torch.ones(T, T, dtype=torch.bool).triu(1)
        change, raw_scores = (
            change.masked_fill(above, float("nan")),
            raw_scores.masked_fill(above, float("nan")),
        )
    # Dense reference: the modification applied once to the whole T x T matrix.
    scores = mod((q @ k.transpose(-2, -1)) * scale, batch, heads, torch.arange(T).view(1, 1, T, 1),
                 torch.arange(T).view(1, 1, 1, T))  # fmt: skip
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    dense = torch.softmax(scores, dim=-1) @ v
    out = flash_attention(q, k, v, causal=causal, block_q=block, block_k=block, score_mod=mod)
    current = schedule[min(tile, len(schedule) - 1)]
    (q0, q1), (k0, k1) = current.q_rows, current.k_rows
    distance = torch.arange(k0, k1).view(1, -1) - torch.arange(q0, q1).view(-1, 1)
    view = {
        "kind": kind,
        "change": change,
        "tile": current,
        "tile_index": min(tile, len(schedule) - 1),
        "num_tiles": len(schedule),
        "tile_change": change[q0:q1, k0:k1],
        "tile_distance": distance,
        "tile_scores": raw_scores[q0:q1, k0:k1],
        "raw_scores": raw_scores,
        "positions_only": positions_only,
        "output_error": (out - dense).abs().max().item(),
    }
    return view


def score_mod_costs(
    T: int,
    S: int | None = None,
    *,
    head_dim: int = 64,
    block_q: int = 128,
    num_buckets: int = 32,
    shaw_max_distance: int = 16,
) -> list[dict]:
    """What each way of adding position information to the scores costs a tiled kernel, per head.

    One row per scheme: ``name``; ``score_mod`` (it is a modification of the score computable
    inside a tile from the indices and a few parameters); ``extra_elements``: elements moved
    between HBM and the chip besides Q, K, V and O in the forward pass; ``stored``: elements kept
    in memory for it; ``note``. A dense ``T x S`` bias is read tile by tile (every element once);
    T5's table column is read once per Q block; Shaw's key term needs the ``(T, 2k + 1)`` table
    of ``q . a^K`` written and read back; Shaw's value term is not a score modification at all:
    it adds an accumulator of ``2k + 1`` weight sums per query row, rescaled like O.
    """
    T = check_int(T, "T", min=1)
    S = T if S is None else check_int(S, "S", min=1)
    head_dim = check_int(head_dim, "head_dim", min=1)
    block_q = check_int(block_q, "block_q", min=1)
    num_buckets = check_int(num_buckets, "num_buckets", min=1)
    distances = 2 * check_int(shaw_max_distance, "shaw_max_distance", min=0) + 1
    q_blocks = -(-T // block_q)
    rows = [
        ("none", True, 0, 0, "plain attention"),
        ("ALiBi", True, 1, 1, "one slope per head; -slope * |i - j| from the indices"),
        ("soft cap", True, 0, 0, "cap * tanh(s / cap): one tanh per score (and its derivative backward)"),
        ("T5 buckets", True, q_blocks * num_buckets, num_buckets,
         "table[bucket(j - i), h]: a table column per Q block"),
        ("dense T x S bias", False, T * S, T * S, "a tile of the bias read for every tile of scores"),
        ("Shaw, key term", False, 2 * T * distances + distances * head_dim,
         T * distances + distances * head_dim, "q . a^K for the 2k+1 distances written, then read per tile"),
        ("Shaw, value term", False, q_blocks * distances * head_dim, distances * head_dim,
         "an extra (rows, 2k+1) accumulator of weights per distance, rescaled like O"),
    ]  # fmt: skip
    return [
        {"name": name, "score_mod": mod, "extra_elements": moved, "stored": stored, "note": note}
        for name, mod, moved, stored, note in rows
    ]


# --- SageAttention2 against FlashAttention and SageAttention -----------------------------------------

SAGE_VARIANTS = (
    "FlashAttention (fp32)",
    "SageAttention: INT8 QK, K smoothed",
    "SageAttention with INT4 QK",
    "INT4 per thread, K smoothed",
    "INT4 per thread, Q and K smoothed",
    "SageAttention2-4b (+ FP8 PV, two-level)",
    "SageAttention2-8b",
)


def sage_comparison(T: int = 512, *, num_heads: int = 4, head_dim: int = 64, seed: int = 0) -> dict:
    """Errors of FlashAttention, SageAttention and SageAttention2's steps against float64 attention.

    Inputs from :func:`course_lib.tiling.outlier_qkv` (channel offsets and outlier channels, as in
    real Q and K), ``T`` queries and keys. Returns ``{variant: AttentionError}`` in the order of
    :data:`SAGE_VARIANTS`: each SageAttention2 row adds one step of the paper to the one above.
    """
    T = check_int(T, "T", min=1)
    q, k, v = outlier_qkv(1, num_heads, T, T, head_dim, seed=seed)
    exact = attention(q.double(), k.double(), v.double())
    variants = {
        SAGE_VARIANTS[0]: lambda: flash_attention(q, k, v),
        SAGE_VARIANTS[1]: lambda: quantized_attention(q, k, v, bits=8, smooth_k=True),
        SAGE_VARIANTS[2]: lambda: quantized_attention(q, k, v, bits=4, smooth_k=True),
        SAGE_VARIANTS[3]: lambda: sage2_attention(q, k, v, smooth_q=False, pv_format="full"),
        SAGE_VARIANTS[4]: lambda: sage2_attention(q, k, v, pv_format="full"),
        SAGE_VARIANTS[5]: lambda: sage2_attention(q, k, v),
        SAGE_VARIANTS[6]: lambda: sage2_attention(q, k, v, bits=8),
    }
    return {name: attention_error(run(), exact) for name, run in variants.items()}


def accumulation_errors(
    lengths: tuple[int, ...] = (512, 2048, 8192), *, queries: int = 32, head_dim: int = 64, seed: int = 3
) -> dict[str, list[float]]:
    """Relative L1 error of SageAttention2's FP8 ``P V`` accumulators against an ideal FP32 one.

    Same quantisation for all three; ``queries`` queries against each of ``lengths`` keys. Returns
    ``{"two_level": [...], "fp22": [...]}``, one value per length: one FP22 accumulator over the
    whole row drifts as S grows, FP22 within a key block and FP32 across blocks does not.
    """
    errors: dict[str, list[float]] = {"two_level": [], "fp22": []}
    for S in lengths:
        q, k, v = outlier_qkv(1, 2, queries, check_int(S, "lengths", min=1), head_dim, seed=seed)
        ideal = sage2_attention(q, k, v, bits=8, accumulation="fp32")
        for accumulation in errors:
            approximate = sage2_attention(q, k, v, bits=8, accumulation=accumulation)
            errors[accumulation].append(attention_error(approximate, ideal).relative_l1)
    return errors
