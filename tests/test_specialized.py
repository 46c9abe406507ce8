"""Tests for chapter 08's specialised variants: differential attention, SwitchHead, ring attention,
hybrid stacks. Every function is compared with a reference written here (dense float64 formulas,
PyTorch's scaled_dot_product_attention) or with single-process attention; ring attention runs on
real gloo process groups (forked CPU processes, plus one spawned run)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from course_lib.specialized import (
    DifferentialAttention,
    HybridAttentionStack,
    HybridLayer,
    SwitchHeadAttention,
    all_gather_attention,
    communication_cost,
    differential_attention,
    differential_lambda_init,
    expert_projection,
    hybrid_pattern,
    mixer_cost,
    ring_attention,
    ring_work,
    route_top_k,
    run_distributed,
    run_ring_attention,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)
from course_lib.specialized.ring.attention import _block_gradients, _partial_attention
from course_lib.standard import attention

F64 = torch.float64


def randn(*shape, dtype=F64, requires_grad=False):
    return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)


def dense_softmax(q, k, allowed=None, scale=None):
    """Reference softmax(q k^T * scale) in float64, masked entries zero, empty rows zero."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.nan_to_num(weights, nan=0.0)


def end_aligned_causal(T, S):
    return torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)


# --- differential attention ----------------------------------------------------------------------


def test_lambda_init_follows_the_paper():
    # Differential Transformer, section 2.1: lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)).
    assert differential_lambda_init(1) == pytest.approx(0.2)
    assert differential_lambda_init(2) == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
    assert differential_lambda_init(100) == pytest.approx(0.8, abs=1e-9)
    values = [differential_lambda_init(layer) for layer in range(1, 10)]
    assert values == sorted(values)


@pytest.mark.parametrize(
    "B, H, T, S, D, D_v, causal, per_head",
    [
        (2, 3, 5, 5, 4, 8, False, False),
        (1, 2, 1, 6, 3, 6, True, True),
        (2, 1, 7, 4, 5, 3, True, False),
        (1, 2, 6, 9, 7, 14, False, True),
    ],
    ids=["B2-H3-T5-Dv2D", "T1-decode-causal-perhead", "S<T-causal-oddD", "cross-S!=T-perhead"],
)
def test_differential_attention_matches_dense_formula(B, H, T, S, D, D_v, causal, per_head):
    q1, q2 = randn(B, H, T, D), randn(B, H, T, D)
    k1, k2 = randn(B, H, S, D), randn(B, H, S, D)
    v = randn(B, H, S, D_v)
    lam = torch.rand(H, dtype=F64) if per_head else 0.37
    allowed = end_aligned_causal(T, S) if causal else None
    lam_view = lam.view(1, H, 1, 1) if per_head else lam
    expected_map = dense_softmax(q1, k1, allowed) - lam_view * dense_softmax(q2, k2, allowed)
    out, weights = differential_attention(q1, k1, q2, k2, v, lam, causal=causal, return_weights=True)
    torch.testing.assert_close(weights, expected_map)
    torch.testing.assert_close(out, expected_map @ v)


def test_differential_attention_with_zero_lambda_is_sdpa():
    q1, k1, q2, k2, v = (
        randn(2, 2, 6, 4),
        randn(2, 2, 6, 4),
        randn(2, 2, 6, 4),
        randn(2, 2, 6, 4),
        randn(2, 2, 6, 4),
    )
    out = differential_attention(q1, k1, q2, k2, v, 0.0, causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q1, k1, v, is_causal=True))


def test_differential_attention_mask_and_fully_masked_row():
    q1, k1, q2, k2, v = (
        randn(1, 2, 4, 3),
        randn(1, 2, 5, 3),
        randn(1, 2, 4, 3),
        randn(1, 2, 5, 3),
        randn(1, 2, 5, 2),
    )
    mask = torch.rand(1, 1, 4, 5) > 0.4
    mask[..., 2, :] = False  # query 2 sees nothing
    out = differential_attention(q1, k1, q2, k2, v, 0.5, mask, scale=0.7)
    expected = (dense_softmax(q1, k1, mask, 0.7) - 0.5 * dense_softmax(q2, k2, mask, 0.7)) @ v
    torch.testing.assert_close(out, expected)
    assert torch.isfinite(out).all() and (out[..., 2, :] == 0).all()


