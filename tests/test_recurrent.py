"""Tests for course_lib.recurrent: every method's chunk form against its recurrent form, identities
between methods, dense float64 references written here, gradients, extremes and bad input.

The contract tests iterate the catalogue's recurrent entries (``catalogue.mechanisms(has="recurrent")``)
on their own seeded inputs at a small geometry, so a new recurrence is checked without editing this
file; the tests of one mechanism (TTT's mini-batches, mLSTM's extremes, ...) follow them."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from course_lib import catalogue
from course_lib.catalogue import Geometry, Mechanism
from course_lib.recurrent import (
    chunk_gated_scan,
    delta_rule,
    gated_delta_rule,
    gla,
    mlstm,
    read_state,
    retention,
    retention_decay_matrix,
    retnet_gammas,
    run_recurrence,
    rwkv6,
    segsum,
    ssd,
    ttt_linear,
    ttt_mlp,
)

F64 = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-10}


# --- the methods: every recurrent entry of the catalogue, plus TTT's mini-batch variant ---------


@dataclass(frozen=True)
class Method:
    """One case of the contract tests: a catalogue entry and the options fixed for the case."""

    name: str
    mechanism: Mechanism
    options: dict = field(default_factory=dict)
    chunk_multiple: int = 1  # chunk sizes are multiplied by this (TTT: the mini-batch size)

    def call(self, inputs, **options):
        return self.mechanism.run(inputs, **{**self.options, **options})


def _case(mechanism: Mechanism) -> Method:
    if "mini_batch_size" in mechanism.options:
        # TTT: mini-batches of 3 (chunks are whole mini-batches), so a short sequence holds several.
        return Method(mechanism.name, mechanism, {"mini_batch_size": 3, "chunk_size": 12}, chunk_multiple=3)
    return Method(mechanism.name, mechanism)


METHODS = [_case(m) for m in catalogue.mechanisms(has="recurrent")] + [
    Method("ttt_linear_mb1", catalogue.get("ttt_linear"), {"mini_batch_size": 1})  # TTT-Linear = delta rule
]
METHOD_IDS = [m.name for m in METHODS]
BY_NAME = {m.name: m for m in METHODS}


def takes(method, argument: str) -> inspect.Parameter | None:
    """The parameter ``argument`` of the entry's function (for Performer: its feature map, whose
    ``scale`` the catalogue's call passes on to linear attention), or None when it has none."""
    return inspect.signature(method.mechanism.function).parameters.get(argument)


# TTT-MLP's function requires its starting weights (the catalogue's call seeds them): no zero state.
STARTS_FROM_ZEROS = [m for m in METHODS if m.mechanism.name != "ttt_mlp"]


def randn(*shape, dtype=F64, generator=None):
    return torch.randn(*shape, dtype=dtype, generator=generator)


def log_gate(*shape, dtype=F64, generator=None):
    """Log forget gates in (-inf, 0): logsigmoid of a shifted normal, mostly remembering."""
    return F.logsigmoid(randn(*shape, generator=generator) + 1.5).to(dtype)


def qkv(B, H, T, dk, dv, dtype, gen, normalize_k=False):
    q, k, v = (
        randn(B, H, T, dk, generator=gen),
        randn(B, H, T, dk, generator=gen),
        randn(B, H, T, dv, generator=gen),
    )
    if normalize_k:
        k = F.normalize(k, dim=-1)
    return {"q": q.to(dtype), "k": k.to(dtype), "v": v.to(dtype)}


def draw(method, B=2, H=2, T=11, dk=3, dv=4, dtype=F64, seed=0, with_state=True):
    """The entry's seeded inputs at a small geometry, and a random initial state of its shape."""
    geometry = Geometry(batch=B, heads=H, head_dim=dk, value_dim=dv, kv_heads=1)
    inputs = method.mechanism.make_inputs(T, geometry, dtype=dtype, seed=seed)
    if not with_state:
        return inputs, None
    probe = method.mechanism.make_inputs(1, geometry, dtype=F64, seed=seed)
    _, shape_of = method.call(probe, output_final_state=True)  # the state's structure and shapes
    gen = torch.Generator().manual_seed(seed + 1)
    parts = [
        randn(*s.shape, generator=gen).to(dtype)
        for s in (shape_of if isinstance(shape_of, tuple) else (shape_of,))
    ]
    return inputs, tuple(parts) if isinstance(shape_of, tuple) else parts[0]


def flat(result):
    """(o, state) -> a list of tensors, whatever the state's structure."""
    o, state = result
    return [o, *(state if isinstance(state, tuple) else (state,))]


def assert_all_close(a, b, **tolerance):
    for x, y in zip(flat(a), flat(b), strict=True):
        torch.testing.assert_close(x, y, **tolerance)


