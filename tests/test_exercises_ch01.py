"""Chapter 01's checkers against independent references: the layer reference of exercise 1.7 equals
torch.nn.MultiheadAttention, the plain-Python buckets of exercise 1.8 equal the library's t5_buckets, and
honest solutions written in other ways pass."""

import math

import pytest
import torch

from course_lib.exercises import Draw
from course_lib.exercises.ch01 import _reference_mha, _t5_bucket, check_multi_head_attention, check_t5_buckets
from course_lib.relative_positions import t5_buckets


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,S", [(5, 5), (3, 7), (1, 4)])
def test_the_layer_reference_equals_torch_multihead_attention(T, S, causal):
    generator = torch.Generator().manual_seed(T * 10 + S)
    B, H, D = 2, 3, 4
    d_model = H * D
    x = torch.randn(B, T, d_model, generator=generator, dtype=torch.float64)
    context = torch.randn(B, S, d_model, generator=generator, dtype=torch.float64)
    W_q, W_k, W_v, W_o = (
        torch.randn(d_model, d_model, generator=generator, dtype=torch.float64) for _ in range(4)
    )
    lengths = [S, max(1, S - 2)]  # every query sees a key, so PyTorch's layer gives no NaN
    layer = torch.nn.MultiheadAttention(d_model, H, bias=False, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        layer.in_proj_weight.copy_(torch.cat([W_q.T, W_k.T, W_v.T]))
        layer.out_proj.weight.copy_(W_o.T)
        hidden = torch.arange(S)[None, :] > torch.arange(T)[:, None] + (S - T) if causal else None
        padding = torch.arange(S)[None, :] >= torch.tensor(lengths)[:, None]
        theirs = layer(x, context, context, key_padding_mask=padding, attn_mask=hidden, need_weights=False)[0]
    ours = _reference_mha(x, context, W_q, W_k, W_v, W_o, H, lengths, causal)
    torch.testing.assert_close(ours, theirs)


def test_the_layer_reference_gives_zeros_before_w_o_where_a_query_sees_nothing():
    x = torch.randn(1, 4, 6, dtype=torch.float64)
    W = [torch.eye(6, dtype=torch.float64)] * 4
    out = _reference_mha(x, x[:, :2], *W, 2, None, True)  # T = 4 > S = 2: queries 0 and 1 see no key
    assert torch.equal(out[:, :2], torch.zeros(1, 2, 6, dtype=torch.float64)) and out[:, 2:].abs().sum() > 0


@pytest.mark.parametrize(
    "bidirectional,num_buckets,max_distance",
    [(True, 32, 128), (False, 32, 128), (True, 8, 20), (False, 6, 7), (True, 16, 16), (False, 16, 80)],
)
def test_the_plain_python_buckets_equal_the_library(bidirectional, num_buckets, max_distance):
    relative = torch.arange(-3 * max_distance - 5, 3 * max_distance + 6)
    ours = [_t5_bucket(int(r), bidirectional, num_buckets, max_distance) for r in relative]
    theirs = t5_buckets(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    assert ours == theirs.tolist()


def test_the_bucket_cases_hold_the_edges_and_both_directions():
    cases = list(check_t5_buckets.cases(Draw(0)))
    assert len(cases) == 5
    first = cases[0].args[0]
    for edge in (0, 1, -1, 7, 8, -8, 127, 128, -128, 10**6, -(10**6)):
        assert edge in first.tolist()
    assert cases[-1].args[0].dtype == torch.int32 and cases[-1].args[0].dim() == 2


def _hugging_face_buckets(relative_position, *, bidirectional, num_buckets, max_distance):
    """T5's buckets as the transformers library writes them (float32 logarithms)."""
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).to(torch.long) * num_buckets
        n = torch.abs(n)
    else:
        n = torch.max(n, torch.zeros_like(n))
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    val_if_large = torch.min(val_if_large, torch.full_like(val_if_large, num_buckets - 1))
    return ret + torch.where(is_small, n, val_if_large)


def _layer_from_parts(x, context, W_q, W_k, W_v, W_o, num_heads, lengths=None, causal=False):
    """An honest layer written another way: one head at a time, masks built as additive -inf biases."""
    B, T, d_model = x.shape
    S = context.shape[1]
    D = d_model // num_heads
    bias = torch.zeros(B, T, S, dtype=x.dtype)
    if lengths is not None:
        for b, length in enumerate(lengths):
            bias[b, :, length:] = float("-inf")
    if causal:
        for i in range(T):
            bias[:, i, max(0, i + S - T + 1) :] = float("-inf")  # a negative start would count from the end
    heads = []
    for h in range(num_heads):
        cols = slice(h * D, (h + 1) * D)
        scores = (x @ W_q[:, cols]) @ (context @ W_k[:, cols]).transpose(1, 2) / D**0.5 + bias
        top = scores.amax(-1, keepdim=True).clamp(min=-1e300).nan_to_num(0.0, neginf=0.0)
        weights = torch.exp(scores - top)
        total = weights.sum(-1, keepdim=True)
        heads.append(weights / torch.where(total > 0, total, 1) @ (context @ W_v[:, cols]))
    return torch.cat(heads, -1) @ W_o


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_honest_solutions_written_other_ways_pass(seed):
    assert check_t5_buckets.run(_hugging_face_buckets, seed=seed), "float32 logarithms give the same buckets"
    outcome = check_multi_head_attention.run(_layer_from_parts, seed=seed)
    assert outcome, outcome.message