@given(
    T=st.integers(1, 6),
    S=st.integers(1, 6),
    lam=st.floats(-1.0, 1.0),
)
def test_differential_rows_sum_to_one_minus_lambda(T, S, lam):
    shape_q, shape_k = (1, 2, T, 3), (1, 2, S, 3)
    _, weights = differential_attention(
        randn(*shape_q),
        randn(*shape_k),
        randn(*shape_q),
        randn(*shape_k),
        randn(*shape_k),
        lam,
        return_weights=True,
    )
    torch.testing.assert_close(weights.sum(-1), torch.full((1, 2, T), 1.0 - lam, dtype=F64))


def test_differential_attention_gradcheck():
    tensors = [randn(1, 2, 3, 2).requires_grad_() for _ in range(5)]
    lam = torch.tensor([0.3, 0.6], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c, d, e, lam: differential_attention(a, b, c, d, e, lam, causal=True), (*tensors, lam)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_differential_attention_half_precision(dtype):
    tensors = [randn(1, 2, 8, 4) for _ in range(5)]
    expected = differential_attention(*tensors, 0.4, causal=True)
    out = differential_attention(*[t.to(dtype) for t in tensors], 0.4, causal=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)


def test_differential_layer_equals_hand_computation():
    torch.manual_seed(1)
    layer = DifferentialAttention(8, 2, layer_index=3).double()
    x = randn(2, 5, 8)
    out = layer(x, causal=True)
    # By hand: head h takes query/key halves [2hD, 2hD + D) and [2hD + D, 2hD + 2D), values [2hD, 2hD + 2D).
    D, lam_init = 2, 0.8 - 0.6 * math.exp(-0.3 * 2)
    lam = (
        torch.exp(layer.lambda_q1 @ layer.lambda_k1) - torch.exp(layer.lambda_q2 @ layer.lambda_k2) + lam_init
    )
    q, k, v = x @ layer.W_q.weight.T, x @ layer.W_k.weight.T, x @ layer.W_v.weight.T
    causal = end_aligned_causal(5, 5)
    heads = []
    for h in range(2):
        q1, q2 = q[..., 2 * h * D : 2 * h * D + D], q[..., 2 * h * D + D : 2 * h * D + 2 * D]
        k1, k2 = k[..., 2 * h * D : 2 * h * D + D], k[..., 2 * h * D + D : 2 * h * D + 2 * D]
        head = (dense_softmax(q1, k1, causal) - lam * dense_softmax(q2, k2, causal)) @ v[
            ..., 2 * h * D : 2 * h * D + 2 * D
        ]
        rms = head / torch.sqrt(head.pow(2).mean(-1, keepdim=True) + 1e-5)
        heads.append(rms * layer.head_norm.weight * (1 - lam_init))
    expected = torch.cat(heads, dim=-1) @ layer.W_o.weight.T
    torch.testing.assert_close(out, expected)
    assert abs(layer.lambda_init - lam_init) < 1e-12


def test_differential_layer_gradcheck_and_weights():
    layer = DifferentialAttention(4, 1).double()
    x = randn(1, 3, 4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x, causal=True), (x,))
    _, weights = layer(x, return_weights=True)
    assert weights.shape == (1, 1, 3, 3)
    out = layer(x, causal=True)
    out.sum().backward()
    assert layer.lambda_q1.grad is not None and torch.isfinite(layer.lambda_q1.grad).all()


def test_differential_bad_input():
    a = randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="q2"):
        differential_attention(a, a, randn(1, 2, 4, 4), a, a, 0.5)
    with pytest.raises(ValueError, match="lambda_"):
        differential_attention(a, a, a, a, a, torch.ones(3, dtype=F64))
    with pytest.raises(TypeError, match="lambda_"):
        differential_attention(a, a, a, a, a, "0.5")
    with pytest.raises(TypeError, match="^q2 must have the dtype of q1"):  # like q, k and v
        differential_attention(a, a, a.float(), a, a, 0.5)
    with pytest.raises(ValueError, match="k2"):
        differential_attention(a, a, a, randn(1, 2, 5, 4), a, 0.5)
    with pytest.raises(TypeError, match="causal"):
        differential_attention(a, a, a, a, a, 0.5, causal=1)
    with pytest.raises(TypeError, match="scale"):
        differential_attention(a, a, a, a, a, 0.5, scale="big")
    with pytest.raises(ValueError, match="layer_index"):
        differential_lambda_init(0)
    with pytest.raises(ValueError, match="embed_dim"):
        DifferentialAttention(6, 2)
    with pytest.raises(ValueError, match="x"):
        DifferentialAttention(8, 2)(torch.randn(1, 3, 6))


