"""Chapter 01: attention, masks, multi-head attention and positions against independent references."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from course_lib import (
    MultiHeadAttention,
    alibi_bias,
    apply_rope,
    attention,
    causal_mask,
    padding_mask,
    sinusoidal_positions,
)
from course_lib.standard import alibi_slopes


def dense_reference(q, k, v, allowed=None, scale=None, bias=None):
    """float64 softmax attention written from the definition, with explicit loops over rows.

    Rows with nothing allowed are zero by the course's convention.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    S = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    allowed = torch.ones(B, H, T, S, dtype=torch.bool) if allowed is None else allowed.expand(B, H, T, S)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                keys = allowed[b, h, i].nonzero().flatten()
                if len(keys) == 0:
                    continue
                logits = (k[b, h, keys] @ q[b, h, i]) * scale
                if bias is not None:
                    logits = logits + bias.expand(B, H, T, S)[b, h, i, keys].double()
                weights = torch.exp(logits - logits.max())
                out[b, h, i] = (weights / weights.sum()) @ v[b, h, keys]
    return out


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def qkv(B=2, H=3, T=5, S=None, D=8, D_v=None, dtype=torch.float64):
    S = T if S is None else S
    D_v = D if D_v is None else D_v
    return (
        randn(B, H, T, D, dtype=dtype, seed=1),
        randn(B, H, S, D, dtype=dtype, seed=2),
        randn(B, H, S, D_v, dtype=dtype, seed=3),
    )


# --- attention ------------------------------------------------------------------------------


def test_no_mask_matches_sdpa_and_dense():
    q, k, v = qkv(T=7, S=7)
    out = attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(out, dense_reference(q, k, v))