# --- chunk == recurrent ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize(
    "T, chunk_size",
    [(1, 4), (12, 1), (12, 4), (12, 5), (12, 12), (12, 32), (13, 4)],
    ids=lambda p: str(p),
)
def test_chunk_matches_recurrent_float64(method, T, chunk_size):
    inputs, state = draw(method, T=T)
    chunk_size *= method.chunk_multiple
    expected = method.call(inputs, form="recurrent", initial_state=state, output_final_state=True)
    actual = method.call(
        inputs, form="chunk", chunk_size=chunk_size, initial_state=state, output_final_state=True
    )
    assert_all_close(actual, expected, **TIGHT)


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_chunk_float32_close_to_float64_recurrent(method):
    inputs, state = draw(method, T=20)
    expected = method.call(inputs, form="recurrent", initial_state=state, output_final_state=True)
    inputs32 = {name: x.float() for name, x in inputs.items()}
    state32 = tuple(s.float() for s in state) if isinstance(state, tuple) else state.float()
    actual = method.call(
        inputs32, chunk_size=6 * method.chunk_multiple, initial_state=state32, output_final_state=True
    )
    assert actual[0].dtype == torch.float32
    for x, y in zip(flat(actual), flat(expected), strict=True):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_state_continuation(method, form):
    """Running two halves with the state carried over equals one run over the whole sequence."""
    inputs, state = draw(method, T=14)
    options = {"form": form, "chunk_size": 4 * method.chunk_multiple, "output_final_state": True}
    whole = method.call(inputs, initial_state=state, **options)
    split = 6 if method.chunk_multiple > 1 else 5  # TTT: split on a mini-batch edge
    first = method.mechanism.tokens(inputs, 0, split)
    second = method.mechanism.tokens(inputs, split, 14)
    o_first, middle = method.call(first, initial_state=state, **options)
    o_second, final = method.call(second, initial_state=middle, **options)
    assert_all_close((torch.cat([o_first, o_second], dim=2), final), whole, **TIGHT)


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_batch_invariance(method):
    """A sequence alone gives the same output as inside a batch."""
    inputs, _ = draw(method, B=3, T=9)
    together = method.call(inputs, chunk_size=4 * method.chunk_multiple)
    for b in range(3):
        static = method.mechanism.static_inputs
        alone = {name: (x if name in static else x[b : b + 1]) for name, x in inputs.items()}
        torch.testing.assert_close(
            method.call(alone, chunk_size=4 * method.chunk_multiple), together[b : b + 1]
        )