# --- SwitchHead ------------------------------------------------------------------------------------


def test_route_top_k_is_sigmoid_top_k():
    logits = randn(5, 3, 6)
    weights, indices = route_top_k(logits, 2)
    scores = 1 / (1 + torch.exp(-logits))
    for n in range(5):
        for h in range(3):
            best = sorted(range(6), key=lambda e: -scores[n, h, e].item())[:2]
            assert set(indices[n, h].tolist()) == set(best)
            torch.testing.assert_close(weights[n, h].sort().values, scores[n, h, best].sort().values)
    soft_weights, _ = route_top_k(logits, 6, gate="softmax")
    torch.testing.assert_close(soft_weights.sum(-1), torch.ones(5, 3, dtype=F64))


def dense_switchhead(layer, x, causal, mask=None):
    """SwitchHead computed densely: every expert on every token, multiplied by a 0/gate mask."""
    B, T, C = x.shape
    H, D, k = layer.num_heads, layer.head_dim, layer.top_k

    def gate_mask(router):
        scores = torch.sigmoid(torch.einsum("btc,hce->bthe", x, router))
        threshold = scores.topk(k, dim=-1).values[..., -1:]
        return torch.where(scores >= threshold, scores, torch.zeros_like(scores))  # (B, T, H, E)

    value_gates, output_gates = gate_mask(layer.value_router), gate_mask(layer.output_router)
    all_values = torch.einsum("btc,hecd->bthed", x, layer.value_experts)
    v = (value_gates.unsqueeze(-1) * all_values).sum(3).transpose(1, 2)  # (B, H, T, D)
    q = (x @ layer.W_q.weight.T).view(B, T, H, D).transpose(1, 2)
    kk = (x @ layer.W_k.weight.T).view(B, T, H, D).transpose(1, 2)
    allowed = end_aligned_causal(T, T) if causal else torch.ones(T, T, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask
    heads = (dense_softmax(q, kk, allowed) @ v).transpose(1, 2)  # (B, T, H, D)
    all_outputs = torch.einsum("bthd,hedc->bthec", heads, layer.output_experts)
    return (output_gates.unsqueeze(-1) * all_outputs).sum(dim=(2, 3))


@pytest.mark.parametrize(
    "H, E, k, T, causal",
    [(2, 4, 2, 5, False), (1, 3, 1, 1, True), (3, 5, 3, 7, True), (2, 2, 2, 4, False)],
    ids=["H2-E4-k2", "T1-k1-causal", "H3-E5-k3-causal", "k=E-all-experts"],
)
def test_switchhead_matches_dense_mixture(H, E, k, T, causal):
    layer = SwitchHeadAttention(12, H, E, head_dim=4, top_k=k).double()
    x = randn(2, T, 12)
    out, stats = layer(x, causal=causal, return_stats=True)
    torch.testing.assert_close(out, dense_switchhead(layer, x, causal))
    assert stats.attention_matrices == H and stats.dense_equivalent_matrices == H * E
    torch.testing.assert_close(stats.value_load.sum(-1), torch.full((H,), float(k)))
    # The load is how often each expert was chosen: recount it from the routing.
    scores = torch.sigmoid(torch.einsum("btc,hce->bthe", x, layer.value_router))
    chosen = scores >= scores.topk(k, dim=-1).values[..., -1:]
    torch.testing.assert_close(stats.value_load, chosen.double().mean(dim=(0, 1)).float())


def test_switchhead_padding_mask_and_fully_masked_row():
    layer = SwitchHeadAttention(8, 2, 3).double()
    x = randn(2, 4, 8)
    mask = torch.rand(2, 1, 4, 4) > 0.3
    mask[1, :, 2] = False  # query 2 of the second sequence sees nothing
    out = layer(x, mask=mask)
    torch.testing.assert_close(out, dense_switchhead(layer, x, False, mask))
    assert (out[1, 2] == 0).all()


def test_switchhead_one_expert_softmax_gate_is_multi_head_attention():
    layer = SwitchHeadAttention(6, 2, 1, top_k=1, gate="softmax").double()
    x = randn(2, 5, 6)
    # With one expert, softmax gates are exactly 1: W_V and W_O are just that expert's matrices.
    q = (x @ layer.W_q.weight.T).view(2, 5, 2, 3).transpose(1, 2)
    k = (x @ layer.W_k.weight.T).view(2, 5, 2, 3).transpose(1, 2)
    v = torch.einsum("btc,hcd->bhtd", x, layer.value_experts[:, 0])
    heads = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = torch.einsum("bhtd,hdc->btc", heads, layer.output_experts[:, 0])
    torch.testing.assert_close(layer(x, causal=True), expected)


@pytest.mark.parametrize("prompt", [0, 1, 4], ids=["no-prompt", "prompt-1", "prompt-4"])
def test_switchhead_decodes_from_a_kv_cache_of_its_heads(prompt):
    layer = SwitchHeadAttention(12, 3, 4, head_dim=4, top_k=2).double()
    x = randn(2, 7, 12)
    cache = layer.make_cache(1, 2, 7, dtype=F64)
    outputs = [layer(x[:, :prompt], causal=True, cache=cache)] if prompt else []
    outputs += [layer(x[:, t : t + 1], causal=True, cache=cache) for t in range(prompt, 7)]
    torch.testing.assert_close(torch.cat(outputs, dim=1), dense_switchhead(layer, x, causal=True))
    # the cache holds H heads of keys and (expert-mixed) values per token: 2 H D numbers
    keys, values = cache.get(0)
    assert keys.shape == values.shape == (2, 3, 7, 4)
    torch.testing.assert_close(keys, (x @ layer.W_k.weight.T).view(2, 7, 3, 4).transpose(1, 2))


def test_switchhead_cache_bad_input():
    layer = SwitchHeadAttention(8, 2, 3)
    with pytest.raises(TypeError, match="^cache"):
        layer(torch.randn(1, 2, 8), cache=torch.zeros(3))
    with pytest.raises(ValueError, match="max_len"):
        layer(torch.randn(1, 5, 8), cache=layer.make_cache(1, 1, 4))


def test_switchhead_gradcheck():
    layer = SwitchHeadAttention(4, 2, 3, head_dim=2, top_k=2).double()
    x = randn(1, 3, 4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))
    x2 = randn(4, 3)
    experts = randn(2, 3, 3, 2, requires_grad=True)
    weights, indices = route_top_k(randn(4, 2, 3), 2)
    weights.requires_grad_()
    assert torch.autograd.gradcheck(lambda w, e: expert_projection(x2, w, indices, e), (weights, experts))