@pytest.mark.parametrize(
    "mask_shape",
    [(7, 9), (1, 1, 7, 9), (2, 1, 1, 9), (1, 3, 7, 9), (2, 3, 7, 9)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_bool_mask_broadcasts_like_sdpa(mask_shape):
    q, k, v = qkv(T=7, S=9)
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[..., 0] = True  # keep every row non-empty so SDPA is defined
    torch.testing.assert_close(
        attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    )
    torch.testing.assert_close(attention(q, k, v, mask), dense_reference(q, k, v, mask))


def test_causal_square_matches_sdpa_is_causal():
    q, k, v = qkv(T=6)
    torch.testing.assert_close(
        attention(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )


@pytest.mark.parametrize("T,S", [(1, 6), (3, 8), (4, 5)], ids=lambda x: str(x))
def test_causal_with_fewer_queries_is_aligned_to_the_end(T, S):
    q, k, v = qkv(T=T, S=S)
    allowed = torch.tensor([[j <= S - T + i for j in range(S)] for i in range(T)])
    torch.testing.assert_close(attention(q, k, v, causal=True), dense_reference(q, k, v, allowed))
    # The last query of a decode step sees every cached key.
    torch.testing.assert_close(attention(q, k, v, causal=True)[:, :, -1], attention(q, k, v)[:, :, -1])


def test_causal_combines_with_a_mask():
    q, k, v = qkv(T=5, S=5)
    lengths = padding_mask([5, 3], 5)
    expected = dense_reference(q, k, v, lengths & causal_mask(5))
    torch.testing.assert_close(attention(q, k, v, lengths, causal=True), expected)


def test_custom_scale_and_bias():
    q, k, v = qkv(T=4, S=6)
    bias = randn(1, 3, 4, 6, seed=9)
    torch.testing.assert_close(
        attention(q, k, v, scale=0.37, bias=bias), dense_reference(q, k, v, scale=0.37, bias=bias)
    )
    torch.testing.assert_close(
        attention(q, k, v, scale=0.37), F.scaled_dot_product_attention(q, k, v, scale=0.37)
    )


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = qkv(T=4, S=4)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False
    out, weights = attention(q, k, v, mask, return_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    assert (out[:, :, 2] == 0).all() and (weights[:, :, 2] == 0).all()
    torch.testing.assert_close(out, dense_reference(q, k, v, mask))
    # Causal with more queries than keys: the first T - S queries see nothing.
    q, k, v = qkv(T=5, S=3)
    out = attention(q, k, v, causal=True)
    assert (out[:, :, :2] == 0).all()


def test_fully_masked_rows_have_finite_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(T=3, S=3))
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    attention(q, k, v, mask).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_extreme_logits_stay_finite_and_exact():
    q, k, v = qkv(T=4, S=4)
    q = q * 1e4  # scores of order 1e4-1e5: exp() overflows without the max shift
    out = attention(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, dense_reference(q, k, v))


def test_returned_weights_are_a_distribution_and_reproduce_the_output():
    q, k, v = qkv(T=5, S=7)
    out, weights = attention(q, k, v, causal=True, return_weights=True)
    assert weights.shape == (2, 3, 5, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    torch.testing.assert_close(weights @ v, out)
    assert (weights[..., causal_mask(5, 7).logical_not()] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_is_accumulated_in_float32(dtype):
    q, k, v = qkv(B=1, H=2, T=33, S=40, D=16, dtype=torch.float32)
    q, k, v = (t * 8 for t in (q, k, v))  # scores up to ~1e3: fp16 scores would overflow exp
    out = attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
    assert out.dtype == dtype
    expected = dense_reference(q.to(dtype), k.to(dtype), v.to(dtype), causal_mask(33, 40))
    torch.testing.assert_close(out.double(), expected, atol=0.1, rtol=0.02)


@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    T=st.integers(1, 9),
    S=st.integers(1, 9),
    D=st.integers(1, 7),
    D_v=st.integers(1, 5),
    causal=st.booleans(),
)
def test_property_matches_dense_reference_on_any_shape(B, H, T, S, D, D_v, causal):
    q, k, v = qkv(B, H, T, S, D, D_v)
    allowed = causal_mask(T, S) if causal else None
    torch.testing.assert_close(attention(q, k, v, causal=causal), dense_reference(q, k, v, allowed))


@given(T=st.integers(1, 6), S=st.integers(1, 6), shift=st.floats(-50, 50))
def test_property_softmax_is_shift_invariant_per_row(T, S, shift):
    q, k, v = qkv(1, 1, T, S, 4)
    bias = torch.full((T, 1), shift, dtype=torch.float64)  # the same constant across a row
    torch.testing.assert_close(attention(q, k, v, bias=bias), attention(q, k, v))


def test_gradcheck_float64():
    q, k, v = (t[:1, :2, :, :3].clone().requires_grad_() for t in qkv(T=4, S=5))
    mask = torch.tensor([[True, True, False, True, True]])
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, mask, causal=True), (q, k, v))


# --- masks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("T,S", [(1, 1), (4, 4), (3, 7), (6, 2)], ids=str)
def test_causal_mask_definition(T, S):
    expected = torch.tensor([[j <= S - T + i for j in range(S)] for i in range(T)])
    assert torch.equal(causal_mask(T, S), expected)


def test_padding_mask_definition_and_use():
    mask = padding_mask(torch.tensor([3, 0, 5]), 5)
    assert mask.shape == (3, 1, 1, 5)
    assert mask[0, 0, 0].tolist() == [True, True, True, False, False]
    assert not mask[1].any() and mask[2].all()
    assert torch.equal(padding_mask([3, 0, 5], 5), mask)


# --- multi-head attention -------------------------------------------------------------------


def copy_into_torch_mha(ours: MultiHeadAttention, kdim=None, vdim=None) -> torch.nn.MultiheadAttention:
    theirs = torch.nn.MultiheadAttention(
        ours.embed_dim, ours.num_heads, batch_first=True, kdim=kdim, vdim=vdim, dtype=torch.float64
    )
    with torch.no_grad():
        if theirs._qkv_same_embed_dim:
            theirs.in_proj_weight.copy_(torch.cat([ours.W_q.weight, ours.W_k.weight, ours.W_v.weight]))
        else:
            theirs.q_proj_weight.copy_(ours.W_q.weight)
            theirs.k_proj_weight.copy_(ours.W_k.weight)
            theirs.v_proj_weight.copy_(ours.W_v.weight)
        theirs.in_proj_bias.copy_(torch.cat([ours.W_q.bias, ours.W_k.bias, ours.W_v.bias]))
        theirs.out_proj.weight.copy_(ours.W_o.weight)
        theirs.out_proj.bias.copy_(ours.W_o.bias)
    return theirs


def test_self_attention_matches_torch_multihead_attention_with_padding():
    ours = MultiHeadAttention(12, 3).double()
    theirs = copy_into_torch_mha(ours)
    x = randn(2, 6, 12, seed=5)
    lengths = [6, 4]
    key_padding = ~padding_mask(lengths, 6)[:, 0, 0]  # torch: True means "ignore"
    out, weights = ours(x, mask=padding_mask(lengths, 6), return_weights=True)
    expected, expected_weights = theirs(x, x, x, key_padding_mask=key_padding, average_attn_weights=False)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)


def test_cross_attention_matches_torch_multihead_attention():
    ours = MultiHeadAttention(8, 2, kdim=5, vdim=5).double()
    theirs = copy_into_torch_mha(ours, kdim=5, vdim=5)
    x, context = randn(2, 3, 8, seed=6), randn(2, 7, 5, seed=7)
    expected, _ = theirs(x, context, context)
    torch.testing.assert_close(ours(x, context), expected)


def test_causal_self_attention_matches_torch_with_attn_mask():
    ours = MultiHeadAttention(8, 4).double()
    theirs = copy_into_torch_mha(ours)
    x = randn(1, 5, 8, seed=8)
    expected, _ = theirs(x, x, x, attn_mask=~causal_mask(5))
    torch.testing.assert_close(ours(x, causal=True), expected)


def test_split_and_merge_heads_are_inverse():
    layer = MultiHeadAttention(12, 4)
    x = randn(2, 5, 12, dtype=torch.float32)
    split = layer.split_heads(x)
    assert split.shape == (2, 4, 5, 3)
    torch.testing.assert_close(split[:, 1], x[..., 3:6])
    torch.testing.assert_close(layer.merge_heads(split), x)


# --- positions ------------------------------------------------------------------------------


def test_sinusoidal_positions_match_the_formula():
    table = sinusoidal_positions(7, 6)
    for t in range(7):
        for i in range(3):
            angle = t / 10000 ** (2 * i / 6)
            assert table[t, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[t, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_rope_preserves_norms_and_matches_complex_rotation():
    x = randn(2, 3, 5, 8)
    rotated = apply_rope(x)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    # Independent form: pairs as complex numbers times e^{i t theta_j}.
    pairs = torch.view_as_complex(x.reshape(2, 3, 5, 4, 2).contiguous())
    theta = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    phases = torch.polar(
        torch.ones(5, 4, dtype=torch.float64), torch.arange(5.0, dtype=torch.float64)[:, None] * theta
    )
    expected = torch.view_as_real(pairs * phases).reshape(2, 3, 5, 8)
    torch.testing.assert_close(rotated, expected)


@given(m=st.integers(0, 200), n=st.integers(0, 200), shift=st.integers(0, 500))
def test_property_rope_dot_product_depends_only_on_offset(m, n, shift):
    q, k = randn(1, 16, seed=10), randn(1, 16, seed=11)

    def score(pos_q, pos_k):
        rq = apply_rope(q, torch.tensor([pos_q]))
        rk = apply_rope(k, torch.tensor([pos_k]))
        return (rq * rk).sum().item()

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-9)


def test_rope_positions_default_and_half_precision():
    x = randn(1, 1, 4, 6, dtype=torch.float32)
    torch.testing.assert_close(apply_rope(x), apply_rope(x, torch.arange(4)))
    half = apply_rope(x.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), apply_rope(x), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("num_heads", [1, 4, 8, 12])
def test_alibi_matches_the_paper_formula(num_heads):
    bias = alibi_bias(num_heads, 5, 7)
    assert bias.shape == (num_heads, 5, 7)
    slopes = alibi_slopes(num_heads)
    if num_heads == 8:  # the paper's example: 1/2, 1/4, ..., 1/256
        torch.testing.assert_close(slopes, torch.tensor([2.0**-i for i in range(1, 9)]))
    if num_heads == 12:  # 8 slopes of the 8-head set, then every other one of the 16-head set
        expected = [2 ** (-8 * i / 8) for i in range(1, 9)] + [2 ** (-8 * i / 16) for i in (1, 3, 5, 7)]
        torch.testing.assert_close(slopes, torch.tensor(expected))
    for h in range(num_heads):
        for i in range(5):
            for j in range(7):
                assert bias[h, i, j].item() == pytest.approx(-slopes[h].item() * abs((7 - 5 + i) - j))


def test_alibi_bias_plugs_into_attention():
    q, k, v = qkv(B=1, H=4, T=5, S=5)
    bias = alibi_bias(4, 5)
    out = attention(q, k, v, causal=True, bias=bias)
    torch.testing.assert_close(out, dense_reference(q, k, v, causal_mask(5), bias=bias))


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,error,name",
    [
        (
            lambda: attention(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)),
            ValueError,
            "q",
        ),
        (lambda: attention([1.0], torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)), TypeError, "q"),
        (
            lambda: attention(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 3, 5), torch.zeros(1, 1, 3, 4)),
            ValueError,
            "k",
        ),
        (
            lambda: attention(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 2, 4)),
            ValueError,
            "v",
        ),
        (
            lambda: attention(torch.zeros(1, 2, 2, 4), torch.zeros(1, 3, 3, 4), torch.zeros(1, 3, 3, 4)),
            ValueError,
            "heads",
        ),
        (
            lambda: attention(*[torch.zeros(1, 1, 2, 4)] * 3, torch.ones(2, 3, dtype=torch.bool)),
            ValueError,
            "mask",
        ),
        (lambda: attention(*[torch.zeros(1, 1, 2, 4)] * 3, torch.ones(2, 2)), TypeError, "mask"),
        (lambda: attention(*[torch.zeros(1, 1, 2, 4)] * 3, scale="big"), TypeError, "scale"),
        (lambda: attention(*[torch.zeros(1, 1, 2, 4)] * 3, causal=1), TypeError, "causal"),
        (lambda: attention(*[torch.zeros(1, 1, 2, 4)] * 3, bias=torch.zeros(3, 3)), ValueError, "bias"),
        (lambda: attention(*[torch.zeros(1, 1, 2, 4, dtype=torch.long)] * 3), TypeError, "q"),
        (lambda: causal_mask(-1), ValueError, "T"),
        (lambda: causal_mask(2, -1), ValueError, "S"),
        (lambda: causal_mask(3, 2.5), TypeError, "S"),
        (lambda: padding_mask([1, 7], 5), ValueError, "lengths"),
        (lambda: padding_mask(torch.tensor([1.5]), 5), TypeError, "lengths"),
        (lambda: padding_mask([1], 0), ValueError, "S"),
        (lambda: padding_mask([1], -1), ValueError, "S"),
        (lambda: MultiHeadAttention(10, 3), ValueError, "num_heads"),
        (lambda: MultiHeadAttention(0, 1), ValueError, "embed_dim"),
        (lambda: MultiHeadAttention(8, 2)(torch.zeros(1, 3, 7)), ValueError, "x"),
        (lambda: MultiHeadAttention(8, 2)(torch.zeros(1, 3, 8), torch.zeros(2, 3, 8)), ValueError, "context"),
        (lambda: sinusoidal_positions(4, 5), ValueError, "dim"),
        (lambda: sinusoidal_positions(-1, 4), ValueError, "T"),
        (lambda: apply_rope(torch.zeros(3, 4), torch.tensor([True, False, True])), TypeError, "positions"),
        (lambda: apply_rope(torch.zeros(2, 5)), ValueError, "D"),
        (lambda: apply_rope(torch.zeros(3, 4), torch.arange(2)), ValueError, "positions"),
        (lambda: apply_rope(torch.zeros(3, 4), base=0.5), ValueError, "base"),
        (lambda: alibi_bias(0, 3), ValueError, "num_heads"),
        (lambda: alibi_bias(2, 3, -1), ValueError, "S"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- the scale rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, -0.7, 3], ids=["zero", "negative", "int"])
