"""Checkers for notebook 01: the causal mask (T queries, S keys), masked attention, head split/merge.

Expected values come from the definitions, written out here in a few lines (dense softmax in float64),
not from the library the notebook explains.
"""

from __future__ import annotations

import torch

from .common import Case, Draw, checker, compare, compare_exact

__all__ = ["check_causal_mask", "check_attention", "check_split_merge_heads"]


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