def test_switchhead_half_precision():
    layer = SwitchHeadAttention(8, 2, 3)
    x = torch.randn(1, 4, 8)
    out = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_switchhead_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        SwitchHeadAttention(8, 2, 3, top_k=4)
    with pytest.raises(ValueError, match="gate"):
        SwitchHeadAttention(8, 2, 3, gate="relu")
    with pytest.raises(ValueError, match="num_heads"):
        SwitchHeadAttention(7, 2, 3)
    with pytest.raises(ValueError, match="num_experts"):
        SwitchHeadAttention(8, 2, 0)
    layer = SwitchHeadAttention(8, 2, 3)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(1, 4, 6))
    with pytest.raises(TypeError, match="causal"):
        layer(torch.randn(1, 4, 8), causal="yes")
    with pytest.raises(ValueError, match="top_k"):
        route_top_k(torch.randn(3, 2), 3)
    with pytest.raises(ValueError, match="logits"):
        route_top_k(torch.tensor(1.0), 1)
    with pytest.raises(ValueError, match="indices"):
        expert_projection(
            torch.randn(4, 3), torch.ones(4, 2, 1), torch.full((4, 2, 1), 5), torch.randn(2, 3, 3, 2)
        )
    with pytest.raises(ValueError, match="x"):
        expert_projection(
            torch.randn(4, 5), torch.ones(4, 2, 1), torch.zeros(4, 2, 1).long(), torch.randn(2, 3, 3, 2)
        )


# --- ring attention: sharding and cost models ------------------------------------------------------


def test_zigzag_positions_pair_an_early_and_a_late_chunk():
    assert shard_positions(8, 2, 0, layout="zigzag").tolist() == [0, 1, 6, 7]
    assert shard_positions(8, 2, 1, layout="zigzag").tolist() == [2, 3, 4, 5]
    assert shard_positions(7, 3, 2).tolist() == [5, 6]  # contiguous: sizes 3, 2, 2


