"""Score modifications inside course_lib.tiling.flash_attention: ALiBi, T5's buckets, a soft cap.

Every result is checked against dense attention with the same bias built as a whole ``T x S``
tensor (course_lib.standard.attention with ``bias=``, or the dense scores written out here), against
FlexAttention's ``score_mod`` (forward only: it has no CPU backward in torch 2.13), and the
gradients of a learned table against autograd through the dense bias and by gradcheck.
"""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from course_lib.relative_positions import T5RelativeBias, t5_bias, t5_score_mod
from course_lib.standard import alibi_bias, attention
from course_lib.tiling import (
    FlashStats,
    alibi_score_mod,
    flash_attention,
    flash_attention_trace,
    flash_backward,
    flash_forward_fa1,
    flash_forward_fa2,
    soft_cap_score_mod,
)

LOOP_ORDERS = ["fa1", "fa2"]


def make_qkv(B, H, T, S, D, Dv=None, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=generator, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, S, D, generator=generator, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, S, Dv or D, generator=generator, dtype=torch.float64).to(dtype)
    return q, k, v


def dense_with_scores(q, k, v, modify, causal=False, scale=None):
    """softmax(modify(scale q k^T)) v in float64 with the T x S scores written out; zeros for empty rows.

    ``modify(scores, query_positions, key_positions)`` acts on the whole (B, H, T, S) matrix.
    Returns the output and the logsumexp of each row.
    """
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    scale = D**-0.5 if scale is None else scale
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    rows, cols = torch.arange(T).view(T, 1), torch.arange(S).view(1, S)
    scores = modify(scores, rows, cols)
    if causal:
        scores = scores.masked_fill(cols > rows + (S - T), float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v.double(), torch.logsumexp(scores, dim=-1)


def t5_table(H, buckets=16, seed=1, dtype=torch.float64):
    return torch.randn(buckets, H, generator=torch.Generator().manual_seed(seed), dtype=dtype)


SHAPES = [
    # B, H, T, S, D, Dv, block_q, block_k
    (1, 1, 1, 1, 1, 1, 64, 64),
    (2, 3, 7, 7, 5, 5, 1, 1),
    (1, 2, 13, 13, 4, 3, 4, 5),
    (2, 1, 9, 17, 3, 6, 4, 4),
    (1, 2, 17, 9, 6, 2, 5, 3),
    (1, 4, 1, 23, 8, 8, 1, 7),
    (1, 1, 6, 11, 7, 7, 6, 100),
]
SHAPE_IDS = [f"B{b}-H{h}-T{t}-S{s}-D{d}-Dv{dv}-bq{bq}-bk{bk}" for b, h, t, s, d, dv, bq, bk in SHAPES]


# --- forward: equal to dense attention with the whole bias ------------------------------------------


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B, H, T, S, D, Dv, block_q, block_k", SHAPES, ids=SHAPE_IDS)
def test_alibi_and_t5_equal_dense_attention_with_the_whole_bias(
    B, H, T, S, D, Dv, block_q, block_k, causal, loop_order
):
    q, k, v = make_qkv(B, H, T, S, D, Dv)
    options = dict(causal=causal, block_q=block_q, block_k=block_k, loop_order=loop_order, return_lse=True)
    # ALiBi: the library's (H, T, S) bias, queries aligned to the end of the keys.
    out, lse = flash_attention(q, k, v, score_mod=alibi_score_mod(H, offset=S - T), **options)
    bias = alibi_bias(H, T, S).double()
    torch.testing.assert_close(out, attention(q, k, v, causal=causal, bias=bias))
    expected_lse = dense_with_scores(q, k, v, lambda s, i, j: s + bias, causal)[1]
    torch.testing.assert_close(lse, expected_lse)
    # T5: the (H, T, S) bias of t5_bias, bidirectional and causal buckets.
    for bidirectional in (True, False):
        table = t5_table(H)
        mod = t5_score_mod(table, bidirectional=bidirectional, max_distance=20, offset=S - T)
        out = flash_attention(q, k, v, score_mod=mod, **options)[0]
        bias = t5_bias(table, T, S, bidirectional=bidirectional, max_distance=20)
        torch.testing.assert_close(out, attention(q, k, v, causal=causal, bias=bias))


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_soft_cap_equals_dense_capped_scores_with_huge_logits(causal, loop_order):
    q, k, v = make_qkv(2, 2, 11, 14, 4, 3)
    q = 40 * q  # scores in the hundreds: the cap decides everything
    cap = 5.0
    out, lse = flash_attention(
        q,
        k,
        v,
        causal=causal,
        block_q=3,
        block_k=4,
        loop_order=loop_order,
        return_lse=True,
        score_mod=soft_cap_score_mod(cap),
    )
    expected, expected_lse = dense_with_scores(q, k, v, lambda s, i, j: cap * torch.tanh(s / cap), causal)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, expected_lse)
    visible = torch.isfinite(lse)
    assert (lse[visible] <= cap + math.log(14) + 1e-9).all()  # every capped score is below cap


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
def test_mod_reads_batch_head_and_both_indices(loop_order):
    B, H, T, S = 3, 2, 7, 10
    q, k, v = make_qkv(B, H, T, S, 4)

    def mod(score, batch, head, query_index, key_index):
        return score + 0.5 * batch - 0.3 * head + 0.05 * query_index * key_index - 0.1 * key_index

    out = flash_attention(q, k, v, causal=True, block_q=3, block_k=4, loop_order=loop_order, score_mod=mod)
    batch = torch.arange(B).view(B, 1, 1, 1)
    head = torch.arange(H).view(1, H, 1, 1)
    expected = dense_with_scores(
        q, k, v, lambda s, i, j: s + 0.5 * batch - 0.3 * head + 0.05 * i * j - 0.1 * j, causal=True
    )[0]
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
def test_fully_masked_rows_give_zeros_with_a_mod(loop_order):
    # Causal with T > S: the first 5 queries see nothing; and a mod that masks query 6 entirely.
    q, k, v = make_qkv(1, 2, 9, 4, 3)

    def mod(score, batch, head, query_index, key_index):
        return torch.where(query_index == 6, float("-inf"), score - 0.2 * (key_index - query_index).abs())

    out, lse = flash_attention(
        q, k, v, causal=True, block_q=2, block_k=3, loop_order=loop_order, return_lse=True, score_mod=mod
    )
    expected, expected_lse = dense_with_scores(
        q,
        k,
        v,
        lambda s, i, j: torch.where(i == 6, float("-inf"), s - 0.2 * (j - i).abs()),
        causal=True,
    )
    assert torch.isfinite(out).all()
    assert (out[:, :, :5] == 0).all() and (out[:, :, 6] == 0).all()
    assert torch.isneginf(lse[:, :, :5]).all() and torch.isneginf(lse[:, :, 6]).all()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, expected_lse)


