"""Chapter 01: learned relative positions, Shaw et al.'s vectors and T5's bucketed bias.

Sinusoidal and learned absolute positions tell a token *where it is*; RoPE and ALiBi (in
:mod:`course_lib.standard`) make the score depend on *how far apart* query and key are. The two
schemes here learn that dependence instead of fixing it:

- Shaw, Uszkoreit and Vaswani (2018), "Self-Attention with Relative Position Representations":
  one learned vector per clipped distance ``clip(j - i, -k, k)``, added to the key inside the
  score and to the value in the weighted sum:
  ``e_ij = q_i . (k_j + a^K_ij) * scale``, ``o_i = sum_j p_ij (v_j + a^V_ij)``.
- Raffel et al. (2020), T5: one learned *scalar* per head and distance bucket, added to the
  score. Near distances get a bucket each; far ones share log-spaced buckets; every distance
  beyond ``max_distance`` falls in the last bucket.

Last, :func:`position_schemes` puts all of them side by side: parameters, extra work, whether a
fused (tiled) kernel can compute the term from the positions ``(i, j)`` alone, and what happens
beyond the training length. Query positions are aligned to the end of the keys, as everywhere
in the course: query ``i`` of ``T`` sits at position ``S - T + i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .checks import (
    check_attention_inputs,
    check_bool,
    check_choice,
    check_int,
    check_like,
    check_mask,
    check_tensor,
    compute_dtype,
    resolve_scale,
)
from .standard import masked_softmax

__all__ = [
    "relative_distance_index",
    "shaw_attention",
    "ShawRelativePositions",
    "t5_buckets",
    "t5_bias",
    "t5_score_mod",
    "T5RelativeBias",
    "PositionScheme",
    "position_schemes",
    "untrained_position_fraction",
]


def _relative_positions(T: int, S: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(T, S)`` key position minus query position, queries aligned to the end of the keys."""
    query_positions = torch.arange(T, device=device).unsqueeze(1) + (S - T)
    key_positions = torch.arange(S, device=device).unsqueeze(0)
    return key_positions - query_positions


# --- Shaw et al. (2018): learned vectors per clipped distance ------------------------------------