@given(
    T=st.integers(1, 20),
    world_size=st.integers(1, 5),
    layout=st.sampled_from(["contiguous", "zigzag"]),
)
def test_shard_then_unshard_round_trips(T, world_size, layout):
    x = torch.arange(T).view(1, 1, T, 1).float()
    shards = shard_sequence(x, world_size, layout=layout)
    held = torch.cat([s.flatten() for s in shards]).long()
    assert sorted(held.tolist()) == list(range(T))  # every position on exactly one rank
    assert torch.equal(unshard_sequence(shards, layout=layout), x)


def test_ring_work_contiguous_is_lopsided_zigzag_balanced():
    # Contiguous causal blocks of c tokens: rank r computes r full blocks plus its diagonal one.
    assert ring_work(12, 3, layout="contiguous") == [(r + 1) * 16 for r in range(3)]
    zigzag = ring_work(12, 3, layout="zigzag")
    assert len(set(zigzag)) == 1  # chunk pairs: rank r sees r + 1 and 2W - r of them, 2W + 1 in all
    assert zigzag[0] == (2 * 3 + 1) * 2 * 2
    assert ring_work(12, 3, causal=False) == [4 * 12] * 3
    # Whatever the layout, every allowed (query, key) pair is computed at least once.
    assert sum(zigzag) >= 12 * 13 // 2


def test_communication_cost_formula():
    cost = communication_cost(2, 3, 10, 4, 4, value_dim=6, dtype=torch.float16)
    block = 2 * 3 * 3 * (4 + 6) * 2  # ceil(10 / 4) = 3 tokens of K and V in 2-byte floats
    assert cost.block_bytes == block
    assert cost.ring_bytes_sent == cost.all_gather_bytes_sent == 3 * block
    assert cost.ring_kv_bytes_held == 2 * block and cost.all_gather_kv_bytes_held == 4 * block


def test_ring_cost_and_shard_bad_input():
    with pytest.raises(ValueError, match="world_size"):
        communication_cost(1, 1, 4, 2, 5)
    with pytest.raises(TypeError, match="dtype"):
        communication_cost(1, 1, 4, 2, 2, dtype="float32")
    with pytest.raises(ValueError, match="layout"):
        shard_positions(8, 2, 0, layout="spiral")
    with pytest.raises(ValueError, match="rank"):
        shard_positions(8, 2, 2)
    with pytest.raises(ValueError, match="shards"):
        unshard_sequence([torch.zeros(1, 1, 3, 1), torch.zeros(1, 1, 1, 1)])
    with pytest.raises(ValueError, match="world_size"):
        ring_work(3, 4)


def test_ring_attention_needs_a_process_group():
    a = randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="group"):
        ring_attention(a, a, a)
    with pytest.raises(ValueError, match="group"):
        all_gather_attention(a, a, a)


def test_run_ring_attention_bad_input_before_launching():
    a = randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="world_size"):
        run_ring_attention(a, a, a, 5)
    with pytest.raises(ValueError, match="k"):
        run_ring_attention(a, randn(1, 1, 6, 2), randn(1, 1, 6, 2), 2, causal=True)
    with pytest.raises(ValueError, match="method"):
        run_ring_attention(a, a, a, 2, method="tree")
    with pytest.raises(ValueError, match="layout"):
        run_ring_attention(a, a, a, 2, layout="spiral")
    with pytest.raises(ValueError, match="grad_output"):
        run_ring_attention(a, a, a, 2, grad_output=randn(1, 1, 3, 2))
    with pytest.raises(ValueError, match="grad_output"):
        run_ring_attention(a, a, a, 2, method="all_gather", grad_output=a)
    with pytest.raises(TypeError, match="grad_output"):
        run_ring_attention(a, a, a, 2, grad_output=a.tolist())
    with pytest.raises(ValueError, match="start_method"):
        run_distributed(print, 2, start_method="teleport")
    with pytest.raises(TypeError, match="function"):
        run_distributed("print", 2)
    # the course's one scale rule (checks.resolve_scale): a finite real number, 0 and negatives allowed
    for scale, error in ((float("inf"), ValueError), (float("nan"), ValueError), (True, TypeError)):
        with pytest.raises(error, match="scale"):
            run_ring_attention(a, a, a, 2, scale=scale)


# --- ring attention on real process groups ---------------------------------------------------------

CASES = [
    # (T, S, D, D_v, causal, layout)
    (6, 6, 4, 4, False, "contiguous"),
    (7, 7, 3, 5, True, "contiguous"),
    (7, 7, 4, 4, True, "zigzag"),
    (12, 12, 2, 2, True, "zigzag"),
    (5, 9, 4, 3, False, "zigzag"),
    (5, 5, 2, 3, True, "zigzag"),
]