@given(
    T=st.integers(0, 10),
    S=st.integers(0, 10),
    block_q=st.integers(1, 12),
    block_k=st.integers(1, 12),
    causal=st.booleans(),
    loop_order=st.sampled_from(LOOP_ORDERS),
)
@settings(deadline=None, max_examples=40)
def test_property_any_shape_and_blocks_with_alibi(T, S, block_q, block_k, causal, loop_order):
    q, k, v = make_qkv(1, 3, T, S, 3, seed=T * 100 + S)
    out = flash_attention(
        q,
        k,
        v,
        causal=causal,
        block_q=block_q,
        block_k=block_k,
        loop_order=loop_order,
        score_mod=alibi_score_mod(3, offset=S - T),
    )
    # ALiBi's slopes for 3 heads (2 of the power of two below, then every other one of the next),
    # written out here rather than taken from the library.
    slopes = torch.tensor([2**-4, 2**-8, 2**-2], dtype=torch.float64)
    expected = dense_with_scores(
        q, k, v, lambda s, i, j: s - slopes.view(1, 3, 1, 1) * (i + (S - T) - j).abs(), causal
    )[0]
    torch.testing.assert_close(out, expected)


def test_half_precision_with_a_mod_returns_input_dtype_and_is_close():
    q, k, v = make_qkv(1, 2, 21, 21, 16, dtype=torch.bfloat16)
    table = t5_table(2, dtype=torch.float32)
    out = flash_attention(q, k, v, causal=True, block_q=8, block_k=8, score_mod=t5_score_mod(table))
    assert out.dtype == torch.bfloat16
    expected = attention(q.double(), k.double(), v.double(), causal=True, bias=t5_bias(table.double(), 21))
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_the_plain_loops_take_the_mod_too():
    q, k, v = make_qkv(2, 2, 7, 12, 3, 5)
    mod = alibi_score_mod(2, offset=5)
    expected = attention(q, k, v, causal=True, bias=alibi_bias(2, 7, 12).double())
    for forward in (flash_forward_fa1, flash_forward_fa2):
        out, _ = forward(q, k, v, causal=True, block_q=3, block_k=4, score_mod=mod)
        torch.testing.assert_close(out, expected)
    steps = flash_attention_trace(q, k, v, causal=True, block_q=7, block_k=4, score_mod=mod)
    torch.testing.assert_close(steps[-1].output, expected)


