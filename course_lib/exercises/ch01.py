"""Exercises of notebook 01: the causal mask (T queries, S keys), masked attention, head split/merge, a
multi-head attention layer, T5's buckets (build); what a fused kernel must do for Shaw's relative positions
(explain); which position schemes extrapolate, and how naive attention's memory grows (predict).

Expected values come from the definitions, written out here in a few lines (dense softmax in float64, T5's
buckets in plain Python), not from the library the notebook explains.
"""

from __future__ import annotations

import math

import torch

from .common import Case, Draw, checker, compare, compare_exact, declare

__all__ = [
    "check_causal_mask",
    "check_attention",
    "check_split_merge_heads",
    "check_multi_head_attention",
    "check_t5_buckets",
]


declare("1.4", kind="explain", title="what a fused kernel must do for Shaw's relative positions", points=2)
declare("1.5", kind="predict", title="which position schemes extrapolate from T = 32 to 256")
declare("1.6", kind="predict", title="the log-log slope of naive attention's memory in T")


def _causal(T: int, S: int) -> torch.Tensor:
    """True where query i may see key j: j <= i + S - T (the diagonal aligned to the end)."""
    return torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)


@checker(
    "1.1",
    title="a causal mask for T queries and S keys",
    points=1,
    task="the causal mask",
    fallback="course_lib.standard:causal_mask",
)
def check_causal_mask(draw: Draw):
    """``fn(T, S)`` -> the ``(T, S)`` bool mask, True where key ``j <= i + S - T``."""
    n = draw.int(2, 9)
    shapes = [
        ("T = S", n, n),
        ("decoding: one query, S keys", 1, draw.int(2, 12)),
        ("a chunk of queries after a cached prefix (T < S)", draw.int(2, 5), draw.int(6, 12)),
        ("more queries than keys (T > S): the first T - S see nothing", draw.int(6, 10), draw.int(2, 5)),
        ("T = S = 1", 1, 1),
    ]
    for name, T, S in shapes:
        variants = {
            "the mask aligned to the start (j <= i), as SDPA's is_causal builds it": lambda T=T, S=S: (
                torch.arange(S)[None, :] <= torch.arange(T)[:, None]
            ),
            "the mask with the diagonal left out (j < i + S - T)": lambda T=T, S=S: (
                torch.arange(S)[None, :] < torch.arange(T)[:, None] + (S - T)
            ),
            "the mask transposed (rows are keys)": lambda T=T, S=S: _causal(S, T),
            "the inverted mask (True = hidden)": lambda T=T, S=S: ~_causal(T, S),
        }

        def judge(got, expected, variants=variants, T=T, S=S):
            compare_exact(got, expected, f"mask for T={T}, S={S}", variants=variants)

        yield Case(
            f"{name}: T={T}, S={S}",
            (T, S),
            expected=lambda T=T, S=S: _causal(T, S),
            compare=judge,
            inputs=["T", "S"],
        )


def _reference_attention(q, k, v, mask=None, causal=False, *, scale=None, start_aligned=False):
    """Dense softmax attention in float64 with a boolean mask; rows with no allowed key give zeros."""
    T, S = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    allowed = torch.ones(T, S, dtype=torch.bool)
    if causal:
        allowed = _causal(T, S) if not start_aligned else torch.arange(S)[None, :] <= torch.arange(T)[:, None]
    if mask is not None:
        allowed = allowed & mask
    allowed = allowed.expand_as(scores)
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return (weights @ v.double()).to(q.dtype)