def _ring_cases_worker(rank, world_size, inputs):
    """Runs on every rank: each case through the ring and the all-gather, plus one misuse."""
    results = []
    for (*_, causal, layout), (q, k, v) in zip(CASES, inputs):
        q_r, k_r, v_r = (shard_sequence(x, world_size, layout=layout)[rank] for x in (q, k, v))
        ring_out, ring_stats = ring_attention(q_r, k_r, v_r, causal=causal, layout=layout, return_stats=True)
        gather_out, gather_stats = all_gather_attention(
            q_r, k_r, v_r, causal=causal, layout=layout, return_stats=True
        )
        results.append((ring_out, ring_stats, gather_out, gather_stats))
    # Misuse inside a live group: causal attention on shards whose keys do not match the queries.
    q, k, v = inputs[4]
    shards = [shard_sequence(x, world_size)[rank] for x in (q, k, v)]
    try:
        ring_attention(*shards, causal=True)
        error = None
    except ValueError as caught:
        error = str(caught)
    return results, error


@pytest.mark.parametrize("world_size", [2, 3], ids=["W2", "W3"])
def test_ring_and_all_gather_equal_single_process_attention(world_size):
    torch.manual_seed(world_size)
    inputs = [(randn(1, 2, T, D), randn(1, 2, S, D), randn(1, 2, S, D_v)) for T, S, D, D_v, _, _ in CASES]
    per_rank = run_distributed(_ring_cases_worker, world_size, inputs, start_method="fork")
    for index, ((T, S, D, D_v, causal, layout), (q, k, v)) in enumerate(zip(CASES, inputs)):
        allowed = end_aligned_causal(T, S) if causal else None
        expected = dense_softmax(q, k, allowed) @ v
        for method in (0, 2):
            shards = [rank_results[index][method] for rank_results, _ in per_rank]
            torch.testing.assert_close(unshard_sequence(shards, layout=layout), expected)
        # Bytes: each rank sends W - 1 padded blocks of K and V with either method.
        block = 2 * math.ceil(S / world_size) * (D + D_v) * 8
        for rank_results, _ in per_rank:
            ring_stats, gather_stats = rank_results[index][1], rank_results[index][3]
            assert ring_stats.bytes_sent == gather_stats.bytes_sent == (world_size - 1) * block
            assert ring_stats.kv_blocks_held == 2 and gather_stats.kv_blocks_held == world_size
        if causal:
            measured = [rank_results[index][1].score_entries for rank_results, _ in per_rank]
            assert measured == ring_work(T, world_size, layout=layout)
    for _, error in per_rank:
        assert error is not None and error.startswith("k")


def test_run_ring_attention_gathers_the_full_result():
    q, k, v = randn(1, 2, 9, 4), randn(1, 2, 9, 4), randn(1, 2, 9, 4)
    grad_output = randn(1, 2, 9, 4)
    out, grads, stats = run_ring_attention(
        q,
        k,
        v,
        3,
        causal=True,
        layout="zigzag",
        grad_output=grad_output,
        return_stats=True,
        start_method="fork",
    )
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert len(stats) == 3
    # The gathered gradients are the full-sequence ones of one process's autograd.
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    F.scaled_dot_product_attention(*leaves, is_causal=True).backward(grad_output)
    for grad, leaf in zip(grads, leaves):
        torch.testing.assert_close(grad, leaf.grad)
    # Half inputs: K/V blocks travel in half, the dK/dV accumulators in float32 (different messages).
    half, half_grads = run_ring_attention(
        q.half(), k.half(), v.half(), 2, grad_output=grad_output.half(), start_method="fork"
    )
    assert half.dtype == torch.float16 and all(grad.dtype == torch.float16 for grad in half_grads)
    torch.testing.assert_close(half.double(), F.scaled_dot_product_attention(q, k, v), atol=1e-2, rtol=1e-2)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    F.scaled_dot_product_attention(*leaves).backward(grad_output)
    for grad, leaf in zip(half_grads, leaves):
        torch.testing.assert_close(grad.double(), leaf.grad, atol=1e-2, rtol=1e-2)


def test_run_ring_attention_with_spawned_processes():
    # The portable start method: fresh interpreters (slow, seconds), as on macOS, Windows or CUDA.
    q, k, v = randn(1, 1, 5, 3), randn(1, 1, 5, 3), randn(1, 1, 5, 3)
    out = run_ring_attention(q, k, v, 2, causal=True, start_method="spawn")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