def test_counts_of_tiles_and_io_do_not_depend_on_the_mod():
    q, k, v = make_qkv(1, 2, 20, 20, 4)
    plain, modified = FlashStats(), FlashStats()
    flash_attention(q, k, v, causal=True, block_q=4, block_k=4, stats=plain)
    flash_attention(
        q, k, v, causal=True, block_q=4, block_k=4, stats=modified, score_mod=soft_cap_score_mod(3)
    )
    assert plain == modified and plain.blocks_skipped == 10


# --- FlexAttention's score_mod: the same function, the same numbers ----------------------------------


def _flex(q, k, v, mod, causal):
    from torch.nn.attention.flex_attention import flex_attention

    offset = k.shape[2] - q.shape[2]

    def masked(score, batch, head, query_index, key_index):
        modified = mod(score, batch, head, query_index, key_index)
        if not causal:
            return modified
        return torch.where(key_index <= query_index + offset, modified, float("-inf"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention on CPU warns that it is unfused
        return flex_attention(q, k, v, score_mod=masked, return_lse=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize(
    "T, S, causal", [(13, 13, True), (7, 19, True), (16, 11, False), (9, 5, True)], ids=lambda x: str(x)
)
def test_forward_matches_flex_attention_with_the_same_score_mod(T, S, causal, dtype):
    B, H = 2, 4
    q, k, v = make_qkv(B, H, T, S, 8, dtype=dtype)
    table = t5_table(H, buckets=32, dtype=dtype)
    mods = {
        "alibi": alibi_score_mod(H, offset=S - T),
        "t5": t5_score_mod(table, bidirectional=not causal, max_distance=64, offset=S - T),
        "soft cap": soft_cap_score_mod(2.0),
    }
    tolerance = {} if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    for name, mod in mods.items():
        expected, expected_lse = _flex(q, k, v, mod, causal)
        out, lse = flash_attention(
            q, k, v, causal=causal, block_q=4, block_k=6, return_lse=True, score_mod=mod
        )
        torch.testing.assert_close(out, expected, **tolerance, msg=lambda m, name=name: f"{name}: {m}")
        visible = torch.isfinite(expected_lse)  # flex's lse of an empty row: -inf as ours
        assert torch.equal(visible, torch.isfinite(lse))
        torch.testing.assert_close(lse[visible], expected_lse[visible], **tolerance)


# --- backward: the modification's derivative and the gradient of a learned table ---------------------


@pytest.mark.parametrize("loop_order", LOOP_ORDERS)
@pytest.mark.parametrize(
    "T, S, causal, block_q, block_k",
    [(5, 5, False, 2, 3), (4, 7, True, 3, 2), (6, 3, True, 2, 2), (1, 4, True, 1, 1)],
    ids=["T5-S5", "T4-S7-causal", "T6-S3-causal-empty-rows", "T1-S4-causal"],
)
def test_gradcheck_of_the_t5_table_and_of_qkv(T, S, causal, block_q, block_k, loop_order):
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, T, S, 3, 2))
    table = t5_table(2, buckets=8).requires_grad_()

    def function(q, k, v, table):
        mod = t5_score_mod(table, bidirectional=not causal, max_distance=6, offset=S - T)
        out, lse = flash_attention(
            q,
            k,
            v,
            causal=causal,
            block_q=block_q,
            block_k=block_k,
            loop_order=loop_order,
            return_lse=True,
            score_mod=mod,
        )
        return out, torch.where(torch.isfinite(lse), lse, 0)  # an empty row's lse is -inf: no gradient

    assert torch.autograd.gradcheck(function, (q, k, v, table))


@pytest.mark.parametrize(
    "mod", [soft_cap_score_mod(1.5), alibi_score_mod(2, offset=2)], ids=["soft cap", "alibi"]
)
def test_gradcheck_through_a_mod_whose_derivative_depends_on_the_score(mod):
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 5, 7, 3))
    q.data *= 3  # the cap's tanh far from linear

    def function(q, k, v):
        return flash_attention(q, k, v, causal=True, block_q=2, block_k=3, return_lse=True, score_mod=mod)

    assert torch.autograd.gradcheck(function, (q, k, v))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_table_gradient_equals_autograd_through_the_dense_bias(causal):
    B, H, T, S = 2, 3, 19, 23
    q, k, v = (x.requires_grad_() for x in make_qkv(B, H, T, S, 8, 5))
    table = t5_table(H, buckets=16).requires_grad_()
    grad_out = torch.randn(B, H, T, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    leaves = (q, k, v, table)
    mod = t5_score_mod(table, bidirectional=not causal, max_distance=12, offset=S - T)
    out = flash_attention(q, k, v, causal=causal, block_q=4, block_k=5, score_mod=mod)
    mine = torch.autograd.grad(out, leaves, grad_out)
    bias = t5_bias(table, T, S, bidirectional=not causal, max_distance=12)
    expected = torch.autograd.grad(attention(q, k, v, causal=causal, bias=bias), leaves, grad_out)
    for got, want in zip(mine, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert table.grad is None and mine[3].abs().sum() > 0


def test_a_t5_module_trains_through_the_tiles_and_a_derived_table_gets_its_gradient():
    torch.manual_seed(0)
    module = T5RelativeBias(2, num_buckets=8, max_distance=10, init_std=1.0).double()
    q, k, v = make_qkv(1, 2, 9, 9, 4)
    # .backward() into the module's parameter, as in training.
    flash_attention(q, k, v, causal=True, block_q=4, block_k=4, score_mod=module.score_mod()).sum().backward()
    mine = module.table.weight.grad.clone()
    module.zero_grad()
    attention(q, k, v, causal=True, bias=module(9)).sum().backward()
    torch.testing.assert_close(mine, module.table.weight.grad)
    # A table computed from a parameter (not a leaf): the gradient reaches the parameter.
    raw = t5_table(2, buckets=8).requires_grad_()
    mod = t5_score_mod(torch.nn.functional.softplus(raw), bidirectional=False, max_distance=10)
    got = torch.autograd.grad(
        flash_attention(q, k, v, causal=True, block_q=2, block_k=3, score_mod=mod).sum(), raw
    )
    bias = t5_bias(torch.nn.functional.softplus(raw), 9, bidirectional=False, max_distance=10)
    want = torch.autograd.grad(attention(q, k, v, causal=True, bias=bias).sum(), raw)
    torch.testing.assert_close(got, want)


def test_flash_backward_returns_the_inputs_gradients_as_a_fourth_item():
    q, k, v = make_qkv(1, 2, 6, 8, 3)
    table = t5_table(2, buckets=8).requires_grad_()
    mod = t5_score_mod(table, max_distance=6, offset=2)
    with torch.no_grad():
        out, lse = flash_forward_fa2(q, k, v, causal=True, block_q=4, block_k=4, score_mod=mod)
    grad_out = torch.ones_like(out)
    grads = flash_backward(q, k, v, out, lse, grad_out, causal=True, block_q=4, block_k=4, score_mod=mod)
    assert len(grads) == 3
    grads = flash_backward(
        q,
        k,
        v,
        out,
        lse,
        grad_out,
        causal=True,
        block_q=4,
        block_k=4,
        score_mod=mod,
        score_mod_inputs=(table,),
    )
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, table)]
    bias = t5_bias(leaves[3], 6, 8, max_distance=6)
    expected = torch.autograd.grad(attention(*leaves[:3], causal=True, bias=bias).sum(), leaves)
    for got, want in zip((*grads[:3], *grads[3]), expected, strict=True):
        torch.testing.assert_close(got, want)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of every tensor any operation returns, backward pass included."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for item in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return result