@pytest.mark.parametrize("method", STARTS_FROM_ZEROS, ids=lambda m: m.name)
def test_no_initial_state_means_zero_state(method):
    inputs, state = draw(method, T=7)
    zero = tuple(torch.zeros_like(s) for s in state) if isinstance(state, tuple) else torch.zeros_like(state)
    torch.testing.assert_close(method.call(inputs), method.call(inputs, initial_state=zero), **TIGHT)


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_gradients_agree_between_forms(method):
    """Gradients of a random functional of (o, final state), wrt every input and the initial state."""
    inputs, state = draw(method, T=10)
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
    states = state if isinstance(state, tuple) else (state,)
    # mLSTM's stabiliser m gets no gradient (the output does not depend on it), so leave it out.
    state_leaves = [s.clone().requires_grad_(index < 2) for index, s in enumerate(states)]
    initial = tuple(state_leaves) if isinstance(state, tuple) else state_leaves[0]
    wanted = list(leaves.values()) + [s for s in state_leaves if s.requires_grad]

    gradients = {}
    for form in ("recurrent", "chunk"):
        outputs = flat(
            method.call(
                leaves,
                form=form,
                chunk_size=3 * method.chunk_multiple,
                initial_state=initial,
                output_final_state=True,
            )
        )
        weights = [
            torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(7 + i))
            for i, x in enumerate(outputs)
        ]
        loss = sum((w * x).sum() for w, x in zip(weights, outputs) if x.requires_grad)
        gradients[form] = torch.autograd.grad(loss, wanted, allow_unused=True)
    for a, b in zip(gradients["chunk"], gradients["recurrent"], strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_gradcheck_chunk_form(method):
    inputs, state = draw(method, B=1, H=1, T=5, dk=2, dv=2)
    names = [name for name, x in inputs.items() if name not in ("beta", "lr", "dt", "A")]
    states = state if isinstance(state, tuple) else (state,)
    mlstm = method.mechanism.name == "mlstm"
    differentiated = 2 if mlstm else len(states)  # mLSTM's stabiliser m is carried, not differentiated

    def function(*tensors):
        x = dict(inputs, **dict(zip(names, tensors[: len(names)], strict=True)))
        parts = [*tensors[len(names) :], *states[differentiated:]]
        initial = tuple(parts) if isinstance(state, tuple) else parts[0]
        o, final = method.call(
            x, chunk_size=2 * method.chunk_multiple, initial_state=initial, output_final_state=True
        )
        if mlstm:  # check the true memory exp(m) C~, which m's detaching keeps exact
            return o, final[0] * final[2].exp()[..., None, None], final[1] * final[2].exp()[..., None]
        return (o, *final) if isinstance(final, tuple) else (o, final)

    leaves = [inputs[name].clone().requires_grad_() for name in names]
    leaves += [s.clone().requires_grad_() for s in states[:differentiated]]
    assert torch.autograd.gradcheck(function, leaves, fast_mode=True)


def test_gradcheck_write_strengths():
    """beta, lr, dt and A are differentiable too (values kept inside their valid ranges)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (
        randn(1, 1, 5, 2, generator=gen),
        F.normalize(randn(1, 1, 5, 2, generator=gen), dim=-1),
        randn(1, 1, 5, 2, generator=gen),
    )
    beta = (0.2 + 0.6 * torch.rand(1, 1, 5, dtype=F64, generator=gen)).requires_grad_()
    g = log_gate(1, 1, 5, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda g, b: gated_delta_rule(q, k, v, g, b, chunk_size=2), (g, beta), fast_mode=True
    )
    assert torch.autograd.gradcheck(
        lambda lr: ttt_linear(q, k, v, lr, mini_batch_size=2, chunk_size=2), (beta,), fast_mode=True
    )
    dt = (0.3 + torch.rand(1, 1, 5, dtype=F64, generator=gen)).requires_grad_()
    A = torch.tensor([-0.7], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda dt, A: ssd(v, dt, A, q, k, chunk_size=2), (dt, A), fast_mode=True)


# --- dense references written here, and identities between methods --------------------------


def dense_gla(q, k, v, g, scale):
    """o_t = sum_{s<=t} scale * (q_t * exp(G_t - G_s)) . k_s v_s, with G the cumulative log gate."""
    G = g.cumsum(dim=2)
    T = q.shape[2]
    o = torch.zeros(*q.shape[:3], v.shape[-1], dtype=F64)
    for t in range(T):
        for s in range(t + 1):
            weight = (scale * q[:, :, t] * (G[:, :, t] - G[:, :, s]).exp() * k[:, :, s]).sum(-1)
            o[:, :, t] += weight[..., None] * v[:, :, s]
    return o


def test_gla_matches_dense_reference():
    inputs, _ = draw(BY_NAME["gla"], T=9)
    expected = dense_gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"], 3**-0.5)
    for form in ("recurrent", "chunk"):
        torch.testing.assert_close(gla(**inputs, form=form, chunk_size=4), expected, **TIGHT)


def test_gla_zero_gate_is_causal_linear_attention():
    inputs, _ = draw(BY_NAME["gla"], T=10)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    scores = (q @ k.transpose(-1, -2)) * 0.5 * torch.ones(10, 10, dtype=torch.bool).tril()
    torch.testing.assert_close(
        gla(q, k, v, torch.zeros_like(inputs["g"]), scale=0.5, chunk_size=4), scores @ v, **TIGHT
    )


def test_retention_equals_gla_with_broadcast_gate():
    inputs, _ = draw(BY_NAME["retnet"], T=10)
    B, H, T, D = inputs["q"].shape
    broadcast = inputs["g"][None, :, None, None].expand(B, H, T, D)
    torch.testing.assert_close(
        retention(**inputs, chunk_size=4),
        gla(inputs["q"], inputs["k"], inputs["v"], broadcast, form="recurrent"),
        **TIGHT,
    )


def test_retention_parallel_form_and_decay_matrix():
    gammas = torch.tensor([0.5, 0.9], dtype=F64)
    D = retention_decay_matrix(gammas.log(), 4)
    assert D.shape == (2, 4, 4)
    torch.testing.assert_close(D[0, 3], torch.tensor([0.125, 0.25, 0.5, 1.0], dtype=F64))
    torch.testing.assert_close(D[1, 2, :3], torch.tensor([0.81, 0.9, 1.0], dtype=F64))
    assert D[1, 0, 1] == 0 and D[0, 1, 3] == 0
    inputs, state = draw(BY_NAME["retnet"], T=8)
    expected = retention(**inputs, form="recurrent", initial_state=state, output_final_state=True)
    assert_all_close(
        retention(**inputs, form="parallel", initial_state=state, output_final_state=True), expected, **TIGHT
    )


def test_retnet_gammas_match_the_paper():
    """RetNet: gamma = 1 - 2^(-5 - arange(0, h))."""
    torch.testing.assert_close(
        retnet_gammas(3), torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128], dtype=F64)
    )


def test_ssd_is_scalar_gated_linear_attention():
    """q = C, k = B, v = dt * x, g = A * dt (broadcast over the key dim), scale = 1."""
    x = draw(BY_NAME["mamba2"], T=10)[0]
    N = x["B"].shape[-1]
    g = (x["A"][None, :, None] * x["dt"])[..., None].expand(-1, -1, -1, N)
    expected = gla(x["C"], x["B"], x["dt"][..., None] * x["x"], g, scale=1.0, form="recurrent")
    for form in ("recurrent", "parallel", "chunk"):
        torch.testing.assert_close(ssd(**x, form=form, chunk_size=4), expected, **TIGHT)


def test_ssd_parallel_with_state():
    x, state = draw(BY_NAME["mamba2"], T=9)
    expected = ssd(**x, form="recurrent", initial_state=state, output_final_state=True)
    assert_all_close(
        ssd(**x, form="parallel", initial_state=state, output_final_state=True), expected, **TIGHT
    )


def test_segsum_definition():
    x = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    inf = float("-inf")
    expected = torch.tensor([[0.0, inf, inf], [2.0, 0.0, inf], [6.0, 4.0, 0.0]], dtype=F64)
    torch.testing.assert_close(segsum(x), expected)


def unstabilised_mlstm(q, k, v, i, f, scale):
    """The mLSTM equations as written, without any stabiliser (fine in float64 for moderate i)."""
    B, H, T, D = q.shape
    C, n, outputs = torch.zeros(B, H, D, v.shape[-1], dtype=F64), torch.zeros(B, H, D, dtype=F64), []
    for t in range(T):
        C = (
            f[:, :, t, None, None].exp() * C
            + i[:, :, t, None, None].exp() * k[:, :, t, :, None] * v[:, :, t, None, :]
        )
        n = f[:, :, t, None].exp() * n + i[:, :, t, None].exp() * k[:, :, t]
        query = scale * q[:, :, t]
        denominator = (n * query).sum(-1).abs().clamp(min=1.0)
        outputs.append(torch.einsum("bhk,bhkv->bhv", query, C) / denominator[..., None])
    return torch.stack(outputs, dim=2)


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_mlstm_stabiliser_cancels_exactly(form):
    inputs, _ = draw(BY_NAME["mlstm"], T=12)
    expected = unstabilised_mlstm(**inputs, scale=3**-0.5)
    torch.testing.assert_close(mlstm(**inputs, form=form, chunk_size=5), expected, **TIGHT)


def test_gated_delta_rule_with_zero_gate_is_delta_rule():
    inputs, state = draw(BY_NAME["gated_deltanet"], T=10)
    without_gate = {name: x for name, x in inputs.items() if name != "g"}
    for form in ("recurrent", "chunk"):
        a = gated_delta_rule(**dict(inputs, g=torch.zeros_like(inputs["g"])), form=form, initial_state=state)
        torch.testing.assert_close(
            a, delta_rule(**without_gate, form="recurrent", initial_state=state), **TIGHT
        )


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_beta_zero_leaves_the_state_unchanged(form):
    inputs, state = draw(BY_NAME["deltanet"], T=6)
    o, final = delta_rule(
        **dict(inputs, beta=torch.zeros_like(inputs["beta"])),
        form=form,
        initial_state=state,
        output_final_state=True,
    )
    torch.testing.assert_close(final, state, **TIGHT)
    torch.testing.assert_close(o, 3**-0.5 * inputs["q"] @ state, **TIGHT)


def test_delta_rule_overwrites_where_linear_attention_adds():
    """Write v1 then v2 under the same unit key with beta = 1: the delta rule returns v2."""
    k = torch.tensor([1.0, 0.0], dtype=F64).expand(1, 1, 2, 2)
    v = torch.tensor([[1.0, 2.0], [5.0, -3.0]], dtype=F64)[None, None]
    o = delta_rule(k, k, v, torch.ones(1, 1, 2, dtype=F64), scale=1.0)
    torch.testing.assert_close(o[0, 0, 1], v[0, 0, 1])
    added = gla(k, k, v, torch.zeros(1, 1, 2, 2, dtype=F64), scale=1.0)
    torch.testing.assert_close(added[0, 0, 1], v[0, 0, 0] + v[0, 0, 1])


def test_ttt_mini_batch_one_is_the_delta_rule():
    inputs, state = draw(BY_NAME["ttt_linear_mb1"], T=11)
    beta = inputs["lr"]
    expected = delta_rule(inputs["q"], inputs["k"], inputs["v"], beta, form="recurrent", initial_state=state)
    for form in ("recurrent", "chunk"):
        torch.testing.assert_close(
            ttt_linear(**inputs, mini_batch_size=1, form=form, initial_state=state), expected, **TIGHT
        )


def test_ttt_one_mini_batch_matches_the_dual_form():
    """With one mini-batch every gradient is taken at W0: O = Q W0 - tril(Q K^T) diag(lr) (K W0 - V)."""
    inputs, W0 = draw(BY_NAME["ttt_linear_mb1"], T=6)
    q, k, v, lr = (inputs[name] for name in ("q", "k", "v", "lr"))
    scaled = q * 3**-0.5
    tril = torch.ones(6, 6, dtype=torch.bool).tril()
    expected = scaled @ W0 - ((scaled @ k.transpose(-1, -2)) * tril) @ (lr[..., None] * (k @ W0 - v))
    for form in ("recurrent", "chunk"):
        actual = ttt_linear(q, k, v, lr, mini_batch_size=6, form=form, chunk_size=6, initial_state=W0)
        torch.testing.assert_close(actual, expected, **TIGHT)


# --- TTT-MLP ------------------------------------------------------------------------------------


def ttt_mlp_inputs(B=2, H=2, T=13, dk=4, dh=6, dv=3, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = qkv(B, H, T, dk, dv, dtype, gen).values()
    lr = 0.05 * torch.rand(B, H, T, generator=gen, dtype=dtype)
    W1 = 0.5 * randn(B, H, dk, dh, generator=gen).to(dtype)
    W2 = 0.5 * randn(B, H, dh, dv, generator=gen).to(dtype)
    return q, k, v, lr, (W1, W2)


@pytest.mark.parametrize("mini_batch_size", [1, 4, 13, 32])
def test_ttt_mlp_dual_form_matches_autograd_reference(mini_batch_size):
    """Hand-written gradients and the parallel mini-batch form vs per-token autograd steps."""
    q, k, v, lr, state = ttt_mlp_inputs()
    options = {"mini_batch_size": mini_batch_size, "output_final_state": True}
    expected = ttt_mlp(q, k, v, lr, state, form="recurrent", **options)
    assert_all_close(ttt_mlp(q, k, v, lr, state, form="chunk", **options), expected, **TIGHT)


def test_ttt_mlp_zero_learning_rate_is_the_fixed_mlp():
    q, k, v, lr, (W1, W2) = ttt_mlp_inputs()
    for form in ("recurrent", "chunk"):
        o, (W1_end, W2_end) = ttt_mlp(q, k, v, 0 * lr, (W1, W2), form=form, output_final_state=True)
        torch.testing.assert_close(o, F.gelu(q @ W1) @ W2, **TIGHT)
        torch.testing.assert_close(W1_end, W1, **TIGHT)
        torch.testing.assert_close(W2_end, W2, **TIGHT)


def test_ttt_mlp_inner_step_lowers_the_reconstruction_loss():
    """One small step on a token is gradient descent: that token's loss goes down."""
    q, k, v, lr, (W1, W2) = ttt_mlp_inputs(T=1)

    def loss(w1, w2):
        return 0.5 * (F.gelu(k @ w1) @ w2 - v).pow(2).sum((-1, -2))

    _, (W1_end, W2_end) = ttt_mlp(q, k, v, 0 * lr + 1e-3, (W1, W2), output_final_state=True)
    assert bool((loss(W1_end, W2_end) < loss(W1, W2)).all())


def test_ttt_mlp_state_continuation_and_gradients():
    q, k, v, lr, state = ttt_mlp_inputs(T=12)
    whole = ttt_mlp(q, k, v, lr, state, mini_batch_size=4, output_final_state=True)
    first, middle = ttt_mlp(
        q[:, :, :8], k[:, :, :8], v[:, :, :8], lr[:, :, :8], state, mini_batch_size=4, output_final_state=True
    )
    second, end = ttt_mlp(
        q[:, :, 8:],
        k[:, :, 8:],
        v[:, :, 8:],
        lr[:, :, 8:],
        middle,
        mini_batch_size=4,
        output_final_state=True,
    )
    assert_all_close((torch.cat([first, second], dim=2), end), whole, **TIGHT)

    leaves = [x.clone().requires_grad_() for x in (q, k, v, lr, *state)]
    gradients = []
    for form in ("recurrent", "chunk"):
        o = ttt_mlp(*leaves[:4], tuple(leaves[4:]), mini_batch_size=4, form=form)
        gradients.append(torch.autograd.grad(o.pow(2).sum(), leaves))
    for from_autograd_steps, from_dual_form in zip(*gradients, strict=True):
        torch.testing.assert_close(from_dual_form, from_autograd_steps, rtol=1e-8, atol=1e-9)


def test_ttt_mlp_bad_input():
    q, k, v, lr, (W1, W2) = ttt_mlp_inputs()
    with pytest.raises(TypeError, match="initial_state"):
        ttt_mlp(q, k, v, lr, W1)
    with pytest.raises(ValueError, match=r"initial_state\[1\]"):
        ttt_mlp(q, k, v, lr, (W1, W2[..., :2, :]))
    with pytest.raises(ValueError, match="lr"):
        ttt_mlp(q, k, v, -lr - 1, (W1, W2))
    with pytest.raises(ValueError, match="mini_batch_size"):
        ttt_mlp(q, k, v, lr, (W1, W2), mini_batch_size=0)
    with pytest.raises(ValueError, match="form"):
        ttt_mlp(q, k, v, lr, (W1, W2), form="parallel")
    with pytest.raises(TypeError, match="output_final_state"):
        ttt_mlp(q, k, v, lr, (W1, W2), output_final_state="yes")


def test_rwkv6_matches_the_paper_formula():
    """wkv_t = diag(u) k_t v_t^T + sum_{i<t} diag(prod_{j=i+1}^{t-1} w_j) k_i v_i^T, read with r_t."""
    x, _ = draw(BY_NAME["rwkv6"], T=8)
    r, k, v, w, u = x["q"], x["k"], x["v"], x["w"], x["u"]
    expected = torch.zeros_like(v)
    for t in range(8):
        wkv = u[None, :, :, None] * k[:, :, t, :, None] * v[:, :, t, None, :]
        for i in range(t):
            decay = w[:, :, i + 1 : t].sum(dim=2).exp()  # empty product = 1 for i = t - 1
            wkv = wkv + decay[..., None] * k[:, :, i, :, None] * v[:, :, i, None, :]
        expected[:, :, t] = torch.einsum("bhk,bhkv->bhv", r[:, :, t], wkv)
    for form in ("recurrent", "chunk"):
        torch.testing.assert_close(
            rwkv6(r, k, v, w, u, scale=1.0, form=form, chunk_size=3), expected, **TIGHT
        )


def test_rwkv6_without_decay_and_unit_bonus_is_linear_attention():
    x, _ = draw(BY_NAME["rwkv6"], T=9)
    g = torch.zeros_like(x["w"])
    expected = gla(x["q"], x["k"], x["v"], g, form="recurrent")
    torch.testing.assert_close(
        rwkv6(x["q"], x["k"], x["v"], g, torch.ones_like(x["u"]), chunk_size=4), expected, **TIGHT
    )


# --- property tests -------------------------------------------------------------------------


@given(
    T=st.integers(1, 20),
    chunk_size=st.integers(1, 24),
    dk=st.integers(1, 4),
    dv=st.integers(1, 4),
    which=st.sampled_from(["gla", "deltanet", "mlstm", "mamba2", "rwkv6"]),
    seed=st.integers(0, 2**16),
)
def test_property_chunk_matches_recurrent(T, chunk_size, dk, dv, which, seed):
    method = next(m for m in METHODS if m.name == which)
    inputs, state = draw(method, B=1, H=2, T=T, dk=dk, dv=dv, seed=seed)
    expected = method.call(inputs, form="recurrent", initial_state=state, output_final_state=True)
    actual = method.call(inputs, chunk_size=chunk_size, initial_state=state, output_final_state=True)
    assert_all_close(actual, expected, rtol=1e-8, atol=1e-8)


# --- extremes and half precision -------------------------------------------------------------


def test_strong_forgetting_keeps_only_the_current_token():
    """Log gates of -1000 forget everything at once: each output is scale (q_t . k_t) v_t (float32)."""
    inputs, _ = draw(BY_NAME["gla"], T=40, dtype=torch.float32)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    only_current = 3**-0.5 * (q * k).sum(-1, keepdim=True) * v
    strong = torch.full_like(inputs["g"], -1000.0)
    for form in ("recurrent", "chunk"):
        torch.testing.assert_close(
            gla(q, k, v, strong, form=form, chunk_size=16), only_current, rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            retention(q, k, v, strong[0, :, 0, 0], form=form), only_current, rtol=1e-4, atol=1e-5
        )
        beta = torch.ones(*q.shape[:3])
        gated = gated_delta_rule(q, k, v, strong[..., 0], beta, form=form, chunk_size=16)
        torch.testing.assert_close(gated, only_current, rtol=1e-4, atol=1e-5)
    x = draw(BY_NAME["mamba2"], T=40, dtype=torch.float32)[0]
    A = torch.full_like(x["A"], -1e4)
    expected = (x["C"] * x["B"]).sum(-1, keepdim=True) * x["dt"][..., None] * x["x"]
    torch.testing.assert_close(ssd(**dict(x, A=A), chunk_size=16), expected, rtol=1e-4, atol=1e-5)


def test_gla_mixed_extreme_gates_are_finite():
    """Some dimensions forget at -50 per step while others remember: nothing may overflow."""
    inputs, _ = draw(BY_NAME["gla"], T=64, dtype=torch.float32)
    g = inputs["g"].clone()
    g[..., 0] = -50.0
    o = gla(**dict(inputs, g=g), chunk_size=64)
    assert torch.isfinite(o).all()
    reference = gla(**{name: x.double() for name, x in dict(inputs, g=g).items()}, form="recurrent")
    torch.testing.assert_close(o.double(), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_mlstm_huge_input_gate(form):
    """i = 500 overflows exp in any dtype; with full forgetting o_t = sign(q_t . k_t) v_t exactly."""
    inputs, _ = draw(BY_NAME["mlstm"], T=20, dtype=torch.float32)
    i = torch.full_like(inputs["i"], 500.0)
    f = torch.full_like(inputs["f"], -1000.0)
    o = mlstm(**dict(inputs, i=i, f=f), form=form, chunk_size=8)
    expected = (inputs["q"] * inputs["k"]).sum(-1, keepdim=True).sign() * inputs["v"]
    torch.testing.assert_close(o, expected)
    mixed = mlstm(**dict(inputs, i=inputs["i"] * 100), form=form, chunk_size=8)
    assert torch.isfinite(mixed).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_half_precision(method, dtype):
    inputs, _ = draw(method, T=12)
    expected = method.call(inputs, form="recurrent")
    half = {name: x.to(dtype) for name, x in inputs.items()}
    if "beta" in half or "lr" in half:  # rounding may push a write strength just past 1
        half = {name: (x.clamp(0, 1) if name in ("beta", "lr") else x) for name, x in half.items()}
    for form in ("recurrent", "chunk"):
        o = method.call(half, form=form, chunk_size=4 * method.chunk_multiple)
        assert o.dtype == dtype
        torch.testing.assert_close(
            o.double(), expected, rtol=0.05, atol=0.05 if dtype == torch.float16 else 0.15
        )


# --- bad input ------------------------------------------------------------------------------


def _base(name):
    method = next(m for m in METHODS if m.name == name)
    return method, draw(method, T=6, dtype=torch.float32, with_state=False)[0]


BAD_INPUTS = [
    ("retnet", {"g": torch.tensor([0.1, -0.1])}, ValueError, "g"),
    ("retnet", {"g": torch.zeros(3)}, ValueError, "g"),
    ("retnet", {"k": torch.zeros(2, 2, 5, 3)}, ValueError, "k"),
    ("gla", {"g": torch.zeros(2, 2, 6, 2)}, ValueError, "g"),
    ("gla", {"g": torch.full((2, 2, 6, 3), 0.5)}, ValueError, "g"),
    ("gla", {"v": torch.zeros(2, 3, 6, 4)}, ValueError, "v"),
    ("gla", {"q": torch.zeros(2, 2, 6, 3, dtype=torch.long)}, TypeError, "q"),
    ("mamba2", {"A": torch.tensor([-0.5, 0.0])}, ValueError, "A"),
    ("mamba2", {"A": torch.tensor([-0.5])}, ValueError, "A"),
    ("mamba2", {"dt": torch.full((2, 2, 6), -0.1)}, ValueError, "dt"),
    ("mamba2", {"dt": torch.ones(2, 2, 5)}, ValueError, "dt"),
    ("mamba2", {"C": torch.zeros(2, 2, 6, 2)}, ValueError, "C"),
    ("mamba2", {"B": torch.zeros(2, 2, 7, 3)}, ValueError, "B"),
    ("mlstm", {"f": torch.full((2, 2, 6), 0.1)}, ValueError, "f"),
    ("mlstm", {"i": torch.zeros(2, 2, 6, 1)}, ValueError, "i"),
    ("mlstm", {"i": torch.full((2, 2, 6), float("inf"))}, ValueError, "i"),
    ("deltanet", {"beta": torch.full((2, 2, 6), 1.5)}, ValueError, "beta"),
    ("deltanet", {"beta": torch.full((2, 2, 6), -0.1)}, ValueError, "beta"),
    ("deltanet", {"beta": torch.ones(2, 6)}, ValueError, "beta"),
    ("gated_deltanet", {"g": torch.full((2, 2, 6), 0.2)}, ValueError, "g"),
    ("gated_deltanet", {"beta": torch.full((2, 2, 6), 2.0)}, ValueError, "beta"),
    ("ttt_linear_mb1", {"lr": torch.full((2, 2, 6), -0.1)}, ValueError, "lr"),
    ("ttt_linear_mb1", {"lr": torch.ones(2, 2, 5)}, ValueError, "lr"),
    ("rwkv6", {"w": torch.full((2, 2, 6, 3), 0.1)}, ValueError, "w"),
    ("rwkv6", {"u": torch.zeros(3, 3)}, ValueError, "u"),
    ("rwkv6", {"u": torch.zeros(2, 3, 1)}, ValueError, "u"),
]


@pytest.mark.parametrize(
    "name, change, error, argument",
    BAD_INPUTS,
    ids=[f"{n}-{a}-{i}" for i, (n, _, _, a) in enumerate(BAD_INPUTS)],
)
def test_bad_tensor_inputs(name, change, error, argument):
    method, inputs = _base(name)
    with pytest.raises(error, match=argument):
        method.call(dict(inputs, **change))


BAD_OPTIONS = [
    ({"form": "parallel-ish"}, ValueError, "form"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"chunk_size": 2.0}, TypeError, "chunk_size"),
    ({"output_final_state": 1}, TypeError, "output_final_state"),
    ({"initial_state": "zeros"}, TypeError, "initial_state"),
]


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("change, error, argument", BAD_OPTIONS, ids=[a for _, _, a in BAD_OPTIONS])
def test_bad_options(method, change, error, argument):
    if argument == "chunk_size" and method.mechanism.name == "ttt_mlp":
        pytest.skip("TTT-MLP has no chunk_size: its chunks are its mini-batches")
    inputs, _ = draw(method, T=6, with_state=False)
    with pytest.raises(error, match=argument):
        method.call(inputs, **change)


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_bad_initial_state_shape(method):
    inputs, state = draw(method, T=6)
    wrong = tuple(s[..., :1] for s in state) if isinstance(state, tuple) else state[..., :1]
    with pytest.raises(ValueError, match="initial_state"):
        method.call(inputs, initial_state=wrong)


@pytest.mark.parametrize("method", [m for m in METHODS if takes(m, "scale")], ids=lambda m: m.name)
def test_bad_scale(method):
    # One rule everywhere: a finite real number (0 and negatives allowed); inf, NaN and bools refused.
    inputs, _ = draw(method, T=4, with_state=False)
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ValueError, match="scale"):
            method.call(inputs, scale=bad)
    with pytest.raises(TypeError, match="scale"):
        method.call(inputs, scale=True)
    for allowed in (0.0, -1.0):
        assert torch.isfinite(method.call(inputs, scale=allowed)).all()