# --- ring attention's backward ----------------------------------------------------------------------

GRAD_CASES = [
    # (T, S, D, D_v, causal, layout, scale, dtype); every T leaves the ranks unequal blocks
    (7, 7, 3, 5, True, "contiguous", None, F64),
    (9, 9, 4, 4, True, "zigzag", None, F64),
    (10, 10, 2, 3, True, "zigzag", 0.7, F64),
    (8, 8, 3, 3, True, "contiguous", -0.6, F64),  # any finite scale, negatives too (resolve_scale)
    (6, 6, 4, 2, False, "contiguous", None, F64),
    (5, 9, 2, 3, False, "zigzag", None, F64),  # cross-attention, S != T
    (11, 11, 4, 4, True, "contiguous", None, torch.float32),
]


def _ring_gradients_worker(rank, world_size, inputs):
    """Runs on every rank: forward and backward ring for each case; this rank's (dq, dk, dv)."""
    results = []
    for (*_, causal, layout, scale, _), (q, k, v, grad_output) in zip(GRAD_CASES, inputs):
        q_r, k_r, v_r, grad_r = (
            shard_sequence(x, world_size, layout=layout)[rank] for x in (q, k, v, grad_output)
        )
        leaves = [x.clone().requires_grad_() for x in (q_r, k_r, v_r)]
        out = ring_attention(*leaves, causal=causal, scale=scale, layout=layout)
        out.backward(grad_r)
        results.append(tuple(leaf.grad for leaf in leaves))
    # Without inputs that require grad, no autograd graph is built.
    q, k, v, _ = inputs[0]
    plain = ring_attention(*(shard_sequence(x, world_size)[rank] for x in (q, k, v)), causal=True)
    return results, plain.requires_grad


@pytest.mark.parametrize("world_size", [2, 4], ids=["W2", "W4"])
def test_ring_attention_gradients_equal_single_process_autograd(world_size):
    torch.manual_seed(10 + world_size)
    inputs = [
        tuple(randn(2, 2, length, dim, dtype=dtype) for length, dim in ((T, D), (S, D), (S, D_v), (T, D_v)))
        for T, S, D, D_v, _, _, _, dtype in GRAD_CASES
    ]
    per_rank = run_distributed(_ring_gradients_worker, world_size, inputs, start_method="fork")
    for index, ((*_, causal, layout, scale, dtype), (q, k, v, grad_output)) in enumerate(
        zip(GRAD_CASES, inputs)
    ):
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        attention(*leaves, causal=causal, scale=scale).backward(grad_output.double())
        tolerance = {} if dtype == F64 else {"atol": 1e-5, "rtol": 1e-4}
        for which, leaf in enumerate(leaves):
            shards = [rank_results[index][which] for rank_results, _ in per_rank]
            assert all(shard.dtype == dtype for shard in shards)
            torch.testing.assert_close(
                unshard_sequence(shards, layout=layout).double(), leaf.grad, **tolerance
            )
    assert not any(requires_grad for _, requires_grad in per_rank)


def test_block_gradients_of_a_fully_masked_row_are_zero():
    # One block pair as the backward ring sees it; query 0 comes before every key and sees nothing.
    q, k, v, grad_output = randn(2, 1, 3, 4), randn(2, 1, 4, 4), randn(2, 1, 4, 3), randn(2, 1, 3, 3)
    q_positions, k_positions = torch.tensor([0, 3, 5]), torch.tensor([1, 2, 4, 6])
    out, lse = _partial_attention(q, k, v, q_positions, k_positions, True, 0.5)
    delta = (grad_output * out).sum(-1)
    grads = _block_gradients(q, k, v, grad_output, lse, delta, q_positions, k_positions, True, 0.5)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    visible = k_positions.view(1, -1) <= q_positions.view(-1, 1)
    attention(*leaves, visible, scale=0.5).backward(grad_output)
    for grad, leaf in zip(grads, leaves):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, leaf.grad)
    assert (grads[0][:, :, 0] == 0).all() and (out[:, :, 0] == 0).all()


# --- hybrid stacks ---------------------------------------------------------------------------------


def test_hybrid_pattern():
    assert hybrid_pattern(6, global_every=3) == ["window", "window", "full"] * 2
    assert hybrid_pattern(4, global_every=2, local="linear") == ["linear", "full", "linear", "full"]
    assert hybrid_pattern(3, global_every=1) == ["full"] * 3