def test_any_finite_scale_is_used_as_given(scale):
    q, k, v = qkv(T=4, S=6)
    torch.testing.assert_close(attention(q, k, v, scale=scale), dense_reference(q, k, v, scale=scale))


@pytest.mark.parametrize(
    "scale, error",
    [(float("inf"), ValueError), (float("-inf"), ValueError), (float("nan"), ValueError), (True, TypeError)],
    ids=["inf", "-inf", "nan", "bool"],
)
def test_scale_that_is_not_a_finite_number_is_refused(scale, error):
    q, k, v = qkv(T=4, S=6)
    with pytest.raises(error, match="scale"):
        attention(q, k, v, scale=scale)


# --- awkward input found by probing (issue 14) -------------------------------------------------------


def test_a_bias_with_extra_leading_dims_is_refused_not_broadcast_to_a_new_shape():
    q, k, v = qkv(B=1, H=2, T=3, S=4)
    with pytest.raises(ValueError, match="^bias .*at most 4 dims"):
        attention(q, k, v, bias=randn(2, 1, 2, 3, 4))
    with pytest.raises(ValueError, match="^bias of shape"):
        attention(q, k, v, bias=randn(2, 1, 3, 4))  # B = 2 where q has B = 1
    # Any bias that broadcasts to (B, H, T, S) without growing it still works.
    bias = randn(2, 3, 4, seed=9)
    torch.testing.assert_close(attention(q, k, v, bias=bias), dense_reference(q, k, v, bias=bias))