def relative_distance_index(
    T: int, S: int | None = None, *, max_distance: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``(T, S)`` row of Shaw's tables for each pair: ``clip(j - i, -k, k) + k`` in ``[0, 2k]``.

    ``k = max_distance``; every pair farther apart than ``k`` shares the first or the last row.
    """
    T = check_int(T, "T", min=0)
    S = T if S is None else check_int(S, "S", min=0)
    max_distance = check_int(max_distance, "max_distance", min=0)
    relative = _relative_positions(T, S, device)
    return relative.clamp(-max_distance, max_distance) + max_distance


def _check_table(table: object, name: str, width: int, width_name: str) -> torch.Tensor:
    check_tensor(table, name, ndim=2, floating=True)
    assert isinstance(table, torch.Tensor)
    rows = table.shape[0]
    if rows % 2 == 0:
        raise ValueError(f"{name} must have an odd number of rows 2k + 1, got shape {tuple(table.shape)}")
    if table.shape[1] != width:
        raise ValueError(f"{name} must have {width} columns = {width_name}, got shape {tuple(table.shape)}")
    return table


def shaw_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_table: torch.Tensor,
    value_table: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention with Shaw et al.'s relative position vectors on keys and (optionally) values.

    ``e_ij = scale * q_i . (k_j + a^K[r_ij])``, ``o_i = sum_j p_ij (v_j + a^V[r_ij])`` with
    ``r_ij = clip(j - i, -k, k) + k`` (:func:`relative_distance_index`).

    Naively ``a^K[r_ij]`` is a ``(T, S, D)`` tensor. The paper's trick, used here: ``q_i . a^K[r]``
    takes only ``2k + 1`` values per query, so compute ``q @ key_table^T`` once, ``(B, H, T, 2k+1)``,
    and look each pair's entry up. For the values, first add up the weights that fall on each
    distance (``(B, H, T, 2k+1)``), then multiply by ``value_table`` once.

    Args:
        q: ``(B, H, T, D)``; k: ``(B, H, S, D)``; v: ``(B, H, S, D_v)``.
        key_table: ``(2k + 1, D)``, row ``r`` for distance ``r - k``; shared by batch and heads,
            as in the paper.
        value_table: ``(2k + 1, D_v)`` or None (keys only).
        mask: bool, broadcastable to ``(B, H, T, S)``; True = may attend.
        causal: query ``i`` sees keys up to ``S - T + i``.
        scale: multiplies the scores (with the position term); defaults to ``D ** -0.5``.

    Returns ``(B, H, T, D_v)`` in the dtype of ``q``; a row with nothing to attend to is zero
    (its value term too, since all its weights are zero).
    """
    B, H, T, S, D, D_v = check_attention_inputs(q, k, v)
    key_table = _check_table(key_table, "key_table", D, "D")
    check_like(key_table, "key_table", q, dtype=False)
    if value_table is not None:
        value_table = _check_table(value_table, "value_table", D_v, "D_v")
        check_like(value_table, "value_table", q, dtype=False)
        if value_table.shape[0] != key_table.shape[0]:
            raise ValueError(
                f"value_table must have {key_table.shape[0]} rows like key_table, "
                f"got shape {tuple(value_table.shape)}"
            )
    check_bool(causal, "causal")
    scale = resolve_scale(scale, D)
    max_distance = (key_table.shape[0] - 1) // 2
    dtype = compute_dtype(q)
    if S == 0:  # no key at all: every row is empty, hence zero
        return q.new_zeros(B, H, T, D_v)

    index = relative_distance_index(T, S, max_distance=max_distance, device=q.device)
    index = index.expand(B, H, T, S)
    queries = q.to(dtype)
    content = queries @ k.to(dtype).transpose(-2, -1)  # (B, H, T, S)
    position = (queries @ key_table.to(dtype).T).gather(-1, index)  # (B, H, T, 2k+1) -> (B, H, T, S)
    scores = (content + position) * scale

    allowed = None
    if mask is not None:
        allowed = check_mask(mask, "mask", (B, H, T, S), device=q.device)
    if causal:
        future = _relative_positions(T, S, q.device) > 0
        allowed = ~future if allowed is None else allowed & ~future
    weights = masked_softmax(scores, allowed)

    out = weights @ v.to(dtype)
    if value_table is not None:
        # Sum the weights per distance row, then one small matmul instead of a (T, S, D_v) tensor.
        per_distance = weights.new_zeros(B, H, T, key_table.shape[0]).scatter_add(-1, index, weights)
        out = out + per_distance @ value_table.to(dtype)
    return out.to(q.dtype)


class ShawRelativePositions(nn.Module):
    """The learned tables of Shaw et al.: ``2 * max_distance + 1`` vectors for keys (and values).

    ``forward(q, k, v, mask=None, *, causal=False, scale=None)`` runs :func:`shaw_attention`.
    Parameters: ``(2k + 1) * (D + D_v)`` per layer (``(2k + 1) * D`` without the value table),
    shared across heads.
    """

    def __init__(
        self,
        head_dim: int,
        max_distance: int = 16,
        *,
        value_dim: int | None = None,
        values: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.head_dim = check_int(head_dim, "head_dim", min=1)
        self.max_distance = check_int(max_distance, "max_distance", min=0)
        value_dim = self.head_dim if value_dim is None else check_int(value_dim, "value_dim", min=1)
        check_bool(values, "values")
        rows = 2 * self.max_distance + 1
        self.key_table = nn.Parameter(torch.randn(rows, self.head_dim) * init_std)
        self.value_table = nn.Parameter(torch.randn(rows, value_dim) * init_std) if values else None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        causal: bool = False,
        scale: float | None = None,
    ) -> torch.Tensor:
        return shaw_attention(q, k, v, self.key_table, self.value_table, mask, causal=causal, scale=scale)


# --- T5: a learned scalar per head and distance bucket ---------------------------------------------


def _check_bucket_arguments(bidirectional: object, num_buckets: object, max_distance: object) -> tuple:
    check_bool(bidirectional, "bidirectional")
    num_buckets = check_int(num_buckets, "num_buckets", min=4 if bidirectional else 2)
    if bidirectional and num_buckets % 2:
        raise ValueError(f"num_buckets={num_buckets} must be even when bidirectional (half per direction)")
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    max_distance = check_int(max_distance, "max_distance", min=1)
    if max_distance <= max_exact:
        raise ValueError(
            f"max_distance={max_distance} must exceed the {max_exact} exact buckets "
            f"of num_buckets={num_buckets}"
        )
    return bidirectional, num_buckets, max_distance, max_exact


def t5_buckets(
    relative_position: torch.Tensor,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> torch.Tensor:
    """T5's bucket of each ``relative_position = key position - query position``.

    With ``bidirectional``, half of the buckets serve keys before the query and half keys after
    (offset ``num_buckets / 2``). In each half of ``n`` buckets, distances ``0 .. n/2 - 1`` get
    a bucket each; larger distances ``d`` get ``n/2 + floor(log(d / (n/2)) / log(max_distance /
    (n/2)) * (n - n/2))``, capped at ``n - 1``, so buckets widen geometrically and every distance
    from ``max_distance`` on shares the last one. Causal (``bidirectional=False``): keys after
    the query are put in bucket 0 (a causal mask hides them anyway).

    Returns a long tensor of the same shape, values in ``[0, num_buckets)``.
    """
    check_tensor(relative_position, "relative_position")
    if relative_position.is_floating_point() or relative_position.dtype == torch.bool:
        raise TypeError(f"relative_position must hold integers, got dtype {relative_position.dtype}")
    bidirectional, num_buckets, max_distance, max_exact = _check_bucket_arguments(
        bidirectional, num_buckets, max_distance
    )
    distance = -relative_position.long()  # how far back the key is
    bucket = torch.zeros_like(distance)
    if bidirectional:
        half = num_buckets // 2
        bucket = bucket + (distance < 0).long() * half
        distance = distance.abs()
    else:
        half = num_buckets
        distance = distance.clamp(min=0)
    # float64 so the bucket edges are those of the definition, not of float32 rounding.
    far = (
        max_exact
        + (
            torch.log(distance.double().clamp(min=1) / max_exact)
            / math.log(max_distance / max_exact)
            * (half - max_exact)
        ).long()
    )
    far = far.clamp(max=half - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


def t5_bias(
    table: torch.Tensor,
    T: int,
    S: int | None = None,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
) -> torch.Tensor:
    """The ``(H, T, S)`` score bias of T5: ``table[bucket(j - i), h]``.

    ``table`` is ``(num_buckets, H)``, e.g. the weight of :class:`T5RelativeBias`. The bias is
    added to the scores unscaled (pass it as ``bias=`` to :func:`course_lib.standard.attention`).
    """
    check_tensor(table, "table", ndim=2, floating=True)
    T = check_int(T, "T", min=0)
    S = T if S is None else check_int(S, "S", min=0)
    buckets = t5_buckets(
        _relative_positions(T, S, table.device),
        bidirectional=bidirectional,
        num_buckets=table.shape[0],
        max_distance=max_distance,
    )
    return table[buckets].permute(2, 0, 1)  # (T, S, H) -> (H, T, S)


def t5_score_mod(
    table: torch.Tensor, *, bidirectional: bool = True, max_distance: int = 128, offset: int = 0
) -> Callable[..., torch.Tensor]:
    """T5's bias as a score modification ``score_mod(score, batch, head, query_index, key_index)``.

    The signature of FlexAttention's ``score_mod``: the indices are integer tensors that broadcast
    against ``score``, so a tiled kernel can call it on one tile at a time and the ``T x S`` bias
    is never built. ``offset = S - T`` aligns the queries to the end of the keys.
    """
    check_tensor(table, "table", ndim=2, floating=True)
    offset = check_int(offset, "offset")
    _check_bucket_arguments(bidirectional, table.shape[0], max_distance)

    def score_mod(
        score: torch.Tensor,
        batch: torch.Tensor,
        head: torch.Tensor,
        query_index: torch.Tensor,
        key_index: torch.Tensor,
    ) -> torch.Tensor:
        bucket = t5_buckets(
            key_index - (query_index + offset),
            bidirectional=bidirectional,
            num_buckets=table.shape[0],
            max_distance=max_distance,
        )
        return score + table[bucket, head].to(score.dtype)

    return score_mod


class T5RelativeBias(nn.Module):
    """T5's learned relative bias: ``num_buckets * num_heads`` scalars (T5 shares one per model).

    ``forward(T, S=None)`` returns the ``(H, T, S)`` bias for any lengths, including lengths
    longer than any seen in training: distances past ``max_distance`` reuse the last bucket.
    """

    def __init__(
        self,
        num_heads: int,
        *,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.num_heads = check_int(num_heads, "num_heads", min=1)
        self.bidirectional, self.num_buckets, self.max_distance, _ = _check_bucket_arguments(
            bidirectional, num_buckets, max_distance
        )
        self.table = nn.Embedding(self.num_buckets, self.num_heads)
        nn.init.normal_(self.table.weight, std=init_std)

    def forward(self, T: int, S: int | None = None) -> torch.Tensor:
        return t5_bias(
            self.table.weight, T, S, bidirectional=self.bidirectional, max_distance=self.max_distance
        )

    def bias_by_distance(self, distances: torch.Tensor) -> torch.Tensor:
        """``(H, n)`` bias for keys ``distances`` tokens before the query (negative: after it)."""
        check_tensor(distances, "distances", ndim=1)
        buckets = t5_buckets(
            -distances.to(self.table.weight.device),
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.table.weight[buckets].T

    def score_mod(self, offset: int = 0) -> Callable[..., torch.Tensor]:
        """This bias as a tile-by-tile :func:`t5_score_mod`."""
        return t5_score_mod(
            self.table.weight, bidirectional=self.bidirectional, max_distance=self.max_distance, offset=offset
        )


# --- the schemes side by side ---------------------------------------------------------------------


@dataclass(frozen=True)
class PositionScheme:
    """What one way of encoding positions costs and allows.

    ``parameters``: learned numbers per layer (T5: per model, shared by its layers; learned
    absolute: per model, at the input). ``extra_flops``: work added per head for one ``T x S``
    attention (a multiply-add counts 2). ``positions_only``: the term added to the scores is a
    function of ``(head, i, j)`` alone, so a fused kernel computes it inside each tile from the
    indices. ``fused_kernel``: what a tiled kernel must do. ``beyond_training``: what happens
    at positions or distances never seen in training.
    """

    name: str
    parameters: int
    extra_flops: int
    positions_only: bool
    fused_kernel: str
    beyond_training: str


def position_schemes(
    *,
    num_heads: int,
    head_dim: int,
    max_len: int,
    shaw_max_distance: int = 16,
    t5_num_buckets: int = 32,
    t5_max_distance: int = 128,
) -> list[PositionScheme]:
    """The six schemes of chapter 01 for a layer of ``num_heads`` heads of ``head_dim``, at
    ``T = S = max_len`` (the extra FLOPs are per head)."""
    H = check_int(num_heads, "num_heads", min=1)
    D = check_int(head_dim, "head_dim", min=1)
    T = check_int(max_len, "max_len", min=1)
    k = check_int(shaw_max_distance, "shaw_max_distance", min=0)
    buckets = check_int(t5_num_buckets, "t5_num_buckets", min=2)
    check_int(t5_max_distance, "t5_max_distance", min=1)
    rows = 2 * k + 1
    table = [
        # name, parameters, extra FLOPs per head, positions only, in a fused kernel, beyond training
        ("sinusoidal", 0, 0, False, "nothing: added to the input embeddings",
         "defined at every position, but the model never saw the new ones"),
        ("learned absolute", T * H * D, 0, False, "nothing: added to the input embeddings",
         f"no row for positions >= {T}: cannot run longer"),
        ("RoPE", 0, 2 * 3 * T * D, False, "rotate q and k before the kernel (or as the tiles are loaded)",
         "new rotation angles: degrades past the training length unless rescaled"),
        ("ALiBi", 0, 2 * T * T, True, "add -slope_h * |i - j| inside each tile",
         "the same linear penalty keeps going: extrapolates"),
        ("T5 buckets", buckets * H, T * T, True, "add table[bucket(j - i), h] inside each tile",
         f"distances >= {t5_max_distance} share the last bucket: flat, extrapolates"),
        ("Shaw (keys and values)", rows * 2 * D, 2 * T * rows * D + 2 * T * T + 2 * T * rows * D, False,
         "key term: a (T, 2k+1) table of q . a^K first, then a lookup per tile; value term: an extra "
         "(T, 2k+1) accumulator of weights per distance, rescaled like the output",
         f"distances beyond {k} share the clipped vectors: extrapolates"),
    ]  # fmt: skip
    return [PositionScheme(*row) for row in table]


def untrained_position_fraction(
    scheme: str,
    train_length: int,
    eval_length: int,
    *,
    max_distance: int = 128,
    num_buckets: int = 32,
    bidirectional: bool = False,
) -> float:
    """Fraction of the causal (query, key) pairs at ``eval_length`` whose position parameter was
    never used at ``train_length`` (so never trained).

    ``scheme``: ``"learned absolute"`` (the key's position row), ``"shaw"`` (the clipped distance
    row, ``max_distance`` = k) or ``"t5"`` (the bucket). Parameter-free schemes have nothing
    untrained (their failure beyond the training length, if any, is of another kind).
    """
    check_choice(scheme, "scheme", ("learned absolute", "shaw", "t5"))
    train_length = check_int(train_length, "train_length", min=1)
    eval_length = check_int(eval_length, "eval_length", min=1)
    relative = _relative_positions(eval_length, eval_length)
    causal = relative <= 0
    if scheme == "learned absolute":
        key_positions = torch.arange(eval_length).expand(eval_length, -1)
        unseen = key_positions >= train_length
    elif scheme == "shaw":
        max_distance = check_int(max_distance, "max_distance", min=0)
        unseen = relative.clamp(-max_distance, max_distance).abs() >= train_length
    else:
        buckets = t5_buckets(
            relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
        )
        seen = _relative_positions(train_length, train_length)
        trained = t5_buckets(
            seen[seen <= 0], bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
        ).unique()
        unseen = ~torch.isin(buckets, trained)
    return float((unseen & causal).sum()) / float(causal.sum())