def reference_layer(layer: HybridLayer, x):
    """One hybrid layer by hand, with dense float64 references for every mixer."""
    B, T, C = x.shape
    H, D = layer.num_heads, layer.head_dim
    normed = F.layer_norm(x, (C,), layer.norm.weight, layer.norm.bias)
    q, k, v = (normed @ layer.W_qkv.weight.T + layer.W_qkv.bias).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    causal = end_aligned_causal(T, T)
    if layer.kind == "full":
        heads = dense_softmax(q, k, causal) @ v
    elif layer.kind == "window":
        distance = torch.arange(T).view(-1, 1) - torch.arange(T).view(1, -1)
        heads = dense_softmax(q, k, causal & (distance < layer.window)) @ v
    else:
        phi_q, phi_k = (F.elu(q) + 1) * D**-0.5, F.elu(k) + 1  # the scale only meets the eps
        weights = (phi_q @ phi_k.transpose(-2, -1)) * causal
        heads = weights @ v / (weights.sum(-1, keepdim=True) + 1e-6)
    return x + heads.transpose(1, 2).reshape(B, T, C) @ layer.W_o.weight.T + layer.W_o.bias


@pytest.mark.parametrize("T", [1, 5, 11], ids=["T1", "T5", "T11-longer-than-window"])
def test_hybrid_stack_equals_layers_by_hand(T):
    stack = HybridAttentionStack(8, 2, ["window", "linear", "full", "window"], window=3).double()
    x = randn(2, T, 8)
    expected = x
    for layer in stack.layers:
        expected = reference_layer(layer, expected)
    torch.testing.assert_close(stack(x), expected)


def test_hybrid_cost_report_counts_pairs_and_cache():
    T, H, D, w = 10, 2, 4, 3
    stack = HybridAttentionStack(H * D, H, hybrid_pattern(3, global_every=3), window=w)
    report = stack.cost_report(T)
    distance = torch.arange(T).view(-1, 1) - torch.arange(T).view(1, -1)
    assert [c.kind for c in report] == ["window", "window", "full"]
    assert report[0].score_pairs == int(((distance >= 0) & (distance < w)).sum())
    assert report[2].score_pairs == int((distance >= 0).sum())
    assert report[2].cache_bytes == 2 * H * T * D * 4 and report[0].cache_bytes == 2 * H * w * D * 4
    # A window at least as long as the sequence costs what full attention costs.
    wide = mixer_cost("window", T, num_heads=H, head_dim=D, window=T + 5)
    assert wide.score_pairs == report[2].score_pairs
    # The linear state does not grow with the sequence.
    linear = [mixer_cost("linear", n, num_heads=H, head_dim=D).cache_bytes for n in (10, 1000)]
    assert linear[0] == linear[1]


def test_hybrid_bad_input():
    with pytest.raises(ValueError, match="pattern"):
        HybridAttentionStack(8, 2, ["window", "dense"])
    with pytest.raises(TypeError, match="pattern"):
        HybridAttentionStack(8, 2, "window")
    with pytest.raises(ValueError, match="window"):
        HybridAttentionStack(8, 2, ["window"], window=0)
    with pytest.raises(ValueError, match="global_every"):
        hybrid_pattern(4, global_every=0)
    with pytest.raises(TypeError, match="window"):
        mixer_cost("window", 8, num_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="kind"):
        mixer_cost("lsh", 8, num_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="num_heads"):
        HybridLayer(7, 2, "full")
    with pytest.raises(ValueError, match="x"):
        HybridAttentionStack(8, 2, ["full"])(torch.randn(1, 3, 6))


@pytest.mark.parametrize("scale", [0.0, -0.7], ids=["zero", "negative"])
def test_differential_attention_takes_any_finite_scale(scale):
    q1, k1, q2, k2, v = (randn(1, 2, 4, 3) for _ in range(5))
    out = differential_attention(q1, k1, q2, k2, v, 0.5, scale=scale)
    expected = F.scaled_dot_product_attention(q1, k1, v, scale=scale) - 0.5 * F.scaled_dot_product_attention(
        q2, k2, v, scale=scale
    )
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "scale, error",
    [(float("inf"), ValueError), (float("nan"), ValueError), (True, TypeError)],
    ids=["inf", "nan", "bool"],
)
def test_differential_attention_refuses_a_scale_that_is_not_finite(scale, error):
    a = randn(1, 2, 3, 4)
    with pytest.raises(error, match="scale"):
        differential_attention(a, a, a, a, a, 0.5, scale=scale)