def _attention_variants(q, k, v, mask, causal) -> dict:
    """Named wrong answers of exercise 1.2, each computed only when a result must be explained."""
    return {
        "attention without the 1/sqrt(D) scale": lambda: _reference_attention(
            q, k, v, mask, causal, scale=1.0
        ),
        "attention scaled by 1/D instead of 1/sqrt(D)": lambda: _reference_attention(
            q, k, v, mask, causal, scale=1.0 / q.shape[-1]
        ),
        "the causal mask aligned to the start (SDPA's is_causal), not to the end": lambda: (
            _reference_attention(q, k, v, mask, causal, start_aligned=True)
        ),
        "attention with the mask ignored": lambda: _reference_attention(q, k, v),
        "attention with the mask inverted (True = hidden, nn.MultiheadAttention's convention)": lambda: (
            _reference_attention(q, k, v, ~mask, causal)
        ),
        "a softmax over the queries (dim=-2) instead of the keys": lambda: (
            torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -2) @ v
        ),
    }


@checker(
    "1.2", title="attention with masks", points=2, task="attention", fallback="course_lib.standard:attention"
)
def check_attention(draw: Draw):
    """``fn(q, k, v, mask=None, causal=False)``: softmax(q k^T / sqrt(D)) v with a boolean mask (True = may
    attend) broadcastable to (B, H, T, S), causal aligned to the end, zeros for rows that see nothing."""
    B, H, D = draw.int(1, 2), draw.int(1, 3), draw.choice([3, 4, 8])
    for name, T, S, D_v, use_mask, causal, spread in [
        (
            "no mask, T != S, D_v != D",
            draw.int(2, 6),
            draw.int(7, 11),
            draw.choice([2, 5]),
            False,
            False,
            1.0,
        ),
        ("causal, T = S", (n := draw.int(4, 9)), n, D, False, True, 1.0),
        ("causal decoding: one query, S keys", 1, draw.int(3, 9), D, False, True, 1.0),
        (
            "causal with T > S: the first queries see no key",
            draw.int(6, 8),
            draw.int(2, 4),
            D,
            False,
            True,
            1.0,
        ),
        (
            "padding mask with uneven lengths (one sequence empty)",
            draw.int(2, 5),
            draw.int(4, 8),
            D,
            True,
            False,
            1.0,
        ),
        ("padding mask and causal together", (m := draw.int(4, 8)), m, D, True, True, 1.0),
        ("large scores (q scaled by 40)", draw.int(2, 5), draw.int(2, 7), D, False, False, 40.0),
    ]:
        q = draw.randn(B, H, T, D, scale=spread)
        k, v = draw.randn(B, H, S, D), draw.randn(B, H, S, D_v)
        mask = None
        if use_mask:
            lengths = [draw.int(1, S) for _ in range(B)]
            lengths[0] = 0 if B > 1 else draw.int(0, S)
            mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
        expected = _reference_attention(q, k, v, mask, causal)
        allowed = torch.ones(T, S, dtype=torch.bool) if not causal else _causal(T, S)
        if mask is not None:
            allowed = allowed & mask
        empty_rows = ~allowed.expand(B, H, T, S).any(-1, keepdim=True)
        regions = {"in rows that may attend to no key at all": empty_rows}
        advice = {
            "in rows that may attend to no key at all": "such a row must give zeros: softmax of a row "
            "of -inf is 0/0 = NaN, so set those weights (or outputs) to 0"
        }
        variants = _attention_variants(q, k, v, mask, causal)

        def judge(got, expected, regions=regions, advice=advice, variants=variants):
            compare(
                got,
                expected,
                "attention output",
                atol=1e-9,
                rtol=1e-7,
                variants=variants,
                regions=regions,
                advice=advice,
            )

        yield Case(
            f"{name}: T={T}, S={S}",
            (q, k, v),
            {"mask": mask, "causal": causal},
            expected=expected,
            compare=judge,
            inputs=["q", "k", "v"],
        )


def _head_variants(x, heads, B, T, H, D) -> tuple[dict, dict]:
    """Named wrong answers of exercise 1.3: for the split, then for the merge."""
    split = {
        "the columns dealt out round-robin (a view as (B, T, D, H))": lambda: x.reshape(B, T, D, H).permute(
            0, 3, 1, 2
        ),
        "(B, T, H, D): the head axis not moved before T (a missing transpose)": lambda: x.reshape(B, T, H, D),
    }
    merge = {
        "the heads' columns interleaved (merged as (B, T, D, H))": lambda: heads.permute(0, 2, 3, 1).reshape(
            B, T, H * D
        ),
    }
    return split, merge