@pytest.mark.parametrize("T, S", [(0, 0), (0, 3), (3, 0)])
def test_masks_and_biases_of_empty_sequences(T, S):
    """T = 0 or S = 0 masks are allowed, as every kernel accepts empty sequences."""
    assert causal_mask(T, S).shape == (T, S)
    assert alibi_bias(2, T, S).shape == (2, T, S)
    assert padding_mask([0, 0], S).shape == (2, 1, 1, S)
    q, k, v = qkv(B=2, H=2, T=T, S=S, D=4, D_v=3)
    out = attention(q, k, v, causal_mask(T, S) & padding_mask([0, S], S), bias=alibi_bias(2, T, S))
    assert torch.equal(out, torch.zeros(2, 2, T, 3, dtype=torch.float64))
    assert sinusoidal_positions(T, 4).shape == (T, 4)
    assert apply_rope(q).shape == q.shape


def test_masked_softmax_of_a_row_without_keys_is_empty():
    from course_lib.standard import masked_softmax

    assert masked_softmax(torch.zeros(2, 3, 0)).shape == (2, 3, 0)
    allowed = torch.zeros(2, 3, 0, dtype=torch.bool)
    assert masked_softmax(torch.zeros(2, 3, 0), allowed).shape == (2, 3, 0)


def test_cross_attention_with_different_key_and_value_widths_matches_torch():
    """kdim != vdim: keys and values come from two inputs, as in nn.MultiheadAttention."""
    ours = MultiHeadAttention(32, 4, kdim=24, vdim=20).double()
    theirs = copy_into_torch_mha(ours, kdim=24, vdim=20)
    x, key, value = randn(2, 3, 32, seed=10), randn(2, 7, 24, seed=11), randn(2, 7, 20, seed=12)
    mask = padding_mask([7, 5], 7)
    expected, expected_weights = theirs(
        x, key, value, key_padding_mask=~mask[:, 0, 0], average_attn_weights=False
    )
    out, weights = ours(x, key, value, mask=mask, return_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)