def test_no_t_by_s_tensor_with_a_learned_bias_forward_or_backward():
    T, S, D, H = 48, 40, 2, 1
    q, k, v = (x.requires_grad_() for x in make_qkv(1, H, T, S, D))
    table = t5_table(H, buckets=8).requires_grad_()
    mod = t5_score_mod(table, bidirectional=False, max_distance=20, offset=S - T)
    with _LargestTensor() as forward:
        out = flash_attention(q, k, v, causal=True, block_q=8, block_k=8, score_mod=mod)
    with _LargestTensor() as backward:
        out.sum().backward()
    assert 8 * 8 <= forward.largest < T * S // 4
    assert backward.largest < T * S // 4
    assert table.grad is not None and table.grad.abs().sum() > 0
    with _LargestTensor() as dense:  # the detector does see the whole bias of the dense reference
        t5_bias(table, T, S, bidirectional=False, max_distance=20)
    assert dense.largest >= T * S


# --- bad input ----------------------------------------------------------------------------------------

_q, _k, _v = make_qkv(1, 2, 4, 4, 3)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: flash_attention(_q, _k, _v, score_mod=3), TypeError, "score_mod"),
        (lambda: flash_forward_fa2(_q, _k, _v, score_mod="alibi"), TypeError, "score_mod"),
        (
            lambda: flash_attention(_q, _k, _v, score_mod=lambda s, b, h, i, j: s[:, :, :2]),
            ValueError,
            "score_mod",
        ),
        (lambda: flash_attention(_q, _k, _v, score_mod=lambda s, b, h, i, j: i + j), TypeError, "score_mod"),
        (lambda: flash_attention(_q, _k, _v, score_mod=lambda s, b, h, i, j: 1.0), TypeError, "score_mod"),
        (lambda: alibi_score_mod(0), ValueError, "num_heads"),
        (lambda: alibi_score_mod(2, offset=1.5), TypeError, "offset"),
        (lambda: soft_cap_score_mod(0.0), ValueError, "cap"),
        (lambda: soft_cap_score_mod(float("nan")), ValueError, "cap"),
        (lambda: soft_cap_score_mod(float("inf")), ValueError, "cap"),
        (lambda: soft_cap_score_mod("big"), TypeError, "cap"),
        (
            lambda: flash_backward(_q, _k, _v, _v, _q[..., 0], _v, score_mod=None, score_mod_inputs=([1.0],)),
            TypeError,
            "score_mod_inputs",
        ),
        (
            lambda: flash_backward(_q, _k, _v, _v, _q[..., 0], _v, score_mod_inputs=(torch.zeros(2),)),
            ValueError,
            "score_mod_inputs",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()