def test_bad_helper_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        retnet_gammas(0)
    with pytest.raises(TypeError, match="num_heads"):
        retnet_gammas(2.5)
    with pytest.raises(ValueError, match="T"):
        retention_decay_matrix(torch.tensor([-0.1]), 0)
    with pytest.raises(ValueError, match="g"):
        retention_decay_matrix(torch.tensor([0.1]), 3)
    q = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match="mini_batch_size"):
        ttt_linear(q, q, q, torch.zeros(1, 1, 4), mini_batch_size=3, chunk_size=4)
    with pytest.raises(ValueError, match="mini_batch_size"):
        ttt_linear(q, q, q, torch.zeros(1, 1, 4), mini_batch_size=0)
    with pytest.raises(TypeError, match="g"):
        gated_delta_rule(q, q, q, None, torch.zeros(1, 1, 4))
    with pytest.raises(TypeError, match="x"):
        ssd([1.0], torch.zeros(1, 1, 4), torch.tensor([-1.0]), q, q)


# --- empty sequences -------------------------------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_empty_sequence_gives_an_empty_output_and_keeps_the_state(method, with_state):
    if not with_state and method not in STARTS_FROM_ZEROS:
        pytest.skip("TTT-MLP has no zero state: test_ttt_mlp_empty_sequence_keeps_the_weights")
    inputs, state = draw(method, T=0, with_state=with_state)
    one = method.call(draw(method, T=1, with_state=False)[0])
    empty = (*one.shape[:2], 0, one.shape[3])  # (B, H, 0, D_v); Mamba-1: one head of every channel
    for form in method.mechanism.forms:
        o, final = method.call(inputs, form=form, initial_state=state, output_final_state=True)
        assert o.shape == empty and o.dtype == F64
        expected = state if with_state else tuple(torch.zeros_like(s) for s in flat((o, final))[1:])
        for got, want in zip(flat((o, final))[1:], flat((o, expected))[1:], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        half = {name: x.half() for name, x in inputs.items()}
        assert method.call(half, form=form).shape == empty


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
@pytest.mark.parametrize("name, function", [("retnet", retention), ("mamba2", ssd)])
def test_empty_sequence_in_the_parallel_form(name, function, with_state):
    inputs, state = draw(BY_NAME[name], T=0, with_state=with_state)
    o, final = function(**inputs, form="parallel", initial_state=state, output_final_state=True)
    assert o.shape == (2, 2, 0, 4) and o.dtype == F64
    torch.testing.assert_close(final, state if with_state else torch.zeros_like(final), rtol=0, atol=0)


def test_ttt_mlp_empty_sequence_keeps_the_weights():
    q, k, v, lr, state = ttt_mlp_inputs(T=0)
    for form in ("recurrent", "chunk"):
        o, final = ttt_mlp(q, k, v, lr, state, form=form, output_final_state=True)
        assert o.shape == (2, 2, 0, 3)
        for got, want in zip(final, state, strict=True):
            assert torch.equal(got, want)


# --- the runner ------------------------------------------------------------------------------


def test_run_recurrence_with_constant_decay_is_the_geometric_sum():
    """S_t = gamma S_{t-1} + c_t unrolls to gamma^t S_0 + sum_{s <= t} gamma^(t - s) c_s."""
    gen = torch.Generator().manual_seed(0)
    T, gamma = 9, 0.7
    c = randn(T, 2, 3, generator=gen)
    start = randn(2, 3, generator=gen)
    o, final = run_recurrence(
        T, start, decay=lambda t, S: gamma * S, write=lambda t, S: c[t], read=lambda t, S: S[None]
    )
    steps = torch.arange(1, T + 1, dtype=F64)
    powers = torch.tril(gamma ** (steps[:, None] - steps[None, :]))  # gamma^(t - s) for s <= t
    expected = torch.einsum("ts,sij->tij", powers, c) + (gamma**steps)[:, None, None] * start
    torch.testing.assert_close(o[0], expected.permute(1, 0, 2), **TIGHT)  # reads stacked on dim 2
    torch.testing.assert_close(final, expected[-1], **TIGHT)


def test_run_recurrence_write_sees_the_decayed_state():
    """A write towards a target, S_t = S' + beta (v - S') with S' = a S_{t-1}, has the closed form
    S_t = v beta / (1 - r) (1 - r^t) + r^t S_0 with r = a (1 - beta)."""
    T, a, beta, target = 7, 0.9, 0.3, 2.0
    start = torch.tensor([[-1.0]], dtype=F64)
    o, final = run_recurrence(
        T,
        start,
        decay=lambda t, S: a * S,
        write=lambda t, S: beta * (target - S),
        read=lambda t, S: S,
    )
    r = a * (1 - beta)
    steps = torch.arange(1, T + 1, dtype=F64)
    expected = target * beta / (1 - r) * (1 - r**steps) + r**steps * start[0, 0]
    torch.testing.assert_close(o[0, 0], expected, **TIGHT)


def test_run_recurrence_tuple_state_and_the_order_decay_write_read():
    calls = []

    def decay(t, state):
        calls.append(("decay", t))
        total, count = state
        return 0.5 * total, count

    def write(t, state):
        calls.append(("write", t))
        return state[0] + 1.0, torch.ones_like(state[1])  # the write sees the decayed total

    def read(t, state):
        calls.append(("read", t))
        return torch.stack(state, dim=-1)

    start = (torch.full((1, 1), 4.0, dtype=F64), torch.zeros(1, 1, dtype=F64))
    o, (total, count) = run_recurrence(3, start, decay=decay, write=write, read=read)
    assert calls == [(step, t) for t in range(3) for step in ("decay", "write", "read")]
    # total: 4 -> (2 + 2 + 1) = 5 -> (2.5 + 2.5 + 1) = 6 -> 7; count: 1, 2, 3
    torch.testing.assert_close(o[0, 0], torch.tensor([[5.0, 1.0], [6.0, 2.0], [7.0, 3.0]], dtype=F64))
    assert total.item() == 7.0 and count.item() == 3.0


def test_run_recurrence_read_first_reads_the_previous_state():
    gen = torch.Generator().manual_seed(1)
    c = randn(5, 2, 3, generator=gen)
    options = dict(decay=lambda t, S: 0.8 * S, write=lambda t, S: c[t], read=lambda t, S: S)
    after, final_after = run_recurrence(5, torch.zeros(2, 3, dtype=F64), **options)
    before, final_before = run_recurrence(5, torch.zeros(2, 3, dtype=F64), read_first=True, **options)
    assert torch.equal(final_after, final_before)
    assert torch.equal(before[:, :, 0], torch.zeros(2, 3, dtype=F64))  # S_0
    assert torch.equal(before[:, :, 1:], after[:, :, :-1])  # o_t = S_{t-1}


def test_read_state_is_s_transpose_q():
    gen = torch.Generator().manual_seed(2)
    query, state = randn(2, 3, 4, generator=gen), randn(2, 3, 4, 5, generator=gen)
    expected = torch.stack([torch.stack([state[b, h].T @ query[b, h] for h in range(3)]) for b in range(2)])
    torch.testing.assert_close(read_state(query, state), expected, **TIGHT)


def test_run_recurrence_bad_arguments():
    state = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="steps"):
        run_recurrence(0, state, write=lambda t, S: S, read=lambda t, S: S)
    with pytest.raises(TypeError, match="steps"):
        run_recurrence(2.0, state, write=lambda t, S: S, read=lambda t, S: S)
    with pytest.raises(TypeError, match="read_first"):
        run_recurrence(2, state, write=lambda t, S: S, read=lambda t, S: S, read_first=1)


def test_chunk_gated_scan_is_public_and_equals_the_runner():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (
        randn(1, 2, 10, 3, generator=gen),
        randn(1, 2, 10, 3, generator=gen),
        randn(1, 2, 10, 4, generator=gen),
    )
    g = log_gate(1, 2, 10, 3, generator=gen)
    o, final = chunk_gated_scan(q, k, v, g, 4, torch.zeros(1, 2, 3, 4, dtype=F64))
    expected, expected_final = run_recurrence(
        10,
        torch.zeros(1, 2, 3, 4, dtype=F64),
        decay=lambda t, S: g[:, :, t, :, None].exp() * S,
        write=lambda t, S: k[:, :, t, :, None] * v[:, :, t, None, :],
        read=lambda t, S: read_state(q[:, :, t], S),
    )
    torch.testing.assert_close(o, expected, **TIGHT)
    torch.testing.assert_close(final, expected_final, **TIGHT)