def test_cross_attention_with_a_separate_value_of_the_key_width_matches_torch():
    ours = MultiHeadAttention(8, 2, kdim=5, vdim=5).double()
    theirs = copy_into_torch_mha(ours, kdim=5, vdim=5)
    x, key, value = randn(2, 3, 8, seed=13), randn(2, 4, 5, seed=14), randn(2, 4, 5, seed=15)
    expected, _ = theirs(x, key, value)
    torch.testing.assert_close(ours(x, key, value), expected)


@pytest.mark.parametrize(
    "layer, args, name",
    [
        # Values cannot come from the keys' input when the widths differ.
        (
            MultiHeadAttention(32, 4, kdim=24, vdim=20),
            (torch.zeros(1, 3, 32), torch.zeros(1, 5, 24)),
            "value",
        ),
        # Keys cannot come from x when kdim differs from embed_dim.
        (MultiHeadAttention(32, 4, kdim=24, vdim=24), (torch.zeros(1, 3, 32),), "context"),
        (MultiHeadAttention(8, 2), (torch.zeros(1, 3, 8), None, torch.zeros(1, 3, 8)), "value"),
        (
            MultiHeadAttention(32, 4, kdim=24, vdim=20),
            (torch.zeros(1, 3, 32), torch.zeros(1, 5, 24), torch.zeros(1, 4, 20)),
            "value",
        ),
        (
            MultiHeadAttention(32, 4, kdim=24, vdim=20),
            (torch.zeros(1, 3, 32), torch.zeros(1, 5, 24), torch.zeros(1, 5, 24)),
            "value",
        ),
    ],
    ids=["no value", "no context", "value without context", "value length", "value width"],
)
def test_multi_head_attention_says_which_input_is_missing_or_wrong(layer, args, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        layer(*args)


def test_multi_head_attention_context_must_share_the_dtype_of_x():
    layer = MultiHeadAttention(8, 2)
    with pytest.raises(TypeError, match="^context .*dtype"):
        layer(torch.zeros(1, 3, 8), torch.zeros(1, 3, 8, dtype=torch.float64))
