"""Learned relative positions (Shaw et al., T5 buckets) against loop-built float64 references."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from course_lib.relative_positions import (
    ShawRelativePositions,
    T5RelativeBias,
    position_schemes,
    relative_distance_index,
    shaw_attention,
    t5_bias,
    t5_buckets,
    t5_score_mod,
    untrained_position_fraction,
)
from course_lib.standard import attention

# --- independent references -----------------------------------------------------------------------


def shaw_reference(q, k, v, key_table, value_table=None, allowed=None, scale=None):
    """Shaw et al.'s equations with the (T, S, D) relative vectors written out, one query at a time."""
    q, k, v = q.double(), k.double(), v.double()
    key_table = key_table.double()
    B, H, T, D = q.shape
    S = k.shape[2]
    max_distance = (key_table.shape[0] - 1) // 2
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                position = S - T + i
                keys = [j for j in range(S) if allowed is None or bool(allowed[b, h, i, j])]
                if not keys:
                    continue
                rows = [min(max(j - position, -max_distance), max_distance) + max_distance for j in keys]
                a_key = key_table[rows]  # (n, D): the relative vector of each visible key
                logits = ((k[b, h, keys] + a_key) @ q[b, h, i]) * scale
                weights = torch.softmax(logits, dim=0)
                values = v[b, h, keys]
                if value_table is not None:
                    values = values + value_table.double()[rows]
                out[b, h, i] = weights @ values
    return out


def t5_bucket_definition(relative_position, bidirectional, num_buckets, max_distance):
    """T5's bucket of one key-minus-query offset, from the definition in the T5 code base."""
    n = -relative_position
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            bucket += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    log_spaced = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return bucket + min(log_spaced, num_buckets - 1)


def causal_allowed(T, S):
    return torch.tensor([[j <= S - T + i for j in range(S)] for i in range(T)])


def random_inputs(B, H, T, S, D, D_v, rows, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, T, D, generator=g, dtype=dtype),
        torch.randn(B, H, S, D, generator=g, dtype=dtype),
        torch.randn(B, H, S, D_v, generator=g, dtype=dtype),
        torch.randn(rows, D, generator=g, dtype=dtype),
        torch.randn(rows, D_v, generator=g, dtype=dtype),
    )


# --- Shaw et al. ----------------------------------------------------------------------------------

SHAW_CASES = [(1, 1, 2), (5, 5, 2), (7, 3, 1), (3, 9, 4), (6, 6, 0), (4, 4, 10)]