@checker("1.3", title="splitting and merging heads", points=1, task="the head split and merge")
def check_split_merge_heads(draw: Draw):
    """``split_heads(x, H)``: (B, T, H*D) -> (B, H, T, D), head h taking columns h*D .. (h+1)*D - 1;
    ``merge_heads(y)`` undoes it."""
    for name, B, T, H, D in [
        ("a small layer", draw.int(1, 3), draw.int(2, 6), draw.choice([2, 4]), draw.choice([3, 4, 8])),
        ("H and D not powers of two", draw.int(1, 2), draw.int(2, 5), 3, 5),
        ("one token, one head", 1, 1, 1, draw.int(2, 6)),
    ]:
        x = draw.randn(B, T, H * D)
        heads = torch.stack([x[:, :, h * D : (h + 1) * D] for h in range(H)], dim=1)
        split_variants, merge_variants = _head_variants(x, heads, B, T, H, D)

        def judge_split(got, expected, variants=split_variants, H=H):
            compare(got, expected, f"split_heads(x, H={H})", atol=0, rtol=0, variants=variants)

        def judge_merge(got, expected, variants=merge_variants):
            compare(got, expected, "merge_heads(heads)", atol=0, rtol=0, variants=variants)

        yield Case(
            f"split_heads, {name}: B={B}, T={T}, H={H}, D={D}",
            (x, H),
            expected=heads,
            compare=judge_split,
            inputs=["x", "H"],
            target=0,
        )
        # merge_heads receives what attention returns: a contiguous (B, H, T, D) tensor, whose transpose
        # is not contiguous (a `view` there fails; `reshape` copies when it must).
        yield Case(
            f"merge_heads, {name}: B={B}, H={H}, T={T}, D={D}",
            (heads.contiguous(),),
            expected=x,
            compare=judge_merge,
            inputs=["heads"],
            target=1,
        )


# ---------------------------------------------------------------------------------------------------
# Exercise 1.7: a multi-head attention layer (projections, heads, padding and causal masks, T != S).


def _reference_mha(
    x,
    context,
    W_q,
    W_k,
    W_v,
    W_o,
    num_heads,
    lengths=None,
    causal=False,
    *,
    head_scale=True,
    output_projection=True,
    round_robin=False,
    pad_queries=False,
    start_aligned=False,
):
    """Multi-head attention in float64 from its definition, one head at a time; the keyword options
    build the named wrong answers of exercise 1.7."""
    x, context = x.double(), context.double()
    B, T, d_model = x.shape
    S = context.shape[1]
    D = d_model // num_heads
    scale = D**-0.5 if head_scale else d_model**-0.5
    q, k, v = x @ W_q.double(), context @ W_k.double(), context @ W_v.double()
    allowed = torch.ones(B, T, S, dtype=torch.bool)
    if lengths is not None:
        lengths_t = torch.as_tensor(list(lengths))
        if pad_queries:  # the lengths applied to the queries (rows) instead of the keys
            allowed = allowed & (torch.arange(T)[None, :, None] < lengths_t[:, None, None])
        else:
            allowed = allowed & (torch.arange(S)[None, None, :] < lengths_t[:, None, None])
    if causal:
        offset = 0 if start_aligned else S - T
        allowed = allowed & (torch.arange(S)[None, :] <= torch.arange(T)[:, None] + offset)
    heads = []
    for h in range(num_heads):
        columns = torch.arange(h, d_model, num_heads) if round_robin else torch.arange(h * D, (h + 1) * D)
        scores = (q[..., columns] @ k[..., columns].transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with no allowed key: zeros
        heads.append(weights @ v[..., columns])
    merged = torch.empty(B, T, d_model, dtype=torch.float64)
    for h, head in enumerate(heads):
        columns = torch.arange(h, d_model, num_heads) if round_robin else torch.arange(h * D, (h + 1) * D)
        merged[..., columns] = head
    return merged @ W_o.double() if output_projection else merged


@checker("1.7", title="a multi-head attention layer", points=2, task="multi-head attention")
def check_multi_head_attention(draw: Draw):
    """``fn(x, context, W_q, W_k, W_v, W_o, num_heads, lengths=None, causal=False)``: queries from ``x``
    ``(B, T, d_model)``, keys and values from ``context`` ``(B, S, d_model)``, weights applied as
    ``x @ W``; head h uses columns ``h*D .. (h+1)*D - 1``; ``lengths[b]`` real keys in sequence b (the rest
    padding); causal aligned to the end; zeros (before ``W_o``) for a query that sees no key."""
    for name, B, T, S, num_heads, D, self_attention, use_lengths, causal, spread in [
        ("self-attention, no mask", draw.int(1, 3), (n := draw.int(2, 7)), n, draw.choice([2, 4]),
         draw.choice([3, 4]), True, False, False, 1.0),
        ("causal self-attention with padding (one sequence empty)", 2, (m := draw.int(4, 8)), m,
         draw.choice([2, 3]), draw.choice([3, 5]), True, True, True, 1.0),
        ("cross-attention, T < S, padded keys", draw.int(2, 3), draw.int(2, 4), draw.int(6, 10), 2,
         draw.choice([3, 4]), False, True, False, 1.0),
        ("causal chunk after a cached prefix: T < S, padded", 2, draw.int(2, 4), draw.int(6, 9),
         draw.choice([2, 4]), 3, False, True, True, 1.0),
        ("causal with T > S: the first queries see no key", draw.int(1, 2), draw.int(6, 8), draw.int(2, 4),
         3, draw.choice([2, 4]), False, False, True, 1.0),
        ("one head, large scores (x scaled by 30)", draw.int(1, 2), draw.int(2, 5), draw.int(2, 6), 1,
         draw.choice([4, 6]), False, False, False, 30.0),
    ]:  # fmt: skip
        d_model = num_heads * D
        x = draw.randn(B, T, d_model, scale=spread)
        context = x if self_attention else draw.randn(B, S, d_model)
        W_q, W_k, W_v, W_o = (draw.randn(d_model, d_model, scale=d_model**-0.5) for _ in range(4))
        lengths = None
        if use_lengths:
            lengths = [draw.int(1, S) for _ in range(B)]
            lengths[0] = 0 if B > 1 else draw.int(1, S)
        args = (x, context, W_q, W_k, W_v, W_o, num_heads)
        kwargs = {"lengths": lengths, "causal": causal}

        def variant(args=args, kwargs=kwargs, **options):
            return lambda: _reference_mha(*args, **kwargs, **options)

        variants = {
            "the layer without the output projection W_o": variant(output_projection=False),
            "scores scaled by 1/sqrt(d_model) instead of 1/sqrt(D) of a head": variant(head_scale=False),
            "heads that take every num_heads-th column (round-robin) instead of a block of D": variant(
                round_robin=True
            ),
            "the lengths applied to the queries (rows) instead of the keys (columns)": variant(
                pad_queries=True
            ),
            "the causal mask aligned to the start (j <= i), not to the end (j <= i + S - T)": variant(
                start_aligned=True
            ),
            "keys and values projected from x instead of context (self-attention assumed)": (
                lambda args=args, kwargs=kwargs: _reference_mha(args[0], args[0], *args[2:], **kwargs)
            ),
        }
        allowed = torch.ones(B, T, S, dtype=torch.bool)
        if lengths is not None:
            allowed = allowed & (torch.arange(S)[None, None, :] < torch.tensor(lengths)[:, None, None])
        if causal:
            allowed = allowed & _causal(T, S)
        empty = ~allowed.any(-1, keepdim=True)  # (B, T, 1): queries that see no key
        regions = {"in queries that see no key at all (padding or causal)": empty}
        advice = {
            "in queries that see no key at all (padding or causal)": "a softmax over a row of -inf is "
            "0/0 = NaN: give such a query zero weights, so its head outputs are 0"
        }

        def judge(got, expected, variants=variants, regions=regions, advice=advice):
            compare(
                got,
                expected,
                "layer output",
                atol=1e-9,
                rtol=1e-7,
                variants=variants,
                regions=regions,
                advice=advice,
            )

        yield Case(
            f"{name}: B={B}, T={T}, S={S}, num_heads={num_heads}, D={D}",
            args,
            kwargs,
            expected=lambda args=args, kwargs=kwargs: _reference_mha(*args, **kwargs),
            compare=judge,
            inputs=["x", "context", "W_q", "W_k", "W_v", "W_o", "num_heads"],
        )


# ---------------------------------------------------------------------------------------------------
# Exercise 1.8: T5's relative-position buckets.


def _t5_bucket(relative: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's bucket of one ``relative = key position - query position``, from the definition in plain
    Python (float64 logarithms), independent of any tensor code."""
    distance = -relative  # how far back the key is
    bucket = 0
    half = num_buckets
    if bidirectional:
        half = num_buckets // 2
        if distance < 0:  # a key after the query: the upper half of the buckets
            bucket = half
        distance = abs(distance)
    else:
        distance = max(distance, 0)  # a key after the query: bucket 0 (a causal mask hides it)
    max_exact = half // 2
    if distance < max_exact:
        return bucket + distance
    far = max_exact + int(
        math.log(distance / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    )
    return bucket + min(far, half - 1)


def _t5_reference(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int, **wrong):
    """The buckets of every entry (or a named wrong variant, see ``wrong``)."""
    sign = -1 if wrong.get("sign_flipped") else 1
    values = [
        _t5_variant(sign * int(r), bidirectional, num_buckets, max_distance, **wrong)
        for r in relative.flatten()
    ]
    return torch.tensor(values, dtype=torch.long).reshape(relative.shape)


def _t5_variant(relative, bidirectional, num_buckets, max_distance, **wrong):
    if not wrong or set(wrong) == {"sign_flipped"}:
        return _t5_bucket(relative, bidirectional, num_buckets, max_distance)
    distance = -relative
    bucket = 0
    half = num_buckets
    if bidirectional:
        half = num_buckets if wrong.get("no_halving") else num_buckets // 2
        if distance < 0:
            bucket = half
        distance = abs(distance)
    elif not wrong.get("no_clamp"):
        distance = max(distance, 0)
    max_exact = half // 2
    if distance < max_exact:
        return bucket + distance
    far = max_exact + int(
        math.log(distance / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    )
    return bucket + (far if wrong.get("no_cap") else min(far, half - 1))


@checker("1.8", title="T5's relative-position buckets", points=2, task="T5's buckets")
def check_t5_buckets(draw: Draw):
    """``fn(relative_position, *, bidirectional, num_buckets, max_distance)``: T5's bucket of each key
    position minus query position (an integer tensor), as a long tensor of the same shape."""
    configurations = [
        ("bidirectional (an encoder), T5's defaults", True, 32, 128),
        ("causal (a decoder), T5's defaults", False, 32, 128),
        ("bidirectional, few buckets", True, draw.choice([8, 12, 16]), None),
        ("causal, few buckets", False, draw.choice([6, 10, 16]), None),
    ]
    for name, bidirectional, num_buckets, max_distance in configurations:
        half = num_buckets // 2 if bidirectional else num_buckets
        max_exact = half // 2
        if max_distance is None:
            max_distance = draw.int(max_exact + 1, 6 * max_exact)
        edges = {
            0,
            1,
            max_exact - 1,
            max_exact,
            max_exact + 1,
            max_distance - 1,
            max_distance,
            max_distance + 1,
        }
        edges |= {2 * max_distance, 10**6}
        offsets = sorted({e for d in edges for e in (d, -d)} | {draw.int(-3 * max_distance, 3 * max_distance)
                                                                for _ in range(40)})  # fmt: skip
        order = draw.permutation(len(offsets))
        relative = torch.tensor([offsets[i] for i in order], dtype=torch.long)
        yield _t5_case(f"{name}: {len(offsets)} offsets incl. the edges", relative, bidirectional,
                       num_buckets, max_distance)  # fmt: skip
    T, S = draw.int(3, 9), draw.int(10, 40)
    grid = torch.arange(S)[None, :] - (torch.arange(T)[:, None] + (S - T))  # key - query, end-aligned
    bidirectional = bool(draw.int(0, 1))
    yield _t5_case(
        f"a (T, S) grid of int32 offsets, T={T}, S={S}, {'bidirectional' if bidirectional else 'causal'}",
        grid.to(torch.int32),
        bidirectional,
        16,
        draw.int(9, 30),
    )


def _t5_case(
    name: str, relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> Case:
    half = num_buckets // 2 if bidirectional else num_buckets
    max_exact = half // 2
    distance = -relative.long()
    regions = {
        "keys after the query (relative_position > 0)": distance < 0,
        "keys before the query (relative_position < 0)": distance > 0,
        f"distances of max_distance={max_distance} or more": distance.abs() >= max_distance,
        f"the log-spaced distances (max_exact={max_exact} to max_distance)": (distance.abs() >= max_exact)
        & (distance.abs() < max_distance),
    }
    advice = {
        "keys after the query (relative_position > 0)": (
            "with bidirectional=True they take the upper half (offset num_buckets // 2); causal: bucket 0"
            if bidirectional
            else "a causal model clamps their distance to 0, so they all fall in bucket 0"
        ),
        "keys before the query (relative_position < 0)": "the distance is -relative_position (how far back "
        "the key is)" + ("; these keys use the lower half of the buckets" if bidirectional else ""),
        f"distances of max_distance={max_distance} or more": "every distance from max_distance on shares the "
        f"last bucket of its half: cap at {half - 1} (num_buckets{' // 2' if bidirectional else ''} - 1)",
        f"the log-spaced distances (max_exact={max_exact} to max_distance)": "max_exact + floor(log(d / "
        "max_exact) / log(max_distance / max_exact) * (half - max_exact)), in float64",
    }
    if bidirectional:  # in both halves |distance| is the same: flipping the sign only swaps the halves
        variants = {
            "the buckets with keys before and after the query swapped (the sign of relative_position "
            "flipped, or the offset num_buckets // 2 put on keys before the query instead of after)": dict(
                sign_flipped=True
            ),
            "the buckets with num_buckets per direction (not halved when bidirectional)": dict(
                no_halving=True
            ),
        }
    else:
        variants = {
            "the buckets of -relative_position (the sign flipped: a key before the query is at distance "
            "-relative_position)": dict(sign_flipped=True),
            "the buckets of a causal model that does not clamp the distance of later keys to 0": dict(
                no_clamp=True
            ),
        }
    variants["the buckets without the cap at the last bucket (num_buckets - 1 of each half)"] = dict(
        no_cap=True
    )
    named = {
        label: (
            lambda options=options: _t5_reference(
                relative, bidirectional, num_buckets, max_distance, **options
            )
        )
        for label, options in variants.items()
    }

    def judge(got, expected):
        compare_exact(got, expected, "buckets", variants=named, regions=regions, advice=advice)

    return Case(
        name,
        (relative,),
        {"bidirectional": bidirectional, "num_buckets": num_buckets, "max_distance": max_distance},
        expected=lambda: _t5_reference(relative, bidirectional, num_buckets, max_distance),
        compare=judge,
        inputs=["relative_position"],
    )