@pytest.mark.parametrize("values", [True, False], ids=["keys+values", "keys"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("T,S,k", SHAW_CASES, ids=[f"T{t}-S{s}-k{k}" for t, s, k in SHAW_CASES])
def test_shaw_attention_matches_loop_reference(T, S, k, causal, values):
    q, key, v, key_table, value_table = random_inputs(2, 2, T, S, 5, 3, 2 * k + 1)
    value_table = value_table if values else None
    out = shaw_attention(q, key, v, key_table, value_table, causal=causal)
    allowed = causal_allowed(T, S).expand(2, 2, T, S) if causal else None
    torch.testing.assert_close(out, shaw_reference(q, key, v, key_table, value_table, allowed))


def test_shaw_key_term_is_a_dense_bias_that_depends_on_the_query():
    q, k, v, key_table, _ = random_inputs(1, 2, 6, 8, 4, 4, 5)
    scale = 0.7
    # The explicit bias: scale * q_i . a^K[r_ij], a (B, H, T, S) tensor that changes with q.
    index = relative_distance_index(6, 8, max_distance=2)
    bias = torch.einsum("bhtd,tsd->bhts", q, key_table[index]) * scale
    expected = attention(q, k, v, bias=bias, scale=scale)
    torch.testing.assert_close(shaw_attention(q, k, v, key_table, scale=scale), expected)


def test_shaw_fully_masked_rows_are_zero_not_nan():
    q, k, v, key_table, value_table = random_inputs(1, 2, 4, 6, 3, 3, 3)
    mask = torch.ones(1, 2, 4, 6, dtype=torch.bool)
    mask[0, 1, 2] = False
    out = shaw_attention(q, k, v, key_table, value_table, mask)
    assert torch.isfinite(out).all() and (out[0, 1, 2] == 0).all()
    torch.testing.assert_close(out, shaw_reference(q, k, v, key_table, value_table, mask))
    # T > S under causal: the first T - S queries see no key at all.
    out = shaw_attention(q[:, :, :4], k[:, :, :2], v[:, :, :2], key_table, value_table, causal=True)
    assert (out[:, :, :2] == 0).all() and torch.isfinite(out).all()


def test_shaw_empty_sequences():
    q, k, v, key_table, value_table = random_inputs(1, 2, 3, 4, 3, 2, 3)
    assert shaw_attention(q[:, :, :0], k, v, key_table, value_table).shape == (1, 2, 0, 2)
    out = shaw_attention(q, k[:, :, :0], v[:, :, :0], key_table, value_table)
    assert out.shape == (1, 2, 3, 2) and (out == 0).all()


def test_shaw_gradcheck():
    q, k, v, key_table, value_table = random_inputs(1, 2, 5, 4, 3, 2, 5)
    inputs = [x.requires_grad_() for x in (q, k, v, key_table, value_table)]
    assert torch.autograd.gradcheck(lambda *a: shaw_attention(*a, causal=True), inputs)


def test_shaw_half_precision():
    q, k, v, key_table, value_table = random_inputs(1, 2, 9, 9, 8, 8, 7, dtype=torch.float32)
    out = shaw_attention(q.half(), k.half(), v.half(), key_table, value_table, causal=True)
    assert out.dtype == torch.float16
    expected = shaw_reference(
        q.half(), k.half(), v.half(), key_table, value_table, causal_allowed(9, 9).expand(1, 2, 9, 9)
    )
    torch.testing.assert_close(out.double(), expected, atol=3e-3, rtol=1e-2)


def test_shaw_module_counts_and_matches_the_function():
    layer = ShawRelativePositions(6, max_distance=3, value_dim=4)
    assert sum(p.numel() for p in layer.parameters()) == 7 * (6 + 4)
    keys_only = ShawRelativePositions(6, max_distance=3, values=False)
    assert sum(p.numel() for p in keys_only.parameters()) == 7 * 6
    q, k, v = torch.randn(1, 2, 5, 6), torch.randn(1, 2, 5, 6), torch.randn(1, 2, 5, 4)
    expected = shaw_reference(
        q, k, v, layer.key_table.detach(), layer.value_table.detach(), causal_allowed(5, 5).expand(1, 2, 5, 5)
    )
    torch.testing.assert_close(layer(q, k, v, causal=True).double(), expected, atol=1e-5, rtol=1e-5)
    layer(q, k, v).sum().backward()
    assert layer.key_table.grad.abs().sum() > 0 and layer.value_table.grad.abs().sum() > 0


def test_relative_distance_index_clips_both_ways():
    index = relative_distance_index(3, 5, max_distance=1)
    # Query i sits at position 2 + i; the row is clip(j - position, -1, 1) + 1.
    expected = torch.tensor([[0, 0, 1, 2, 2], [0, 0, 0, 1, 2], [0, 0, 0, 0, 1]])
    assert torch.equal(index, expected)


# --- T5 buckets -----------------------------------------------------------------------------------

BUCKET_SETTINGS = [(True, 32, 128), (False, 32, 128), (True, 8, 20), (False, 6, 7), (True, 4, 3)]


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", BUCKET_SETTINGS)
def test_t5_buckets_match_the_definition(bidirectional, num_buckets, max_distance):
    offsets = torch.arange(-400, 401)
    buckets = t5_buckets(
        offsets, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    expected = [t5_bucket_definition(int(r), bidirectional, num_buckets, max_distance) for r in offsets]
    assert buckets.tolist() == expected
    assert buckets.dtype == torch.long and buckets.min() >= 0 and buckets.max() < num_buckets


def test_t5_buckets_known_values():
    # Worked by hand for T5's defaults (32 buckets, 16 per direction, 8 exact, max distance 128).
    offsets = torch.tensor([0, -1, -7, -8, -12, -16, -127, -128, -5000, 1, 12, 5000])
    expected = [0, 1, 7, 8, 9, 10, 15, 15, 15, 17, 25, 31]
    assert t5_buckets(offsets).tolist() == expected
    causal = t5_buckets(offsets, bidirectional=False)
    # Causal: 32 buckets one way, 16 exact; keys after the query share bucket 0.
    assert causal.tolist() == [0, 1, 7, 8, 12, 16, 31, 31, 31, 0, 0, 0]


@given(st.integers(min_value=2, max_value=40).map(lambda n: 2 * n), st.integers(min_value=1, max_value=500))
def test_t5_buckets_are_monotone_and_log_spaced(num_buckets, extra):
    max_exact = num_buckets // 4
    max_distance = max_exact + extra
    distances = torch.arange(0, 3 * max_distance)
    buckets = t5_buckets(-distances, num_buckets=num_buckets, max_distance=max_distance)
    assert (buckets.diff() >= 0).all()  # farther never means a nearer bucket
    assert torch.equal(buckets[:max_exact], distances[:max_exact])  # exact near the query
    assert (buckets[max_distance:] == num_buckets // 2 - 1).all()  # the last bucket beyond
    # Log spacing: bucket max_exact + m holds the distances in [e * r^(m/n), e * r^((m+1)/n)),
    # e = max_exact, n = the number of log-spaced buckets, r = max_distance / max_exact.
    n, ratio = num_buckets // 2 - max_exact, max_distance / max_exact
    for d in range(max_exact, max_distance):
        m = int(buckets[d]) - max_exact
        assert max_exact * ratio ** (m / n) <= d * (1 + 1e-12)
        assert d < max_exact * ratio ** ((m + 1) / n) * (1 + 1e-12)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("T,S", [(1, 1), (6, 6), (4, 11), (9, 3)])
def test_t5_bias_matches_loop_lookup(T, S, bidirectional):
    table = torch.randn(8, 3, dtype=torch.float64)
    bias = t5_bias(table, T, S, bidirectional=bidirectional, max_distance=10)
    assert bias.shape == (3, T, S)
    for h in range(3):
        for i in range(T):
            for j in range(S):
                bucket = t5_bucket_definition(j - (S - T + i), bidirectional, 8, 10)
                assert bias[h, i, j] == table[bucket, h]


def test_t5_score_mod_builds_the_bias_tile_by_tile():
    table = torch.randn(16, 2, dtype=torch.float64)
    T, S = 7, 12
    full = t5_bias(table, T, S, max_distance=20)
    score_mod = t5_score_mod(table, max_distance=20, offset=S - T)
    tiled = torch.zeros(2, T, S, dtype=torch.float64)
    head = torch.arange(2).view(2, 1, 1)
    for row_start in range(0, T, 3):  # 3 x 5 tiles; each sees only its own indices
        for col_start in range(0, S, 5):
            rows = torch.arange(row_start, min(row_start + 3, T)).view(1, -1, 1)
            cols = torch.arange(col_start, min(col_start + 5, S)).view(1, 1, -1)
            zeros = torch.zeros(2, rows.shape[1], cols.shape[2], dtype=torch.float64)
            tiled[:, rows[0, :, 0, None], cols[0, 0]] = score_mod(zeros, 0, head, rows, cols)
    torch.testing.assert_close(tiled, full, rtol=0, atol=0)


def test_t5_score_mod_agrees_with_flex_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    table = torch.randn(8, 2)
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex.flex_attention(q, k, v, score_mod=t5_score_mod(table, max_distance=10))
    expected = attention(q, k, v, bias=t5_bias(table, 6, max_distance=10))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_t5_bias_gradients_reach_the_table():
    table = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 5, 3, dtype=torch.float64) for _ in range(3))

    def run(table):
        return attention(q, k, v, bias=t5_bias(table, 5, bidirectional=False, max_distance=6), causal=True)

    assert torch.autograd.gradcheck(run, (table,))


def test_t5_module_extrapolates_flat_beyond_max_distance():
    bias = T5RelativeBias(4, num_buckets=16, max_distance=32, bidirectional=False)
    assert sum(p.numel() for p in bias.parameters()) == 16 * 4
    long = bias(300)  # far longer than any training length: still defined
    assert long.shape == (4, 300, 300)
    far = bias.bias_by_distance(torch.arange(32, 300))
    assert torch.equal(far, far[:, :1].expand_as(far))  # one value per head beyond max_distance
    near = bias.bias_by_distance(torch.arange(0, 8))
    assert torch.equal(near, bias.table.weight[:8].T)  # one bucket per distance near the query
    torch.testing.assert_close(long[:, 299, :], bias.bias_by_distance(torch.arange(299, -1, -1)))


def test_untrained_position_fraction_counts_pairs():
    # Learned absolute, trained on 4 positions, run on 8: keys at 4..7 have untrained rows.
    expected = sum(max(0, i - 3) for i in range(8)) / (8 * 9 / 2)
    assert untrained_position_fraction("learned absolute", 4, 8) == pytest.approx(expected)
    # T5 causal with 32 buckets: 16 exact ones. Training at 16 tokens reaches buckets 0..15 only.
    expected = sum(max(0, i - 15) for i in range(64)) / (64 * 65 / 2)
    assert untrained_position_fraction("t5", 16, 64) == pytest.approx(expected)
    assert untrained_position_fraction("t5", 200, 1000) == 0.0  # every bucket seen: saturates
    assert untrained_position_fraction("shaw", 20, 500, max_distance=16) == 0.0
    assert untrained_position_fraction("shaw", 4, 10, max_distance=16) > 0


def test_position_schemes_parameter_counts_match_real_modules():
    schemes = {s.name: s for s in position_schemes(num_heads=4, head_dim=8, max_len=64)}
    assert set(schemes) == {
        "sinusoidal",
        "learned absolute",
        "RoPE",
        "ALiBi",
        "T5 buckets",
        "Shaw (keys and values)",
    }
    assert schemes["learned absolute"].parameters == torch.nn.Embedding(64, 32).weight.numel()
    assert schemes["T5 buckets"].parameters == sum(p.numel() for p in T5RelativeBias(4).parameters())
    shaw = ShawRelativePositions(8, max_distance=16)
    assert schemes["Shaw (keys and values)"].parameters == sum(p.numel() for p in shaw.parameters())
    assert {n for n, s in schemes.items() if s.positions_only} == {"ALiBi", "T5 buckets"}
    assert all(schemes[n].parameters == 0 for n in ("sinusoidal", "RoPE", "ALiBi"))


# --- bad input ------------------------------------------------------------------------------------

_q, _k, _v = torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 3)
_table = torch.randn(5, 3)


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: shaw_attention(_q, _k, _v, torch.randn(4, 3)), ValueError, "key_table"),
        (lambda: shaw_attention(_q, _k, _v, torch.randn(5, 2)), ValueError, "key_table"),
        (lambda: shaw_attention(_q, _k, _v, torch.ones(5, 3, dtype=torch.long)), TypeError, "key_table"),
        (lambda: shaw_attention(_q, _k, _v, _table, torch.randn(3, 3)), ValueError, "value_table"),
        (lambda: shaw_attention(_q, _k, _v, _table, torch.randn(5, 2)), ValueError, "value_table"),
        (lambda: shaw_attention(_q, _k, _v, _table, causal=1), TypeError, "causal"),
        (lambda: shaw_attention(_q, _k, _v, _table, scale=float("inf")), ValueError, "scale"),
        (
            lambda: shaw_attention(_q, _k, _v, _table, mask=torch.ones(3, 3, dtype=torch.bool)),
            ValueError,
            "mask",
        ),
        (lambda: shaw_attention(_q[0], _k, _v, _table), ValueError, "q"),
        (lambda: relative_distance_index(3, max_distance=-1), ValueError, "max_distance"),
        (lambda: ShawRelativePositions(0), ValueError, "head_dim"),
        (lambda: t5_buckets(torch.zeros(3)), TypeError, "relative_position"),
        (lambda: t5_buckets(torch.zeros(3, dtype=torch.long), num_buckets=7), ValueError, "num_buckets"),
        (lambda: t5_buckets(torch.zeros(3, dtype=torch.long), num_buckets=2), ValueError, "num_buckets"),
        (lambda: t5_buckets(torch.zeros(3, dtype=torch.long), max_distance=8), ValueError, "max_distance"),
        (
            lambda: t5_buckets(torch.zeros(3, dtype=torch.long), bidirectional=None),
            TypeError,
            "bidirectional",
        ),
        (lambda: t5_bias(torch.randn(8), 3), ValueError, "table"),
        (lambda: t5_bias(torch.randn(8, 2), -1), ValueError, "T"),
        (lambda: t5_score_mod(torch.randn(8, 2), offset=1.5), TypeError, "offset"),
        (lambda: T5RelativeBias(0), ValueError, "num_heads"),
        (
            lambda: T5RelativeBias(2).bias_by_distance(torch.zeros(2, 2, dtype=torch.long)),
            ValueError,
            "distances",
        ),
        (lambda: position_schemes(num_heads=0, head_dim=4, max_len=8), ValueError, "num_heads"),
        (lambda: untrained_position_fraction("rope", 4, 8), ValueError, "scheme"),
        (lambda: untrained_position_fraction("t5", 0, 8), ValueError, "train_length"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()
